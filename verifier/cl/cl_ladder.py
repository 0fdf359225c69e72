"""Certification ladder of the continual LID learner (`LidConfig.ladder`): when LID_t's
held-out certificate misses τ_t, a narrower box that meets it, with the selection paid for.

With scales 1 = s_1 > s_2 > ... > s_m > 0, candidate k of task t is

    θ_t + s_k (LID_t - θ_t)   (θ_t: the trained weights, projected onto LID_t),

rounded inward to float32 (projected training clamps in float32) and intersected with LID_t
and with LID_{t-1}, so every candidate lies in the nested chain. The candidates are certified
widest first on task t's held-out samples S_t; the first whose lower bound meets τ_t is kept
(if none does, the narrowest, whose certificate then says it does not hold). The kept box is
LID_t from then on: the next task trains projected onto it, and it is certified on every
earlier task as without a ladder.

Soundness (union bound over the candidates). With a ladder, every certificate of the run
(the diagonal ones and LID_t' certified on an earlier task j) is computed at beta / m.
Fix one, of LID_t' on task j <= t'. The samples S_j enter the run only through the choice
among the m candidates at task j: training, the searches and τ use other data; the choice at
another task i reads S_i alone (other samples, drawn independently of S_j), and no other
certificate feeds back into the run. So, given everything but S_j, LID_t' is one of m boxes
B_1, ..., B_m (B_k: the box the run reaches when candidate k is kept at task j; for t' = j
the candidates themselves), each fixed independently of S_j. For each B_k the Clopper-Pearson
bound at beta / m on S_j is wrong with probability at most beta / m, so with probability at
least 1 - beta none of the m is, in particular not the one of the box the run reached: each
certificate holds with probability >= 1 - beta, as each does without a ladder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from verifier.certify import TaskCertificate
from verifier.cl.heads import restrict_box
from verifier.domains.box import Box
from verifier.errors import SoundnessError
from verifier.graph import Graph
from verifier.search import inward_float32

if TYPE_CHECKING:
    from verifier.cl.lid_learner import LidStage


def checked_ladder(ladder: Sequence[float]) -> tuple[float, ...]:
    """The ladder's scales as a tuple, checked: none, or scales in (0, 1], strictly
    decreasing, the first 1.0 (the searched LID itself).

    Raises:
        ValueError: a scale outside (0, 1], a first scale other than 1.0, or scales that do
            not strictly decrease.
    """
    scales = tuple(float(s) for s in ladder)
    shown = "(" + ", ".join(f"{s:g}" for s in scales) + ")"
    outside = [s for s in scales if not 0.0 < s <= 1.0]
    if outside:
        raise ValueError(f"ladder scales must lie in (0, 1]; got {outside[0]:g} in {shown}")
    if scales and scales[0] != 1.0:
        raise ValueError(f"ladder must start at 1.0 (the searched LID); got {shown}")
    if any(narrower >= wider for wider, narrower in pairwise(scales)):
        raise ValueError(f"ladder scales must be strictly decreasing; got {shown}")
    return scales


def certificate_beta(beta: float, ladder: Sequence[float]) -> float:
    """The beta every certificate of a run is computed at: beta / m for a ladder of m scales
    (the union bound of the module docstring), beta itself without a ladder."""
    return beta / max(len(ladder), 1)


def check_nested(inner: Box, outer: Box) -> None:
    """Check that `inner` lies in `outer`, entry by entry.

    Raises:
        SoundnessError: some entry of `inner` leaves `outer` (a bug), naming the parameter.
    """
    for name, lo in inner.lower.items():
        if bool((lo < outer.lower[name].to(lo)).any()) or bool(
            (inner.upper[name] > outer.upper[name].to(lo)).any()
        ):
            raise SoundnessError(f"LID is not inside the previous LID on '{name}'")


def ladder_box(box: Box, theta: Mapping[str, Tensor], outer: Box | None, scale: float) -> Box:
    """Candidate `scale` of a LID: `box` scaled toward θ (projected onto `box`), rounded
    inward to float32 and intersected with `box` and `outer`, so a subset of both; scale 1.0
    is `box` itself.

    Args:
        box: LID_t, over every parameter of the graph (full shapes).
        theta: the trained weights θ_t, by parameter name (every name of `box`).
        outer: LID_{t-1}, or None for the first task.
        scale: the ladder's scale, in (0, 1].

    Returns:
        The candidate, corners in float64 holding float32 values; it contains θ_t projected
        onto `box` (θ_t itself when inside), so it is never empty.

    Raises:
        SoundnessError: the candidate is not inside `outer` (a bug).
    """
    if scale == 1.0:
        return box
    centre = box.project({n: theta[n].detach().to(torch.float64) for n in box.lower})
    candidate = inward_float32(box.scaled(centre, scale)).intersect(box)
    if outer is not None:
        candidate = candidate.intersect(outer)
        check_nested(candidate, outer)
    return candidate


def _searched_width(box: Box, searched: Box, graph: Graph, rows: Sequence[int]) -> float:
    """Mean width of a full-graph box on the task's rows of the searched parameters (the
    measure `LidStage.mean_width` reports for the searched box)."""
    sub = restrict_box(box, graph, rows)
    names = list(searched.lower)
    return Box({n: sub.lower[n] for n in names}, {n: sub.upper[n] for n in names}).size()


def climb_ladder(
    stage: LidStage,
    graph: Graph,
    rows: Sequence[int],
    outer: Box | None,
    ladder: Sequence[float],
    certify: Callable[[Box], TaskCertificate],
) -> LidStage:
    """The stage with the widest candidate whose held-out certificate meets τ_t as its box
    (none: the narrowest), and that certificate as its only one so far.

    Args:
        stage: what `build_lid` returned for task t (its box is the searched LID_t).
        graph: the network at θ_t (its parameters are the centre of the scaling).
        rows: task t's head rows (for the kept box's `mean_width`).
        outer: LID_{t-1}, or None for the first task.
        ladder: the scales, checked (`checked_ladder`) and not empty.
        certify: task t's held-out certificate of a box, at target τ_t and beta / m.

    Returns:
        The stage with `box`, `ladder_scale`, `ladder_bounds` (the lower bounds of the
        candidates certified, in order), `certificates` ({t: the kept candidate's}) and, when
        a narrower candidate is kept, `mean_width` (of the kept box, measured as the
        searched one's) replaced; `search_box` stays the searched box.

    Raises:
        ValueError: an empty ladder.
        SoundnessError: a candidate is not inside `outer` (a bug).
    """
    bounds: list[float] = []
    for scale in ladder:
        box = ladder_box(stage.box, graph.parameters, outer, scale)
        cert = certify(box)
        bounds.append(cert.lower_bound)
        if cert.holds or scale == ladder[-1]:
            width = (
                stage.mean_width
                if scale == 1.0
                else _searched_width(box, stage.search_box, graph, rows)
            )
            return replace(
                stage,
                box=box,
                mean_width=width,
                ladder_scale=scale,
                ladder_bounds=tuple(bounds),
                certificates={stage.task: cert},
            )
    raise ValueError("climb_ladder needs at least one scale; got an empty ladder")
