"""Continual learning with replay buffers and LIDs recomputed on them: the paper's buffer
protocol (arXiv 2512.01899, §5; DESIGN.md section 5, "Replay buffers"), certified on
held-out data.

Tasks 0..T-1; Δ = `LidConfig.tolerance`; buffers, sizes and chunks as `verifier.cl.buffers`.

1. Task 0 is trained plainly. When a task j finishes (weights θ_j), its accuracy acc_j on its
   search view (the training split, its validation part with ``search_data="validation"``,
   or with ``search_data="test"`` the optimisation part of its test split, as `build_lid`'s
   ``clean``) sets τ_j = acc_j - Δ, and its buffer's first chunks enter use.
2. Task i >= 1, round 0: the LID is recomputed from scratch (no outer box) around the current
   weights on the buffers in use of tasks 0..i-1, one constraint per task at τ_j
   (`recompute_lid`). Task i is trained (`train_replay`: a fresh Adam, the task's epochs) with
   `replay_batch` buffer samples in every batch, the weights clamped into the LID after
   every step.
3. Repeat rule: while task i's accuracy on its search view is below the scenario's target
   (`REPEAT_TARGETS`: Task-IL 0.85, Domain-IL 0.75, Class-IL 0.65) and fewer than
   `buffer.repeats` repeats (SMALL 1, MEDIUM 3, LARGE 7) were made, repeat: every previous
   task's buffer takes its next chunks, the LID is recomputed around the current weights on
   the grown buffers, and task i is trained again as in 2.
4. Loosening rule: when a repeat gained less than `min_gain` (0.025) on task i and another
   repeat follows, the previous task closest to its bound in the LID just used (the smallest
   proved rate on its buffer minus τ_j) gets τ_j - `loosen_by` (0.01) from then on
   (`loosen_targets`); its certificates are then held to the loosened τ_j.

Constraints of tasks that share their output rows (Domain-IL, Class-IL) are one search with one
constraint per task (`search_lid`). Task-IL tasks read different rows, so one search per row
set runs, each later one inside the box the earlier ones left (sound: every constraint holds on
the final box, a subset of the box its search proved). With ``boxed="head"`` these searches
touch disjoint head rows and are independent; with ``boxed="all"`` the shared body is searched
by the first and only narrowed by the later ones.

Certificates: stage t is the LID around θ_t on tasks 0..t. For t < T-1 it is the round-0 LID of
task t+1 (task t's constraint on its first buffer chunks); for the last task a final LID whose
last constraint uses the task's search view, up to `n_optimisation` samples (the task stores no
buffer). Each stage is certified (float64 IBP, Clopper-Pearson, `certify_lid`) on every task's
held-out data: the test split (``search_data="train"`` or ``"validation"``, `n_certify` of it
when set) or the certification part of `held_out_view` (``search_data="test"``), which neither
the buffers (training split), the searches, training nor the repeat rule see. θ_t is the
LID's centre, so `certified[t, j]` bounds θ_t's accuracy on task j (with probability >= 1 - β
each); the last row bounds the final network's.

Works with the Split-MNIST CNN (``boxed="head"``: the body is pinned, i.e. frozen after task 0;
``boxed="all"``) and the Split-CIFAR `LinearHead` (the whole network is the head).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

import torch
from torch import Tensor

from verifier.certify import required_rate
from verifier.cl.buffers import SMALL, BufferSize, buffer_order
from verifier.cl.head_certify import HeadInputs, head_features, head_graph
from verifier.cl.heads import (
    head_names,
    lift_box,
    restrict_box,
    restrict_graph,
)
from verifier.cl.lid_learner import (
    LidConfig,
    LidRun,
    LidStage,
    base_box,
    certify_lid,
    lid_proof_method,
    next_task_frozen,
    train_projected,
)
from verifier.cl.lid_views import lid_views
from verifier.cl.network import ContinualNetwork, network_graph
from verifier.cl.replay_fit import fit_to_views
from verifier.cl.replay_training import active_only, train_replay
from verifier.cl.scenarios import Scenario, SplitTask, masked_logits
from verifier.cl.training import (
    FirstTask,
    TrainConfig,
    TrainingData,
    accuracy_row,
    resume_first_task,
)
from verifier.domains.box import Box
from verifier.errors import InputError, SoundnessError
from verifier.search import SearchTask, search_lid

REPEAT_TARGETS: Final[dict[Scenario, float]] = {"task": 0.85, "domain": 0.75, "class": 0.65}
"""The accuracy on the current task below which the repeat rule repeats (the paper's)."""


@dataclass(frozen=True)
class ReplayConfig(LidConfig):
    """A LID learner's settings plus the buffer protocol (`LidConfig` for the search, Δ, β,
    ``boxed``, ``active_classes``, ``search_data`` and look-ahead: with ``lookahead`` q > 0
    every LID recomputed before or while task i trains freezes the q of its entries least
    important for task i, as `build_lid` does for the next task; the final LID freezes none).

    Attributes:
        buffer: the buffer size (`verifier.cl.buffers`: SMALL, MEDIUM, LARGE).
        repeat_target: the repeat rule's accuracy target (None: `REPEAT_TARGETS[scenario]`).
        min_gain: a repeat that gains less than this on the current task loosens a bound.
        loosen_by: how much the loosening rule lowers τ_j.
        replay_batch: buffer samples in every batch (None: the training batch size).
        buffer_seed: seed of the order in which samples enter the buffers (`buffer_order`).
        fit_z: the validation fit (`fit_to_views`): every recomputed LID is scaled toward its
            centre until its proved rate on each task's search view reaches the rate whose
            held-out bound would just meet τ_j plus `fit_z` standard errors; None (default,
            the paper's protocol): no fit. Only for search views nobody trains on
            (``search_data`` "validation" or "test"). Not the paper's protocol: the fit keeps
            reading every earlier task's search view, data stored beyond the buffer.
    """

    buffer: BufferSize = SMALL
    repeat_target: float | None = None
    min_gain: float = 0.025
    loosen_by: float = 0.01
    replay_batch: int | None = None
    buffer_seed: int = 0
    fit_z: float | None = None

    @classmethod
    def of(cls, lid: LidConfig, buffer: BufferSize, **changes: Any) -> ReplayConfig:
        """The replay settings with `lid`'s LID settings (its look-ahead included), `buffer`
        and any of this class's own fields in `changes`."""
        shared = {f.name: getattr(lid, f.name) for f in fields(LidConfig)}
        return cls(**{**shared, "buffer": buffer, **changes})


@dataclass(frozen=True, eq=False)
class Constraint:
    """One task's constraint for `recompute_lid`: its search samples (x; y as positions in
    ``task.rows``), τ_j, and the size of its held-out set (for the "auto" search target)."""

    task: SplitTask
    x: Tensor
    y: Tensor
    target: float
    n_certify: int


@dataclass(frozen=True, eq=False)
class RecomputedLid:
    """A LID recomputed on the constraints, one entry per constraint in each tuple.

    Attributes:
        box: the LID over every parameter (full shapes); head rows no constraint reads are
            left free (± `free_radius`).
        searched: the boxed parameters on the rows some constraint reads.
        targets: τ_j.
        search_targets: the rates the search aimed at (`LidConfig.search.target_slack`).
        rates: certified rate on each constraint's search samples, proved in float64 (the
            smaller of the gradient and validation parts); a lower bound on the final box.
        clean: the centre's accuracy on each constraint's search samples (the search target is
            capped at the smaller of its accuracies on the gradient and validation parts).
        chosen: how each search chose its box.
        feasible: whether every search met its targets.
        seconds: wall time.
        scale: the factor `fit_to_views` scaled the searched rows by (1.0: not scaled).
        view_rates: proved rate on each task's search view after the fit (empty: no fit).
        n_frozen: searched entries look-ahead froze at the centre (0: no look-ahead).
    """

    box: Box
    searched: Box
    targets: tuple[float, ...]
    search_targets: tuple[float, ...]
    rates: tuple[float, ...]
    clean: tuple[float, ...]
    chosen: str
    feasible: bool
    seconds: float
    scale: float = 1.0
    view_rates: tuple[float, ...] = ()
    n_frozen: int = 0


@dataclass(frozen=True)
class ReplayRound:
    """One training round of a task (round 0, then the repeats).

    Attributes:
        task: the task trained.
        round: 0 for the first training, r for the r-th repeat.
        buffer_sizes: samples in use of each previous task's buffer.
        targets: τ_j of the previous tasks in this round's LID.
        rates: their proved rates on the buffers in this round's LID.
        accuracy: the task's accuracy on its search view after the round.
        gain: accuracy minus the previous round's (None in round 0).
        loosened: the previous task whose τ the loosening rule lowered after this round.
        seconds: wall time of the round (LID and training).
    """

    task: int
    round: int
    buffer_sizes: tuple[int, ...]
    targets: tuple[float, ...]
    rates: tuple[float, ...]
    accuracy: float
    gain: float | None
    loosened: int | None
    seconds: float


@dataclass(frozen=True, eq=False)
class ReplayRun(LidRun):
    """`LidRun` (accuracy matrix, certified matrix, one stage per task) plus the rounds, each
    task's buffer samples in use at the end (indices into its training split), and each task's
    held-out certification samples (x, y)."""

    rounds: list[ReplayRound] = field(default_factory=list)
    buffer_indices: list[Tensor] = field(default_factory=list)
    held_out: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def loosen_targets(
    targets: Sequence[float], rates: Sequence[float], step: float
) -> tuple[list[float], int]:
    """The loosening rule: lower by `step` (not below 0) the target of the constraint closest
    to its bound, i.e. with the smallest rate - target (ties: the earliest task).

    Returns:
        The new targets and the index of the loosened one.
    """
    if not targets or len(targets) != len(rates):
        raise InputError(f"need one rate per target; got {len(rates)} for {len(targets)}")
    margins = [r - t for r, t in zip(rates, targets, strict=True)]
    index = min(range(len(margins)), key=lambda k: (margins[k], k))
    out = list(targets)
    out[index] = max(0.0, out[index] - step)
    return out, index


def _search_target(target: float, n_certify: int, config: LidConfig, clean: float) -> float:
    slack = config.search.target_slack
    if slack == "auto":  # the rate whose held-out bound would just meet τ
        aim = required_rate(target, n_certify, config.beta, "clopper-pearson")
    else:
        aim = target + float(slack)
    return min(aim, clean)


def recompute_lid(
    model: ContinualNetwork,
    constraints: Sequence[Constraint],
    config: LidConfig,
    generator: torch.Generator,
    *,
    next_task: SplitTask | None = None,
) -> RecomputedLid:
    """Search a LID from scratch (no outer box) around the model's weights that meets every
    constraint's τ on its search samples, proved in float64.

    Args:
        model: the network; its weights are the centre.
        constraints: one per task, in task order; never held-out samples.
        config: search settings, ``boxed``, ``free_radius`` and ``lookahead``.
        generator: randomness of the gradient/validation splits and the search batches.
        next_task: the task to be trained inside the LID; with ``config.lookahead`` q > 0 the
            q of each search's entries least important for it (diagonal Fisher on its
            training split at the centre) are frozen (width 0). None: nothing frozen.

    Returns:
        The LID and, per constraint, τ, the search target, the proved rate and the centre's
        accuracy.

    Raises:
        InputError: no constraint.
    """
    if not constraints:
        raise InputError("a recomputed LID needs at least one constraint")
    started = time.perf_counter()
    graph = network_graph(model)
    head_only = config.boxed == "head"
    names = head_names(graph) if head_only else list(graph.parameters)
    box = base_box(graph, (), None, config.free_radius)  # every head row free, the rest pinned
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, c in enumerate(constraints):
        groups.setdefault(tuple(c.task.rows), []).append(k)
    n = len(constraints)
    aims, rates, cleans = [math.nan] * n, [math.nan] * n, [math.nan] * n
    chosen, feasible, n_frozen = [], True, 0
    for g, (rows, members) in enumerate(groups.items()):
        sub = restrict_graph(graph, rows)
        search_graph = head_graph(sub) if head_only else sub
        tasks = []
        for k in members:
            c = constraints[k]
            inputs = head_features(sub, c.x) if head_only else c.x
            with torch.no_grad():
                hits = (search_graph(inputs).argmax(1) == c.y).double()
            cleans[k] = float(hits.mean())
            perm = torch.randperm(c.x.shape[0], generator=generator)
            n_val = int(config.search.validation_fraction * c.x.shape[0])
            val, grad = perm[:n_val], perm[n_val:]
            # the search's feasibility takes the smaller rate of its two parts: cap the aim at
            # the centre's, so the centre itself is always feasible
            centre = min(float(hits[part].mean()) for part in (grad, val) if part.numel())
            aims[k] = _search_target(c.target, c.n_certify, config, centre)
            tasks.append(
                SearchTask(
                    c.task.name,
                    "accuracy",
                    aims[k],
                    inputs[grad],
                    c.y[grad],
                    inputs[val],
                    c.y[val],
                )
            )
        outer = None
        if g > 0:  # inside what the earlier row sets left (Task-IL)
            restricted = restrict_box(box, graph, rows)
            outer = Box(
                {m: restricted.lower[m] for m in names}, {m: restricted.upper[m] for m in names}
            )
        frozen = None
        if config.lookahead > 0 and next_task is not None:
            frozen = next_task_frozen(graph, names, rows, next_task, config, head_only)
            n_frozen += int(sum(int(m.sum()) for m in frozen.values()))
        result = search_lid(
            search_graph,
            tasks,
            config.search,
            names=names,
            outer=outer,
            frozen=frozen,
            generator=generator,
        )
        lifted = lift_box(result.box, box, graph, rows)
        # search_lid rounds outer caps to float32 to the nearest (an ulp over at most); the
        # intersection is a subset of the proved box, so every constraint still holds
        box = lifted if g == 0 else lifted.intersect(box)
        for k, rate in zip(members, result.hard, strict=True):
            rates[k] = rate
        chosen.append(result.chosen)
        feasible = feasible and result.feasible
    read = sorted({r for c in constraints for r in c.task.rows})
    searched_rows = restrict_box(box, graph, read)
    searched = Box(
        {m: searched_rows.lower[m] for m in names}, {m: searched_rows.upper[m] for m in names}
    )
    return RecomputedLid(
        box=box,
        searched=searched,
        targets=tuple(c.target for c in constraints),
        search_targets=tuple(aims),
        rates=tuple(rates),
        clean=tuple(cleans),
        chosen="; ".join(chosen),
        feasible=feasible,
        seconds=time.perf_counter() - started,
        n_frozen=n_frozen,
    )


def _accuracy(model: ContinualNetwork, view: SplitTask, n_max: int | None) -> float:
    """Accuracy of the masked prediction on the view's search samples (`x_train`)."""
    x, y = view.x_train[:n_max], view.y_train[:n_max]
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], 2000):
            logits = masked_logits(model(x[i : i + 2000]), view.rows)
            hits += int((logits.argmax(1) == y[i : i + 2000]).sum())
    return hits / max(x.shape[0], 1)


class _Sequence:
    """The state of one replay run: buffers in use, τ_j, and what was recorded."""

    def __init__(
        self,
        tasks: Sequence[SplitTask],
        views: Sequence[SplitTask],
        config: ReplayConfig,
    ) -> None:
        self.tasks, self.views, self.config = list(tasks), list(views), config
        self.orders = [buffer_order(t, config.buffer_seed) for t in tasks]
        self.grown = [0] * len(tasks)
        self.taus: list[float] = []
        self.cleans: list[float] = []

    def in_use(self, j: int) -> Tensor:
        task = self.tasks[j]
        size = self.config.buffer.in_use(j, self.grown[j], int(task.x_train.shape[0]))
        return self.orders[j][:size]

    def constraint(self, j: int, *, own_view: bool = False) -> Constraint:
        """Task j's constraint on its buffer in use (or on its search view)."""
        if own_view:
            n = self.config.n_optimisation
            x, y = self.views[j].x_train[:n], self.views[j].y_train[:n]
        else:
            idx = self.in_use(j)
            if idx.numel() == 0:
                raise InputError(
                    f"buffer {self.config.buffer.name} stores nothing for task {j + 1}; "
                    "give it an allocation or shorten the sequence"
                )
            x, y = self.tasks[j].x_train[idx], self.tasks[j].y_train[idx]
        n_certify = int(self.views[j].x_test.shape[0])
        return Constraint(self.tasks[j], x, y, self.taus[j], n_certify)

    def training_data(self, task: SplitTask, active: Sequence[int] | None) -> TrainingData:
        data = TrainingData.of_task(task)
        return data if active is None else active_only(data, active)

    def buffer_data(self, i: int, active: Sequence[int] | None) -> TrainingData:
        parts = []
        for j in range(i):
            idx = self.in_use(j)
            t = self.tasks[j]
            rows = torch.tensor(t.rows, dtype=torch.int64).expand(idx.numel(), len(t.rows))
            parts.append(TrainingData(t.x_train[idx], t.y_train[idx], rows))
        data = TrainingData.union(parts)
        return data if active is None else active_only(data, active)


def _active_classes(config: LidConfig, tasks: Sequence[SplitTask], i: int) -> list[int] | None:
    task = tasks[i]
    if not config.active_classes or len(task.rows) <= len(task.digits):
        return None
    return sorted({d for t in tasks[: i + 1] for d in t.digits})


def run_replay_sequence(
    model: ContinualNetwork,
    tasks: Sequence[SplitTask],
    train_config: TrainConfig,
    config: ReplayConfig,
    generator: torch.Generator,
    *,
    scenario: Scenario,
    first: FirstTask | None = None,
    on_stage: Callable[[LidStage], None] | None = None,
) -> ReplayRun:
    """Train the task sequence with replay buffers and recomputed LIDs (module docstring);
    certify every stage on held-out data.

    Args:
        model: the freshly initialised network (trained in place).
        tasks: the task sequence (at most one more task than the buffer's table has entries).
        train_config: per-task optimisation settings.
        config: LID and buffer settings.
        generator: randomness of batches, replayed samples, splits and searches.
        scenario: picks the repeat rule's target (unless `config.repeat_target` is set).
        first: the first task's plain training, taken from it when given.
        on_stage: called after each stage is certified.

    Returns:
        The accuracy matrix, the certified matrix (`certified[t, j]`, NaN where not computed),
        one stage per task, the rounds, the buffers in use and the held-out samples.

    Raises:
        InputError: a previous task with no buffer allocation.
        SoundnessError: projected training left the LID (a bug).
    """
    target = REPEAT_TARGETS[scenario] if config.repeat_target is None else config.repeat_target
    replay_batch = train_config.batch_size if config.replay_batch is None else config.replay_batch
    n = len(tasks)
    views = lid_views(tasks, config)
    state = _Sequence(tasks, views, config)
    rows: list[Tensor] = []
    stages: list[LidStage] = []
    rounds: list[ReplayRound] = []
    certified = torch.full((n, n), float("nan"), dtype=torch.float64)
    cache: dict[int, HeadInputs] = {}
    fit_cache: dict[int, HeadInputs] = {}  # the search views' features (keyed as `cache`)

    def fit(lid: RecomputedLid) -> RecomputedLid:
        return fit_to_views(model, lid, views, config, fit_cache)

    def before(i: int) -> RecomputedLid:
        """The LID task i trains in: recomputed on tasks 0..i-1's buffers in use, fitted."""
        constraints = [state.constraint(j) for j in range(i)]
        return fit(recompute_lid(model, constraints, config, generator, next_task=tasks[i]))

    def finish_task(t: int) -> None:
        rows.append(accuracy_row(model, tasks))
        state.cleans.append(_accuracy(model, views[t], config.n_optimisation))
        state.taus.append(state.cleans[t] - config.tolerance)

    def record_stage(t: int, lid: RecomputedLid) -> None:
        """Stage t: a LID around θ_t on tasks 0..t, certified on held-out data."""
        stage = LidStage(
            task=t,
            clean=state.cleans[t],
            target=state.taus[t],
            search_target=lid.search_targets[t],
            box=lid.box,
            search_box=lid.searched,
            chosen=lid.chosen,
            feasible=lid.feasible,
            optimisation_metric=min(lid.rates),
            mean_width=lid.searched.size("mean_width"),
            n_frozen=lid.n_frozen,
            n_boxed=lid.searched.n_parameters(),
            seconds=lid.seconds,
        )
        graph = network_graph(model)
        todo = range(t + 1) if config.certify_every_row or t == n - 1 else [t]
        for j in todo:
            cert = certify_lid(
                graph,
                lid.box,
                views[j],
                beta=config.beta,
                target=lid.targets[j],
                cache=cache,
                method=lid_proof_method(config),
            )
            stage.certificates[j] = cert
            certified[t, j] = cert.lower_bound
        stages.append(stage)
        if on_stage is not None:
            on_stage(stage)

    if first is not None:
        resume_first_task(model, first, generator)
    else:
        active = _active_classes(config, tasks, 0)
        data = state.training_data(tasks[0], active)
        train_projected(model, tasks[0], None, train_config, generator, data=data)
    finish_task(0)
    for i in range(1, n):
        active = _active_classes(config, tasks, i)
        data = state.training_data(tasks[i], active)
        started = time.perf_counter()
        lid = before(i)
        record_stage(i - 1, lid)
        previous: float | None = None
        for r in range(config.buffer.repeats + 1):
            if r > 0:  # a repeat: more chunks, the LID recomputed around the current weights
                started = time.perf_counter()
                for j in range(i):
                    state.grown[j] += 1
                lid = before(i)
            sizes = tuple(int(state.in_use(j).numel()) for j in range(i))
            buffer = state.buffer_data(i, active)
            train_replay(
                model, data, buffer, lid.box, train_config, generator, replay_batch=replay_batch
            )
            if not lid.box.contains(dict(model.named_parameters())):
                raise SoundnessError(f"weights left the recomputed LID while training task {i}")
            accuracy = _accuracy(model, views[i], config.n_optimisation)
            gain = None if previous is None else accuracy - previous
            repeat = accuracy < target and r < config.buffer.repeats
            loosened = None
            if repeat and gain is not None and gain < config.min_gain:
                new, loosened = loosen_targets(lid.targets, lid.rates, config.loosen_by)
                state.taus[:i] = new
            rounds.append(
                ReplayRound(
                    i,
                    r,
                    sizes,
                    lid.targets,
                    lid.rates,
                    accuracy,
                    gain,
                    loosened,
                    time.perf_counter() - started,
                )
            )
            previous = accuracy
            if not repeat:
                break
        finish_task(i)
    constraints = [state.constraint(j) for j in range(n - 1)]
    constraints.append(state.constraint(n - 1, own_view=True))
    record_stage(n - 1, fit(recompute_lid(model, constraints, config, generator)))
    return ReplayRun(
        torch.stack(rows),
        certified,
        stages,
        rounds=rounds,
        buffer_indices=[
            state.in_use(j) if j < n - 1 else torch.zeros(0, dtype=torch.int64) for j in range(n)
        ],
        held_out=[(v.x_test, v.y_test) for v in views],
    )
