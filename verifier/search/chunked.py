"""The search's soft metric over a batch too large for one bound pass (issue 21, memory).

A backward pass needs every intermediate of its forward pass, so splitting a batch into
chunks saves memory only if a chunk's graph is gone before the next chunk is bounded.
`chunked_soft_metric` therefore bounds the chunks without a graph (the soft metric and the
certified mask of the whole batch, from the same per-sample bounds as one pass), and its
backward pass bounds each chunk again with a graph, pulls the chunk's share of the gradient
back to the corners and drops it: one chunk's graph at a time, at the price of a second
forward pass. The soft metric is sum_i w_i p_i over the samples (w_i = 1/n for accuracy,
1/(classes present x samples of i's class) for balanced accuracy), so the chunks' gradients
add up to the batch's; only the order of that float sum differs from one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from verifier.bounds.margins import MarginBounds
from verifier.certify import Metric
from verifier.search.surrogate import soft_metric

BoundsOf = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Tensor, Tensor], MarginBounds]
"""(lower, upper, x, y) -> margin bounds of the samples x, differentiable in the corners."""


def chunked_soft_metric(
    bounds_of: BoundsOf,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    metric: Metric,
    temperature: float,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """The soft metric of the batch, differentiable in the corners, and its certified mask,
    bounding at most `chunk` samples at a time (module docstring).

    Args:
        bounds_of: the search's bound on some samples.
        lower: lower corners, keyed by parameter name.
        upper: upper corners, same keys.
        x: the batch's inputs, shape (batch, *input_shape).
        y: labels, shape (batch,).
        metric: "accuracy" or "balanced_accuracy".
        temperature: of the soft metric (`soft_metric`).
        chunk: samples per bound pass.

    Returns:
        (soft metric, a scalar with a gradient to the corners; certified mask, shape (batch,)).
    """
    names = list(lower)
    n = len(names)

    def split(flat: tuple[Tensor, ...]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return dict(zip(names, flat[:n], strict=True)), dict(zip(names, flat[n:], strict=True))

    starts = range(0, x.shape[0], chunk)

    class _Soft(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *flat: Tensor) -> tuple[Tensor, Tensor]:
            low, up = split(flat)
            with torch.no_grad():
                parts = [bounds_of(low, up, x[s : s + chunk], y[s : s + chunk]) for s in starts]
            margins = torch.cat([p.lower for p in parts])
            certified = torch.cat([p.certified() for p in parts])
            ctx.save_for_backward(*flat)
            ctx.mark_non_differentiable(certified)
            return soft_metric(margins, y, metric, temperature), certified

        @staticmethod
        def backward(ctx: Any, grad_soft: Tensor, _grad_mask: Tensor) -> tuple[Tensor | None, ...]:
            saved = ctx.saved_tensors
            needs = ctx.needs_input_grad
            weights = _weights(y, metric)
            grads: list[Tensor | None] = [None] * len(saved)
            for s in starts:
                leaves = [
                    t.detach().requires_grad_(need) for t, need in zip(saved, needs, strict=True)
                ]
                wanted = [t for t in leaves if t.requires_grad]
                if not wanted:
                    break
                with torch.enable_grad():
                    low, up = split(tuple(leaves))
                    bounds = bounds_of(low, up, x[s : s + chunk], y[s : s + chunk])
                    share = _probabilities(bounds.lower, temperature) * weights[s : s + chunk]
                    found = torch.autograd.grad(share.sum(), wanted, allow_unused=True)
                found_iter = iter(found)
                for i, leaf in enumerate(leaves):
                    if not leaf.requires_grad:
                        continue
                    g = next(found_iter)
                    total = grads[i]
                    if g is not None:
                        grads[i] = g if total is None else total + g
            return tuple(None if g is None else g * grad_soft for g in grads)

    flat = tuple(lower[k] for k in names) + tuple(upper[k] for k in names)
    soft, certified = _Soft.apply(*flat)
    return soft, certified


def _probabilities(margin_lower: Tensor, temperature: float) -> Tensor:
    """Per sample, the softmax weight of the true class (`soft_metric` before averaging)."""
    neg = -temperature * margin_lower
    zeros = torch.zeros_like(neg[:, :1])
    return torch.exp(-torch.logsumexp(torch.cat([zeros, neg], dim=1), dim=1))


def _weights(y: Tensor, metric: Metric) -> Tensor:
    """w_i with soft metric = sum_i w_i p_i."""
    if metric == "accuracy":
        return torch.full(y.shape, 1.0 / max(y.shape[0], 1), device=y.device)
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    return 1.0 / (classes.numel() * counts[inverse].to(torch.float32))
