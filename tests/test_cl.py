"""Continual learning: metrics, masked-head bounds, head certification, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from itertools import chain
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.benchmark_loader import load_benchmark
from tests.oracles import margins_of
from tests.tiny_nets import box_around, random_cnn, random_mlp
from verifier.bounds.ibp import margin_bounds
from verifier.certify import certify_samples
from verifier.cl.head_certify import certify_head, head_inputs
from verifier.cl.heads import (
    lift_box,
    pin_zero_width,
    restrict_box,
    restrict_graph,
    restrict_parameters,
)
from verifier.cl.metrics import average_accuracy, backward_transfer, forgetting, mean_std
from verifier.cl.scenarios import draw_pairs, masked_logits, task_labels, task_rows
from verifier.domains.box import Box
from verifier.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

# rows: after task t; columns: task j (entries above the diagonal are ignored)
MATRIX = torch.tensor(
    [
        [0.90, 0.10, 0.20],
        [0.60, 0.80, 0.30],
        [0.50, 0.70, 0.95],
    ]
)


def test_average_accuracy_after_each_task() -> None:
    expected = torch.tensor([0.90, 0.70, (0.50 + 0.70 + 0.95) / 3], dtype=torch.float64)
    torch.testing.assert_close(average_accuracy(MATRIX), expected, rtol=0, atol=1e-7)


def test_forgetting_is_the_mean_drop_from_the_best_earlier_accuracy() -> None:
    # task 0: best 0.90 (after t0), final 0.50 -> 0.40; task 1: best 0.80, final 0.70 -> 0.10
    assert forgetting(MATRIX) == pytest.approx((0.40 + 0.10) / 2, abs=1e-7)


def test_backward_transfer_compares_final_with_just_learned() -> None:
    assert backward_transfer(MATRIX) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2, abs=1e-7)


def test_metrics_of_a_single_task_and_bad_shapes() -> None:
    one = torch.tensor([[0.7]])
    assert forgetting(one) == 0.0 and backward_transfer(one) == 0.0
    with pytest.raises(InputError, match="square"):
        forgetting(torch.zeros(2, 3))


def test_mean_std_uses_the_sample_deviation() -> None:
    summary = mean_std([1.0, 2.0, 3.0])
    assert summary.mean == 2.0 and summary.std == pytest.approx(1.0)
    assert summary.format() == "2.00 ± 1.00"
    assert mean_std([0.5]).format() == "0.50"


def test_pairs_cover_the_digits_and_labels_follow_the_scenario() -> None:
    pairs = draw_pairs(torch.Generator().manual_seed(3))
    assert sorted(d for p in pairs for d in p) == list(range(10))
    assert all(a < b for a, b in pairs)
    y = torch.tensor([3, 8, 8, 3])
    assert task_rows("task", (3, 8)) == (3, 8)
    assert task_rows("domain", (3, 8)) == (0, 1)
    assert task_rows("class", (3, 8)) == tuple(range(10))
    assert task_labels("task", (3, 8), y).tolist() == [0, 1, 1, 0]
    assert task_labels("domain", (3, 8), y).tolist() == [1, 0, 0, 1]  # parity: 3 odd, 8 even
    assert task_labels("domain", (3, 8), y, "position").tolist() == [0, 1, 1, 0]
    assert task_labels("domain", (0, 8), torch.tensor([0, 8])).tolist() == [0, 0]  # one label
    assert task_labels("class", (3, 8), y).tolist() == [3, 8, 8, 3]
    logits = torch.arange(20.0).reshape(2, 10)
    assert masked_logits(logits, (3, 8)).tolist() == [[3.0, 8.0], [13.0, 18.0]]
    per_sample = torch.tensor([[3, 8], [0, 1]])
    assert masked_logits(logits, per_sample).tolist() == [[3.0, 8.0], [10.0, 11.0]]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_masked_head_bounds_enclose_sampled_full_networks(seed: int, net: str) -> None:
    """Bounds of the derived (row-restricted) graph over the restricted box hold for the full
    network's masked logits at every sampled weight vector of the full box."""
    gen = torch.Generator().manual_seed(seed)
    if net == "mlp":
        graph = random_mlp((6, 8, 5), gen)
        x = torch.randn(24, 6, generator=gen, dtype=torch.float64)
        rows = (4, 1)
    else:
        graph = random_cnn(gen)
        x = torch.rand(24, 1, 9, 9, generator=gen, dtype=torch.float64)
        rows = (2, 0)
    lower, upper = box_around(graph, 0.05, generator=gen)
    box = Box(lower, upper)
    sub = restrict_graph(graph, rows)
    sub_box = restrict_box(box, graph, rows)
    torch.testing.assert_close(sub(x), graph(x)[:, list(rows)], rtol=0, atol=1e-12)
    y = torch.randint(0, len(rows), (x.shape[0],), generator=gen)
    bounds = margin_bounds(sub, sub_box.lower, sub_box.upper, x, y)
    samples = chain(box.sample(200, generator=gen), box.sample(50, generator=gen, kind="vertex"))
    for theta in samples:
        masked = masked_logits(graph.forward(x, theta), rows)
        other = ~torch.isinf(bounds.lower)  # the true class holds +inf in both
        gap = (bounds.lower - margins_of(masked, y))[other]
        assert float(gap.max()) <= 1e-12, f"masked margin below its bound by {float(gap.max())}"
    certified, nonfinite = certify_samples(sub, sub_box, x, y)
    assert nonfinite == 0
    for theta in box.sample(50, generator=gen, kind="vertex"):
        preds = masked_logits(graph.forward(x, theta), rows).argmax(1)
        assert bool((preds[certified] == y[certified]).all())


def test_restrict_and_lift_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_mlp((4, 5, 6), gen)
    box = Box(*box_around(graph, 0.1, generator=gen))
    rows = (5, 2)
    sub = restrict_box(box, graph, rows)
    assert sub.lower["fc1.weight"].shape == (2, 5) and sub.lower["fc1.bias"].shape == (2,)
    base = Box(*box_around(graph, 0.3))
    lifted = lift_box(sub, base, graph, rows)
    torch.testing.assert_close(lifted.lower["fc1.weight"][[5, 2]], sub.lower["fc1.weight"])
    torch.testing.assert_close(
        lifted.upper["fc1.bias"][[0, 1, 3, 4]], base.upper["fc1.bias"][[0, 1, 3, 4]]
    )
    torch.testing.assert_close(lifted.lower["fc0.weight"], sub.lower["fc0.weight"])
    theta = restrict_parameters(graph, graph.parameters, rows)
    assert theta["fc1.weight"].shape == (2, 5)
    with pytest.raises(InputError, match="two distinct rows"):
        restrict_graph(graph, (1, 1))
    with pytest.raises(InputError, match="outside"):
        restrict_graph(graph, (0, 6))


@pytest.mark.parametrize("seed", range(3))
def test_head_certification_on_cached_features_matches_full_proofs(seed: int) -> None:
    """Certifying the head on cached float64 body features agrees with bounding the whole
    (pinned) graph, and every certified sample is correct for sampled heads."""
    gen = torch.Generator().manual_seed(seed)
    graph = random_cnn(gen)
    x = torch.rand(64, 1, 9, 9, generator=gen, dtype=torch.float64)
    y = graph(x).argmax(1)
    y[:8] = (y[:8] + 1) % 3  # some wrong labels, never certifiable
    lower, upper = box_around(graph, 0.02, ["fc.weight", "fc.bias"], generator=gen)
    full_lower = {n: lower.get(n, p) for n, p in graph.parameters.items()}
    full_upper = {n: upper.get(n, p) for n, p in graph.parameters.items()}
    pinned, rest = pin_zero_width(graph, Box(full_lower, full_upper))
    assert rest.names == ["fc.weight", "fc.bias"]
    reference, _ = certify_samples(pinned, rest, x, y)
    inputs = head_inputs(pinned, x)
    certified, nonfinite = certify_head(pinned, rest, inputs, y)
    assert nonfinite == 0 and int(certified.sum()) > 0
    assert not bool(certified[:8].any())
    assert torch.equal(certified, reference)
    for theta in rest.sample(100, generator=gen, kind="vertex"):
        preds = pinned.forward(x, theta).argmax(1)
        assert bool((preds[certified] == y[certified]).all())
    moved_lower, moved_upper = dict(full_lower), dict(full_upper)
    moved_lower["conv0.bias"] = moved_upper["conv0.bias"] = full_lower["conv0.bias"] + 0.1
    with pytest.raises(InputError, match="pin"):
        certify_head(pinned, Box(moved_lower, moved_upper), inputs, y)


def _benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_benchmark("split_mnist", monkeypatch)


@pytest.mark.timeout(60)
def test_tiny_benchmark_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Task-IL tasks, tiny subsets, every method; the table and plots are written."""
    bench = _benchmark_module(monkeypatch)
    out, plots, raw = tmp_path / "r.md", tmp_path / "plots", tmp_path / "raw.json"
    argv = ["--tiny", "--workers", "0", "--scenarios", "task"]
    argv += ["--out", str(out), "--plots", str(plots), "--raw", str(raw)]
    assert bench.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    for method in ("LID", "LID+look-ahead", "fine-tune", "EWC", "SI", "LwF", "A-GEM", "joint"):
        assert f"| {method} |" in text
    assert (plots / "split_mnist_task_matrix.png").stat().st_size > 0
    assert (plots / "split_mnist_task_average.png").stat().st_size > 0
    results = json.loads(raw.read_text(encoding="utf-8"))["results"]
    lid = next(r for r in results if r["method"] == "LID")
    certified = lid["certified"]
    assert all(0.0 <= certified[t][j] <= 1.0 for t in range(2) for j in range(t + 1))
    assert certified[1][0] >= certified[0][0]  # LID_2 inside LID_1: never fewer proofs
    accuracy = lid["matrix"]
    assert not math.isnan(accuracy[1][0])


@pytest.mark.timeout(120)
def test_tiny_benchmark_with_the_papers_pairs_and_full_boxes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--pairs paper` gives every seed the fixed (0, 1), (2, 3) order; `--boxed all` boxes the
    convolutions too and still nests LID_2 inside LID_1."""
    bench = _benchmark_module(monkeypatch)
    out, plots, raw = tmp_path / "r.md", tmp_path / "plots", tmp_path / "raw.json"
    argv = ["--tiny", "--workers", "0", "--scenarios", "domain", "--methods", "LID", "fine-tune"]
    argv += ["--pairs", "paper", "--boxed", "all"]
    argv += ["--out", str(out), "--plots", str(plots), "--raw", str(raw)]
    assert bench.main(argv) == 0
    text = out.read_text(encoding="utf-8")
    assert "fixed pairs (0, 1), (2, 3)" in text
    assert "box every parameter" in text
    results = json.loads(raw.read_text(encoding="utf-8"))["results"]
    assert {r["method"] for r in results} == {"LID", "fine-tune"}
    assert all(r["pairs"] == [[0, 1], [2, 3]] for r in results)
    certified = next(r for r in results if r["method"] == "LID")["certified"]
    assert certified[1][0] >= certified[0][0]
