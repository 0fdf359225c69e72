"""Bounds on DAG graphs (residual adds, concatenation, slices, transposes, pads): the forward
pass matches a torch re-implementation, IBP encloses sampled and attacked weights, and the
float64 rounding allowance stays small."""

from __future__ import annotations

from itertools import chain

import pytest
import torch
import torch.nn.functional as F

from tests.dag_nets import DAG_NETS, residual_cnn, residual_mlp
from tests.oracles import attack_margins, sampled_worst_margins
from tests.tiny_nets import box_around
from verifier.bounds.ibp import logit_bounds, margin_bounds
from verifier.domains import Box
from verifier.errors import BackendError, GraphError
from verifier.graph import Graph


def _data(graph: Graph, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, *graph.input_shape, generator=gen, dtype=torch.float64) * 2 - 1
    return x, torch.randint(0, graph.n_classes, (n,), generator=gen)


def test_residual_mlp_forward_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = residual_mlp(gen)
    p = graph.parameters
    x, _ = _data(graph, 7, gen)
    h = torch.relu(F.linear(x, p["fc0.weight"], p["fc0.bias"]))
    h1 = torch.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"]))
    h2 = torch.relu(h + F.linear(h1, p["fc2.weight"], p["fc2.bias"]))
    e = torch.tanh(h2 - F.linear(h2, p["fc3.weight"]) + h)
    expected = F.linear(e, p["head.weight"], p["head.bias"])
    torch.testing.assert_close(graph.forward(x), expected, rtol=0, atol=1e-12)


def test_residual_cnn_forward_matches_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    graph = residual_cnn(gen)
    p = graph.parameters
    x, _ = _data(graph, 4, gen)
    t = F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1))
    h1 = torch.relu(F.conv2d(t, p["c1.weight"], p["c1.bias"]))
    h2 = torch.relu(F.conv2d(h1, p["c2.weight"], p["c2.bias"], padding=1) + h1)
    q = F.avg_pool2d(h2, 3, 3).flatten(1)
    expected = F.linear(q, p["head.weight"], p["head.bias"])
    torch.testing.assert_close(graph.forward(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(DAG_NETS))
@pytest.mark.parametrize("radius", [0.01, 0.1])
@pytest.mark.parametrize("seed", range(2))
def test_ibp_encloses_sampled_weights(name: str, radius: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = DAG_NETS[name](gen)
    lower, upper = box_around(graph, radius, generator=gen)
    x, y = _data(graph, 10, gen)
    bounds = margin_bounds(graph, lower, upper, x, y)
    logits = logit_bounds(graph, lower, upper, x)
    box = Box(lower, upper)
    samples = chain(box.sample(80, generator=gen), box.sample(40, generator=gen, kind="vertex"))
    worst = sampled_worst_margins(graph, samples, x, y, logits=logits)
    finite = ~torch.isinf(bounds.lower)
    gap = (worst - bounds.lower)[finite]
    assert float(gap.min()) >= -1e-12, f"bound exceeds a sampled margin by {-float(gap.min())}"


@pytest.mark.parametrize("name", sorted(DAG_NETS))
def test_ibp_survives_weight_space_attack(name: str) -> None:
    gen = torch.Generator().manual_seed(5)
    graph = DAG_NETS[name](gen)
    lower, upper = box_around(graph, 0.05, generator=gen)
    x, y = _data(graph, 8, gen)
    bounds = margin_bounds(graph, lower, upper, x, y)
    worst = attack_margins(graph, lower, upper, x, y, steps=40, generator=gen)
    finite = ~torch.isinf(bounds.lower)
    gap = (worst - bounds.lower)[finite]
    assert float(gap.min()) >= -1e-12, f"attack beats the bound by {-float(gap.min())}"


@pytest.mark.parametrize("name", sorted(DAG_NETS))
def test_zero_width_box_equals_forward_on_dags(name: str) -> None:
    gen = torch.Generator().manual_seed(2)
    graph = DAG_NETS[name](gen)
    lower, upper = box_around(graph, 0.0)
    x, y = _data(graph, 6, gen)
    logits = logit_bounds(graph, lower, upper, x)
    z = graph.forward(x)
    torch.testing.assert_close(logits.lower, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.upper, z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(DAG_NETS))
def test_rounding_allowance_is_small_and_positive_on_dags(name: str) -> None:
    """Proof mode: every finite margin gets a positive float64 allowance, far below 1e-10."""
    gen = torch.Generator().manual_seed(3)
    graph = DAG_NETS[name](gen)
    lower, upper = box_around(graph, 0.01, generator=gen)
    x, y = _data(graph, 6, gen)
    bounds = margin_bounds(graph, lower, upper, x, y, track_rounding=True)
    assert bounds.rounding is not None
    finite = ~torch.isinf(bounds.lower)
    assert bool((bounds.rounding[finite] > 0).all())
    assert float(bounds.rounding[finite].max()) < 1e-10


@pytest.mark.parametrize("name", sorted(DAG_NETS))
def test_chain_only_engines_refuse_naming_the_node(name: str) -> None:
    from verifier.bounds.zonotope import check_supported
    from verifier.crosscheck.chain import relu_chain

    gen = torch.Generator().manual_seed(4)
    graph = DAG_NETS[name](gen)
    first = graph.first_non_chain_op()
    assert first is not None
    with pytest.raises(GraphError, match=f"node '{first.node}'"):
        check_supported(graph)
    lower, upper = box_around(graph, 0.01)
    x, _ = _data(graph, 1, gen)
    with pytest.raises(BackendError, match=f"node '{first.node}'"):
        relu_chain(graph, Box(lower, upper), x[0])


def test_lirpa_backend_refuses_a_residual_graph() -> None:
    from verifier.bounds.lirpa import lirpa_margin_bounds

    gen = torch.Generator().manual_seed(6)
    graph = residual_mlp(gen)
    lower, upper = box_around(graph, 0.01)
    x, y = _data(graph, 2, gen)
    with pytest.raises(BackendError, match="node 'add0'.*chains of ops only"):
        lirpa_margin_bounds(graph, lower, upper, x, y, method="crown-ibp")
