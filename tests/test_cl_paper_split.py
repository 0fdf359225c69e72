"""The paper's Split-MNIST data protocol (issue 20, DESIGN.md section 5): a seeded 80/20
train/validation split of every task, every method training on the 80%, the LID search and τ
on the 20%, each LID certified on `n_certify` test samples, the accuracy matrix on the whole
test split; and benchmarks/split_mnist.py's `--protocol paper` (the default) / `issue7`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import verifier.cl.lid_learner as lid_learner
import verifier.cl.training as training
from tests.benchmark_loader import load_benchmark
from tests.cl_data import clusters
from verifier.cl.baselines import AGEM, EWC, SI, FineTune, Joint, LwF
from verifier.cl.lid_learner import PAPER_SEARCH, LidConfig, LidStage, run_lid_sequence
from verifier.cl.lid_views import certification_view, lid_views, validation_view
from verifier.cl.network import LinearHead
from verifier.cl.scenarios import SplitTask, hold_out_validation, masked_logits, split_pairs
from verifier.cl.training import Strategy, TrainConfig, run_sequence
from verifier.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    rows = {tuple(r.tolist()) for r in x.reshape(x.shape[0], -1)}
    assert len(rows) == x.shape[0]  # distinct samples
    return rows


def _labels(x: torch.Tensor, y: torch.Tensor) -> dict[tuple[float, ...], int]:
    """Each sample's label, keyed by its row."""
    return {tuple(r.tolist()): int(c) for r, c in zip(x, y, strict=True)}


def _tasks(n_train: int, n_test: int, *, seed: int = 0) -> list[SplitTask]:
    """Two Task-IL tasks of `2 * n_train` training and `2 * n_test` test samples, split 80/20."""
    train, test = clusters(n_train, 6, 0), clusters(n_test, 6, 1)
    tasks = split_pairs("task", [(1, 4), (2, 8)], train, test)
    return hold_out_validation(tasks, 0.2, torch.Generator().manual_seed(seed))


def _accuracy(model: torch.nn.Module, task: SplitTask, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((masked_logits(model(x), task.rows).argmax(1) == y).double().mean())


# ---- the split ----------------------------------------------------------------------------


def test_hold_out_validation_is_a_seeded_disjoint_80_20_split() -> None:
    train, test = clusters(30, 5, 0), clusters(10, 5, 1)
    whole = split_pairs("domain", [(3, 6), (0, 9), (4, 7)], train, test)
    tasks = hold_out_validation(whole, 0.2, torch.Generator().manual_seed(5))
    for before, after in zip(whole, tasks, strict=True):
        assert before.x_val is None and after.x_val is not None and after.y_val is not None
        n = before.x_train.shape[0]  # 60
        assert after.x_val.shape[0] == round(0.2 * n) == 12 and after.x_train.shape[0] == 48
        kept, held = _rows(after.x_train), _rows(after.x_val)
        assert not kept & held  # no sample in both parts
        assert kept | held == _rows(before.x_train)  # together: the whole training split
        label = _labels(before.x_train, before.y_train)
        for x, y in ((after.x_train, after.y_train), (after.x_val, after.y_val)):
            assert [label[tuple(r.tolist())] for r in x] == y.tolist()  # labels travel along
        # test split, rows and digits untouched
        assert torch.equal(after.x_test, before.x_test) and after.rows == before.rows
    # seeded: the same seed gives the same split, another seed another one
    again = hold_out_validation(whole, 0.2, torch.Generator().manual_seed(5))
    other = hold_out_validation(whole, 0.2, torch.Generator().manual_seed(6))
    for a, b, c in zip(tasks, again, other, strict=True):
        assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)  # type: ignore[arg-type]
        assert not torch.equal(a.x_val, c.x_val)  # type: ignore[arg-type]


def test_hold_out_validation_rejects_bad_fractions_and_a_second_split() -> None:
    train, test = clusters(2, 3, 0), clusters(2, 3, 1)
    tasks = split_pairs("task", [(0, 1)], train, test)  # 4 training samples
    for fraction in (0.0, 1.0, -0.2):
        with pytest.raises(InputError, match=r"in \(0, 1\)"):
            hold_out_validation(tasks, fraction, torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="empty"):  # round(0.1 * 4) = 0 validation samples
        hold_out_validation(tasks, 0.1, torch.Generator().manual_seed(0))
    split = hold_out_validation(tasks, 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="already holds a validation part"):
        hold_out_validation(split, 0.5, torch.Generator().manual_seed(0))


# ---- the views: search on validation, certify on n_certify test samples -------------------


def test_validation_views_search_on_the_validation_part_and_certify_on_n_test_samples() -> None:
    tasks = _tasks(100, 250)  # per task: 160 train / 40 validation, 500 test
    config = LidConfig(search_data="validation", n_certify=400, split_seed=3)
    views = lid_views(tasks, config)
    for task, view in zip(tasks, views, strict=True):
        assert torch.equal(view.x_train, task.x_val) and torch.equal(view.y_train, task.y_val)  # type: ignore[arg-type]
        assert view.x_test.shape[0] == 400 and task.x_test.shape[0] == 500
        cert = _rows(view.x_test)
        assert cert <= _rows(task.x_test)  # test samples ...
        assert not cert & (_rows(task.x_train) | _rows(task.x_val))  # type: ignore[arg-type]
        label = _labels(task.x_test, task.y_test)
        assert [label[tuple(r.tolist())] for r in view.x_test] == view.y_test.tolist()
    # seeded by split_seed (and the task index)
    again = lid_views(tasks, config)
    other = lid_views(tasks, replace(config, split_seed=4))
    assert all(torch.equal(a.x_test, b.x_test) for a, b in zip(views, again, strict=True))
    assert not torch.equal(views[0].x_test, other[0].x_test)
    assert not torch.equal(views[0].x_test, views[1].x_test[:400])
    # None: the whole test split; "train" with n_certify: the training split, n test samples
    whole = lid_views(tasks, replace(config, n_certify=None))
    assert all(torch.equal(v.x_test, t.x_test) for v, t in zip(whole, tasks, strict=True))
    train = lid_views(tasks, replace(config, search_data="train"))
    assert torch.equal(train[0].x_train, tasks[0].x_train) and train[0].x_test.shape[0] == 400


def test_views_reject_a_missing_validation_part_and_a_bad_n_certify() -> None:
    train, test = clusters(10, 3, 0), clusters(10, 3, 1)
    (plain,) = split_pairs("task", [(0, 1)], train, test)
    with pytest.raises(InputError, match="no validation part"):
        lid_views([plain], LidConfig(search_data="validation"))
    (task,) = hold_out_validation([plain], 0.2, torch.Generator().manual_seed(0))
    for n in (0, 21):  # 20 test samples
        with pytest.raises(InputError, match=r"n_certify must be in \[1, 20\]"):
            validation_view(task, n, 0)
    assert certification_view(task, 20, 0).x_test.shape[0] == 20
    with pytest.raises(InputError, match="unknown search_data"):
        lid_views([task], LidConfig(search_data="val"))  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_validation_lids_take_tau_from_validation_and_certify_on_400_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """τ = validation accuracy - tolerance (the validation labels of task 1 are half flipped,
    so it is far from the training accuracy); each certificate counts exactly 400 samples and
    proves no more than θ_t classifies correctly on them; the accuracy matrix is on the whole
    test split; training sees only the 80% part."""
    tasks = _tasks(100, 250)
    noisy = tasks[0].y_val.clone()  # type: ignore[union-attr]
    noisy[::2] = 1 - noisy[::2]
    tasks[0] = replace(tasks[0], y_val=noisy)
    trained: list[torch.Tensor] = []
    original = lid_learner.train_projected

    def spy(model: Any, task: SplitTask, *args: Any, **kwargs: Any) -> None:
        trained.append(task.x_train if kwargs.get("data") is None else kwargs["data"].x)
        original(model, task, *args, **kwargs)

    monkeypatch.setattr(lid_learner, "train_projected", spy)
    model = LinearHead(6, torch.Generator().manual_seed(0))
    search = PAPER_SEARCH.model_copy(
        update={"iterations": 10, "checkpoint_every": 5, "batch_size": 40, "target_slack": 0.0}
    )
    config = LidConfig(search=search, search_data="validation", n_certify=400)
    views = lid_views(tasks, config)
    seen: dict[int, dict[str, Any]] = {}

    def on_stage(stage: LidStage) -> None:  # the model is θ_t here
        t = stage.task
        seen[t] = {
            "val": _accuracy(model, tasks[t], tasks[t].x_val, tasks[t].y_val),  # type: ignore[arg-type]
            "train": _accuracy(model, tasks[t], tasks[t].x_train, tasks[t].y_train),
            "test": [_accuracy(model, u, u.x_test, u.y_test) for u in tasks],
            "correct": {
                j: int(round(_accuracy(model, views[j], views[j].x_test, views[j].y_test) * 400))
                for j in stage.certificates
            },
        }

    run = run_lid_sequence(
        model,
        tasks,
        TrainConfig(epochs=20, lr=1e-2),
        config,
        torch.Generator().manual_seed(1),
        on_stage=on_stage,
    )
    for stage in run.stages:
        t = stage.task
        assert stage.clean == pytest.approx(seen[t]["val"], abs=1e-12)
        assert stage.target == pytest.approx(seen[t]["val"] - config.tolerance)
        assert stage.certificates and set(stage.certificates) == set(range(t + 1))
        for j, cert in stage.certificates.items():
            assert cert.n == 400
            assert cert.k <= seen[t]["correct"][j]  # θ_t lies in the LID
            assert float(run.certified[t, j]) == cert.lower_bound
        torch.testing.assert_close(
            run.matrix[t], torch.tensor(seen[t]["test"], dtype=run.matrix.dtype)
        )
    assert seen[0]["train"] - seen[0]["val"] > 0.3  # τ really came from the validation part
    assert len(trained) == 2
    for x, task in zip(trained, tasks, strict=True):
        assert _rows(x) == _rows(task.x_train)  # the 80% part, no validation sample
        assert not _rows(x) & _rows(task.x_val)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_every_baseline_trains_on_the_training_part_only(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = _tasks(20, 5)
    trained: list[torch.Tensor] = []
    original = training.task_loss

    def spy(model: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        trained.append(x.detach().clone())
        return original(model, x, *args)

    monkeypatch.setattr(training, "task_loss", spy)
    train_rows = set().union(*(_rows(t.x_train) for t in tasks))
    val_rows = set().union(*(_rows(t.x_val) for t in tasks))  # type: ignore[arg-type]
    strategies: Sequence[Strategy] = (FineTune(), EWC(1.0), SI(1.0), LwF(1.0), AGEM(16), Joint())
    for strategy in strategies:
        trained.clear()
        model = LinearHead(6, torch.Generator().manual_seed(0))
        run_sequence(model, strategy, tasks, TrainConfig(epochs=1), torch.Generator())
        rows = set().union(*(_rows(x) for x in trained))
        assert rows == train_rows, type(strategy).__name__  # all of the 80% parts, nothing else
        assert not rows & val_rows


# ---- the benchmark ------------------------------------------------------------------------


def _mnist_like() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": clusters(10, 4, 0), "test": clusters(5, 4, 1)}


def test_split_mnist_paper_protocol_is_the_default_and_shared_by_every_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = load_benchmark("split_mnist", monkeypatch)
    args = bench.build_parser().parse_args([])
    assert args.protocol == "paper"
    settings = bench.settings_for(args)
    assert settings.protocol == "paper"
    for config in settings.lid_variants.values():
        assert (config.search_data, config.n_certify) == ("validation", 400)
    assert (config.tolerance, config.beta) == (0.12, 1e-3)
    # the tasks every method of a (scenario, seed) gets: the same 80 / 20 split
    captured: dict[str, list[SplitTask]] = {}
    learners: dict[str, Any] = {}

    def record(
        scenario: str, seed: int, method: str, tasks: list[SplitTask], *args: Any, **_: Any
    ) -> dict[str, Any]:
        captured[method], learners[method] = tasks, args[3]  # the learner
        return {}

    monkeypatch.setattr(bench.cl_report, "job_record", record)
    mnist = _mnist_like()
    for method in [*settings.lid_variants, *settings.baselines]:
        bench.method_job(settings, "class", 2, method, None, mnist)
    for method in settings.lid_variants:  # the paper's data, certification samples per run
        lid = learners[method]
        assert (lid.search_data, lid.n_certify, lid.split_seed) == ("validation", 400, 2)
    reference = captured["LID"]
    assert len(captured) == len(settings.lid_variants) + len(settings.baselines)
    for tasks in captured.values():
        for task, ref in zip(tasks, reference, strict=True):
            assert torch.equal(task.x_train, ref.x_train) and torch.equal(task.x_val, ref.x_val)
            assert task.x_train.shape[0] == 16 and task.x_val.shape[0] == 4  # 80 / 20 of 20
            assert not _rows(task.x_train) & _rows(task.x_val)
    # other scenarios of the seed hold out the same samples; another seed others
    domain = bench._tasks(settings, "domain", 2, mnist)
    assert all(torch.equal(a.x_val, b.x_val) for a, b in zip(domain, reference, strict=True))
    assert not torch.equal(bench._tasks(settings, "class", 3, mnist)[0].x_val, reference[0].x_val)
    # issue7: the whole train split, search on it, certificate on the whole test split
    old_args = bench.build_parser().parse_args(["--protocol", "issue7"])
    old = bench.settings_for(old_args)
    assert all((c.search_data, c.n_certify) == ("train", None) for c in old.lid_variants.values())
    (first, *_) = bench._tasks(old, "class", 2, mnist)
    assert first.x_val is None and first.x_train.shape[0] == 20
    # the replay-buffer variants follow the protocol too (τ from validation, 400 certified)
    buffers = bench.build_parser().parse_args(["--buffers", "SMALL"])
    buffered = bench.cl_report.with_buffers(settings, buffers)
    replay = buffered.lid_variants["LID buffer SMALL"]
    assert (replay.search_data, replay.n_certify) == ("validation", 400)
    assert buffered.lid_variants["LID"].search_data == "validation"


@pytest.mark.timeout(120)
def test_tiny_split_mnist_records_the_data_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tiny under the default protocol: the raw results name it, every LID certificate
    counts n_certify (32 of the 64 test samples), the tasks train on 80% of their 640 samples;
    the notes say so; --merge refuses another protocol and --from-raw keeps the raw's."""
    bench = load_benchmark("split_mnist", monkeypatch)
    out, plots, raw = tmp_path / "r.md", tmp_path / "plots", tmp_path / "raw.json"
    files = ["--out", str(out), "--plots", str(plots), "--raw", str(raw)]
    argv = ["--tiny", "--workers", "0", "--scenarios", "domain", "--methods", "LID", "fine-tune"]
    assert bench.main([*argv, *files]) == 0
    saved = json.loads(raw.read_text(encoding="utf-8"))
    assert saved["protocol"] == "paper"
    assert saved["protocol_data"] == {
        "validation_fraction": 0.2,
        "search_data": "validation",
        "n_certify": 32,
    }
    for result in saved["results"]:
        assert result["n_train"] == [round(0.8 * 640)] * 2 and result["n_test"] == [64, 64]
    lid = next(r for r in saved["results"] if r["method"] == "LID")
    counts = [n for s in lid["stages"] for _, n in s["certified_counts"].values()]
    assert counts and set(counts) == {32}
    text = out.read_text(encoding="utf-8")
    assert "Protocol `paper`" in text and "32 samples drawn (seeded per run)" in text
    assert "τ = accuracy on the task's validation part" in text
    assert bench.main([*argv, *files, "--merge", "--protocol", "issue7"]) == 2
    assert json.loads(raw.read_text(encoding="utf-8")) == saved  # untouched
    assert bench.main([*argv, *files, "--from-raw", "--protocol", "issue7"]) == 0
    assert out.read_text(encoding="utf-8") == text  # the raw's protocol wins
