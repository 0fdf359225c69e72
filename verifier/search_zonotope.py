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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from verifier.bounds.zonotope import check_supported, zonotope_margin_bounds
from verifier.certify import empirical_metric
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.errors import SpecError
from verifier.graph import Graph
from verifier.search import (
    SHRINK_STEPS,
    Checkpoint,
    DualState,
    SearchResult,
    SearchStep,
    SearchTask,
    fisher_importance,
    hard_metrics,
    inward_float32,
    meets_targets,
    search_lid,
    soft_metric,
    tasks_on,
)
from verifier.spec import SearchSection, ZonotopeSection

BUILD_FLOOR = 2.0**-19
"""Box width kept on entries that generators move, relative to |θ0| + d + Σ|G| (twice
`verifier.domains.zonotope.WIDTH_FLOOR`, so inward float32 rounding keeps it above that)."""


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


class ZonotopeVariables:
    """The search variables d_lo, d_hi >= 0 (box part) and G (k, *shape), and their projection."""

    def __init__(
        self,
        theta0: Mapping[str, Tensor],
        search: SearchSection,
        config: ZonotopeSection,
        initial: Mapping[str, Tensor],
        outer: Box | None,
        frozen: Mapping[str, Tensor] | None,
        start: Box | None = None,
    ) -> None:
        """Start at `start` (default: the box of width `search.init_width`) plus `initial`.

        Args:
            theta0: the parameters' values (float32), keyed by name.
            search: the search settings (init_width, max_width, size).
            config: the zonotope settings.
            initial: initial generators, (k, *shape) per name.
            outer: the interval hull must stay inside this box.
            frozen: masks of entries kept at θ0 (zero width, zero in every generator).
            start: the box part to start from (it must contain θ0).
        """
        half = search.init_width / 2
        self.theta0 = dict(theta0)
        self.config = config
        self.size_kind = search.size
        self.max_width = search.max_width
        if start is None:
            self.d_lo = {n: torch.full_like(t, half) for n, t in theta0.items()}
            self.d_hi = {n: torch.full_like(t, half) for n, t in theta0.items()}
        else:
            self.d_lo = {n: (t - start.lower[n].to(t)).clamp(min=0) for n, t in theta0.items()}
            self.d_hi = {n: (start.upper[n].to(t) - t).clamp(min=0) for n, t in theta0.items()}
        for t in [*self.d_lo.values(), *self.d_hi.values()]:
            t.requires_grad_(True)
        self.gens = {n: initial[n].clone().to(t).requires_grad_(True) for n, t in theta0.items()}
        self.cap_lo: dict[str, Tensor] = {}
        self.cap_hi: dict[str, Tensor] = {}
        self.free: dict[str, Tensor] = {}
        for n, t in theta0.items():
            cap_lo = torch.full_like(t, math.inf)
            cap_hi = torch.full_like(t, math.inf)
            if outer is not None and n in outer.lower:
                t64 = t.double()
                cap_lo = (t64 - outer.lower[n].to(t.device).double()).clamp(min=0).to(t.dtype)
                cap_hi = (outer.upper[n].to(t.device).double() - t64).clamp(min=0).to(t.dtype)
            free = torch.ones_like(t, dtype=torch.bool)
            if frozen is not None and n in frozen:
                free = ~frozen[n].to(t.device)
            cap_lo = torch.where(free, cap_lo, torch.zeros_like(t))
            cap_hi = torch.where(free, cap_hi, torch.zeros_like(t))
            self.cap_lo[n], self.cap_hi[n], self.free[n] = cap_lo, cap_hi, free
        self.n_free = sum(int(((self.cap_lo[n] + self.cap_hi[n]) > 0).sum()) for n in theta0)
        self.project()

    def box_variables(self) -> list[Tensor]:
        """d_lo and d_hi tensors (for the optimiser)."""
        return list(self.d_lo.values()) + list(self.d_hi.values())

    def generator_variables(self) -> list[Tensor]:
        """The generator tensors (for the optimiser)."""
        return list(self.gens.values())

    @torch.no_grad()
    def project(self) -> None:
        """d >= 0, frozen entries 0, hull inside the outer box and at most max_width wide."""
        for n in self.d_lo:
            lo, hi, g = self.d_lo[n], self.d_hi[n], self.gens[n]
            g.mul_(self.free[n])
            lo.clamp_(min=0)
            hi.clamp_(min=0)
            mass = g.abs().sum(dim=0)
            factor = torch.ones_like(lo)
            for cap, d in ((self.cap_lo[n], lo), (self.cap_hi[n], hi)):
                extent = d + mass
                factor = torch.minimum(
                    factor, torch.where(extent > cap, cap / extent.clamp(min=1e-30), 1.0)
                )
            if self.max_width is not None:
                total = lo + hi + 2 * mass
                factor = torch.minimum(
                    factor,
                    torch.where(
                        total > self.max_width, self.max_width / total.clamp(min=1e-30), 1.0
                    ),
                )
            lo.mul_(factor)
            hi.mul_(factor)
            g.mul_(factor)

    def corners(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Box-part corners θ0 - d_lo, θ0 + d_hi (differentiable)."""
        lower = {n: self.theta0[n] - self.d_lo[n] for n in self.d_lo}
        upper = {n: self.theta0[n] + self.d_hi[n] for n in self.d_hi}
        return lower, upper

    def size(self) -> Tensor:
        """The size S being maximised (see the module docstring); differentiable."""
        k = self.config.k
        flat = torch.cat([g.reshape(k, math.prod(g.shape[1:])) for g in self.gens.values()], 1)
        widths = torch.cat([(self.d_lo[n] + self.d_hi[n]).flatten() for n in self.d_lo])
        return self._measure(widths, flat)

    def measure(self, zonotope: Zonotope) -> float:
        """S of a built zonotope (same formula as `size`, float64)."""
        k = zonotope.n_generators
        widths = torch.cat(
            [(zonotope.upper[n] - zonotope.lower[n]).flatten().cpu() for n in self.d_lo]
        )
        flat = torch.cat(
            [zonotope.generators[n].reshape(k, -1 if k else 0).cpu() for n in self.d_lo], 1
        )
        return float(self._measure(widths.double(), flat.double()))

    def _measure(self, widths: Tensor, generators: Tensor) -> Tensor:
        order = 2 if self.config.size == "isotropic_width" else 1
        norms = torch.linalg.vector_norm(generators, ord=order, dim=1)
        free = torch.cat([self.free[n].flatten() for n in self.free]).to(widths.device)
        return size_measure(
            widths, norms, free, self.n_free, self.size_kind, self.config.generator_weight
        )

    def hull_mean_width(self) -> float:
        """Mean width of the interval hull over all entries."""
        with torch.no_grad():
            total = sum(
                float((self.d_lo[n] + self.d_hi[n] + 2 * self.gens[n].abs().sum(0)).sum())
                for n in self.d_lo
            )
            count = sum(t.numel() for t in self.d_lo.values())
        return total / max(count, 1)

    @torch.no_grad()
    def zonotope(self, factor: float = 1.0) -> Zonotope:
        """The current zonotope (scaled toward θ0 by `factor`), float64, ready to certify."""
        return build_zonotope(
            self.theta0,
            {n: factor * t for n, t in self.d_lo.items()},
            {n: factor * t for n, t in self.d_hi.items()},
            {n: factor * t for n, t in self.gens.items()},
            self.cap_lo,
            self.cap_hi,
        )


def size_measure(
    widths: Tensor,
    norms: Tensor,
    free: Tensor,
    n_free: int,
    kind: str,
    weight: float,
) -> Tensor:
    """The zonotope search's size S (differentiable).

    mean_width: (Σ_free w_i + 2 γ Σ_k ||G_k||) / p. mean_log_width: (Σ_free log w_i +
    γ Σ_k log(1 + 2 ||G_k|| / w_g)) / p with w_g the geometric mean of the free widths: each
    generator adds the log-volume of a segment on a box of width w_g (0 for G_k = 0, so the
    box's own S is its mean log width).

    Args:
        widths: box-part widths, flat, shape (p_all,).
        norms: generator norms, shape (k,).
        free: boolean mask of the entries that may move, shape (p_all,).
        n_free: p, the number of free entries.
        kind: search.size ("mean_width" or "mean_log_width").
        weight: γ.
    """
    p = max(n_free, 1)
    mask = free.to(widths.dtype)
    if kind == "mean_width":
        return ((widths * mask).sum() + 2 * weight * norms.sum()) / p
    logs = torch.log(widths + 1e-12) * mask
    typical = torch.exp(logs.sum() / p)
    return (logs.sum() + weight * torch.log1p(2 * norms / typical).sum()) / p


def build_zonotope(
    theta0: Mapping[str, Tensor],
    d_lo: Mapping[str, Tensor],
    d_hi: Mapping[str, Tensor],
    generators: Mapping[str, Tensor],
    cap_lo: Mapping[str, Tensor],
    cap_hi: Mapping[str, Tensor],
) -> Zonotope:
    """A float64 zonotope from search variables: float32-inward corners, representable.

    Entries that generators move get a box width of at least BUILD_FLOOR times their magnitude
    (on both sides of θ0), unless the outer caps forbid it; there the generators' entries are
    dropped. (Any such change is harmless: every candidate is certified as built.)
    """
    lower, upper, gens = {}, {}, {}
    for n, t in theta0.items():
        t64 = t.detach().double()
        lo, hi = d_lo[n].detach().double(), d_hi[n].detach().double()
        g = generators[n].detach().double()
        mass = g.abs().sum(dim=0)
        floor = BUILD_FLOOR * (t64.abs() + lo + hi + mass)
        moved = mass > 0
        lo_f = torch.where(moved, torch.maximum(lo, floor), lo)
        hi_f = torch.where(moved, torch.maximum(hi, floor), hi)
        fits = (lo_f + mass <= cap_lo[n].double()) & (hi_f + mass <= cap_hi[n].double())
        keep = ~moved | fits
        lower[n] = t64 - torch.where(keep, lo_f, lo)
        upper[n] = t64 + torch.where(keep, hi_f, hi)
        gens[n] = g * keep
    box = inward_float32(Box(lower, upper))
    return Zonotope(dict(box.lower), dict(box.upper), gens)


def lookahead_directions(
    graph: Graph,
    names: Sequence[str],
    k: int,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 32,
    max_samples: int = 2048,
) -> dict[str, Tensor]:
    """The k principal directions of mini-batch loss gradients on (x, y), pointing downhill.

    Gradients of the mean cross-entropy at θ0 over batches of `batch_size` (at most
    `max_samples` samples) form the rows of M; the directions are M's top-k right singular
    vectors, each signed to descend the mean gradient; unit Euclidean norm, keyed by name
    with shape (k, *shape). Fewer batches than k leave the remaining directions zero.
    """
    theta = {n: graph.parameters[n].detach().float().clone().requires_grad_(True) for n in names}
    rows = []
    x, y = x[:max_samples].float(), y[:max_samples]
    for start in range(0, x.shape[0], batch_size):
        logits = graph.forward(x[start : start + batch_size], theta)
        loss = torch.nn.functional.cross_entropy(logits, y[start : start + batch_size])
        grads = torch.autograd.grad(loss, [theta[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    matrix = torch.stack(rows).double()
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    directions = torch.zeros((k, matrix.shape[1]), dtype=torch.float64)
    used = min(k, vh.shape[0])
    directions[:used] = vh[:used]
    signs = torch.sign(-(directions @ matrix.mean(dim=0)))
    directions = directions * torch.where(signs == 0, 1.0, signs)[:, None]
    out, offset = {}, 0
    for n in names:
        size = graph.parameters[n].numel()
        shape = graph.parameters[n].shape
        out[n] = directions[:, offset : offset + size].reshape(k, *shape).float()
        offset += size
    return out


def initial_generators(
    graph: Graph,
    names: Sequence[str],
    config: ZonotopeSection,
    tasks: Sequence[SearchTask],
    *,
    generator: torch.Generator,
    lookahead: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The starting generators, (k, *shape) float32 per name, with root-mean-square entry
    `config.init_scale` (see `ZonotopeSection.init`).

    Raises:
        SpecError: init is "lookahead" and no look-ahead data is given.
    """
    k = config.k
    raw = {
        n: torch.randn((k, *graph.parameters[n].shape), generator=generator, dtype=torch.float32)
        for n in names
    }
    if config.init == "fisher" and k > 0:
        x = torch.cat([t.x.cpu() for t in tasks])[:512].float()
        y = torch.cat([t.y.cpu() for t in tasks])[:512]
        fisher = fisher_importance(graph, names, x, y)
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
        raw = {n: raw[n] * (fisher[n].float() + mean + 1e-12).rsqrt() for n in names}
    if config.init == "lookahead" and k > 0:
        if lookahead is None:
            raise SpecError(
                "zonotope.init: lookahead needs the next task's data in search.importance.lookahead"
            )
        raw = lookahead_directions(graph, names, k, lookahead[0].cpu(), lookahead[1].cpu())
    flat = torch.cat([g.flatten() for g in raw.values()]) if raw else torch.zeros(0)
    rms = float(flat.pow(2).mean().sqrt()) if flat.numel() else 1.0
    scale = config.init_scale / max(rms, 1e-30)
    return {n: g * scale for n, g in raw.items()}


def shrink_zonotope_to_feasible(
    graph: Graph, variables: ZonotopeVariables, tasks: Sequence[SearchTask]
) -> tuple[Zonotope, tuple[float, ...], float]:
    """A scale s in [0, 1] (bisection) such that θ0 + s (T - θ0) meets every target.

    Returns:
        (zonotope, its hard metrics, s); s = 0 (the point θ0) when nothing else is feasible.
    """
    full = variables.zonotope(1.0)
    hard = hard_metrics(graph, full, tasks)
    if meets_targets(hard, tasks):
        return full, hard, 1.0
    lo, hi = 0.0, 1.0
    best = variables.zonotope(0.0)
    best_hard = hard_metrics(graph, best, tasks)
    for _ in range(SHRINK_STEPS):
        mid = (lo + hi) / 2
        candidate = variables.zonotope(mid)
        mid_hard = hard_metrics(graph, candidate, tasks)
        if meets_targets(mid_hard, tasks):
            lo, best, best_hard = mid, candidate, mid_hard
        else:
            hi = mid
    return best, best_hard, lo


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
