"""Soundness and exactness of our interval engine (verifier.bounds.ibp)."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain

import pytest
import torch
from torch import Tensor

from tests.oracles import attack_margins, sampled_worst_margins
from tests.tiny_nets import box_around, random_cnn, random_mlp
from verifier.bounds.ibp import logit_bounds, margin_bounds
from verifier.bounds.intervals import Interval, enclose_matmul
from verifier.domains import Box
from verifier.graph import Graph


def _labels(graph: Graph, n: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, graph.n_classes, (n,), generator=gen)


def _finite(bounds: Tensor) -> Tensor:
    return ~torch.isinf(bounds)


GRAPHS = {
    "mlp-relu": lambda g: random_mlp((5, 7, 6, 3), g),
    "mlp-tanh": lambda g: random_mlp((5, 7, 6, 3), g, activation="tanh"),
    "mlp-sigmoid": lambda g: random_mlp((4, 8, 3), g, activation="sigmoid"),
    "cnn": lambda g: random_cnn(g),
}


def _inputs(graph: Graph, n: int, gen: torch.Generator) -> Tensor:
    return torch.randn(n, *graph.input_shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("rule", ["exact", "midrad"])
@pytest.mark.parametrize("radius", [0.02, 0.2])
@pytest.mark.parametrize("seed", range(2))
def test_margin_bounds_hold_under_sampling(name: str, rule: str, radius: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = GRAPHS[name](gen)
    lower, upper = box_around(graph, radius, generator=gen)
    x = _inputs(graph, 12, gen)
    y = _labels(graph, 12, gen)
    bounds = margin_bounds(graph, lower, upper, x, y, rule=rule)  # type: ignore[arg-type]
    logits = logit_bounds(graph, lower, upper, x, rule=rule)  # type: ignore[arg-type]
    box = Box(lower, upper)
    samples = chain(box.sample(100, generator=gen), box.sample(60, generator=gen, kind="vertex"))
    worst = sampled_worst_margins(graph, samples, x, y, logits=logits)
    gap = (worst - bounds.lower)[_finite(bounds.lower)]
    assert float(gap.min()) >= -1e-12, f"bound exceeds a sampled margin by {-float(gap.min())}"


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-tanh", "cnn"])
@pytest.mark.parametrize("seed", range(2))
def test_margin_bounds_hold_under_weight_attack(name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    graph = GRAPHS[name](gen)
    lower, upper = box_around(graph, 0.1, generator=gen)
    x = _inputs(graph, 6, gen)
    y = _labels(graph, 6, gen)
    bounds = margin_bounds(graph, lower, upper, x, y)
    attacked = attack_margins(graph, lower, upper, x, y, steps=60, generator=gen)
    gap = (attacked - bounds.lower)[_finite(bounds.lower)]
    assert float(gap.min()) >= -1e-12


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_zero_width_box_equals_forward(name: str) -> None:
    gen = torch.Generator().manual_seed(7)
    graph = GRAPHS[name](gen)
    x = _inputs(graph, 9, gen)
    y = _labels(graph, 9, gen)
    params = dict(graph.parameters)
    bounds = margin_bounds(graph, params, params, x, y)
    z = graph.forward(x)
    expected = z.gather(1, y[:, None]) - z
    mask = _finite(bounds.lower)
    torch.testing.assert_close(bounds.lower[mask], expected[mask], rtol=0, atol=1e-12)
    logits = logit_bounds(graph, params, params, x)
    torch.testing.assert_close(logits.lower, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.upper, z, rtol=0, atol=1e-12)


def test_hand_worked_interval_product() -> None:
    # x = [1, -1] (a point), w = [[1 ± 0.5, 2 ± 1]]: z = w1 - w2 in [0.5 - 3, 1.5 - 1] = [-2.5, 0.5]
    x = Interval.point(torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    w = Interval(
        torch.tensor([[0.5, 1.0]], dtype=torch.float64),
        torch.tensor([[1.5, 3.0]], dtype=torch.float64),
    )
    out = enclose_matmul(x, w)
    assert out.lower.item() == -2.5 and out.upper.item() == 0.5
    # x in [1, 2], w in [-1, 3]: exact range [-2, 6]; midpoint-radius gives [-3.5, 6.5]... wider
    xi = Interval(torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    wi = Interval(torch.tensor([[-1.0]]), torch.tensor([[3.0]]))
    exact = enclose_matmul(xi, wi)
    assert (exact.lower.item(), exact.upper.item()) == (-2.0, 6.0)
    midrad = enclose_matmul(xi, wi, rule="midrad")
    assert midrad.lower.item() < -2.0 and midrad.upper.item() >= 6.0
    # x crossing zero, x in [-1, 2], w in [1, 3]: range [-3, 6]
    xc = Interval(torch.tensor([[-1.0]]), torch.tensor([[2.0]]))
    wc = Interval(torch.tensor([[1.0]]), torch.tensor([[3.0]]))
    cross = enclose_matmul(xc, wc)
    assert (cross.lower.item(), cross.upper.item()) == (-3.0, 6.0)


@pytest.mark.parametrize("seed", range(3))
def test_exact_products_never_looser_than_midrad(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp((6, 10, 10, 4), gen)
    lower, upper = box_around(graph, 0.1, generator=gen)
    x = _inputs(graph, 32, gen)
    y = _labels(graph, 32, gen)
    exact = margin_bounds(graph, lower, upper, x, y).lower
    midrad = margin_bounds(graph, lower, upper, x, y, rule="midrad").lower
    mask = _finite(exact)
    assert bool((exact[mask] >= midrad[mask] - 1e-12).all())
    assert float((exact[mask] - midrad[mask]).mean()) > 0


def test_folded_margin_at_least_as_tight_as_logit_difference() -> None:
    gen = torch.Generator().manual_seed(3)
    graph = random_mlp((5, 8, 8, 4), gen)
    lower, upper = box_around(graph, 0.1)
    x = _inputs(graph, 20, gen)
    y = _labels(graph, 20, gen)
    folded = margin_bounds(graph, lower, upper, x, y).lower
    logits = logit_bounds(graph, lower, upper, x)
    difference = logits.lower.gather(1, y[:, None]) - logits.upper
    mask = _finite(folded)
    assert bool((folded[mask] >= difference[mask] - 1e-12).all())


def test_gradients_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(5)
    graph = random_mlp((4, 5, 3), gen)
    lower, upper = box_around(graph, 0.05, generator=gen)
    x = _inputs(graph, 5, gen)
    y = _labels(graph, 5, gen)

    def objective(lo: Mapping[str, Tensor], up: Mapping[str, Tensor]) -> Tensor:
        b = margin_bounds(graph, lo, up, x, y).lower
        return b[_finite(b)].sum()

    lo = {k: v.clone().requires_grad_(True) for k, v in lower.items()}
    up = {k: v.clone().requires_grad_(True) for k, v in upper.items()}
    objective(lo, up).backward()
    eps = 1e-6
    for corner, grads in (("lower", lo), ("upper", up)):
        for name in ("fc0.weight", "fc1.bias"):
            for index in [(0,) * grads[name].dim(), tuple(s - 1 for s in grads[name].shape)]:
                plus = {
                    k: v.detach().clone()
                    for k, v in (lower if corner == "lower" else upper).items()
                }
                minus = {k: v.clone() for k, v in plus.items()}
                plus[name][index] += eps
                minus[name][index] -= eps
                if corner == "lower":
                    f_plus, f_minus = objective(plus, upper), objective(minus, upper)
                else:
                    f_plus, f_minus = objective(lower, plus), objective(lower, minus)
                numeric = float((f_plus - f_minus) / (2 * eps))
                analytic = float(grads[name].grad[index])  # type: ignore[index]
                assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(numeric))


def test_rounding_allowance_is_small_and_positive() -> None:
    gen = torch.Generator().manual_seed(9)
    graph = random_cnn(gen)
    lower, upper = box_around(graph, 0.02)
    x = _inputs(graph, 8, gen)
    y = _labels(graph, 8, gen)
    bounds = margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    assert bounds.rounding is not None
    off = _finite(bounds.lower)
    assert bool((bounds.rounding[off] > 0).all())
    assert float(bounds.rounding[off].max()) < 1e-9


def test_nan_bounds_fail_closed() -> None:
    gen = torch.Generator().manual_seed(11)
    graph = random_mlp((3, 4, 2), gen)
    params = dict(graph.parameters)
    lower = dict(params)
    upper = dict(params)
    x = _inputs(graph, 4, gen)
    x[0, 0] = float("nan")
    y = _labels(graph, 4, gen)
    bounds = margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    assert not bool(bounds.certified()[0])


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-tanh", "cnn", "linear"])
def test_class_pair_folding_equals_per_sample_folding(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The (class, class) table path gives the same margins and allowance as the einsum path."""
    import verifier.bounds.ibp as ibp

    gen = torch.Generator().manual_seed(7)
    graph = random_mlp((5, 4), gen) if name == "linear" else GRAPHS[name](gen)
    lower, upper = box_around(graph, 0.1, generator=gen)
    x, y = _inputs(graph, 9, gen), _labels(graph, 9, gen)
    fast = margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    monkeypatch.setattr(ibp, "_PAIR_TABLE_LIMIT", 0)
    slow = margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    assert fast.rounding is not None and slow.rounding is not None
    torch.testing.assert_close(fast.lower, slow.lower, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.rounding, slow.rounding, rtol=1e-9, atol=1e-15)
