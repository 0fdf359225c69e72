"""Held-out certification of head-only boxes on cached float64 body features.

When a box pins every parameter but the final Linear's (the body is a single network), the
body's outputs on the held-out samples are the same for every such box: they are computed once
in float64 together with a bound e on their rounding error (`verifier.bounds.ibp.propagate` in
proof mode), and each box is then certified on the head alone, which is cheap.

Soundness. For exact body features f* with |f* - f| <= e elementwise (f the computed ones), the
margin of class y over class j for head weights W in the box is

    m(f*) = m(f) + (W_y - W_j) . (f* - f) >= m(f) - sum_k max_box |W_y,k - W_j,k| e_k,

and `margin_bounds` (proof mode) bounds m(f) from below up to its own rounding allowance. A
sample is certified when the margin bound exceeds that allowance plus the feature term (inflated
by a factor 1 + 1e-6, far above the float64 error of a 10^3-term non-negative sum) plus
4 ulp of the bound for the final comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.bounds.ibp import margin_bounds, propagate
from verifier.bounds.margins import MarginBounds
from verifier.cl.heads import head_names, head_op
from verifier.domains.box import Box
from verifier.errors import InputError
from verifier.graph import Graph, apply_op
from verifier.rounding import UNIT_ROUNDOFF_64

FEATURE_TERM_INFLATION = 1.0 + 1e-6


@dataclass(frozen=True, eq=False)
class HeadInputs:
    """Float64 body features of some samples, their error bound and the body they came from.

    Attributes:
        features: computed features, shape (n, k), float64.
        error: elementwise bound on |exact - computed|, shape (n, k), float64.
        body: the body parameters (every parameter but the head's) they were computed with.
    """

    features: Tensor
    error: Tensor
    body: Mapping[str, Tensor]


def head_inputs(graph: Graph, x: Tensor, *, chunk_size: int = 256) -> HeadInputs:
    """Compute body features in float64 with their rounding-error bound (proof mode).

    Args:
        graph: a graph whose last op is the head Linear; the body uses its own parameters.
        x: samples, shape (n, *input_shape).
        chunk_size: samples per pass.

    Returns:
        The features, their error bound and a copy of the body parameters.
    """
    stop = len(graph.ops) - 1
    head_op(graph)
    feats, errs = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk_size):
            xb = x[start : start + chunk_size].to(torch.float64)
            h, err = propagate(graph, {}, {}, xb, stop=stop, track_rounding=True)
            assert err is not None  # proof mode always returns the error bound
            feats.append(h.upper.flatten(1))
            errs.append(err.flatten(1))
    heads = set(head_names(graph))
    body = {n: t.clone() for n, t in graph.parameters.items() if n not in heads}
    return HeadInputs(torch.cat(feats), torch.cat(errs), body)


def _check_body(graph: Graph, box: Box, inputs: HeadInputs) -> None:
    heads = set(head_names(graph))
    for name, value in inputs.body.items():
        current = graph.parameters[name]
        if name in box.lower:
            lo, up = box.lower[name], box.upper[name]
            pinned = torch.equal(lo, up) and torch.equal(lo.to(torch.float64), value.double())
            if not pinned:
                raise InputError(
                    f"parameter '{name}': the box does not pin it to the cached body's value; "
                    "certify with verifier.certify.certify_samples instead"
                )
        elif not torch.equal(current.double(), value.double()):
            raise InputError(f"parameter '{name}': the graph differs from the cached body")
    missing = [n for n in box.lower if n not in heads and n not in inputs.body]
    if missing:
        raise InputError(f"box names parameters the cached body does not know: {missing}")


def certify_head(graph: Graph, box: Box, inputs: HeadInputs, y: Tensor) -> tuple[Tensor, int]:
    """Prove, in float64, which samples every network in the box classifies correctly.

    Args:
        graph: the graph (its body must equal `inputs.body`, e.g. `restrict_graph` output).
        box: a box that pins every body parameter it names to the cached value; head
            parameters may have any width.
        inputs: `head_inputs` of the samples, computed with the same body.
        y: labels, shape (n,).

    Returns:
        (certified mask, shape (n,); number of samples with a non-finite bound).

    Raises:
        InputError: the box or graph does not match the cached body, or the head has a folded
            scale or an (in, out) weight layout.
    """
    op = head_op(graph)
    if op.scale is not None or op.weight_layout != "out_in":
        raise InputError(f"node '{op.node}': head certification needs a plain (out, in) Linear")
    _check_body(graph, box, inputs)
    names = head_names(graph)
    lower = {n: box.lower[n].to(torch.float64) for n in names if n in box.lower}
    upper = {n: box.upper[n].to(torch.float64) for n in names if n in box.upper}
    head = head_graph(graph)
    with torch.no_grad():
        bounds = margin_bounds(head, lower, upper, inputs.features, y, track_rounding=True)
        assert bounds.rounding is not None  # proof mode
        w = graph.parameters[op.weight].to(torch.float64)
        wl, wu = lower.get(op.weight, w), upper.get(op.weight, w)
        diff = torch.maximum(
            (wl[:, None, :] - wu[None, :, :]).abs(), (wu[:, None, :] - wl[None, :, :]).abs()
        )  # (C, C, k): max over the box of |W_y,k - W_j,k|
        n_classes = diff.shape[0]
        pairs = inputs.error @ diff.reshape(n_classes * n_classes, -1).transpose(0, 1)
        term = pairs.reshape(-1, n_classes, n_classes)[torch.arange(y.shape[0]), y]
        allowance = (
            bounds.rounding
            + FEATURE_TERM_INFLATION * term
            + 4 * UNIT_ROUNDOFF_64 * bounds.lower.abs().nan_to_num(posinf=0.0)
        )
        allowance = allowance.scatter(1, y[:, None], torch.zeros_like(allowance[:, :1]))
        mask = MarginBounds(bounds.lower, allowance).certified()
        lower_b = bounds.lower
        nonfinite = int((torch.isnan(lower_b) | torch.isneginf(lower_b)).any(dim=1).sum())
    return mask, nonfinite


def head_features(graph: Graph, x: Tensor, *, batch_size: int = 1000) -> Tensor:
    """The inputs of the final Linear for the graph's own parameters, flattened to (n, k).

    Args:
        graph: a graph whose last op is a Linear.
        x: inputs, shape (n, *input_shape); the computation runs in x's dtype.
        batch_size: samples per forward pass.

    Returns:
        Features, shape (n, k).
    """
    head_op(graph)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            h = x[start : start + batch_size]
            for op in graph.ops[:-1]:
                h = apply_op(op, h, graph.parameters)
            out.append(h.flatten(1))
    return torch.cat(out) if out else x.new_zeros((0, 0))


def head_graph(graph: Graph) -> Graph:
    """The final Linear alone, as a graph on `head_features` inputs (head parameters only)."""
    op = head_op(graph)
    names = head_names(graph)
    weight = graph.parameters[op.weight]
    n_in = weight.shape[1] if op.weight_layout == "out_in" else weight.shape[0]
    return Graph(
        (op,),
        {n: graph.parameters[n] for n in names},
        graph.input_name,
        (n_in,),
        graph.output_name,
        graph.n_classes,
    )
