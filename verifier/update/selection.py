"""Choosing among several LIDs (checkpoints, earlier runs) for one update.

If the update already lies in a LID, that LID is kept (the first one, in the order given) and
nothing moves. Otherwise each LID gets the projection of the update onto it and a score, and
the lowest score wins (ties: smaller distance, then earlier LID):

* `closest`: the Euclidean distance d(θ, T) = ||θ - P_T(θ)||_2.
* `size-weighted`: d(θ, T) / s(T), with the size s(T) the *half-diagonal* of the box,
  s(T) = ||upper - lower||_2 / 2, the distance from the box's centre to a corner. Both are in
  parameter units, so the score is unit-free: the update's distance to T measured in T's own
  radius. For the same distance it prefers the larger LID, which leaves more room for the next
  update. A box of zero size scores +inf (it is chosen only if every score is +inf).
  For a zonotope T = {c + diag(r) δ + Gᵀε : δ, ε ∈ [-1, 1]} the size is its root-mean-square
  vertex radius s(T) = sqrt(||r||_2^2 + Σ_k ||G_k||_2^2), the RMS distance from the centre to
  the points with every coefficient ±1 (the cross terms vanish on average). With k = 0 every
  vertex lies at ||r||_2, so this is the half-diagonal and boxes and zonotopes compare in the
  same units; like `Zonotope.size("isotropic_width")`, a generator counts by its Euclidean
  length, not by the hull it spans.
* `loss`: the mean cross-entropy of the projected network on a data batch, in float64
  (a NaN loss counts as +inf).

Confidence: each LID's certificate holds with probability >= 1 - β_i over its own
certification sample. When the choice may depend on those samples (the loss batch overlaps
them), the chosen LID's statement holds with probability >= 1 - Σ_i β_i (union bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.errors import DataError
from verifier.graph import Graph
from verifier.update.projection import Projection

Rule = Literal["closest", "size-weighted", "loss"]
RULES: tuple[str, ...] = get_args(Rule)


def half_diagonal(box: Box | Zonotope) -> float:
    """The size used by the size-weighted rule, in float64: ||upper - lower||_2 / 2 for a box;
    for a zonotope sqrt(||(upper - lower) / 2||_2^2 + Σ_k ||G_k||_2^2), its RMS vertex radius
    (the half-diagonal when k = 0; see the module docstring)."""
    if isinstance(box, Zonotope):
        total = 0.0
        for name, lo in box.lower.items():
            half = (box.upper[name].to(torch.float64) - lo.to(torch.float64)) / 2
            total += float((half**2).sum())
            total += float((box.generators[name].to(torch.float64) ** 2).sum())
        return math.sqrt(total)
    total = sum(float((w.to(torch.float64) ** 2).sum()) for w in box.widths().values())
    return 0.5 * math.sqrt(total)


def cross_entropy(
    graph: Graph, theta: Mapping[str, Tensor], x: Tensor, y: Tensor, *, batch: int = 1024
) -> float:
    """Mean cross-entropy of the network with parameters theta on (x, y), computed in float64.

    Args:
        graph: the network.
        theta: parameter values replacing the graph's own (any subset), keyed by name.
        x: inputs, shape (n, *graph.input_shape).
        y: labels, shape (n,).
        batch: samples per forward pass.

    Returns:
        The mean loss (NaN for an empty batch).
    """
    if x.shape[0] == 0:
        return math.nan
    params = {n: t.to(torch.float64) for n, t in theta.items()}
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            logits = graph.forward(x[i : i + batch].to(torch.float64), params)
            total += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
    return total / x.shape[0]


@dataclass(frozen=True)
class CandidateScore:
    """One LID's standing for an update.

    Attributes:
        index: position of the LID in the order given.
        inside: the update already lies in this LID.
        distance: Euclidean distance from the update to its projection.
        size: the LID's half-diagonal (`half_diagonal`).
        score: the value the rule minimises.
        loss: cross-entropy after projection (loss rule only).
    """

    index: int
    inside: bool
    distance: float
    size: float
    score: float
    loss: float | None = None


@dataclass(frozen=True)
class Selection:
    """The chosen LID and every candidate's score.

    Attributes:
        index: position of the chosen LID.
        kept: True when the update lay in that LID and was kept unchanged.
        rule: the rule used when nothing was kept.
        candidates: one score per LID, in the order given.
    """

    index: int
    kept: bool
    rule: Rule
    candidates: tuple[CandidateScore, ...]


def select_lid(
    projections: Sequence[Projection],
    boxes: Sequence[Box | Zonotope],
    rule: Rule,
    *,
    losses: Sequence[float] | None = None,
) -> Selection:
    """Keep the update if it lies in a LID, else choose the LID by `rule` (see module doc).

    Args:
        projections: the update projected onto each LID.
        boxes: the LIDs (boxes or zonotopes), same order.
        rule: "closest", "size-weighted" or "loss".
        losses: cross-entropy of each projected network; required for the loss rule.

    Returns:
        The selection.

    Raises:
        ValueError: no candidates, or sequences of different lengths.
        DataError: the loss rule without losses.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    if not projections or len(projections) != len(boxes):
        raise ValueError("need one box per projection, at least one")
    if rule == "loss" and (losses is None or len(losses) != len(projections)):
        raise DataError("the loss rule needs one loss per LID: give a data batch")
    scores = []
    for i, (proj, box) in enumerate(zip(projections, boxes, strict=True)):
        distance, size = proj.distance, half_diagonal(box)
        loss = None if losses is None else float(losses[i])
        if rule == "closest":
            score = distance
        elif rule == "size-weighted":
            score = distance / size if size > 0 else (0.0 if distance == 0 else math.inf)
        else:
            score = math.inf if loss is None or math.isnan(loss) else loss
        scores.append(CandidateScore(i, proj.inside, distance, size, score, loss))
    inside = [c.index for c in scores if c.inside]
    if inside:
        return Selection(inside[0], True, rule, tuple(scores))
    best = min(scores, key=lambda c: (c.score, c.distance, c.index))
    return Selection(best.index, False, rule, tuple(scores))
