"""Zonotope LIDs: domain operations, bound soundness, search and the `verifier lid` pipeline."""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import chain
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.oracles import margins_of, sampled_worst_margins
from tests.tiny_nets import box_around, random_cnn, random_mlp
from verifier import load_model
from verifier.bounds.ibp import margin_bounds
from verifier.bounds.zonotope import zonotope_margin_bounds
from verifier.certify import certify_samples
from verifier.cli import cli
from verifier.data import load_dataset
from verifier.domains import Box, Zonotope
from verifier.domains.io import load_lid, save_lid
from verifier.errors import DomainError, GraphError, SpecError
from verifier.graph import Graph
from verifier.search import SearchTask, hard_metrics
from verifier.search.generators import lookahead_directions
from verifier.search.zonotope import search_zonotope_lid
from verifier.spec import SearchSection, ZonotopeSection, parse_spec

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "onnx_models" / "digits_mlp.onnx"


def random_zonotope(
    graph: Graph, k: int, gen: torch.Generator, *, radius: float = 0.02, scale: float = 0.05
) -> Zonotope:
    """An asymmetric box around the graph's weights plus k Gaussian generators."""
    lower, upper = box_around(graph, radius, generator=gen)
    generators = {
        n: scale * torch.randn((k, *t.shape), generator=gen, dtype=torch.float64)
        for n, t in graph.parameters.items()
    }
    return Zonotope(lower, upper, generators)


def _distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in a) ** 0.5)


# ---------------------------------------------------------------- domain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0, 1, 5])
def test_projection_lies_inside_exactly_and_is_idempotent(dtype: torch.dtype, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    graph = random_mlp((6, 5, 3), gen)
    zonotope = random_zonotope(graph, k, gen)
    assert zonotope.representable()
    assert zonotope.contains(graph.parameters)
    for trial in range(3):
        far = {
            n: (t + 0.3 * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(dtype)
            for n, t in graph.parameters.items()
        }
        assert not zonotope.contains(far)
        projected = zonotope.project(far)
        assert all(projected[n].dtype == dtype for n in projected)
        assert zonotope.contains(projected), f"trial {trial}: projection left the zonotope"
        again = zonotope.project(projected)
        assert all(torch.equal(again[n], projected[n]) for n in projected)
        # optimality: no sampled point of T is closer than the projection (up to INWARD)
        gap = _distance(projected, far)
        closest = min(_distance(s, far) for s in zonotope.sample(100, generator=gen))
        assert gap <= closest + 1e-4


def test_k0_projection_is_the_box_clamp() -> None:
    gen = torch.Generator().manual_seed(3)
    graph = random_mlp((6, 5, 3), gen)
    lower, upper = box_around(graph, 0.02, generator=gen)
    box = Box({n: t.float().double() for n, t in lower.items()}, upper)
    box = Box(dict(box.lower), {n: t.float().double() for n, t in upper.items()})
    zonotope = Zonotope.from_box(box)
    far = {n: t.float() + 0.1 for n, t in graph.parameters.items()}
    zp, bp = zonotope.project(far), box.project(far)
    assert all(torch.equal(zp[n], bp[n]) for n in far)
    assert zonotope.size() == pytest.approx(box.size())
    assert zonotope.size("isotropic_width") == pytest.approx(box.size())


def test_contains_is_sound_at_the_boundary() -> None:
    """An entry one ulp outside the box part (with ε pinned by the others) is rejected."""
    lower = {"w": torch.zeros(3, dtype=torch.float64)}
    upper = {"w": torch.ones(3, dtype=torch.float64)}
    generators = {"w": torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)}
    zonotope = Zonotope(lower, upper, generators)
    assert zonotope.contains({"w": torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)})
    above = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0))
    f64 = torch.float64
    assert not zonotope.contains({"w": torch.tensor([2.0, float(above), 0.0], dtype=f64)})
    assert not zonotope.contains({"w": torch.tensor([2.0 + 1e-12, 1.0, 0.0], dtype=f64)})
    assert zonotope.contains({"w": torch.tensor([2.0 + 1e-12, 1.0, 0.0], dtype=f64)}, atol=1e-9)
    assert not zonotope.contains({"v": torch.zeros(3)})


def test_interval_hull_contains_samples_and_vertices() -> None:
    gen = torch.Generator().manual_seed(4)
    graph = random_mlp((4, 6, 3), gen)
    zonotope = random_zonotope(graph, 4, gen)
    hull = zonotope.interval_hull()
    samples = chain(
        zonotope.sample(50, generator=gen), zonotope.sample(50, generator=gen, kind="vertex")
    )
    for theta in samples:
        assert hull.contains(theta)
    assert zonotope.size() == pytest.approx(hull.size(), rel=1e-9)


def test_malformed_zonotopes_are_domain_errors() -> None:
    lower = {"w": torch.zeros(3)}
    upper = {"w": torch.ones(3)}
    with pytest.raises(DomainError, match="expected"):
        Zonotope(lower, upper, {"w": torch.zeros(2, 4)})
    with pytest.raises(DomainError, match="different parameters"):
        Zonotope(lower, upper, {"v": torch.zeros(2, 3)})
    with pytest.raises(DomainError, match="NaN"):
        Zonotope(lower, upper, {"w": torch.full((1, 3), float("nan"))})


@settings(max_examples=15, database=None, deadline=None)
@given(k=st.integers(0, 3), rows=st.integers(1, 4), seed=st.integers(0, 1000))
def test_save_load_round_trip(
    tmp_path_factory: pytest.TempPathFactory, k: int, rows: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    lower = {
        "a.weight": torch.randn(rows, 3, generator=gen, dtype=torch.float64),
        "b": torch.zeros(2),
    }
    upper = {n: t + 0.5 for n, t in lower.items()}
    generators = {
        n: torch.randn((k, *t.shape), generator=gen, dtype=torch.float64) for n, t in lower.items()
    }
    zonotope = Zonotope(lower, upper, generators)
    path = tmp_path_factory.mktemp("lid") / "lid.safetensors"
    save_lid(path, zonotope, {"model_sha256": "x"})
    lid = load_lid(path)
    assert lid.kind == "zonotope" and lid.metadata["n_generators"] == str(k)
    assert isinstance(lid.domain, Zonotope)
    for n in lower:
        assert torch.equal(lid.domain.lower[n], zonotope.lower[n].double())
        assert torch.equal(lid.domain.upper[n], zonotope.upper[n].double())
        assert torch.equal(lid.domain.generators[n], zonotope.generators[n])
    with pytest.raises(DomainError, match="zonotope"):
        _ = lid.box


def test_box_lids_still_load_as_boxes(tmp_path: Path) -> None:
    box = Box({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    save_lid(tmp_path / "lid.safetensors", box, {})
    lid = load_lid(tmp_path / "lid.safetensors")
    assert lid.kind == "box" and isinstance(lid.domain, Box) and lid.box is lid.domain


# ---------------------------------------------------------------- bounds

GRAPHS = {
    "mlp-relu": lambda g: random_mlp((5, 8, 7, 3), g),
    "mlp-tanh": lambda g: random_mlp((5, 7, 6, 3), g, activation="tanh"),
    "mlp-sigmoid": lambda g: random_mlp((4, 8, 3), g, activation="sigmoid"),
}


def _labels_inputs(graph: Graph, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, *graph.input_shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, graph.n_classes, (n,), generator=gen)


def _assert_below(bound: Tensor, observed: Tensor) -> None:
    finite = ~torch.isinf(bound)
    gap = (observed - bound)[finite]
    assert float(gap.min()) >= -1e-12, f"bound exceeds an observed margin by {-float(gap.min())}"


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("with_intervals", [True, False])
@pytest.mark.parametrize("proof", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_zonotope_bounds_hold_under_sampling(
    name: str, with_intervals: bool, proof: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = GRAPHS[name](gen)
    zonotope = random_zonotope(graph, 3, gen)
    x, y = _labels_inputs(graph, 12, gen)
    bounds = zonotope_margin_bounds(
        graph,
        zonotope.lower,
        zonotope.upper,
        zonotope.generators,
        x,
        y,
        track_rounding=proof,
        with_intervals=with_intervals,
    )
    assert (bounds.rounding is not None) == proof
    samples = chain(
        zonotope.sample(150, generator=gen), zonotope.sample(150, generator=gen, kind="vertex")
    )
    _assert_below(bounds.lower, sampled_worst_margins(graph, samples, x, y))


def attack_zonotope(
    graph: Graph,
    zonotope: Zonotope,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    generator: torch.Generator,
) -> Tensor:
    """Weight-space PGD over the coefficients (δ, ε): the smallest margin seen per entry."""
    names = zonotope.names
    k = zonotope.n_generators
    delta = {
        n: (2 * torch.rand(zonotope.lower[n].shape, generator=generator, dtype=torch.float64) - 1)
        for n in names
    }
    eps = 2 * torch.rand(k, generator=generator, dtype=torch.float64) - 1
    worst = torch.full((x.shape[0], graph.n_classes), float("inf"), dtype=torch.float64)
    for step in range(steps):
        delta = {n: d.requires_grad_(True) for n, d in delta.items()}
        eps.requires_grad_(True)
        theta = {
            n: (zonotope.lower[n] + zonotope.upper[n]) / 2
            + (zonotope.upper[n] - zonotope.lower[n]) / 2 * delta[n]
            + torch.tensordot(eps, zonotope.generators[n], dims=1)
            for n in names
        }
        margins = margins_of(graph.forward(x, theta), y)
        worst = torch.minimum(worst, margins.detach())
        finite = margins[~torch.isinf(margins)]
        grads = torch.autograd.grad(finite.sum(), [*delta.values(), eps])
        size = 0.5 * (1 - step / steps)
        with torch.no_grad():
            delta = {
                n: (delta[n] - size * torch.sign(g)).clamp(-1, 1)
                for n, g in zip(names, grads[:-1], strict=True)
            }
            eps = (eps - size * torch.sign(grads[-1])).clamp(-1, 1)
    return worst


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-tanh"])
@pytest.mark.parametrize("seed", range(2))
def test_zonotope_bounds_hold_under_weight_attack(name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(50 + seed)
    graph = GRAPHS[name](gen)
    zonotope = random_zonotope(graph, 4, gen, scale=0.1)
    x, y = _labels_inputs(graph, 6, gen)
    bounds = zonotope_margin_bounds(
        graph, zonotope.lower, zonotope.upper, zonotope.generators, x, y, track_rounding=True
    )
    _assert_below(bounds.lower, attack_zonotope(graph, zonotope, x, y, steps=60, generator=gen))


@pytest.mark.parametrize("seed", range(3))
def test_k0_equals_the_box_bound(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = random_mlp((5, 8, 7, 3), gen)
    lower, upper = box_around(graph, 0.05, generator=gen)
    x, y = _labels_inputs(graph, 16, gen)
    empty = {n: torch.zeros((0, *t.shape), dtype=torch.float64) for n, t in lower.items()}
    for proof in (False, True):
        zono = zonotope_margin_bounds(graph, lower, upper, empty, x, y, track_rounding=proof)
        box = margin_bounds(graph, lower, upper, x, y, track_rounding=proof)
        torch.testing.assert_close(zono.lower, box.lower, rtol=0, atol=1e-12)


def test_one_affine_layer_is_exact_in_the_coefficients() -> None:
    """For a single Linear layer the margin is affine in (δ, ε): the bound is its minimum."""
    gen = torch.Generator().manual_seed(9)
    graph = random_mlp((4, 3), gen)
    zonotope = random_zonotope(graph, 2, gen, scale=0.2)
    x, y = _labels_inputs(graph, 5, gen)
    bounds = zonotope_margin_bounds(
        graph,
        zonotope.lower,
        zonotope.upper,
        zonotope.generators,
        x,
        y,
        with_intervals=False,
    )
    # closed form: m_j(θ) = (W_y - W_j) x + b_y - b_j; minimise over the vertex given by signs
    names = zonotope.names
    centre = {n: (zonotope.lower[n] + zonotope.upper[n]) / 2 for n in names}
    theta = {n: centre[n].clone().requires_grad_(True) for n in names}
    margins = margins_of(graph.forward(x, theta), y)
    for b in range(x.shape[0]):
        for j in range(graph.n_classes):
            if j == int(y[b]):
                continue
            grads = torch.autograd.grad(margins[b, j], [theta[n] for n in names], retain_graph=True)
            minimum = float(margins[b, j].detach())
            for n, g in zip(names, grads, strict=True):
                radius = (zonotope.upper[n] - zonotope.lower[n]) / 2
                minimum -= float((g.abs() * radius).sum())
            for i in range(zonotope.n_generators):
                minimum -= abs(
                    sum(
                        float((g * zonotope.generators[n][i]).sum())
                        for n, g in zip(names, grads, strict=True)
                    )
                )
            assert float(bounds.lower[b, j]) == pytest.approx(minimum, abs=1e-12)


def test_zonotope_bounds_are_tighter_than_the_hull() -> None:
    gen = torch.Generator().manual_seed(11)
    graph = random_mlp((5, 8, 7, 3), gen)
    zonotope = random_zonotope(graph, 4, gen)
    x, y = _labels_inputs(graph, 20, gen)
    zono = zonotope_margin_bounds(graph, zonotope.lower, zonotope.upper, zonotope.generators, x, y)
    hull = zonotope.interval_hull()
    box = margin_bounds(graph, hull.lower, hull.upper, x, y)
    finite = ~torch.isinf(box.lower)
    assert bool((zono.lower[finite] >= box.lower[finite]).all())
    assert float((zono.lower - box.lower)[finite].mean()) > 0.5


def test_conv_is_refused_with_a_clear_error() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_cnn(gen)
    zonotope = random_zonotope(graph, 1, gen)
    x, y = _labels_inputs(graph, 2, gen)
    with pytest.raises(GraphError, match="Conv_0.*domain: box"):
        zonotope_margin_bounds(graph, zonotope.lower, zonotope.upper, zonotope.generators, x, y)


# ---------------------------------------------------------------- search


@pytest.fixture(scope="module")
def searched() -> tuple[Graph, SearchTask, Zonotope, Tensor, Tensor]:
    torch.set_num_threads(1)
    graph = load_model(MODEL)
    data = load_dataset("digits", split="test")
    x, y = data.x, data.y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    grad, val, held = perm[:250], perm[250:400], perm[400:]
    clean = float((graph(x[grad]).argmax(1) == y[grad]).float().mean())
    task = SearchTask("digits", "accuracy", clean - 0.05, x[grad], y[grad], x[val], y[val])
    search = SearchSection(iterations=20, lr=1.0, checkpoint_every=10)
    result = search_zonotope_lid(
        graph, [task], search, ZonotopeSection(k=4, iterations=20), names=list(graph.parameters)
    )
    assert result.feasible
    assert result.size >= result.box_size  # never smaller than the box it starts from
    return graph, task, result.zonotope, x[held], y[held]


def test_search_returns_a_zonotope_meeting_its_target(searched) -> None:
    graph, task, zonotope, _, _ = searched
    assert zonotope.n_generators == 4
    assert hard_metrics(graph, zonotope, [task])[0] >= task.target
    assert zonotope.contains(graph.parameters)
    assert zonotope.representable()
    for name, lower in zonotope.lower.items():
        assert torch.equal(lower, lower.float().double())
        assert torch.equal(zonotope.upper[name], zonotope.upper[name].float().double())


def test_certified_heldout_samples_are_correct_for_sampled_networks(searched) -> None:
    graph, _, zonotope, x, y = searched
    certified, nonfinite = certify_samples(graph, zonotope, x, y)
    assert nonfinite == 0 and int(certified.sum()) > 0
    gen = torch.Generator().manual_seed(1)
    xs, ys = x[certified].double(), y[certified]
    for kind in ("uniform", "vertex"):
        for theta in zonotope.sample(30, generator=gen, kind=kind):
            preds = graph.forward(xs, theta).argmax(1)
            assert bool((preds == ys).all()), f"a {kind} sample misclassifies a certified input"


def test_projected_float32_weights_are_certified(searched) -> None:
    graph, _, zonotope, _, _ = searched
    gen = torch.Generator().manual_seed(2)
    moved = {n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in graph.parameters.items()}
    safe = zonotope.project(moved)
    assert all(t.dtype == torch.float32 for t in safe.values())
    assert zonotope.contains(safe)


def test_lookahead_directions_are_unit_and_downhill() -> None:
    gen = torch.Generator().manual_seed(5)
    graph = random_mlp((6, 8, 3), gen)
    x, y = _labels_inputs(graph, 96, gen)
    names = list(graph.parameters)
    directions = lookahead_directions(graph, names, 3, x, y)
    theta = {n: t.clone().requires_grad_(True) for n, t in graph.parameters.items()}
    loss = torch.nn.functional.cross_entropy(graph.forward(x, theta), y)
    grads = torch.autograd.grad(loss, [theta[n] for n in names])
    for i in range(3):
        d = torch.cat([directions[n][i].flatten().double() for n in names])
        g = torch.cat([t.flatten() for t in grads])
        assert float(d.norm()) == pytest.approx(1.0, abs=1e-5)
        assert float(d @ g) <= 1e-9


# ---------------------------------------------------------------- spec and pipeline


def test_spec_accepts_a_zonotope_section_and_names_bad_keys() -> None:
    raw = {
        "model": "m.onnx",
        "data": {"name": "digits"},
        "domain": "zonotope",
        "zonotope": {"k": 3},
    }
    spec = parse_spec(raw, source=Path("z.yaml"))
    assert spec.domain == "zonotope" and spec.zonotope.k == 3
    with pytest.raises(SpecError, match="zonotope.k"):
        parse_spec({**raw, "zonotope": {"k": -1}}, source=Path("z.yaml"))
    with pytest.raises(SpecError, match="domain"):
        parse_spec({**raw, "domain": "ellipsoid"}, source=Path("z.yaml"))


@pytest.mark.parametrize("k", [0, 2])
def test_verifier_lid_writes_a_certified_zonotope(tmp_path: Path, k: int) -> None:
    """Also k = 0 (the box continued as a zonotope), whose certificate has no generators."""
    torch.set_num_threads(1)
    spec = tmp_path / "spec.yaml"
    document = {
        "model": str(MODEL),
        "data": {"name": "digits", "split": "test"},
        "tasks": [{"name": "digits", "target": 0.5}],
        "domain": "zonotope",
        "zonotope": {"k": k},
        "search": {"iterations": 6, "checkpoint_every": 3},
    }
    spec.write_text(yaml.safe_dump(document), encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["lid", str(spec), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    lid = load_lid(out / "lid.safetensors")
    assert lid.kind == "zonotope" and isinstance(lid.domain, Zonotope)
    graph = load_model(MODEL)
    assert lid.domain.contains(graph.parameters)
    certificate = json.loads((out / "certificate.json").read_text(encoding="utf-8"))
    assert certificate["spec"]["domain"] == "zonotope" and certificate["holds"]
    norms = certificate["lid"]["generator_norms"]
    assert (norms["total"] == 0.0) == (k == 0)
    recertified = CliRunner().invoke(
        cli, ["certify", str(MODEL), str(out / "lid.safetensors"), "digits", "--json"]
    )
    assert recertified.exit_code == 0, recertified.output
