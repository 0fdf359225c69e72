"""Fine-tuning a classification head on a new task: unprotected, with EWC, or inside a LID.

The foundation-model-head experiments (issue 11; paper arXiv 2512.01899, text heads): a head on
frozen encoder features, trained for Task 1, is fine-tuned on Task 2 by one shared loop
(`finetune_head`), with one of three protections of Task 1:

* none ("plain"): ordinary fine-tuning of every head parameter;
* EWC (Kirkpatrick et al., 2017): the loss gains λ/2 Σ_i F_i (θ_i - θ*_i)^2, with F the
  diagonal empirical Fisher of the Task-1 head on Task-1 data and θ* its weights
  (`ewc_anchor`);
* a LID: only the boxed parameters train and every optimiser step is followed by the projection
  onto the box (`verifier.update.ProjectedOptimizer`), so the network lies in the LID at every
  step and the LID's held-out certificate covers the result (`HeadFineTune.inside_lid` is the
  float64 membership check that says so).

Every protection uses the same optimiser (Adam), learning rate, batch size, epochs and
mini-batch order, so they differ only in the protection. The loss is cross-entropy, class
weighted by default (weight n / (C n_c) for class c), since the figure of merit is balanced
accuracy (`balanced_accuracy`, the mean of the per-class recalls). `stratified_split` makes the
seeded fine-tune / evaluation split of a test-only corpus.

Pure functions over tensors: no files, no printing, no global torch state; randomness comes in
as a `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.graph import Graph
from verifier.search import fisher_importance
from verifier.update.training import ProjectedOptimizer, TrainableGraph

Protection = Literal["plain", "ewc", "lid"]


@dataclass(frozen=True)
class FineTuneConfig:
    """The optimisation shared by every protection.

    Attributes:
        epochs: passes over the fine-tuning data.
        lr: Adam learning rate.
        batch_size: samples per step.
        class_balanced: weight the cross-entropy by n / (C n_c) per class c.
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    class_balanced: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0.0:
            raise ValueError(
                f"epochs >= 0, batch_size >= 1 and lr > 0 expected; got {self.epochs}, "
                f"{self.batch_size}, {self.lr}"
            )


@dataclass(frozen=True, eq=False)
class EwcAnchor:
    """The EWC penalty λ/2 Σ F (θ - θ*)^2 of one earlier task.

    Attributes:
        fisher: diagonal Fisher information per parameter name.
        theta: the earlier task's weights θ* per parameter name.
        strength: λ.
    """

    fisher: Mapping[str, Tensor]
    theta: Mapping[str, Tensor]
    strength: float

    def penalty(self, parameters: Mapping[str, Tensor]) -> Tensor:
        """λ/2 Σ_i F_i (θ_i - θ*_i)^2 over the anchored parameters (differentiable)."""
        terms = [
            (self.fisher[n] * (parameters[n] - self.theta[n]).pow(2)).sum() for n in self.fisher
        ]
        return self.strength / 2 * torch.stack(terms).sum()


@dataclass(frozen=True, eq=False)
class HeadFineTune:
    """The outcome of one fine-tuning run.

    Attributes:
        protection: "plain", "ewc" or "lid".
        theta: the fine-tuned parameters, keyed by initializer name (detached copies).
        inside_lid: for "lid", whether `theta` lies in the LID, checked in float64 (the LID's
            certificate applies only then); None for the other protections.
        losses: mean training loss of each epoch (cross-entropy plus the EWC penalty).
    """

    protection: Protection
    theta: dict[str, Tensor]
    inside_lid: bool | None
    losses: tuple[float, ...]


def balanced_accuracy(y_true: Tensor, y_pred: Tensor) -> float:
    """Mean over the classes present in `y_true` of the fraction of them predicted right.

    Equals scikit-learn's `balanced_accuracy_score` (which, like this, ignores classes that
    occur only among the predictions).

    Args:
        y_true: labels, shape (n,), n >= 1.
        y_pred: predicted labels, shape (n,).

    Raises:
        ValueError: empty or mismatched inputs.
    """
    if y_true.numel() == 0 or y_true.shape != y_pred.shape:
        raise ValueError(
            f"balanced accuracy needs equal, non-empty shapes; got {tuple(y_true.shape)} and "
            f"{tuple(y_pred.shape)}"
        )
    recalls = [
        (y_pred[y_true == c] == c).to(torch.float64).mean() for c in torch.unique(y_true).tolist()
    ]
    return float(torch.stack(recalls).mean())


def predict(
    graph: Graph, x: Tensor, theta: Mapping[str, Tensor] | None = None, *, batch_size: int = 4096
) -> Tensor:
    """Predicted labels (argmax of the logits) of the graph with parameters `theta`.

    Args:
        graph: the head (or any graph).
        x: inputs, shape (n, *graph.input_shape).
        theta: parameters by initializer name (default: the graph's own); missing names keep
            the graph's values.
        batch_size: samples per forward pass.

    Returns:
        int64 labels, shape (n,).
    """
    params = dict(graph.parameters)
    if theta is not None:
        params.update({n: t.to(graph.parameters[n].dtype) for n, t in theta.items()})
    with torch.no_grad():
        parts = [
            graph.forward(x[i : i + batch_size].to(next(iter(params.values())).dtype), params)
            .argmax(dim=1)
            .to(torch.int64)
            for i in range(0, x.shape[0], batch_size)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def stratified_split(
    y: Tensor, fraction: float, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A seeded split of sample indices, stratified by label.

    Each class's indices are permuted (with `generator`) and the first round(fraction * n_c)
    go to the first part, the rest to the second; both parts are then sorted.

    Args:
        y: labels, shape (n,).
        fraction: the share of each class in the first part, in (0, 1).
        generator: source of the permutations.

    Returns:
        (first indices, second indices), int64, disjoint, covering 0..n-1.

    Raises:
        ValueError: fraction outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    first, second = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = round(fraction * idx.numel())
        first.append(idx[:k])
        second.append(idx[k:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values


def ewc_anchor(graph: Graph, x: Tensor, y: Tensor, *, strength: float) -> EwcAnchor:
    """The EWC anchor of the graph's current weights: diagonal empirical Fisher on (x, y).

    Args:
        graph: the Task-1 network (every parameter anchored at its current value).
        x: Task-1 samples, shape (n, *input_shape).
        y: their labels, shape (n,).
        strength: λ.

    Returns:
        The anchor.
    """
    names = list(graph.parameters)
    fisher = fisher_importance(graph, names, x.to(graph.parameters[names[0]].dtype), y)
    theta = {n: graph.parameters[n].detach().clone() for n in names}
    return EwcAnchor({n: f.detach() for n, f in fisher.items()}, theta, float(strength))


def class_weights(y: Tensor, n_classes: int) -> Tensor:
    """n / (C n_c) per class c (0 for classes absent from y), float32, shape (C,)."""
    counts = torch.bincount(y, minlength=n_classes).to(torch.float32)
    present = counts > 0
    weights = torch.zeros(n_classes)
    weights[present] = y.numel() / (int(present.sum()) * counts[present])
    return weights


def finetune_head(
    graph: Graph,
    x: Tensor,
    y: Tensor,
    *,
    config: FineTuneConfig,
    generator: torch.Generator,
    lid: Box | None = None,
    ewc: EwcAnchor | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> HeadFineTune:
    """Fine-tune the graph's parameters on (x, y), unprotected, with EWC, or inside a LID.

    The graph itself is not modified. With `lid`, only the LID's parameters train (the rest
    keep their values, as its certificate assumes), each Adam step is followed by the
    projection onto the box, and the result is checked to lie in the box in float64.

    Args:
        graph: the Task-1 network (e.g. a linear head).
        x: fine-tuning inputs, shape (n, *input_shape).
        y: their labels, shape (n,).
        config: optimiser, epochs and loss weighting (the same for every protection).
        generator: source of the mini-batch order.
        lid: the LID to stay in ("lid" protection).
        ewc: the EWC anchor ("ewc" protection).
        on_epoch: called with (epoch number from 1, mean loss) after each epoch.

    Returns:
        The fine-tuned parameters and, for a LID, the membership check.

    Raises:
        ValueError: both `lid` and `ewc` given, or no samples.
    """
    if lid is not None and ewc is not None:
        raise ValueError("give a LID or an EWC anchor, not both")
    if x.shape[0] == 0:
        raise ValueError("no fine-tuning samples")
    protection: Protection = "lid" if lid is not None else "ewc" if ewc is not None else "plain"
    net = TrainableGraph(graph, names=None if lid is None else lid.names)
    adam = torch.optim.Adam(net.parameters(), lr=config.lr)
    optimizer: torch.optim.Optimizer | ProjectedOptimizer = (
        adam if lid is None else ProjectedOptimizer(adam, lid, net)
    )
    dtype = next(iter(graph.parameters.values())).dtype
    x = x.to(dtype)
    weight = class_weights(y, graph.n_classes).to(dtype) if config.class_balanced else None
    losses = []
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(x.shape[0], generator=generator)
        total, steps = 0.0, 0
        for start in range(0, x.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx], weight=weight)
            if ewc is not None:
                loss = loss + ewc.penalty(net.onnx_parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(total / steps)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    theta = net.theta()
    inside = None if lid is None else lid.contains({n: theta[n] for n in lid.names})
    return HeadFineTune(protection, theta, inside, tuple(losses))
