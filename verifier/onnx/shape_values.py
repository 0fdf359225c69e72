"""Shape values during import: proving that a reshape-like node keeps the batch axis (`reshaped`,
evaluated for several batch sizes), constant or Shape-derived integer inputs (`int_input`), and
the value of a shape tensor for a given batch size (`shape_value`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from verifier.onnx.folding import SHAPE_SOURCES
from verifier.onnx.layout import TensorValue
from verifier.onnx.reading import node_attributes
from verifier.onnx.shapes import reshape_rule

if TYPE_CHECKING:
    from verifier.onnx.importer import GraphBuilder


def reshaped(b: GraphBuilder, node: NodeProto, value: TensorValue) -> TensorValue:
    """The output of a reshape-like node, proven to keep samples apart.

    In a model with a batch axis the node's rule is evaluated for several batch sizes, and the
    output must be (batch, *fixed). In a model of one sample (no batch axis) it is evaluated
    once; an output (1, *rest) is taken as `rest` with the batch axis first.

    Args:
        b: the import in progress.
        node: a Flatten, Reshape, Squeeze or Unsqueeze node.
        value: its computed input.

    Returns:
        Its output: the graph tensor is still the input's (the caller reshapes it to `shape`).

    Raises:
        GraphError: the node mixes samples or cannot reshape its input.
    """
    rule = reshape_rule(node, lambda name, batch: shape_value(b, name, batch))
    if not b.batched_model:
        full = value.onnx_shape(1)
        try:
            out = rule(full, 1)
        except ValueError as err:
            raise b.fail(node, f"cannot reshape {full} ({err})") from err
        if math.prod(out) != math.prod(full):
            raise b.fail(node, f"reshapes {full} to {out}, which has another size")
        # an ONNX tensor (1, *rest) of one sample is that sample with the batch axis first
        if out[:1] == (1,):
            return TensorValue(value.name, out[1:], True)
        return TensorValue(value.name, out, False)
    results: dict[int, tuple[int, ...]] = {}
    problems: list[str] = []
    for batch in b.batches:
        full = (batch, *value.shape)
        try:
            results[batch] = rule(full, batch)
        except ValueError as err:
            problems.append(f"input {full}: {err}")
        else:
            if results[batch][:1] != (batch,):
                problems.append(f"input {full} -> {results[batch]}")
    rests = {out[1:] for out in results.values()}
    if problems or len(rests) != 1 or math.prod(next(iter(rests))) != math.prod(value.shape):
        seen = "; ".join(problems or [f"{(n, *value.shape)} -> {o}" for n, o in results.items()])
        raise b.fail(
            node,
            f"does not keep the batch axis ({seen}); reshape to (batch, ...) with -1 or 0 "
            "in the first place",
        )
    return TensorValue(value.name, next(iter(rests)), True)


def int_input(b: GraphBuilder, node: NodeProto, index: int) -> list[int]:
    """The integers of input `index` of `node` (axes, starts, pads): a constant, or a tensor
    computed from shapes alone that must not depend on the batch size.

    Raises:
        GraphError: the value depends on the batch size.
    """
    name = node.input[index]
    if name in b.constants:
        return [int(v) for v in np.asarray(b.constant(node, name)).reshape(-1)]
    found = {tuple(shape_value(b, name, batch)) for batch in b.batches}
    if len(found) != 1:
        raise b.fail(
            node,
            f"its input {index} '{name}' depends on the batch size ({sorted(found)}); "
            "only per-sample sizes are supported",
        )
    return list(next(iter(found)))


def shape_value(b: GraphBuilder, name: str, batch: int) -> list[int]:
    """Value of a shape tensor for a given batch size (a constant, or computed from Shape)."""
    if name in b.constants:
        return [int(v) for v in np.asarray(b.constants[name]).reshape(-1)]
    return [int(v) for v in np.asarray(_evaluate(b, name, batch, {})).reshape(-1)]


def _evaluate(b: GraphBuilder, name: str, batch: int, memo: dict[str, np.ndarray]) -> np.ndarray:
    if name in b.constants:
        return b.constants[name]
    if name in memo:
        return memo[name]
    node = b.index.producer[name]
    if node.op_type in SHAPE_SOURCES:
        source = node.input[0]
        if source not in b.values:
            raise b.fail(node, f"takes the shape of '{source}', which is not yet computed")
        full = np.array(b.values[source].onnx_shape(batch), dtype=np.int64)
        if node.op_type == "Size":
            values = [np.array(math.prod(full), dtype=np.int64)]
        else:
            attrs = node_attributes(node)
            start, end = attrs.get("start", 0), attrs.get("end")
            values = [full[start:end]]
    else:
        feeds = {i: _evaluate(b, i, batch, memo) for i in node.input if i}
        values = b.folder.evaluate(node, feeds)
    for out, value in zip(node.output, values, strict=False):
        memo[out] = np.asarray(value)
    return memo[name]
