"""What one back-substitution pass accumulates: the enclosures it reads, and its ledger.

An `Enclosure` is how the linear-bound engine sees one tensor: sound elementwise bounds on its
exact values (in proof mode widened by the interval pass's float-error bound and rounded
outward), its computed value when it does not depend on the box, and magnitudes for the
rounding analysis. A `Ledger` holds the constant term of the linear bound of every row, the
count and magnitude of the pieces summed into it, and the rounding allowance charged so far
(see `verifier.bounds.linear` for the derivation of each charge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.bounds.intervals import Interval
from verifier.rounding import gamma


def round_down(value: Tensor) -> Tensor:
    """The next float below `value` (a sound lower end after a round-to-nearest subtraction).

    The gradient is that of `value`: the one-ulp step is added as a detached constant (exact,
    since the two floats are adjacent).
    """
    step = torch.nextafter(value.detach(), torch.full_like(value, -torch.inf)) - value.detach()
    return value + step


def round_up(value: Tensor) -> Tensor:
    """The next float above `value`."""
    step = torch.nextafter(value.detach(), torch.full_like(value, torch.inf)) - value.detach()
    return value + step


@dataclass(frozen=True, eq=False)
class Enclosure:
    """One tensor as the engine sees it, shape (batch, *shape) for every field.

    Attributes:
        lower: lower ends, valid for the exact values (proof mode: widened and rounded down).
        upper: upper ends, same shape.
        point: the computed value when the tensor does not depend on the box, else None.
        error: proof mode, point tensors: bound on |exact value - point|; else None.
        magnitude: proof mode: bound on |exact value| (max(|lower|, |upper|)); else None.
    """

    lower: Tensor
    upper: Tensor
    point: Tensor | None = None
    error: Tensor | None = None
    magnitude: Tensor | None = None

    @classmethod
    def of(cls, interval: Interval, error: Tensor | None, *, track: bool) -> Enclosure:
        """The enclosure of an interval-pass result (interval, float-error bound or None)."""
        point = interval.lower if interval.is_point else None
        if not track:
            return cls(interval.lower, interval.upper, point)
        err = torch.zeros_like(interval.lower) if error is None else error
        lower = round_down(interval.lower - err)
        upper = round_up(interval.upper + err)
        magnitude = torch.maximum(lower.abs(), upper.abs())
        return cls(lower, upper, point, err if point is not None else None, magnitude)

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape (no batch axis)."""
        return tuple(self.lower.shape[1:])

    def numel(self) -> int:
        """Entries per sample."""
        n = 1
        for size in self.shape:
            n *= size
        return n


def charge_factor(k: int, m: int) -> float:
    """The factor that makes gamma_k * X sound when X >= 0 is evaluated in float.

    A computed sum of nonnegative products with at most m roundings per term is at least
    (1 - gamma_m) times the exact one, so X <= X~ / (1 - gamma_m) <= (1 + gamma_2m) X~; one
    more rounding multiplies the charge by the factor. So gamma_k * X <= fl(c * X~) with
    c = gamma_k (1 + gamma_{2m+4}) (k = 0 means a bare X, c = 1 + gamma_{2m+4}).

    Args:
        k: the Higham count of the bounded computation (0: the term is X itself).
        m: roundings in evaluating X.

    Returns:
        c.
    """
    return (gamma(k) if k else 1.0) * (1.0 + gamma(2 * m + 4))


def row_sum(t: Tensor) -> Tensor:
    """Sum over every axis after (batch, row): shape (batch, rows)."""
    return t.flatten(2).sum(-1) if t.dim() > 2 else t


def row_dot(lam: Tensor, t: Tensor) -> Tensor:
    """sum over the tensor axes of lam * t, shape (batch, rows).

    Args:
        lam: coefficients, (batch, rows, *shape).
        t: one value per sample, (batch, *shape), or a tensor that broadcasts against lam
            with the row axis ((batch, rows or 1, *shape)).

    Returns:
        Shape (batch, rows).
    """
    if t.dim() == lam.dim() - 1 and t.shape[0] == lam.shape[0]:
        t = t.unsqueeze(1)
    return row_sum(lam * t)


class Ledger:
    """The constant terms of one pass's rows, and their rounding allowance.

    Args:
        batch: samples.
        rows: linear-bound rows per sample.
        like: a tensor giving dtype and device.
        track: whether to keep the rounding allowance.
    """

    def __init__(self, batch: int, rows: int, like: Tensor, *, track: bool) -> None:
        self.const = torch.zeros((batch, rows), dtype=like.dtype, device=like.device)
        self.track = track
        self._pieces = 0
        self._piece_magnitude = torch.zeros_like(self.const) if track else None
        self._error = torch.zeros_like(self.const) if track else None
        self._charges = 0
        self.captured: dict[str, Tensor] = {}
        """Coefficients the pass reached named tensors with (`BackSubstitution.run`'s capture)."""

    def add(self, piece: Tensor) -> None:
        """Add a constant piece of shape (batch, rows) to every row's bound."""
        self.const = self.const + piece
        self._pieces += 1
        if self._piece_magnitude is not None:
            self._piece_magnitude = self._piece_magnitude + piece.detach().abs()

    def charge(self, k: int, m: int, magnitude: Tensor) -> None:
        """Charge gamma_k * X for X = `magnitude` (>= 0, (batch, rows), m roundings)."""
        if self._error is None:
            return
        self._error = self._error + charge_factor(k, m) * magnitude.detach()
        self._charges += 1

    def rounding(self) -> Tensor | None:
        """The allowance: every charge, the summation of the pieces, and this sum itself.

        The pieces were summed one by one (recursive summation: error at most
        gamma_J sum |piece| for J pieces, Higham Eq. 4.4); the charges are J' nonnegative
        terms summed in float, covered by the factor 1 + gamma_{2J'+8} (as in
        `charge_factor`, plus the rounding of that factor itself).
        """
        if self._error is None or self._piece_magnitude is None:
            return None
        summation = charge_factor(self._pieces, self._pieces + 1) * self._piece_magnitude
        return (self._error + summation) * (1.0 + gamma(2 * (self._charges + 1) + 8))
