"""Masked heads: the graphs and boxes that bound a prediction made among some output rows.

A multi-head (Task-IL) or shared-head (Domain-IL) prediction is argmax over `logits[:, rows]`.
`restrict_graph` builds the derived graph whose final Linear keeps only those rows (same
parameter names, restricted shapes); its logits equal the full network's `logits[:, rows]` for
every parameter vector, so bounding the derived graph over `restrict_box(box, ...)` (the same
box rows) soundly bounds the masked prediction of every network in the box. Rows outside
`rows` do not enter the masked prediction at all, which is why a task's LID may leave them free.

`pin_zero_width` moves parameters that a box fixes to one value into the graph (a point, cheap
to propagate); the set of networks is unchanged. (`verifier.cl.head_certify` splits off the
final Linear, so that a search over the head alone runs on precomputed features.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.errors import GraphError, InputError
from verifier.graph import AffineScale, Graph, Linear


def head_op(graph: Graph) -> Linear:
    """The graph's final op, which must be a Linear (the classification head).

    Raises:
        GraphError: the last op is not a Linear.
    """
    last = graph.ops[-1] if graph.ops else None
    if not isinstance(last, Linear):
        found = "no op" if last is None else f"'{last.node}' ({last.kind})"
        raise GraphError(f"a masked head needs a final Linear op; found {found}")
    return last


def _check_rows(graph: Graph, rows: Sequence[int]) -> Tensor:
    index = torch.as_tensor(list(rows), dtype=torch.int64)
    if index.numel() < 2 or len(set(index.tolist())) != index.numel():
        raise InputError(f"a masked head needs at least two distinct rows; got {list(rows)}")
    if int(index.min()) < 0 or int(index.max()) >= graph.n_classes:
        raise InputError(f"rows {list(rows)} outside the graph's {graph.n_classes} outputs")
    return index


def _take_rows(op: Linear, name: str, value: Tensor, index: Tensor) -> Tensor:
    """The head rows of one head tensor (weight in its ONNX layout, or bias)."""
    index = index.to(value.device)
    if name == op.weight and op.weight_layout == "in_out":
        return value.index_select(1, index)
    return value.index_select(0, index)


def _put_rows(op: Linear, name: str, full: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    out = full.clone()
    index = index.to(full.device)
    if name == op.weight and op.weight_layout == "in_out":
        out[:, index] = rows.to(full)
    else:
        out[index] = rows.to(full)
    return out


def head_names(graph: Graph) -> list[str]:
    """Names of the head's weight and bias (bias only if present)."""
    op = head_op(graph)
    return [op.weight] if op.bias is None else [op.weight, op.bias]


def restrict_graph(graph: Graph, rows: Sequence[int]) -> Graph:
    """The graph whose logits are the full graph's `logits[:, rows]`, for any parameters.

    The final Linear keeps only `rows` (weight rows, bias entries and folded scales); every
    parameter keeps its name. Parameters given to `forward` or to bound functions must then be
    restricted the same way (`restrict_parameters`, `restrict_box`).

    Args:
        graph: a graph whose last op is a Linear.
        rows: the output rows that compete, in the order of the derived logits.

    Returns:
        The derived graph, with n_classes = len(rows).

    Raises:
        GraphError: the last op is not a Linear.
        InputError: fewer than two rows, repeated rows or rows out of range.
    """
    op = head_op(graph)
    index = _check_rows(graph, rows)
    params = dict(graph.parameters)
    for name in head_names(graph):
        params[name] = _take_rows(op, name, params[name], index)
    scale = op.scale
    if scale is not None:
        scale = AffineScale(
            scale.weight_scale.index_select(0, index),
            scale.bias_scale.index_select(0, index),
            scale.shift.index_select(0, index),
        )
    ops = (*graph.ops[:-1], replace(op, scale=scale))
    return Graph(
        ops, params, graph.input_name, graph.input_shape, graph.output_name, int(index.numel())
    )


def restrict_parameters(
    graph: Graph, theta: Mapping[str, Tensor], rows: Sequence[int]
) -> dict[str, Tensor]:
    """Parameter values for `restrict_graph(graph, rows)`: head tensors keep `rows` only."""
    op = head_op(graph)
    index = _check_rows(graph, rows)
    heads = set(head_names(graph))
    return {n: _take_rows(op, n, v, index) if n in heads else v for n, v in theta.items()}


def restrict_box(box: Box, graph: Graph, rows: Sequence[int]) -> Box:
    """The box of `restrict_graph(graph, rows)`: the same intervals on the kept rows."""
    return Box(
        restrict_parameters(graph, box.lower, rows), restrict_parameters(graph, box.upper, rows)
    )


def lift_box(sub: Box, base: Box, graph: Graph, rows: Sequence[int]) -> Box:
    """A full-graph box: `sub` on the parameters it names (head rows `rows` for head tensors),
    `base` everywhere else.

    Args:
        sub: a box over (some) parameters of `restrict_graph(graph, rows)`.
        base: a box over every parameter of `graph` (full shapes).
        graph: the full graph.
        rows: the rows `sub` was restricted to.

    Returns:
        The combined box (its corners in `base`'s dtype).
    """
    op = head_op(graph)
    index = _check_rows(graph, rows)
    heads = set(head_names(graph))
    lower, upper = dict(base.lower), dict(base.upper)
    for name, lo in sub.lower.items():
        up = sub.upper[name]
        if name in heads:
            lower[name] = _put_rows(op, name, base.lower[name], lo, index)
            upper[name] = _put_rows(op, name, base.upper[name], up, index)
        else:
            lower[name], upper[name] = lo.to(base.lower[name]), up.to(base.upper[name])
    return Box(lower, upper)


def pin_zero_width(graph: Graph, box: Box) -> tuple[Graph, Box]:
    """Move the parameters a box fixes (zero width everywhere) into the graph as points.

    The set of networks {graph with θ : θ in box} is unchanged, and bound passes get cheaper
    (a point tensor propagates without interval arithmetic). The pinned value must be exactly
    representable in the graph's parameter dtype, which holds for boxes whose corners are
    float32 values (every box the search returns).

    Returns:
        (graph with pinned values, box over the remaining parameters).
    """
    params = dict(graph.parameters)
    lower, upper = {}, {}
    for name, lo in box.lower.items():
        up = box.upper[name]
        if torch.equal(lo, up) and bool((lo.to(params[name].dtype).to(lo.dtype) == lo).all()):
            params[name] = lo.to(params[name].dtype)
        else:
            lower[name], upper[name] = lo, up
    pinned = Graph(
        graph.ops, params, graph.input_name, graph.input_shape, graph.output_name, graph.n_classes
    )
    return pinned, Box(lower, upper)
