"""Primal-dual search for a large zonotope LID, then shrink-to-feasible.

The zonotope is T = {y + Σ_k ε_k G_k : θ0 - d_lo <= y <= θ0 + d_hi, ε ∈ [-1, 1]^k}, i.e.
θ0 + c + diag(r) δ + Gᵀ ε with c = (d_hi - d_lo) / 2 and r = (d_lo + d_hi) / 2. The variables
are (d_lo, d_hi, G); θ0 ∈ T always (ε = 0, y = θ0), and G = 0 is the box search's domain.

Two stages. (1) The box search of `verifier.search` (search.iterations steps, its own
shrink-to-feasible): a feasible box B. (2) The same scheme (paper, arXiv 2512.01899, §4) over
(d_lo, d_hi, G), starting from B plus the initial generators, with B's last dual variables and
penalties, and the zonotope bounds of `verifier.bounds.zonotope` in place of interval bounds:

* size S (maximised): with w = d_lo + d_hi, p the free entries and γ = generator_weight,
  `search.size` mean_width: S = (Σ_i w_i + 2 γ Σ_k ||G_k||) / p; mean_log_width:
  S = (Σ_i log w_i + γ Σ_k log(1 + 2 ||G_k|| / w_g)) / p, w_g the geometric mean width (each
  generator adds the log-volume its segment adds to a box of width w_g). ||.|| is Euclidean for
  `zonotope.size: isotropic_width`: then S (mean_width, γ = 1) is proportional to T's mean
  width, the extent of T averaged over uniformly random directions, i.e. the room T leaves for
  an update whose direction is not known, normalised to equal a box's mean width. A generator
  counts by its length, so it pays only along a direction that the data make cheap, which a box
  cannot follow. In high dimension k segments add little mean width, so generic generators
  change S little; `init: lookahead` points them where the next task wants to go, and γ > 1
  values that room more. `hull_width` uses the L1 norm (the interval hull's mean width; it
  rewards spreading mass, a much weaker notion of room);
* constraints g_i = τ'_i - SoftAcc_i(T) <= 0 on the zonotope margin bounds, augmented
  Lagrangian, dual ascent on hard violations, shared lr multiplier (as for boxes);
* projection after each step: d >= 0, frozen entries 0 (also in every generator), the interval
  hull inside the outer box and at most `max_width` wide (scaling the entry's d and G).

Every `checkpoint_every` steps of stage 2 the zonotope is a candidate, with its float64 hard
certified metric on the whole optimisation part; the final one is shrunk toward θ0
(θ0 + s (T - θ0), bisection on s) until feasible; B itself (G = 0) is a candidate. The largest
feasible candidate by S is returned (ties keep B), so the zonotope is never smaller than the
box it starts from. Zonotope bounds need not be inclusion-monotone in s, so the bisection
finds a feasible s, not necessarily the largest; every candidate is proved before it is
accepted.

Built zonotopes (`ZonotopeVariables.zonotope`) are float64, box corners rounded inward to float32
(as `verifier.search.inward_float32`), and keep a box width of at least 2^-19 times the
magnitude on entries that generators move, so `Zonotope.project` is exact in float32
(`Zonotope.representable`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from verifier.bounds.zonotope import check_supported, zonotope_margin_bounds
from verifier.certify import empirical_metric
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.graph import Graph
from verifier.search.box import search_lid
from verifier.search.dual import DualState, SearchTask, hard_metrics, meets_targets, tasks_on
from verifier.search.generators import (
    ZonotopeVariables,
    initial_generators,
)
from verifier.search.results import Checkpoint, SearchResult, SearchStep
from verifier.search.shrink import shrink_zonotope_to_feasible
from verifier.search.surrogate import soft_metric
from verifier.spec import SearchSection, ZonotopeSection


@dataclass(frozen=True, eq=False)
class ZonotopeCheckpoint:
    """A candidate zonotope LID with its float64 hard metric per task (optimisation part)."""

    iteration: int
    zonotope: Zonotope
    hard: tuple[float, ...]
    size: float


@dataclass(frozen=True, eq=False)
class ZonotopeSearchResult:
    """The chosen zonotope LID and how it was chosen."""

    zonotope: Zonotope
    hard: tuple[float, ...]
    feasible: bool
    chosen: str
    checkpoints: list[ZonotopeCheckpoint] = field(default_factory=list)
    history: list[SearchStep] = field(default_factory=list)
    size: float = float("nan")
    box_size: float = float("nan")
    """S of the chosen zonotope and of the box the second stage started from."""

    def as_search_result(self) -> SearchResult:
        """The same run described by interval hulls, for reports written for box LIDs.

        The hulls are supersets of the LID: use them for size statistics only, never to
        project or to claim membership.
        """
        checkpoints = [
            Checkpoint(c.iteration, c.zonotope.interval_hull(), c.hard, c.zonotope.size())
            for c in self.checkpoints
        ]
        return SearchResult(
            self.zonotope.interval_hull(),
            self.hard,
            self.feasible,
            self.chosen,
            checkpoints,
            self.history,
        )


def _soft_and_hard(
    graph: Graph,
    variables: ZonotopeVariables,
    task: SearchTask,
    idx: Tensor,
    temperature: float,
) -> tuple[Tensor, float]:
    xb, yb = task.x[idx], task.y[idx]
    lower, upper = variables.corners()
    bounds = zonotope_margin_bounds(graph, lower, upper, variables.gens, xb, yb)
    soft = soft_metric(bounds.lower, yb, task.metric, temperature)
    return soft, empirical_metric(bounds.certified(), yb, task.metric)


def search_zonotope_lid(
    graph: Graph,
    tasks: Sequence[SearchTask],
    search: SearchSection,
    config: ZonotopeSection,
    *,
    names: Sequence[str],
    outer: Box | None = None,
    frozen: Mapping[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    lookahead: tuple[Tensor, Tensor] | None = None,
    on_step: Callable[[SearchStep], None] | None = None,
) -> ZonotopeSearchResult:
    """Search a large zonotope around the graph's weights that meets every task's target.

    Two stages: the box search (`verifier.search.search_lid`, `search.iterations` steps), then
    `config.iterations` (default the same) primal-dual steps over (d_lo, d_hi, G) starting
    from that box (its last dual variables carried over) plus the initial generators. The
    box is a candidate too (the zonotope with G = 0), so the result is never smaller, in the
    size S, than the box it starts from.

    Args:
        graph: the network (Linear layers; see `verifier.bounds.zonotope`); its parameters
            are θ0.
        tasks: constraints with their optimisation samples (never the held-out part).
        search: the primal-dual settings (shared with the box search).
        config: the zonotope settings (k, initial generators, size weights).
        names: the parameters in the zonotope (the rest stay fixed).
        outer: the zonotope's interval hull must lie inside this box.
        frozen: per-parameter masks of entries kept at θ0.
        device: where the search runs.
        generator: randomness of the initial generators and mini-batches (default: seeded
            from search.seed).
        lookahead: the next task's samples (x, y), for `config.init == "lookahead"`.
        on_step: progress callback, called for the steps of both stages (numbered on);
            `mean_width` is the interval hull's, `size` the stage's own size.

    Returns:
        The chosen zonotope (feasible on the optimisation part unless even θ0 is not), its
        hard metrics, the checkpoints of the second stage and the history of both.

    Raises:
        GraphError: the graph has layers the zonotope bounds do not support (Conv, Pool).
        SpecError: init is "lookahead" without look-ahead data.
    """
    check_supported(graph)
    gen = generator or torch.Generator().manual_seed(search.seed)
    initial = initial_generators(graph, names, config, tasks, generator=gen, lookahead=lookahead)
    boxed = search_lid(
        graph,
        tasks,
        search,
        names=names,
        outer=outer,
        frozen=frozen,
        device=device,
        generator=gen,
        on_step=on_step,
    )
    theta0 = {n: graph.parameters[n].to(device=device, dtype=torch.float32) for n in names}
    tasks = tasks_on(tasks, device)
    variables = ZonotopeVariables(
        theta0,
        search,
        config,
        {n: g.to(device) for n, g in initial.items()},
        outer,
        frozen,
        start=boxed.box,
    )
    start_zonotope = Zonotope.from_box(
        boxed.box,
        {n: torch.zeros((config.k, *t.shape), dtype=torch.float64) for n, t in theta0.items()},
    )
    p = sum(t.numel() for t in theta0.values())
    base_lr = search.lr / max(p, 1)
    optimiser = torch.optim.Adam(
        [
            {"params": variables.box_variables(), "lr": base_lr},
            {"params": variables.generator_variables(), "lr": base_lr * config.generator_lr},
        ]
    )
    multipliers = [1.0, config.generator_lr]
    history = list(boxed.history)
    dual = DualState(
        list(history[-1].lam) if history else [0.0 for _ in tasks],
        [
            search.penalty
            * search.penalty_growth ** sum(1 for step in history if step.hard[i] < task.target)
            for i, task in enumerate(tasks)
        ],
    )
    offset = len(history)
    checkpoints: list[ZonotopeCheckpoint] = []
    iterations = search.iterations if config.iterations is None else config.iterations
    for it in range(1, iterations + 1):
        softs, hards = [], []
        for task in tasks:
            idx = torch.randperm(task.x.shape[0], generator=gen)[: search.batch_size].to(device)
            soft, hard = _soft_and_hard(graph, variables, task, idx, search.temperature)
            softs.append(soft)
            hards.append(hard)
        loss = -variables.size() + dual.lagrangian(tasks, softs)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for group, multiplier in zip(optimiser.param_groups, multipliers, strict=True):
            group["lr"] = base_lr * multiplier * dual.lr_scale
        optimiser.step()
        variables.project()
        dual.update(tasks, hards, search)
        with torch.no_grad():
            size = float(variables.size())
        step = SearchStep(
            offset + it,
            variables.hull_mean_width(),
            size,
            tuple(float(v.detach()) for v in softs),
            tuple(hards),
            tuple(dual.lam),
            dual.lr_scale,
        )
        history.append(step)
        if on_step is not None:
            on_step(step)
        if it % search.checkpoint_every == 0 or it == iterations:
            candidate = variables.zonotope()
            hard_ck = hard_metrics(graph, candidate, tasks)
            size_ck = variables.measure(candidate)
            checkpoints.append(ZonotopeCheckpoint(offset + it, candidate, hard_ck, size_ck))
    start = ZonotopeCheckpoint(
        offset, start_zonotope, boxed.hard, variables.measure(start_zonotope)
    )
    return _choose(graph, variables, start, boxed.feasible, checkpoints, tasks, search, history)


def _choose(
    graph: Graph,
    variables: ZonotopeVariables,
    start: ZonotopeCheckpoint,
    start_feasible: bool,
    checkpoints: list[ZonotopeCheckpoint],
    tasks: Sequence[SearchTask],
    search: SearchSection,
    history: list[SearchStep],
) -> ZonotopeSearchResult:
    if not search.shrink:
        final = variables.zonotope()
        hard = checkpoints[-1].hard if checkpoints else hard_metrics(graph, final, tasks)
        return ZonotopeSearchResult(
            final,
            hard,
            meets_targets(hard, tasks),
            "final zonotope (no shrink)",
            checkpoints,
            history,
            variables.measure(final),
            start.size,
        )
    shrunk, shrunk_hard, factor = shrink_zonotope_to_feasible(graph, variables, tasks)
    label = "final zonotope" if factor == 1.0 else f"final zonotope shrunk by {factor:.4f}"
    candidates = [
        (f"checkpoint {c.iteration}", c) for c in checkpoints if meets_targets(c.hard, tasks)
    ]
    final_ck = ZonotopeCheckpoint(-1, shrunk, shrunk_hard, variables.measure(shrunk))
    if meets_targets(shrunk_hard, tasks):
        candidates.append((label, final_ck))
    # the box it starts from comes first, so ties keep the box
    if start_feasible:
        candidates.insert(0, ("the box search's result (k = 0)", start))
    if not candidates:
        return ZonotopeSearchResult(
            shrunk, shrunk_hard, False, label, checkpoints, history, final_ck.size, start.size
        )
    chosen, best = max(candidates, key=lambda item: item[1].size)
    return ZonotopeSearchResult(
        best.zonotope, best.hard, True, chosen, checkpoints, history, best.size, start.size
    )
