"""The auto_LiRPA backend: compatibility shim, soundness against sampled weights, exactness."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tests.oracles import attack_margins, margins_of, sampled_worst_margins
from tests.tiny_nets import box_around, random_cnn, random_mlp
from verifier.bounds.ibp import logit_bounds, margin_bounds
from verifier.bounds.lirpa import Method, lirpa_logit_bounds, lirpa_margin_bounds
from verifier.bounds.lirpa_compat import apply_lirpa_compat, onnx_opset_restored
from verifier.bounds.margins import MarginBounds, combine_margin_bounds
from verifier.errors import BackendError, DataError, DomainError
from verifier.graph import AffineScale, Graph, Linear, Reshape

METHODS: tuple[Method, ...] = ("ibp", "crown-ibp", "crown")
SLACK = 1e-9  # float64 rounding of the bounds and of the sampled forward passes


def sampled_weights(
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    generator: torch.Generator,
    *,
    n_uniform: int = 48,
    n_vertex: int = 24,
) -> Iterator[dict[str, Tensor]]:
    """Uniform samples from the box, then random vertices."""
    for k in range(n_uniform + n_vertex):
        theta = {}
        for name, lo in lower.items():
            u = torch.rand(lo.shape, generator=generator, dtype=lo.dtype)
            if k >= n_uniform:
                u = (u > 0.5).to(lo.dtype)
            theta[name] = lo + u * (upper[name] - lo)
        yield theta


def assert_margins_enclose(
    graph: Graph, bounds: Tensor, lower: Mapping[str, Tensor], upper: Mapping[str, Tensor],
    x: Tensor, y: Tensor, generator: torch.Generator, *, attack_steps: int = 0,
) -> None:  # fmt: skip
    """Every sampled (and, with attack_steps, PGD-attacked) margin is >= its bound."""
    worst = sampled_worst_margins(graph, sampled_weights(lower, upper, generator), x, y)
    if attack_steps:
        attacked = attack_margins(
            graph, lower, upper, x, y, steps=attack_steps, generator=generator
        )
        worst = torch.minimum(worst, attacked)
    gap = (worst - bounds).nan_to_num(posinf=torch.inf)
    index = divmod(int(gap.argmin()), gap.shape[1])
    assert float(gap.min()) >= -SLACK, (
        f"margin {index} is {float(worst[index])} at some θ in the box, below its bound "
        f"{float(bounds[index])}"
    )


def with_layout_and_scale(graph: Graph, generator: torch.Generator) -> Graph:
    """The same graph with its first Linear stored "in_out" and given a random AffineScale."""
    ops = list(graph.ops)
    first = ops[0]
    assert isinstance(first, Linear) and first.bias is not None
    parameters = dict(graph.parameters)
    parameters[first.weight] = parameters[first.weight].t().contiguous()
    n_out = parameters[first.bias].shape[0]

    def randn() -> Tensor:
        return torch.randn(n_out, generator=generator, dtype=torch.float64)

    scale = AffineScale(weight_scale=randn(), bias_scale=randn(), shift=randn())
    ops[0] = Linear(first.node, first.weight, first.bias, weight_layout="in_out", scale=scale)
    return Graph(
        tuple(ops), parameters, graph.input_name, graph.input_shape, graph.output_name,
        graph.n_classes,
    )  # fmt: skip


def inputs(graph: Graph, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, *graph.input_shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, graph.n_classes, (n,), generator=generator)
    return x, y


def test_compat_lets_auto_lirpa_import_and_bound() -> None:
    apply_lirpa_compat()
    apply_lirpa_compat()  # idempotent
    import auto_LiRPA
    import numpy.lib.arraysetops as arraysetops

    assert arraysetops.isin([1, 2], [2]).tolist() == [False, True]
    linear = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with onnx_opset_restored():  # the build sets torch's ONNX opset global
        module = auto_LiRPA.BoundedModule(linear, (x,), device="cpu")
    # torch 2 passes remove_duplicate=...; auto_LiRPA's override must take both call shapes.
    assert len(list(module.named_parameters())) == 2
    assert len(list(module.named_parameters(remove_duplicate=False))) == 2
    ptb = auto_LiRPA.PerturbationLpNorm(norm=float("inf"), eps=0.1)
    with torch.no_grad():
        lower, upper = module.compute_bounds(x=(auto_LiRPA.BoundedTensor(x, ptb),), method="CROWN")
    z = linear(x).detach()
    assert bool((lower <= z).all()) and bool((z <= upper).all())


def test_import_verifier_patches_nothing_and_missing_backend_says_how_to_install() -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy, torch
        import torch.onnx.symbolic_helper as symbolic_helper
        import verifier, verifier.graph, verifier.bounds.lirpa as lirpa
        assert "numpy.lib.arraysetops" not in sys.modules
        assert "auto_LiRPA" not in sys.modules
        assert not hasattr(torch._C.Node, "__getitem__")
        assert not hasattr(symbolic_helper, "_set_opset_version")
        sys.modules["auto_LiRPA"] = None  # as if it were not installed
        from tests.tiny_nets import box_around, random_mlp
        from verifier.errors import BackendError, DataError, DomainError
        graph = random_mlp((3, 2), torch.Generator().manual_seed(0))
        lower, upper = box_around(graph, 0.1)
        try:
            lirpa.lirpa_margin_bounds(
                graph, lower, upper, torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1).long()
            )
        except BackendError as err:
            assert "pip install --no-deps auto_LiRPA==0.3" in str(err), err
        else:
            raise AssertionError("no BackendError")
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("widths", [(5, 7, 3), (10, 8, 8, 4)])
@pytest.mark.parametrize("subset", [False, True])
def test_margin_bounds_enclose_sampled_weights(
    method: Method, seed: int, widths: tuple[int, ...], subset: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp(widths, gen, torch.float64)
    x, y = inputs(graph, 12, gen)
    # The subset leaves the first weight fixed but boxes its bias (auto_LiRPA's bias-only case).
    names = ["fc0.bias", "fc1.weight"] if subset else None
    for radius in (0.01, 0.1, 0.5):
        lower, upper = box_around(graph, radius, names, generator=gen)
        bounds = lirpa_margin_bounds(graph, lower, upper, x, y, method=method, chunk_size=5)
        assert bounds.shape == (12, graph.n_classes) and bounds.dtype == torch.float64
        assert bool(torch.isinf(bounds[torch.arange(12), y]).all())
        assert_margins_enclose(graph, bounds, lower, upper, x, y, gen, attack_steps=10)


@pytest.mark.parametrize("method", METHODS)
def test_logit_bounds_enclose_sampled_weights(method: Method) -> None:
    gen = torch.Generator().manual_seed(7)
    graph = with_layout_and_scale(random_mlp((6, 8, 5, 4), gen, torch.float64), gen)
    x, _ = inputs(graph, 9, gen)
    lower, upper = box_around(graph, 0.2, generator=gen)
    low, up = lirpa_logit_bounds(graph, lower, upper, x, method=method, chunk_size=4)
    assert low.shape == up.shape == (9, 4)
    for theta in sampled_weights(lower, upper, gen):
        z = graph.forward(x, theta)
        assert float((z - low).min()) >= -SLACK and float((up - z).min()) >= -SLACK


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_s_shaped_activations_are_enclosed(activation: str) -> None:
    gen = torch.Generator().manual_seed(3)
    graph = random_mlp((4, 6, 3), gen, torch.float64, activation=activation)  # type: ignore[arg-type]
    x, y = inputs(graph, 10, gen)
    lower, upper = box_around(graph, 0.3, generator=gen)
    bounds = lirpa_margin_bounds(graph, lower, upper, x, y, method="crown-ibp")
    assert_margins_enclose(graph, bounds, lower, upper, x, y, gen)


@pytest.mark.parametrize("method", METHODS)
def test_layout_and_affine_scale_are_respected(method: Method) -> None:
    gen = torch.Generator().manual_seed(11)
    graph = with_layout_and_scale(random_mlp((5, 7, 3), gen, torch.float64), gen)
    x, y = inputs(graph, 10, gen)
    lower, upper = box_around(graph, 0.0)
    exact = lirpa_margin_bounds(graph, lower, upper, x, y, method=method)
    torch.testing.assert_close(exact, margins_of(graph.forward(x), y), rtol=0.0, atol=1e-9)
    lower, upper = box_around(graph, 0.2, generator=gen)
    bounds = lirpa_margin_bounds(graph, lower, upper, x, y, method=method)
    assert_margins_enclose(graph, bounds, lower, upper, x, y, gen)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("widths", [(5, 7, 3), (10, 8, 8, 4)])
def test_zero_width_box_gives_the_forward_margins(method: Method, widths: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    graph = random_mlp(widths, gen, torch.float64)
    x, y = inputs(graph, 8, gen)
    lower, upper = box_around(graph, 0.0)
    bounds = lirpa_margin_bounds(graph, lower, upper, x, y, method=method)
    torch.testing.assert_close(bounds, margins_of(graph.forward(x), y), rtol=0.0, atol=1e-9)
    low, up = lirpa_logit_bounds(graph, lower, upper, x, method=method)
    torch.testing.assert_close(low, graph.forward(x), rtol=0.0, atol=1e-9)
    torch.testing.assert_close(up, graph.forward(x), rtol=0.0, atol=1e-9)


def test_crown_ibp_is_tighter_than_ibp_on_an_mlp() -> None:
    gen = torch.Generator().manual_seed(5)
    graph = random_mlp((20, 16, 16, 5), gen, torch.float64)
    x, y = inputs(graph, 16, gen)
    lower, upper = box_around(graph, 0.1)
    ibp = lirpa_margin_bounds(graph, lower, upper, x, y, method="ibp")
    crown_ibp = lirpa_margin_bounds(graph, lower, upper, x, y, method="crown-ibp")
    finite = torch.isfinite(ibp)
    assert float((crown_ibp - ibp)[finite].mean()) > 0.0
    assert float((crown_ibp >= ibp - SLACK)[finite].float().mean()) >= 0.9


def test_chunks_do_not_change_the_bounds() -> None:
    gen = torch.Generator().manual_seed(2)
    graph = random_mlp((6, 5, 4), gen, torch.float64)
    x, y = inputs(graph, 11, gen)
    lower, upper = box_around(graph, 0.1, generator=gen)
    whole = lirpa_margin_bounds(graph, lower, upper, x, y, chunk_size=100)
    chunked = lirpa_margin_bounds(graph, lower, upper, x, y, chunk_size=3)
    torch.testing.assert_close(chunked, whole, rtol=0.0, atol=1e-12)


def test_float32_mode_returns_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    graph = random_mlp((6, 5, 4), gen, torch.float32)
    x, y = inputs(graph, 5, gen)
    lower, upper = box_around(graph, 0.05)
    bounds = lirpa_margin_bounds(graph, lower, upper, x.float(), y, dtype=torch.float32)
    assert bounds.dtype == torch.float32
    reference = lirpa_margin_bounds(graph, lower, upper, x, y, dtype=torch.float64)
    torch.testing.assert_close(bounds.double(), reference, rtol=1e-4, atol=1e-4)


def test_cnn_with_a_boxed_linear_head_is_enclosed() -> None:
    gen = torch.Generator().manual_seed(6)
    graph = random_cnn(gen, torch.float64)
    x, y = inputs(graph, 6, gen)
    lower, upper = box_around(graph, 0.0, ["fc.weight", "fc.bias"])
    exact = lirpa_margin_bounds(graph, lower, upper, x, y)
    torch.testing.assert_close(exact, margins_of(graph.forward(x), y), rtol=0.0, atol=1e-9)
    lower, upper = box_around(graph, 0.2, ["fc.weight", "fc.bias"], generator=gen)
    bounds = lirpa_margin_bounds(graph, lower, upper, x, y)
    assert_margins_enclose(graph, bounds, lower, upper, x, y, gen)


@pytest.mark.parametrize("name", ["conv0.weight", "conv1.bias"])
def test_boxed_conv_parameters_are_refused(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_cnn(gen, torch.float64)
    x, y = inputs(graph, 2, gen)
    lower, upper = box_around(graph, 0.1, [name, "fc.weight"])
    node = "Conv_0" if name.startswith("conv0") else "Conv_1"
    with pytest.raises(BackendError, match=f"node '{node}': the lirpa backend cannot perturb Conv"):
        lirpa_margin_bounds(graph, lower, upper, x, y)


def test_results_do_not_depend_on_the_cache() -> None:
    gen = torch.Generator().manual_seed(8)
    graph = random_mlp((5, 6, 3), gen, torch.float64)
    x, y = inputs(graph, 7, gen)
    boxes = [box_around(graph, r, generator=gen) for r in (0.3, 0.0, 0.1)]
    cached = [lirpa_margin_bounds(graph, lo, up, x, y) for lo, up in boxes]
    for (lo, up), expected in zip(boxes, cached, strict=True):
        fresh = random_mlp((5, 6, 3), torch.Generator().manual_seed(8), torch.float64)
        torch.testing.assert_close(lirpa_margin_bounds(fresh, lo, up, x, y), expected)


def test_a_box_on_no_parameter_gives_the_forward_margins() -> None:
    gen = torch.Generator().manual_seed(9)
    graph = random_mlp((5, 4, 3), gen, torch.float32)
    x, y = inputs(graph, 4, gen)
    bounds = lirpa_margin_bounds(graph, {}, {}, x, y)
    torch.testing.assert_close(bounds, margins_of(graph.forward(x), y), rtol=0.0, atol=1e-12)


def test_a_boxed_linear_on_a_non_flat_input_is_refused() -> None:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    ops = (
        Reshape("Reshape_0", (4, 5)),
        Linear("MatMul_0", "w", None),
        Reshape("Flatten_0", (12,)),
        Linear("Gemm_1", "head.weight", "head.bias"),
    )
    parameters = {"w": randn(3, 5), "head.weight": randn(2, 12), "head.bias": randn(2)}
    graph = Graph(ops, parameters, "input", (20,), "logits", 2)
    x, y = inputs(graph, 3, gen)
    lower, upper = box_around(graph, 0.1, ["head.weight"])  # a fixed non-flat Linear is fine
    bounds = lirpa_margin_bounds(graph, lower, upper, x, y)
    assert_margins_enclose(graph, bounds, lower, upper, x, y, gen)
    lower, upper = box_around(graph, 0.1, ["w"])
    with pytest.raises(BackendError, match="node 'MatMul_0'.*flat"):
        lirpa_margin_bounds(graph, lower, upper, x, y)


def test_bad_boxes_and_inputs_are_reported() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_mlp((4, 3, 2), gen, torch.float64)
    x, y = inputs(graph, 3, gen)
    lower, upper = box_around(graph, 0.1)
    with pytest.raises(DomainError, match="lower > upper"):
        lirpa_margin_bounds(graph, upper, lower, x, y)
    with pytest.raises(DomainError, match="'fc0.bias'"):
        lirpa_margin_bounds(graph, lower, {**upper, "fc0.bias": upper["fc0.bias"][:1]}, x, y)
    with pytest.raises(DomainError, match="'nope' is not in the graph"):
        lirpa_margin_bounds(graph, {"nope": x}, {"nope": x}, x, y)
    with pytest.raises(DataError, match="inputs must have shape"):
        lirpa_margin_bounds(graph, lower, upper, x[:, :2], y)
    with pytest.raises(DataError, match="labels must lie in"):
        lirpa_margin_bounds(graph, lower, upper, x, y + 5)
    with pytest.raises(BackendError, match="no method"):
        lirpa_margin_bounds(graph, lower, upper, x, y, method="alpha-crown")  # type: ignore[arg-type]


def test_building_and_bounding_leave_global_state_alone() -> None:
    import warnings

    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    gen = torch.Generator().manual_seed(10)
    graph = random_mlp((4, 5, 3), gen, torch.float64, activation="tanh")
    x, y = inputs(graph, 3, gen)
    lower, upper = box_around(graph, 0.1)
    before = (
        list(warnings.filters),
        torch.get_default_dtype(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        GLOBALS.export_onnx_opset_version,
    )
    lirpa_margin_bounds(graph, lower, upper, x, y, method="crown")
    after = (
        list(warnings.filters),
        torch.get_default_dtype(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        GLOBALS.export_onnx_opset_version,
    )
    assert after == before


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("widths", [(5, 7, 3), (12, 9, 9, 4)])
def test_own_ibp_equals_auto_lirpa_ibp(seed: int, widths: tuple[int, ...]) -> None:
    """Both compute exact interval products: the logit intervals agree to 1e-6 relative."""
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp(widths, gen, torch.float64)
    x, _ = inputs(graph, 10, gen)
    lower, upper = box_around(graph, 0.1, generator=gen)
    ours = logit_bounds(graph, lower, upper, x)
    low, up = lirpa_logit_bounds(graph, lower, upper, x, method="ibp")
    torch.testing.assert_close(ours.lower, low, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.upper, up, rtol=1e-6, atol=1e-9)


def test_combined_bound_is_never_looser_than_either() -> None:
    """`best` keeps, per sample and class, the larger slack of IBP and CROWN-IBP."""
    gen = torch.Generator().manual_seed(11)
    graph = random_mlp((20, 16, 16, 5), gen, torch.float64)
    x, y = inputs(graph, 24, gen)
    lower, upper = box_around(graph, 0.05)
    ibp = margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    crown = MarginBounds(lirpa_margin_bounds(graph, lower, upper, x, y, method="crown-ibp"))
    best = combine_margin_bounds(ibp, crown)
    assert ibp.rounding is not None and best.rounding is not None
    slack = best.lower - best.rounding
    finite = torch.isfinite(slack)
    assert bool((slack[finite] >= (ibp.lower - ibp.rounding)[finite]).all())
    assert bool((slack[finite] >= crown.lower[finite]).all())
    assert int(best.certified().sum()) >= max(
        int(ibp.certified().sum()), int(crown.certified().sum())
    )
    assert float((slack - (ibp.lower - ibp.rounding))[finite].max()) > 0.0  # CROWN helps somewhere
