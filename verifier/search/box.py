"""Primal-dual search for a maximal box LID, then shrink-to-feasible.

Maximise a size S(T) of the box T = [θ0 - d_lo, θ0 + d_hi] subject to one soft-accuracy
constraint per task, g_i = τ'_i - SoftAcc_i(T) <= 0, with the augmented Lagrangian
L = -S + Σ λ_i g_i + (ρ_i / 2) [g_i]_+^2 (paper, arXiv 2512.01899, §4):

* primal: Adam on (d_lo, d_hi) with learning rate η/p times a shared multiplier that shrinks
  (×0.98, down to 0.1) while any hard constraint on the batch is violated and grows (×1.02)
  while all hold (a faster decay or a lower floor freezes the search for good once the batch
  hovers at the target: measured on digits, 5x narrower boxes at the same held-out bound);
  after each step the widths are projected (non-negative, frozen entries 0, inside an outer
  box, at most `max_width`);
* dual: λ_i <- max(0, λ_i + η_d (τ'_i - HardAcc_i)) on the batch's hard certified accuracy;
  ρ_i grows by `penalty_growth` while violated.

Every `checkpoint_every` iterations the box is a candidate with its hard certified accuracy
on the whole optimisation part, from a fast float32 guide. Beyond the paper, the returned box
always meets τ' on the optimisation part, proved in float64: the widest candidate whose
float64 proof meets τ', or the final box shrunk toward θ0 by bisection on a scale factor
(guided in float32, proved in float64) until it is feasible, whichever is larger. The guide
only steers the choice: float64 convolutions are ~10x slower than float32 ones on CPU, so
proving every checkpoint and bisection step would dominate the run on CNNs. Box corners are
rounded inward to float32 so that projected float32 weights lie exactly inside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from verifier.bounds.ibp import margin_bounds
from verifier.bounds.margins import MarginBounds
from verifier.certify import empirical_metric
from verifier.domains.box import Box
from verifier.graph import Graph
from verifier.search.chunked import chunked_soft_metric
from verifier.search.dual import (
    DualState,
    SearchTask,
    hard_metrics,
    meets_targets,
    proof_method,
    tasks_on,
)
from verifier.search.float32 import down_float32, inward_float32
from verifier.search.reshape import reshape_box
from verifier.search.results import Checkpoint, SearchResult, SearchStep
from verifier.search.shrink import shrink_to_feasible
from verifier.search.surrogate import guide_bounds, search_plan, soft_metric
from verifier.spec import SearchSection


class _Widths:
    """The search variables d_lo, d_hi >= 0 and their projection."""

    def __init__(
        self,
        theta0: Mapping[str, Tensor],
        config: SearchSection,
        outer: Box | None,
        frozen: Mapping[str, Tensor] | None,
    ) -> None:
        init = config.init_width / 2
        self.theta0 = dict(theta0)
        self.d_lo = {n: torch.full_like(t, init).requires_grad_(True) for n, t in theta0.items()}
        self.d_hi = {n: torch.full_like(t, init).requires_grad_(True) for n, t in theta0.items()}
        self.max_width = config.max_width
        self.cap_lo: dict[str, Tensor] = {}
        self.cap_hi: dict[str, Tensor] = {}
        for n, t in theta0.items():
            cap_lo = torch.full_like(t, float("inf"))
            cap_hi = torch.full_like(t, float("inf"))
            if outer is not None and n in outer.lower:
                cap_lo = down_float32(t.double() - outer.lower[n].to(t.device).double())
                cap_hi = down_float32(outer.upper[n].to(t.device).double() - t.double())
            if frozen is not None and n in frozen:
                mask = frozen[n].to(t.device)
                cap_lo = torch.where(mask, torch.zeros_like(t), cap_lo)
                cap_hi = torch.where(mask, torch.zeros_like(t), cap_hi)
            self.cap_lo[n], self.cap_hi[n] = cap_lo, cap_hi
        self.project()

    def variables(self) -> list[Tensor]:
        return list(self.d_lo.values()) + list(self.d_hi.values())

    @torch.no_grad()
    def project(self) -> None:
        for n in self.d_lo:
            lo, hi = self.d_lo[n], self.d_hi[n]
            lo.clamp_(min=0).copy_(torch.minimum(lo, self.cap_lo[n]))
            hi.clamp_(min=0).copy_(torch.minimum(hi, self.cap_hi[n]))
            if self.max_width is not None:
                total = lo + hi
                factor = torch.where(
                    total > self.max_width, self.max_width / total.clamp(min=1e-30), 1.0
                )
                lo.mul_(factor)
                hi.mul_(factor)

    def corners(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        lower = {n: self.theta0[n] - self.d_lo[n] for n in self.d_lo}
        upper = {n: self.theta0[n] + self.d_hi[n] for n in self.d_hi}
        return lower, upper

    def size(self, kind: str, free: Tensor) -> Tensor:
        """The search's size S: `free` is the number of entries that may widen."""
        if kind == "layer_log_width":
            return self._layer_log_width()
        widths = torch.cat([(self.d_lo[n] + self.d_hi[n]).flatten() for n in self.d_lo])
        if kind == "mean_width":
            return widths.sum() / free.clamp(min=1)
        return (torch.log(widths + 1e-12) * (widths > 0)).sum() / free.clamp(min=1)

    def _layer_log_width(self) -> Tensor:
        """Mean over tensors with a free entry of the mean log-width over their free entries."""
        terms = []
        for n in self.d_lo:
            width = self.d_lo[n] + self.d_hi[n]
            free = (self.cap_lo[n] + self.cap_hi[n] > 0).to(width.dtype)
            count = free.sum()
            if float(count) > 0:
                terms.append((torch.log(width + 1e-12) * free).sum() / count)
        if not terms:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack(terms).mean()

    @torch.no_grad()
    def box(self) -> Box:
        lower = {n: self.theta0[n].double() - self.d_lo[n].double() for n in self.d_lo}
        upper = {n: self.theta0[n].double() + self.d_hi[n].double() for n in self.d_hi}
        return inward_float32(Box(lower, upper))


def _soft_and_hard(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    task: SearchTask,
    idx: Tensor,
    config: SearchSection,
    iteration: int,
) -> tuple[Tensor, float]:
    xb, yb = task.x[idx], task.y[idx]
    linear = uses_linear(config, iteration)
    plan = search_plan(graph, samples=xb.shape[0], linear=linear, options=config.linear)

    def bounds_of(
        low: Mapping[str, Tensor], up: Mapping[str, Tensor], x: Tensor, y: Tensor
    ) -> MarginBounds:
        if config.bound == "midrad":
            return margin_bounds(graph, low, up, x, y, rule="midrad")
        return guide_bounds(
            graph, low, up, x, y, linear=linear, options=config.linear, max_rows=plan.rows
        )

    if plan.samples < xb.shape[0]:  # issue 21: the batch does not fit one pass's budget
        soft, certified = chunked_soft_metric(
            bounds_of,
            lower,
            upper,
            xb,
            yb,
            metric=task.metric,
            temperature=config.temperature,
            chunk=plan.samples,
        )
        return soft, empirical_metric(certified, yb, task.metric)
    bounds = bounds_of(lower, upper, xb, yb)
    soft = soft_metric(bounds.lower, yb, task.metric, config.temperature)
    return soft, empirical_metric(bounds.certified(), yb, task.metric)


def uses_linear(config: SearchSection, iteration: int) -> bool:
    """Whether iteration (from 1) of a search bounds linearly: after `linear.warm_start`
    interval iterations, every `linear.every`-th one."""
    if config.bound != "linear" or iteration <= config.linear.warm_start:
        return False
    return (iteration - config.linear.warm_start - 1) % config.linear.every == 0


def search_lid(
    graph: Graph,
    tasks: Sequence[SearchTask],
    config: SearchSection,
    *,
    names: Sequence[str],
    outer: Box | None = None,
    frozen: Mapping[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    on_step: Callable[[SearchStep], None] | None = None,
    on_reshape: Callable[[int, float], None] | None = None,
) -> SearchResult:
    """Search a large box around the graph's weights that meets every task's target.

    Args:
        graph: the network; its parameters are θ0.
        tasks: constraints with their optimisation samples (never the held-out part).
        config: search settings.
        names: the boxed parameters (the rest stay fixed).
        outer: the box must lie inside this one (task sequences).
        frozen: per-parameter masks of entries kept at width 0.
        device: where the search runs.
        generator: randomness of the mini-batches (default: seeded from config.seed).
        on_step: progress callback.
        on_reshape: called with (round, size of its box) after each reshaping round.

    Returns:
        The chosen box (feasible on the optimisation part unless even θ0 is not), its hard
        metrics, the checkpoints and the per-iteration history.
    """
    gen = generator or torch.Generator().manual_seed(config.seed)
    theta0 = {n: graph.parameters[n].to(device=device, dtype=torch.float32) for n in names}
    tasks = tasks_on(tasks, device)
    widths = _Widths(theta0, config, outer, frozen)
    p = sum(t.numel() for t in theta0.values())
    free = torch.tensor(
        float(sum(int((widths.cap_lo[n] + widths.cap_hi[n] > 0).sum()) for n in theta0))
    )
    optimiser = torch.optim.Adam(widths.variables(), lr=config.lr / max(p, 1))
    dual = DualState.start(len(tasks), config)
    history: list[SearchStep] = []
    checkpoints: list[Checkpoint] = []
    for it in range(1, config.iterations + 1):
        lower, upper = widths.corners()
        softs, hards = [], []
        for task in tasks:
            n = task.x.shape[0]
            idx = torch.randperm(n, generator=gen)[: config.batch_size].to(device)
            soft, hard = _soft_and_hard(graph, lower, upper, task, idx, config, it)
            softs.append(soft)
            hards.append(hard)
        loss = -widths.size(config.size, free) + dual.lagrangian(tasks, softs)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimiser.param_groups:
            group["lr"] = config.lr / max(p, 1) * dual.lr_scale
        optimiser.step()
        widths.project()
        dual.update(tasks, hards, config)
        with torch.no_grad():
            mean_width = float(widths.size("mean_width", torch.tensor(float(p))))
            size = float(widths.size(config.size, free))
        step = SearchStep(
            it,
            mean_width,
            size,
            tuple(float(v.detach()) for v in softs),
            tuple(hards),
            tuple(dual.lam),
            dual.lr_scale,
        )
        history.append(step)
        if on_step is not None:
            on_step(step)
        if it % config.checkpoint_every == 0 or it == config.iterations:
            box = widths.box()
            hard_guide = hard_metrics(graph, box, tasks, proof=False, method=proof_method(config))
            checkpoints.append(Checkpoint(it, box, hard_guide, mean_width))
    result = _choose(graph, theta0, widths.box(), checkpoints, tasks, config, history)
    if config.reshape.rounds == 0 or not result.feasible:
        return result
    reshaped = reshape_box(
        graph,
        result.box,
        theta0,
        tasks,
        config,
        cap_lo=widths.cap_lo,
        cap_hi=widths.cap_hi,
        on_round=on_reshape,
    )
    if reshaped is None:
        return replace(result, chosen=f"{result.chosen}; reshaping found no larger box")
    box, proved, round_ = reshaped
    chosen = f"{result.chosen}, reshaped (round {round_} of {config.reshape.rounds})"
    return replace(result, box=box, hard=proved, chosen=chosen)


def _choose(
    graph: Graph,
    theta0: Mapping[str, Tensor],
    final: Box,
    checkpoints: list[Checkpoint],
    tasks: Sequence[SearchTask],
    config: SearchSection,
    history: list[SearchStep],
) -> SearchResult:
    """The widest candidate proved feasible in float64: a checkpoint or the shrunk final box.

    Checkpoint metrics are the float32 guide; a checkpoint is only chosen after its float64
    proof meets every target.
    """

    def meets(hard: Sequence[float]) -> bool:
        return meets_targets(hard, tasks)

    method = proof_method(config)
    if not config.shrink:
        hard = hard_metrics(graph, final, tasks, method=method)
        return SearchResult(final, hard, meets(hard), "final box (no shrink)", checkpoints, history)
    shrunk, shrunk_hard, factor = shrink_to_feasible(graph, final, theta0, tasks, method=method)
    shrunk_size = shrunk.size(config.size)
    guided = sorted(
        (c for c in checkpoints if meets(c.hard)), key=lambda c: -c.box.size(config.size)
    )
    for candidate in guided:
        if candidate.box.size(config.size) < shrunk_size:
            break
        proved = hard_metrics(graph, candidate.box, tasks, method=method)
        if meets(proved):
            return SearchResult(
                candidate.box,
                proved,
                True,
                f"checkpoint {candidate.iteration}",
                checkpoints,
                history,
            )
    chosen = "final box" if factor == 1.0 else f"final box shrunk by {factor:.4f}"
    return SearchResult(shrunk, shrunk_hard, meets(shrunk_hard), chosen, checkpoints, history)
