"""The validation fit of a recomputed replay LID (`fit_to_views`): the searched rows scaled
toward the weights until every earlier task's proved rate on its search view predicts a
held-out certificate that meets τ_j. Off by default (`ReplayConfig.fit_z`); see
`verifier.cl.replay` for the buffer protocol it serves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from verifier.certify import required_rate
from verifier.cl.head_certify import HeadInputs
from verifier.cl.heads import lift_box, restrict_box
from verifier.cl.lid_learner import certify_lid, lid_proof_method
from verifier.cl.network import ContinualNetwork, network_graph
from verifier.cl.scenarios import SplitTask
from verifier.domains.box import Box
from verifier.search import inward_float32

if TYPE_CHECKING:
    from verifier.cl.replay import RecomputedLid, ReplayConfig


def fit_to_views(
    model: ContinualNetwork,
    lid: RecomputedLid,
    views: Sequence[SplitTask],
    config: ReplayConfig,
    cache: dict[int, HeadInputs] | None = None,
) -> RecomputedLid:
    """The validation fit: scale a recomputed LID's searched rows toward the model's weights
    until, for every constraint j, its proved rate on task j's search view reaches

        a_j + fit_z * sqrt(a_j (1 - a_j) (1 / n_certify_j + 1 / n_view_j)),

    a_j the rate whose Clopper-Pearson bound on task j's n_certify_j held-out samples would
    just meet τ_j (capped at the weights' own proved rate there, so scale 0 always fits).

    Why: the search proves each τ_j on the task's *buffer*, samples of its training part that
    the network was trained on, and the widest box on a few hundred such samples overstates
    the rate on new samples (the held-out certificate then misses τ_j). The search views
    (validation part, or the test split's optimisation part) are samples no training, buffer
    or certificate uses, so checking the box there predicts the held-out rate, and the
    held-out samples are never read: every certificate keeps its β. The price: each earlier
    task's search view is kept and read at every later stage, data beyond the buffer's budget,
    and the narrower boxes leave later tasks less room (off by default). The proof is the
    certificate's (float64, `certify_lid`); the rate is monotone in the scale for interval
    proofs, and the kept scale is always one that was checked (or 0). Bisection, 8 steps.

    Returns `lid` unchanged when ``config.fit_z`` is None, ``search_data`` is "train" (the
    views would be training samples), or the searched box already fits; else the scaled LID
    (free head rows as they were), with its scale and the rates on the views.
    """
    if config.fit_z is None or config.search_data == "train":
        return lid
    graph = network_graph(model)
    m = len(lid.targets)
    n_opt = config.n_optimisation
    checks = [replace(v, x_test=v.x_train[:n_opt], y_test=v.y_train[:n_opt]) for v in views[:m]]
    read = sorted({r for v in checks for r in v.rows})
    names = list(lid.searched.lower)
    centre = restrict_box(Box(graph.parameters, graph.parameters), graph, read)
    theta = {n: centre.lower[n] for n in names}
    method = lid_proof_method(config)

    def at(scale: float) -> tuple[Box, Box]:
        sub = inward_float32(lid.searched.scaled(theta, scale))
        return sub, lift_box(sub, lid.box, graph, read).intersect(lid.box)

    def rates(box: Box) -> list[float]:
        out = []
        for j, view in enumerate(checks):
            cert = certify_lid(
                graph,
                box,
                view,
                beta=config.beta,
                target=lid.targets[j],
                cache=cache,
                method=method,
            )
            out.append(cert.k / max(cert.n, 1))
        return out

    needs = []
    for j, view in enumerate(checks):
        a = min(
            required_rate(
                lid.targets[j], int(views[j].x_test.shape[0]), config.beta, "clopper-pearson"
            ),
            1.0,
        )
        n_cert, n_view = int(views[j].x_test.shape[0]), int(view.x_test.shape[0])
        se = math.sqrt(a * (1.0 - a) * (1.0 / max(n_cert, 1) + 1.0 / max(n_view, 1)))
        needs.append(a + config.fit_z * se)
    found = rates(lid.box)
    if all(r >= need for r, need in zip(found, needs, strict=True)):
        return replace(lid, view_rates=tuple(found))
    point = rates(at(0.0)[1])
    needs = [min(need, r0) for need, r0 in zip(needs, point, strict=True)]
    low, high, kept = 0.0, 1.0, point
    for _ in range(8):
        mid = 0.5 * (low + high)
        found = rates(at(mid)[1])
        if all(r >= need for r, need in zip(found, needs, strict=True)):
            low, kept = mid, found
        else:
            high = mid
    sub, box = at(low)
    return replace(
        lid,
        box=box,
        searched=sub,
        scale=low,
        view_rates=tuple(kept),
        chosen=f"{lid.chosen}; scaled by {low:.3g} to fit the search views",
    )
