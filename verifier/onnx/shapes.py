"""Shape arithmetic: the reshape-like ONNX nodes (Flatten, Reshape, Squeeze, Unsqueeze) and the
values of shape tensors (Shape, Size and what is computed from them alone).

`reshaped` evaluates a node's rule for several batch sizes to prove that it keeps every sample
apart (output (batch, *fixed)); `int_input` reads axes, starts or pads that may come from Shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from onnx import NodeProto

from verifier.onnx.reading import node_attributes

if TYPE_CHECKING:
    pass

ShapeValue = Callable[[str, int], list[int]]
ShapeRule = Callable[[tuple[int, ...], int], tuple[int, ...]]


def reshape_rule(node: NodeProto, shape_value: ShapeValue) -> ShapeRule:
    """The rule (full input shape, batch size) -> full output shape of a reshape-like node.

    Args:
        node: a Flatten, Reshape, Squeeze or Unsqueeze node.
        shape_value: the value of a shape tensor (Reshape's shape, axes inputs) for a batch size.

    Returns:
        A function that raises ValueError when the node cannot reshape that input.
    """
    attrs = node_attributes(node)
    op = node.op_type
    if op == "Flatten":

        def flatten(full: tuple[int, ...], batch: int) -> tuple[int, ...]:
            axis = int(attrs.get("axis", 1))
            axis = axis + len(full) if axis < 0 else axis
            return (math.prod(full[:axis]), math.prod(full[axis:]))

        return flatten
    if op == "Reshape":
        allowzero = bool(attrs.get("allowzero", 0))
        return lambda full, batch: onnx_reshape(full, shape_value(node.input[1], batch), allowzero)

    def axes(full: tuple[int, ...], batch: int, rank: int) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            raw = shape_value(node.input[1], batch)
        elif "axes" in attrs:
            raw = list(attrs["axes"])
        else:
            return None
        return sorted(a + rank if a < 0 else a for a in raw)

    if op == "Squeeze":

        def squeeze(full: tuple[int, ...], batch: int) -> tuple[int, ...]:
            chosen = axes(full, batch, len(full))
            if chosen is None:
                chosen = [i for i, d in enumerate(full) if d == 1]
            return tuple(d for i, d in enumerate(full) if i not in chosen)

        return squeeze

    def unsqueeze(full: tuple[int, ...], batch: int) -> tuple[int, ...]:
        rank = len(full) + len(axes(full, batch, 0) or [])
        out = list(full)
        for a in axes(full, batch, rank) or []:
            out.insert(a, 1)
        return tuple(out)

    return unsqueeze


def onnx_reshape(full: tuple[int, ...], spec: list[int], allowzero: bool) -> tuple[int, ...]:
    """Output shape of ONNX Reshape(data of shape `full`, shape=spec)."""
    out: list[int] = []
    for i, s in enumerate(spec):
        if s == 0 and not allowzero:
            if i >= len(full):
                raise ValueError(f"shape {spec} copies axis {i}, which the input lacks")
            out.append(full[i])
        elif s < -1:
            raise ValueError(f"shape {spec} has a negative size")
        else:
            out.append(s)
    if out.count(-1) > 1:
        raise ValueError(f"shape {spec} has several -1 entries")
    total = math.prod(full)
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            raise ValueError(f"shape {spec} does not divide {total} elements")
        out[out.index(-1)] = total // known
    if math.prod(out) != total:
        raise ValueError(f"shape {spec} does not hold {total} elements")
    return tuple(out)
