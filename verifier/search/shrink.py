"""Shrink-to-feasible: scale a LID toward θ0 until its certificate on the optimisation part meets
every target (beyond the paper, which never forces its boxes to meet τ).

Box corners are rounded inward to float32 (`inward_float32`) so that projected float32 weights
lie exactly inside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from verifier.certify import CertMethod
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.graph import Graph
from verifier.search.dual import SearchTask, hard_metrics, meets_targets
from verifier.search.float32 import inward_float32
from verifier.search.generators import ZonotopeVariables

SHRINK_STEPS = 14


SHRINK_STEPS_PROOF = 8


def _scale_box(box: Box, theta0: Mapping[str, Tensor], factor: float) -> Box:
    return inward_float32(box.scaled({n: t.double() for n, t in theta0.items()}, factor))


def shrink_to_feasible(
    graph: Graph,
    box: Box,
    theta0: Mapping[str, Tensor],
    tasks: Sequence[SearchTask],
    *,
    method: CertMethod = "ibp",
) -> tuple[Box, tuple[float, ...], float]:
    """Largest scale s in [0, 1] (bisection) such that θ0 + s (T - θ0) meets every target.

    Inclusion-isotone bounds make certification monotone in s, so bisection is valid. The
    bisection runs on the float32 guide (fast); the scale it finds is then proved in float64,
    and if the proof falls short a float64 bisection continues below it, so the returned box
    always meets the targets in float64 (or is the point box θ0 when even θ0 fails).

    Returns:
        (box, its float64 hard metrics, s).
    """

    def meets(hard: Sequence[float]) -> bool:
        return meets_targets(hard, tasks)

    def bisect(lo: float, hi: float, steps: int, proof: bool) -> float:
        for _ in range(steps):
            mid = (lo + hi) / 2
            candidate = _scale_box(box, theta0, mid)
            if meets(hard_metrics(graph, candidate, tasks, proof=proof, method=method)):
                lo = mid
            else:
                hi = mid
        return lo

    scale = 1.0
    if not meets(hard_metrics(graph, box, tasks, proof=False, method=method)):
        scale = bisect(0.0, 1.0, SHRINK_STEPS, proof=False)
    candidate = _scale_box(box, theta0, scale)
    hard = hard_metrics(graph, candidate, tasks, method=method)
    if meets(hard) or scale == 0.0:
        return candidate, hard, scale
    scale = bisect(0.0, scale, SHRINK_STEPS_PROOF, proof=True)
    candidate = _scale_box(box, theta0, scale)
    return candidate, hard_metrics(graph, candidate, tasks, method=method), scale


def shrink_zonotope_to_feasible(
    graph: Graph, variables: ZonotopeVariables, tasks: Sequence[SearchTask]
) -> tuple[Zonotope, tuple[float, ...], float]:
    """A scale s in [0, 1] (bisection) such that θ0 + s (T - θ0) meets every target.

    Returns:
        (zonotope, its hard metrics, s); s = 0 (the point θ0) when nothing else is feasible.
    """
    full = variables.zonotope(1.0)
    hard = hard_metrics(graph, full, tasks)
    if meets_targets(hard, tasks):
        return full, hard, 1.0
    lo, hi = 0.0, 1.0
    best = variables.zonotope(0.0)
    best_hard = hard_metrics(graph, best, tasks)
    for _ in range(SHRINK_STEPS):
        mid = (lo + hi) / 2
        candidate = variables.zonotope(mid)
        mid_hard = hard_metrics(graph, candidate, tasks)
        if meets_targets(mid_hard, tasks):
            lo, best, best_hard = mid, candidate, mid_hard
        else:
            hi = mid
    return best, best_hard, lo
