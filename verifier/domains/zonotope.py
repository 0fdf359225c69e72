"""Zonotope LIDs: a box plus k generators shared by all parameters.

    T = {y + Σ_k ε_k G_k : lower <= y <= upper, ε ∈ [-1, 1]^k}
      = {θ0 + c + diag(r) δ + Gᵀ ε : δ ∈ [-1, 1]^p, ε ∈ [-1, 1]^k}

with c = (lower + upper) / 2 - θ0 and r = (upper - lower) / 2. The box part is stored by its
corners (like `Box`, so k = 0 *is* the box and the corners can be rounded inward to float32
exactly as the box search does); `generators[name]` has shape (k, *shape), so generator k is
the dict {name: generators[name][k]} over every parameter. Parameters not named are not part of
the zonotope.

Membership and projection reduce to the k coefficients ε: for fixed ε the box part is
separable, so

    dist(θ, T)^2 = min_{ε ∈ [-1, 1]^k} f(ε),   f(ε) = Σ_i dist(θ_i - (Gᵀε)_i, [lower_i, upper_i])^2,

a convex, piecewise-quadratic box-constrained least-squares problem in k variables (DESIGN.md:
"box-constrained least squares in ε"). `solve_coefficients` minimises it by projected Newton
(Bertsekas 1982) with an Armijo search along the projection arc, a Levenberg term of 1e-12 times
the Hessian's trace on the free variables, and stops when f = 0, when the projected gradient
vanishes, when f stops decreasing (by less than 1e-15 of itself) or after 200 iterations. f is
piecewise quadratic, so the Newton steps usually end exactly (f = 0 for points of T).

Exactness (float64): `contains` is sound. It finds ε by that solver and accepts θ only when
every residual θ_i - Σ_k G_ki ε_k lies in [lower_i - atol, upper_i + atol]: a float64 test with
a rigorous rounding bound (Higham's γ_n) decides almost every entry, and undecided entries are
decided in exact rational arithmetic (`fractions.Fraction`). So `contains(θ)` is True only if θ
is in T in exact arithmetic; it can be False for a point of T within about 2^-16 (relative to
the box width) of T's boundary when the solver's ε misses it by rounding (it fails closed).
`project` returns points that pass this test: they are built from the solver's ε and a clamped
box part, rounded to the caller's dtype, checked exactly, and nudged by an ulp toward the box
centre where needed. See `project` for the inward margin that makes this work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from verifier.domains.box import LOG_WIDTH_FLOOR, Box
from verifier.domains.membership import (
    INWARD,
    NUDGE_STEPS,
    FlatZonotope,
    certify_membership,
    residual_inside,
    shrunk_box,
    solve_coefficients,
)
from verifier.errors import DomainError
from verifier.rounding import gamma

ZonotopeSizeKind = Literal["mean_width", "mean_log_width", "log_volume", "isotropic_width"]

WIDTH_FLOOR = 2.0**-20
"""Coordinates that carry generator mass need a box width of at least WIDTH_FLOOR times their
magnitude for every projection to be representable in float32 (see `representable`)."""


def generator_sum(generators: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Σ_k |G_k| per parameter (float, not rounded up; see `hull_corners` for the sound form)."""
    return {n: g.abs().sum(dim=0) for n, g in generators.items()}


def hull_corners(
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    generators: Mapping[str, Tensor],
    *,
    outward: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The interval hull [lower - Σ|G_k|, upper + Σ|G_k|] of a zonotope.

    Args:
        lower: box-part lower corners, keyed by name.
        upper: box-part upper corners.
        generators: (k, *shape) tensors.
        outward: round outward (float64 proofs): Σ|G_k| is inflated by γ_{k+2} and each corner
            moved one ulp outward, so the result contains the exact hull. Differentiable
            either way.

    Returns:
        (lower, upper) of the hull, in the dtype of the inputs.
    """
    hull_lo, hull_up = {}, {}
    for name, lo in lower.items():
        g = generators[name]
        up = upper[name]
        if g.shape[0] == 0:
            hull_lo[name], hull_up[name] = lo, up
            continue
        mass = g.abs().sum(dim=0).to(lo)
        if outward:
            mass = mass * (1.0 + 2.0 * gamma(g.shape[0] + 2))
            inf = torch.tensor(math.inf, dtype=lo.dtype, device=lo.device)
            hull_lo[name] = torch.nextafter(lo - mass, -inf)
            hull_up[name] = torch.nextafter(up + mass, inf)
        else:
            hull_lo[name], hull_up[name] = lo - mass, up + mass
    return hull_lo, hull_up


@dataclass(frozen=True, eq=False)
class Zonotope:
    """The region {y + Σ_k ε_k G_k : lower <= y <= upper, |ε_k| <= 1}, shared ε over parameters.

    `generators[name]` has shape (k, *shape of the parameter), with the same k for every name.
    A zonotope is a value: operations return new zonotopes.
    """

    lower: Mapping[str, Tensor]
    upper: Mapping[str, Tensor]
    generators: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        Box(self.lower, self.upper)  # same names and shapes, finite, lower <= upper
        if set(self.generators) != set(self.lower):
            missing = sorted(set(self.generators) ^ set(self.lower))
            raise DomainError(f"zonotope generators and box name different parameters: {missing}")
        ks = {int(g.shape[0]) if g.dim() > 0 else -1 for g in self.generators.values()}
        if len(ks) > 1:
            raise DomainError(f"zonotope generators disagree on their number k: {sorted(ks)}")
        for name, g in self.generators.items():
            shape = tuple(self.lower[name].shape)
            if g.dim() == 0 or tuple(g.shape[1:]) != shape:
                raise DomainError(
                    f"parameter '{name}': generators have shape {tuple(g.shape)}; expected "
                    f"(k, {', '.join(str(s) for s in shape)})"
                )
            if not bool(torch.isfinite(g).all()):
                raise DomainError(f"parameter '{name}': generators contain NaN or Inf")

    @classmethod
    def from_box(cls, box: Box, generators: Mapping[str, Tensor] | None = None) -> Zonotope:
        """The zonotope with `box` as its box part and the given generators (default k = 0)."""
        if generators is None:
            generators = {
                n: torch.zeros((0, *lo.shape), dtype=lo.dtype, device=lo.device)
                for n, lo in box.lower.items()
            }
        return cls(dict(box.lower), dict(box.upper), dict(generators))

    @property
    def names(self) -> list[str]:
        """The parameter names, in insertion order."""
        return list(self.lower)

    @property
    def n_generators(self) -> int:
        """k, the number of generators."""
        for g in self.generators.values():
            return int(g.shape[0])
        return 0

    def n_parameters(self) -> int:
        """Number of scalar parameters the zonotope constrains."""
        return sum(t.numel() for t in self.lower.values())

    def box_part(self) -> Box:
        """The box part {lower <= y <= upper}: the points of T with ε = 0."""
        return Box(self.lower, self.upper)

    def widths(self) -> dict[str, Tensor]:
        """Widths of the interval hull, upper - lower + 2 Σ_k |G_k|, per parameter."""
        mass = generator_sum(self.generators)
        return {
            n: self.upper[n] - self.lower[n] + 2 * mass[n].to(self.upper[n]) for n in self.lower
        }

    def interval_hull(self) -> Box:
        """The smallest box containing T, rounded outward in float64 (a sound superset)."""
        lower = {n: t.to(torch.float64) for n, t in self.lower.items()}
        upper = {n: t.to(torch.float64) for n, t in self.upper.items()}
        generators = {n: t.to(torch.float64) for n, t in self.generators.items()}
        return Box(*hull_corners(lower, upper, generators, outward=True))

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Zonotope:
        """The same zonotope in another dtype/device (float64 widening is exact)."""
        return Zonotope(
            {n: t.to(dtype=dtype, device=device) for n, t in self.lower.items()},
            {n: t.to(dtype=dtype, device=device) for n, t in self.upper.items()},
            {n: t.to(dtype=dtype, device=device) for n, t in self.generators.items()},
        )

    def scaled(self, centre: Mapping[str, Tensor], factor: float) -> Zonotope:
        """θ_c + factor (T - θ_c): shrink (factor < 1) toward a `centre` in the box part."""
        box = self.box_part().scaled(centre, factor)
        generators = {n: factor * g for n, g in self.generators.items()}
        return Zonotope(dict(box.lower), dict(box.upper), generators)

    def size(self, kind: ZonotopeSizeKind = "mean_width") -> float:
        """Size measure of T.

        * mean_width: mean width of the interval hull, (upper - lower + 2 Σ_k |G_k|) per entry
          (the box's `mean_width` when k = 0).
        * mean_log_width: mean log of those widths (floored at 1e-12).
        * log_volume: a lower bound on log vol(T): Σ_i log w_i + log(1 + 2 Σ_k Σ_i |G_ki| / w_i)
          with w the box-part widths (exact for k <= 1; mixed volumes only add for k > 1).
        * isotropic_width: (Σ_i w_i + 2 Σ_k ||G_k||_2) / p. Proportional to the geometric mean
          width of T, the extent of T averaged over uniformly random directions (the mean
          width of a sum of segments is proportional to the sum of their lengths), normalised
          to the box's mean_width when k = 0. A generator counts by its Euclidean length, so
          spreading mass over many coordinates does not inflate it the way the hull does.
        """
        flat = self._flat()
        p = flat.lower.numel()
        if p == 0:
            return 0.0
        box_widths = flat.upper - flat.lower
        mass = flat.generators.abs().sum(dim=0)
        if kind == "mean_width":
            return float((box_widths + 2 * mass).mean())
        if kind == "mean_log_width":
            return float(torch.log((box_widths + 2 * mass).clamp(min=LOG_WIDTH_FLOOR)).mean())
        if kind == "isotropic_width":
            norms = torch.linalg.vector_norm(flat.generators, dim=1).sum()
            return float((box_widths.sum() + 2 * norms) / p)
        w = box_widths.clamp(min=LOG_WIDTH_FLOOR)
        return float(torch.log(w).sum() + torch.log1p((2 * mass / w).sum()))

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        kind: Literal["uniform", "vertex"] = "uniform",
    ) -> Iterator[dict[str, Tensor]]:
        """Draw n points: coefficients (δ, ε) uniform in their cube, or among its vertices.

        Points are computed in float64 (within rounding of T; uniform in the coefficients,
        not in T's volume).
        """
        k = self.n_generators
        for _ in range(n):
            if kind == "uniform":
                eps = 2 * torch.rand(k, generator=generator, dtype=torch.float64) - 1
            else:
                eps = 2 * torch.randint(0, 2, (k,), generator=generator).to(torch.float64) - 1
            theta = {}
            for name, lo in self.lower.items():
                lo64, up64 = lo.to(torch.float64), self.upper[name].to(torch.float64)
                if kind == "uniform":
                    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
                else:
                    u = torch.randint(0, 2, lo.shape, generator=generator).to(torch.float64)
                g = self.generators[name].to(torch.float64)
                shift = torch.tensordot(eps, g, dims=1) if k else torch.zeros_like(lo64)
                theta[name] = lo64 + u * (up64 - lo64) + shift
            yield theta

    # ------------------------------------------------------------------ membership, projection

    def _flat(self) -> FlatZonotope:
        names = self.names
        shapes = [self.lower[n].shape for n in names]
        k = self.n_generators

        def cat(parts: list[Tensor]) -> Tensor:
            if not parts:
                return torch.zeros(0, dtype=torch.float64)
            return torch.cat([t.detach().to("cpu", torch.float64).reshape(-1) for t in parts])

        lower = cat([self.lower[n] for n in names])
        upper = cat([self.upper[n] for n in names])
        if names:
            gens = torch.cat(
                [
                    self.generators[n]
                    .detach()
                    .to("cpu", torch.float64)
                    .reshape(k, self.lower[n].numel())
                    for n in names
                ],
                dim=1,
            )
        else:
            gens = torch.zeros((k, 0), dtype=torch.float64)
        return FlatZonotope(names, shapes, lower, upper, gens)

    def _flatten_point(self, theta: Mapping[str, Tensor]) -> Tensor | None:
        parts = []
        for name, lo in self.lower.items():
            if name not in theta or tuple(theta[name].shape) != tuple(lo.shape):
                return None
            parts.append(theta[name].detach().to("cpu", torch.float64).reshape(-1))
        if not parts:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat(parts)

    def representable(self) -> bool:
        """True when every coordinate with generator mass has box width >= WIDTH_FLOOR * its
        magnitude (|lower| + |upper| + Σ_k |G_k|); then `project` can always return float32
        (and float64) points that lie in T exactly. Zonotopes found by the search satisfy it.
        """
        flat = self._flat()
        mass = flat.generators.abs().sum(dim=0)
        scale = flat.lower.abs() + flat.upper.abs() + mass
        ok = (mass == 0) | (flat.upper - flat.lower >= WIDTH_FLOOR * scale)
        return bool(ok.all())

    def contains(self, theta: Mapping[str, Tensor], *, atol: float = 0.0) -> bool:
        """True only if θ lies in T (within atol per entry of the box part), proved in float64.

        Solves for ε (`solve_coefficients`, first aiming at the box part shrunk by INWARD,
        then at it widened by atol / 2, then by atol) and checks every residual
        θ_i - Σ_k G_ki ε_k against [lower_i - atol, upper_i + atol] exactly (float64 with a
        rigorous error bound, rationals where that cannot decide). Never True for a point
        outside; may be False for a point of T within rounding of its boundary. Parameters not
        in T are ignored; a missing or reshaped one
        gives False.
        """
        point = self._flatten_point(theta)
        if point is None or bool(torch.isnan(point).any()):
            return False
        return certify_membership(point, self._flat(), atol)

    def project(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Euclidean projection onto T, in each parameter's dtype, exactly inside T.

        Points that `contains` certifies are returned unchanged. Otherwise the result is the
        Euclidean projection onto T' (T with its box part shrunk toward its centre by INWARD =
        2^-16 of its half-width; T' ⊂ T; T' = T when k = 0, where this is the box's clamp), up
        to the solver tolerance on ε: ε* minimises f on T' (projected Newton, see the module
        docstring), the box part is clamped, and the point y* + Gᵀε* is rounded to the
        parameter's dtype. Every entry is then checked exactly against T' (with ε*) and, if
        rounding pushed it out of T', moved toward the box centre by 1, 2, 4, ... ulps
        until it is inside. Its distance from the exact projection onto T is at most INWARD
        times the half-width of the box part plus the solver's error in ε. Entries that need no
        move keep their value bit for bit. Parameters not in T pass through; the result's
        tensors have the dtype and device of θ's.

        Raises:
            DomainError: θ lacks a parameter or has another shape, or some entry of the
                projection cannot be represented in the dtype inside T (a box width below the
                dtype's resolution where generators act; see `representable`).
        """
        point = self._flatten_point(theta)
        if point is None:
            missing = [
                n
                for n, lo in self.lower.items()
                if n not in theta or tuple(theta[n].shape) != tuple(lo.shape)
            ]
            raise DomainError(f"cannot project: parameters {missing} are missing or reshaped")
        flat = self._flat()
        if certify_membership(point, flat, 0.0):
            return dict(theta)
        # with k = 0 membership needs no solve, so the plain clamp (the box's projection) is exact
        inward = INWARD if flat.generators.shape[0] else 0.0
        lo_in, up_in = shrunk_box(flat.lower, flat.upper, inward)
        eps = solve_coefficients(point, lo_in, up_in, flat.generators)
        shift = eps @ flat.generators if flat.generators.shape[0] else torch.zeros_like(point)
        residual = point - shift
        keep = (residual >= lo_in) & (residual <= up_in)
        target = torch.where(keep, point, torch.clamp(residual, lo_in, up_in) + shift)
        out = dict(theta)
        offset = 0
        for name, shape in zip(flat.names, flat.shapes, strict=True):
            n = math.prod(shape)
            original = theta[name]
            sl = slice(offset, offset + n)
            moved = _exact_entries(
                target[sl],
                keep[sl],
                original.detach().to("cpu"),
                original.dtype,
                eps,
                FlatZonotope([name], [shape], lo_in[sl], up_in[sl], flat.generators[:, sl]),
                name=name,
            )
            out[name] = moved.reshape(shape).to(device=original.device)
            offset += n
        return out


def _exact_entries(
    target: Tensor,
    keep: Tensor,
    original: Tensor,
    dtype: torch.dtype,
    eps: Tensor,
    flat: FlatZonotope,
    *,
    name: str,
) -> Tensor:
    """Round the float64 target to dtype and nudge entries back into `flat` (exactly, for ε).

    `flat` is T' (the box part shrunk by INWARD, inside T), so that `contains`, which solves
    for ε afresh, finds the result well inside T. Entries marked `keep` (already in T' for
    this ε) keep the original value bit for bit.
    """
    value = torch.where(keep, original.reshape(-1).to(dtype), target.to(dtype))
    k = flat.generators.shape[0]
    shift = eps @ flat.generators if k else torch.zeros_like(target)
    centre = (flat.lower + flat.upper) / 2 + shift
    toward = centre.to(dtype)
    for step in range(NUDGE_STEPS + 1):
        inside = residual_inside(value.to(torch.float64), eps, flat)
        if bool(inside.all()):
            return value
        # move 2^step ulps toward the centre: the gap is a few rounding errors, T' is far wider
        ulp = torch.nextafter(value, toward) - value
        value = torch.where(inside, value, value + ulp * 2.0**step)
    bad = int(torch.nonzero(~residual_inside(value.to(torch.float64), eps, flat))[0])
    raise DomainError(
        f"parameter '{name}': entry {bad} of the projection cannot be stored as {dtype} inside "
        f"the zonotope (box width {float(flat.upper[bad] - flat.lower[bad])!r} is below the "
        f"dtype's resolution where generators act); use a wider dtype or a representable "
        f"zonotope (Zonotope.representable)"
    )
