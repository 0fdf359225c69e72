"""Euclidean projection of parameter values onto a LID (box or zonotope), exact in the storage
dtype.

A LID T fixes every parameter it does not box at the value it had in the model the LID was
computed for (the certificate is about that network), so the projection onto T clamps the
boxed tensors into their box and resets every other tensor to its reference value.

Rounding: a projected value must be stored (float32, float16, ...) and still lie in the box.
`representable_corners` rounds each corner *inward* to the storage dtype (the smallest
representable value >= lower, the largest <= upper); clamping a representable value into
representable corners gives a representable value, so no rounding happens afterwards and
membership holds exactly, in float64. Corners written by `verifier lid` are already
float32-representable (`verifier.search.inward_float32`), so for float32 models this is the
plain clamp.

Zonotope LIDs: the generators' coefficients ε are shared by all boxed tensors, so the boxed
tensors are projected jointly, with one `Zonotope.project` call, in their storage dtypes; that
call returns values that lie in the zonotope exactly (checked in float64, see
`verifier.domains.zonotope`) and keeps values already inside bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.errors import DomainError


def representable_corners(
    lower: Tensor, upper: Tensor, dtype: torch.dtype, *, name: str
) -> tuple[Tensor, Tensor]:
    """The box [lower, upper] shrunk to its values representable in `dtype` (sound: a subset).

    Args:
        lower: lower corner (any float dtype; read exactly as float64).
        upper: upper corner, same shape.
        dtype: the storage dtype of the parameter.
        name: the parameter's name, for the error message.

    Returns:
        (lower, upper) in `dtype`: the smallest `dtype` value >= lower and the largest <= upper.

    Raises:
        DomainError: some entry of the box holds no `dtype` value (a width below one ulp).
    """
    lo64, up64 = lower.to(torch.float64), upper.to(torch.float64)
    lo, up = lo64.to(dtype), up64.to(dtype)
    inf = torch.full((), math.inf, dtype=dtype, device=lo.device)
    lo = torch.where(lo.to(torch.float64) < lo64, torch.nextafter(lo, inf), lo)
    up = torch.where(up.to(torch.float64) > up64, torch.nextafter(up, -inf), up)
    empty = lo > up
    if bool(empty.any()):
        index = tuple(int(i) for i in torch.nonzero(empty)[0])
        raise DomainError(
            f"parameter '{name}': the LID interval [{float(lo64[index])!r}, "
            f"{float(up64[index])!r}] at index {index} contains no {dtype} value, so no stored "
            f"model can lie in it; store the parameter in a wider dtype"
        )
    return lo, up


def representable_box(box: Box, dtypes: Mapping[str, torch.dtype]) -> Box:
    """The box with every corner rounded inward to its parameter's storage dtype.

    Args:
        box: the LID.
        dtypes: storage dtype per boxed parameter.

    Returns:
        A sub-box (float64 corners holding representable values).

    Raises:
        DomainError: an entry of the box holds no representable value.
    """
    lower, upper = {}, {}
    for name in box.names:
        lo, up = representable_corners(box.lower[name], box.upper[name], dtypes[name], name=name)
        lower[name], upper[name] = lo.to(torch.float64), up.to(torch.float64)
    return Box(lower, upper)


@dataclass(frozen=True)
class TensorMove:
    """How far the projection moved one tensor.

    Attributes:
        name: initializer name.
        boxed: True when the LID boxes it (clipped); False when it was reset to the reference.
        n: number of entries.
        n_changed: entries the projection changed (clipped, or reset).
        l2: Euclidean norm of the change, float64.
        max_abs: largest absolute change of one entry.
    """

    name: str
    boxed: bool
    n: int
    n_changed: int
    l2: float
    max_abs: float

    @property
    def fraction_changed(self) -> float:
        """n_changed / n (0 for an empty tensor)."""
        return self.n_changed / self.n if self.n else 0.0


@dataclass(frozen=True, eq=False)
class Projection:
    """The projection of one parameter vector onto a LID.

    Attributes:
        theta: projected values (float64) of every tensor given, boxed or reset.
        moves: one entry per boxed tensor and per other tensor that was reset.
    """

    theta: dict[str, Tensor]
    moves: tuple[TensorMove, ...]

    @property
    def distance(self) -> float:
        """Euclidean distance between the given and the projected values (all tensors)."""
        return math.sqrt(sum(m.l2**2 for m in self.moves))

    @property
    def inside(self) -> bool:
        """True when the given values already lay in the LID (nothing moved)."""
        return all(m.n_changed == 0 for m in self.moves)

    @property
    def n_boxed(self) -> int:
        """Number of boxed scalar parameters."""
        return sum(m.n for m in self.moves if m.boxed)

    @property
    def n_clipped(self) -> int:
        """Number of boxed scalar parameters the clamp changed."""
        return sum(m.n_changed for m in self.moves if m.boxed)


def project_parameters(
    theta: Mapping[str, Tensor],
    box: Box | Zonotope,
    *,
    reference: Mapping[str, Tensor] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> Projection:
    """Euclidean projection of theta onto {θ : θ_boxed in LID, θ_other = reference}, in float64.

    Args:
        theta: values keyed by initializer name; must include every boxed name.
        box: the LID: a `Box`, ideally from `representable_box` so the result can be stored
            exactly, or a `Zonotope` (its boxed tensors are projected jointly, see the module
            docstring).
        reference: values the LID fixes (its model's values) for names it does not box; names
            of theta found in neither the LID nor reference pass through unchanged.
        dtypes: zonotopes only: the storage dtype per boxed name, in which the projection is
            computed so that it can be stored exactly (default: the dtype of theta's tensor).

    Returns:
        The projected values and per-tensor moves.

    Raises:
        DomainError: a boxed name is missing from theta or has another shape, or (zonotopes)
            a projected value cannot be stored in its dtype inside the LID.
    """
    reference = reference or {}
    out: dict[str, Tensor] = {}
    moves = []
    jointly: dict[str, Tensor] = {}
    if isinstance(box, Zonotope):
        jointly = _project_zonotope(theta, box, dtypes or {})
    for name, value in theta.items():
        v64 = value.detach().to(torch.float64)
        if name in jointly:
            projected = jointly[name]
        elif name in box.lower:
            lo = box.lower[name].to(v64)
            if lo.shape != v64.shape:
                raise DomainError(
                    f"parameter '{name}' has shape {tuple(v64.shape)}; the LID has "
                    f"{tuple(lo.shape)}"
                )
            projected = torch.clamp(v64, lo, box.upper[name].to(v64))
        elif name in reference:
            projected = reference[name].detach().to(v64)
        else:
            out[name] = v64
            continue
        out[name] = projected
        delta = (projected - v64).abs()
        moves.append(
            TensorMove(
                name=name,
                boxed=name in box.lower,
                n=v64.numel(),
                n_changed=int((delta > 0).sum()),
                l2=float(torch.linalg.vector_norm(delta)) if delta.numel() else 0.0,
                max_abs=float(delta.max()) if delta.numel() else 0.0,
            )
        )
    missing = [n for n in box.names if n not in out]
    if missing:
        raise DomainError(f"the LID boxes {missing}, which are not among the given parameters")
    kept = [m for m in moves if m.boxed or m.n_changed > 0]
    return Projection(out, tuple(kept))


def _project_zonotope(
    theta: Mapping[str, Tensor], zonotope: Zonotope, dtypes: Mapping[str, torch.dtype]
) -> dict[str, Tensor]:
    """The boxed tensors of theta projected jointly onto the zonotope, widened to float64."""
    point = {}
    for name, lo in zonotope.lower.items():
        if name not in theta:
            continue
        value = theta[name].detach()
        if tuple(value.shape) != tuple(lo.shape):
            raise DomainError(
                f"parameter '{name}' has shape {tuple(value.shape)}; the LID has {tuple(lo.shape)}"
            )
        point[name] = value.to(dtypes.get(name, value.dtype))
    missing = [n for n in zonotope.names if n not in point]
    if missing:
        raise DomainError(f"the LID boxes {missing}, which are not among the given parameters")
    projected = zonotope.project(point)
    return {n: projected[n].to(torch.float64) for n in zonotope.lower}
