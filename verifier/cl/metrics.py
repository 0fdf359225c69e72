"""Continual-learning metrics on an accuracy matrix.

`matrix[t, j]` is the accuracy on task j's test data after training on tasks 0..t (T x T;
entries with j > t may be present and are ignored by every metric here).

* average accuracy after task t: mean_{j<=t} matrix[t, j];
* forgetting (Chaudhry et al., 2018, "Riemannian Walk"): the mean over j < T-1 of
  max_{t in [j, T-2]} matrix[t, j] - matrix[T-1, j];
* backward transfer (Lopez-Paz & Ranzato, 2017, "GEM"): the mean over j < T-1 of
  matrix[T-1, j] - matrix[j, j].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.errors import InputError


def _check_square(matrix: Tensor) -> int:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise InputError(
            f"an accuracy matrix must be square (T x T, T >= 1); got {tuple(matrix.shape)}"
        )
    return int(matrix.shape[0])


def average_accuracy(matrix: Tensor) -> Tensor:
    """Mean accuracy over the tasks seen so far, after each task, shape (T,)."""
    n = _check_square(matrix)
    m = matrix.to(torch.float64)
    return torch.stack([m[t, : t + 1].mean() for t in range(n)])


def forgetting(matrix: Tensor) -> float:
    """Mean drop from each earlier task's best accuracy to its final accuracy (0 when T = 1)."""
    n = _check_square(matrix)
    if n == 1:
        return 0.0
    m = matrix.to(torch.float64)
    drops = [float(m[j : n - 1, j].max() - m[n - 1, j]) for j in range(n - 1)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Tensor) -> float:
    """Mean change from each earlier task's just-learned accuracy to its final accuracy."""
    n = _check_square(matrix)
    if n == 1:
        return 0.0
    m = matrix.to(torch.float64)
    return sum(float(m[n - 1, j] - m[j, j]) for j in range(n - 1)) / (n - 1)


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation of a few runs (std 0 for a single run)."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 2) -> str:
        """``0.68 ± 0.02``."""
        if self.n <= 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (n - 1 in the denominator).

    Raises:
        InputError: no values.
    """
    if not values:
        raise InputError("mean_std needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return MeanStd(mean, 0.0, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return MeanStd(mean, math.sqrt(var), n)
