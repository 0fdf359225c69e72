"""Split-CIFAR-10 on frozen features: the linear-head network, generic split tasks, nested head
LIDs, and a synthetic end-to-end run of benchmarks/split_cifar.py (no cache, no encoder)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.benchmark_loader import load_benchmark
from tests.cl_data import clusters
from verifier.cl.lid_learner import PAPER_SEARCH, LidConfig, held_out_view, run_lid_sequence
from verifier.cl.network import LinearHead, SplitMnistCNN, cnn_graph, network_graph
from verifier.cl.scenarios import masked_logits, split_mnist, split_pairs
from verifier.cl.training import TrainConfig
from verifier.data.embeddings import Source
from verifier.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_linear_head_graph_matches_the_module() -> None:
    model = LinearHead(12, torch.Generator().manual_seed(0))
    graph = network_graph(model)
    assert list(graph.parameters) == ["fc.weight", "fc.bias"]
    assert graph.input_shape == (12,) and graph.n_classes == 10
    x = torch.rand(7, 12)
    torch.testing.assert_close(graph(x), model(x))
    assert torch.equal(model.features(x), x)
    # the same generator gives the same weights; the global RNG is not used
    again = LinearHead(12, torch.Generator().manual_seed(0))
    assert torch.equal(again.fc.weight, model.fc.weight)
    bound = 1.0 / math.sqrt(12)
    assert float(model.fc.weight.detach().abs().max()) <= bound


def test_network_graph_of_the_cnn_is_cnn_graph() -> None:
    cnn = SplitMnistCNN(torch.Generator().manual_seed(1))
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(network_graph(cnn)(x), cnn_graph(cnn)(x))
    with pytest.raises(TypeError, match="LinearHead"):
        network_graph(torch.nn.Linear(3, 2))  # type: ignore[arg-type]


def test_split_pairs_takes_feature_vectors_and_equals_split_mnist() -> None:
    train, test = clusters(6, 5, 0, non_negative=True), clusters(4, 5, 1, non_negative=True)
    pairs = [(3, 7), (0, 9)]
    for scenario in ("task", "domain", "class"):
        a = split_pairs(scenario, pairs, train, test)
        b = split_mnist(scenario, pairs, train, test)
        for ta, tb in zip(a, b, strict=True):
            assert ta.rows == tb.rows and ta.digits == tb.digits
            assert torch.equal(ta.x_train, tb.x_train) and torch.equal(ta.y_test, tb.y_test)
        assert a[0].x_train.shape == (12, 5) and a[0].x_test.shape == (8, 5)
    assert split_pairs("task", pairs, train, test)[0].rows == (3, 7)


def test_held_out_view_splits_the_test_split_into_disjoint_seeded_parts() -> None:
    train, test = clusters(6, 5, 0, non_negative=True), clusters(5, 5, 1, non_negative=True)
    task = split_pairs("task", [(3, 7)], train, test)[0]
    view = held_out_view(task, 0.4, 0)
    assert view.x_test.shape[0] == 4 and view.x_train.shape[0] == 6
    both = torch.cat([view.x_train, view.x_test])
    rows = {tuple(r.tolist()) for r in both}
    assert len(rows) == 10 and rows == {tuple(r.tolist()) for r in task.x_test}
    assert torch.equal(held_out_view(task, 0.4, 0).x_test, view.x_test)
    assert not torch.equal(held_out_view(task, 0.4, 1).x_test, view.x_test)
    assert view.rows == task.rows and view.index == task.index
    with pytest.raises(InputError, match="empty"):
        held_out_view(task, 0.01, 0)


@pytest.mark.parametrize(
    ("scenario", "search_data", "slack"),
    [("task", "train", "auto"), ("class", "train", "auto"), ("task", "test", 0.05)],
)
@pytest.mark.timeout(120)
def test_nested_head_lids_on_features_certify_soundly(
    scenario: str, search_data: str, slack: str | float
) -> None:
    """Two tasks with a LinearHead: nested LIDs, weights inside, and every network sampled
    from the last LID is at least as accurate on each task's held-out data as certified."""
    train, test = clusters(40, 8, 2, non_negative=True), clusters(30, 8, 3, non_negative=True)
    tasks = split_pairs(scenario, [(1, 4), (2, 8)], train, test)  # type: ignore[arg-type]
    model = LinearHead(8, torch.Generator().manual_seed(0))
    search = PAPER_SEARCH.model_copy(
        update={
            "iterations": 20,
            "checkpoint_every": 5,
            "batch_size": 80,
            "target_slack": slack,
        }
    )
    config = LidConfig(search=search, search_data=search_data)  # type: ignore[arg-type]
    run = run_lid_sequence(
        model, tasks, TrainConfig(epochs=20, lr=1e-2), config, torch.Generator().manual_seed(1)
    )
    first, last = run.stages[0].box, run.stages[1].box
    for stage in run.stages:
        assert stage.search_target <= stage.clean
        if slack != "auto":  # a fixed margin above τ, capped at the clean accuracy
            expected = min(stage.target + float(slack), stage.clean)
            assert stage.search_target == pytest.approx(expected)
    theta = dict(model.named_parameters())
    assert first.contains(theta) and last.contains(theta)
    for name, lower in last.lower.items():  # LID_2 inside LID_1
        assert bool((lower >= first.lower[name]).all())
        assert bool((last.upper[name] <= first.upper[name]).all())
    assert float(run.matrix[0, 0]) > 0.9  # the clusters are separable
    assert float(run.certified[1, 0]) >= float(run.certified[0, 0])  # never fewer proofs
    if scenario == "task":
        assert float(run.certified[1].min()) > 0.3  # something was proved
    gen = torch.Generator().manual_seed(4)
    for j, task in enumerate(tasks):
        if search_data == "test":  # the certificate's part of the test split
            task = held_out_view(task, config.certification_fraction, config.split_seed)
            assert task.x_test.shape[0] == 30
        bound = float(run.certified[1, j])
        assert 0.0 <= bound <= 1.0
        for sample in last.sample(20, generator=gen, kind="vertex"):
            logits = torch.nn.functional.linear(
                task.x_test.double(), sample["fc.weight"], sample["fc.bias"]
            )
            accuracy = float(
                (masked_logits(logits, task.rows).argmax(1) == task.y_test).double().mean()
            )
            assert accuracy >= bound


def _benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_benchmark("split_cifar", monkeypatch)


def test_balanced_subset_is_seeded_balanced_and_hashed_by_content(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _benchmark_module(monkeypatch)
    labels = np.repeat(np.arange(10), 7)[::-1].copy()
    index = bench.balanced_indices(labels, 3, seed=0)
    assert np.array_equal(index, np.sort(index))
    assert np.array_equal(np.bincount(labels[index]), np.full(10, 3))
    assert np.array_equal(index, bench.balanced_indices(labels, 3, seed=0))
    assert not np.array_equal(index, bench.balanced_indices(labels, 3, seed=1))
    with pytest.raises(ValueError, match="fewer|<"):
        bench.balanced_indices(labels, 8, seed=0)
    items = np.random.default_rng(0).random((70, 3, 2, 2), dtype=np.float32)
    full = Source("cifar10", "train", items, labels, 10, "image", "full-hash")
    sub = bench.subset_source(full, 3)
    assert sub.split == "train-balanced3-seed0" and len(sub.items) == 30
    assert sub.source_sha256 not in ("full-hash", bench.subset_source(full, 4).source_sha256)
    assert sub.source_sha256 == bench.subset_source(full, 3).source_sha256


@pytest.mark.timeout(120)
def test_tiny_benchmark_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic features, two Task-IL and Class-IL tasks, every method; tables, plots, raw."""
    bench = _benchmark_module(monkeypatch)
    out, plots, raw = tmp_path / "r.md", tmp_path / "plots", tmp_path / "raw.json"
    argv = ["--tiny", "--scenarios", "task", "class"]
    argv += ["--out", str(out), "--plots", str(plots), "--raw", str(raw)]
    assert bench.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    for method in ("LID", "LID+look-ahead", "LID 10-way loss", "fine-tune", "EWC", "LwF", "joint"):
        assert f"| {method} |" in text
    assert "0.19 (0.16)" in text and "≈0.82" in text  # the paper's figures beside ours
    for name in ("task_matrix", "task_average", "class_matrix", "class_average"):
        assert (plots / f"split_cifar_{name}.png").stat().st_size > 0
    results = json.loads(raw.read_text(encoding="utf-8"))["results"]
    lid = next(r for r in results if r["method"] == "LID" and r["scenario"] == "task")
    certified = lid["certified"]
    assert all(0.0 <= certified[t][j] <= 1.0 for t in range(2) for j in range(t + 1))
    assert certified[1][0] >= certified[0][0]  # LID_2 inside LID_1: never fewer proofs
    assert bench.main([*argv, "--from-raw"]) == 0
    assert out.read_text(encoding="utf-8") == text
