"""Reshape a feasible box toward the shape that maximises its size (beyond the paper).

The primal-dual search moves every width at about the same rate (Adam normalises each entry's
step), and the box it returns is that shape scaled toward θ0 until it is feasible: nearly
uniform widths, whatever the bounds, so a tighter bound buys a larger scale of the same shape
but not a better shape (benchmarks/RESULTS.md, issue 19). At a maximum of the size S under the
constraint C(d) <= 0, every width variable d_i has the same

    q_i = (∂C/∂d_i) / (∂S/∂d_i)

(KKT: the margin a unit of size costs is the same everywhere). With w_i = d_lo,i + d_hi,i the
entry's width and n_t the free entries of its tensor, ∂S/∂d_i is 1/(n_t w_i) for
`layer_log_width`, 1/(p w_i) for `mean_log_width` and 1/p for `mean_width`. Each round:

1. C's gradient: minus the soft certified metric (`verifier.search.surrogate.soft_metric`) of
   every task's gradient samples at the current box, bounded by the search's guide (intervals,
   or per entry the tighter of intervals and linear bounds for `search.bound: linear`; a
   `midrad` search is reshaped by exact intervals, the bound its proofs use), or by interval
   bounds with `reshape.costs: ibp` (on the paper's CNN with linear bounds that shape scales
   to a 16% wider LID than the one priced by linear bounds: 0.00664 against 0.00572);
2. every width variable moves by the factor (q̄ / q_i)^α, clamped to [1/c, c] (q̄: the
   geometric mean of the positive q_i); a variable no sample is sensitive to (q_i = 0) keeps
   its width: nothing in the data measures how far it may go;
3. the new shape is scaled to the largest feasible factor (bisection in log scale on the float32
   guide between 1/c, feasible because no width grew by more than c, and c), and kept if its
   size beats the best so far.

The box returned is proved in float64 (`shrink_to_feasible`: scaled toward θ0 further if the
proof falls short), and it is the search's own box whenever reshaping does not beat it. The
outer box, frozen entries and `max_width` bound every candidate as they bound the search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.graph import Graph
from verifier.search.chunked import chunked_soft_metric
from verifier.search.dual import SearchTask, hard_metrics, meets_targets, proof_method
from verifier.search.float32 import inward_float32
from verifier.search.shrink import shrink_to_feasible
from verifier.search.surrogate import guide_bounds, search_plan
from verifier.spec import SearchSection

SCALE_STEPS = 6
"""Bisection steps on the log scale factor per round (a factor within c^(2/64) of the best)."""

Widths = dict[str, Tensor]


def reshape_box(
    graph: Graph,
    box: Box,
    theta0: Mapping[str, Tensor],
    tasks: Sequence[SearchTask],
    config: SearchSection,
    *,
    cap_lo: Mapping[str, Tensor],
    cap_hi: Mapping[str, Tensor],
    on_round: Callable[[int, float], None] | None = None,
) -> tuple[Box, tuple[float, ...], int] | None:
    """Reshape `box` (feasible on the tasks' optimisation samples) for `config.reshape.rounds`
    rounds (module docstring).

    Args:
        graph: the network.
        box: the search's box around theta0.
        theta0: the boxed parameters' values (float32).
        tasks: the constraints with their optimisation samples.
        config: the search settings (`reshape`, `size`, `bound`, `temperature`, `max_width`).
        cap_lo: per entry, the largest d_lo allowed (0 where frozen, the outer box's room).
        cap_hi: the same for d_hi.
        on_round: called with (round, the size of its box) after each round.

    Returns:
        (box, its float64 hard metrics, the round that gave it) when a reshaped box is larger
        than `box` and proved feasible; None otherwise.
    """
    options = config.reshape
    method = proof_method(config)
    names = list(theta0)
    center = {n: theta0[n].double() for n in names}
    d_lo = {n: (center[n] - box.lower[n].double().to(center[n].device)).clamp(min=0) for n in names}
    d_hi = {n: (box.upper[n].double().to(center[n].device) - center[n]).clamp(min=0) for n in names}
    caps = ({n: cap_lo[n].double() for n in names}, {n: cap_hi[n].double() for n in names})
    free = {n: int((caps[0][n] + caps[1][n] > 0).sum()) for n in names}
    best: tuple[Box, int] | None = None
    best_size = box.size(config.size)
    priced = config if options.costs == "search" else config.model_copy(update={"bound": "ibp"})
    for round_ in range(1, options.rounds + 1):
        g_lo, g_hi = _sensitivity(graph, theta0, d_lo, d_hi, tasks, priced)
        d_lo, d_hi = _moved(d_lo, d_hi, g_lo, g_hi, free, config)
        scale = _feasible_scale(graph, center, d_lo, d_hi, caps, tasks, config)
        d_lo, d_hi = _bounded(d_lo, d_hi, caps, scale, config.max_width)
        candidate = _as_box(center, d_lo, d_hi)
        size = candidate.size(config.size)
        if size > best_size:
            best, best_size = (candidate, round_), size
        if on_round is not None:
            on_round(round_, size)
    if best is None:
        return None
    proved, hard, _ = shrink_to_feasible(graph, best[0], theta0, tasks, method=method)
    if not meets_targets(hard, tasks) or proved.size(config.size) <= box.size(config.size):
        return None
    return proved, hard, best[1]


def _sensitivity(
    graph: Graph,
    theta0: Mapping[str, Tensor],
    d_lo: Widths,
    d_hi: Widths,
    tasks: Sequence[SearchTask],
    config: SearchSection,
) -> tuple[Widths, Widths]:
    """∂C/∂d at the box: the gradient of minus the tasks' soft metrics, clamped at 0."""
    v_lo = {n: d.float().requires_grad_(True) for n, d in d_lo.items()}
    v_hi = {n: d.float().requires_grad_(True) for n, d in d_hi.items()}
    lower = {n: theta0[n] - v_lo[n] for n in theta0}
    upper = {n: theta0[n] + v_hi[n] for n in theta0}
    linear = config.bound == "linear"
    total = torch.zeros(())
    for task in tasks:
        plan = search_plan(graph, samples=task.x.shape[0], linear=linear, options=config.linear)

        bounds_of = partial(
            guide_bounds, graph, linear=linear, options=config.linear, max_rows=plan.rows
        )
        soft, _ = chunked_soft_metric(
            bounds_of,
            lower,
            upper,
            task.x,
            task.y,
            metric=task.metric,
            temperature=config.temperature,
            chunk=max(plan.samples, 1),
        )
        total = total - soft
    variables = [*v_lo.values(), *v_hi.values()]
    grads = torch.autograd.grad(total, variables, allow_unused=True)
    out = [
        torch.zeros_like(v) if g is None else g.clamp(min=0)
        for v, g in zip(variables, grads, strict=True)
    ]
    count = len(v_lo)
    g_lo = {n: g.double() for n, g in zip(v_lo, out[:count], strict=True)}
    g_hi = {n: g.double() for n, g in zip(v_hi, out[count:], strict=True)}
    return g_lo, g_hi


def _moved(
    d_lo: Widths,
    d_hi: Widths,
    g_lo: Widths,
    g_hi: Widths,
    free: Mapping[str, int],
    config: SearchSection,
) -> tuple[Widths, Widths]:
    """Every width variable times (q̄ / q_i)^α, clamped (module docstring, step 2); `free`:
    the entries of each tensor that may widen."""
    p = sum(free.values())
    q: dict[str, tuple[Tensor, Tensor]] = {}
    for n in d_lo:
        width = d_lo[n] + d_hi[n]
        if config.size == "mean_width":
            per_size = torch.full_like(width, float(p))
        elif config.size == "mean_log_width":
            per_size = p * width
        else:
            per_size = free[n] * width
        q[n] = (g_lo[n] * per_size, g_hi[n] * per_size)
    positive = torch.cat([torch.cat([a.flatten(), b.flatten()]) for a, b in q.values()])
    positive = positive[positive > 0]
    if positive.numel() == 0:
        return d_lo, d_hi
    mean = positive.log().mean()
    step, clamp = config.reshape.step, config.reshape.clamp

    def factor(qi: Tensor) -> Tensor:
        moved = ((mean - qi.clamp(min=1e-300).log()) * step).exp().clamp(1 / clamp, clamp)
        return torch.where(qi > 0, moved, torch.ones_like(moved))

    return (
        {n: d_lo[n] * factor(q[n][0]) for n in d_lo},
        {n: d_hi[n] * factor(q[n][1]) for n in d_hi},
    )


def _bounded(
    d_lo: Widths,
    d_hi: Widths,
    caps: tuple[Widths, Widths],
    scale: float,
    max_width: float | None,
) -> tuple[Widths, Widths]:
    """The widths times `scale`, inside the caps and at most `max_width` wide (as the search's
    projection)."""
    lo = {n: torch.minimum(d * scale, caps[0][n]) for n, d in d_lo.items()}
    hi = {n: torch.minimum(d * scale, caps[1][n]) for n, d in d_hi.items()}
    if max_width is not None:
        for n in lo:
            total = lo[n] + hi[n]
            shrink = torch.where(total > max_width, max_width / total.clamp(min=1e-300), 1.0)
            lo[n], hi[n] = lo[n] * shrink, hi[n] * shrink
    return lo, hi


def _as_box(center: Widths, d_lo: Widths, d_hi: Widths) -> Box:
    return inward_float32(
        Box({n: center[n] - d_lo[n] for n in center}, {n: center[n] + d_hi[n] for n in center})
    )


def _feasible_scale(
    graph: Graph,
    center: Widths,
    d_lo: Widths,
    d_hi: Widths,
    caps: tuple[Widths, Widths],
    tasks: Sequence[SearchTask],
    config: SearchSection,
) -> float:
    """The largest factor in [1/c, c] (log bisection, float32 guide) at which the shape meets
    every target; 1/c when none larger does (no width is then wider than before the round)."""
    method = proof_method(config)

    def feasible(scale: float) -> bool:
        lo, hi = _bounded(d_lo, d_hi, caps, scale, config.max_width)
        box = _as_box(center, lo, hi)
        return meets_targets(hard_metrics(graph, box, tasks, proof=False, method=method), tasks)

    low, high = -math.log(config.reshape.clamp), math.log(config.reshape.clamp)
    if feasible(math.exp(high)):
        return math.exp(high)
    for _ in range(SCALE_STEPS):
        mid = (low + high) / 2
        if feasible(math.exp(mid)):
            low = mid
        else:
            high = mid
    return math.exp(low)
