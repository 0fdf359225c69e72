"""ONNX nodes that combine or move computed tensors: Add/Sub/Mul of two tensors (with rank
lifting), BatchNormalization that cannot fold, Transpose, Pad and Split.

Each function maps one node for `verifier.onnx.importer.GraphBuilder`, emitting ops of
`verifier.graph` with the node's tensor names; errors name the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx import NodeProto

from verifier.graph import (
    Binary,
    Conv,
    Linear,
    Reshape,
    Transpose,
)
from verifier.onnx.converters import (
    ELEMENTWISE,
    batchnorm_elementwise,
    batchnorm_factors,
    can_fold_batchnorm,
    elementwise_op,
    fold_batchnorm,
)
from verifier.onnx.layout import (
    TensorValue,
    broadcast_layout,
    broadcast_shape,
    compose_perms,
    conv_pads,
    lifted,
    pad_amounts,
    pad_op,
    split_slices,
    transpose_perm,
)
from verifier.onnx.reading import (
    node_attributes,
)

if TYPE_CHECKING:
    from verifier.onnx.importer import GraphBuilder


def map_binary(b: GraphBuilder, node: NodeProto) -> None:
    computed = [i for i, name in enumerate(node.input[:2]) if name not in b.constants]
    out = node.output[0]
    if len(computed) == 1:
        value = b.values[node.input[computed[0]]]
        op = elementwise_op(b, node, computed[0], value)
        b.set_output(node, out, b.emit(node, [op], [value], out))
        return
    if node.op_type == "Div":
        raise b.fail(node, "divides two computed tensors; only division by a constant is supported")
    first, second = b.values[node.input[0]], b.values[node.input[1]]
    rank, batched = broadcast_layout(b, node, first, second)
    first, second = lift_rank(b, node, first, rank), lift_rank(b, node, second, rank)
    if broadcast_shape([first.shape, second.shape]) is None:
        raise b.fail(
            node,
            f"its operands of per-sample shapes {first.shape} and {second.shape} do not broadcast",
        )
    binary = Binary(b.names[id(node)], ELEMENTWISE[node.op_type])  # type: ignore[arg-type]
    b.set_output(node, out, b.emit(node, [binary], [first, second], out, batched=batched))


def lift_rank(b: GraphBuilder, node: NodeProto, value: TensorValue, rank: int) -> TensorValue:
    """`value` with leading per-sample axes of size 1 up to `rank` (ONNX broadcasting)."""
    if len(value.shape) == rank:
        return value
    reshape = Reshape(b.names[id(node)], lifted(value.shape, rank))
    return b.emit(node, [reshape], [value], b.fresh(value.name))


def map_batchnorm(b: GraphBuilder, node: NodeProto) -> None:
    out = node.output[0]
    value = b.as_batched(node, b.values[node.input[0]])
    k, t = batchnorm_factors(b, node, value.shape)
    index = b.writer.get(value.name)
    prev = b.ops[index] if index is not None else None
    if (
        index is not None
        and isinstance(prev, Linear | Conv)
        and can_fold_batchnorm(prev, value.shape)
        and b.exclusive(node, node.input[0])
    ):
        b.ops[index] = fold_batchnorm(prev, k, t)
        b.set_output(node, out, value)
        return
    ops = batchnorm_elementwise(b, node, value.shape, k, t)
    b.set_output(node, out, b.emit(node, ops, [value], out))


def map_transpose(b: GraphBuilder, node: NodeProto) -> None:
    out = node.output[0]
    value = b.values[node.input[0]]
    perm = transpose_perm(b, node, value)
    index = b.writer.get(value.name)
    prev = b.ops[index] if index is not None else None
    if isinstance(prev, Transpose):
        # one permutation instead of two; none when they cancel (NHWC <-> NCHW pairs)
        perm = compose_perms(prev.perm, perm)
        source = prev.inputs[0]
        value = TensorValue(source, b.shape_of[source], value.batched)
    if perm == tuple(range(len(perm))):
        b.set_output(node, out, value)
        return
    transpose = Transpose(b.names[id(node)], perm)
    b.set_output(node, out, b.emit(node, [transpose], [value], out))


def map_pad(b: GraphBuilder, node: NodeProto) -> None:
    out = node.output[0]
    value = b.values[node.input[0]]
    amounts, fill = pad_amounts(b, node, value)
    if all(p == (0, 0) for p in amounts):
        b.set_output(node, out, value)
        return
    pads = conv_pads(amounts, fill) if value.batched else None
    user = b.index.sole_user(out, shapes_too=True)
    if (
        pads is not None
        and user is not None
        and user.op_type == "Conv"
        and user.input[0] == out
        and node_attributes(user).get("auto_pad", "NOTSET") in ("NOTSET", "")
    ):
        # the Conv reads the unpadded tensor and pads it itself
        b.conv_pads[out] = pads
        b.set_output(node, out, value, check=False)
        return
    b.set_output(node, out, b.emit(node, [pad_op(b, node, amounts, fill)], [value], out))


def map_split(b: GraphBuilder, node: NodeProto) -> None:
    value = b.values[node.input[0]]
    for out, piece in zip(node.output, split_slices(b, node, value), strict=True):
        if not out or not b.index.is_read(out):
            continue
        whole = piece.start == 0 and piece.stop == value.shape[piece.axis - 1]
        b.set_output(node, out, b.emit(node, [] if whole else [piece], [value], out))
