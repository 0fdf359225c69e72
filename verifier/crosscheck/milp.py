"""The reduced worst-margin problem as a mixed-integer linear program (scipy / HiGHS).

Variables are the hidden activations h_1, ..., h_{K-1} of the reduction in
`verifier.crosscheck.exact`, plus one binary per ReLU that must be encoded exactly:

* h_1 ranges over its exact box [relu(ul), relu(uu)] (variable bounds, no constraint);
* a middle layer k (2 <= k <= K-2) keeps both sides of (Rk): the lower side
  h >= relu(Wl h' + bl), i.e. h >= 0 and h >= Wl h' + bl, is convex; the upper side
  h <= relu(b), b = Wu h' + bu, is h <= b when b >= 0 over the domain, h = 0 when b <= 0, and
  otherwise (an *unstable* unit) the big-M pair h <= b - B_lo (1 - delta), h <= B_hi delta with
  interval bounds B_lo <= b <= B_hi padded outwards (`exact.BOUND_PAD`);
* the last hidden layer h_{K-1} keeps only the side its objective coefficient dl_r pushes
  against (dl_r > 0: the convex lower side, no binary; dl_r < 0: the upper side, a binary only
  if unstable; dl_r = 0: nothing). This pruning is exact: from any point of the pruned program,
  setting h_{K-1,r} to relu(Wl h + bl) (dl_r > 0) or relu(Wu h + bu) (dl_r < 0) gives a point
  of the full one with no larger objective, as relu(Wl h + bl) <= relu(Wu h + bu) for h >= 0.
  With two hidden layers this is the one-hidden-layer ReLU network over an input box of the
  corollary in `verifier.crosscheck.exact`, with binaries only for its unstable concave units.

HiGHS solves it by branch and bound (relative gap 1e-9) within the time limit; on a timeout the
result carries HiGHS's dual bound and the best solution found. Every solution is turned into
witness weights inside the box whose margin is recomputed by a plain forward pass.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from verifier.crosscheck.problem import ExactMargin, ReducedProblem, margin_tolerance, witness

_log = logging.getLogger(__name__)

MIP_REL_GAP = 1e-9


@dataclass
class _Program:
    """A MILP under construction: min c.z, row_lower <= A z <= row_upper, bounds, integrality."""

    cost: list[float] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    integer: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    row_lower: list[float] = field(default_factory=list)
    row_upper: list[float] = field(default_factory=list)

    def variables(self, lower: np.ndarray, upper: np.ndarray, *, integer: bool = False) -> int:
        """Add len(lower) variables; returns the index of the first."""
        first = len(self.cost)
        n = len(lower)
        self.cost.extend([0.0] * n)
        self.lower.extend(float(v) for v in lower)
        self.upper.extend(float(v) for v in upper)
        self.integer.extend([1 if integer else 0] * n)
        return first

    def row(self, terms: list[tuple[np.ndarray, np.ndarray]], lower: float, upper: float) -> None:
        """Add lower <= sum(coefficients . z[columns]) <= upper; terms: (columns, coefficients)."""
        index = len(self.row_lower)
        for columns, coefficients in terms:
            keep = coefficients != 0.0
            self.rows.extend([index] * int(keep.sum()))
            self.cols.extend(int(c) for c in columns[keep])
            self.values.extend(float(v) for v in coefficients[keep])
        self.row_lower.append(lower)
        self.row_upper.append(upper)


def _build(problem: ReducedProblem) -> tuple[_Program, list[int], int]:
    """The program, the first variable index of each hidden layer, and the binary count."""
    chain, bounds = problem.chain, problem.bounds
    depth = chain.depth
    program = _Program()
    starts: list[int] = []
    n_binaries = 0
    coefficient = problem.coefficient.numpy()
    for k in range(depth - 1):
        layer = chain.layers[k]
        lower = bounds.hidden_lower[k].numpy().copy()
        upper = bounds.hidden_upper[k].numpy().copy()
        last = k == depth - 2
        if last:
            unused = coefficient == 0.0
            lower[unused], upper[unused] = 0.0, 0.0
        start = program.variables(lower, upper)
        starts.append(start)
        if last:
            for r, c in enumerate(coefficient):
                program.cost[start + r] = float(c)
        if k == 0:
            continue
        prev = np.arange(starts[k - 1], starts[k - 1] + layer.n_in)
        wl, wu = layer.weight_lower.numpy(), layer.weight_upper.numpy()
        bl, bu = layer.bias_lower.numpy(), layer.bias_upper.numpy()
        b_lo, b_hi = bounds.side_lower[k - 1].numpy(), bounds.side_upper[k - 1].numpy()
        one = np.ones(1)
        for r in range(layer.n_out):
            me = np.array([start + r])
            need_low = not last or coefficient[r] > 0
            need_up = not last or coefficient[r] < 0
            if need_low:  # h_r - Wl[r] h' >= bl_r
                program.row([(me, one), (prev, -wl[r])], float(bl[r]), math.inf)
            if not need_up:
                continue
            if b_hi[r] <= 0.0:  # upper side dead: h_r = 0
                program.upper[start + r] = 0.0
            elif b_lo[r] >= 0.0:  # upper side active: h_r <= Wu[r] h' + bu_r
                program.row([(me, one), (prev, -wu[r])], -math.inf, float(bu[r]))
            else:  # unstable: h_r <= max(0, Wu[r] h' + bu_r) with one binary
                delta = np.array([program.variables(np.zeros(1), np.ones(1), integer=True)])
                n_binaries += 1
                program.row(
                    [(me, one), (prev, -wu[r]), (delta, np.array([-b_lo[r]]))],
                    -math.inf,
                    float(bu[r] - b_lo[r]),
                )
                program.row([(me, one), (delta, np.array([-b_hi[r]]))], -math.inf, 0.0)
    return program, starts, n_binaries


def solve_reduced(problem: ReducedProblem, *, timeout_s: float = 60.0) -> ExactMargin:
    """Minimise the margin of a reduced problem (K >= 2) exactly by MILP.

    Args:
        problem: the reduced problem for one input and class pair.
        timeout_s: HiGHS time limit, seconds.

    Returns:
        "optimal" with the minimum attained by witness weights (`margin` is the witness's
        forward margin; `objective` HiGHS's optimum), or "timeout" with HiGHS's dual bound as
        `lower` and the best solution's margin as `incumbent` (when one was found), or
        "skipped" when HiGHS fails.

    Raises:
        ValueError: the chain has no hidden layer (use the closed form).
    """
    started = time.perf_counter()
    chain = problem.chain
    if chain.depth < 2:
        raise ValueError("a linear head has a closed form; the MILP needs a hidden layer")
    program, starts, n_binaries = _build(problem)
    n_vars = len(program.cost)
    matrix = coo_array(
        (program.values, (program.rows, program.cols)), shape=(len(program.row_lower), n_vars)
    )
    constraints = (
        [LinearConstraint(matrix.tocsr(), program.row_lower, program.row_upper)]
        if program.row_lower
        else []
    )
    result = milp(
        np.asarray(program.cost),
        integrality=np.asarray(program.integer),
        bounds=Bounds(np.asarray(program.lower), np.asarray(program.upper)),
        constraints=constraints,
        options={
            "time_limit": max(float(timeout_s), 1e-3),
            "mip_rel_gap": MIP_REL_GAP,
            "disp": False,
        },
    )
    x = getattr(result, "x", None)
    targets = None
    theta = None
    attained = None
    if x is not None:
        targets = [
            _vector(x[starts[k] : starts[k] + chain.layers[k].n_out])
            for k in range(chain.depth - 2)
        ]
        theta = witness(problem, targets)
        attained = chain.margin(theta, problem.label, problem.other)
    seconds = time.perf_counter() - started
    dual = getattr(result, "mip_dual_bound", None)
    lower = None if dual is None or not math.isfinite(dual) else float(dual) + problem.offset
    if result.status == 0 and attained is not None:
        objective = float(result.fun) + problem.offset
        if abs(attained - objective) > margin_tolerance(objective):
            _log.warning(
                "MILP optimum %.9g but its witness attains %.9g (class pair %d/%d)",
                objective,
                attained,
                problem.label,
                problem.other,
            )
        return ExactMargin(
            "optimal",
            "milp",
            margin=attained,
            objective=objective,
            lower=lower,
            theta=theta,
            seconds=seconds,
            n_binaries=n_binaries,
        )
    if result.status == 1:
        return ExactMargin(
            "timeout",
            "milp",
            lower=lower,
            incumbent=attained,
            theta=theta,
            seconds=seconds,
            n_binaries=n_binaries,
            reason=f"HiGHS stopped after {seconds:.1f} s: {result.message}",
        )
    return ExactMargin(
        "skipped",
        "milp",
        seconds=seconds,
        n_binaries=n_binaries,
        reason=f"HiGHS failed: {result.message}",
    )


def _vector(values: np.ndarray) -> torch.Tensor:
    """A float64 torch vector from a numpy slice (copied)."""
    return torch.from_numpy(np.array(values, dtype=np.float64))
