"""The small typed op graph that every bound method walks.

An ONNX classifier is mapped (by `verifier.onnx.importer`) onto a *chain* of ops: each op takes
the single tensor the previous op produced. Parameters (weights and biases of the affine ops)
stay in the layout of their ONNX initializer and keep its name; that name is how domains, spec
files and LID files refer to them. Tensors carry a leading batch dimension; the per-sample
shapes are fixed when the graph is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from verifier.data.samples import Dataset


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
class Linear:
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
class Conv:
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
class Activation:
    """A monotone elementwise activation."""

    node: str
    function: Literal["relu", "sigmoid", "tanh"]
    kind: Literal["activation"] = field(default="activation", init=False)


@dataclass(frozen=True, eq=False)
class Elementwise:
    """y = x (op) constant, or constant (op) x when `constant_first`; constants broadcast
    against the per-sample shape (input normalisation, BatchNorm without a preceding affine op).
    """

    node: str
    op: Literal["add", "sub", "mul", "div"]
    constant: Tensor
    constant_first: bool = False
    kind: Literal["elementwise"] = field(default="elementwise", init=False)


@dataclass(frozen=True, eq=False)
class Reshape:
    """Reshape every sample to `shape` (Flatten, Reshape); the batch axis is kept."""

    node: str
    shape: tuple[int, ...]
    kind: Literal["reshape"] = field(default="reshape", init=False)


@dataclass(frozen=True, eq=False)
class Pool:
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


Op = Linear | Conv | Activation | Elementwise | Reshape | Pool


@dataclass(frozen=True, eq=False)
class Graph:
    """A feed-forward classifier as a chain of typed ops.

    Attributes:
        ops: the ops in evaluation order.
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
        h = x
        for op in self.ops:
            h = apply_op(op, h, params)
        return h

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def prepare_data(self, data: Dataset) -> Dataset:
        """The samples as this graph's input takes them: unchanged here. A graph cut from a
        larger model (`verifier.onnx.prefix.PrefixedGraph`) maps raw samples through its frozen
        prefix; `verifier.data.validate_for_model` calls this first."""
        return data


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


def apply_op(op: Op, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """Evaluate one op on a point tensor with the given parameter values."""
    if isinstance(op, Linear):
        w = linear_weight(op, _cast(params[op.weight], h))
        bias = params[op.bias] if op.bias is not None else None
        return apply_scale(h @ w.transpose(0, 1), op.scale, bias, axis=-1)
    if isinstance(op, Conv):
        bias = params[op.bias] if op.bias is not None else None
        return apply_scale(conv2d(op, h, _cast(params[op.weight], h)), op.scale, bias, axis=1)
    if isinstance(op, Activation):
        if op.function == "relu":
            return torch.relu(h)
        return torch.sigmoid(h) if op.function == "sigmoid" else torch.tanh(h)
    if isinstance(op, Elementwise):
        return apply_elementwise(op, h)
    if isinstance(op, Reshape):
        return h.reshape(h.shape[0], *op.shape)
    return pool2d(op, h)
