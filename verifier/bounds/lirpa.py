"""Margin and logit bounds over weight boxes from auto_LiRPA (CROWN-IBP, CROWN, IBP).

The graph is rebuilt as a torch module in which every boxed Linear weight or bias is an
`auto_LiRPA.BoundedParameter` at the centre of its box, perturbed by an L-infinity ball whose
per-element radius is half the box width (`PerturbationLpNorm(norm=inf, eps=<radius tensor>)`;
``x_L``/``x_U`` on parameters break the CROWN modes of auto_LiRPA 0.3). Everything else (fixed
Linear and Conv layers, activations, reshapes, elementwise constants, pooling) is a plain torch
layer. Margins z_y - z_j are bounded directly through auto_LiRPA's specification matrix ``C``,
which is tighter than subtracting logit bounds.

The traced `BoundedModule` is built once per (graph, boxed names, dtype, device) and kept in a
small cache (weakly keyed by the graph); each call writes the new centres and radii into it.
Parameters outside the box are copied in at build time, so a graph's parameter tensors must
not be changed in place afterwards. The cache makes these functions unsafe to call from
several threads at once on the same graph. Bounds are computed under `torch.no_grad()`: they
are not differentiable with respect to the box (use `verifier.bounds.ibp` for the search).

auto_LiRPA is imported only here, after `verifier.bounds.lirpa_compat.apply_lirpa_compat`.
auto_LiRPA rounds to nearest like any torch code: its bounds are sound in exact arithmetic,
and proofs add a rounding allowance (see `verifier.certify`).
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verifier.bounds.intervals import Interval
from verifier.bounds.lirpa_compat import apply_lirpa_compat, onnx_opset_restored
from verifier.bounds.margins import mask_true_class
from verifier.errors import BackendError, DataError, DomainError
from verifier.graph import (
    Activation,
    AffineScale,
    Conv,
    Elementwise,
    Graph,
    Linear,
    Op,
    Pool,
    Reshape,
    linear_weight,
    pool2d,
)

Method = Literal["ibp", "crown-ibp", "crown"]

_log = logging.getLogger(__name__)

_LIRPA_METHODS: dict[str, str] = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}
_CACHE_SIZE = 4  # built modules kept per graph
_BOUND_OPTS = {
    # Interval products without materialising (batch, out, in) tensors.
    "matmul": "economic",
    # Sparse intermediate CROWN specs (OneHotC) are not handled by BoundLinear when its
    # weight is perturbed (AttributeError in bound_backward_with_weight); use dense specs.
    "sparse_intermediate_bounds": False,
}


@dataclass(frozen=True)
class _Slot:
    """Where one boxed ONNX parameter lives in the built module, and how it maps there.

    The module holds the effective tensor: (n_out, n_in) layout for weights, with the op's
    AffineScale folded in (weight_scale per row; bias_scale and shift for the bias).
    """

    op: Linear
    role: Literal["weight", "bias"]
    attribute: str  # dotted parameter path inside the module


class _LinearLayer(nn.Module):
    """F.linear with effective (scale-folded) weight and bias; boxed ones are BoundedParameters.

    A bias is always present (zeros when the op has none) so that tracing yields one ONNX Gemm,
    the only form whose weight auto_LiRPA can perturb.
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, node: str, weight: Tensor, bias: Tensor, boxed: tuple[bool, bool]) -> None:
        super().__init__()
        self.node = node
        for name, value, is_boxed in (("weight", weight, boxed[0]), ("bias", bias, boxed[1])):
            if is_boxed:
                setattr(self, name, _bounded_parameter(value))
            else:
                self.register_buffer(name, value)
        self.boxed = any(boxed)

    def forward(self, x: Tensor) -> Tensor:
        if self.boxed and x.dim() != 2:
            raise BackendError(
                f"node '{self.node}': the lirpa backend can perturb a Linear only on a flat "
                f"(batch, features) input; got rank {x.dim()}; use --bound ibp"
            )
        return F.linear(x, self.weight, self.bias)


class _ConvLayer(nn.Module):
    """A Conv with fixed (scale-folded) weights."""

    weight: Tensor
    bias: Tensor

    def __init__(self, op: Conv, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        top, left, bottom, right = op.pads
        self.symmetric = top == bottom and left == right
        self.pad = (left, right, top, bottom)
        self.padding = (top, left) if self.symmetric else (0, 0)
        self.strides = op.strides
        self.dilations = op.dilations
        self.groups = op.groups

    def forward(self, x: Tensor) -> Tensor:
        if not self.symmetric:
            x = F.pad(x, self.pad)
        return F.conv2d(
            x, self.weight, self.bias, self.strides, self.padding, self.dilations, self.groups
        )


class _ActivationLayer(nn.Module):
    def __init__(self, function: Literal["relu", "sigmoid", "tanh"]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        if self.function == "relu":
            return torch.relu(x)
        return torch.sigmoid(x) if self.function == "sigmoid" else torch.tanh(x)


class _ElementwiseLayer(nn.Module):
    constant: Tensor

    def __init__(self, op: Elementwise, constant: Tensor) -> None:
        super().__init__()
        self.register_buffer("constant", constant)
        self.op = op.op
        self.constant_first = op.constant_first

    def forward(self, x: Tensor) -> Tensor:
        c = self.constant
        if self.op == "add":
            return x + c
        if self.op == "mul":
            return x * c
        if self.op == "sub":
            return c - x if self.constant_first else x - c
        return c / x if self.constant_first else x / c


class _ReshapeLayer(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        # -1 for the batch axis keeps the traced graph free of the build-time batch size.
        return x.reshape(-1, *self.shape)


class _PoolLayer(nn.Module):
    def __init__(self, op: Pool) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return pool2d(self.op, x)


@dataclass
class _Built:
    """A traced BoundedModule and where each boxed parameter sits in it."""

    module: Any  # auto_LiRPA.BoundedModule
    nodes: dict[str, Any]  # ONNX name -> BoundParams node
    slots: dict[str, _Slot]
    bias_only_boxed: bool  # some Linear has its bias boxed and its weight fixed


# graph -> (boxed names, dtype, device) -> built module, least recently used first.
_CacheKey = tuple[frozenset[str], torch.dtype, str]
_cache: weakref.WeakKeyDictionary[Graph, OrderedDict[_CacheKey, _Built]]
_cache = weakref.WeakKeyDictionary()


def lirpa_margin_bounds(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    method: Method = "crown-ibp",
    chunk_size: int = 100,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Lower-bound the margins z_y - z_j for every parameter vector in the box, via auto_LiRPA.

    Every parameter named in `lower`/`upper` ranges element-wise over [lower, upper]; all
    other parameters stay at `graph.parameters`. Sound in exact arithmetic for every θ in the
    box; proofs call it with dtype=float64 and add a rounding allowance. The margins are the
    rows of auto_LiRPA's specification matrix C, so they are bounded directly.

    Args:
        graph: the classifier.
        lower: lower corner of the box, keyed by initializer name, in the initializer's shape.
        upper: upper corner, same names and shapes as `lower`.
        x: inputs, shape (batch, *graph.input_shape).
        y: true classes, shape (batch,), integers in [0, n_classes).
        method: "crown-ibp" (IBP intermediate bounds, CROWN on the margins; the default and
            the tightest in practice), "crown" (CROWN throughout: ~10x slower, ~100 MB per
            input on a 784-64-64-10 MLP, and no tighter in our measurements: its bilinear
            relaxation of perturbed weights loses to interval products) or "ibp".
        chunk_size: most inputs bounded at once (CROWN-IBP needs ~6 MB per input in float32
            and ~12 MB in float64 on a 784-64-64-10 MLP).
        dtype: computation dtype; float64 for proofs.

    Returns:
        Tensor of shape (batch, n_classes) and dtype `dtype`: entry [i, j] is a lower bound on
        z_{y_i} - z_j; entry [i, y_i] is +inf.

    Raises:
        BackendError: auto_LiRPA is missing, or a boxed parameter belongs to a Conv op (or to
            a Linear op on a non-flat input), or auto_LiRPA cannot handle an op of the graph.
        DomainError: the box does not match the graph.
        DataError: x or y do not match the graph.
    """
    n_classes = graph.n_classes
    if y.shape != (x.shape[0],):
        raise DataError(f"labels must have shape ({x.shape[0]},); got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise DataError(f"labels must lie in [0, {n_classes}); got {int(y.min())}..{int(y.max())}")
    y = y.to(device=x.device, dtype=torch.long)
    # Row k of sample i's spec is e_{y_i} - e_{others_i[k]}: all classes except y_i.
    classes = torch.arange(n_classes, device=x.device)
    others = classes.expand(x.shape[0], -1)[classes[None, :] != y[:, None]]
    others = others.reshape(x.shape[0], n_classes - 1)
    eye = torch.eye(n_classes, dtype=dtype, device=x.device)
    spec = eye[y][:, None, :] - eye[others]  # (batch, n_classes - 1, n_classes)
    margins = torch.zeros((x.shape[0], n_classes), dtype=dtype, device=x.device)
    if n_classes > 1:
        bounds, _ = _bound_spec(
            graph, lower, upper, x, spec, method, chunk_size, dtype, upper_too=False
        )
        margins = margins.scatter(1, others, bounds)
    return mask_true_class(margins, None, y).lower


def lirpa_logit_bounds(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    *,
    method: Method = "crown-ibp",
    chunk_size: int = 100,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Enclose the logits for every parameter vector in the box, via auto_LiRPA.

    Same box semantics, soundness and precision as `lirpa_margin_bounds`; for a decision,
    prefer the margins (subtracting logit bounds is looser).

    Args:
        graph: the classifier.
        lower: lower corner of the box, keyed by initializer name.
        upper: upper corner, same names and shapes as `lower`.
        x: inputs, shape (batch, *graph.input_shape).
        method: "crown-ibp", "crown" or "ibp".
        chunk_size: most inputs bounded at once.
        dtype: computation dtype; float64 for proofs.

    Returns:
        (lower, upper) logit bounds, each of shape (batch, n_classes) and dtype `dtype`.

    Raises:
        BackendError: as for `lirpa_margin_bounds`.
        DomainError: the box does not match the graph.
        DataError: x does not match the graph.
    """
    eye = torch.eye(graph.n_classes, dtype=dtype, device=x.device)
    spec = eye.expand(x.shape[0], -1, -1)
    low, up = _bound_spec(graph, lower, upper, x, spec, method, chunk_size, dtype, upper_too=True)
    if up is None:
        raise BackendError("auto_LiRPA returned no upper bound")
    return low, up


def clear_lirpa_cache() -> None:
    """Forget every built auto_LiRPA module (they are rebuilt on the next call)."""
    _cache.clear()


def _bound_spec(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    spec: Tensor,
    method: str,
    chunk_size: int,
    dtype: torch.dtype,
    *,
    upper_too: bool,
) -> tuple[Tensor, Tensor | None]:
    """Bound spec[i] @ logits(x[i]) over the box, chunk by chunk; shapes (batch, n_spec)."""
    if method not in _LIRPA_METHODS:
        raise BackendError(
            f"the lirpa backend has no method {method!r}; expected one of {sorted(_LIRPA_METHODS)}"
        )
    if chunk_size < 1:
        raise BackendError(f"chunk_size must be >= 1; got {chunk_size}")
    if tuple(x.shape[1:]) != tuple(graph.input_shape):
        raise DataError(
            f"inputs must have shape (batch, {', '.join(map(str, graph.input_shape))}); "
            f"got {tuple(x.shape)}"
        )
    _check_box(graph, lower, upper)
    x = x.to(dtype)
    if x.shape[0] == 0 or not lower:
        # Nothing to bound, or a point: the exact logits (float rounding aside).
        logits = graph.forward(x) if x.shape[0] else x.new_zeros(0, graph.n_classes)
        value = torch.einsum("bsk,bk->bs", spec, logits)
        return value, (value.clone() if upper_too else None)
    built = _built_module(graph, frozenset(lower), dtype, x.device)
    for name, slot in built.slots.items():
        lo, hi = _effective_box(slot, lower[name], upper[name], dtype)
        centre, radius = _centre_radius(lo.to(x.device), hi.to(x.device))
        node = built.nodes[name]
        node.param.data = centre
        node.perturbation.eps = radius
    lows: list[Tensor] = []
    ups: list[Tensor] = []
    with torch.no_grad(), _quiet():
        for start in range(0, x.shape[0], chunk_size):
            low, up = built.module.compute_bounds(
                x=(x[start : start + chunk_size],),
                C=spec[start : start + chunk_size],
                method=_LIRPA_METHODS[method],
                bound_lower=True,
                # BoundLinear's bias-only-perturbed branch needs both spec sides (it calls
                # last_uA.matmul unconditionally), so such graphs bound the upper side too.
                bound_upper=upper_too or built.bias_only_boxed,
            )
            lows.append(low.detach())
            if upper_too:
                ups.append(up.detach())
    return torch.cat(lows), (torch.cat(ups) if upper_too else None)


def _check_box(graph: Graph, lower: Mapping[str, Tensor], upper: Mapping[str, Tensor]) -> None:
    if set(lower) != set(upper):
        raise DomainError(
            f"lower and upper name different parameters: {sorted(set(lower) ^ set(upper))}"
        )
    for name in lower:
        if name not in graph.parameters:
            raise DomainError(f"parameter '{name}' is not in the graph")
        shape = tuple(graph.parameters[name].shape)
        for corner, t in (("lower", lower[name]), ("upper", upper[name])):
            if tuple(t.shape) != shape:
                raise DomainError(
                    f"parameter '{name}': {corner} has shape {tuple(t.shape)}; expected {shape}"
                )
            if not bool(torch.isfinite(t).all()):
                raise DomainError(f"parameter '{name}': {corner} has a NaN or infinite entry")
        if bool((lower[name] > upper[name]).any()):
            raise DomainError(f"parameter '{name}': lower > upper somewhere")


def _effective_box(
    slot: _Slot, lo: Tensor, hi: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Map an ONNX parameter box to the box of the tensor held by the module.

    Layout change is a transpose; the AffineScale is a per-coordinate affine map, so the
    image of the box is again a box (corners swap where the scale is negative).
    """
    box = Interval(lo.to(dtype), hi.to(dtype))
    op = slot.op
    if slot.role == "weight":
        if op.weight_layout == "in_out":
            box = box.transpose(0, 1)
        if op.scale is not None:
            box = box.scale(op.scale.weight_scale.to(box.lower)[:, None])
    elif op.scale is not None:
        box = box.scale(op.scale.bias_scale.to(box.lower)).shift(op.scale.shift.to(box.lower))
    return box.lower.contiguous(), box.upper.contiguous()


def _centre_radius(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Centre and radius of [lo, hi], the radius rounded up until centre ± radius covers it."""
    centre = lo + (hi - lo) / 2
    radius = torch.maximum(hi - centre, centre - lo)
    inf = torch.full_like(radius, math.inf)
    for _ in range(8):
        short = (centre - radius > lo) | (centre + radius < hi)
        if not bool(short.any()):
            break
        radius = torch.where(short, torch.nextafter(radius, inf), radius)
    return centre, radius


def _built_module(
    graph: Graph, boxed: frozenset[str], dtype: torch.dtype, device: torch.device
) -> _Built:
    per_graph = _cache.setdefault(graph, OrderedDict())
    key = (boxed, dtype, str(device))
    if key in per_graph:
        per_graph.move_to_end(key)
        return per_graph[key]
    built = _build(graph, boxed, dtype, device)
    per_graph[key] = built
    while len(per_graph) > _CACHE_SIZE:
        per_graph.popitem(last=False)
    return built


def _build(graph: Graph, boxed: frozenset[str], dtype: torch.dtype, device: torch.device) -> _Built:
    """Trace the graph into an auto_LiRPA BoundedModule with the boxed parameters perturbed."""
    apply_lirpa_compat()
    from auto_LiRPA import BoundedModule

    layers: list[nn.Module] = []
    slots: dict[str, _Slot] = {}
    branching = graph.first_non_chain_op()
    if branching is not None:
        raise BackendError(
            f"node '{branching.node}' ({branching.kind}): the lirpa backend bounds chains of ops "
            "only, and this graph branches or joins here; use --bound ibp"
        )
    for index, op in enumerate(graph.ops):
        layers.append(_layer(graph, op, boxed, dtype))
        if isinstance(op, Linear):
            for role, name in (("weight", op.weight), ("bias", op.bias)):
                if name is not None and name in boxed:
                    slots[name] = _Slot(op, role, f"{index}.{role}")  # type: ignore[arg-type]
    model = nn.Sequential(*layers).eval().to(device)
    example = torch.zeros(2, *graph.input_shape, dtype=dtype, device=device)
    with _quiet(), onnx_opset_restored():
        try:
            module = BoundedModule(model, (example,), bound_opts=_BOUND_OPTS, device=device)
        except NotImplementedError as err:
            raise BackendError(
                f"auto_LiRPA cannot bound this graph ({err}); use --bound ibp"
            ) from err
    module.eval()
    nodes = {}
    by_attribute = {slot.attribute: name for name, slot in slots.items()}
    for node in module.modules():
        name = by_attribute.get(getattr(node, "ori_name", None) or "")
        if name is not None and getattr(node, "perturbation", None) is not None:
            nodes[name] = node
    missing = sorted(set(slots) - set(nodes))
    if missing:
        raise BackendError(f"auto_LiRPA dropped the boxed parameters {missing} while tracing")
    bias_only = any(slot.role == "bias" and slot.op.weight not in boxed for slot in slots.values())
    return _Built(module, nodes, slots, bias_only)


def _layer(graph: Graph, op: Op, boxed: frozenset[str], dtype: torch.dtype) -> nn.Module:
    params = graph.parameters
    if isinstance(op, Linear):
        weight = linear_weight(op, params[op.weight]).to(dtype)
        bias = (
            params[op.bias].to(dtype)
            if op.bias is not None
            else torch.zeros(weight.shape[0], dtype=dtype)
        )
        weight, bias = _fold_scale(op.scale, weight, bias, op.bias is not None)
        is_boxed = (op.weight in boxed, op.bias is not None and op.bias in boxed)
        return _LinearLayer(op.node, weight.contiguous(), bias.contiguous(), is_boxed)
    if isinstance(op, Conv):
        for name in (op.weight, op.bias):
            if name is not None and name in boxed:
                raise BackendError(
                    f"node '{op.node}': the lirpa backend cannot perturb Conv weights "
                    f"('{name}' is boxed); use --bound ibp"
                )
        weight = params[op.weight].to(dtype)
        bias = (
            params[op.bias].to(dtype)
            if op.bias is not None
            else torch.zeros(weight.shape[0], dtype=dtype)
        )
        weight, bias = _fold_scale(op.scale, weight, bias, op.bias is not None)
        return _ConvLayer(op, weight.contiguous(), bias.contiguous())
    if isinstance(op, Activation) and op.function in ("relu", "sigmoid", "tanh"):
        return _ActivationLayer(op.function)  # type: ignore[arg-type]
    if isinstance(op, Elementwise):
        return _ElementwiseLayer(op, op.constant.to(dtype))
    if isinstance(op, Reshape):
        return _ReshapeLayer(op.shape)
    if isinstance(op, Pool):
        return _PoolLayer(op)
    what = f"{op.function} activation" if isinstance(op, Activation) else f"{op.kind} op"
    raise BackendError(
        f"node '{op.node}': the lirpa backend does not support this {what}; use --bound ibp"
    )


def _fold_scale(
    scale: AffineScale | None, weight: Tensor, bias: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor]:
    """Fold y = ws*(W x) + bs*b + shift into W' = ws*W (per output row), b' = bs*b + shift."""
    if scale is None:
        return weight, bias
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight = weight * scale.weight_scale.to(weight).reshape(shape)
    shift = scale.shift.to(bias)
    bias = bias * scale.bias_scale.to(bias) + shift if has_bias else shift.clone()
    return weight, bias


def _bounded_parameter(value: Tensor) -> nn.Parameter:
    from auto_LiRPA import BoundedParameter, PerturbationLpNorm

    perturbation = PerturbationLpNorm(norm=math.inf, eps=torch.zeros_like(value))
    return BoundedParameter(value, perturbation, requires_grad=False)


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep auto_LiRPA's and the tracer's warnings off the caller; log them for diagnostics.

    They are notes about torch internals (deprecations, tracer constants, "creating an
    identity matrix"), not about the bounds: a non-finite bound fails closed downstream.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for note in caught:
        _log.debug("auto_LiRPA: %s: %s", note.category.__name__, note.message)
