"""End-to-end soundness of a searched LID on the embedded default model."""

from __future__ import annotations

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
