"""ONNX nodes -> ops of `verifier.graph`: the affine, normalisation, activation, elementwise
and pooling nodes.

The DAG walk (`verifier.onnx.importer.GraphBuilder`) visits the nodes in topological order and
wires the ops; the functions here map one node, given the per-sample shape of its computed
input, onto unwired typed ops, registering its weights and biases as parameters (keyed by
initializer name) and its other constants as float64 constants. Each raises a `GraphError`
naming the node on anything it cannot map exactly. Nodes that only move values (Transpose,
Concat, Slice, Split, Pad) are mapped in `verifier.onnx.layout`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from onnx import NodeProto, TensorProto

from verifier.graph import Activation, AffineScale, Conv, Elementwise, Linear, Op, Pool
from verifier.onnx.reading import node_attributes

if TYPE_CHECKING:
    from verifier.onnx.importer import GraphBuilder
    from verifier.onnx.layout import TensorValue

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
ACTIVATIONS = {
    "Relu": "relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "LeakyRelu": "leaky_relu",
    "Clip": "clip",
}
ELEMENTWISE = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}
RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
POOLS = {"AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"}
PASS_THROUGH = {"Identity", "Dropout", "Cast"}
LAYOUT = {"Transpose", "Concat", "Slice", "Split", "Pad", "ReduceMean"}
_SUPPORTED = (
    {"Gemm", "MatMul", "Conv", "BatchNormalization"}
    | set(ACTIVATIONS)
    | set(ELEMENTWISE)
    | RESHAPES
    | POOLS
    | PASS_THROUGH
    | LAYOUT
)
SUPPORTED_OPS = frozenset(_SUPPORTED)
"""ONNX op types (default domain) that map onto the bound engine's ops."""

DATA_INPUTS: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(ELEMENTWISE, (0, 1)),
    "MatMul": (0, 1),
    "Concat": None,
}
"""Input slots that may hold computed tensors (None: all); default slot 0 only. Every other
input must be a constant (weights, statistics, axes, pads), or for the shape input of a
reshape-like node a tensor computed from shapes alone."""


def weight_parameter(
    b: GraphBuilder, node: NodeProto, name: str, role: str = "weight"
) -> tuple[str, bool]:
    if name not in b.constants:
        raise b.fail(node, f"its {role} '{name}' is computed, not a constant")
    return b.parameter(node, name, role)


def bias_parameter(
    b: GraphBuilder, node: NodeProto, name: str, n_out: int
) -> tuple[str | None, np.ndarray | None]:
    """A bias of n_out values from an initializer is a parameter; else a constant shift.

    Returns (parameter name, None) or (None, shift of shape (n_out,)).
    """
    value = b.constants[name]
    per_output = value.size == n_out and value.shape[-1:] == (n_out,)
    source = b.sources.get(name)
    if per_output and value.ndim <= 2 and source is not None and not source[1]:
        return b.parameter(node, name, "bias")[0], None
    if not per_output and value.size != 1:
        raise b.fail(node, f"its bias '{name}' has shape {value.shape}; expected ({n_out},)")
    constant = b.constant(node, name).astype(np.float64)
    return None, np.broadcast_to(constant.reshape(-1), (n_out,)).copy()


def gemm_op(b: GraphBuilder, node: NodeProto, shape: tuple[int, ...]) -> Linear:
    attrs = node_attributes(node)
    if attrs.get("transA", 0):
        raise b.fail(node, "transA=1 is not supported; export x @ W with transA=0")
    if len(shape) != 1:
        raise b.fail(node, f"input per-sample shape {shape} is not a vector")
    source, transposed = weight_parameter(b, node, node.input[1])
    trans_b = bool(attrs.get("transB", 0))
    layout = "out_in" if trans_b != transposed else "in_out"
    effective = b.constants[node.input[1]]
    n_out = effective.shape[0] if trans_b else effective.shape[1]
    bias, shift = None, None
    if len(node.input) > 2 and node.input[2]:
        bias, shift = bias_parameter(b, node, node.input[2], n_out)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    scale = affine_scale(n_out, alpha, beta, None if shift is None else beta * shift)
    return Linear(b.names[id(node)], source, bias, layout, scale)  # type: ignore[arg-type]


def conv_op(
    b: GraphBuilder,
    node: NodeProto,
    shape: tuple[int, ...],
    extra_pads: tuple[int, int, int, int] | None = None,
) -> Conv:
    """Conv with its weight and bias as parameters; `extra_pads` come from a folded Pad."""
    attrs = node_attributes(node)
    if len(shape) != 3:
        raise b.fail(node, f"only 2-D convolution (NCHW) is supported; input {shape}")
    source, transposed = weight_parameter(b, node, node.input[1])
    weight = b.constants[node.input[1]]
    if transposed or weight.ndim != 4:
        raise b.fail(node, "its weight must be a 4-D initializer in ONNX layout")
    kernel = tuple(weight.shape[2:])
    if tuple(attrs.get("kernel_shape", kernel)) != kernel:
        raise b.fail(node, "kernel_shape does not match the weight")
    strides = tuple(attrs.get("strides", (1, 1)))
    dilations = tuple(attrs.get("dilations", (1, 1)))
    pads = onnx_pads(b, node, attrs, shape[1:], kernel, strides, dilations)
    if extra_pads is not None:
        pads = tuple(p + q for p, q in zip(pads, extra_pads, strict=True))  # type: ignore[assignment]
    bias, shift = None, None
    if len(node.input) > 2 and node.input[2]:
        bias, shift = bias_parameter(b, node, node.input[2], weight.shape[0])
    return Conv(
        b.names[id(node)],
        source,
        bias,
        strides,  # type: ignore[arg-type]
        pads,
        dilations,  # type: ignore[arg-type]
        int(attrs.get("group", 1)),
        affine_scale(weight.shape[0], 1.0, 1.0, shift),
    )


def onnx_pads(
    b: GraphBuilder,
    node: NodeProto,
    attrs: dict[str, Any],
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[int, int, int, int]:
    """ONNX pads (top, left, bottom, right), resolving auto_pad SAME_* and VALID."""
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if len(kernel) != 2:
        raise b.fail(node, "only 2-D kernels are supported")
    if auto_pad == "NOTSET":
        pads = tuple(int(p) for p in attrs.get("pads", (0, 0, 0, 0)))
        return pads  # type: ignore[return-value]
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise b.fail(node, f"auto_pad '{auto_pad}' is not supported")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def batchnorm_factors(
    b: GraphBuilder, node: NodeProto, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization as y = k * x + t per channel (axis 0 of the sample): (k, t), float64."""
    attrs = node_attributes(node)
    if attrs.get("training_mode", 0):
        raise b.fail(node, "training_mode=1; export the model in eval mode")
    if len(node.input) != 5 or not all(i in b.constants for i in node.input[1:]):
        raise b.fail(node, "scale, bias, mean and variance must be constants")
    gamma, beta, mean, var = (b.constant(node, i).astype(np.float64) for i in node.input[1:])
    eps = float(attrs.get("epsilon", 1e-5))
    if len(shape) < 1 or any(v.shape != (shape[0],) for v in (gamma, beta, mean, var)):
        raise b.fail(node, f"its statistics do not match the channel axis of {shape}")
    if np.any(var + eps <= 0):
        raise b.fail(node, "its variance + epsilon is not positive")
    k = gamma / np.sqrt(var + eps)
    return k, beta - mean * k


def can_fold_batchnorm(prev: Op | None, shape: tuple[int, ...]) -> bool:
    """Whether a BatchNormalization on the output (per-sample `shape`) of `prev` folds into it:
    after a Conv, or after a Linear on (batch, features)."""
    return isinstance(prev, Conv) or (isinstance(prev, Linear) and len(shape) == 1)


def fold_batchnorm(prev: Linear | Conv, k: np.ndarray, t: np.ndarray) -> Linear | Conv:
    """`prev` followed by y = k * x + t per output channel, as one op."""
    old = prev.scale or identity_scale(len(k))
    kt = torch.from_numpy(k)
    scale = AffineScale(
        old.weight_scale * kt, old.bias_scale * kt, old.shift * kt + torch.from_numpy(t)
    )
    return replace(prev, scale=scale)


def batchnorm_elementwise(
    b: GraphBuilder, node: NodeProto, shape: tuple[int, ...], k: np.ndarray, t: np.ndarray
) -> list[Op]:
    """A BatchNormalization that follows no affine op: an Elementwise mul, then an add."""
    bshape = (shape[0],) + (1,) * (len(shape) - 1)
    name = b.names[id(node)]
    return [
        Elementwise(name, "mul", torch.from_numpy(k.reshape(bshape))),
        Elementwise(name, "add", torch.from_numpy(t.reshape(bshape))),
    ]


def elementwise_op(b: GraphBuilder, node: NodeProto, index: int, value: TensorValue) -> Elementwise:
    """x (op) constant, or constant (op) x when the computed tensor is input 1."""
    other = node.input[1 - index]
    constant = b.constant(node, other).astype(np.float64)
    # the constant must broadcast against the ONNX tensor without changing its shape; a batched
    # tensor's constant may carry a leading batch axis of size 1
    full = (1, *value.shape) if value.batched else value.shape
    try:
        ok = np.broadcast_shapes(full, constant.shape) == full
    except ValueError:
        ok = False
    if not ok:
        raise b.fail(
            node,
            f"its constant '{other}' of shape {constant.shape} does not broadcast "
            f"against the per-sample shape {value.shape} without changing it",
        )
    if value.batched and constant.ndim == len(value.shape) + 1:
        constant = constant.reshape(constant.shape[1:])
    op = ELEMENTWISE[node.op_type]
    first = index == 1 and op in ("sub", "div")
    if op == "div" and not first and np.any(constant == 0):
        raise b.fail(node, f"divides by constant '{other}', which has zero entries")
    return Elementwise(b.names[id(node)], op, torch.from_numpy(constant), first)  # type: ignore[arg-type]


def activation_op(b: GraphBuilder, node: NodeProto) -> Activation:
    """Relu, Sigmoid, Tanh, LeakyRelu (alpha in [0, 1]) or Clip (constant bounds)."""
    function = ACTIVATIONS[node.op_type]
    name = b.names[id(node)]
    attrs = node_attributes(node)
    if function == "leaky_relu":
        alpha = float(attrs.get("alpha", 0.01))
        if not 0.0 <= alpha <= 1.0:
            raise b.fail(node, f"alpha {alpha} is not supported; it must lie in [0, 1]")
        return Activation(name, "leaky_relu", alpha=alpha)
    if function == "clip":
        low, high = float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
        for index, role in ((1, "min"), (2, "max")):
            if len(node.input) > index and node.input[index]:
                bound = np.asarray(b.constant(node, node.input[index]), dtype=np.float64)
                if bound.size != 1:
                    raise b.fail(node, f"its {role} must be a scalar, got shape {bound.shape}")
                low, high = (
                    (float(bound.item()), high) if index == 1 else (low, float(bound.item()))
                )
        return Activation(name, "clip", low=low, high=high)
    return Activation(name, function)  # type: ignore[arg-type]


def check_pass_through(b: GraphBuilder, node: NodeProto) -> None:
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        if bool(np.asarray(b.constant(node, node.input[2])).item()):
            raise b.fail(node, "training_mode is true; export the model in eval mode")
    if node.op_type == "Cast" and node_attributes(node).get("to") not in (
        TensorProto.FLOAT,
        TensorProto.DOUBLE,
    ):
        raise b.fail(node, "only casts to float32 or float64 are supported")


def pool_op(b: GraphBuilder, node: NodeProto, shape: tuple[int, ...]) -> Pool:
    attrs = node_attributes(node)
    if len(shape) != 3:
        raise b.fail(node, f"only 2-D pooling (NCHW) is supported; input {shape}")
    function = "max" if "Max" in node.op_type else "average"
    name = b.names[id(node)]
    if node.op_type.startswith("Global"):
        return Pool(name, function, (shape[1], shape[2]), (1, 1))  # type: ignore[arg-type]
    kernel = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides", (1,) * len(kernel)))
    dilations = tuple(attrs.get("dilations", (1,) * len(kernel)))
    if function == "average" and any(d != 1 for d in dilations):
        raise b.fail(node, "dilated average pooling is not supported")
    pads = onnx_pads(b, node, attrs, shape[1:], kernel, strides, dilations)
    return Pool(
        name,
        function,  # type: ignore[arg-type]
        kernel,  # type: ignore[arg-type]
        strides,  # type: ignore[arg-type]
        pads,
        dilations,  # type: ignore[arg-type]
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
        count_include_pad=bool(attrs.get("count_include_pad", 0)),
    )


def identity_scale(n_out: int) -> AffineScale:
    """y = W x + b as an AffineScale, the start of a BatchNormalization fold."""
    ones = torch.ones(n_out, dtype=torch.float64)
    return AffineScale(ones, ones.clone(), torch.zeros(n_out, dtype=torch.float64))


def affine_scale(
    n_out: int, alpha: float, beta: float, shift: np.ndarray | None
) -> AffineScale | None:
    """The AffineScale for y = alpha*(W x) + beta*b + shift, or None when it is the identity."""
    if alpha == 1.0 and beta == 1.0 and shift is None:
        return None
    return AffineScale(
        weight_scale=torch.full((n_out,), alpha, dtype=torch.float64),
        bias_scale=torch.full((n_out,), beta, dtype=torch.float64),
        shift=(
            torch.zeros(n_out, dtype=torch.float64)
            if shift is None
            else torch.from_numpy(np.asarray(shift, dtype=np.float64).reshape(n_out).copy())
        ),
    )
