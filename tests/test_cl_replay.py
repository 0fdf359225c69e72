"""Replay buffers and LIDs recomputed on them (verifier.cl.buffers, verifier.cl.replay), A-GEM at
the same buffer sizes, and a tiny Split-MNIST benchmark run with buffer methods."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.benchmark_loader import load_benchmark
from verifier.certify import certify_samples, required_rate
from verifier.cl.baselines import AGEM
from verifier.cl.buffers import BUFFER_SIZES, LARGE, MEDIUM, SMALL, BufferSize, buffer_order
from verifier.cl.heads import lift_box, pin_zero_width, restrict_box, restrict_graph
from verifier.cl.lid_learner import PAPER_SEARCH, LidConfig, held_out_view, train_projected
from verifier.cl.lid_views import lid_views
from verifier.cl.network import LinearHead, SplitMnistCNN, network_graph
from verifier.cl.replay import (
    Constraint,
    ReplayConfig,
    ReplayRun,
    fit_to_views,
    loosen_targets,
    recompute_lid,
    run_replay_sequence,
    train_replay,
)
from verifier.cl.scenarios import Scenario, SplitTask, split_pairs
from verifier.cl.training import TrainConfig, TrainingData
from verifier.domains.box import Box
from verifier.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SEARCH = PAPER_SEARCH.model_copy(
    update={"iterations": 20, "checkpoint_every": 5, "batch_size": 100, "target_slack": 0.02}
)
TINY_BUFFER = BufferSize("TINY", (60, 40), repeats=2, chunk_size=20)


def _feature_tasks(
    scenario: Scenario, *, n_train: int = 30, n_test: int = 40, seed: int = 0, dim: int = 8
) -> list[SplitTask]:
    """Three tasks of Gaussian clusters (10 classes, `n_train` / `n_test` per class)."""
    gen = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(10, dim, generator=gen)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(10).repeat_interleave(per_class)
        return means[y] + torch.randn(y.numel(), dim, generator=gen), y

    return split_pairs(scenario, [(0, 1), (2, 3), (4, 5)], draw(n_train), draw(n_test))


def _rows_of(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.flatten(1).tolist()}


# ---- buffers ---------------------------------------------------------------------------


def test_named_sizes_totals_chunks_and_repeats() -> None:
    assert [b.total for b in (SMALL, MEDIUM, LARGE)] == [1000, 5000, 15000]
    assert [b.repeats for b in (SMALL, MEDIUM, LARGE)] == [1, 3, 7]
    assert set(BUFFER_SIZES) == {"SMALL", "MEDIUM", "LARGE"}
    for size in (SMALL, MEDIUM, LARGE):
        assert size.chunk_size == 200
        assert all(a % 200 == 0 for a in size.per_task)
        assert list(size.per_task) == sorted(size.per_task, reverse=True)  # earlier: more
        assert size.allocation(4) == 0  # the last task stores nothing
    assert LARGE.per_task == (4400, 3800, 3800, 3000)


@pytest.mark.parametrize("size", [SMALL, MEDIUM, LARGE])
def test_buffers_grow_by_chunks_up_to_the_allocation(size: BufferSize) -> None:
    for j in range(4):
        chunks = size.allocation(j) // size.chunk_size
        sizes = [size.in_use(j, grown, 10**6) for grown in range(size.repeats + 1)]
        assert sizes[0] == size.step(j) * size.chunk_size > 0
        assert sizes[-1] == size.allocation(j)  # the last repeat uses the whole allocation
        assert all(s % size.chunk_size == 0 for s in sizes)
        assert all(b >= a for a, b in zip(sizes, sizes[1:], strict=False))
        assert all(
            b - a <= size.step(j) * size.chunk_size for a, b in zip(sizes, sizes[1:], strict=False)
        )
        assert size.in_use(j, 100, 10**6) == chunks * size.chunk_size  # never past it
        assert size.in_use(j, 0, 150) == min(150, sizes[0])  # a small split: all of it
    assert LARGE.in_use(0, 0, 10**6) == 600 and LARGE.in_use(0, 1, 10**6) == 1200


def test_buffer_order_is_a_seeded_permutation_and_bad_sizes_fail() -> None:
    task = _feature_tasks("domain")[1]
    order = buffer_order(task, 3)
    assert sorted(order.tolist()) == list(range(task.x_train.shape[0]))
    assert torch.equal(order, buffer_order(task, 3))
    assert not torch.equal(order, buffer_order(task, 4))
    with pytest.raises(InputError, match="multiple of 200"):
        BufferSize("BAD", (300,), repeats=1)
    with pytest.raises(InputError, match="repeats"):
        BufferSize("BAD", (200,), repeats=-1)


def test_agem_stores_the_buffers_allocation_and_samples() -> None:
    tasks = _feature_tasks("domain", n_train=30)  # 60 training samples per task
    size = BufferSize("S", (40, 20), repeats=1, chunk_size=20)
    agem = AGEM(size, buffer_seed=5)
    model = LinearHead(8, torch.Generator().manual_seed(0))
    for t, task in enumerate(tasks):
        agem.after_task(model, task, tasks[:t])
    assert [len(d) for d in agem.per_task] == [40, 20, 0]
    for task, data in zip(tasks, agem.per_task, strict=True):
        keep = buffer_order(task, 5)[: size.stored(task.index, 60)]
        assert torch.equal(data.x, task.x_train[keep])
        assert torch.equal(data.y, task.y_train[keep])
    assert agem.memory is not None and len(agem.memory) == 60
    assert AGEM(LARGE).memory_size is LARGE and AGEM(MEDIUM).memory_size.total == 5000


# ---- the recomputed LID and projected replay training ----------------------------------


def _trained_head(tasks: list[SplitTask]) -> LinearHead:
    model = LinearHead(8, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    for task in tasks:
        train_projected(model, task, None, TrainConfig(epochs=20, batch_size=16, lr=0.02), gen)
    return model


def _constraints(model: Any, tasks: list[SplitTask], n: int | None = None) -> list[Constraint]:
    out = []
    for task in tasks:
        x, y = task.x_train[:n], task.y_train[:n]
        graph = restrict_graph(network_graph(model), task.rows)
        with torch.no_grad():
            clean = float((graph(x).argmax(1) == y).double().mean())
        assert clean > 0.2  # above chance: the constraints are not trivial
        out.append(Constraint(task, x, y, clean - 0.1, task.x_test.shape[0]))
    return out


@pytest.mark.parametrize("scenario", ["domain", "task", "class"])
def test_recomputed_lid_meets_every_previous_tasks_constraint(scenario: Scenario) -> None:
    tasks = _feature_tasks(scenario)
    model = _trained_head(tasks[:2])
    constraints = _constraints(model, tasks[:2])
    config = LidConfig(search=SEARCH, boxed="all")
    lid = recompute_lid(model, constraints, config, torch.Generator().manual_seed(0))
    assert lid.feasible
    graph = network_graph(model)
    assert lid.box.contains(graph.parameters)  # centred on the current weights
    assert lid.searched.size("mean_width") > 0
    for c, rate, aim in zip(constraints, lid.rates, lid.search_targets, strict=True):
        sub = restrict_graph(graph, c.task.rows)
        pinned, rest = pin_zero_width(sub, restrict_box(lid.box, graph, c.task.rows))
        mask, _ = certify_samples(pinned, rest, c.x, c.y, method="ibp")  # float64 proof
        proved = float(mask.double().mean())
        assert proved >= aim >= c.target - 1e-12  # every constraint, on the whole search data
        assert proved >= rate - 1e-12


def test_recomputed_head_lid_on_the_cnn_pins_the_convolutions_and_frees_unread_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    model = SplitMnistCNN(gen)
    x = torch.rand(60, 1, 28, 28, generator=gen)
    with torch.no_grad():
        logits = model(x)
    tasks = []
    for index, rows in enumerate([(0, 1), (2, 3)]):
        y = logits[:, list(rows)].argmax(1)  # the network's own masked predictions: clean 1.0
        tasks.append(SplitTask(index, rows, rows, x, y, x, y))
    constraints = [Constraint(t, t.x_train, t.y_train, 0.9, 60) for t in tasks]
    config = LidConfig(search=SEARCH, boxed="head")
    lid = recompute_lid(model, constraints, config, torch.Generator().manual_seed(1))
    assert lid.feasible and min(lid.rates) >= 0.9
    for name in ("conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias"):
        assert torch.equal(lid.box.lower[name], lid.box.upper[name])  # frozen body
    rows_4_to_9 = lid.box.upper["fc.bias"][4:] - lid.box.lower["fc.bias"][4:]
    assert float(rows_4_to_9.min()) > 100  # rows no constraint reads stay free
    assert set(lid.searched.lower) == {"fc.weight", "fc.bias"}


def test_projected_replay_training_stays_inside_the_lid() -> None:
    tasks = _feature_tasks("domain")
    model = _trained_head(tasks[:1])
    lid = recompute_lid(
        model,
        _constraints(model, tasks[:1]),
        LidConfig(search=SEARCH),
        torch.Generator().manual_seed(0),
    )
    free = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffer = TrainingData.of_task(tasks[0])
    for network, box in ((model, lid.box), (free, None)):
        train_replay(
            network,
            TrainingData.of_task(tasks[1]),
            TrainingData(buffer.x[:20], buffer.y[:20], buffer.rows[:20]),
            box,
            TrainConfig(epochs=3, lr=0.05),
            torch.Generator().manual_seed(1),
            replay_batch=8,
        )
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert lid.box.contains(params)
    assert any(not torch.equal(params[n], before[n]) for n in params)  # it trained
    assert not lid.box.contains(dict(free.named_parameters()))  # unprojected, it leaves


def _view_rate(graph: Any, box: Box, view: SplitTask) -> float:
    """Proved (float64 interval) rate of the box on the view's search samples."""
    sub = restrict_graph(graph, view.rows)
    pinned, rest = pin_zero_width(sub, restrict_box(box, graph, view.rows))
    mask, _ = certify_samples(pinned, rest, view.x_train, view.y_train, method="ibp")
    return float(mask.double().mean())


def test_validation_fit_scales_an_overwide_lid_to_the_largest_scale_that_fits_the_views() -> None:
    tasks = _feature_tasks("task", n_train=60, n_test=80)
    model = _trained_head(tasks[:2])
    lid = recompute_lid(
        model,
        _constraints(model, tasks[:2]),
        LidConfig(search=SEARCH, boxed="all"),
        torch.Generator().manual_seed(0),
    )
    graph = network_graph(model)
    wide_box = lid.box.scaled(graph.parameters, 30.0)  # far past what the views allow
    read = [0, 1, 2, 3]
    wide_rows = restrict_box(wide_box, graph, read)
    names = list(lid.searched.lower)
    wide_searched = Box(
        {n: wide_rows.lower[n] for n in names}, {n: wide_rows.upper[n] for n in names}
    )
    wide = dataclasses.replace(lid, box=wide_box, searched=wide_searched)
    config = ReplayConfig(
        search=SEARCH,
        boxed="all",
        search_data="test",
        certification_fraction=0.5,
        beta=0.01,
        fit_z=1.0,
    )
    views = lid_views(tasks, config)
    fitted = fit_to_views(model, wide, views, config)
    assert 0.0 < fitted.scale < 1.0 and "scaled by" in fitted.chosen
    assert fitted.box.contains(graph.parameters)  # still centred on the weights
    for n in wide_box.names:  # a subset of the searched box
        assert bool((fitted.box.lower[n] >= wide_box.lower[n]).all())
        assert bool((fitted.box.upper[n] <= wide_box.upper[n]).all())
    for n in ("weight", "bias"):  # the rows no constraint reads stay as they were
        name = next(m for m in wide_box.names if m.endswith(n))
        assert torch.equal(fitted.box.lower[name][4:], wide_box.lower[name][4:])
    point = Box(graph.parameters, graph.parameters)
    needs = []
    for j, view in enumerate(views[:2]):
        a = required_rate(lid.targets[j], view.x_test.shape[0], 0.01, "clopper-pearson")
        se = math.sqrt(a * (1 - a) * (1 / view.x_test.shape[0] + 1 / view.x_train.shape[0]))
        needs.append(min(a + se, _view_rate(graph, point, view)))
    rates = [_view_rate(graph, fitted.box, v) for v in views[:2]]
    assert rates == pytest.approx(list(fitted.view_rates), abs=1e-12)
    assert all(r >= need for r, need in zip(rates, needs, strict=True))  # it fits
    # and it is the largest scale that does (to the bisection's step): 2 steps wider fails
    wider = fit_to_views(model, wide, views, dataclasses.replace(config, fit_z=None))
    assert wider is wide  # no fit asked: unchanged
    grown = wide_searched.scaled(
        {n: restrict_box(point, graph, read).lower[n] for n in names}, fitted.scale + 2 / 256
    )
    lifted = lift_box(grown, wide_box, graph, read)
    assert any(
        _view_rate(graph, lifted, v) < need for v, need in zip(views[:2], needs, strict=True)
    )


# ---- the whole protocol -----------------------------------------------------------------


def _config(**changes: Any) -> ReplayConfig:
    search = SEARCH.model_copy(update={"iterations": 10})
    return ReplayConfig(search=search, buffer=TINY_BUFFER, beta=0.01, **changes)


def _replay(
    tasks: list[SplitTask], config: ReplayConfig, scenario: Scenario, epochs: int = 1
) -> ReplayRun:
    """The replay protocol on a fresh 8-feature linear head (seeded as every test here)."""
    head = LinearHead(8, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    return run_replay_sequence(
        head, tasks, TrainConfig(epochs=epochs), config, generator, scenario=scenario
    )


def test_certificates_use_only_held_out_samples_and_buffers_only_training_samples() -> None:
    tasks = _feature_tasks("domain")
    config = _config(search_data="test", certification_fraction=0.5, split_seed=7)
    run = _replay(tasks, config, "domain", epochs=2)
    n = len(tasks)
    assert run.matrix.shape == run.certified.shape == (n, n)
    assert len(run.stages) == n
    for t in range(n):
        assert all(0.0 <= float(run.certified[t, j]) <= 1.0 for j in range(t + 1))
    for j, task in enumerate(tasks):
        x_cert, y_cert = run.held_out[j]
        view = held_out_view(task, 0.5, 7)
        assert torch.equal(x_cert, view.x_test)
        searched = _rows_of(view.x_train)  # τ and the repeat rule's accuracy
        held = _rows_of(x_cert)
        assert held.isdisjoint(_rows_of(task.x_train))  # buffers, training
        assert held.isdisjoint(searched)
        idx = run.buffer_indices[j]
        assert all(0 <= i < task.x_train.shape[0] for i in idx.tolist())
        assert len(set(idx.tolist())) == idx.numel()
        for stage in run.stages[j:]:
            cert = stage.certificates[j]
            assert cert.n == x_cert.shape[0]  # exactly the held-out part, nothing else
    sizes = [r.buffer_sizes for r in run.rounds]
    assert all(s % TINY_BUFFER.chunk_size == 0 for row in sizes for s in row)
    assert run.buffer_indices[n - 1].numel() == 0  # the last task stores nothing


def test_repeat_rule_stops_at_the_limit_and_the_loosening_rule_loosens_the_closest() -> None:
    tasks = _feature_tasks("task")
    config = _config(repeat_target=1.0, min_gain=1.0)  # never reached; every repeat loosens
    run = _replay(tasks, config, "task")
    checked = 0
    for i in (1, 2):
        rounds = [r for r in run.rounds if r.task == i]
        if any(r.accuracy >= 1.0 for r in rounds):
            continue  # reached 1.0 (stops early, never past the limit)
        checked += 1
        assert [r.round for r in rounds] == list(range(TINY_BUFFER.repeats + 1))
        for before, after in zip(rounds, rounds[1:], strict=False):
            if before.loosened is None:
                assert after.targets == before.targets
                continue
            margins = [rate - tau for rate, tau in zip(before.rates, before.targets, strict=True)]
            assert before.loosened == margins.index(min(margins))
            for k, (old, new) in enumerate(zip(before.targets, after.targets, strict=True)):
                expected = max(0.0, old - 0.01) if k == before.loosened else old
                assert new == pytest.approx(expected, abs=1e-12)
        assert rounds[0].loosened is None  # round 0 has no gain
        assert rounds[1].loosened is not None  # gain < 1.0 and another repeat follows
        assert rounds[-1].loosened is None  # no repeat follows the last one
        assert rounds[1].buffer_sizes[-1] > rounds[0].buffer_sizes[-1]  # more chunks
    assert checked >= 1
    easy = _replay(tasks, _config(repeat_target=0.0), "task")
    assert [r.round for r in easy.rounds] == [0, 0]  # met at once: no repeat


def test_loosen_targets_picks_the_smallest_margin() -> None:
    targets, index = loosen_targets([0.8, 0.5, 0.7], [0.9, 0.53, 0.71], 0.01)
    assert index == 2 and targets == pytest.approx([0.8, 0.5, 0.69])
    targets, index = loosen_targets([0.005], [0.0], 0.01)
    assert index == 0 and targets == [0.0]
    with pytest.raises(InputError):
        loosen_targets([0.5], [], 0.01)


def test_look_ahead_freezes_the_entries_least_important_for_the_task_trained_next() -> None:
    """With q > 0 the recomputed LID pins the q least important entries (Fisher on the next
    task's training split) at the centre, the rest stay searched, and every constraint is
    still proved; the replay run records the frozen count and meets its held-out bounds."""
    tasks = _feature_tasks("class")
    model = _trained_head(tasks[:2])
    constraints = _constraints(model, tasks[:2])
    graph = network_graph(model)
    for q in (0.0, 0.5):
        config = LidConfig(search=SEARCH, boxed="all", lookahead=q)
        lid = recompute_lid(
            model, constraints, config, torch.Generator().manual_seed(0), next_task=tasks[2]
        )
        assert lid.feasible
        widths = torch.cat(
            [(lid.searched.upper[n] - lid.searched.lower[n]).flatten() for n in lid.searched.lower]
        )
        assert lid.n_frozen == int(q * widths.numel())  # no ties in a real Fisher
        assert int((widths == 0).sum()) >= lid.n_frozen
        assert int((widths > 0).sum()) > 0
        for c, aim in zip(constraints, lid.search_targets, strict=True):
            sub = restrict_graph(graph, c.task.rows)
            pinned, rest = pin_zero_width(sub, restrict_box(lid.box, graph, c.task.rows))
            mask, _ = certify_samples(pinned, rest, c.x, c.y, method="ibp")
            assert float(mask.double().mean()) >= aim >= c.target - 1e-12
    # without a next task nothing is frozen
    plain = recompute_lid(
        model, constraints, LidConfig(search=SEARCH, lookahead=0.5), torch.Generator()
    )
    assert plain.n_frozen == 0
    run = _replay(tasks, _config(lookahead=0.5), "class")
    assert [s.n_frozen > 0 for s in run.stages] == [True, True, False]  # the last: no next
    for stage in run.stages:  # every stage certified on its tasks' held-out samples
        for j, cert in stage.certificates.items():
            assert cert.n == run.held_out[j][1].numel() and 0.0 <= cert.lower_bound <= 1.0


def test_replay_config_of_keeps_the_lid_settings() -> None:
    lid = LidConfig(search=SEARCH, boxed="all", lookahead=0.5, search_data="test", tolerance=0.1)
    config = ReplayConfig.of(lid, LARGE, active_classes=True)
    assert config.buffer is LARGE and config.lookahead == 0.5 and config.active_classes
    assert ReplayConfig.of(lid, LARGE, lookahead=0.0).lookahead == 0.0
    for bad in (-0.1, 1.0, math.nan):  # a fraction of the entries, the whole box never
        with pytest.raises(ValueError, match="lookahead"):
            ReplayConfig.of(lid, LARGE, lookahead=bad)
    assert (config.boxed, config.search_data, config.tolerance) == ("all", "test", 0.1)
    assert config.search is SEARCH and isinstance(config, LidConfig)


# ---- the benchmark ------------------------------------------------------------------------


def _benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_benchmark("split_mnist", monkeypatch)


@pytest.mark.timeout(120)
def test_tiny_benchmark_run_with_buffer_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _benchmark_module(monkeypatch)
    out, plots, raw = tmp_path / "r.md", tmp_path / "plots", tmp_path / "raw.json"
    argv = ["--tiny", "--workers", "0", "--scenarios", "domain", "--buffers", "SMALL"]
    argv += ["--methods", "LID buffer SMALL", "A-GEM buffer SMALL", "LID+look-ahead buffer SMALL"]
    argv += ["--out", str(out), "--plots", str(plots), "--raw", str(raw)]
    assert bench.main(argv) == 0
    results = json.loads(raw.read_text(encoding="utf-8"))["results"]
    assert {r["method"] for r in results} == {
        "LID buffer SMALL",
        "A-GEM buffer SMALL",
        "LID+look-ahead buffer SMALL",
    }
    ahead = next(r for r in results if r["method"] == "LID+look-ahead buffer SMALL")
    frozen = [stage["n_frozen"] for stage in ahead["stages"]]
    assert all(f > 0 for f in frozen[:-1]) and frozen[-1] == 0  # q 0.825 before each task
    lid = next(r for r in results if r["method"] == "LID buffer SMALL")
    assert lid["buffer"]["size"] == "SMALL" and lid["buffer"]["rounds"]
    assert all(0.0 <= v <= 1.0 for v in lid["certified"][-1])
    assert not math.isnan(lid["matrix"][-1][0])
    text = out.read_text(encoding="utf-8")
    assert "| LID buffer SMALL |" in text and "| A-GEM buffer SMALL |" in text
    row = next(line for line in text.splitlines() if line.startswith("| LID+look-ahead buffer"))
    assert row.endswith("| 0.75 (0.65) |")  # beside the paper's SMALL Domain-IL cell
    assert "rows add look-ahead of ours to the paper's buffer protocol" in text  # named


@pytest.mark.parametrize("q", ["1.5", "-0.1", "nan", "half"])
def test_a_bad_look_ahead_fraction_is_one_line_and_exit_2(
    q: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _benchmark_module(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--tiny", "--methods", "LID+look-ahead buffer SMALL", "--buffer-lookahead", q])
    assert exit_info.value.code == 2
    assert f"--buffer-lookahead: expected a number in [0, 1); got '{q}'" in capsys.readouterr().err


def test_the_paper_data_protocol_reaches_the_replay_learner() -> None:
    """search_data="validation": τ_j from each task's validation part, certificates on
    n_certify test samples, buffers only from the training part (never validation)."""
    from verifier.cl.lid_views import validation_view
    from verifier.cl.scenarios import hold_out_validation

    tasks = hold_out_validation(
        _feature_tasks("domain", n_train=40), 0.25, torch.Generator().manual_seed(3)
    )
    config = _config(search_data="validation", n_certify=50, split_seed=5)
    run = _replay(tasks, config, "domain", epochs=2)
    for j, task in enumerate(tasks):
        x_cert, _ = run.held_out[j]
        assert torch.equal(x_cert, validation_view(task, 50, 5).x_test)
        assert x_cert.shape[0] == 50
        assert _rows_of(x_cert) <= _rows_of(task.x_test)
        assert task.x_val is not None
        buffered = _rows_of(task.x_train[run.buffer_indices[j]])
        assert buffered.isdisjoint(_rows_of(task.x_val))
        for stage in run.stages[j:]:
            assert stage.certificates[j].n == 50
