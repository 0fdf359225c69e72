"""Hard certification of samples over a box and the finite-sample accuracy certificate.

A sample (x, y) is *certified* for a box T when float64 bounds prove z_y - z_j > 0 for every
j != y and every θ in T, with each margin bound exceeding its rounding allowance
(`verifier.bounds.ibp`). Certification of a sample does not depend on θ, so on n held-out
samples drawn i.i.d. from the data distribution P and never used to build T, the count k of
certified samples is Binomial(n, p) with p <= acc_P(θ') for every θ' in T. A one-sided
Clopper-Pearson bound L(k, n, β) therefore gives: with probability >= 1 - β over the draw of
the sample, every θ' in T has acc_P(θ') >= L.

Balanced accuracy: per-class bounds at confidence 1 - β/C each (union bound over the C
classes), averaged; with probability >= 1 - β all hold at once, so the mean bounds the
balanced accuracy of every θ' in T.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Protocol

import torch
from scipy import stats
from torch import Tensor

from verifier.bounds.bab import BabOptions, bab_margin_bounds
from verifier.bounds.ibp import margin_bounds
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.margins import MarginBounds, combine_margin_bounds
from verifier.bounds.memory import PassPlan, bound_pass_cost, current_memory_budget, plan_pass
from verifier.bounds.zonotope import zonotope_margin_bounds
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.graph import Graph

BoundKind = Literal["clopper-pearson", "hoeffding"]
Metric = Literal["accuracy", "balanced_accuracy"]
CertMethod = Literal["ibp", "midrad", "linear", "crown-ibp", "best", "bab"]


def clopper_pearson_lower(k: int, n: int, beta: float) -> float:
    """One-sided (1 - beta) Clopper-Pearson lower bound on a binomial proportion.

    Equals scipy.stats.beta.ppf(beta, k, n - k + 1); 0 when k = 0.
    """
    if n <= 0 or k <= 0:
        return 0.0
    return float(stats.beta.ppf(beta, k, n - k + 1))


def hoeffding_lower(k: int, n: int, beta: float) -> float:
    """One-sided Hoeffding lower bound k/n - sqrt(ln(1/beta) / 2n), floored at 0."""
    if n <= 0:
        return 0.0
    return max(0.0, k / n - math.sqrt(math.log(1.0 / beta) / (2 * n)))


def proportion_lower(k: int, n: int, beta: float, kind: BoundKind) -> float:
    """The lower confidence bound of the chosen kind."""
    if kind == "clopper-pearson":
        return clopper_pearson_lower(k, n, beta)
    return hoeffding_lower(k, n, beta)


def required_rate(target: float, n: int, beta: float, kind: BoundKind) -> float:
    """The smallest empirical rate k/n whose lower bound on n samples still reaches `target`.

    Returns 1.0 (or more, i.e. unreachable) when even k = n falls short. Bisection on k (the
    bound grows with k), so large n costs O(log n) bound evaluations.
    """
    low, high = max(math.ceil(target * n), 0), n
    if n <= 0 or proportion_lower(high, n, beta, kind) < target:
        return 1.0 + 1.0 / max(n, 1)
    while low < high:  # invariant: k = high reaches the target
        mid = (low + high) // 2
        if proportion_lower(mid, n, beta, kind) >= target:
            high = mid
        else:
            low = mid + 1
    return high / n


@dataclass(frozen=True)
class ClassCount:
    """Certified count for one class."""

    label: int
    n: int
    k: int
    lower_bound: float


@dataclass(frozen=True)
class TaskCertificate:
    """The finite-sample certificate of one constraint on held-out data."""

    task: str
    metric: Metric
    target: float
    n: int
    k: int
    beta: float
    bound_kind: BoundKind
    lower_bound: float
    holds: bool
    method: str
    n_nonfinite: int
    per_class: list[ClassCount] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """A JSON-able dict."""
        return asdict(self)


class SampleCertifier(Protocol):
    """A backend that runs `certify_samples` elsewhere (issue 22: `verifier.distributed` runs
    its chunks as Ray tasks); it must return the same mask and count, bit for bit."""

    def __call__(
        self,
        graph: Graph,
        box: Box | Zonotope,
        x: Tensor,
        y: Tensor,
        *,
        method: CertMethod,
        chunk_size: int,
        on_chunk: Callable[[int], None] | None,
    ) -> tuple[Tensor, int]: ...


_BACKEND: ContextVar[SampleCertifier | None] = ContextVar("certify_backend", default=None)


@contextmanager
def certification_backend(backend: SampleCertifier | None) -> Iterator[None]:
    """Run every `certify_samples` call made in this context through `backend` (None: in this
    process). Set by the edge (CLI, benchmarks) so that the search's checkpoint proofs and the
    held-out certificate fan out without a backend argument threaded through every layer."""
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def certify_samples(
    graph: Graph,
    box: Box | Zonotope,
    x: Tensor,
    y: Tensor,
    *,
    method: CertMethod = "ibp",
    chunk_size: int = 256,
    on_chunk: Callable[[int], None] | None = None,
    bab: BabOptions | None = None,
) -> tuple[Tensor, int]:
    """Prove, in float64, which samples every network in the box classifies correctly.

    Args:
        graph: the network.
        box: the region of parameters: a Box, or a Zonotope (then the zonotope bounds of
            `verifier.bounds.zonotope`, which include "ibp" over its interval hull; "linear"
            and "best" add linear bounds over the hull, "crown-ibp" auto_LiRPA over it, both
            sound supersets, and "midrad" is dominated by "ibp" there).
        x: inputs, shape (n, *input_shape).
        y: labels, shape (n,).
        method: "ibp" (exact intervals), "midrad", "linear" (back-substitution over the box,
            `verifier.bounds.linear`), "crown-ibp" (auto_LiRPA, Linear boxes only) or "best"
            (per sample and class the tighter of "ibp" and "linear"; both carry a derived
            float64 rounding allowance) or "bab" ("best", then branch and bound,
            `verifier.bounds.bab`, on the margins it leaves unproved; chains of Linear and
            ReLU only; runs in this process whatever the backend).
        chunk_size: most samples per bound pass; fewer where a memory budget is set
            (`verifier.bounds.memory`), and margin rows in groups where one sample's rows do
            not fit. The mask and count are the same whatever the chunking.
        on_chunk: called with the number of samples done after each chunk.
        bab: branch-and-bound budget for method "bab" (default `BabOptions()`).

    Returns:
        (certified mask of shape (n,), number of samples whose bounds were NaN or Inf).

    Raises:
        MemoryBudgetError: the memory budget is below one sample's bound pass.
    """
    plan = proof_plan(graph, box, method, chunk_size)
    chunk_size = plan.samples
    backend = _BACKEND.get()
    if (
        backend is not None and method != "bab"
    ):  # issue 22: e.g. Ray tasks; the backend's own calls run here
        with certification_backend(None):
            return backend(
                graph, box, x, y, method=method, chunk_size=chunk_size, on_chunk=on_chunk
            )
    device = x.device
    box64 = box.to(torch.float64, device)
    masks, nonfinite = [], 0
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk_size):
            xb = x[start : start + chunk_size].to(torch.float64)
            yb = y[start : start + chunk_size].to(device)
            ok = torch.zeros(xb.shape[0], dtype=torch.bool, device=device)
            if isinstance(box64, Zonotope):
                proofs = _zonotope_proofs(graph, box64, xb, yb, method, plan.rows, bab)
            else:
                proofs = _proofs(graph, box64, xb, yb, method, plan.rows, bab)
            for bounds in proofs:
                ok |= bounds.certified()
            first = proofs[0].lower
            nonfinite += int((torch.isnan(first) | torch.isneginf(first)).any(dim=1).sum())
            masks.append(ok)
            if on_chunk is not None:
                on_chunk(int(xb.shape[0]))
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool), nonfinite


def proof_plan(
    graph: Graph, domain: Box | Zonotope, method: CertMethod, chunk_size: int
) -> PassPlan:
    """Samples per float64 proof pass (at most chunk_size) and margin rows per group that fit
    the current memory budget (`verifier.bounds.memory`; no budget: chunk_size, all rows)."""
    budget = current_memory_budget()
    if budget is None:
        return PassPlan(chunk_size)
    if isinstance(domain, Zonotope):
        k = next(iter(domain.generators.values())).shape[0] if domain.generators else 0
        cost = bound_pass_cost(graph, "zonotope", generators=k)
        if method != "ibp":
            hull_method = "linear" if method == "best" or method == "bab" else method
            hull = bound_pass_cost(graph, hull_method)
            cost = replace(cost, per_row=max(cost.per_row, hull.per_row))
    else:
        cost = bound_pass_cost(graph, "best" if method == "bab" else method)
    return plan_pass(cost, budget, samples=chunk_size)


def _proofs(
    graph: Graph,
    box: Box,
    x: Tensor,
    y: Tensor,
    method: CertMethod,
    max_rows: int | None = None,
    bab: BabOptions | None = None,
) -> list[MarginBounds]:
    out = []
    if method in ("ibp", "best", "bab"):
        out.append(margin_bounds(graph, box.lower, box.upper, x, y, track_rounding=True))
    if method == "midrad":
        out.append(
            margin_bounds(graph, box.lower, box.upper, x, y, rule="midrad", track_rounding=True)
        )
    if method in ("linear", "best", "bab"):
        linear = linear_margin_bounds(
            graph, box.lower, box.upper, x, y, track_rounding=True, max_rows=max_rows
        )
        out = [combine_margin_bounds(out[0], linear)] if method != "linear" else [linear]
    if method == "bab":  # branch and bound where intervals and linear bounds fall short
        out = [
            bab_margin_bounds(
                graph, box.lower, box.upper, x, y, track_rounding=True, options=bab, base=out[0]
            )
        ]
    if method == "crown-ibp":
        from verifier.bounds.lirpa import lirpa_margin_bounds

        ibp = margin_bounds(graph, box.lower, box.upper, x, y, track_rounding=True)
        lower = lirpa_margin_bounds(graph, box.lower, box.upper, x, y, method="crown-ibp")
        # auto_LiRPA tracks no rounding: allow 1000x the interval pass's float64 error bound,
        # whose magnitudes dominate CROWN's (same weights, same activations), plus 1e-9.
        assert ibp.rounding is not None
        out = [MarginBounds(lower, 1000.0 * ibp.rounding + 1e-9)]
    return out


def _zonotope_proofs(
    graph: Graph,
    zonotope: Zonotope,
    x: Tensor,
    y: Tensor,
    method: CertMethod,
    max_rows: int | None = None,
    bab: BabOptions | None = None,
) -> list[MarginBounds]:
    out = [
        zonotope_margin_bounds(
            graph, zonotope.lower, zonotope.upper, zonotope.generators, x, y, track_rounding=True
        )
    ]
    if method in ("linear", "crown-ibp", "best", "bab"):
        # the interval hull is a superset of the zonotope: a proof there holds for it too
        hull_method: CertMethod = "linear" if method == "best" else method
        out.extend(_proofs(graph, zonotope.interval_hull(), x, y, hull_method, max_rows, bab))
    return out


def certify_task(
    certified: Tensor,
    y: Tensor,
    *,
    task: str,
    metric: Metric,
    target: float,
    beta: float,
    bound_kind: BoundKind,
    method: str,
    n_nonfinite: int = 0,
) -> TaskCertificate:
    """Turn a certified mask on held-out samples into a finite-sample certificate.

    Args:
        certified: boolean mask, shape (n,), from `certify_samples` on held-out data.
        y: the labels of those samples.
        task: task name.
        metric: "accuracy" or "balanced_accuracy" (per-class bounds at β/C, averaged).
        target: τ.
        beta: 1 - confidence.
        bound_kind: Clopper-Pearson or Hoeffding.
        method: bound method used (recorded).
        n_nonfinite: samples whose bounds were not finite (recorded; they are not certified).

    Returns:
        The certificate; `holds` is lower_bound >= target.
    """
    labels = sorted({int(v) for v in y.tolist()})
    class_n = {label: int((y == label).sum()) for label in labels}
    class_k = {label: int(certified[y == label].sum()) for label in labels}
    return certificate_from_counts(
        class_n,
        class_k,
        task=task,
        metric=metric,
        target=target,
        beta=beta,
        bound_kind=bound_kind,
        method=method,
        n_nonfinite=n_nonfinite,
    )


def certificate_from_counts(
    class_n: Mapping[int, int],
    class_k: Mapping[int, int],
    *,
    task: str,
    metric: Metric,
    target: float,
    beta: float,
    bound_kind: BoundKind,
    method: str,
    n_nonfinite: int = 0,
) -> TaskCertificate:
    """`certify_task` from per-class counts (n_c, k_c) instead of a mask and labels: the
    same numbers, since it uses nothing else (streaming certification keeps only counts)."""
    n, k = sum(class_n.values()), sum(class_k.values())
    labels = sorted(class_n)
    class_beta = beta / max(len(labels), 1)
    per_class = []
    for c in labels:
        lower = proportion_lower(class_k[c], class_n[c], class_beta, bound_kind)
        per_class.append(ClassCount(c, class_n[c], class_k[c], lower))
    if metric == "accuracy":
        lower = proportion_lower(k, n, beta, bound_kind)
    else:
        lower = sum(c.lower_bound for c in per_class) / max(len(per_class), 1)
    return TaskCertificate(
        task=task,
        metric=metric,
        target=target,
        n=n,
        k=k,
        beta=beta,
        bound_kind=bound_kind,
        lower_bound=lower,
        holds=lower >= target,
        method=method,
        n_nonfinite=n_nonfinite,
        per_class=per_class,
    )


def empirical_metric(correct: Tensor, y: Tensor, metric: Metric) -> float:
    """Accuracy or balanced accuracy of a boolean per-sample mask."""
    if correct.numel() == 0:
        return 0.0
    if metric == "accuracy":
        return float(correct.to(torch.float64).mean())
    rates = [float(correct[y == c].to(torch.float64).mean()) for c in torch.unique(y).tolist()]
    return sum(rates) / len(rates)
