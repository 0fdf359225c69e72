"""Falsifiers: concrete weights inside a box that make one sample's margins small.

Three searches, each evaluating real networks (a plain float64 forward pass, `graph.forward`):

* **uniform** samples of the box and **vertex** samples (every coordinate at a random end);
* **weight-space PGD** per class j: projected signed-gradient descent on the margin
  z_y - z_j over the boxed weights. The first step has the full box width, so it lands on the
  vertex that the gradient at the start picks; later steps shrink linearly. One run starts at
  the model's own weights (projected onto the box), the others at uniform samples.

Every margin reported is attained by weights inside the box, so it is an *upper* bound on the
true worst-case margin: a sound lower bound above it is a soundness violation of the bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.graph import Graph


@dataclass(frozen=True)
class FalsifierConfig:
    """How hard the falsifiers try.

    Attributes:
        n_uniform: uniform samples of the box.
        n_vertex: random vertices of the box.
        pgd_steps: projected gradient steps per class and run.
        pgd_restarts: PGD runs per class from uniform random starts, besides the one from the
            model's own weights.
    """

    n_uniform: int = 32
    n_vertex: int = 32
    pgd_steps: int = 30
    pgd_restarts: int = 1

    def __post_init__(self) -> None:
        for name in ("n_uniform", "n_vertex", "pgd_steps", "pgd_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"FalsifierConfig.{name} must be >= 0; got {getattr(self, name)}")


@dataclass(frozen=True, eq=False)
class Falsification:
    """The smallest margins the falsifiers attained for one sample.

    Attributes:
        margins: per class j, the smallest z_y - z_j found, float64, shape (n_classes,);
            +inf at the true class.
        sources: per class, which falsifier found it ("nominal", "uniform", "vertex", "pgd");
            "" at the true class.
        witnesses: per class j != y, weights inside the box (every boxed parameter, float64)
            that attain `margins[j]`.
    """

    margins: Tensor
    sources: list[str]
    witnesses: dict[int, dict[str, Tensor]] = field(repr=False)


class _Tracker:
    """Keeps, per class, the smallest margin seen and the weights that gave it."""

    def __init__(self, n_classes: int, label: int) -> None:
        self.label = label
        self.margins = torch.full((n_classes,), float("inf"), dtype=torch.float64)
        self.sources = [""] * n_classes
        self.witnesses: dict[int, dict[str, Tensor]] = {}

    def offer(self, margins: Tensor, theta: Mapping[str, Tensor], source: str) -> None:
        """Record margins (shape (n_classes,)) attained by theta where they improve."""
        better = margins < self.margins
        better[self.label] = False
        if not bool(better.any()):
            return
        frozen = {name: value.detach().clone() for name, value in theta.items()}
        for j in torch.nonzero(better).flatten().tolist():
            self.margins[j] = margins[j]
            self.sources[j] = source
            self.witnesses[j] = frozen


def sample_margins(graph: Graph, theta: Mapping[str, Tensor], x: Tensor, label: int) -> Tensor:
    """z_y - z_j of one input under parameters theta, float64, shape (n_classes,), +inf at y.

    Args:
        graph: the network.
        theta: parameter values (any subset; the rest keep the model's values).
        x: one input, shape (1, *graph.input_shape), float64.
        label: the true class y.

    Returns:
        The margins.
    """
    logits = graph.forward(x, theta)[0]
    margins = logits[label] - logits
    margins[label] = float("inf")
    return margins


def _pgd(
    graph: Graph,
    box: Box,
    x: Tensor,
    label: int,
    other: int,
    start: Mapping[str, Tensor],
    steps: int,
    tracker: _Tracker,
) -> None:
    names = box.names
    lower = {n: box.lower[n] for n in names}
    upper = {n: box.upper[n] for n in names}
    theta = {n: start[n].detach().clone().requires_grad_(True) for n in names}
    for step in range(steps):
        logits = graph.forward(x, theta)[0]
        with torch.no_grad():
            margins = logits[label] - logits
            margins[label] = float("inf")
            tracker.offer(margins, theta, "pgd")
        margin = logits[label] - logits[other]
        grads = torch.autograd.grad(margin, [theta[n] for n in names], allow_unused=True)
        size = 1.0 if step == 0 else 0.5 * (1.0 - step / steps)
        with torch.no_grad():
            moved = {}
            for n, g in zip(names, grads, strict=True):
                if g is None:
                    moved[n] = theta[n].detach()
                    continue
                step_n = theta[n] - size * (upper[n] - lower[n]) * torch.sign(g)
                moved[n] = torch.minimum(torch.maximum(step_n, lower[n]), upper[n])
        theta = {n: v.requires_grad_(True) for n, v in moved.items()}
    with torch.no_grad():
        tracker.offer(sample_margins(graph, theta, x, label), theta, "pgd")


def falsify_sample(
    graph: Graph,
    box: Box,
    x: Tensor,
    label: int,
    *,
    config: FalsifierConfig,
    generator: torch.Generator,
    classes: Iterable[int] | None = None,
) -> Falsification:
    """Search the box for weights that make the margins of one sample small.

    Args:
        graph: the network.
        box: the weight box.
        x: one input, shape (*graph.input_shape) or (1, *graph.input_shape).
        label: the true class y.
        config: sample counts and PGD effort.
        generator: randomness (samples and PGD restarts).
        classes: the classes j to attack with PGD (default: all but y); sampling always
            covers every class.

    Returns:
        The smallest margin found per class, its source and its weights, all evaluated in
        float64.
    """
    box64 = box.to(torch.float64)
    x64 = x.to(torch.float64).reshape(1, *graph.input_shape)
    n_classes = graph.n_classes
    tracker = _Tracker(n_classes, label)
    nominal = box64.project(
        {name: graph.parameters[name].to(torch.float64) for name in box64.names}
    )
    with torch.no_grad():
        tracker.offer(sample_margins(graph, nominal, x64, label), nominal, "nominal")
        for theta in box64.sample(config.n_uniform, generator=generator):
            tracker.offer(sample_margins(graph, theta, x64, label), theta, "uniform")
        for theta in box64.sample(config.n_vertex, generator=generator, kind="vertex"):
            tracker.offer(sample_margins(graph, theta, x64, label), theta, "vertex")
    others = [j for j in range(n_classes) if j != label] if classes is None else list(classes)
    if config.pgd_steps > 0 and box64.names:
        for j in others:
            _pgd(graph, box64, x64, label, j, nominal, config.pgd_steps, tracker)
            for start in box64.sample(config.pgd_restarts, generator=generator):
                _pgd(graph, box64, x64, label, j, start, config.pgd_steps, tracker)
    return Falsification(tracker.margins, tracker.sources, tracker.witnesses)
