"""The small typed op graph that every bound method walks.

An ONNX classifier is mapped (by `verifier.onnx.importer`) onto a *DAG* of typed ops in
topological order. Every op reads named tensors (`inputs`) and writes one (`output`): most ops
read one tensor; `Binary` (residual Add / Sub / Mul of two computed tensors) reads two and
`Concat` any number. Parameters (weights and biases of the affine ops) stay in the layout of
their ONNX initializer and keep its name; that name is how domains, spec files and LID files
refer to them. Tensors carry a leading batch axis; per-sample shapes are fixed when the graph is
loaded, and every axis an op names (`Concat.axis`, `Transpose.perm`, `Slice.axis`) counts the
batch axis as 0.

A graph built from ops without names (`inputs == ()`) is a chain: `Graph` wires op i to read
op i-1's output, so hand-built chains (tests, `verifier.cl`) need no tensor names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from verifier.data.samples import Dataset


ActivationFunction = Literal["relu", "sigmoid", "tanh", "leaky_relu", "clip"]


@dataclass(frozen=True, eq=False, kw_only=True)
class Wired:
    """Where an op sits in the DAG: the tensors it reads and the one it writes."""

    inputs: tuple[str, ...] = ()
    output: str = ""


@dataclass(frozen=True, eq=False)
class AffineScale:
    """Per-output constants of an affine op: y = weight_scale*(W x) + bias_scale*b + shift.

    This is how Gemm's alpha/beta and a following BatchNormalization are folded into the
    preceding Gemm/Conv while the weight tensor keeps its ONNX initializer name and layout.
    Each tensor has shape (n_out,).
    """

    weight_scale: Tensor
    bias_scale: Tensor
    shift: Tensor


@dataclass(frozen=True, eq=False)
class Linear(Wired):
    """y = x @ W.T + b on the last axis (Gemm, or MatMul followed by Add).

    `weight_layout` says how the initializer is stored: "out_in" (Gemm transB=1, torch's
    nn.Linear) or "in_out" (MatMul, Gemm transB=0).
    """

    node: str
    weight: str
    bias: str | None
    weight_layout: Literal["out_in", "in_out"] = "out_in"
    scale: AffineScale | None = None
    kind: Literal["linear"] = field(default="linear", init=False)


@dataclass(frozen=True, eq=False)
class Conv(Wired):
    """2-D convolution (NCHW) with ONNX pads (top, left, bottom, right)."""

    node: str
    weight: str
    bias: str | None
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    groups: int = 1
    scale: AffineScale | None = None
    kind: Literal["conv"] = field(default="conv", init=False)


@dataclass(frozen=True, eq=False)
class Activation(Wired):
    """A monotone elementwise activation.

    `leaky_relu` is max(x, 0) + alpha * min(x, 0) with 0 <= alpha <= 1; `clip` is
    min(max(x, low), high).
    """

    node: str
    function: ActivationFunction
    alpha: float = 0.0
    low: float = -math.inf
    high: float = math.inf
    kind: Literal["activation"] = field(default="activation", init=False)


@dataclass(frozen=True, eq=False)
class Elementwise(Wired):
    """y = x (op) constant, or constant (op) x when `constant_first`; constants broadcast
    against the per-sample shape (input normalisation, BatchNorm without a preceding affine op).
    """

    node: str
    op: Literal["add", "sub", "mul", "div"]
    constant: Tensor
    constant_first: bool = False
    kind: Literal["elementwise"] = field(default="elementwise", init=False)


@dataclass(frozen=True, eq=False)
class Reshape(Wired):
    """Reshape every sample to `shape` (Flatten, Reshape); the batch axis is kept."""

    node: str
    shape: tuple[int, ...]
    kind: Literal["reshape"] = field(default="reshape", init=False)


@dataclass(frozen=True, eq=False)
class Pool(Wired):
    """2-D average or max pooling (NCHW); pads as ONNX (top, left, bottom, right)."""

    node: str
    function: Literal["average", "max"]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = False
    kind: Literal["pool"] = field(default="pool", init=False)


@dataclass(frozen=True, eq=False)
class Binary(Wired):
    """y = a (op) b of two computed tensors (residual connections), broadcasting like ONNX."""

    node: str
    op: Literal["add", "sub", "mul"]
    kind: Literal["binary"] = field(default="binary", init=False)


@dataclass(frozen=True, eq=False)
class Concat(Wired):
    """Concatenation of the inputs along `axis` (batch axis = 0, so axis >= 1)."""

    node: str
    axis: int
    kind: Literal["concat"] = field(default="concat", init=False)


@dataclass(frozen=True, eq=False)
class Transpose(Wired):
    """Axis permutation; perm[0] == 0 (the batch axis stays first)."""

    node: str
    perm: tuple[int, ...]
    kind: Literal["transpose"] = field(default="transpose", init=False)


@dataclass(frozen=True, eq=False)
class Pad(Wired):
    """Constant padding of the spatial axes: `pads` as torch's F.pad (last axis first)."""

    node: str
    pads: tuple[int, ...]
    value: float = 0.0
    kind: Literal["pad"] = field(default="pad", init=False)


@dataclass(frozen=True, eq=False)
class Slice(Wired):
    """x[..., start:stop:step, ...] on one axis (batch axis = 0, so axis >= 1); Split is
    several Slices of one tensor."""

    node: str
    axis: int
    start: int
    stop: int
    step: int = 1
    kind: Literal["slice"] = field(default="slice", init=False)


Op = (
    Linear
    | Conv
    | Activation
    | Elementwise
    | Reshape
    | Pool
    | Binary
    | Concat
    | Transpose
    | Pad
    | Slice
)
UNARY_OPS = (Linear, Conv, Activation, Elementwise, Reshape, Pool, Transpose, Pad, Slice)
"""Op types that read exactly one computed tensor."""


@dataclass(frozen=True, eq=False)
class Graph:
    """A feed-forward classifier as a DAG of typed ops in topological order.

    Attributes:
        ops: the ops in evaluation (topological) order; ops without tensor names are wired
            into a chain from `input_name` to `output_name`.
        parameters: every weight and bias tensor of the affine ops, keyed by ONNX initializer
            name, in the initializer's layout and dtype (float32 unless converted).
        input_name: name of the ONNX graph input.
        input_shape: per-sample input shape (no batch axis).
        output_name: name of the ONNX graph output.
        n_classes: number of logits.
    """

    ops: tuple[Op, ...]
    parameters: Mapping[str, Tensor]
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    n_classes: int

    def __post_init__(self) -> None:
        if _needs_chain_wiring(self.ops, self.input_name, self.output_name):
            object.__setattr__(self, "ops", _chain(self.ops, self.input_name, self.output_name))

    def is_chain(self) -> bool:
        """Whether every op reads only the previous op's output (the graph input for the first)."""
        previous = self.input_name
        for op in self.ops:
            if op.inputs != (previous,):
                return False
            previous = op.output
        return True

    def first_non_chain_op(self) -> Op | None:
        """The first op that does not read exactly the previous op's output, or None."""
        previous = self.input_name
        for op in self.ops:
            if op.inputs != (previous,):
                return op
            previous = op.output
        return None

    def consumers(self) -> dict[str, list[Op]]:
        """Tensor name -> the ops that read it, in evaluation order."""
        out: dict[str, list[Op]] = {}
        for op in self.ops:
            for name in op.inputs:
                out.setdefault(name, []).append(op)
        return out

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter tensor, keyed by initializer name."""
        return {name: tuple(t.shape) for name, t in self.parameters.items()}

    def n_parameters(self) -> int:
        """Total number of scalar parameters."""
        return sum(t.numel() for t in self.parameters.values())

    def affine_ops(self) -> Iterator[Linear | Conv]:
        """The ops that own parameters, in evaluation order."""
        for op in self.ops:
            if isinstance(op, Linear | Conv):
                yield op

    def forward(self, x: Tensor, theta: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits of the network with parameters `theta` (default: the graph's own).

        Args:
            x: inputs, shape (batch, *input_shape); the computation runs in x's dtype and device.
            theta: replacement values for any subset of the parameters, keyed by name.

        Returns:
            Logits, shape (batch, n_classes).
        """
        params = dict(self.parameters)
        if theta is not None:
            params.update(theta)
        return evaluate(self, x, params)[self.output_name]

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def prepare_data(self, data: Dataset) -> Dataset:
        """The samples as this graph's input takes them: unchanged here. A graph cut from a
        larger model (`verifier.onnx.prefix.PrefixedGraph`) maps raw samples through its frozen
        prefix; `verifier.data.validate_for_model` calls this first."""
        return data


def _needs_chain_wiring(ops: Sequence[Op], input_name: str, output_name: str) -> bool:
    """Unnamed ops, or a chain cut from another graph (ops[k:], a head on new features)."""
    if not ops:
        return False
    if any(not op.output for op in ops):
        return True
    consecutive = all(
        isinstance(op, UNARY_OPS) and op.inputs == (before.output,)
        for before, op in zip(ops, ops[1:], strict=False)
    )
    ends = ops[0].inputs == (input_name,) and ops[-1].output == output_name
    return consecutive and isinstance(ops[0], UNARY_OPS) and not ends


def _chain(ops: Sequence[Op], input_name: str, output_name: str) -> tuple[Op, ...]:
    """Wire unnamed ops into a chain input -> op 0 -> ... -> output."""
    wired: list[Op] = []
    previous = input_name
    for i, op in enumerate(ops):
        if not isinstance(op, UNARY_OPS):
            raise ValueError(
                f"op '{op.node}' reads several tensors; give every op its tensor names"
            )
        output = output_name if i == len(ops) - 1 else f"{op.node}:{i}"
        wired.append(replace(op, inputs=(previous,), output=output))
        previous = output
    return tuple(wired)


def evaluate(
    graph: Graph, x: Tensor, params: Mapping[str, Tensor], *, stop: int | None = None
) -> dict[str, Tensor]:
    """Every tensor of ops[:stop] on the point input x with the given parameter values.

    Returns:
        Tensor name -> value (the graph input included).
    """
    env = {graph.input_name: x}
    for op in graph.ops[:stop]:
        env[op.output] = apply_node(op, [env[name] for name in op.inputs], params)
    return env


def _cast(t: Tensor, like: Tensor) -> Tensor:
    return t.to(dtype=like.dtype, device=like.device)


def linear_weight(op: Linear, weight: Tensor) -> Tensor:
    """The weight of a Linear op in (n_out, n_in) layout, whatever its ONNX layout."""
    return weight if op.weight_layout == "out_in" else weight.transpose(0, 1)


def apply_scale(y: Tensor, scale: AffineScale | None, bias: Tensor | None, axis: int) -> Tensor:
    """Finish an affine op on a point value: y*weight_scale + bias*bias_scale + shift.

    `y` is W x without bias; `axis` is the output-channel axis of y.
    """
    shape = [1] * y.dim()
    shape[axis] = -1
    if scale is None:
        return y if bias is None else y + _cast(bias, y).reshape(shape)
    out = y * _cast(scale.weight_scale, y).reshape(shape) + _cast(scale.shift, y).reshape(shape)
    if bias is not None:
        out = out + (_cast(bias, y) * _cast(scale.bias_scale, y)).reshape(shape)
    return out


def conv2d(op: Conv, x: Tensor, weight: Tensor) -> Tensor:
    """Convolution of x with `weight` under the op's geometry, no bias."""
    top, left, bottom, right = op.pads
    if top == bottom and left == right:
        return F.conv2d(x, weight, None, op.strides, (top, left), op.dilations, op.groups)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, weight, None, op.strides, 0, op.dilations, op.groups)


def pool_output_size(
    size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int, ceil: bool
) -> int:
    """Output length of one pooled axis, as torch and onnxruntime compute it.

    With ceil_mode, a window that would start in the end padding is dropped (ONNX MaxPool and
    AveragePool since opset 19 say the same; onnx's own shape inference does not apply this).
    """
    span = size + pad_begin + pad_end - ((kernel - 1) * dilation + 1)
    out = (span + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def pool2d(op: Pool, x: Tensor) -> Tensor:
    """Pooling of a point tensor; monotone, so it also maps interval corners."""
    top, left, bottom, right = op.pads
    (kh, kw), (sh, sw), (dh, dw) = op.kernel, op.strides, op.dilations
    # torch pads natively only symmetric pads of at most half the kernel; otherwise pad
    # explicitly and crop the windows torch then adds past the end under ceil_mode
    if top == bottom and left == right and top <= kh // 2 and left <= kw // 2:
        if op.function == "max":
            return F.max_pool2d(
                x, op.kernel, op.strides, (top, left), op.dilations, ceil_mode=op.ceil_mode
            )
        return F.avg_pool2d(
            x, op.kernel, op.strides, (top, left), op.ceil_mode, op.count_include_pad
        )
    out_h = pool_output_size(x.shape[-2], kh, sh, top, bottom, dh, op.ceil_mode)
    out_w = pool_output_size(x.shape[-1], kw, sw, left, right, dw, op.ceil_mode)
    pad = (left, right, top, bottom)
    if op.function == "max":
        padded = F.pad(x, pad, value=float("-inf"))
        out = F.max_pool2d(padded, op.kernel, op.strides, 0, op.dilations, ceil_mode=op.ceil_mode)
    elif op.count_include_pad:
        out = F.avg_pool2d(F.pad(x, pad), op.kernel, op.strides, 0, op.ceil_mode, True)
    else:
        ones = torch.ones_like(x[:1, :1])
        sums = F.avg_pool2d(F.pad(x, pad), op.kernel, op.strides, 0, op.ceil_mode, True)
        counts = F.avg_pool2d(F.pad(ones, pad), op.kernel, op.strides, 0, op.ceil_mode, True)
        out = sums / counts
    return out[..., :out_h, :out_w]


def apply_elementwise(op: Elementwise, x: Tensor) -> Tensor:
    """Evaluate an Elementwise op on a point tensor."""
    c = _cast(op.constant, x)
    if op.op == "add":
        return x + c
    if op.op == "mul":
        return x * c
    if op.op == "sub":
        return c - x if op.constant_first else x - c
    return c / x if op.constant_first else x / c


def apply_activation(op: Activation, h: Tensor) -> Tensor:
    """Evaluate an activation on a point tensor (monotone, so it also maps interval corners)."""
    if op.function == "relu":
        return torch.relu(h)
    if op.function == "sigmoid":
        return torch.sigmoid(h)
    if op.function == "tanh":
        return torch.tanh(h)
    if op.function == "leaky_relu":
        return torch.where(h >= 0, h, h * op.alpha)
    return h.clamp(min=op.low, max=op.high)


def apply_binary(op: Binary, a: Tensor, b: Tensor) -> Tensor:
    """Evaluate a Binary op on point tensors."""
    if op.op == "add":
        return a + b
    return a - b if op.op == "sub" else a * b


def apply_slice(op: Slice, h: Tensor) -> Tensor:
    """x[..., start:stop:step, ...] on the op's axis."""
    index = [slice(None)] * h.dim()
    index[op.axis] = slice(op.start, op.stop, op.step)
    return h[tuple(index)]


def apply_node(op: Op, inputs: Sequence[Tensor], params: Mapping[str, Tensor]) -> Tensor:
    """Evaluate one op on the point tensors it reads (in `op.inputs` order)."""
    if isinstance(op, Binary):
        return apply_binary(op, inputs[0], inputs[1])
    if isinstance(op, Concat):
        return torch.cat(list(inputs), dim=op.axis)
    return apply_op(op, inputs[0], params)


def apply_op(op: Op, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """Evaluate one single-input op on a point tensor with the given parameter values."""
    if isinstance(op, Linear):
        w = linear_weight(op, _cast(params[op.weight], h))
        bias = params[op.bias] if op.bias is not None else None
        return apply_scale(h @ w.transpose(0, 1), op.scale, bias, axis=-1)
    if isinstance(op, Conv):
        bias = params[op.bias] if op.bias is not None else None
        return apply_scale(conv2d(op, h, _cast(params[op.weight], h)), op.scale, bias, axis=1)
    if isinstance(op, Activation):
        return apply_activation(op, h)
    if isinstance(op, Elementwise):
        return apply_elementwise(op, h)
    if isinstance(op, Reshape):
        return h.reshape(h.shape[0], *op.shape)
    if isinstance(op, Pool):
        return pool2d(op, h)
    if isinstance(op, Transpose):
        return h.permute(*op.perm)
    if isinstance(op, Pad):
        return F.pad(h, op.pads, value=op.value)
    if isinstance(op, Slice):
        return apply_slice(op, h)
    raise ValueError(f"op '{op.node}' ({op.kind}) reads {len(op.inputs)} tensors; use apply_node")
