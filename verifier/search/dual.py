"""The constraints as the search sees them and the augmented Lagrangian's dual state.

Shared by the box search (`verifier.search.box`) and the zonotope search
(`verifier.search.zonotope`): the tasks with their optimisation samples, the soft surrogate of
the certified metric that drives the gradient, the hard certified metric that drives the dual
ascent, and the dual variables λ_i, penalties ρ_i and shared lr multiplier (see
`verifier.search.box` for the scheme).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.certify import CertMethod, Metric, certify_samples, empirical_metric
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.graph import Graph
from verifier.search.surrogate import guide_bounds, search_plan
from verifier.spec import SearchSection

LR_SCALE_RANGE = (1e-1, 1e2)


LR_SLOW, LR_FAST = 0.98, 1.02


@dataclass(frozen=True, eq=False)
class SearchTask:
    """One constraint as the search sees it: the target τ', the samples whose bounds drive the
    gradient (x, y) and the validation samples (x_val, y_val) that, together with them, decide
    which candidate is feasible. Both are parts of the optimisation data, never held-out data.
    """

    name: str
    metric: Metric
    target: float
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor


def proof_method(config: SearchSection) -> CertMethod:
    """The bound that proves a search's candidates: `best` (intervals and linear bounds) for a
    search driven by linear bounds, intervals otherwise."""
    return "best" if config.bound == "linear" else "ibp"


def hard_metrics(
    graph: Graph,
    domain: Box | Zonotope,
    tasks: Sequence[SearchTask],
    *,
    chunk_size: int = 512,
    proof: bool = True,
    method: CertMethod = "ibp",
) -> tuple[float, ...]:
    """Hard certified metric of each task: the smaller of its value on the gradient samples
    and on the validation samples (a candidate is feasible only if both meet τ').

    With `proof=True` (the default) every sample is proved in float64 with its rounding
    allowance. `proof=False` is a float32 guide without allowance for boxes, used only to
    steer the choice of candidates; whatever the search returns is re-checked with
    `proof=True`. Zonotopes are always proved. `method` is the bound of the proof ("ibp" or
    "best"); the guide follows it in float32.
    """
    out = []
    for task in tasks:
        values = []
        for x, y in ((task.x, task.y), (task.x_val, task.y_val)):
            if x.shape[0] == 0:
                continue
            if proof or not isinstance(domain, Box):
                mask, _ = certify_samples(graph, domain, x, y, chunk_size=chunk_size, method=method)
            else:
                mask = _guide_mask(graph, domain, x, y, chunk_size=chunk_size, method=method)
            values.append(empirical_metric(mask, y.to(mask.device), task.metric))
        out.append(min(values))
    return tuple(out)


def _guide_mask(
    graph: Graph, box: Box, x: Tensor, y: Tensor, *, chunk_size: int, method: CertMethod
) -> Tensor:
    """Float32 certified mask (no rounding allowance): a fast, unproved guide."""
    box32 = box.to(torch.float32, x.device)
    plan = search_plan(graph, samples=chunk_size, linear=method != "ibp", grad=False)
    chunk_size = plan.samples
    with torch.no_grad():
        masks = [
            guide_bounds(
                graph,
                box32.lower,
                box32.upper,
                x[i : i + chunk_size].to(torch.float32),
                y[i : i + chunk_size].to(x.device),
                linear=method != "ibp",
                max_rows=plan.rows,
            ).certified()
            for i in range(0, x.shape[0], chunk_size)
        ]
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=x.device)


def meets_targets(hard: Sequence[float], tasks: Sequence[SearchTask]) -> bool:
    """Whether every task's hard metric reaches its target τ'."""
    return all(h >= t.target for h, t in zip(hard, tasks, strict=True))


def tasks_on(tasks: Sequence[SearchTask], device: str | torch.device) -> list[SearchTask]:
    """The tasks with their samples on `device` (inputs as float32)."""
    return [
        SearchTask(
            t.name,
            t.metric,
            t.target,
            t.x.to(device, torch.float32),
            t.y.to(device),
            t.x_val.to(device, torch.float32),
            t.y_val.to(device),
        )
        for t in tasks
    ]


@dataclass
class DualState:
    """The augmented Lagrangian's dual variables λ_i, penalties ρ_i and the shared lr
    multiplier (module docstring)."""

    lam: list[float]
    rho: list[float]
    lr_scale: float = 1.0

    @classmethod
    def start(cls, n_tasks: int, config: SearchSection) -> DualState:
        return cls([0.0] * n_tasks, [config.penalty] * n_tasks)

    def lagrangian(self, tasks: Sequence[SearchTask], softs: Sequence[Tensor]) -> Tensor:
        """Σ_i λ_i g_i + (ρ_i / 2) [g_i]_+^2 with g_i = τ'_i - SoftMetric_i."""
        total = torch.zeros((), dtype=softs[0].dtype, device=softs[0].device)
        for i, (task, soft) in enumerate(zip(tasks, softs, strict=True)):
            g = task.target - soft
            total = total + self.lam[i] * g + self.rho[i] / 2 * torch.relu(g) ** 2
        return total

    def update(
        self, tasks: Sequence[SearchTask], hards: Sequence[float], config: SearchSection
    ) -> None:
        """Dual ascent on the hard violations, penalty growth, and the lr multiplier."""
        violated = False
        for i, task in enumerate(tasks):
            violation = task.target - hards[i]
            self.lam[i] = max(0.0, self.lam[i] + config.dual_lr * violation)
            if violation > 0:
                self.rho[i] *= config.penalty_growth
                violated = True
        scale = self.lr_scale * (LR_SLOW if violated else LR_FAST)
        self.lr_scale = min(max(scale, LR_SCALE_RANGE[0]), LR_SCALE_RANGE[1])
