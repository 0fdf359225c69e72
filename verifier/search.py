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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from verifier.bounds.ibp import margin_bounds
from verifier.bounds.intervals import Rule
from verifier.certify import Metric, certify_samples, empirical_metric
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.graph import Graph
from verifier.spec import SearchSection

SHRINK_STEPS = 14
SHRINK_STEPS_PROOF = 8
LR_SCALE_RANGE = (1e-1, 1e2)
LR_SLOW, LR_FAST = 0.98, 1.02


@dataclass(frozen=True, eq=False)
class SearchTask:
    """One constraint as the search sees it: the target τ', the samples whose bounds drive the
    gradient (x, y) and the validation samples (x_val, y_val) that, together with them, decide
    which candidate is feasible. Both are parts of the optimisation data, never held-out data.
    """

    name: str
    metric: Metric
    target: float
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor


@dataclass(frozen=True)
class SearchStep:
    """What one iteration did; handed to `on_step` and written to history.jsonl."""

    iteration: int
    mean_width: float
    size: float
    soft: tuple[float, ...]
    hard: tuple[float, ...]
    lam: tuple[float, ...]
    lr_scale: float


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A candidate LID with its hard certified metric per task on the optimisation part,
    from the float32 guide (`hard_metrics(proof=False)`); proved in float64 before use."""

    iteration: int
    box: Box
    hard: tuple[float, ...]
    mean_width: float


@dataclass(frozen=True, eq=False)
class SearchResult:
    """The chosen LID and how it was chosen."""

    box: Box
    hard: tuple[float, ...]
    feasible: bool
    chosen: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    history: list[SearchStep] = field(default_factory=list)


def inward_float32(box: Box) -> Box:
    """Round corners to float32 toward the inside of the box (a subset: still sound).

    The corners are returned as float64 tensors holding float32-representable values.
    """
    lower, upper = {}, {}
    for name, lo in box.lower.items():
        lo64, up64 = lo.to(torch.float64), box.upper[name].to(torch.float64)
        lo32, up32 = lo64.to(torch.float32), up64.to(torch.float32)
        inf = torch.tensor(float("inf"), dtype=torch.float32, device=lo32.device)
        lo32 = torch.where(lo32.to(torch.float64) < lo64, torch.nextafter(lo32, inf), lo32)
        up32 = torch.where(up32.to(torch.float64) > up64, torch.nextafter(up32, -inf), up32)
        lower[name], upper[name] = lo32.to(torch.float64), up32.to(torch.float64)
    return Box(lower, upper)


def hard_metrics(
    graph: Graph,
    domain: Box | Zonotope,
    tasks: Sequence[SearchTask],
    *,
    chunk_size: int = 512,
    proof: bool = True,
) -> tuple[float, ...]:
    """Hard certified metric of each task: the smaller of its value on the gradient samples
    and on the validation samples (a candidate is feasible only if both meet τ').

    With `proof=True` (the default) every sample is proved in float64 with its rounding
    allowance. `proof=False` is a float32 guide without allowance for boxes, used only to
    steer the choice of candidates; whatever the search returns is re-checked with
    `proof=True`. Zonotopes are always proved.
    """
    out = []
    for task in tasks:
        values = []
        for x, y in ((task.x, task.y), (task.x_val, task.y_val)):
            if x.shape[0] == 0:
                continue
            if proof or not isinstance(domain, Box):
                mask, _ = certify_samples(graph, domain, x, y, chunk_size=chunk_size)
            else:
                mask = _guide_mask(graph, domain, x, y, chunk_size=chunk_size)
            values.append(empirical_metric(mask, y.to(mask.device), task.metric))
        out.append(min(values))
    return tuple(out)


def _guide_mask(graph: Graph, box: Box, x: Tensor, y: Tensor, *, chunk_size: int) -> Tensor:
    """Float32 certified mask (no rounding allowance): a fast, unproved guide."""
    box32 = box.to(torch.float32, x.device)
    with torch.no_grad():
        masks = [
            margin_bounds(
                graph,
                box32.lower,
                box32.upper,
                x[i : i + chunk_size].to(torch.float32),
                y[i : i + chunk_size].to(x.device),
            ).certified()
            for i in range(0, x.shape[0], chunk_size)
        ]
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=x.device)


def meets_targets(hard: Sequence[float], tasks: Sequence[SearchTask]) -> bool:
    """Whether every task's hard metric reaches its target τ'."""
    return all(h >= t.target for h, t in zip(hard, tasks, strict=True))


def tasks_on(tasks: Sequence[SearchTask], device: str | torch.device) -> list[SearchTask]:
    """The tasks with their samples on `device` (inputs as float32)."""
    return [
        SearchTask(
            t.name,
            t.metric,
            t.target,
            t.x.to(device, torch.float32),
            t.y.to(device),
            t.x_val.to(device, torch.float32),
            t.y_val.to(device),
        )
        for t in tasks
    ]


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


@dataclass
class DualState:
    """The augmented Lagrangian's dual variables λ_i, penalties ρ_i and the shared lr
    multiplier (module docstring)."""

    lam: list[float]
    rho: list[float]
    lr_scale: float = 1.0

    @classmethod
    def start(cls, n_tasks: int, config: SearchSection) -> DualState:
        return cls([0.0] * n_tasks, [config.penalty] * n_tasks)

    def lagrangian(self, tasks: Sequence[SearchTask], softs: Sequence[Tensor]) -> Tensor:
        """Σ_i λ_i g_i + (ρ_i / 2) [g_i]_+^2 with g_i = τ'_i - SoftMetric_i."""
        total = torch.zeros((), dtype=softs[0].dtype, device=softs[0].device)
        for i, (task, soft) in enumerate(zip(tasks, softs, strict=True)):
            g = task.target - soft
            total = total + self.lam[i] * g + self.rho[i] / 2 * torch.relu(g) ** 2
        return total

    def update(
        self, tasks: Sequence[SearchTask], hards: Sequence[float], config: SearchSection
    ) -> None:
        """Dual ascent on the hard violations, penalty growth, and the lr multiplier."""
        violated = False
        for i, task in enumerate(tasks):
            violation = task.target - hards[i]
            self.lam[i] = max(0.0, self.lam[i] + config.dual_lr * violation)
            if violation > 0:
                self.rho[i] *= config.penalty_growth
                violated = True
        scale = self.lr_scale * (LR_SLOW if violated else LR_FAST)
        self.lr_scale = min(max(scale, LR_SCALE_RANGE[0]), LR_SCALE_RANGE[1])


def fisher_importance(
    graph: Graph, names: Sequence[str], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher information E[(∂ log p(y|x) / ∂θ)^2] of the named parameters."""
    from torch.func import grad, vmap

    params = {n: graph.parameters[n].to(x.device) for n in names}

    def log_prob(theta: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = graph.forward(xi.unsqueeze(0), theta)
        return torch.log_softmax(logits, dim=1)[0].gather(0, yi.reshape(1))[0]

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, x.shape[0], 128):
        grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(
            params, x[start : start + 128], y[start : start + 128]
        )
        for n in names:
            total[n] += grads[n].pow(2).sum(0)
    return {n: t / max(x.shape[0], 1) for n, t in total.items()}


SI_BATCH, SI_LR, SI_XI = 64, 1e-3, 1e-3


def si_importance(
    graph: Graph,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Synaptic-Intelligence importance (Zenke et al., ICML 2017, Eq. 5) from given data.

    Trains a copy of the named parameters for one epoch over (x, y) (Adam, lr 1e-3, batch
    64; the rest fixed), accumulating the path integral ω = Σ_t -g(t) Δθ(t) of each entry's
    contribution to the drop in loss, and returns Ω = max(ω, 0) / (Δ² + ξ), ξ = 1e-3, with Δ
    the entry's total change. The graph itself is not modified.
    """
    theta = {n: graph.parameters[n].to(x.device).clone().requires_grad_(True) for n in names}
    start = {n: t.detach().clone() for n, t in theta.items()}
    omega = {n: torch.zeros_like(t) for n, t in theta.items()}
    optimiser = torch.optim.Adam(list(theta.values()), lr=SI_LR)
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    for i in range(0, x.shape[0], SI_BATCH):
        idx = order[i : i + SI_BATCH]
        before = {n: t.detach().clone() for n, t in theta.items()}
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(graph.forward(x[idx], theta), y[idx])
        loss.backward()
        grads = {n: t.grad.detach().clone() for n, t in theta.items() if t.grad is not None}
        optimiser.step()
        for n, t in theta.items():
            if n in grads:
                omega[n] -= grads[n] * (t.detach() - before[n])
    return {
        n: omega[n].clamp(min=0) / ((theta[n].detach() - start[n]).pow(2) + SI_XI) for n in names
    }


def frozen_by_importance(importance: Mapping[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Masks (True = frozen) of the `fraction` of entries with the lowest importance."""
    flat = torch.cat([v.flatten() for v in importance.values()])
    n_freeze = int(fraction * flat.numel())
    if n_freeze == 0:
        return {n: torch.zeros_like(v, dtype=torch.bool) for n, v in importance.items()}
    threshold = torch.kthvalue(flat, n_freeze).values
    return {n: v <= threshold for n, v in importance.items()}


def _down_float32(value: Tensor) -> Tensor:
    """max(value, 0) as float32, rounded toward zero (a cap never exceeds the true room)."""
    value = value.clamp(min=0)
    down = value.float()
    zero = torch.zeros((), dtype=torch.float32, device=down.device)
    return torch.where(down.double() > value, torch.nextafter(down, zero), down)


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
                cap_lo = _down_float32(t.double() - outer.lower[n].to(t.device).double())
                cap_hi = _down_float32(outer.upper[n].to(t.device).double() - t.double())
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
        widths = torch.cat([(self.d_lo[n] + self.d_hi[n]).flatten() for n in self.d_lo])
        if kind == "mean_width":
            return widths.sum() / free.clamp(min=1)
        return (torch.log(widths + 1e-12) * (widths > 0)).sum() / free.clamp(min=1)

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
) -> tuple[Tensor, float]:
    xb, yb = task.x[idx], task.y[idx]
    rule: Rule = "midrad" if config.bound == "midrad" else "exact"
    bounds = margin_bounds(graph, lower, upper, xb, yb, rule=rule)
    soft = soft_metric(bounds.lower, yb, task.metric, config.temperature)
    return soft, empirical_metric(bounds.certified(), yb, task.metric)


def _scale_box(box: Box, theta0: Mapping[str, Tensor], factor: float) -> Box:
    return inward_float32(box.scaled({n: t.double() for n, t in theta0.items()}, factor))


def shrink_to_feasible(
    graph: Graph,
    box: Box,
    theta0: Mapping[str, Tensor],
    tasks: Sequence[SearchTask],
) -> tuple[Box, tuple[float, ...], float]:
    """Largest scale s in [0, 1] (bisection) such that θ0 + s (T - θ0) meets every target.

    Inclusion-isotone bounds make certification monotone in s, so bisection is valid. The
    bisection runs on the float32 guide (fast); the scale it finds is then proved in float64,
    and if the proof falls short a float64 bisection continues below it, so the returned box
    always meets the targets in float64 (or is the point box θ0 when even θ0 fails).

    Returns:
        (box, its float64 hard metrics, s).
    """

    def meets(hard: Sequence[float]) -> bool:
        return meets_targets(hard, tasks)

    def bisect(lo: float, hi: float, steps: int, proof: bool) -> float:
        for _ in range(steps):
            mid = (lo + hi) / 2
            candidate = _scale_box(box, theta0, mid)
            if meets(hard_metrics(graph, candidate, tasks, proof=proof)):
                lo = mid
            else:
                hi = mid
        return lo

    scale = 1.0
    if not meets(hard_metrics(graph, box, tasks, proof=False)):
        scale = bisect(0.0, 1.0, SHRINK_STEPS, proof=False)
    candidate = _scale_box(box, theta0, scale)
    hard = hard_metrics(graph, candidate, tasks)
    if meets(hard) or scale == 0.0:
        return candidate, hard, scale
    scale = bisect(0.0, scale, SHRINK_STEPS_PROOF, proof=True)
    candidate = _scale_box(box, theta0, scale)
    return candidate, hard_metrics(graph, candidate, tasks), scale


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
            soft, hard = _soft_and_hard(graph, lower, upper, task, idx, config)
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
            hard_guide = hard_metrics(graph, box, tasks, proof=False)
            checkpoints.append(Checkpoint(it, box, hard_guide, mean_width))
    return _choose(graph, theta0, widths.box(), checkpoints, tasks, config, history)


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

    if not config.shrink:
        hard = hard_metrics(graph, final, tasks)
        return SearchResult(final, hard, meets(hard), "final box (no shrink)", checkpoints, history)
    shrunk, shrunk_hard, factor = shrink_to_feasible(graph, final, theta0, tasks)
    shrunk_size = shrunk.size(config.size)
    guided = sorted(
        (c for c in checkpoints if meets(c.hard)), key=lambda c: -c.box.size(config.size)
    )
    for candidate in guided:
        if candidate.box.size(config.size) < shrunk_size:
            break
        proved = hard_metrics(graph, candidate.box, tasks)
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
