"""Soundness oracles shared by the bound tests: sampled and attacked margins inside a box."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from verifier.bounds.intervals import Interval
from verifier.graph import Graph


def margins_of(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - z_j for every class, +inf at j = y; shape (batch, n_classes)."""
    margins = logits.gather(1, y[:, None]) - logits
    return margins.scatter(1, y[:, None], float("inf"))


def sampled_worst_margins(
    graph: Graph,
    samples: Iterable[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    *,
    logits: Interval | None = None,
) -> Tensor:
    """The smallest margin seen over sampled parameter vectors; also checks logit enclosures.

    Raises:
        AssertionError: a sampled logit lies outside `logits` (naming the worst violation).
    """
    worst = torch.full((x.shape[0], graph.n_classes), float("inf"), dtype=torch.float64)
    for theta in samples:
        z = graph.forward(x, theta)
        if logits is not None:
            below = float((logits.lower - z).max())
            above = float((z - logits.upper).max())
            assert below <= 1e-12 and above <= 1e-12, f"logit outside bounds by {max(below, above)}"
        worst = torch.minimum(worst, margins_of(z, y))
    return worst


def attack_margins(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    generator: torch.Generator,
) -> Tensor:
    """Weight-space projected gradient descent on every margin z_y - z_j inside the box.

    Starts at a random point of the box, takes signed-gradient steps of a shrinking size and
    clamps back into the box; returns the smallest margin seen, shape (batch, n_classes).
    """
    worst = torch.full((x.shape[0], graph.n_classes), float("inf"), dtype=torch.float64)
    names = list(lower)
    theta = {
        n: (lower[n] + (upper[n] - lower[n]) * torch.rand(lower[n].shape, generator=generator))
        .detach()
        .requires_grad_(True)
        for n in names
    }
    for step in range(steps):
        margins = margins_of(graph.forward(x, theta), y)
        worst = torch.minimum(worst, margins.detach())
        finite = margins[~torch.isinf(margins)]
        grads = torch.autograd.grad(finite.sum(), [theta[n] for n in names])
        size = 0.5 * (1 - step / steps)
        with torch.no_grad():
            for n, g in zip(names, grads, strict=True):
                moved = theta[n] - size * (upper[n] - lower[n]) * torch.sign(g)
                theta[n] = torch.clamp(moved, lower[n], upper[n]).requires_grad_(True)
    return worst
