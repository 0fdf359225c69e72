"""Continual learning with nested LIDs (arXiv 2512.01899, §5), certified on held-out data.

After task t the learner searches LID_t, a box around the current weights θ_t in which every
network meets task t's spec, acc_t >= τ_t = clean_t - tolerance, on the task's masked
prediction; LID_t lies inside LID_{t-1} (the previous LID is the search's outer box), so every
earlier spec still holds everywhere in LID_t. Task t+1 is then trained with the weights
projected onto LID_t (a clamp) after every optimiser step.

The network is the Split-MNIST CNN or a `LinearHead` on frozen-encoder features
(Split-CIFAR-10); for the latter the whole network is the head.

Data: by default (``search_data="train"``) the search sees only the task's *training* split
(its optimisation part); the task's *test* split is held out and certifies the LID
(Clopper-Pearson, float64 proofs: intervals, or with `search.bound: linear` method "best", per
sample and class the tighter of intervals and linear bounds, `lid_proof_method`). With
``search_data="test"`` the test split is divided (seeded) into an optimisation part for the
search and τ and a certification part that neither training nor the search sees
(`held_out_view`). With ``search_data="validation"`` the search and τ use the task's
validation part (taken out of its training split, so never trained on) and the test split
certifies; `n_certify` draws that many certification samples (`verifier.cl.lid_views`).
`certified[t, j]` is the held-out lower bound for task j of LID_t (j <= t); because the final
weights lie in every LID_t, each entry of the last row bounds the final network's accuracy
on task j, with probability >= 1 - β each.

Variants (`LidConfig`):

* ``boxed="head"``: the box has width only on the final Linear's rows of the task; the
  convolutions are pinned (zero width) at θ_1, i.e. frozen after the first task. The search
  then runs on precomputed head features and later tasks train the head alone, which is
  exactly projected training onto a box that pins everything else. ``boxed="all"`` boxes
  every parameter (the paper's setting; about 50x slower to search on a CPU). With the
  default `search.size: mean_width` such a search leaves the convolutions at zero width on the
  Split-MNIST CNN; `layer_log_width` (every tensor counts alike) opens them, and
  `search.bound: linear` widens the box further (README "Which bound").
* look-ahead (``lookahead > 0``, the paper's trick): the fraction q of boxed entries least
  important for the *next* task (diagonal Fisher on its training data at θ_t) is frozen, so the
  box's width goes where the next task needs room. This peeks at the next task's training data.
* Rows no task of the LID uses (other Task-IL heads; Domain-IL rows 2-9) are left free (width
  2 * `free_radius` on LID_1, inherited afterwards): the masked predictions never read them.
* certification ladder (``ladder``, `verifier.cl.cl_ladder`): narrower candidates around θ_t
  replace a LID_t whose held-out certificate misses τ_t; every certificate is then at β / m.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from verifier.certify import (
    CertMethod,
    TaskCertificate,
    certify_samples,
    certify_task,
    required_rate,
)
from verifier.cl.cl_ladder import certificate_beta, check_nested, checked_ladder, climb_ladder
from verifier.cl.head_certify import (
    HeadInputs,
    certify_head,
    head_features,
    head_graph,
    head_inputs,
)
from verifier.cl.heads import (
    head_names,
    lift_box,
    pin_zero_width,
    restrict_box,
    restrict_graph,
)
from verifier.cl.lid_views import SearchData, lid_views
from verifier.cl.lid_views import held_out_view as held_out_view  # re-exported
from verifier.cl.network import ContinualNetwork, network_graph
from verifier.cl.scenarios import SplitTask, masked_logits
from verifier.cl.training import (
    FirstTask,
    Strategy,
    TrainConfig,
    TrainingData,
    accuracy_row,
    batches,
    n_steps,
    resume_first_task,
    train_task,
)
from verifier.domains.box import Box
from verifier.errors import SoundnessError
from verifier.graph import Graph
from verifier.search import (
    SearchResult,
    SearchTask,
    frozen_by_importance,
    inward_float32,
    search_lid,
)
from verifier.search.dual import proof_method
from verifier.spec import SearchSection

PAPER_SEARCH = SearchSection(iterations=200, batch_size=400, checkpoint_every=20, lr=0.33)


@dataclass(frozen=True)
class LidConfig:
    """How the learner builds each LID.

    Attributes:
        tolerance: τ_t = clean accuracy on the optimisation part - tolerance (paper: 0.12).
        search: search settings (paper: 200 iterations, batch 400, checkpoint every 20,
            η_p = 0.33; the other settings are `SearchSection`'s defaults). Its
            `target_slack` sets the search's target: "auto" (the rate whose Clopper-Pearson
            bound on the certification samples would just meet τ) or τ + a fixed slack (a box
            tuned to just meet the rate on the search's data certifies a little less on fresh
            samples, so a larger slack makes certificates that meet τ more likely).
        boxed: "head" (final Linear only, convolutions frozen after task 1) or "all".
        lookahead: q, fraction of boxed entries frozen by next-task importance (0: off).
        n_lookahead: next-task training samples for the Fisher importance.
        n_optimisation: cap on the training samples the search sees (None: the whole split).
        beta: 1 - confidence of each held-out certificate (each is computed at beta / m with
            a ladder of m scales, so that it still holds with probability >= 1 - beta).
        free_radius: half-width of rows no task of the LID reads.
        certify_every_row: certify LID_t on every earlier task (else the diagonal and the
            last row only); cheap for head-only boxes, whose body features are cached.
        active_classes: Class-IL only: the training loss compares the logits of the classes
            seen so far (van de Ven et al.'s "active classes"); prediction, τ and the
            certificates stay 10-way. Unseen classes' logits are then not pushed down while
            earlier tasks train, which leaves the nested boxes room for later classes.
        search_data: where the search's data (and τ's clean accuracy) come from: "train",
            the task's training split (the certificate then uses the whole test split), or
            "test", a seeded part of the task's test split (`1 - certification_fraction` of
            it; the certificate uses the rest, which neither training nor the search sees).
            "test" sets τ from held-out accuracy, as the paper does, so a head that fits its
            training data better than it generalises does not get a τ its test data cannot meet.
            "validation": the task's validation part (`x_val`, never trained on; the paper's
            Split-MNIST protocol); the certificate uses the test split.
        n_certify: certification samples per task, drawn seeded from what the mode holds out
            (None: all of it; the paper's Split-MNIST protocol: 400).
        certification_fraction: with search_data="test", the part of each task's test split
            kept for the certificate.
        split_seed: the seed (task index added) of the search_data="test" split and of the
            `n_certify` draw; both use their own generators, so the training batches do not
            change.
        ladder: certification ladder scales, e.g. (1.0, 0.7, 0.5): strictly decreasing, in
            (0, 1], the first 1.0 (`verifier.cl.cl_ladder`); () (default): no ladder.
    """

    tolerance: float = 0.12
    search: SearchSection = PAPER_SEARCH
    boxed: Literal["head", "all"] = "head"
    lookahead: float = 0.0
    n_lookahead: int = 512
    n_optimisation: int | None = None
    beta: float = 1e-3
    free_radius: float = 1e3
    certify_every_row: bool = True
    active_classes: bool = False
    search_data: SearchData = "train"
    n_certify: int | None = None
    certification_fraction: float = 0.5
    split_seed: int = 0
    ladder: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        """Check the look-ahead fraction and the ladder (ValueError naming the problem) and
        keep the ladder as a tuple."""
        if not 0.0 <= self.lookahead < 1.0:
            raise ValueError(f"lookahead must be in [0, 1) (a fraction); got {self.lookahead}")
        object.__setattr__(self, "ladder", checked_ladder(self.ladder))


@dataclass(frozen=True, eq=False)
class LidStage:
    """What building one LID produced (with a ladder: the kept candidate's scale and the lower
    bounds of the candidates certified on task t, in order; `verifier.cl.cl_ladder`)."""

    task: int
    clean: float
    target: float
    search_target: float
    box: Box
    search_box: Box
    chosen: str
    feasible: bool
    optimisation_metric: float
    mean_width: float
    n_frozen: int
    n_boxed: int
    seconds: float
    certificates: dict[int, TaskCertificate] = field(default_factory=dict)
    ladder_scale: float = 1.0
    ladder_bounds: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)
class LidRun:
    """A whole task sequence: accuracy matrix, certified matrix (NaN where not certified)."""

    matrix: Tensor
    certified: Tensor
    stages: list[LidStage]


class Projection(Strategy):
    """Projected training: clamp the weights into a box after every optimiser step."""

    name = "LID"

    def __init__(self, box: Box | None, data: TrainingData | None = None) -> None:
        self.lower = {} if box is None else {n: t.float() for n, t in box.lower.items()}
        self.upper = {} if box is None else {n: t.float() for n, t in box.upper.items()}
        self.data = data

    def training_data(self, task: SplitTask, seen: Sequence[SplitTask]) -> TrainingData:
        return TrainingData.of_task(task) if self.data is None else self.data

    def after_step(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.lower:
                    p.copy_(torch.clamp(p, self.lower[name], self.upper[name]))


def _pins_all_but_head(box: Box, head: Sequence[str]) -> bool:
    return all(torch.equal(box.lower[n], box.upper[n]) for n in box.lower if n not in head)


def train_projected(
    model: ContinualNetwork,
    task: SplitTask,
    box: Box | None,
    config: TrainConfig,
    generator: torch.Generator,
    *,
    data: TrainingData | None = None,
) -> None:
    """Train on a task, projecting onto `box` after every step (no projection when None).

    When the box pins every parameter but the head's, the convolutions cannot move: the head
    is trained alone on precomputed features, with the same batches and the same Adam updates
    of the head as the full loop followed by the clamp.

    Args:
        model: the network, trained in place; it must lie in `box`.
        task: the task to train on (its training split).
        box: the LID to project onto, or None.
        config: per-task optimisation settings.
        generator: randomness of the batches.
        data: what to train on (default: the task's training split with the task's rows).
    """
    head = ("fc.weight", "fc.bias")
    if box is None or not _pins_all_but_head(box, head):
        train_task(model, Projection(box, data), task, [], config, generator)
        return
    data = TrainingData.of_task(task) if data is None else data
    with torch.no_grad():
        features = torch.cat(
            [model.features(data.x[i : i + 2000]) for i in range(0, len(data), 2000)]
        )
    projection = Projection(Box({n: box.lower[n] for n in head}, {n: box.upper[n] for n in head}))
    optimiser = torch.optim.Adam(model.fc.parameters(), lr=config.lr)
    for idx in batches(len(data), n_steps(len(data), config), config.batch_size, generator):
        logits = masked_logits(model.fc(features[idx]), data.rows[idx])
        loss = F.cross_entropy(logits, data.y[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        projection.after_step(model)


def _active_class_data(task: SplitTask, seen: Sequence[SplitTask]) -> TrainingData | None:
    """Class-IL training data whose loss compares only the classes seen so far (None for
    tasks with a masked head, whose rows are already the task's own)."""
    if len(task.rows) <= len(task.digits):
        return None
    active = sorted({d for t in seen for d in t.digits})
    data = TrainingData.of_task(task)
    position = torch.full((max(task.rows) + 1,), -1, dtype=torch.int64)
    position[torch.tensor(active)] = torch.arange(len(active))
    rows = torch.tensor(active, dtype=torch.int64).expand(len(data), len(active))
    return TrainingData(data.x, position[torch.tensor(task.rows)[data.y]], rows)


def _point_box(theta: dict[str, Tensor]) -> Box:
    point = {n: t.to(torch.float64) for n, t in theta.items()}
    return Box(point, dict(point))


def base_box(graph: Graph, rows: Sequence[int], outer: Box | None, free_radius: float) -> Box:
    """Every parameter pinned at the graph's values except head rows outside `rows`, which are
    copied from `outer` (or left free, ± free_radius, for the first LID)."""
    base = _point_box(dict(graph.parameters))
    lower, upper = dict(base.lower), dict(base.upper)
    others = [r for r in range(graph.n_classes) if r not in rows]
    if not others:
        return base
    index = torch.tensor(others, dtype=torch.int64)
    for name in head_names(graph):
        lo, up = lower[name].clone(), upper[name].clone()
        if outer is None:
            lo[index] -= free_radius
            up[index] += free_radius
        else:
            lo[index] = outer.lower[name].to(lo)[index]
            up[index] = outer.upper[name].to(up)[index]
        lower[name], upper[name] = lo, up
    return inward_float32(Box(lower, upper))


def graph_fisher(
    graph: Graph, names: Sequence[str], x: Tensor, y: Tensor, *, chunk_size: int = 128
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher E[(d log p(y|x) / dθ)^2] of the named graph parameters.

    The same quantity as `verifier.search.fisher_importance`, which fails under torch.func.vmap
    on torch 2.13 (it indexes the log-probabilities with a batched label); this one gathers.
    """
    from torch.func import grad, vmap

    params = {n: graph.parameters[n] for n in names}

    def log_prob(theta: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = graph.forward(xi.unsqueeze(0), theta)[0]
        return torch.log_softmax(logits, dim=0).gather(0, yi.unsqueeze(0))[0]

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))
    for start in range(0, x.shape[0], chunk_size):
        grads = per_sample(params, x[start : start + chunk_size], y[start : start + chunk_size])
        for n in names:
            total[n] += grads[n].pow(2).sum(0)
    return {n: t / max(x.shape[0], 1) for n, t in total.items()}


def next_task_frozen(
    graph: Graph,
    names: Sequence[str],
    rows: Sequence[int],
    next_task: SplitTask,
    config: LidConfig,
    head_only: bool,
) -> dict[str, Tensor]:
    """Masks of the q least important boxed entries for the next task (Fisher at θ_t).

    Importance is computed on the next task's masked head and mapped to the head `rows` the
    box being searched covers; rows the next task never reads have importance 0.
    """
    x = next_task.x_train[: config.n_lookahead]
    y = next_task.y_train[: config.n_lookahead]
    nxt = restrict_graph(graph, next_task.rows)
    if head_only:
        nxt, x = head_graph(nxt), head_features(nxt, x)
    scores = graph_fisher(nxt, list(names), x, y)
    heads = set(head_names(graph))
    full = {}
    for name in names:
        if name in heads:
            value = torch.zeros_like(graph.parameters[name])
            value[list(next_task.rows)] = scores[name].to(value)
            full[name] = value[list(rows)]
        else:
            full[name] = scores[name]
    return frozen_by_importance(full, config.lookahead)


def certify_lid(
    graph: Graph,
    box: Box,
    task: SplitTask,
    *,
    beta: float,
    target: float,
    cache: dict[int, HeadInputs] | None = None,
    method: CertMethod = "ibp",
) -> TaskCertificate:
    """Held-out certificate (float64 proofs, Clopper-Pearson) of a full-graph box on one
    task's masked prediction, on the task's test split.

    When the box pins every body parameter, the body features of the test split are computed
    once (and kept in `cache`, keyed by task index) and only the head is bounded per box, by
    intervals: with the features fixed, the interval margin of a single Linear layer is exact,
    so no other method can prove more (the certificate records "ibp"). Otherwise the whole
    graph is bounded with the zero-width parameters pinned, by `method` (`lid_proof_method`:
    "best", per sample and class the tighter of intervals and linear bounds, for a
    linear-bound search).
    """
    sub = restrict_graph(graph, task.rows)
    sub_box = restrict_box(box, graph, task.rows)
    head = set(head_names(graph))
    pinned, rest = pin_zero_width(sub, sub_box)
    if cache is not None and all(n in head for n in rest.lower):
        inputs = cache.get(task.index)
        if inputs is None or any(
            not torch.equal(v.double(), pinned.parameters[n].double())
            for n, v in inputs.body.items()
        ):
            inputs = head_inputs(pinned, task.x_test)
            cache[task.index] = inputs
        mask, nonfinite = certify_head(pinned, rest, inputs, task.y_test)
        method = "ibp"
    else:
        mask, nonfinite = certify_samples(pinned, rest, task.x_test, task.y_test, method=method)
    return certify_task(
        mask,
        task.y_test,
        task=task.name,
        metric="accuracy",
        target=target,
        beta=beta,
        bound_kind="clopper-pearson",
        method=method,
        n_nonfinite=nonfinite,
    )


def lid_proof_method(config: LidConfig) -> CertMethod:
    """The held-out proof that matches the LID search's bound: "best" (the tighter of
    intervals and linear bounds per sample and class) for `search.bound: linear`, else "ibp"."""
    return proof_method(config.search)


def build_lid(
    model: ContinualNetwork,
    task: SplitTask,
    next_task: SplitTask | None,
    outer: Box | None,
    config: LidConfig,
    generator: torch.Generator,
) -> LidStage:
    """Search LID_t for a trained model (inside `outer`), without certifying it.

    Args:
        model: the network after training on `task` (θ_t).
        task: the task whose spec the LID carries; the search sees only its training split
            (at most `config.n_optimisation` samples), split into gradient and validation parts.
        next_task: the following task (look-ahead importance), or None for the last one.
        outer: LID_{t-1}, which LID_t must lie in, or None for the first task.
        config: LID settings.
        generator: randomness of the optimisation split and the search batches.

    Returns:
        The stage: LID_t over every parameter (full shapes), the searched box (restricted to
        the task's rows and the boxed parameters), targets and search facts.

    Raises:
        SoundnessError: LID_t is not inside `outer` (a bug).
    """
    started = time.perf_counter()
    graph = network_graph(model)
    sub = restrict_graph(graph, task.rows)
    head_only = config.boxed == "head"
    names = head_names(graph) if head_only else list(graph.parameters)
    n_opt = task.x_train.shape[0] if config.n_optimisation is None else config.n_optimisation
    x_opt, y_opt = task.x_train[:n_opt], task.y_train[:n_opt]
    search_graph, inputs = (
        (head_graph(sub), head_features(sub, x_opt))
        if head_only
        else (
            sub,
            x_opt,
        )
    )
    with torch.no_grad():
        clean = float((search_graph(inputs).argmax(1) == y_opt).double().mean())
    target = clean - config.tolerance
    n_cert = task.x_test.shape[0]
    slack = config.search.target_slack
    if slack == "auto":  # the rate whose held-out bound would just meet τ
        beta = certificate_beta(config.beta, config.ladder)
        search_target = required_rate(target, n_cert, beta, "clopper-pearson")
    else:  # a fixed margin above τ, as in `verifier.pipeline`
        search_target = target + float(slack)
    search_target = min(search_target, clean)
    perm = torch.randperm(n_opt, generator=generator)
    n_val = int(config.search.validation_fraction * n_opt)
    val, grad = perm[:n_val], perm[n_val:]
    search_task = SearchTask(
        task.name, "accuracy", search_target, inputs[grad], y_opt[grad], inputs[val], y_opt[val]
    )
    sub_outer = None
    if outer is not None:
        restricted = restrict_box(outer, graph, task.rows)
        sub_outer = Box(
            {n: restricted.lower[n] for n in names}, {n: restricted.upper[n] for n in names}
        )
    frozen = None
    if config.lookahead > 0 and next_task is not None:
        frozen = next_task_frozen(graph, names, task.rows, next_task, config, head_only)
    result: SearchResult = search_lid(
        search_graph,
        [search_task],
        config.search,
        names=names,
        outer=sub_outer,
        frozen=frozen,
        generator=generator,
    )
    box = lift_box(
        result.box, base_box(graph, task.rows, outer, config.free_radius), graph, task.rows
    )
    if outer is not None:
        # search_lid rounds its outer caps to float32 to the nearest, which can overshoot the
        # outer box by an ulp; the intersection is a subset of a feasible box, so still feasible
        box = box.intersect(outer)
        check_nested(box, outer)
    return LidStage(
        task=task.index,
        clean=clean,
        target=target,
        search_target=search_target,
        box=box,
        search_box=result.box,
        chosen=result.chosen,
        feasible=result.feasible,
        optimisation_metric=result.hard[0],
        mean_width=result.box.size("mean_width"),
        n_frozen=0 if frozen is None else int(sum(int(m.sum()) for m in frozen.values())),
        n_boxed=result.box.n_parameters(),
        seconds=time.perf_counter() - started,
    )


def run_lid_sequence(
    model: ContinualNetwork,
    tasks: Sequence[SplitTask],
    train_config: TrainConfig,
    config: LidConfig,
    generator: torch.Generator,
    *,
    first: FirstTask | None = None,
    on_stage: Callable[[LidStage], None] | None = None,
) -> LidRun:
    """Train the task sequence with nested LIDs; certify every LID on held-out data.

    Args:
        model: the freshly initialised network (trained in place).
        tasks: the task sequence.
        train_config: per-task optimisation settings.
        config: LID settings.
        generator: randomness of batches, splits and searches.
        first: the first task's (plain, unprojected) training, taken from it when given.
        on_stage: called after each LID is built and certified.

    Returns:
        The accuracy matrix, the certified matrix (`certified[t, j]`, NaN where not computed)
        and one stage per task (with `config.ladder`, each LID_t the kept candidate).
    """
    n = len(tasks)
    rows: list[Tensor] = []
    stages: list[LidStage] = []
    certified = torch.full((n, n), float("nan"), dtype=torch.float64)
    outer: Box | None = None
    cache: dict[int, HeadInputs] = {}
    views = lid_views(tasks, config)
    beta, method = certificate_beta(config.beta, config.ladder), lid_proof_method(config)
    for t, task in enumerate(tasks):
        if t == 0 and first is not None:
            resume_first_task(model, first, generator)
        else:
            data = _active_class_data(task, tasks[: t + 1]) if config.active_classes else None
            train_projected(model, task, outer, train_config, generator, data=data)
        if outer is not None and not outer.contains(dict(model.named_parameters())):
            raise SoundnessError(f"weights left LID_{t} during projected training")
        rows.append(accuracy_row(model, tasks))
        next_task = tasks[t + 1] if t + 1 < n else None
        stage = build_lid(model, views[t], next_task, outer, config, generator)
        graph = network_graph(model)
        if config.ladder:  # certifies the candidates on task t, keeps one (and its certificate)
            certify = partial(
                certify_lid,
                graph,
                task=views[t],
                beta=beta,
                target=stage.target,
                cache=cache,
                method=method,
            )
            stage = climb_ladder(stage, graph, task.rows, outer, config.ladder, certify)
        todo = range(t + 1) if config.certify_every_row or t == n - 1 else [t]
        for j in todo:  # the ladder's certificate on task t is reused (and moved in order)
            cert = stage.certificates.pop(j, None)
            if cert is None:
                target = stages[j].target if j < t else stage.target
                cert = certify_lid(
                    graph, stage.box, views[j], beta=beta, target=target, cache=cache, method=method
                )
            stage.certificates[j] = cert
            certified[t, j] = cert.lower_bound
        stages.append(stage)
        if on_stage is not None:
            on_stage(stage)
        outer = stage.box
    return LidRun(torch.stack(rows), certified, stages)
