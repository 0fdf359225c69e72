"""All-layer LIDs on the Split-MNIST CNN (issue 20, point 3): every parameter boxed, the
per-layer size measure (`layer_log_width`) and the linear-bound search, certified on held-out
data by the matching proof ("best"); the benchmark's variant names and its `--tiny` job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.benchmark_loader import load_benchmark
from verifier.certify import certify_samples
from verifier.cl.heads import pin_zero_width, restrict_box, restrict_graph
from verifier.cl.lid_learner import (
    PAPER_SEARCH,
    LidConfig,
    build_lid,
    certify_lid,
    lid_proof_method,
    train_projected,
)
from verifier.cl.network import SplitMnistCNN, network_graph
from verifier.cl.replay import ReplayConfig
from verifier.cl.scenarios import SplitTask, split_mnist
from verifier.cl.training import TrainConfig
from verifier.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
CONV_WEIGHTS = ("conv0.weight", "conv1.weight")


def _bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_benchmark("split_mnist", monkeypatch)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One torch thread: the linear bounds' many small convolutions slow down several-fold
    when two threads share the cores with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows_of(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.flatten(1).tolist()}


def _task() -> SplitTask:
    """Task-IL digits 3 vs 6: 400 MNIST training samples, 120 test samples."""
    train, test = load_dataset("mnist", split="train"), load_dataset("mnist", split="test")
    (task,) = split_mnist(
        "task", [(3, 6)], (train.x, train.y), (test.x, test.y), train_limit=400, test_limit=120
    )
    return task


@pytest.mark.timeout(120)
def test_linear_all_layer_lid_boxes_every_parameter_opens_the_convolutions_and_proves_by_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench(monkeypatch)
    search = PAPER_SEARCH.model_copy(
        update={"iterations": 12, "checkpoint_every": 4, "batch_size": 100, "target_slack": 0.02}
    )
    config = bench.all_layer_variants(LidConfig(search=search))["LID all-layer linear"]
    assert config.boxed == "all" and config.search.size == "layer_log_width"
    assert config.search.bound == "linear"
    assert (config.search.linear.every, config.search.linear.classes) == (4, 2)
    assert lid_proof_method(config) == "best"

    torch.manual_seed(0)
    task = _task()
    model = SplitMnistCNN(torch.Generator().manual_seed(0))
    train_projected(model, task, None, TrainConfig(epochs=2), torch.Generator().manual_seed(1))
    stage = build_lid(model, task, None, None, config, torch.Generator().manual_seed(2))
    graph = network_graph(model)

    # every parameter of the CNN is boxed (searched), and every convolution opens
    assert set(stage.search_box.lower) == set(graph.parameters)
    assert set(stage.box.lower) == set(graph.parameters)
    widths = stage.search_box.widths()
    for name in CONV_WEIGHTS:
        assert bool((widths[name] > 0).any()), f"{name} stayed at zero width"
    assert stage.box.contains(dict(model.named_parameters()))

    # the certificate: held-out test samples only, proved by "best"
    cert = certify_lid(
        graph, stage.box, task, beta=1e-3, target=stage.target, method=lid_proof_method(config)
    )
    assert cert.method == "best"
    assert cert.n == task.x_test.shape[0]
    assert _rows_of(task.x_test).isdisjoint(_rows_of(task.x_train))  # the search's data
    assert cert.k > 0
    sub, sub_box = restrict_graph(graph, task.rows), restrict_box(stage.box, graph, task.rows)
    pinned, rest = pin_zero_width(sub, sub_box)
    ibp, _ = certify_samples(pinned, rest, task.x_test, task.y_test, method="ibp")
    assert cert.k >= int(ibp.sum())  # never fewer proofs than intervals alone
    # soundness: every network drawn from the box is right on at least the certified samples
    x64 = task.x_test.to(torch.float64)
    for theta in sub_box.sample(8, generator=torch.Generator().manual_seed(3), kind="vertex"):
        with torch.no_grad():
            logits = sub.forward(x64, {n: t.to(torch.float64) for n, t in theta.items()})
        assert int((logits.argmax(1) == task.y_test).sum()) >= cert.k


def test_all_layer_variants_resolve_by_name_and_leave_the_default_run_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench(monkeypatch)
    parser = bench.build_parser()
    default = parser.parse_args(["--tiny"])
    settings = bench.with_all_layer(bench.settings_for(default), default)
    assert list(settings.lid_variants) == ["LID", "LID+look-ahead", "LID 10-way loss"]
    assert settings.lid_variants["LID"].boxed == "head"

    flagged = parser.parse_args(["--tiny", "--all-layer"])
    settings = bench.with_all_layer(bench.settings_for(flagged), flagged)
    assert [*settings.lid_variants][-2:] == list(bench.ALL_LAYER)
    ibp, linear = (settings.lid_variants[m] for m in bench.ALL_LAYER)
    head = settings.lid_variants["LID"]
    assert ibp.boxed == linear.boxed == "all"
    assert ibp.search.size == linear.search.size == "layer_log_width"
    assert (ibp.search.bound, linear.search.bound) == ("ibp", "linear")
    # the same search budget, τ and Class-IL loss as the head-only "LID"
    for config in (ibp, linear):
        assert config.search.iterations == head.search.iterations
        assert config.tolerance == head.tolerance and config.active_classes

    named = parser.parse_args(["--tiny", "--methods", "LID", "LID all-layer linear"])
    kept = bench.cl_report.keep_methods(
        bench.with_all_layer(bench.settings_for(named), named), named.methods
    )
    assert list(kept.lid_variants) == ["LID", "LID all-layer linear"]
    assert kept.baselines == ()


def test_all_layer_buffer_methods_are_the_replay_protocol_with_the_all_layer_ibp_box(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench(monkeypatch)
    args = bench.build_parser().parse_args(
        ["--tiny", "--methods", "LID buffer SMALL", "LID all-layer buffer LARGE"]
    )
    settings = bench.cl_report.keep_methods(
        bench.cl_report.with_buffers(bench.with_all_layer(bench.settings_for(args), args), args),
        args.methods,
    )
    assert list(settings.lid_variants) == ["LID all-layer buffer LARGE", "LID buffer SMALL"]
    head = settings.lid_variants["LID buffer SMALL"]
    every = settings.lid_variants["LID all-layer buffer LARGE"]
    ibp = bench.all_layer_variants(bench.settings_for(args).lid_variants["LID"])[
        "LID all-layer IBP"
    ]
    assert isinstance(every, ReplayConfig) and isinstance(head, ReplayConfig)
    assert (head.boxed, every.boxed) == ("head", "all")
    assert every.search == ibp.search and every.search.size == "layer_log_width"
    assert every.buffer.name == "LARGE" and head.buffer.name == "SMALL"
    assert every.active_classes and every.lookahead == 0.0 and every.fit_z is None
    # the paper's buffer figures stand beside both
    assert bench._paper("LID all-layer buffer LARGE", "class") == "0.71 (0.62)"
    assert bench._paper("LID buffer SMALL", "class") == "0.48 (0.42)"


@pytest.mark.timeout(120)
def test_tiny_job_of_the_linear_all_layer_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """One `--tiny` Task-IL job of "LID all-layer linear" through the benchmark's job
    function: the raw record says which box, bound, size and proof; the table shows them."""
    bench = _bench(monkeypatch)
    args = bench.build_parser().parse_args(
        ["--tiny", "--scenarios", "task", "--methods", "LID all-layer linear"]
    )
    settings = bench.cl_report.keep_methods(
        bench.with_all_layer(bench.settings_for(args), args), args.methods
    )
    torch.manual_seed(0)
    bench._init_worker(1)
    first, _ = bench.first_job(settings, "task", 0, bench._MNIST)
    record = bench.method_job(settings, "task", 0, "LID all-layer linear", first, bench._MNIST)

    assert record["method"] == "LID all-layer linear"
    assert record["lid"] == {
        "boxed": "all",
        "bound": "linear",
        "linear": {"every": 4, "classes": 2},
        "size": "layer_log_width",
        "proof": "best",
    }
    n_params = len(dict(SplitMnistCNN(torch.Generator()).named_parameters()))
    first_stage = record["stages"][0]
    assert first_stage["n_boxed"] > 0
    open_count, n_tensors = first_stage["open_tensors"]
    assert n_tensors == n_params  # every tensor searched
    assert open_count == n_params  # ... and every one opened on the first task
    assert first_stage["methods"] == {"0": "best"}
    assert all(0.0 <= v <= 1.0 for row in record["certified"] for v in row if v is not None)

    summaries = bench.cl_report.summarise([record])
    table = "\n".join(
        bench.cl_report.lid_details_table(
            summaries, ["task"], ["LID all-layer linear"], ["search", "proof", "open_tensors"]
        )
    )
    assert "all layers, linear (every 4, 2 classes), layer_log_width" in table
    assert "| best |" in table
