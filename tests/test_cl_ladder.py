"""The continual learner's certification ladder (`LidConfig.ladder`, `verifier.cl.cl_ladder`):
no ladder changes nothing; a LID whose held-out certificate misses τ is replaced by the widest
narrower candidate that meets it, nested in the chain, every certificate at beta / m; bad
ladders are refused; and every network in a kept box classifies every sample it certifies."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

import pytest
import torch

import verifier.cl.lid_learner as lid_learner
from tests.benchmark_loader import load_benchmark
from tests.cl_data import clusters
from verifier.certify import TaskCertificate, certificate_from_counts, certify_samples
from verifier.cl.cl_ladder import (
    certificate_beta,
    check_nested,
    checked_ladder,
    climb_ladder,
    ladder_box,
)
from verifier.cl.heads import restrict_box, restrict_graph
from verifier.cl.lid_learner import PAPER_SEARCH, LidConfig, LidRun, LidStage, run_lid_sequence
from verifier.cl.lid_views import lid_views
from verifier.cl.network import LinearHead, network_graph
from verifier.cl.scenarios import SplitTask, masked_logits, split_pairs
from verifier.cl.training import TrainConfig
from verifier.domains.box import Box
from verifier.errors import SoundnessError
from verifier.graph import Graph

LADDER = (1.0, 0.5, 0.25, 0.1)
SEARCH = PAPER_SEARCH.model_copy(
    update={"iterations": 20, "checkpoint_every": 5, "batch_size": 80, "target_slack": 0.0}
)
# τ = clean - 0.3 ≈ 0.7 on 40 certification samples: the searched box, aimed at τ itself
# (slack 0), certifies about 0.5-0.6 there, below τ; a box narrowed toward θ_t certifies all
# 40 samples, a bound of 0.81 at beta / 4
BASE = LidConfig(search=SEARCH, tolerance=0.3, n_certify=40)


def _tasks() -> list[SplitTask]:
    """Two Task-IL tasks of a LinearHead on 8 features: 80 training, 200 test samples each."""
    return split_pairs("task", [(1, 4), (2, 8)], clusters(40, 8, 2), clusters(100, 8, 3))


def _run(config: LidConfig, tasks: list[SplitTask]) -> tuple[LidRun, LinearHead]:
    model = LinearHead(8, torch.Generator().manual_seed(0))
    run = run_lid_sequence(
        model, tasks, TrainConfig(epochs=20, lr=1e-2), config, torch.Generator().manual_seed(1)
    )
    return run, model


def _inside(inner: Box, outer: Box) -> bool:
    return all(
        bool((lo >= outer.lower[n]).all()) and bool((inner.upper[n] <= outer.upper[n]).all())
        for n, lo in inner.lower.items()
    )


def _same_box(a: Box, b: Box) -> bool:
    return set(a.lower) == set(b.lower) and all(
        torch.equal(a.lower[n], b.lower[n]) and torch.equal(a.upper[n], b.upper[n]) for n in a.lower
    )


@dataclass
class Searched:
    """What `build_lid` returned for one task (before the ladder), with θ_t and LID_{t-1}."""

    stage: LidStage
    theta: dict[str, torch.Tensor]
    outer: Box | None


@dataclass
class LadderRun:
    """A run with `LADDER` and what its searches returned."""

    run: LidRun
    model: LinearHead
    tasks: list[SplitTask]
    config: LidConfig
    searched: list[Searched]


@pytest.fixture(scope="module")
def ladder_run() -> Iterator[LadderRun]:
    searched: list[Searched] = []
    original = lid_learner.build_lid

    def spy(model: Any, task: Any, next_task: Any, outer: Any, *args: Any) -> LidStage:
        stage = original(model, task, next_task, outer, *args)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        searched.append(Searched(stage, theta, outer))
        return stage

    tasks = _tasks()
    config = replace(BASE, ladder=LADDER)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lid_learner, "build_lid", spy)
        run, model = _run(config, tasks)
    yield LadderRun(run, model, tasks, config, searched)


# ---- (a) no ladder: today's run ---------------------------------------------------------


@pytest.mark.timeout(180)
def test_an_empty_ladder_and_the_single_scale_ladder_give_the_run_without_a_ladder() -> None:
    tasks = _tasks()
    plain, _ = _run(BASE, tasks)
    assert BASE.ladder == ()
    for ladder in ((), (1.0,)):
        run, _ = _run(replace(BASE, ladder=ladder), tasks)
        torch.testing.assert_close(run.matrix, plain.matrix, rtol=0, atol=0)
        torch.testing.assert_close(run.certified, plain.certified, rtol=0, atol=0, equal_nan=True)
        for stage, ref in zip(run.stages, plain.stages, strict=True):
            assert _same_box(stage.box, ref.box) and _same_box(stage.search_box, ref.search_box)
            assert (stage.target, stage.mean_width) == (ref.target, ref.mean_width)
            assert stage.ladder_scale == ref.ladder_scale == 1.0
            assert list(stage.certificates) == list(ref.certificates)  # same order, 0..t
            for j, cert in stage.certificates.items():
                assert cert.to_json() == ref.certificates[j].to_json()
                assert cert.beta == BASE.beta  # m = 1: the full beta
    assert all(s.ladder_bounds == () for s in plain.stages)


# ---- (b) a narrower candidate is kept, soundly ------------------------------------------


def test_a_narrower_candidate_replaces_a_lid_whose_certificate_misses_tau(
    ladder_run: LadderRun,
) -> None:
    run, config = ladder_run.run, ladder_run.config
    beta = config.beta / len(LADDER)
    assert certificate_beta(config.beta, config.ladder) == beta
    theta_final = dict(ladder_run.model.named_parameters())
    outer: Box | None = None
    for t, (stage, searched) in enumerate(zip(run.stages, ladder_run.searched, strict=True)):
        tried = len(stage.ladder_bounds)
        # the searched LID_t missed τ_t on the held-out samples; the kept candidate meets it
        assert stage.ladder_bounds[0] < stage.target
        assert all(b < stage.target for b in stage.ladder_bounds[:-1])
        assert stage.ladder_scale == LADDER[tried - 1] < 1.0
        diagonal = stage.certificates[t]
        assert diagonal.holds and diagonal.lower_bound >= stage.target
        assert diagonal.lower_bound == stage.ladder_bounds[-1] == float(run.certified[t, t])
        # the kept box: the candidate of that scale, inside the searched box and LID_{t-1}
        assert searched.outer is outer
        kept = stage.box
        candidate = ladder_box(searched.stage.box, searched.theta, outer, LADDER[tried - 1])
        assert _same_box(kept, candidate)
        assert _inside(kept, searched.stage.box)
        assert outer is None or _inside(kept, outer)
        assert kept.contains(searched.theta) and kept.contains(theta_final)
        assert stage.search_box is searched.stage.search_box  # the search's result is kept
        assert stage.mean_width < searched.stage.mean_width
        # every certificate of the run, diagonal or not, at beta / m
        assert set(stage.certificates) == set(range(t + 1))
        assert all(c.beta == beta for c in stage.certificates.values())
        outer = kept


def test_ladder_box_is_nested_float32_and_contains_the_projected_weights() -> None:
    box = Box(
        {"w": torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)},
        {"w": torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64)},
    )
    outer = Box({"w": torch.full((3,), -5.0)}, {"w": torch.full((3,), 5.0)})
    theta = {"w": torch.tensor([0.1, 0.0, 7.0])}  # the last entry outside: projected to 4.0
    assert ladder_box(box, theta, outer, 1.0) is box
    for scale in (0.7, 0.3, 1e-3):
        cand = ladder_box(box, theta, outer, scale)
        assert _inside(cand, box) and _inside(cand, outer)
        assert cand.contains({"w": torch.tensor([0.1, 0.0, 4.0])})
        for corner in (cand.lower["w"], cand.upper["w"]):
            assert torch.equal(corner.float().double(), corner)  # float32 values
        widths = cand.widths()["w"]
        assert float(widths[0]) == pytest.approx(2.0 * scale, abs=3e-7)  # float32 ulps
        assert float(widths[2]) == pytest.approx(2.0 * scale, abs=3e-7)  # float32 ulps
        assert float(widths[1]) == 0.0
    check_nested(ladder_box(box, theta, outer, 0.5), box)
    with pytest.raises(SoundnessError, match="not inside the previous LID on 'w'"):
        check_nested(box, ladder_box(box, theta, outer, 0.5))


def _certificate(lower: float, target: float) -> TaskCertificate:
    """A certificate whose bound is `lower` (k out of n chosen to match, Clopper-Pearson)."""
    n = 200
    for k in range(n + 1):
        cert = certificate_from_counts(
            {0: n},
            {0: k},
            task="t",
            metric="accuracy",
            target=target,
            beta=1e-3,
            bound_kind="clopper-pearson",
            method="ibp",
        )
        if cert.lower_bound >= lower:
            return cert
    raise AssertionError(lower)


def _stage(box: Box) -> LidStage:
    return LidStage(
        task=0,
        clean=1.0,
        target=0.7,
        search_target=0.7,
        box=box,
        search_box=box,
        chosen="c",
        feasible=True,
        optimisation_metric=0.7,
        mean_width=box.size(),
        n_frozen=0,
        n_boxed=box.n_parameters(),
        seconds=0.0,
    )


def _head_graph() -> Graph:
    return network_graph(LinearHead(3, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    ("bounds", "kept", "holds"),
    [((0.5, 0.75, 0.9), 0.5, True), ((0.5, 0.6, 0.65), 0.25, False), ((0.8,), 1.0, True)],
)
def test_climb_ladder_keeps_the_widest_that_holds_else_the_narrowest(
    bounds: tuple[float, ...], kept: float, holds: bool
) -> None:
    """Against a stand-in certifier (target 0.7): candidates certified widest first, the first
    that holds kept (none: the narrowest, whose certificate says it does not hold)."""
    graph = _head_graph()
    box = Box.around(dict(graph.parameters), radius=0.1).to(torch.float64)
    ladder = (1.0, 0.5, 0.25)
    calls: list[tuple[Box, TaskCertificate]] = []

    def certify(candidate: Box) -> TaskCertificate:
        calls.append((candidate, _certificate(bounds[len(calls)], 0.7)))
        return calls[-1][1]

    stage = climb_ladder(_stage(box), graph, [0, 1], None, ladder, certify)
    assert stage.ladder_scale == kept and len(calls) == ladder.index(kept) + 1
    assert calls[0][0] is box  # widest first: the searched box itself
    assert stage.box is calls[-1][0] and stage.certificates == {0: calls[-1][1]}
    assert stage.ladder_bounds == tuple(c.lower_bound for _, c in calls)
    assert [c.holds for _, c in calls] == [False] * (len(calls) - 1) + [holds]
    if kept < 1.0:
        assert stage.mean_width == pytest.approx(kept * box.size(), rel=1e-5)
    else:
        assert stage.mean_width == box.size()


def test_climb_ladder_refuses_an_empty_ladder() -> None:
    graph = _head_graph()
    box = Box.around(dict(graph.parameters), radius=0.1)
    with pytest.raises(ValueError, match="at least one scale"):
        climb_ladder(_stage(box), graph, [0], None, (), lambda _: _certificate(0.5, 0.7))


# ---- (c) bad ladders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ladder", "problem"),
    [
        ((0.7, 0.5), "must start at 1.0"),
        ((1.0, 1.2), r"must lie in \(0, 1\]; got 1.2"),
        ((1.0, 0.0), r"must lie in \(0, 1\]; got 0"),
        ((1.0, -0.5), r"must lie in \(0, 1\]; got -0.5"),
        ((1.0, math.nan), r"must lie in \(0, 1\]; got nan"),
        ((1.0, 0.5, 0.5), "strictly decreasing"),
        ((1.0, 0.5, 0.7), "strictly decreasing"),
    ],
)
def test_bad_ladders_raise_value_error_naming_the_problem(
    ladder: tuple[float, ...], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        LidConfig(ladder=ladder)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=problem):
        checked_ladder(ladder)


def test_good_ladders_are_kept_as_tuples() -> None:
    assert LidConfig(ladder=[1, 0.7, 0.5]).ladder == (1.0, 0.7, 0.5)  # type: ignore[arg-type]
    assert LidConfig(ladder=(1.0,)).ladder == (1.0,) and LidConfig().ladder == ()


def test_split_mnist_passes_ladder_to_every_lid_variant(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark("split_mnist", monkeypatch)
    parser = bench.build_parser()
    default = bench.settings_for(parser.parse_args([]))
    assert all(c.ladder == () for c in default.lid_variants.values())
    for argv in ([], ["--tiny"], ["--quick"]):
        args = parser.parse_args([*argv, "--ladder", "1", "0.7", "0.5", "--all-layer"])
        settings = bench.with_all_layer(bench.settings_for(args), args)
        assert len(settings.lid_variants) == 5
        assert all(c.ladder == (1.0, 0.7, 0.5) for c in settings.lid_variants.values())
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--ladder", "0.7", "0.5"])
    assert info.value.code == 2
    assert "--ladder: ladder must start at 1.0" in capsys.readouterr().err


# ---- (d) soundness: every network in a kept box classifies what the box certifies -------


def test_networks_sampled_in_kept_boxes_classify_every_certified_sample(
    ladder_run: LadderRun,
) -> None:
    views = lid_views(ladder_run.tasks, ladder_run.config)
    graph = network_graph(ladder_run.model)
    gen = torch.Generator().manual_seed(7)
    for t, stage in enumerate(ladder_run.run.stages):
        uniform = stage.box.sample(100, generator=gen)
        samples = list(chain(uniform, stage.box.sample(100, generator=gen, kind="vertex")))
        for j, cert in stage.certificates.items():
            view = views[j]
            sub = restrict_graph(graph, view.rows)
            sub_box = restrict_box(stage.box, graph, view.rows)
            mask, nonfinite = certify_samples(sub, sub_box, view.x_test, view.y_test)
            assert nonfinite == 0 and int(mask.sum()) == cert.k and cert.n == view.x_test.shape[0]
            assert int(mask.sum()) > 0, (t, j)
            x = view.x_test.double()
            for theta in samples:
                logits = torch.nn.functional.linear(x, theta["fc.weight"], theta["fc.bias"])
                pred = masked_logits(logits, view.rows).argmax(1)
                wrong = mask & (pred != view.y_test)
                assert not bool(wrong.any()), f"LID_{t} on task {j}: certified sample misclassified"
