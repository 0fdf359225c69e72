"""Bounds on the margins z_y - z_j of a batch, as every bound engine returns them: the value type,
the per-entry combination of several sound bounds, and the soft surrogate the search uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class MarginBounds:
    """Lower bounds on the margins z_y - z_j, shape (batch, n_classes), +inf at j = y.

    `rounding` is the float-error bound of each entry in proof mode, else None.
    """

    lower: Tensor
    rounding: Tensor | None = None

    def worst(self) -> Tensor:
        """The smallest margin lower bound of each sample, shape (batch,)."""
        return self.lower.min(dim=1).values

    def certified(self) -> Tensor:
        """Boolean mask of samples whose every margin bound exceeds its rounding allowance.

        NaN bounds fail closed (count as not certified).
        """
        slack = self.lower if self.rounding is None else self.lower - self.rounding
        ok = slack > 0  # NaN compares False: fails closed
        return ok.all(dim=1)


def combine_margin_bounds(first: MarginBounds, *others: MarginBounds) -> MarginBounds:
    """Per sample and class, keep the sound bound with the larger slack (bound - allowance).

    Each input must be sound on its own; the result is then sound entry by entry and never
    certifies fewer samples than any input.
    """
    best = first
    for other in others:
        a = best.lower if best.rounding is None else best.lower - best.rounding
        b = other.lower if other.rounding is None else other.lower - other.rounding
        take = b > a  # NaN compares False: keeps the earlier bound
        lower = torch.where(take, other.lower, best.lower)
        if best.rounding is None and other.rounding is None:
            best = MarginBounds(lower)
            continue
        ra = torch.zeros_like(a) if best.rounding is None else best.rounding
        rb = torch.zeros_like(b) if other.rounding is None else other.rounding
        best = MarginBounds(lower, torch.where(take, rb, ra))
    return best


def mask_true_class(margins: Tensor, rounding: Tensor | None, y: Tensor) -> MarginBounds:
    """Set the true class's margin to +inf and its allowance to 0 (z_y - z_y needs no bound).

    Args:
        margins: margin lower bounds, shape (batch, n_classes); the entries at y are ignored.
        rounding: their rounding allowances, same shape, or None.
        y: true classes, shape (batch,), int64.

    Returns:
        MarginBounds with +inf at [b, y_b] (new tensors; the inputs are left alone).
    """
    inf = torch.full_like(margins[:, :1], float("inf"))
    margins = margins.scatter(1, y[:, None], inf)
    if rounding is not None:
        rounding = rounding.scatter(1, y[:, None], torch.zeros_like(inf))
    return MarginBounds(margins, rounding)


def soft_margin_accuracy(bounds: MarginBounds, *, temperature: float) -> Tensor:
    """Differentiable surrogate of certified accuracy on a batch.

    The worst-case logit vector has 0 at the true class and -margin_j elsewhere; the
    surrogate is the mean softmax probability of the true class, 1 / (1 + sum_j exp(-t m_j)).

    Args:
        bounds: margin lower bounds from `margin_bounds`.
        temperature: t; larger is closer to the hard certified count.

    Returns:
        Scalar in [0, 1].
    """
    neg = -temperature * bounds.lower  # -inf at the true class drops out of the sum
    zeros = torch.zeros_like(neg[:, :1])
    return torch.exp(-torch.logsumexp(torch.cat([zeros, neg], dim=1), dim=1)).mean()
