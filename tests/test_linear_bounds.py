"""The linear-bound engine (verifier.bounds.linear): soundness against sampled, vertex and
PGD-attacked weights and the exact MILP minimum, exactness on zero-width boxes, gradients,
tightness against IBP and auto_LiRPA's CROWN-IBP, a hand-worked case, and the float64 rounding
allowance.

Tolerances: a sampled margin may fall below a bound by at most 1e-9 (float64 rounding of both
the bound and the forward pass, magnitudes ~1); exact MILP minima by their solver tolerance
(`margin_tolerance`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain

import pytest
import torch
from torch import Tensor

from tests.dag_nets import DAG_NETS
from tests.oracles import attack_margins, sampled_worst_margins
from tests.tiny_nets import box_around, op_zoo_cnn, op_zoo_mlp, random_cnn, random_mlp
from verifier.bounds.ibp import margin_bounds, propagate_tensors
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.margins import MarginBounds, combine_margin_bounds
from verifier.crosscheck.chain import relu_chain
from verifier.crosscheck.exact import exact_margins
from verifier.crosscheck.problem import margin_tolerance
from verifier.domains import Box
from verifier.errors import DataError, DomainError
from verifier.graph import (
    Activation,
    AffineScale,
    Binary,
    Conv,
    Elementwise,
    Graph,
    Linear,
    Pool,
    Reshape,
)

SLACK = 1e-9

NETS: dict[str, Callable[[torch.Generator], Graph]] = {
    "mlp-relu": lambda g: random_mlp((5, 7, 6, 3), g),
    "mlp-tanh": lambda g: random_mlp((5, 7, 6, 3), g, activation="tanh"),
    "mlp-sigmoid": lambda g: random_mlp((4, 8, 6, 3), g, activation="sigmoid"),
    "cnn": random_cnn,
    "zoo-cnn": op_zoo_cnn,
    "zoo-mlp": op_zoo_mlp,
    **DAG_NETS,
}
"""Every test net; together they use every op type and activation of `verifier.graph`."""

PROOF_NETS = sorted(set(NETS) - {"zoo-cnn"})
"""Nets with a finite proof-mode allowance (IBP's proof mode gives c/x an infinite error)."""


def test_the_nets_use_every_op_and_activation() -> None:
    """Every op kind, activation and elementwise form appears where the backward pass reads it
    (on a tensor that depends on the box), so every rule and fallback is exercised."""
    gen = torch.Generator().manual_seed(0)
    kinds: set[str] = set()
    for build in NETS.values():
        graph = build(gen)
        lower, upper = box_around(graph, 0.01)
        x, _ = _data(graph, 2, gen)
        env = propagate_tensors(graph, lower, upper, x)
        for op in graph.ops:
            if all(env[name][0].is_point for name in op.inputs):
                continue  # a point: concretised before the pass reaches the op
            kinds.add(op.kind)
            if isinstance(op, Activation):
                kinds.add(op.function)
            if isinstance(op, Elementwise):
                kinds.add(f"{op.op}{'-first' if op.constant_first else ''}")
            if isinstance(op, Binary | Pool):
                kinds.add(f"{op.kind}-{op.op if isinstance(op, Binary) else op.function}")
    ops = {"linear", "conv", "activation", "elementwise", "reshape", "pool", "binary"}
    ops |= {"concat", "transpose", "pad", "slice"}
    functions = {"relu", "sigmoid", "tanh", "leaky_relu", "clip"}
    constants = {"add", "sub", "sub-first", "mul", "div", "div-first"}
    joins = {"binary-add", "binary-sub", "binary-mul", "pool-max", "pool-average"}
    assert ops | functions | constants | joins <= kinds, sorted(
        ops | functions | constants | joins - kinds
    )


def _data(graph: Graph, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.rand(n, *graph.input_shape, generator=gen, dtype=torch.float64) * 2 - 1
    return x, torch.randint(0, graph.n_classes, (n,), generator=gen)


def _finite(bounds: Tensor) -> Tensor:
    return torch.isfinite(bounds)


def assert_below_oracles(
    graph: Graph,
    bounds: MarginBounds,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    gen: torch.Generator,
    *,
    n_samples: int = 60,
    attack_steps: int = 25,
) -> None:
    """No uniform or vertex sample and no weight-space PGD attack beats any bound."""
    box = Box(lower, upper)
    samples = chain(
        box.sample(n_samples, generator=gen),
        box.sample(n_samples // 2, generator=gen, kind="vertex"),
    )
    worst = sampled_worst_margins(graph, samples, x, y)
    if attack_steps:
        attacked = attack_margins(graph, lower, upper, x, y, steps=attack_steps, generator=gen)
        worst = torch.minimum(worst, attacked)
    mask = _finite(bounds.lower)
    gap = worst - bounds.lower
    index = divmod(int(torch.where(mask, gap, torch.inf).argmin()), gap.shape[1])
    assert float(gap[mask].min()) >= -SLACK, (
        f"margin {index} is {float(worst[index])} at some θ in the box, below its bound "
        f"{float(bounds.lower[index])}"
    )


# ------------------------------------------------------------------ soundness


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("radius", [0.001, 0.01, 0.05])
@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_bounds_hold_under_sampling_and_attack(name: str, radius: float, intermediate: str) -> None:
    gen = torch.Generator().manual_seed(int(radius * 1000))
    graph = NETS[name](gen)
    lower, upper = box_around(graph, radius, generator=gen)
    x, y = _data(graph, 8, gen)
    bounds = linear_margin_bounds(graph, lower, upper, x, y, intermediate=intermediate)  # type: ignore[arg-type]
    assert_below_oracles(graph, bounds, lower, upper, x, y, gen)


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-tanh", "zoo-mlp", "zoo-cnn", "residual-cnn"])
def test_optimized_slopes_hold_and_never_lose_to_adaptive(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    graph = NETS[name](gen)
    lower, upper = box_around(graph, 0.05, generator=gen)
    x, y = _data(graph, 8, gen)
    adaptive = linear_margin_bounds(graph, lower, upper, x, y)
    optimized = linear_margin_bounds(graph, lower, upper, x, y, slopes="optimized", slope_steps=10)
    assert_below_oracles(graph, optimized, lower, upper, x, y, gen)
    mask = _finite(adaptive.lower)
    assert bool((optimized.lower[mask] >= adaptive.lower[mask] - 1e-12).all())


SUBSETS = {
    "mlp-relu": ["fc1.weight", "fc2.bias"],
    "cnn": ["conv0.weight", "conv1.bias"],
    "zoo-cnn": ["c1.weight", "mm.weight"],
    "residual-mlp": ["fc2.weight", "fc3.weight", "head.bias"],
    "residual-cnn": ["c2.weight"],
}


@pytest.mark.parametrize("name", sorted(SUBSETS))
def test_bounds_hold_on_a_box_over_some_parameters(name: str) -> None:
    gen = torch.Generator().manual_seed(4)
    graph = NETS[name](gen)
    lower, upper = box_around(graph, 0.1, SUBSETS[name], generator=gen)
    x, y = _data(graph, 8, gen)
    for intermediate in ("ibp", "crown"):
        bounds = linear_margin_bounds(graph, lower, upper, x, y, intermediate=intermediate)  # type: ignore[arg-type]
        assert_below_oracles(graph, bounds, lower, upper, x, y, gen, attack_steps=15)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("radius", [0.01, 0.05])
def test_exact_milp_minimum_is_never_below_the_bound(seed: int, radius: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp((4, 6, 5, 3), gen)
    lower, upper = box_around(graph, radius, generator=gen)
    box = Box(lower, upper)
    x, y = _data(graph, 3, gen)
    bounds = linear_margin_bounds(graph, lower, upper, x, y, intermediate="crown")
    for i in range(x.shape[0]):
        exact = exact_margins(relu_chain(graph, box, x[i : i + 1]), int(y[i]), method="milp")
        for j, result in exact.items():
            assert result.status == "optimal" and result.margin is not None
            bound = float(bounds.lower[i, j])
            assert result.margin >= bound - margin_tolerance(result.margin), (
                f"sample {i}, class {j}: exact minimum {result.margin} below the bound {bound}"
            )


# ------------------------------------------------------------------ exactness and tightness


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("same_tensors", [True, False])
def test_zero_width_box_gives_the_forward_margins(name: str, same_tensors: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    graph = NETS[name](gen)
    x, y = _data(graph, 6, gen)
    params = dict(graph.parameters)
    lower = params if same_tensors else {k: v.clone() for k, v in params.items()}
    upper = params if same_tensors else {k: v.clone() for k, v in params.items()}
    z = graph.forward(x)
    expected = z.gather(1, y[:, None]) - z
    for intermediate in ("ibp", "crown"):
        bounds = linear_margin_bounds(graph, lower, upper, x, y, intermediate=intermediate)  # type: ignore[arg-type]
        mask = _finite(bounds.lower)
        assert int(mask.sum()) == x.shape[0] * (graph.n_classes - 1)
        torch.testing.assert_close(bounds.lower[mask], expected[mask], rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_combined_with_ibp_never_looser_and_tighter_on_deep_relu_nets(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp((8, 16, 16, 16, 4), gen)
    lower, upper = box_around(graph, 0.02, generator=gen)
    x, y = _data(graph, 32, gen)
    ibp = margin_bounds(graph, lower, upper, x, y)
    linear = linear_margin_bounds(graph, lower, upper, x, y)
    best = combine_margin_bounds(ibp, linear)
    mask = _finite(ibp.lower)
    assert bool((best.lower[mask] >= ibp.lower[mask]).all())
    assert float((linear.lower - ibp.lower)[mask].mean()) > 0


def test_at_least_as_tight_as_auto_lirpa_crown_ibp_on_linear_only_models() -> None:
    from verifier.bounds.lirpa import lirpa_margin_bounds

    for seed, activation in enumerate(("relu", "relu", "tanh")):
        gen = torch.Generator().manual_seed(seed)
        graph = random_mlp((6, 10, 10, 4), gen, activation=activation)  # type: ignore[arg-type]
        lower, upper = box_around(graph, 0.02, generator=gen)
        x, y = _data(graph, 12, gen)
        ours = linear_margin_bounds(graph, lower, upper, x, y).lower
        lirpa = lirpa_margin_bounds(graph, lower, upper, x, y, method="crown-ibp")
        mask = _finite(ours)
        assert float((ours - lirpa)[mask].mean()) >= -1e-12, activation
        if activation == "relu":  # every boxed layer reads a point or a ReLU output: both exact
            assert bool((ours[mask] >= lirpa[mask] - 1e-9).all())


def test_hand_worked_relu_relaxation() -> None:
    """x = 1, z = w x with w in [-1, 3], margin d = relu(z) - 0.5 z (class 1's logit is 0).

    Exact minimum over w: relu(w) - w/2 >= 0, attained at w = 0, so 0. IBP: relu(z) in [0, 3]
    and 0.5 z in [-0.5, 1.5] independently, so 0 - 1.5 = -1.5. Linear, adaptive: the lower ReLU
    slope is 1 (u = 3 >= -l = 1), relu(z) >= z, so d >= 0.5 z >= -0.5. With the optimal slope
    1/2 (relu(z) >= z/2), d >= 0: optimised slopes approach it.
    """
    f64 = torch.float64
    params = {
        "w": torch.tensor([[1.0]], dtype=f64),
        "head": torch.tensor([[1.0], [0.0]], dtype=f64),
    }
    ops = (
        Linear("fc", "w", None, inputs=("x",), output="z"),
        Activation("relu", "relu", inputs=("z",), output="h"),
        Elementwise("half", "mul", torch.tensor(0.5, dtype=f64), inputs=("z",), output="hz"),
        Binary("diff", "sub", inputs=("h", "hz"), output="d"),
        Linear("head", "head", None, inputs=("d",), output="logits"),
    )
    graph = Graph(ops, params, "x", (1,), "logits", 2)
    lower, upper = {"w": torch.tensor([[-1.0]], dtype=f64)}, {"w": torch.tensor([[3.0]], dtype=f64)}
    x, y = torch.ones(1, 1, dtype=f64), torch.zeros(1, dtype=torch.long)
    assert float(margin_bounds(graph, lower, upper, x, y).lower[0, 1]) == -1.5
    assert float(linear_margin_bounds(graph, lower, upper, x, y).lower[0, 1]) == -0.5
    optimized = linear_margin_bounds(graph, lower, upper, x, y, slopes="optimized", slope_steps=40)
    assert -0.02 <= float(optimized.lower[0, 1]) <= 1e-12


def test_hand_worked_chord_over_a_weight_box() -> None:
    """h = w x with w in [-1, 2] and x = 1 crosses zero; margin v h with v in [1, 3].

    g(h) = min(v h) = min(h, 3h): g(-1) = -3, g(2) = 2, chord slope 5/3, intercept -4/3; then
    5/3 w - 4/3 >= -3 at w = -1, the exact minimum (v = 3, w = -1).
    """
    f64 = torch.float64
    params = {"w": torch.tensor([[1.0]], dtype=f64), "v": torch.tensor([[2.0], [0.0]], dtype=f64)}
    ops = (
        Linear("fc", "w", None, inputs=("x",), output="h"),
        Linear("head", "v", None, inputs=("h",), output="logits"),
    )
    graph = Graph(ops, params, "x", (1,), "logits", 2)
    lower = {"w": torch.tensor([[-1.0]], dtype=f64), "v": torch.tensor([[1.0], [0.0]], dtype=f64)}
    upper = {"w": torch.tensor([[2.0]], dtype=f64), "v": torch.tensor([[3.0], [0.0]], dtype=f64)}
    x, y = torch.ones(1, 1, dtype=f64), torch.zeros(1, dtype=torch.long)
    bound = float(linear_margin_bounds(graph, lower, upper, x, y).lower[0, 1])
    assert bound == pytest.approx(-3.0, abs=1e-15)


def _vertex_margin(
    graph: Graph, lower: Mapping[str, Tensor], upper: Mapping[str, Tensor], x: Tensor
) -> float:
    """Margin z_0 - z_1 of one input at the box vertex against its gradient at the lower corner
    (the minimum over the box when the margin is linear in the boxed parameters)."""
    theta = {k: v.clone().requires_grad_(True) for k, v in lower.items()}
    logits = graph.forward(x, theta)
    grads = torch.autograd.grad(logits[0, 0] - logits[0, 1], list(theta.values()))
    vertex = {
        name: torch.where(g > 0, lower[name], upper[name])
        for name, g in zip(theta, grads, strict=True)
    }
    attained = graph.forward(x, vertex)
    return float(attained[0, 0] - attained[0, 1])


def test_shared_conv_kernel_on_a_point_input_is_exact() -> None:
    """Conv (boxed, with a signed AffineScale) -> Reshape -> fixed Gemm: the margin is linear in
    the kernel, so its minimum over the box is at the vertex against its gradient; the bound
    meets it (IBP, which treats every output position's copy of the kernel as independent,
    stays below)."""
    gen = torch.Generator().manual_seed(15)
    f64 = torch.float64
    params = {
        "k": torch.randn(2, 1, 3, 3, generator=gen, dtype=f64),
        "b": torch.randn(2, generator=gen, dtype=f64),
        "w": torch.randn(2, 24, generator=gen, dtype=f64),
    }
    scale = AffineScale(
        torch.tensor([1.5, -0.5], dtype=f64), torch.tensor([1.0, -2.0], dtype=f64),
        torch.tensor([0.1, 0.2], dtype=f64),
    )  # fmt: skip
    ops = (
        Conv("conv", "k", "b", strides=(1, 2), pads=(1, 0, 0, 1), scale=scale, inputs=("x",),
             output="c"),
        Reshape("flat", (24,), inputs=("c",), output="f"),
        Linear("head", "w", None, inputs=("f",), output="logits"),
    )  # fmt: skip
    graph = Graph(ops, params, "x", (1, 5, 7), "logits", 2)
    lower, upper = box_around(graph, 0.1, ["k", "b"], generator=gen)
    x = torch.randn(1, 1, 5, 7, generator=gen, dtype=f64)
    y = torch.zeros(1, dtype=torch.long)
    bound = float(linear_margin_bounds(graph, lower, upper, x, y).lower[0, 1])
    assert bound == pytest.approx(_vertex_margin(graph, lower, upper, x), abs=1e-12)
    assert float(margin_bounds(graph, lower, upper, x, y).lower[0, 1]) < bound - 1e-3


@pytest.mark.parametrize(("strides", "groups"), [((1, 1), 1), ((1, 1), 2), ((2, 1), 2)])
def test_shared_conv_kernel_on_a_box_dependent_input_is_exact(
    strides: tuple[int, int], groups: int
) -> None:
    """Conv (fixed kernel, bias boxed by 1e-9) -> Conv (boxed kernel) -> Reshape -> Gemm: the
    second Conv's input is no point, but so nearly one that the margin is linear in its kernel;
    one kernel enters every output position, so the bound meets the vertex against the gradient
    within the input box's effect. The per-term rule (and IBP) lets every position pick its own
    corner of the kernel and stays far below."""
    gen = torch.Generator().manual_seed(16)
    f64 = torch.float64
    params = {
        "k0": torch.randn(4, 1, 3, 3, generator=gen, dtype=f64),
        "b0": torch.randn(4, generator=gen, dtype=f64),
        "k1": torch.randn(2, 4 // groups, 3, 3, generator=gen, dtype=f64),
    }
    ops = (
        Conv("c0", "k0", "b0", pads=(1, 1, 1, 1), inputs=("x",), output="h"),
        Conv("c1", "k1", None, strides=strides, groups=groups, inputs=("h",), output="c"),
        Reshape("flat", (-1,), inputs=("c",), output="f"),
        Linear("head", "w", None, inputs=("f",), output="logits"),
    )
    x = torch.randn(1, 1, 6, 7, generator=gen, dtype=f64)
    width = 2 * ((6 - 3) // strides[0] + 1) * ((7 - 3) // strides[1] + 1)
    params["w"] = torch.randn(2, width, generator=gen, dtype=f64)
    graph = Graph(ops, params, "x", (1, 6, 7), "logits", 2)
    lower, upper = box_around(graph, 0.1, ["k1"], generator=gen)
    lower["b0"], upper["b0"] = params["b0"] - 1e-9, params["b0"] + 1e-9
    y = torch.zeros(1, dtype=torch.long)
    bounds = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    bound = float(bounds.lower[0, 1])
    exact = _vertex_margin(graph, lower, upper, x)
    assert bound <= exact + 1e-12
    assert bound == pytest.approx(exact, abs=1e-6)
    assert bounds.rounding is not None and float(bounds.rounding[0, 1]) < 1e-9
    assert float(margin_bounds(graph, lower, upper, x, y).lower[0, 1]) < bound - 1e-2


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", ["mlp-relu", "cnn", "zoo-mlp"])
def test_gradients_match_finite_differences(name: str) -> None:
    gen = torch.Generator().manual_seed(5)
    graph = NETS[name](gen)
    lower, upper = box_around(graph, 0.05, generator=gen)
    x, y = _data(graph, 4, gen)

    def objective(lo: Mapping[str, Tensor], up: Mapping[str, Tensor]) -> Tensor:
        b = linear_margin_bounds(graph, lo, up, x, y).lower
        return b[_finite(b)].sum()

    lo = {k: v.clone().requires_grad_(True) for k, v in lower.items()}
    up = {k: v.clone().requires_grad_(True) for k, v in upper.items()}
    objective(lo, up).backward()
    eps = 1e-6
    names = [sorted(lower)[0], sorted(lower)[-1]]
    for corner, grads, base in (("lower", lo, lower), ("upper", up, upper)):
        for param in names:
            shape = grads[param].shape
            for index in [(0,) * len(shape), tuple(s - 1 for s in shape)]:
                plus = {k: v.clone() for k, v in base.items()}
                minus = {k: v.clone() for k, v in base.items()}
                plus[param][index] += eps
                minus[param][index] -= eps
                if corner == "lower":
                    f_plus, f_minus = objective(plus, upper), objective(minus, upper)
                else:
                    f_plus, f_minus = objective(lower, plus), objective(lower, minus)
                numeric = float((f_plus - f_minus) / (2 * eps))
                grad = grads[param].grad
                assert grad is not None
                analytic = float(grad[index])
                assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(numeric)), (corner, param)


# ------------------------------------------------------------------ proof mode


@pytest.mark.parametrize("name", PROOF_NETS)
def test_rounding_allowance_is_small_and_positive(name: str) -> None:
    gen = torch.Generator().manual_seed(9)
    graph = NETS[name](gen)
    lower, upper = box_around(graph, 0.02, generator=gen)
    x, y = _data(graph, 6, gen)
    for intermediate in ("ibp", "crown"):
        bounds = linear_margin_bounds(
            graph,
            lower,
            upper,
            x,
            y,
            intermediate=intermediate,
            track_rounding=True,  # type: ignore[arg-type]
        )
        plain = linear_margin_bounds(graph, lower, upper, x, y, intermediate=intermediate)  # type: ignore[arg-type]
        assert bounds.rounding is not None
        off = _finite(bounds.lower)
        assert bool((bounds.rounding[off] > 0).all())
        assert float(bounds.rounding[off].max()) < 1e-9
        # proof mode only widens the enclosures by their float error: the bound barely moves
        torch.testing.assert_close(bounds.lower[off], plain.lower[off], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", PROOF_NETS)
@pytest.mark.parametrize("radius", [0.0, 0.01])
def test_rounding_allowance_covers_float32_evaluation(name: str, radius: float) -> None:
    """The float64 allowance, scaled to float32's unit roundoff (it is linear in u to first
    order), covers the difference between a float32 and a float64 evaluation of the bound."""
    gen = torch.Generator().manual_seed(11)
    graph = NETS[name](gen)
    lower, upper = box_around(graph, radius, generator=gen)
    x, y = _data(graph, 8, gen)
    x = x.float().double()  # representable in both
    f64 = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    f32 = linear_margin_bounds(graph, lower, upper, x.float(), y)
    assert f64.rounding is not None
    mask = _finite(f64.lower)
    scaled = f64.rounding[mask] * 2.0**29  # u32 / u64
    assert bool(((f32.lower.double()[mask] - f64.lower[mask]).abs() <= scaled).all())


def test_nan_input_fails_closed() -> None:
    gen = torch.Generator().manual_seed(12)
    graph = random_mlp((3, 4, 2), gen)
    lower, upper = box_around(graph, 0.01)
    x, y = _data(graph, 4, gen)
    x[0, 0] = float("nan")
    bounds = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    assert not bool(bounds.certified()[0])


# ------------------------------------------------------------------ inputs and devices


def test_bad_options_and_inputs_are_refused() -> None:
    gen = torch.Generator().manual_seed(13)
    graph = random_mlp((3, 4, 2), gen)
    lower, upper = box_around(graph, 0.01)
    x, y = _data(graph, 4, gen)
    with pytest.raises(ValueError, match="intermediate"):
        linear_margin_bounds(graph, lower, upper, x, y, intermediate="zonotope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float64"):
        linear_margin_bounds(graph, lower, upper, x.float(), y, track_rounding=True)
    with pytest.raises(DomainError, match="nope"):
        linear_margin_bounds(graph, {**lower, "nope": x}, {**upper, "nope": x}, x, y)
    with pytest.raises(DataError, match="labels"):
        linear_margin_bounds(graph, lower, upper, x, y[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(14)
    graph = random_cnn(gen)
    lower, upper = box_around(graph, 0.02, generator=gen)
    x, y = _data(graph, 8, gen)
    cpu = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    gpu = linear_margin_bounds(graph, lower, upper, x.cuda(), y.cuda(), track_rounding=True)
    assert gpu.lower.device.type == "cuda"
    torch.testing.assert_close(gpu.lower.cpu(), cpu.lower, rtol=0, atol=1e-9)


def test_a_subset_of_classes_gives_the_same_rows_and_no_bound_elsewhere() -> None:
    gen = torch.Generator().manual_seed(21)
    graph = random_mlp((6, 9, 8, 5), gen)
    lower, upper = box_around(graph, 0.02, generator=gen)
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=gen)
    full = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    ibp = margin_bounds(graph, lower, upper, x, y)
    classes = ibp.lower.topk(2, dim=1, largest=False).indices
    part = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True, classes=classes)
    assert part.rounding is not None and full.rounding is not None
    chosen = torch.zeros_like(full.lower, dtype=torch.bool).scatter(1, classes, True)
    torch.testing.assert_close(part.lower[chosen], full.lower[chosen], rtol=1e-12, atol=1e-12)
    others = ~chosen & ~torch.isinf(full.lower)
    assert bool(torch.isneginf(part.lower[others]).all())
    assert not bool(part.certified().any() & ~full.certified().any())
    with pytest.raises(ValueError, match="never name its label"):
        linear_margin_bounds(graph, lower, upper, x, y, classes=y[:, None])
