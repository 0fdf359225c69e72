"""Cross-checks on tiny nets: closed form, MILP and both z3 encodings agree; bounds and attacks
bracket every exact minimum; witnesses lie in the box and attain what is reported.

Tolerances: MILP optima are compared at 1e-6 of the margin's magnitude (HiGHS meets its
constraints to ~1e-7); z3 works in exact rationals, so its verdicts are checked at thresholds
1e-6 (relative) on either side of the MILP's minimum; bounds may exceed an attained margin by
no more than their float64 rounding allowance.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from tests.tiny_nets import box_around, random_cnn, random_mlp
from verifier.bounds.ibp import margin_bounds
from verifier.crosscheck import CrosscheckConfig, FalsifierConfig, crosscheck_samples
from verifier.crosscheck import run as crosscheck_run
from verifier.crosscheck.chain import relu_chain
from verifier.crosscheck.exact import exact_margins
from verifier.crosscheck.falsify import falsify_sample
from verifier.crosscheck.milp import solve_reduced
from verifier.crosscheck.problem import (
    ExactMargin,
    closed_form_margin,
    hidden_bounds,
    margin_tolerance,
    reduce_problem,
)
from verifier.crosscheck.smt import decide_nonlinear, decide_reduced, minimize_reduced
from verifier.domains import Box
from verifier.errors import BackendError, SoundnessError
from verifier.graph import Activation, AffineScale, Graph, Linear, Op

QUICK = FalsifierConfig(n_uniform=16, n_vertex=16, pgd_steps=15, pgd_restarts=1)


def tiny_case(
    widths: tuple[int, ...], seed: int, radius: float = 0.3
) -> tuple[Graph, Box, Tensor, int]:
    """A random ReLU MLP, an asymmetric box around it, one input and its label 0."""
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp(widths, gen)
    lower, upper = box_around(graph, radius, generator=gen)
    x = torch.randn(1, widths[0], generator=gen, dtype=torch.float64)
    return graph, Box(lower, upper), x, 0


def forward_margin(graph: Graph, x: Tensor, theta: dict[str, Tensor], y: int, j: int) -> float:
    logits = graph.forward(x, theta)[0]
    return float(logits[y] - logits[j])


def assert_witness(graph: Graph, box: Box, x: Tensor, y: int, j: int, result: ExactMargin) -> None:
    """The witness lies in the box and attains the reported (and the solver's) minimum."""
    assert result.status == "optimal" and result.theta is not None and result.margin is not None
    assert box.contains(result.theta)
    attained = forward_margin(graph, x, dict(result.theta), y, j)
    assert attained == pytest.approx(result.margin, abs=1e-12)
    assert result.objective is not None
    assert abs(attained - result.objective) <= margin_tolerance(result.objective)


# ------------------------------------------------------------------ hand-worked cases


def test_closed_form_linear_head_by_hand() -> None:
    """z = W x + b, W = [[1, -1], [0.5, 2]] +- 0.125, b = [0.25, -0.25] +- 0.125, x = (1, -2).

    d = W_0 - W_1 lies in [[0.25, -3.25], [0.75, -2.75]]; with x = (1, -2) the worst terms are
    0.25 * 1 and -2.75 * -2 = 5.5; c = b_0 - b_1 is at least 0.125 - (-0.125) = 0.25. So the
    exact minimum of z_0 - z_1 is 0.25 + 5.5 + 0.25 = 6.0.
    """
    weight = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    bias = torch.tensor([0.25, -0.25], dtype=torch.float64)
    graph = Graph((Linear("fc", "w", "b"),), {"w": weight, "b": bias}, "x", (2,), "z", 2)
    box = Box.around({"w": weight, "b": bias}, radius=0.125)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    result = exact_margins(relu_chain(graph, box, x), 0)[1]
    assert result.method == "closed-form"
    assert result.objective == 6.0 and result.margin == 6.0
    assert_witness(graph, box, x, 0, 1, result)


def test_two_hidden_layers_coefficient_crossing_zero_by_hand() -> None:
    """x = 1; h1 = relu(1 * x) = 1; h2 = relu(w2 h1), w2 in [0.5, 1.5] (and a dead unit);
    z_0 - z_1 = d h2 with d = W3[0, 0] - W3[1, 0] in [-0.3, 0.7] (crossing 0).

    Since h2 >= 0 the worst d is -0.3 whatever h2 is; with d < 0 the worst layer-2 corner is
    the upper one, h2 = 1.5: the minimum is -0.45, attained at W3[0, 0] = -0.3, w2 = 1.5.
    """
    f64 = torch.float64
    params = {
        "w1": torch.tensor([[1.0]], dtype=f64),
        "w2": torch.tensor([[1.0], [-1.0]], dtype=f64),
        "w3": torch.tensor([[0.2, 0.0], [0.0, 0.0]], dtype=f64),
    }
    ops: tuple[Op, ...] = (
        Linear("l1", "w1", None),
        Activation("r1", "relu"),
        Linear("l2", "w2", None),
        Activation("r2", "relu"),
        Linear("l3", "w3", None),
    )
    graph = Graph(ops, params, "x", (1,), "z", 2)
    lower = {"w2": params["w2"] - 0.5, "w3": params["w3"] - torch.tensor([[0.5, 0.0], [0, 0]])}
    upper = {"w2": params["w2"] + 0.5, "w3": params["w3"] + torch.tensor([[0.5, 0.0], [0, 0]])}
    box = Box(lower, upper)
    x = torch.ones(1, 1, dtype=f64)
    chain = relu_chain(graph, box, x)
    for method in ("milp", "smt"):
        result = exact_margins(chain, 0, method=method)[1]  # type: ignore[arg-type]
        assert result.margin == pytest.approx(-0.45, abs=1e-12)
        assert_witness(graph, box, x, 0, 1, result)
        assert result.theta is not None
        assert float(result.theta["w2"][0, 0]) == 1.5
        assert float(result.theta["w3"][0, 0]) == pytest.approx(-0.3, abs=1e-15)


# ------------------------------------------------------------------ exactness and agreement


@pytest.mark.parametrize("seed", range(4))
def test_one_hidden_layer_closed_form_equals_ibp(seed: int) -> None:
    """With one hidden layer and a fixed input, the folded interval bound is exact."""
    graph, box, x, y = tiny_case((4, 6, 3), seed)
    bounds = margin_bounds(graph, box.lower, box.upper, x, torch.tensor([y]), track_rounding=True)
    assert bounds.rounding is not None
    for j, result in exact_margins(relu_chain(graph, box, x), y).items():
        assert result.method == "closed-form"
        assert_witness(graph, box, x, y, j, result)
        assert result.margin is not None
        slack = 2 * float(bounds.rounding[0, j]) + 1e-12
        assert abs(result.margin - float(bounds.lower[0, j])) <= slack


def check_agreement(
    graph: Graph, box: Box, x: Tensor, y: int, *, nonlinear: bool, nonlinear_timeout_s: float = 60
) -> None:
    """Closed form / MILP / z3 optimum agree; z3 LRA and NRA verdicts agree at m -+ delta.

    With a short `nonlinear_timeout_s`, z3's nonlinear encoding may answer "unknown" (it gives
    up on some nets of ~100 parameters); any answer it does give must agree.
    """
    chain = relu_chain(graph, box, x)
    bounds = hidden_bounds(chain)
    for j in range(graph.n_classes):
        if j == y:
            continue
        problem = reduce_problem(chain, bounds, y, j)
        milp = solve_reduced(problem)
        assert_witness(graph, box, x, y, j, milp)
        assert milp.margin is not None
        minimum = milp.margin
        if chain.depth == 2:
            closed = closed_form_margin(problem)
            assert_witness(graph, box, x, y, j, closed)
            assert closed.margin == pytest.approx(minimum, abs=margin_tolerance(minimum))
        optimum = minimize_reduced(problem, timeout_s=30)
        assert_witness(graph, box, x, y, j, optimum)
        assert optimum.margin == pytest.approx(minimum, abs=margin_tolerance(minimum))
        delta = 1e-6 * max(1.0, abs(minimum))
        for threshold, expected in ((minimum + delta, "sat"), (minimum - delta, "unsat")):
            linear = decide_reduced(problem, threshold=threshold, timeout_s=30)
            assert linear.status == expected, (j, threshold, minimum)
            if nonlinear:
                direct = decide_nonlinear(
                    graph, box, x, y, j, threshold=threshold, timeout_s=nonlinear_timeout_s
                )
                if direct.status == "unknown" and nonlinear_timeout_s < 60:
                    continue
                assert direct.status == expected, (j, threshold, minimum)
                if direct.status == "sat":
                    assert direct.theta is not None and box.contains(direct.theta)
                    assert direct.margin is not None
                    assert direct.margin <= threshold + 1e-9
        # the verdict users see: "some weights in the box misclassify x against j"
        verdict = decide_reduced(problem, threshold=0.0, timeout_s=30).status
        if abs(minimum) > delta:
            assert verdict == ("sat" if minimum <= 0 else "unsat")


@pytest.mark.parametrize(
    ("widths", "seed"),
    [((2, 3, 2), 0), ((3, 4, 3), 1), ((3, 4, 3, 2), 0), ((3, 4, 3, 2), 1), ((2, 3, 3, 3, 2), 2)],
)
def test_exact_methods_agree_on_tiny_nets(widths: tuple[int, ...], seed: int) -> None:
    graph, box, x, y = tiny_case(widths, seed)
    check_agreement(graph, box, x, y, nonlinear=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("widths", [(4, 6, 6, 3), (4, 5, 5, 5, 3), (5, 8, 8, 3)])
def test_exact_methods_agree_on_larger_tiny_nets(widths: tuple[int, ...], seed: int) -> None:
    graph, box, x, y = tiny_case(widths, seed, radius=0.5)
    check_agreement(graph, box, x, y, nonlinear=True, nonlinear_timeout_s=20)


def scaled_graph(generator: torch.Generator) -> Graph:
    """3 -> 4 -> 3 -> 2 with an in_out weight, Gemm-like scales (one negative) and a shift."""
    f64 = torch.float64

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=f64)

    scale = AffineScale(
        weight_scale=torch.tensor([1.5, -0.5, 2.0], dtype=f64),
        bias_scale=torch.tensor([-1.0, 0.5, 1.0], dtype=f64),
        shift=torch.tensor([0.1, -0.2, 0.3], dtype=f64),
    )
    ops: tuple[Op, ...] = (
        Linear("l1", "w1", "b1", weight_layout="in_out"),
        Activation("r1", "relu"),
        Linear("l2", "w2", "b2", scale=scale),
        Activation("r2", "relu"),
        Linear("l3", "w3", "b3"),
    )
    params = {
        "w1": randn(3, 4),
        "b1": 0.1 * randn(4),
        "w2": randn(3, 4) / 2,
        "b2": 0.1 * randn(3),
        "w3": randn(2, 3),
        "b3": 0.1 * randn(2),
    }
    return Graph(ops, params, "x", (3,), "z", 2)


@pytest.mark.parametrize("seed", range(3))
def test_scales_and_transposed_weights(seed: int) -> None:
    """Effective intervals of scaled / in_out layers map back to ONNX parameters in the box."""
    gen = torch.Generator().manual_seed(seed)
    graph = scaled_graph(gen)
    lower, upper = box_around(graph, 0.4, generator=gen)
    box = Box(lower, upper)
    x = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    check_agreement(graph, box, x, 0, nonlinear=True)
    bounds = margin_bounds(graph, box.lower, box.upper, x, torch.tensor([0]), track_rounding=True)
    result = exact_margins(relu_chain(graph, box, x), 0)[1]
    assert result.margin is not None and result.margin >= float(bounds.lower[0, 1]) - 1e-9


def test_frozen_prefix_and_partial_boxes() -> None:
    """Only the last two layers boxed: the first layers are a fixed prefix."""
    graph, _, x, y = tiny_case((3, 4, 4, 3, 2), 5)
    names = ["fc2.weight", "fc2.bias", "fc3.weight"]
    lower, upper = box_around(graph, 0.5, names, generator=torch.Generator().manual_seed(1))
    box = Box(lower, upper)
    chain = relu_chain(graph, box, x)
    assert chain.depth == 2 and chain.x.shape == (4,)
    check_agreement(graph, box, x, y, nonlinear=True)


def test_cnn_head_is_exact_but_boxed_conv_is_refused() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_cnn(gen)
    x = torch.rand(1, 1, 9, 9, generator=gen, dtype=torch.float64)
    lower, upper = box_around(graph, 0.2, ["fc.weight", "fc.bias"], generator=gen)
    head = Box(lower, upper)
    for j, result in exact_margins(relu_chain(graph, head, x), 0).items():
        assert_witness(graph, head, x, 0, j, result)
    lower, upper = box_around(graph, 0.2, generator=gen)
    with pytest.raises(BackendError, match="Conv"):
        relu_chain(graph, Box(lower, upper), x)


def test_deep_net_timeout_reports_bound_and_incumbent() -> None:
    graph, box, x, y = tiny_case((10, 40, 40, 40, 40, 5), 0)
    result = exact_margins(relu_chain(graph, box, x), y, timeout_s=1.0, classes=[1])[1]
    bounds = margin_bounds(graph, box.lower, box.upper, x, torch.tensor([y]))
    if result.status == "optimal":  # a fast machine: then it is an exact minimum
        assert_witness(graph, box, x, y, 1, result)
        return
    assert result.status == "timeout" and "time limit" in result.reason.lower()
    if result.incumbent is not None:
        assert result.theta is not None and box.contains(result.theta)
        assert result.incumbent >= float(bounds.lower[0, 1]) - 1e-9
        if result.lower is not None:
            assert result.lower <= result.incumbent + margin_tolerance(result.incumbent)


# ------------------------------------------------------------------ bounds <= exact <= attacks


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("widths", [(4, 3), (4, 6, 3), (4, 6, 5, 3), (3, 5, 4, 4, 3)])
def test_exact_between_bounds_and_falsifiers(widths: tuple[int, ...], seed: int) -> None:
    graph, box, x, y = tiny_case(widths, seed)
    bounds = margin_bounds(graph, box.lower, box.upper, x, torch.tensor([y]), track_rounding=True)
    assert bounds.rounding is not None
    gen = torch.Generator().manual_seed(seed)
    found = falsify_sample(graph, box, x, y, config=QUICK, generator=gen)
    for j, result in exact_margins(relu_chain(graph, box, x), y).items():
        assert_witness(graph, box, x, y, j, result)
        assert result.margin is not None
        allowance = 2 * float(bounds.rounding[0, j])
        assert result.margin >= float(bounds.lower[0, j]) - allowance
        assert result.margin <= float(found.margins[j]) + margin_tolerance(result.margin)
        witness = found.witnesses[j]
        assert box.contains(witness)
        assert forward_margin(graph, x, witness, y, j) == float(found.margins[j])


def test_exact_at_least_crown_ibp() -> None:
    from verifier.bounds.lirpa import lirpa_margin_bounds

    for seed in range(2):
        graph, box, x, y = tiny_case((4, 6, 5, 3), seed)
        crown = lirpa_margin_bounds(graph, box.lower, box.upper, x, torch.tensor([y]))
        for j, result in exact_margins(relu_chain(graph, box, x), y).items():
            assert result.margin is not None
            assert result.margin >= float(crown[0, j]) - 1e-9


# ------------------------------------------------------------------ orchestration


def test_crosscheck_samples_sound_on_tiny_net() -> None:
    graph, box, _, _ = tiny_case((4, 6, 5, 3), 3, radius=0.05)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    y = graph.forward(x).argmax(dim=1)
    progress: list[tuple[int, int]] = []
    config = CrosscheckConfig(falsifier=QUICK)
    result = crosscheck_samples(
        graph, box, x, y, config=config, on_progress=lambda d, t: progress.append((d, t))
    )
    assert progress[-1] == (4, 4)
    assert result.sound
    result.check_sound()
    summary = result.summary()
    assert summary["exact"] == {"solved": 8, "timeout": 0, "skipped": 0}
    assert summary["gaps"]["ibp"]["n"] == 8 and summary["gaps"]["ibp"]["mean"] >= -1e-9
    assert summary["exact_inconsistent"] == 0
    for sample in result.samples:
        for margin in sample.margins:
            assert margin.exact_value is not None
            assert margin.ibp - 2 * margin.ibp_allowance <= margin.exact_value
            assert margin.crown_ibp is not None and margin.crown_ibp <= margin.exact_value + 1e-9
            assert margin.exact_value <= margin.falsified + margin_tolerance(margin.falsified)


def test_crosscheck_exact_methods_give_the_same_minima() -> None:
    graph, box, _, _ = tiny_case((3, 5, 4, 3), 6, radius=0.2)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = graph.forward(x).argmax(dim=1)
    light = FalsifierConfig(n_uniform=2, n_vertex=2, pgd_steps=2, pgd_restarts=0)
    runs = {
        exact: crosscheck_samples(
            graph, box, x, y, config=CrosscheckConfig(exact=exact, falsifier=light)
        )
        for exact in ("auto", "milp", "smt")
    }
    for exact, run in runs.items():
        assert run.summary()["exact"]["solved"] == 4, exact
    for a, b, c in zip(*(r.samples for r in runs.values()), strict=True):
        for m, n, o in zip(a.margins, b.margins, c.margins, strict=True):
            assert m.exact.method == n.exact.method == "milp" and o.exact.method == "smt"
            assert m.exact_value is not None
            tolerance = margin_tolerance(m.exact_value)
            assert n.exact_value == pytest.approx(m.exact_value, abs=tolerance)
            assert o.exact_value == pytest.approx(m.exact_value, abs=tolerance)


def test_worker_processes_give_the_same_result() -> None:
    """--jobs: spawned workers (one torch thread each) reproduce the in-process run."""
    graph, box, _, _ = tiny_case((4, 6, 5, 3), 4, radius=0.05)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = graph.forward(x).argmax(dim=1)
    runs = [
        crosscheck_samples(graph, box, x, y, config=CrosscheckConfig(jobs=jobs, falsifier=QUICK))
        for jobs in (1, 2)
    ]
    for a, b in zip(runs[0].samples, runs[1].samples, strict=True):
        for m, n in zip(a.margins, b.margins, strict=True):
            assert (m.exact_value, m.falsified, m.ibp) == (n.exact_value, n.falsified, n.ibp)


def test_unsound_bound_is_a_violation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound pushed above the true minimum is caught by the falsifiers and the exact solver."""
    real = crosscheck_run.margin_bounds

    def inflated(*args: object, **kwargs: object) -> object:
        bounds = real(*args, **kwargs)  # type: ignore[arg-type]
        return type(bounds)(bounds.lower + 1.0, bounds.rounding)

    monkeypatch.setattr(crosscheck_run, "margin_bounds", inflated)
    graph, box, _, _ = tiny_case((4, 6, 3), 3, radius=0.05)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = graph.forward(x).argmax(dim=1)
    result = crosscheck_samples(graph, box, x, y, config=CrosscheckConfig(falsifier=QUICK))
    assert not result.sound and result.summary()["verdict"] == "violation"
    margin = result.samples[0].violations[0]
    assert "ibp" in margin.violation_methods
    assert margin.witness is not None and box.contains(margin.witness)
    with pytest.raises(SoundnessError, match="exceeds the margin"):
        result.check_sound()


def test_crosscheck_without_exact_and_with_boxed_conv() -> None:
    gen = torch.Generator().manual_seed(2)
    graph = random_cnn(gen)
    lower, upper = box_around(graph, 0.02, generator=gen)
    x = torch.rand(2, 1, 9, 9, generator=gen, dtype=torch.float64)
    y = graph.forward(x).argmax(dim=1)
    light = FalsifierConfig(n_uniform=4, n_vertex=4, pgd_steps=4, pgd_restarts=0)
    for exact in ("auto", "none"):
        config = CrosscheckConfig(exact=exact, falsifier=light)  # type: ignore[arg-type]
        result = crosscheck_samples(graph, Box(lower, upper), x, y, config=config)
        assert result.sound
        summary = result.summary()
        assert summary["exact"]["skipped"] == 4 and summary["gaps"]["crown_ibp"] is None
        assert "Linear" in result.crown_note
        reason = result.samples[0].margins[0].exact.reason
        assert ("Conv" in reason) if exact == "auto" else ("not requested" in reason)
        assert math.isfinite(summary["gaps_to_falsified"]["ibp"]["mean"])
