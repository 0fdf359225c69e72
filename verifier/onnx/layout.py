"""Where the batch axis is, and the ONNX nodes that only move values: Transpose, Concat, Slice,
Split, Pad and global-mean ReduceMean.

Every computed ONNX tensor is held in the graph as a `TensorValue`: the graph tensor with its
values and the per-sample shape behind the graph's batch axis. In an ordinary (batched) model
ONNX axis 0 *is* the batch axis, so ONNX axis k is graph axis k. In a model whose input has no
batch axis (see `verifier.onnx.importer`) the graph still prepends one: ONNX axis k of such an
*unbatched* tensor is graph axis k + 1. The functions here turn ONNX axes, perms and pads into
graph ones, and refuse (naming the node) anything that would move or mix the batch axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import NodeProto

from verifier.errors import GraphError
from verifier.graph import Concat, Op, Pad, Pool, Reshape, Slice
from verifier.onnx.converters import FLOAT_TYPES
from verifier.onnx.reading import node_attributes

if TYPE_CHECKING:
    from verifier.onnx.importer import GraphBuilder

FULL_RANGE = 2**31 - 1
"""A Slice end at least this large runs to the end of its axis (INT_MAX / INT64_MAX in exports)."""


@dataclass(frozen=True)
class TensorValue:
    """A computed ONNX tensor as the graph holds it.

    Attributes:
        name: the graph tensor that holds its values.
        shape: per-sample shape (the graph tensor is (batch, *shape)).
        batched: ONNX axis 0 is the batch axis (ONNX shape (batch, *shape)); otherwise the ONNX
            tensor has no batch axis (ONNX shape == shape) and the graph prepends one.
    """

    name: str
    shape: tuple[int, ...]
    batched: bool = True

    @property
    def onnx_rank(self) -> int:
        """Rank of the ONNX tensor."""
        return len(self.shape) + int(self.batched)

    def onnx_shape(self, batch: int) -> tuple[int, ...]:
        """The ONNX tensor's shape when the batch holds `batch` samples."""
        return (batch, *self.shape) if self.batched else self.shape


def graph_axis(b: GraphBuilder, node: NodeProto, value: TensorValue, axis: int) -> int:
    """The graph axis of ONNX axis `axis` (negative counts from the end) of `value`.

    Raises:
        GraphError: the axis is out of range or is the batch axis.
    """
    rank = value.onnx_rank
    if not -rank <= axis < rank:
        raise b.fail(node, f"axis {axis} is out of range for a tensor of rank {rank}")
    axis = axis + rank if axis < 0 else axis
    if value.batched and axis == 0:
        raise b.fail(
            node,
            "works along axis 0, the batch axis; only per-sample axes are supported "
            "(samples must stay apart)",
        )
    return axis + (0 if value.batched else 1)


def transpose_perm(b: GraphBuilder, node: NodeProto, value: TensorValue) -> tuple[int, ...]:
    """The graph permutation of a Transpose node (perm[0] == 0).

    Raises:
        GraphError: the permutation moves the batch axis or is malformed.
    """
    rank = value.onnx_rank
    perm = [int(p) for p in node_attributes(node).get("perm", range(rank - 1, -1, -1))]
    if sorted(perm) != list(range(rank)):
        raise b.fail(node, f"perm {perm} is not a permutation of the {rank} axes")
    if not value.batched:
        return (0, *(p + 1 for p in perm))
    if perm[0] != 0:
        raise b.fail(
            node,
            f"perm {perm} moves the batch axis (axis 0); only permutations of the "
            "per-sample axes are supported",
        )
    return tuple(perm)


def compose_perms(first: Sequence[int], second: Sequence[int]) -> tuple[int, ...]:
    """The one permutation equal to `first` then `second` (x.permute(first).permute(second))."""
    return tuple(first[p] for p in second)


def concat_op(b: GraphBuilder, node: NodeProto, values: Sequence[TensorValue]) -> Concat:
    """Concat of computed tensors along a per-sample axis.

    Raises:
        GraphError: an input is a constant, the inputs differ in batch layout, or the axis is
            the batch axis.
    """
    for name in node.input:
        if name in b.constants:
            raise b.fail(
                node,
                f"concatenates the constant '{name}'; only computed tensors can be concatenated",
            )
    if len({v.batched for v in values}) != 1 or len({v.onnx_rank for v in values}) != 1:
        raise b.fail(node, "concatenates tensors of different rank or batch layout")
    axis = graph_axis(b, node, values[0], int(node_attributes(node)["axis"]))
    return Concat(b.names[id(node)], axis)


def _int_list(b: GraphBuilder, node: NodeProto, index: int, attr: str) -> list[int] | None:
    """An int list given as constant input `index` (newer opsets) or attribute `attr`."""
    if len(node.input) > index and node.input[index]:
        return b.int_input(node, index)
    value = node_attributes(node).get(attr)
    return None if value is None else [int(v) for v in value]


def slice_ops(b: GraphBuilder, node: NodeProto, value: TensorValue) -> list[Op]:
    """One Slice op per sliced axis (none for a slice that keeps everything).

    Raises:
        GraphError: a negative or zero step, an empty slice, or a slice of the batch axis.
    """
    starts = _int_list(b, node, 1, "starts")
    ends = _int_list(b, node, 2, "ends")
    if starts is None or ends is None or len(starts) != len(ends):
        raise b.fail(node, "starts and ends must be constants of the same length")
    axes = _int_list(b, node, 3, "axes") or list(range(len(starts)))
    steps = _int_list(b, node, 4, "steps") or [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts):
        raise b.fail(node, "starts, ends, axes and steps must have the same length")
    ops: list[Op] = []
    name = b.names[id(node)]
    rank = value.onnx_rank
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step <= 0:
            raise b.fail(node, f"step {step} is not supported; only positive steps are")
        normalised = axis + rank if axis < 0 else axis
        if value.batched and normalised == 0 and start == 0 and step == 1 and end >= FULL_RANGE:
            continue  # the whole batch axis
        our = graph_axis(b, node, value, axis)
        size = value.shape[our - 1]
        lo = min(max(start + size if start < 0 else start, 0), size)
        hi = min(max(end + size if end < 0 else end, 0), size)
        if hi <= lo:
            raise b.fail(node, f"selects nothing on axis {axis} (start {start}, end {end})")
        if (lo, hi, step) != (0, size, 1):
            ops.append(Slice(name, our, lo, hi, step))
    return ops


def split_slices(b: GraphBuilder, node: NodeProto, value: TensorValue) -> list[Slice]:
    """The Slice op of every output of a Split node, in output order.

    Raises:
        GraphError: the split sizes do not add up, or the axis is the batch axis.
    """
    attrs = node_attributes(node)
    axis = graph_axis(b, node, value, int(attrs.get("axis", 0)))
    size = value.shape[axis - 1]
    n_out = len(node.output)
    sizes = _int_list(b, node, 1, "split")
    if sizes is None:
        n_parts = int(attrs.get("num_outputs", n_out))
        chunk = -(-size // n_parts)
        sizes = [min(chunk, max(size - i * chunk, 0)) for i in range(n_parts)]
    if len(sizes) != n_out or sum(sizes) != size or any(s < 0 for s in sizes):
        raise b.fail(node, f"split sizes {sizes} do not divide axis {axis} of size {size}")
    name = b.names[id(node)]
    starts = np.cumsum([0, *sizes])
    return [Slice(name, axis, int(starts[i]), int(starts[i + 1])) for i in range(n_out)]


def pad_amounts(
    b: GraphBuilder, node: NodeProto, value: TensorValue
) -> tuple[list[tuple[int, int]], float]:
    """(begin, end) padding of every graph axis after the batch axis, and the pad value.

    Raises:
        GraphError: a mode other than constant (naming the mode), pads that are not constants,
            or padding of the batch axis.
    """
    attrs = node_attributes(node)
    mode = attrs.get("mode", "constant") or "constant"
    if mode != "constant":
        raise b.fail(
            node,
            f"mode '{mode}' is not supported; only constant padding is (use zero padding, "
            "e.g. padding_mode='zeros' in torch)",
        )
    pads = _int_list(b, node, 1, "pads")
    if pads is None:
        raise b.fail(node, "its pads must be a constant")
    fill = float(attrs.get("value", 0.0))
    if len(node.input) > 2 and node.input[2]:
        fill = float(np.asarray(b.constant(node, node.input[2])).reshape(-1)[0])
    rank = value.onnx_rank
    axes = _int_list(b, node, 3, "axes") or list(range(rank))
    if len(pads) != 2 * len(axes):
        raise b.fail(node, f"has {len(pads)} pads for {len(axes)} axes")
    amounts = [(0, 0)] * len(value.shape)
    for k, axis in enumerate(axes):
        begin, end = pads[k], pads[k + len(axes)]
        if begin == 0 and end == 0:
            continue
        our = graph_axis(b, node, value, axis)
        amounts[our - 1] = (begin, end)
    return amounts, fill


def pad_op(b: GraphBuilder, node: NodeProto, amounts: list[tuple[int, int]], fill: float) -> Pad:
    """A graph Pad op (torch's F.pad order: last axis first) for per-axis (begin, end) pads."""
    first = next(i for i, p in enumerate(amounts) if p != (0, 0))
    flat: list[int] = []
    for begin, end in reversed(amounts[first:]):
        flat += [begin, end]
    return Pad(b.names[id(node)], tuple(flat), fill)


def conv_pads(amounts: list[tuple[int, int]], fill: float) -> tuple[int, int, int, int] | None:
    """Pads (top, left, bottom, right) when the padding is zero, non-negative and only on the
    two spatial axes of a (C, H, W) sample, so that a following Conv can take it; else None."""
    if fill != 0.0 or len(amounts) != 3 or amounts[0] != (0, 0):
        return None
    (top, bottom), (left, right) = amounts[1], amounts[2]
    if min(top, bottom, left, right) < 0:
        return None
    return (top, left, bottom, right)


def reduce_mean_ops(b: GraphBuilder, node: NodeProto, value: TensorValue) -> list[Op]:
    """ReduceMean over the two spatial axes of an (N, C, H, W) tensor: global average pooling.

    Raises:
        GraphError: any other reduction.
    """
    attrs = node_attributes(node)
    axes = _int_list(b, node, 1, "axes")
    if not axes and attrs.get("noop_with_empty_axes", 0):
        return []
    rank = value.onnx_rank
    ours = sorted(graph_axis(b, node, value, a) for a in (axes or range(rank)))
    if len(value.shape) != 3 or ours != [2, 3]:
        raise b.fail(
            node,
            f"averages over axes {axes}; only the mean over the two spatial axes of an "
            "(N, C, H, W) tensor (global average pooling) is supported",
        )
    name = b.names[id(node)]
    channels, height, width = value.shape
    pool = Pool(name, "average", (height, width), (1, 1))
    return [pool] if attrs.get("keepdims", 1) else [pool, Reshape(name, (channels,))]


def broadcast_layout(
    b: GraphBuilder, node: NodeProto, first: TensorValue, second: TensorValue
) -> tuple[int, bool]:
    """The per-sample rank both operands of a Binary op are brought to, and whether the result
    has the batch axis first (ONNX broadcasting aligns trailing axes).

    Raises:
        GraphError: broadcasting would align the batch axis with a per-sample axis.
    """
    rank = max(len(first.shape), len(second.shape))
    if first.batched and second.batched and len(first.shape) == len(second.shape):
        return rank, True
    if not first.batched and not second.batched:
        return rank, False
    batched = first if first.batched else second
    other = second if first.batched else first
    if other.batched or len(other.shape) > len(batched.shape):
        raise b.fail(
            node,
            f"broadcasts a tensor of ONNX rank {first.onnx_rank} against one of rank "
            f"{second.onnx_rank}, which would align the batch axis with a per-sample axis; "
            "give both operands the batch axis first and the same rank",
        )
    return len(batched.shape), True


def lifted(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """`shape` with leading 1s up to `rank` axes (ONNX broadcasting)."""
    return (1,) * (rank - len(shape)) + shape


def broadcast_shape(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The numpy broadcast of the shapes, or None if they do not broadcast."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None


def declared_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """The declared shape of a graph input or output: a size per axis (None where symbolic or
    unknown), or None when the rank itself is unknown."""
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not ttype.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in ttype.shape.dim
    ]


def lacks_batch_axis(
    input_dims: Sequence[int | None], output_dims: Sequence[int | None] | None
) -> bool:
    """Whether a model's input has no batch axis: it has rank 1 (one feature vector), or the
    output has rank 1 (one logit vector) while the input's first axis has a fixed size."""
    if len(input_dims) == 1:
        return True
    return output_dims is not None and len(output_dims) == 1 and input_dims[:1] != [None]


@dataclass(frozen=True)
class GraphEnds:
    """The single input and output of a model, checked.

    Attributes:
        input: the graph input as a value: its per-sample shape, and whether it has a batch
            axis (`lacks_batch_axis`).
        output_name: the graph output (the logits).
        batches: the batch sizes a reshape must keep apart (the fixed batch size, if any; 1
            for a model without batch axis).
    """

    input: TensorValue
    output_name: str
    batches: tuple[int, ...]


def graph_ends(path: Path, graph: onnx.GraphProto) -> GraphEnds:
    """Check the graph's one input and one output and say where the batch axis is.

    Raises:
        GraphError: several (or no) inputs or outputs; an input that is not floating point, of
            unknown shape, or with a symbolic axis other than the batch axis; an output of the
            wrong rank.
    """
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
        raise GraphError(
            f"{path}: the graph must have exactly one input, found {len(inputs)} "
            f"({names}); export a single-input classifier"
        )
    outputs = list(graph.output)
    if len(outputs) != 1:
        names = ", ".join(f"'{o.name}'" for o in outputs) or "none"
        raise GraphError(
            f"{path}: the graph must have exactly one output (the logits), found "
            f"{len(outputs)} ({names}); export only the logits"
        )
    value, output = inputs[0], outputs[0]
    what = f"{path}: input '{value.name}'"
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or ttype.elem_type not in FLOAT_TYPES:
        raise GraphError(f"{what}: must be a floating-point tensor")
    dims = declared_dims(value)
    if not dims:
        raise GraphError(
            f"{what}: its shape is unknown or has rank 0; export with a declared input "
            "shape (batch, *sample_shape)"
        )
    output_dims = declared_dims(output)
    batched = not lacks_batch_axis(dims, output_dims)
    ranks = (2,) if batched else (1, 2)
    if output_dims is not None and len(output_dims) not in ranks:
        expected = "(batch, n_classes)" if batched else "(n_classes,)"
        raise GraphError(
            f"{path}: output '{output.name}' has rank {len(output_dims)}; a classifier "
            f"must output {expected}"
        )
    first = 1 if batched else 0
    for axis in range(first, len(dims)):
        if dims[axis] is None:
            shown = ttype.shape.dim[axis].dim_param or "unknown"
            if batched:
                raise GraphError(
                    f"{what}: axis {axis} is '{shown}', not a fixed size; only the batch "
                    "axis (axis 0) may be symbolic, fix the others when exporting"
                )
            raise GraphError(
                f"{what}: has no batch axis (rank {len(dims)}), so every axis must have a "
                f"fixed size, but axis {axis} is '{shown}'; export with a batch axis first, "
                "or with fixed sizes"
            )
    sample = tuple(d for d in dims[first:] if d is not None)
    batches = (1, 2, 3) if batched and dims[0] is None else (dims[0] or 1,)
    return GraphEnds(TensorValue(value.name, sample, batched), output.name, batches)
