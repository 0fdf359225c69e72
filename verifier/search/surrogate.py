"""What drives the search's gradient: margin bounds in the search's dtype (`guide_bounds`:
intervals, or per entry the tighter of intervals and linear bounds) and the soft surrogate of
the certified metric (`soft_metric`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from verifier.bounds.ibp import margin_bounds
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.margins import MarginBounds, combine_margin_bounds
from verifier.bounds.memory import PassPlan, bound_pass_cost, current_memory_budget, plan_pass
from verifier.certify import Metric
from verifier.graph import Graph
from verifier.spec import LinearBoundSection


def guide_bounds(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    linear: bool,
    options: LinearBoundSection | None = None,
    max_rows: int | None = None,
) -> MarginBounds:
    """Margin bounds in the search's dtype without rounding allowance: intervals, or per entry
    the tighter of intervals and linear bounds (`verifier.bounds.linear`; `max_rows`: margin
    rows per back-substitution group, equal up to rounding). Differentiable."""
    ibp = margin_bounds(graph, lower, upper, x, y)
    if not linear:
        return ibp
    options = options or LinearBoundSection()
    chosen = None
    xs, ys, ibp_lower = x, y, ibp.lower
    if options.samples is not None:
        chosen = linear_samples(graph, lower, upper, x, y, ibp, options.samples)
        if chosen.numel() == 0:
            return ibp
        xs, ys, ibp_lower = x[chosen], y[chosen], ibp.lower[chosen]
    classes = None
    if options.classes is not None and options.classes < graph.n_classes - 1:
        # the k most threatening classes by their interval bound (+inf at y sorts last)
        classes = ibp_lower.detach().topk(options.classes, dim=1, largest=False).indices
    lin = linear_margin_bounds(
        graph,
        lower,
        upper,
        xs,
        ys,
        intermediate=options.intermediate,
        slopes=options.slopes,
        classes=classes,
        max_rows=max_rows,
    )
    if chosen is None:
        return combine_margin_bounds(ibp, lin)
    # the other samples keep their interval bounds (-inf: no linear bound there)
    full = torch.full_like(ibp.lower, float("-inf")).index_copy(0, chosen, lin.lower)
    return combine_margin_bounds(ibp, MarginBounds(full))


def linear_samples(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    ibp: MarginBounds,
    fraction: float,
) -> Tensor:
    """The indices of the batch's samples worth a linear bound: among those the box centre
    classifies correctly (no bound certifies the others), the ceil(fraction · batch) whose
    smallest interval margin bound is lowest."""
    with torch.no_grad():
        centre = {n: (lower[n] + upper[n]) / 2 for n in lower}
        logits = graph.forward(x, centre)
        correct = torch.nonzero(logits.argmax(1) == y.to(logits.device)).flatten()
        k = min(math.ceil(fraction * x.shape[0]), correct.numel())
        worst = ibp.lower.detach()[correct].min(dim=1).values
        return correct[worst.topk(k, largest=False).indices].sort().values


def soft_metric(margin_lower: Tensor, y: Tensor, metric: Metric, temperature: float) -> Tensor:
    """The differentiable surrogate of the certified metric: per sample the softmax weight of
    the true class when its worst-case margins against the others are `margin_lower`
    (batch, classes - 1), i.e. 1 / (1 + Σ exp(-t m)); averaged (accuracy) or averaged per class
    and then over the classes present (balanced accuracy)."""
    neg = -temperature * margin_lower
    zeros = torch.zeros_like(neg[:, :1])
    prob = torch.exp(-torch.logsumexp(torch.cat([zeros, neg], dim=1), dim=1))
    if metric == "accuracy":
        return prob.mean()
    return torch.stack([prob[y == c].mean() for c in torch.unique(y)]).mean()


def search_plan(
    graph: Graph,
    *,
    samples: int,
    linear: bool,
    options: LinearBoundSection | None = None,
    grad: bool = True,
) -> PassPlan:
    """Samples per float32 guide pass (at most `samples`) and margin rows per group that fit
    the current memory budget (`verifier.bounds.memory`; no budget: all at once)."""
    budget = current_memory_budget()
    if budget is None:
        return PassPlan(samples)
    options = options or LinearBoundSection()
    cost = bound_pass_cost(
        graph,
        "best" if linear else "ibp",
        dtype=torch.float32,
        grad=grad,
        intermediate=options.intermediate,
        slopes=options.slopes,
        classes=options.classes,
    )
    return plan_pass(cost, budget, samples=samples)
