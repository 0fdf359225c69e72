"""Branch and bound on ReLU splits (verifier.bounds.bab): soundness against the exact MILP
minimum, sampled, vertex and PGD-attacked weights; never looser than the linear bound; exact
with an unlimited budget on tiny nets; the forward pass on a zero-width box; `certify.method:
bab` against `best`; the cross-check's bab column; bad options.

Tolerances: exact MILP minima by their solver tolerance (`margin_tolerance`); sampled margins
by 1e-9 (float64 rounding of both sides, magnitudes ~1).
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tests.oracles import attack_margins, sampled_worst_margins
from tests.tiny_nets import box_around, random_cnn, random_mlp
from verifier.bounds.bab import BabOptions, bab_margin_bounds
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.margins import MarginBounds
from verifier.certify import certify_samples
from verifier.crosscheck.chain import relu_chain
from verifier.crosscheck.exact import exact_margins
from verifier.crosscheck.falsify import FalsifierConfig
from verifier.crosscheck.problem import margin_tolerance
from verifier.crosscheck.run import CrosscheckConfig, crosscheck_samples
from verifier.domains import Box
from verifier.errors import GraphError, InputError, SpecError
from verifier.graph import Graph
from verifier.spec import parse_spec

TIGHT = BabOptions(max_domains=24, steps=10, root_steps=20, stop_at=None)
"""A small tightness search: splits the lowest leaves of every margin until 24 domains are
spent."""


def _data(graph: Graph, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.rand(n, *graph.input_shape, generator=gen, dtype=torch.float64) * 2 - 1
    return x, torch.randint(0, graph.n_classes, (n,), generator=gen)


def _trained(gen: torch.Generator) -> Graph:
    """A 6-10-8-3 MLP fitted for 150 Adam steps to a random linear labelling (trained-ish:
    larger, more structured weights than at initialisation)."""
    graph = random_mlp((6, 10, 8, 3), gen)
    x = torch.randn(256, 6, generator=gen, dtype=torch.float64)
    y = (x @ torch.randn(6, 3, generator=gen, dtype=torch.float64)).argmax(dim=1)
    theta = {k: v.clone().requires_grad_(True) for k, v in graph.parameters.items()}
    optimiser = torch.optim.Adam(list(theta.values()), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(graph.forward(x, theta), y).backward()
        optimiser.step()
    return Graph(
        ops=graph.ops,
        parameters={k: v.detach() for k, v in theta.items()},
        input_name=graph.input_name,
        input_shape=graph.input_shape,
        output_name=graph.output_name,
        n_classes=graph.n_classes,
    )


NETS = {
    "6-8-8-3": lambda g: random_mlp((6, 8, 8, 3), g),
    "5-7-6-6-3": lambda g: random_mlp((5, 7, 6, 6, 3), g),
    "trained-6-10-8-3": _trained,
}


def _slack(bounds: MarginBounds) -> Tensor:
    return bounds.lower if bounds.rounding is None else bounds.lower - bounds.rounding


def _exact(graph: Graph, box: Box, x: Tensor, y: Tensor) -> Tensor:
    """Exact worst-case margins by MILP, +inf at the label."""
    out = torch.full((x.shape[0], graph.n_classes), torch.inf, dtype=torch.float64)
    for i in range(x.shape[0]):
        found = exact_margins(relu_chain(graph, box, x[i : i + 1]), int(y[i]), method="milp")
        for j, result in found.items():
            assert result.status == "optimal" and result.margin is not None
            out[i, j] = result.margin
    return out


# ------------------------------------------------------------------ soundness


@pytest.mark.parametrize("name", ["6-8-8-3", "trained-6-10-8-3"])
@pytest.mark.parametrize("radius", [0.05, 0.3])
def test_exact_milp_minimum_is_never_below_the_bound(name: str, radius: float) -> None:
    gen = torch.Generator().manual_seed(int(radius * 100))
    graph = NETS[name](gen)
    lower, upper = box_around(graph, radius, generator=gen)
    x, y = _data(graph, 3, gen)
    bounds = bab_margin_bounds(graph, lower, upper, x, y, options=TIGHT, track_rounding=True)
    exact = _exact(graph, Box(lower, upper), x, y)
    slack = _slack(bounds)
    for (i, j), value in zip(
        torch.cartesian_prod(torch.arange(3), torch.arange(3)), exact.flatten(), strict=True
    ):
        if int(j) == int(y[i]):
            continue
        assert float(slack[i, j]) <= float(value) + margin_tolerance(float(value)), (
            f"sample {int(i)}, class {int(j)}: exact minimum {float(value)} below the bound "
            f"{float(bounds.lower[i, j])}"
        )


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("radius", [0.02, 0.2])
def test_bounds_hold_under_sampling_and_attack(name: str, radius: float) -> None:
    gen = torch.Generator().manual_seed(7 + int(radius * 100))
    graph = NETS[name](gen)
    lower, upper = box_around(graph, radius, generator=gen)
    x, y = _data(graph, 6, gen)
    bounds = bab_margin_bounds(graph, lower, upper, x, y, options=TIGHT)
    box = Box(lower, upper)
    samples = chain(box.sample(80, generator=gen), box.sample(40, generator=gen, kind="vertex"))
    worst = sampled_worst_margins(graph, samples, x, y)
    attacked = attack_margins(graph, lower, upper, x, y, steps=30, generator=gen)
    worst = torch.minimum(worst, attacked)
    mask = torch.isfinite(bounds.lower)
    gap = (worst - bounds.lower)[mask]
    assert float(gap.min()) >= -1e-9, f"a weight vector in the box beats a bound by {-gap.min()}"


@pytest.mark.parametrize("name", ["6-8-8-3", "5-7-6-6-3"])
def test_never_looser_than_the_linear_bound(name: str) -> None:
    gen = torch.Generator().manual_seed(11)
    graph = NETS[name](gen)
    lower, upper = box_around(graph, 0.1, generator=gen)
    x, y = _data(graph, 6, gen)
    linear = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    mask = torch.isfinite(linear.lower)
    for budget in (0, 24):
        options = BabOptions(max_domains=budget, steps=10, stop_at=None)
        bab = bab_margin_bounds(graph, lower, upper, x, y, options=options, track_rounding=True)
        assert bool((_slack(bab)[mask] >= _slack(linear)[mask]).all())
    # and it closes part of the gap on this box (the search does something)
    assert float((_slack(bab) - _slack(linear))[mask].max()) > 1e-3


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("seed", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_unlimited_budget_reaches_the_exact_milp_minimum(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp((6, 8, 8, 3), gen)
    _data(graph, 3, gen)  # the draws of the first box scale, to reach the cases below
    x, y = _data(graph, 3, gen)
    lower, upper = box_around(graph, 0.2)
    options = BabOptions(max_domains=None, stop_at=None)
    bounds = bab_margin_bounds(graph, lower, upper, x, y, options=options, track_rounding=True)
    linear = linear_margin_bounds(graph, lower, upper, x, y)
    exact = _exact(graph, Box(lower, upper), x, y)
    mask = torch.isfinite(exact)
    gap = (exact - bounds.lower)[mask]
    assert float(gap.abs().max()) <= 1e-6, f"gap to the exact minimum {float(gap.abs().max())}"
    assert float((exact - linear.lower)[mask].max()) > 1e-2  # the linear bound is not exact here


def test_zero_width_box_gives_the_forward_pass() -> None:
    gen = torch.Generator().manual_seed(5)
    graph = random_mlp((6, 8, 8, 3), gen)
    x, y = _data(graph, 5, gen)
    theta = dict(graph.parameters)
    bounds = bab_margin_bounds(graph, theta, theta, x, y, options=TIGHT, track_rounding=True)
    logits = graph.forward(x)
    margins = logits.gather(1, y[:, None]) - logits
    mask = torch.isfinite(bounds.lower)
    torch.testing.assert_close(bounds.lower[mask], margins[mask], rtol=0.0, atol=1e-12)
    assert bounds.rounding is not None and float(bounds.rounding.max()) < 1e-12


def test_one_hidden_layer_is_exact_at_the_root() -> None:
    """A first boxed layer on a point input has independent pre-activations: slopes 0 make the
    root exact, so even a zero budget gives the exact minimum (the closed form)."""
    gen = torch.Generator().manual_seed(6)
    graph = random_mlp((5, 9, 3), gen)
    lower, upper = box_around(graph, 0.2, generator=gen)
    x, y = _data(graph, 4, gen)
    bounds = bab_margin_bounds(graph, lower, upper, x, y, options=BabOptions(max_domains=0))
    box = Box(lower, upper)
    for i in range(4):
        for j, result in exact_margins(relu_chain(graph, box, x[i : i + 1]), int(y[i])).items():
            assert result.margin is not None
            assert abs(result.margin - float(bounds.lower[i, j])) <= 1e-9


# ------------------------------------------------------------------ certification


def test_certify_bab_certifies_at_least_best_and_only_true_samples() -> None:
    gen = torch.Generator().manual_seed(1)
    graph = random_mlp((6, 8, 8, 3), gen)
    x = torch.rand(24, 6, generator=gen, dtype=torch.float64) * 2 - 1
    y = graph.forward(x).argmax(dim=1)
    box = Box(*box_around(graph, 0.08))
    best, _ = certify_samples(graph, box, x, y, method="best")
    bab, nonfinite = certify_samples(graph, box, x, y, method="bab", chunk_size=16)
    assert nonfinite == 0
    assert bool((bab | ~best).all()), "bab lost a sample best certifies"
    assert int(bab.sum()) > int(best.sum())  # it proves more here
    exact = _exact(graph, box, x[bab], y[bab])
    assert bool((exact > 0).all()), "a sample bab certified has a non-positive worst margin"


def test_certify_bab_runs_through_the_spec() -> None:
    raw = {"model": "m.onnx", "data": {"name": "digits"}, "certify": {"method": "bab"}}
    spec = parse_spec(raw, source=Path("spec.yaml"))
    assert spec.certify.method == "bab" and spec.certify.bab.max_domains == 200
    raw["certify"] = {"method": "bab", "bab": {"max_domains": -1}}
    with pytest.raises(SpecError, match="max_domains"):
        parse_spec(raw, source=Path("spec.yaml"))


def test_crosscheck_reports_the_bab_gap() -> None:
    gen = torch.Generator().manual_seed(4)
    graph = random_mlp((4, 6, 5, 3), gen)
    box = Box(*box_around(graph, 0.1))
    x = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2 - 1
    y = graph.forward(x).argmax(dim=1)
    quick = FalsifierConfig(n_uniform=16, n_vertex=8, pgd_restarts=1, pgd_steps=10)
    config = CrosscheckConfig(exact="milp", falsifier=quick, bab=TIGHT)
    result = crosscheck_samples(graph, box, x, y, config=config)
    assert result.sound
    summary = result.summary()
    assert summary["gaps"]["bab"]["n"] == 6
    assert -1e-9 <= summary["gaps"]["bab"]["mean"] <= summary["gaps"]["linear"]["mean"]
    assert summary["certified_bab"] >= summary["certified_linear"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "options",
    [
        {"max_domains": -1},
        {"timeout_s": 0.0},
        {"branch_per_round": 0},
        {"steps": -2},
        {"lr": float("nan")},
        {"intermediate": "zonotope"},
        {"stop_at": float("inf")},
    ],
)
def test_bad_options_give_a_one_line_input_error(options: dict[str, object]) -> None:
    with pytest.raises(InputError) as info:
        BabOptions(**options)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and next(iter(options)) in str(info.value)


def test_a_graph_other_than_a_relu_chain_is_refused_naming_the_node() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_cnn(gen)
    lower, upper = box_around(graph, 0.01)
    x = torch.rand(2, *graph.input_shape, generator=gen, dtype=torch.float64)
    with pytest.raises(GraphError, match="node '.*' \\(conv\\)"):
        bab_margin_bounds(graph, lower, upper, x, torch.tensor([0, 1]))
    tanh = random_mlp((4, 5, 3), gen, activation="tanh")
    lower, upper = box_around(tanh, 0.01)
    with pytest.raises(GraphError, match="tanh"):
        bab_margin_bounds(
            tanh, lower, upper, torch.zeros(1, 4, dtype=torch.float64), y=torch.tensor([0])
        )


def test_proof_mode_needs_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_mlp((4, 5, 3), gen, dtype=torch.float32)
    lower, upper = box_around(graph, 0.01)
    with pytest.raises(InputError, match="float64"):
        bab_margin_bounds(
            graph, lower, upper, torch.zeros(1, 4), torch.tensor([0]), track_rounding=True
        )
