"""The boxed tail of a network, for one fixed input, as a chain of interval affine layers.

The exact solvers (`verifier.crosscheck.exact`, `.milp`, `.smt`) see a network through this
module. Everything before the first op that owns a boxed parameter (the frozen prefix: any ops,
Conv included) is evaluated once, in float64, at the model's own parameters; what is left must
be ``Linear (ReLU Linear)*`` with only flattening reshapes in between. Each Linear becomes an
`IntervalLayer`: its weight in (n_out, n_in) layout and its bias as element-wise intervals,
with Gemm alpha/beta and folded BatchNorm (`AffineScale`) applied. A weight scale s maps the
box [lo, up] one-to-one onto [min(s lo, s up), max(s lo, s up)], so a box over the ONNX
parameters is a box over these effective parameters, and a point of one is a point of the
other (`ReluChain.parameters`). Without scales the effective intervals are the box itself,
bit for bit; with scales they are rounded once in float64.

A witness (weights that attain a margin) is described by *fractions* t in [0, 1] per effective
parameter: the value lo + t (up - lo) of its effective interval. Fractions map back onto the
ONNX parameters by construction inside the box (clamped against rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.errors import BackendError
from verifier.graph import Activation, Graph, Linear, Reshape, apply_op, linear_weight


@dataclass(frozen=True, eq=False)
class IntervalLayer:
    """One Linear op over the box: effective weight and bias intervals, float64.

    Attributes:
        op: the graph's Linear op.
        weight_lower: lower ends of the effective weight, shape (n_out, n_in).
        weight_upper: upper ends, same shape.
        bias_lower: lower ends of the effective bias (bias_scale*b + shift), shape (n_out,).
        bias_upper: upper ends, same shape.
        weight_flipped: rows whose weight scale is negative (effective lower end = ONNX upper
            end), shape (n_out,), bool.
        bias_flipped: entries whose bias scale is negative, shape (n_out,), bool.
    """

    op: Linear
    weight_lower: Tensor
    weight_upper: Tensor
    bias_lower: Tensor
    bias_upper: Tensor
    weight_flipped: Tensor
    bias_flipped: Tensor

    @property
    def n_out(self) -> int:
        """Number of output units."""
        return int(self.weight_lower.shape[0])

    @property
    def n_in(self) -> int:
        """Number of input units."""
        return int(self.weight_lower.shape[1])


@dataclass(frozen=True, eq=False)
class ReluChain:
    """The boxed tail of a graph for one input: ``layers[0] (ReLU layers[k])*``, float64.

    Attributes:
        graph: the network.
        box: the weight box (float64 corners).
        layers: the Linear ops of the tail, in order; K = len(layers) >= 1.
        x: the tail's input (the frozen prefix's output), shape (n_in,), float64.
        input: the network's input, shape (1, *graph.input_shape), float64.
        base: the model's parameters projected onto the box (boxed names only), float64; the
            value a witness gives every parameter it does not choose.
    """

    graph: Graph
    box: Box
    layers: tuple[IntervalLayer, ...]
    x: Tensor
    input: Tensor
    base: Mapping[str, Tensor]

    @property
    def depth(self) -> int:
        """K, the number of affine layers (K - 1 hidden ReLU layers)."""
        return len(self.layers)

    def margin(self, theta: Mapping[str, Tensor], label: int, other: int) -> float:
        """z_label - z_other of the network with parameters theta, by a plain float64 forward."""
        with torch.no_grad():
            logits = self.graph.forward(self.input, theta)[0]
        return float(logits[label] - logits[other])

    def n_boxed_parameters(self) -> int:
        """Number of scalar parameters of the tail that the box lets vary."""
        count = 0
        for layer in self.layers:
            for name in (layer.op.weight, layer.op.bias):
                if name is not None and name in self.box.lower:
                    width = self.box.upper[name] - self.box.lower[name]
                    count += int((width > 0).sum())
        return count

    def base_fractions(self) -> list[tuple[Tensor, Tensor]]:
        """Fractions (weight (n_out, n_in), bias (n_out,)) of `base` in every layer."""
        out = []
        for layer in self.layers:
            t_w = _fraction(self, layer.op.weight, transpose=layer.op.weight_layout == "in_out")
            t_w = torch.where(layer.weight_flipped[:, None], 1.0 - t_w, t_w)
            if layer.op.bias is None:
                t_b = torch.zeros(layer.n_out, dtype=torch.float64)
            else:
                t_b = _fraction(self, layer.op.bias).reshape(layer.n_out)
                t_b = torch.where(layer.bias_flipped, 1.0 - t_b, t_b)
            out.append((t_w, t_b))
        return out

    def parameters(self, fractions: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """The boxed ONNX parameters at the given effective fractions, inside the box.

        Args:
            fractions: per layer, weight fractions (n_out, n_in) and bias fractions (n_out,),
                each in [0, 1] (0 = effective lower end).

        Returns:
            Every boxed parameter of the graph, float64: tail parameters from the fractions,
            the others from `base`.
        """
        theta = {name: value.clone() for name, value in self.base.items()}
        for layer, (t_w, t_b) in zip(self.layers, fractions, strict=True):
            t = torch.where(layer.weight_flipped[:, None], 1.0 - t_w, t_w)
            if layer.op.weight_layout == "in_out":
                t = t.transpose(0, 1)
            _set_from_fraction(self, theta, layer.op.weight, t)
            if layer.op.bias is not None:
                _set_from_fraction(
                    self, theta, layer.op.bias, torch.where(layer.bias_flipped, 1.0 - t_b, t_b)
                )
        return theta


def _fraction(chain: ReluChain, name: str, *, transpose: bool = False) -> Tensor:
    """Where `base` sits in the box of `name`, as a fraction (0 where the box is a point)."""
    if name not in chain.box.lower:
        value = chain.graph.parameters[name]
        t = torch.zeros(value.shape, dtype=torch.float64)
    else:
        lo, up = chain.box.lower[name], chain.box.upper[name]
        width = up - lo
        t = torch.where(width > 0, (chain.base[name] - lo) / torch.where(width > 0, width, 1.0), 0)
        t = t.clamp(0.0, 1.0)
    return t.transpose(0, 1) if transpose else t


def _set_from_fraction(chain: ReluChain, theta: dict[str, Tensor], name: str, t: Tensor) -> None:
    if name not in chain.box.lower:
        return
    lo, up = chain.box.lower[name], chain.box.upper[name]
    t = t.reshape(lo.shape)
    theta[name] = torch.minimum(torch.maximum(lo + t * (up - lo), lo), up)


def _scaled_interval(
    lo: Tensor, up: Tensor, factor: Tensor | None, shift: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """[lo, up] * factor (+ shift) per row, and which rows flipped; factor broadcasts on axis 0."""
    flipped = torch.zeros(lo.shape[0], dtype=torch.bool)
    if factor is not None:
        f = factor.to(torch.float64).reshape(-1, *([1] * (lo.dim() - 1)))
        a, b = f * lo, f * up
        lo, up = torch.minimum(a, b), torch.maximum(a, b)
        flipped = factor.to(torch.float64) < 0
    if shift is not None:
        lo, up = lo + shift.to(torch.float64), up + shift.to(torch.float64)
    return lo, up, flipped


def _interval_of(graph: Graph, box: Box, name: str) -> tuple[Tensor, Tensor]:
    if name in box.lower:
        return box.lower[name].to(torch.float64), box.upper[name].to(torch.float64)
    value = graph.parameters[name].to(torch.float64)
    return value, value


def _interval_layer(graph: Graph, box: Box, op: Linear) -> IntervalLayer:
    w_lo, w_up = _interval_of(graph, box, op.weight)
    w_lo, w_up = linear_weight(op, w_lo), linear_weight(op, w_up)
    n_out = w_lo.shape[0]
    scale = op.scale
    w_lo, w_up, w_flip = _scaled_interval(
        w_lo, w_up, None if scale is None else scale.weight_scale, None
    )
    if op.bias is None:
        b_lo = b_up = torch.zeros(n_out, dtype=torch.float64)
        b_flip = torch.zeros(n_out, dtype=torch.bool)
        if scale is not None:
            b_lo = b_up = scale.shift.to(torch.float64).reshape(n_out)
    else:
        b_lo, b_up = _interval_of(graph, box, op.bias)
        b_lo, b_up, b_flip = _scaled_interval(
            b_lo.reshape(n_out),
            b_up.reshape(n_out),
            None if scale is None else scale.bias_scale.reshape(n_out),
            None if scale is None else scale.shift.reshape(n_out),
        )
    return IntervalLayer(op, w_lo, w_up, b_lo, b_up, w_flip, b_flip)


def _owns_boxed(op: object, box: Box) -> bool:
    names = [getattr(op, "weight", None), getattr(op, "bias", None)]
    return any(name is not None and name in box.lower for name in names)


def relu_chain(graph: Graph, box: Box, x: Tensor) -> ReluChain:
    """Split the graph at its first boxed op and describe the tail as interval layers.

    Args:
        graph: the network.
        box: the weight box; parameters it does not name keep the model's values.
        x: one input, shape (*graph.input_shape) or (1, *graph.input_shape).

    Returns:
        The chain, in float64. With no boxed parameter at all, the tail is the last Linear op
        (with point intervals) if the graph ends in one.

    Raises:
        BackendError: the tail is not ``Linear (ReLU Linear)*`` on flat tensors (a boxed Conv,
            a sigmoid or tanh after the first boxed op, ...); the message names the op.
    """
    branching = graph.first_non_chain_op()
    if branching is not None:
        raise BackendError(
            f"node '{branching.node}' ({branching.kind}): exact margins support chains of ops "
            "(MLPs) only, and this graph branches or joins here; use the bound engine and "
            "falsifiers instead"
        )
    box = box.to(torch.float64)
    inputs = x.to(torch.float64).reshape(1, *graph.input_shape)
    h = inputs
    ops = graph.ops
    start = next((i for i, op in enumerate(ops) if _owns_boxed(op, box)), None)
    if start is None:
        start = max((i for i, op in enumerate(ops) if isinstance(op, Linear)), default=None)
        if start is None:
            raise BackendError("exact margins need a Linear op in the network")
    params = {name: value.to(torch.float64) for name, value in graph.parameters.items()}
    for op in ops[:start]:
        h = apply_op(op, h, params)
    if h.dim() != 2:
        raise BackendError(
            f"node '{ops[start].node}': exact margins need a flat input to the first boxed op; "
            f"found shape {tuple(h.shape[1:])}"
        )
    layers: list[IntervalLayer] = []
    expect_linear = True
    for op in ops[start:]:
        if isinstance(op, Reshape):
            if len(op.shape) != 1:
                raise BackendError(f"node '{op.node}': exact margins need flat tensors")
            continue
        if expect_linear and isinstance(op, Linear):
            layers.append(_interval_layer(graph, box, op))
            expect_linear = False
            continue
        if not expect_linear and isinstance(op, Activation) and op.function == "relu":
            expect_linear = True
            continue
        what = op.function if isinstance(op, Activation) else type(op).__name__
        raise BackendError(
            f"node '{op.node}' ({what}): exact margins support Linear layers with ReLU between "
            "them after the first boxed parameter; use the bound engine and falsifiers instead"
        )
    if expect_linear:
        raise BackendError("exact margins need the network to end with a Linear op")
    base = box.project({name: params[name] for name in box.names})
    return ReluChain(graph, box, tuple(layers), h[0], inputs, base)
