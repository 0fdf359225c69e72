"""The job behind `verifier crosscheck`: bounds, exact margins and falsifiers side by side.

For every checked sample and every class j != y: the bound engine's margin lower bounds (our
float64 IBP with its rounding allowance, our linear bounds, auto_LiRPA CROWN-IBP when every
boxed parameter belongs to a Linear op, and branch and bound when `CrosscheckConfig.bab` is
set), the exact worst-case margin (`verifier.crosscheck.exact`), and the smallest margin that
concrete weights inside the box attain (`verifier.crosscheck.falsify`, plus the exact solver's
witness or best solution).

**Soundness violations.** A bound b with rounding allowance r claims margin >= b - r for every
weight vector in the box (in exact arithmetic). A margin m attained by concrete weights is
computed by a float64 forward pass, whose error is at most the IBP allowance r_ibp of that
margin (the same products, with magnitudes bounded by the box's). So b - r - r_ibp > m proves
the bound unsound; that is what is flagged (the tolerance r_ibp only ever avoids false alarms
from rounding). A certified sample whose class a falsifier flips (m < -r_ibp) is the
loudest case of it.

Bounds are computed for all samples at once in the calling process; the per-sample work
(falsifiers and exact solves) runs over `jobs` worker processes (spawned, so it is safe on
every platform and with threads in the parent), each with one torch thread.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from verifier.bounds.bab import BabOptions, bab_margin_bounds
from verifier.bounds.ibp import margin_bounds
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.margins import MarginBounds
from verifier.crosscheck.chain import relu_chain
from verifier.crosscheck.exact import exact_margins
from verifier.crosscheck.falsify import FalsifierConfig, falsify_sample
from verifier.crosscheck.problem import ExactChoice, ExactMargin, margin_tolerance
from verifier.crosscheck.results import (
    MarginCheck,
    SampleCheck,
    describe_violation,
    gap_stats,
)
from verifier.domains.box import Box
from verifier.errors import BackendError, DataError, SoundnessError
from verifier.graph import Graph, Linear

CROWN_ALLOWANCE_FACTOR = 1000.0
"""CROWN-IBP's rounding allowance, as in `verifier.certify`: 1000x the IBP allowance + 1e-9
(auto_LiRPA tracks no rounding; its magnitudes are dominated by the interval pass's)."""
CROWN_ALLOWANCE_FLOOR = 1e-9

ExactOption = Literal["auto", "milp", "smt", "none"]
ProgressCallback = Callable[[int, int], None]


class SampleRunner(Protocol):
    """Runs the per-sample work elsewhere (issue 22: Ray tasks, `verifier.distributed`):
    `[function(*shared, item) for item in items]` in item order, calling `on_result(index,
    result)` as each completes."""

    def __call__(
        self,
        function: Callable[..., Any],
        shared: tuple[Any, ...],
        items: Sequence[Any],
        *,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]: ...


@dataclass(frozen=True)
class CrosscheckConfig:
    """Options of a cross-check run.

    Attributes:
        exact: "auto" (closed form up to one hidden layer, MILP beyond), "milp", "smt"
            (z3 optimisation in exact rationals) or "none".
        timeout_s: time limit of one exact solve (one sample and class), seconds.
        jobs: worker processes for the per-sample work (1: run in this process).
        seed: seed of the falsifiers' randomness (each sample gets its own stream).
        falsifier: falsifier effort.
        bab: also bound every margin by branch and bound (`verifier.bounds.bab`, chains of
            Linear and ReLU only) with these options; None: not computed.
    """

    exact: ExactOption = "auto"
    timeout_s: float = 60.0
    jobs: int = 1
    seed: int = 0
    falsifier: FalsifierConfig = field(default_factory=FalsifierConfig)
    bab: BabOptions | None = None

    def __post_init__(self) -> None:
        if self.exact not in ("auto", "milp", "smt", "none"):
            raise ValueError(f"exact must be auto, milp, smt or none; got {self.exact!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0; got {self.timeout_s}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1; got {self.jobs}")


@dataclass(frozen=True, eq=False)
class CrosscheckResult:
    """The outcome of a cross-check, sample by sample.

    Attributes:
        samples: in the order of the inputs given.
        config: the options used.
        crown_note: why CROWN-IBP was not computed (empty when it was).
        seconds: wall time of the whole run.
    """

    samples: list[SampleCheck]
    config: CrosscheckConfig
    crown_note: str
    seconds: float

    @property
    def n_violations(self) -> int:
        """Number of (sample, class) margins with a soundness violation."""
        return sum(len(s.violations) for s in self.samples)

    @property
    def sound(self) -> bool:
        """True when no bound was contradicted."""
        return self.n_violations == 0

    def check_sound(self) -> None:
        """Raise on the first soundness violation.

        Raises:
            SoundnessError: naming the sample, class, bound and attained margin.
        """
        for sample in self.samples:
            for margin in sample.violations:
                raise SoundnessError(describe_violation(sample, margin))

    def summary(self) -> dict[str, Any]:
        """Counts, gap statistics and the verdict (the `summary` of crosscheck.json)."""
        margins = [m for s in self.samples for m in s.margins]
        status = [m.exact.status for m in margins]
        crown = any(m.crown_ibp is not None for m in margins)
        bab = any(m.bab is not None for m in margins)
        return {
            "n_samples": len(self.samples),
            "n_margins": len(margins),
            "violations": self.n_violations,
            "verdict": "sound" if self.sound else "violation",
            "certified_ibp": sum(s.certified_ibp for s in self.samples),
            "certified_crown_ibp": (
                sum(bool(s.certified_crown_ibp) for s in self.samples) if crown else None
            ),
            "certified_linear": sum(s.certified_linear for s in self.samples),
            "certified_bab": (
                sum(
                    all(
                        m.bab is not None and m.bab - (m.bab_allowance or 0.0) > 0
                        for m in s.margins
                    )
                    for s in self.samples
                )
                if bab
                else None
            ),
            "gaps": {
                "ibp": gap_stats([(m.exact_value, m.ibp) for m in margins]),
                "linear": gap_stats([(m.exact_value, m.linear) for m in margins]),
                "crown_ibp": (
                    gap_stats([(m.exact_value, m.crown_ibp) for m in margins]) if crown else None
                ),
                "bab": gap_stats([(m.exact_value, m.bab) for m in margins]) if bab else None,
            },
            "gaps_to_falsified": {
                "ibp": gap_stats([(m.falsified, m.ibp) for m in margins]),
                "linear": gap_stats([(m.falsified, m.linear) for m in margins]),
                "crown_ibp": (
                    gap_stats([(m.falsified, m.crown_ibp) for m in margins]) if crown else None
                ),
                "bab": gap_stats([(m.falsified, m.bab) for m in margins]) if bab else None,
            },
            "exact": {
                "solved": status.count("optimal"),
                "timeout": status.count("timeout"),
                "skipped": status.count("skipped"),
            },
            "exact_inconsistent": sum(
                m.exact_value is not None
                and m.exact_value > m.falsified + margin_tolerance(m.falsified)
                for m in margins
            ),
            "time_s": self.seconds,
        }


# ------------------------------------------------------------------ per-sample work


@dataclass(frozen=True, eq=False)
class _Task:
    position: int
    index: int
    x: Tensor
    label: int
    claims: dict[int, float]  # class -> margins below this contradict some bound


@dataclass(frozen=True, eq=False)
class _Outcome:
    position: int
    falsified: Tensor
    sources: list[str]
    exact: dict[int, ExactMargin]
    witnesses: dict[int, dict[str, Tensor]]
    seconds: float


_worker_state: tuple[Graph, Box, CrosscheckConfig] | None = None


def _init_worker(graph: Graph, box: Box, config: CrosscheckConfig) -> None:
    """Worker process start: keep the network and box, and use one torch thread."""
    global _worker_state
    torch.set_num_threads(1)  # this process's own setting: workers share the machine's cores
    _worker_state = (graph, box, config)


def _run_worker_task(task: _Task) -> _Outcome:
    assert _worker_state is not None, "worker not initialised"
    return _check_sample(*_worker_state, task)


def _skipped(reason: str) -> ExactMargin:
    return ExactMargin("skipped", "closed-form", reason=reason)


def _check_sample(graph: Graph, box: Box, config: CrosscheckConfig, task: _Task) -> _Outcome:
    """Falsifiers and exact solves for one sample; keeps witnesses only for violations."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + task.index) % 2**63)
    found = falsify_sample(
        graph, box, task.x, task.label, config=config.falsifier, generator=generator
    )
    others = [j for j in range(graph.n_classes) if j != task.label]
    exact: dict[int, ExactMargin]
    if config.exact == "none":
        exact = {j: _skipped("not requested (--exact none)") for j in others}
    else:
        choice: ExactChoice = config.exact
        try:
            chain = relu_chain(graph, box, task.x)
            exact = exact_margins(chain, task.label, method=choice, timeout_s=config.timeout_s)
        except BackendError as err:
            exact = {j: _skipped(str(err)) for j in others}
    witnesses: dict[int, dict[str, Tensor]] = {}
    for j in others:
        claim = task.claims.get(j, math.inf)
        result = exact[j]
        best, theta = float(found.margins[j]), found.witnesses.get(j)
        for value in (result.margin, result.incumbent):
            if value is not None and value < best and result.theta is not None:
                best, theta = value, dict(result.theta)
        if best < claim and theta is not None:
            witnesses[j] = theta
        exact[j] = replace(result, theta=None)  # witnesses are large: send back only evidence
    return _Outcome(
        task.position,
        found.margins,
        found.sources,
        exact,
        witnesses,
        time.perf_counter() - started,
    )


# ------------------------------------------------------------------ bounds


def _linear_only(graph: Graph, box: Box) -> bool:
    linear_params = {
        name
        for op in graph.ops
        if isinstance(op, Linear)
        for name in (op.weight, op.bias)
        if name is not None
    }
    return set(box.names) <= linear_params


def linear_bounds(graph: Graph, box: Box, x: Tensor, y: Tensor) -> MarginBounds:
    """Our linear bounds in float64 proof mode (`verifier.bounds.linear`)."""
    box64 = box.to(torch.float64)
    with torch.no_grad():
        return linear_margin_bounds(
            graph, box64.lower, box64.upper, x.to(torch.float64), y, track_rounding=True
        )


def _bounds(
    graph: Graph, box: Box, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, str]:
    """IBP bounds and allowances, CROWN-IBP bounds and allowances (or None and a note)."""
    box64 = box.to(torch.float64)
    x64 = x.to(torch.float64)
    with torch.no_grad():
        ibp = margin_bounds(graph, box64.lower, box64.upper, x64, y, track_rounding=True)
    assert ibp.rounding is not None
    if not _linear_only(graph, box):
        return ibp.lower, ibp.rounding, None, None, "a boxed parameter is not a Linear one"
    try:
        from verifier.bounds.lirpa import lirpa_margin_bounds

        crown = lirpa_margin_bounds(
            graph, box64.lower, box64.upper, x64, y, method="crown-ibp", dtype=torch.float64
        )
    except BackendError as err:
        return ibp.lower, ibp.rounding, None, None, str(err)
    allowance = CROWN_ALLOWANCE_FACTOR * ibp.rounding + CROWN_ALLOWANCE_FLOOR
    return ibp.lower, ibp.rounding, crown, allowance, ""


def _number(value: Tensor | float) -> float:
    return float(value)


def crosscheck_samples(
    graph: Graph,
    box: Box,
    x: Tensor,
    y: Tensor,
    *,
    indices: Sequence[int] | None = None,
    config: CrosscheckConfig | None = None,
    on_progress: ProgressCallback | None = None,
    runner: SampleRunner | None = None,
) -> CrosscheckResult:
    """Cross-check the bound engine on samples: bounds vs exact margins vs falsifiers.

    Args:
        graph: the network.
        box: the weight box (the LID).
        x: inputs, shape (n, *graph.input_shape).
        y: labels, shape (n,).
        indices: data-set positions of the samples (recorded; default 0..n-1).
        config: options (default `CrosscheckConfig()`).
        on_progress: called with (samples done, total) after each sample.
        runner: where the per-sample work runs (e.g. Ray tasks); None: `config.jobs`
            processes of this machine. Results do not depend on it.

    Returns:
        The result; violations are recorded, not raised (see `CrosscheckResult.check_sound`).
    """
    started = time.perf_counter()
    config = config or CrosscheckConfig()
    n = int(x.shape[0])
    positions = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(positions) != n or y.shape != (n,):
        raise DataError(f"{n} inputs need {n} labels and indices; got {tuple(y.shape)}")
    y = y.to(torch.int64)
    ibp, ibp_r, crown, crown_r, crown_note = _bounds(graph, box, x, y)
    linear = linear_bounds(graph, box, x, y)
    assert linear.rounding is not None
    lin, lin_r = linear.lower, linear.rounding
    babs: tuple[Tensor, Tensor] | None = None
    if config.bab is not None:
        box64 = box.to(torch.float64)
        with torch.no_grad():
            found = bab_margin_bounds(
                graph,
                box64.lower,
                box64.upper,
                x.to(torch.float64),
                y,
                options=config.bab,
                track_rounding=True,
            )
        assert found.rounding is not None
        babs = (found.lower, found.rounding)
    tasks = []
    for p in range(n):
        label = int(y[p])
        claims = {}
        for j in range(graph.n_classes):
            if j == label:
                continue
            claim = _number(ibp[p, j] - 2 * ibp_r[p, j])
            if crown is not None and crown_r is not None:
                claim = max(claim, _number(crown[p, j] - crown_r[p, j] - ibp_r[p, j]))
            claim = max(claim, _number(lin[p, j] - lin_r[p, j] - ibp_r[p, j]))
            if babs is not None:
                claim = max(claim, _number(babs[0][p, j] - babs[1][p, j] - ibp_r[p, j]))
            claims[j] = claim
        tasks.append(_Task(p, positions[p], x[p : p + 1].to(torch.float64), label, claims))
    outcomes: list[_Outcome | None] = [None] * n
    done = 0
    if runner is not None and n > 1:

        def record(_index: int, outcome: _Outcome) -> None:
            nonlocal done
            outcomes[outcome.position] = outcome
            done += 1
            if on_progress is not None:
                on_progress(done, n)

        runner(_check_sample, (graph, box, config), tasks, on_result=record)
    elif config.jobs == 1 or n <= 1:
        for task in tasks:
            outcomes[task.position] = _check_sample(graph, box, config, task)
            done += 1
            if on_progress is not None:
                on_progress(done, n)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(config.jobs, n),
            mp_context=context,
            initializer=_init_worker,
            initargs=(graph, box, config),
        ) as pool:
            futures = [pool.submit(_run_worker_task, task) for task in tasks]
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.position] = outcome
                done += 1
                if on_progress is not None:
                    on_progress(done, n)
    samples = []
    for task, finished in zip(tasks, outcomes, strict=True):
        assert finished is not None
        samples.append(
            _assemble(task, finished, (ibp, ibp_r), (crown, crown_r), (lin, lin_r), babs)
        )
    return CrosscheckResult(samples, config, crown_note, time.perf_counter() - started)


def _assemble(
    task: _Task,
    outcome: _Outcome,
    ibps: tuple[Tensor, Tensor],
    crowns: tuple[Tensor | None, Tensor | None],
    linears: tuple[Tensor, Tensor],
    babs: tuple[Tensor, Tensor] | None = None,
) -> SampleCheck:
    (ibp, ibp_r), (crown, crown_r), (lin, lin_r) = ibps, crowns, linears
    p = task.position
    margins = []
    for j, result in outcome.exact.items():
        check = MarginCheck(
            other=j,
            ibp=_number(ibp[p, j]),
            ibp_allowance=_number(ibp_r[p, j]),
            crown_ibp=None if crown is None else _number(crown[p, j]),
            crown_allowance=None if crown_r is None else _number(crown_r[p, j]),
            linear=_number(lin[p, j]),
            linear_allowance=_number(lin_r[p, j]),
            exact=result,
            falsified=_number(outcome.falsified[j]),
            falsified_by=outcome.sources[j],
            bab=None if babs is None else _number(babs[0][p, j]),
            bab_allowance=None if babs is None else _number(babs[1][p, j]),
        )
        methods = []
        slack = check.ibp_allowance
        if check.ibp - check.ibp_allowance - slack > check.attained:
            methods.append("ibp")
        if check.crown_ibp is not None and check.crown_allowance is not None:
            if check.crown_ibp - check.crown_allowance - slack > check.attained:
                methods.append("crown-ibp")
        if check.linear - check.linear_allowance - slack > check.attained:
            methods.append("linear")
        if check.bab is not None and check.bab_allowance is not None:
            if check.bab - check.bab_allowance - slack > check.attained:
                methods.append("bab")
        if methods:
            check = replace(
                check, violation_methods=tuple(methods), witness=outcome.witnesses.get(j)
            )
        margins.append(check)
    margins.sort(key=lambda m: m.other)
    certified_ibp = all(m.ibp - m.ibp_allowance > 0 for m in margins)
    certified_crown = None
    if crown is not None:
        certified_crown = all(
            m.crown_ibp is not None
            and m.crown_allowance is not None
            and m.crown_ibp - m.crown_allowance > 0
            for m in margins
        )
    certified_linear = all(m.linear - m.linear_allowance > 0 for m in margins)
    return SampleCheck(
        task.index,
        task.label,
        certified_ibp,
        certified_crown,
        certified_linear,
        margins,
        outcome.seconds,
    )
