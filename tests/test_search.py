"""End-to-end soundness of a searched LID on the embedded default model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from verifier import load_model
from verifier.certify import certify_samples
from verifier.data import load_dataset
from verifier.search import SearchTask, hard_metrics, search_lid
from verifier.spec import SearchSection

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def searched():
    graph = load_model(ROOT / "onnx_models" / "digits_mlp.onnx")
    data = load_dataset("digits", split="test")
    x, y = data.x, data.y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    grad, val, held = perm[:250], perm[250:400], perm[400:]
    clean = float((graph(x[grad]).argmax(1) == y[grad]).float().mean())
    task = SearchTask("digits", "accuracy", clean - 0.05, x[grad], y[grad], x[val], y[val])
    config = SearchSection(iterations=40, lr=1.0, checkpoint_every=10)
    result = search_lid(graph, [task], config, names=list(graph.parameters))
    return graph, task, result, x[held], y[held]


def test_search_never_returns_a_box_failing_its_target(searched) -> None:
    graph, task, result, _, _ = searched
    assert result.feasible
    hard = hard_metrics(graph, result.box, [task])
    assert hard[0] >= task.target
    assert result.box.size() > 0


def test_every_certified_heldout_sample_is_correct_for_sampled_networks(searched) -> None:
    graph, _, result, x, y = searched
    certified, nonfinite = certify_samples(graph, result.box, x, y)
    assert nonfinite == 0 and int(certified.sum()) > 0
    gen = torch.Generator().manual_seed(1)
    xs, ys = x[certified].double(), y[certified]
    for kind in ("uniform", "vertex"):
        for theta in result.box.sample(40, generator=gen, kind=kind):
            preds = graph.forward(xs, theta).argmax(1)
            assert bool((preds == ys).all()), f"a {kind} sample misclassifies a certified input"


def test_box_corners_are_float32_and_contain_theta0(searched) -> None:
    graph, _, result, _, _ = searched
    assert result.box.contains(graph.parameters)
    for name, lower in result.box.lower.items():
        assert torch.equal(lower, lower.float().double())
        assert torch.equal(result.box.upper[name], result.box.upper[name].float().double())


@pytest.mark.parametrize("kind", ["fisher", "si"])
def test_importance_ranks_used_weights_above_dead_inputs(kind: str) -> None:
    """Weights reading a constant-zero input feature get no importance; used ones do."""
    from tests.tiny_nets import random_mlp
    from verifier.search import fisher_importance, frozen_by_importance, si_importance

    gen = torch.Generator().manual_seed(3)
    graph = random_mlp((6, 8, 3), gen, torch.float32)
    x = torch.randn(256, 6, generator=gen)
    x[:, :2] = 0.0  # features 0 and 1 never fire: their first-layer weights cannot matter
    y = torch.randint(0, 3, (256,), generator=gen)
    names = list(graph.parameters)
    if kind == "si":
        scores = si_importance(graph, names, x, y, generator=gen)
    else:
        scores = fisher_importance(graph, names, x, y)
    first = scores["fc0.weight"]
    assert bool((first[:, :2] == 0).all())
    assert float(first[:, 2:].sum()) > 0.0
    frozen = frozen_by_importance(scores, 0.1)
    assert bool(frozen["fc0.weight"][:, :2].all())  # the dead entries are the first frozen
    before = {n: t.clone() for n, t in graph.parameters.items()}
    assert all(torch.equal(before[n], graph.parameters[n]) for n in names)  # graph untouched


def test_layer_log_width_weighs_every_tensor_alike() -> None:
    """Hand-worked: a 1-entry tensor of width 0.01 and a 100-entry tensor of width 1 give
    (ln 0.01 + ln 1) / 2 per tensor; the per-entry mean log-width hardly sees the small one."""
    from verifier.domains import Box

    f64 = torch.float64
    zero = {"small": torch.zeros(1, dtype=f64), "large": torch.zeros(100, dtype=f64)}
    box = Box(
        zero, {"small": torch.full((1,), 0.01, dtype=f64), "large": torch.ones(100, dtype=f64)}
    )
    assert box.size("layer_log_width") == pytest.approx(math.log(0.01) / 2, rel=1e-12)
    assert box.size("mean_log_width") == pytest.approx(math.log(0.01) / 101, rel=1e-12)


def test_search_with_layer_log_width_opens_every_tensor() -> None:
    graph = load_model(Path("onnx_models/digits_mlp.onnx"))
    data = load_dataset("digits", split="test")
    x, y = data.x[:200], data.y[:200]
    task = SearchTask("digits", "accuracy", 0.8, x[:140], y[:140], x[140:], y[140:])
    config = SearchSection(iterations=40, batch_size=140, lr=1.0, size="layer_log_width")
    result = search_lid(graph, [task], config, names=list(graph.parameters))
    assert result.feasible
    widths = result.box.widths()
    assert all(float((w > 0).double().mean()) > 0.5 for w in widths.values()), {
        n: float((w > 0).double().mean()) for n, w in widths.items()
    }


def test_search_with_linear_bounds_returns_a_box_proved_by_best() -> None:
    graph = load_model(Path("onnx_models/digits_mlp.onnx"))
    data = load_dataset("digits", split="test")
    x, y = data.x[:200], data.y[:200]
    task = SearchTask("digits", "accuracy", 0.85, x[:140], y[:140], x[140:], y[140:])
    config = SearchSection(iterations=30, batch_size=140, lr=1.0, bound="linear")
    result = search_lid(graph, [task], config, names=list(graph.parameters))
    assert result.feasible and result.box.size("mean_width") > 0
    proved = hard_metrics(graph, result.box, [task], method="best")
    assert proved == result.hard and proved[0] >= 0.85
    mask, _ = certify_samples(graph, result.box, x, y, method="best")
    ibp_mask, _ = certify_samples(graph, result.box, x, y, method="ibp")
    assert bool((mask | ~ibp_mask).all())  # best never certifies fewer than ibp


def test_linear_schedule_warm_start_and_every() -> None:
    from verifier.search.box import uses_linear
    from verifier.spec import LinearBoundSection

    config = SearchSection(bound="linear", linear=LinearBoundSection(warm_start=2, every=3))
    assert [uses_linear(config, i) for i in range(1, 10)] == [
        False,
        False,
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert not any(uses_linear(SearchSection(), i) for i in range(1, 5))


def test_linear_bounds_on_a_fraction_of_the_batch() -> None:
    """`linear.samples`: the chosen samples (correct at the centre, lowest interval margins)
    get the full guide's linear bounds, the rest keep their interval bounds; never looser."""
    from verifier.bounds.ibp import margin_bounds
    from verifier.search.surrogate import guide_bounds, linear_samples
    from verifier.spec import LinearBoundSection

    graph = load_model(ROOT / "onnx_models" / "digits_mlp.onnx")
    data = load_dataset("digits", split="test")
    x, y = data.x[:200], data.y[:200]
    lower = {n: t - 0.02 * t.abs() for n, t in graph.parameters.items()}
    upper = {n: t + 0.02 * t.abs() for n, t in graph.parameters.items()}
    ibp = margin_bounds(graph, lower, upper, x, y)
    full = guide_bounds(graph, lower, upper, x, y, linear=True)
    part = guide_bounds(
        graph, lower, upper, x, y, linear=True, options=LinearBoundSection(samples=0.25)
    )
    chosen = linear_samples(graph, lower, upper, x, y, ibp, 0.25)
    assert chosen.numel() == 50
    centre = graph.forward(x, {n: (lower[n] + upper[n]) / 2 for n in lower})
    assert bool((centre.argmax(1)[chosen] == y[chosen]).all())
    others = torch.ones(200, dtype=torch.bool)
    others[chosen] = False
    correct_others = others & (centre.argmax(1) == y)
    # every correct sample left out has a smallest interval margin at least the chosen ones'
    assert float(ibp.worst()[correct_others].min()) >= float(ibp.worst()[chosen].max())
    torch.testing.assert_close(part.lower[chosen], full.lower[chosen])
    torch.testing.assert_close(part.lower[others], ibp.lower[others])
    assert bool((part.lower >= ibp.lower).all())
    assert int(part.certified().sum()) > int(ibp.certified().sum())
