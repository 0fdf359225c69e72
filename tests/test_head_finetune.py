"""Head fine-tuning with no protection, EWC and a LID, on small synthetic features."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from tests.tiny_nets import random_mlp
from verifier.cl.head_finetune import (
    FineTuneConfig,
    balanced_accuracy,
    class_weights,
    ewc_anchor,
    finetune_head,
    predict,
    stratified_split,
)
from verifier.domains import Box
from verifier.graph import Graph


def _head(generator: torch.Generator) -> Graph:
    """A float32 linear head 6 -> 2, like the ONNX heads of scripts/embed.py."""
    graph = random_mlp((6, 2), generator, dtype=torch.float32)
    return Graph(
        graph.ops,
        {n: t.float() for n, t in graph.parameters.items()},
        graph.input_name,
        graph.input_shape,
        graph.output_name,
        graph.n_classes,
    )


def _task(seed: int, n: int = 300, *, direction: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose label is the sign of one coordinate: each task wants another head."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return x, (x[:, direction] > 0.3).to(torch.int64)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(5))
def test_balanced_accuracy_equals_sklearn(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_classes = 2 + seed % 3
    y = torch.randint(0, n_classes, (57,), generator=gen)
    pred = torch.randint(0, n_classes + 1, (57,), generator=gen)  # an extra predicted class
    expected = balanced_accuracy_score(y.numpy(), pred.numpy())
    assert balanced_accuracy(y, pred) == pytest.approx(expected, abs=1e-12)


def test_balanced_accuracy_rejects_empty() -> None:
    with pytest.raises(ValueError):
        balanced_accuracy(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))


@pytest.mark.parametrize("seed", range(3))
def test_stratified_split_partitions_and_keeps_class_shares(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.zeros(70), torch.ones(31), torch.full((9,), 2.0)]).to(torch.int64)
    y = y[torch.randperm(y.numel(), generator=gen)]
    first, second = stratified_split(y, 0.4, generator=torch.Generator().manual_seed(seed))
    assert sorted(torch.cat([first, second]).tolist()) == list(range(y.numel()))
    for c, n_c in ((0, 70), (1, 31), (2, 9)):
        assert int((y[first] == c).sum()) == round(0.4 * n_c)
    again = stratified_split(y, 0.4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], first)


def test_class_weights_balance_the_loss() -> None:
    y = torch.tensor([0, 0, 0, 1])
    weights = class_weights(y, 3)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0, 0.0]))
    assert float((weights[y]).sum()) == pytest.approx(y.numel())


@pytest.mark.parametrize("seed", range(3))
def test_plain_finetuning_learns_the_new_task(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = _head(gen)
    x2, y2 = _task(seed + 10, direction=1)
    before = balanced_accuracy(y2, predict(graph, x2))
    config = FineTuneConfig(epochs=8, lr=0.2, batch_size=100)
    out = finetune_head(graph, x2, y2, config=config, generator=torch.Generator().manual_seed(0))
    assert out.protection == "plain" and out.inside_lid is None
    after = balanced_accuracy(y2, predict(graph, x2, out.theta))
    assert after > 0.9 and after > before
    assert out.losses[-1] < out.losses[0]


@pytest.mark.parametrize("seed", range(3))
def test_projected_finetuning_ends_inside_the_lid(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = _head(gen)
    lid = Box.around(graph.parameters, radius=0.05)
    x2, y2 = _task(seed + 10, direction=1)
    config = FineTuneConfig(epochs=3, lr=0.1, batch_size=100)
    out = finetune_head(
        graph, x2, y2, config=config, generator=torch.Generator().manual_seed(0), lid=lid
    )
    assert out.protection == "lid" and out.inside_lid is True
    assert lid.contains(out.theta)
    moved = max(float((out.theta[n] - graph.parameters[n]).abs().max()) for n in lid.names)
    assert 0.0 < moved <= 0.05 + 1e-6  # it trained, up to the box's edge
    # the graph's own parameters are untouched
    assert not torch.equal(out.theta["fc0.weight"], graph.parameters["fc0.weight"])


def test_projected_finetuning_keeps_unboxed_parameters() -> None:
    graph = _head(torch.Generator().manual_seed(3))
    full = Box.around(graph.parameters, radius=0.05)
    lid = Box({"fc0.weight": full.lower["fc0.weight"]}, {"fc0.weight": full.upper["fc0.weight"]})
    x2, y2 = _task(13, direction=1)
    config = FineTuneConfig(epochs=2, lr=0.1, batch_size=100)
    out = finetune_head(
        graph, x2, y2, config=config, generator=torch.Generator().manual_seed(0), lid=lid
    )
    assert out.inside_lid is True
    assert torch.equal(out.theta["fc0.bias"], graph.parameters["fc0.bias"])


@pytest.mark.parametrize("seed", range(2))
def test_ewc_with_huge_strength_stays_near_the_start(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    graph = _head(gen)
    x1, y1 = _task(seed, direction=0)
    x2, y2 = _task(seed + 10, direction=1)
    config = FineTuneConfig(epochs=5, lr=0.1, batch_size=100)

    def drift(strength: float | None) -> float:
        anchor = None if strength is None else ewc_anchor(graph, x1, y1, strength=strength)
        out = finetune_head(
            graph, x2, y2, config=config, generator=torch.Generator().manual_seed(0), ewc=anchor
        )
        assert out.protection == ("plain" if anchor is None else "ewc")
        return sum(float((out.theta[n] - graph.parameters[n]).norm()) for n in out.theta)

    free, weak, strong = drift(None), drift(1.0), drift(1e7)
    assert strong < 0.1 * free  # Adam oscillates about the anchor by ~lr per step
    assert strong < weak


def test_ewc_anchor_fisher_matches_per_sample_gradients() -> None:
    graph = _head(torch.Generator().manual_seed(5))
    x, y = _task(5, n=20, direction=0)
    anchor = ewc_anchor(graph, x, y, strength=2.0)
    expected = {n: torch.zeros_like(t) for n, t in graph.parameters.items()}
    for i in range(x.shape[0]):
        theta = {n: t.clone().requires_grad_(True) for n, t in graph.parameters.items()}
        logp = torch.log_softmax(graph.forward(x[i : i + 1], theta), dim=1)[0, y[i]]
        grads = torch.autograd.grad(logp, list(theta.values()))
        for n, g in zip(theta, grads, strict=True):
            expected[n] += g.pow(2) / x.shape[0]
    for n in expected:
        torch.testing.assert_close(anchor.fisher[n], expected[n], rtol=1e-4, atol=1e-7)
    zero = anchor.penalty({n: t.clone() for n, t in graph.parameters.items()})
    assert float(zero) == 0.0


def test_finetune_rejects_two_protections() -> None:
    graph = _head(torch.Generator().manual_seed(0))
    x, y = _task(0, n=10, direction=0)
    lid = Box.around(graph.parameters, radius=0.01)
    anchor = ewc_anchor(graph, x, y, strength=1.0)
    with pytest.raises(ValueError):
        finetune_head(
            graph,
            x,
            y,
            config=FineTuneConfig(),
            generator=torch.Generator(),
            lid=lid,
            ewc=anchor,
        )
