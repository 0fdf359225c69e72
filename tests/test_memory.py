"""Memory budgets of bound passes (issue 21, "never out of memory").

Splitting a pass (fewer samples, or margin rows in groups) changes which samples and rows share
a matrix product, and BLAS / oneDNN may then sum in another order: bound values can differ by
float64 rounding (measured up to 1.8e-15 here), never more, and each pass's proof-mode
allowance is derived for the values that pass computed, so either is a proof. Tests therefore
ask bounds to agree within 1e-12 and masks and certificates to be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from tests.memory_peak import small_cnn
from tests.tiny_nets import box_around, random_cnn, random_mlp
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.memory import (
    PassCost,
    PassPlan,
    bound_pass_cost,
    memory_budget,
    parse_size,
    plan_pass,
)
from verifier.certify import certify_samples
from verifier.cli import ExitCode, cli
from verifier.domains import Box
from verifier.domains.io import save_lid
from verifier.errors import MemoryBudgetError
from verifier.graph import Graph
from verifier.onnx.importer import load_graph
from verifier.search.chunked import chunked_soft_metric
from verifier.search.surrogate import guide_bounds, soft_metric

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "onnx_models" / "digits_mlp.onnx"


def _net(name: str) -> Graph:
    gen = torch.Generator().manual_seed(0)
    if name == "digits":
        return load_graph(DIGITS)
    if name == "mlp":
        return random_mlp((20, 16, 16, 5), gen)
    return random_cnn(gen)


def _samples(graph: Graph, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *graph.input_shape, generator=gen, dtype=torch.float64)
    return x, graph(x).argmax(dim=1)


def _box(graph: Graph, radius: float) -> Box:
    lower, upper = box_around(graph, radius, generator=torch.Generator().manual_seed(2))
    return Box({k: v.double() for k, v in lower.items()}, {k: v.double() for k, v in upper.items()})


# ---------------------------------------------------------------- sizes and plans


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4G", 4 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29), ("300KiB", 300 << 10), ("7", 7)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1G", "4X", "0", "1e9"])
def test_parse_size_rejects_bad_sizes(text: str) -> None:
    with pytest.raises(MemoryBudgetError, match="--max-memory"):
        parse_size(text)


def test_plan_fills_the_budget_and_splits_rows_only_for_one_sample() -> None:
    cost = PassCost(fixed=100, per_sample=10, per_row=5, rows=9)  # 55 bytes per sample
    assert plan_pass(cost, None, samples=256) == PassPlan(256)
    assert plan_pass(cost, 100 + 55 * 7 + 3, samples=256) == PassPlan(7)
    assert plan_pass(cost, 10**9, samples=256) == PassPlan(256)
    assert plan_pass(cost, 100 + 10 + 5 * 4, samples=256) == PassPlan(1, 4)
    assert plan_pass(cost, 100 + 10 + 5, samples=256) == PassPlan(1, 1)
    with pytest.raises(MemoryBudgetError, match="below the 115 B one bound pass needs"):
        plan_pass(cost, 114, samples=256)


# ---------------------------------------------------------------- chunking never changes results


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
@pytest.mark.parametrize("slopes", ["adaptive", "optimized"])
def test_margin_row_groups_give_the_unsplit_bounds(
    name: str, intermediate: str, slopes: str
) -> None:
    graph = _net(name)
    x, y = _samples(graph, 12)
    box = _box(graph, 0.02)
    kwargs = dict(intermediate=intermediate, slopes=slopes, slope_steps=3, track_rounding=True)
    whole = linear_margin_bounds(graph, box.lower, box.upper, x, y, **kwargs)  # type: ignore[arg-type]
    for max_rows in (1, 2):
        split = linear_margin_bounds(
            graph,
            box.lower,
            box.upper,
            x,
            y,
            max_rows=max_rows,
            **kwargs,  # type: ignore[arg-type]
        )
        torch.testing.assert_close(split.lower, whole.lower, rtol=0.0, atol=1e-12)
        assert split.rounding is not None and whole.rounding is not None
        torch.testing.assert_close(split.rounding, whole.rounding, rtol=0.0, atol=1e-12)
        assert torch.equal(split.certified(), whole.certified())


@pytest.mark.parametrize("name", ["digits", "mlp", "cnn"])
@pytest.mark.parametrize("method", ["ibp", "best"])
def test_a_budget_too_small_for_one_pass_gives_the_unlimited_mask(name: str, method: str) -> None:
    graph = _net(name)
    x, y = _samples(graph, 60)
    box = _box(graph, 0.1 if name == "cnn" else 0.01)  # some samples certified, some not
    unlimited = certify_samples(graph, box, x, y, method=method)  # type: ignore[arg-type]
    cost = bound_pass_cost(graph, method)  # type: ignore[arg-type]
    assert cost.bytes(2) < cost.bytes(60)
    for budget in (cost.bytes(1, 1), cost.bytes(1), cost.bytes(7)):  # rows split, 1, 7 samples
        with memory_budget(budget):
            limited = certify_samples(graph, box, x, y, method=method)  # type: ignore[arg-type]
        assert torch.equal(limited[0], unlimited[0])
        assert limited[1] == unlimited[1]
    assert 0 < int(unlimited[0].sum()) < 60


@pytest.mark.parametrize("method", ["ibp", "best"])
def test_a_budget_below_one_sample_and_row_is_one_clear_error(method: str) -> None:
    graph = _net("cnn")
    x, y = _samples(graph, 4)
    least = bound_pass_cost(graph, method).bytes(1, 1)  # type: ignore[arg-type]
    with memory_budget(least - 1), pytest.raises(MemoryBudgetError, match="raise --max-memory"):
        certify_samples(graph, _box(graph, 0.02), x, y, method=method)  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
@pytest.mark.parametrize("linear", [False, True])
def test_chunked_soft_metric_equals_one_pass_with_the_same_gradient(
    metric: str, linear: bool
) -> None:
    graph = _net("cnn")
    x, y = _samples(graph, 23)
    box = _box(graph, 0.02)
    x32 = x.float()

    def corners() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        low = {k: v.float().requires_grad_(True) for k, v in box.lower.items()}
        return low, {k: v.float().requires_grad_(True) for k, v in box.upper.items()}

    def bounds_of(low, up, xs, ys):  # type: ignore[no-untyped-def]
        return guide_bounds(graph, low, up, xs, ys, linear=linear)

    low, up = corners()
    whole = bounds_of(low, up, x32, y)
    soft = soft_metric(whole.lower, y, metric, 10.0)  # type: ignore[arg-type]
    soft.backward()
    low_c, up_c = corners()
    chunked, certified = chunked_soft_metric(
        bounds_of,
        low_c,
        up_c,
        x32,
        y,
        metric=metric,
        temperature=10.0,
        chunk=5,  # type: ignore[arg-type]
    )
    chunked.backward()
    torch.testing.assert_close(chunked, soft, rtol=1e-6, atol=1e-7)
    assert torch.equal(certified, whole.certified())
    for name in low:
        for a, b in ((low[name], low_c[name]), (up[name], up_c[name])):
            assert a.grad is not None and b.grad is not None
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the estimate bounds the peak


@pytest.mark.parametrize(
    ("name", "method", "batch"),
    [
        ("mlp", "ibp", 256),
        ("mlp", "best", 64),
        ("mlp", "search-linear", 64),
        ("cnn", "ibp", 128),
        ("cnn", "best", 32),
        ("cnn", "search-ibp", 64),
        ("cnn", "search-linear", 32),
    ],
)
def test_the_estimate_bounds_the_measured_peak(name: str, method: str, batch: int) -> None:
    """Peak RSS rise of one pass in a fresh process (`tests/memory_peak.py`) against the
    estimate: a 784-200-200-10 MLP and a CIFAR-sized CNN (3x32x32, two convolutions)."""
    from tests.memory_peak import model

    graph = model(name)
    search = method.startswith("search-")
    bound = method.removeprefix("search-")
    cost = bound_pass_cost(
        graph,
        "best" if bound == "linear" else bound,  # type: ignore[arg-type]
        dtype=torch.float32 if search else torch.float64,
        grad=search,
    )
    found = subprocess.run(
        [sys.executable, "-m", "tests.memory_peak", name, method, str(batch)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    measured = int(found.stdout.strip())
    assert 0 < measured <= cost.bytes(batch), (measured, cost.bytes(batch))


# ---------------------------------------------------------------- the CLI


def _invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits_lid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("memory") / "lid.safetensors"
    save_lid(path, _box(load_graph(DIGITS), 0.01), {"model_sha256": "0" * 64})
    return path


def test_certify_under_the_smallest_budget_gives_the_same_certificate(digits_lid: Path) -> None:
    least = bound_pass_cost(load_graph(DIGITS), "best").bytes(1, 1)
    args = ("certify", DIGITS, digits_lid, "digits", "--method", "best", "--json")
    unlimited = _invoke(*args)
    limited = _invoke(*args, "--max-memory", str(least))
    assert unlimited.exit_code == limited.exit_code == ExitCode.OK, limited.output
    first, second = json.loads(unlimited.stdout), json.loads(limited.stdout)
    assert (second["k"], second["n"], second["lower_bound"]) == (
        first["k"],
        first["n"],
        first["lower_bound"],
    )


@pytest.mark.parametrize(("size", "pattern"), [("lots", "must be a size"), ("100", "below the")])
def test_certify_bad_or_too_small_budget_exits_2(digits_lid: Path, size: str, pattern: str) -> None:
    result = _invoke("certify", DIGITS, digits_lid, "digits", "--max-memory", size)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], lines


@pytest.mark.slow
def test_lid_under_a_budget_below_one_batch_finishes(tmp_path: Path) -> None:
    """The search's batch, its checkpoint proofs and the certificate all split to fit (the
    gradient's chunks add in another order, so widths agree to rounding, not bit for bit)."""
    from tests.test_cli_pipeline import write_spec

    graph = load_graph(DIGITS)
    budget = bound_pass_cost(graph, "ibp").bytes(16)
    spec = write_spec(tmp_path, search={"iterations": 6})
    result = _invoke("lid", spec, "-o", tmp_path / "out", "--json", "--max-memory", str(budget))
    assert result.exit_code == ExitCode.OK, result.output
    unlimited = _invoke("lid", spec, "-o", tmp_path / "free", "--json")
    first, second = json.loads(unlimited.stdout), json.loads(result.stdout)
    assert second["tasks"][0]["n"] == first["tasks"][0]["n"]
    width = (first["lid"]["mean_width"], second["lid"]["mean_width"])
    assert width[1] == pytest.approx(width[0], rel=1e-3), width


def test_small_cnn_is_cifar_sized() -> None:
    graph = small_cnn(torch.Generator().manual_seed(0))
    assert graph(torch.zeros(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 10)
