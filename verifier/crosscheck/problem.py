"""Exact worst-case margins over a weight box for one fixed input.

Notation: the boxed tail (`verifier.crosscheck.chain`) has K affine layers with effective
interval weights [Wl_k, Wu_k] and biases [bl_k, bu_k]; x is its fixed input;
v_1 = W_1 x + b_1, h_k = relu(v_k), v_k = W_k h_{k-1} + b_k (2 <= k <= K-1) and the logits are
z = W_K h_{K-1} + b_K. For a true class y and another class j the margin is m = z_y - z_j.
Write dl = Wl_K[y] - Wu_K[j], du = Wu_K[y] - Wl_K[j], cl = bl_K[y] - bu_K[j].

**Theorem (reduction).** Over the box,

* K = 1:  min m = cl + sum_k min(dl_k x_k, du_k x_k);
* K >= 2: min m = cl + min { dl . h_{K-1} : (h_1, ..., h_{K-1}) in R }, where R is given by
  (R1) relu(ul) <= h_1 <= relu(uu), [ul, uu] the exact range of v_1:
  ul_i = sum_k min(Wl_ik x_k, Wu_ik x_k) + bl_i and uu_i the same with max and bu_i;
  (Rk) relu(Wl_k h_{k-1} + bl_k) <= h_k <= relu(Wu_k h_{k-1} + bu_k), 2 <= k <= K-1.

*Proof.* (a) Independence. Each row of each layer owns a disjoint set of box coordinates, and
a box is the product of its coordinate intervals; so the minimum over the box is an iterated
minimum over the blocks (W_1, b_1), ..., (W_{K-1}, b_{K-1}) and the last layer's rows y and j
(the other rows do not enter m), taken in any order.
(b) Last layer. m = d . h + c with d = W_K[y] - W_K[j], c = b_K[y] - b_K[j]. Rows y != j are
independent, so d ranges over exactly the box [dl, du] (dl_k is attained by Wl_K[y, k] and
Wu_K[j, k]) and c over [cl, cu]. With K = 1, h = x is fixed and each term d_k x_k is smallest
at the end of [dl_k, du_k] that the sign of x_k picks. With K >= 2, h = h_{K-1} >= 0 (a ReLU
output), so d_k h_k >= dl_k h_k for every admissible d_k, with equality at d_k = dl_k: the
minimum over (d, c) is dl . h + cl for every h, *whatever the sign of dl_k*; an interval
[dl_k, du_k] that crosses 0 makes no difference here, because h_k >= 0 always picks its lower
end. The sign of dl_k matters one layer down (corollary).
(c) Layer 1. With x fixed, v_1i is an affine function of row i's block, so its range is an
interval (a continuous image of a connected set) whose ends are the exact interval sums
[ul_i, uu_i]; the rows are independent, so v_1 ranges over the whole box [ul, uu] and
h_1 = relu(v_1) over the box [relu(ul), relu(uu)] (relu is continuous and monotone).
(d) Layer k >= 2. For a fixed h_{k-1} >= 0, each term W_rc h_c ranges over
[Wl_rc h_c, Wu_rc h_c], so v_kr ranges over exactly [Wl_k[r] . h_{k-1} + bl_r,
Wu_k[r] . h_{k-1} + bu_r] and, rows being independent, h_k over the box (Rk) given h_{k-1}.
The blocks of layer k are independent of those of earlier layers, so by induction the set of
hidden vectors reachable from the box is exactly R; with (b) the theorem follows. QED

**Corollary (one and two hidden layers).** K = 2: the objective dl . h_1 is linear over the
box (R1), so min m = cl + sum_i min(dl_i relu(ul_i), dl_i relu(uu_i)): a closed form (it
equals the folded interval bound of `verifier.bounds.ibp`, which is therefore exact here).
K = 3: for a fixed h_1 the objective sum_r dl_r h_2r is minimised row by row: dl_r > 0 wants
h_2r small, i.e. row r of layer 2 at its *lower* corner (Wl_2[r], bl_2r), since h_1 >= 0;
dl_r < 0 wants it large, the *upper* corner (Wu_2[r], bu_2r); dl_r = 0 leaves it free. So
min m = cl + min over h_1 in H = [relu(ul), relu(uu)] of sum_r dl_r relu(W^_r . h_1 + b^_r),
a fixed one-hidden-layer ReLU network over the input box H. Terms with dl_r > 0 are convex in
h_1 (an LP epigraph, no binary); terms with dl_r < 0 are concave and need one binary exactly
when W^_r . h_1 + b^_r changes sign over H (`verifier.crosscheck.milp`).

**Deeper nets.** R is a finite union of polyhedra, so the problem stays a MILP for every K;
`verifier.crosscheck.milp` solves it by HiGHS's branch and bound within the time limit and
otherwise reports its best bound and best solution.

**Arithmetic.** The reduction is exact in real arithmetic. Here the interval ends are float64
(bit-exact box corners without Gemm/BatchNorm scales; the sums ul, uu rounded) and HiGHS works
with tolerances, so every reported minimum comes with *witness weights inside the box* and the
reported margin is the witness's own margin from a plain float64 forward pass
(`graph.forward`): a value that is attained. `verifier.crosscheck.smt` decides the same
problem in exact rational arithmetic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from verifier.crosscheck.chain import ReluChain

ExactStatus = Literal["optimal", "timeout", "skipped"]


ExactMethod = Literal["closed-form", "milp", "smt"]


ExactChoice = Literal["auto", "milp", "smt"]


BOUND_PAD = 1e-9
"""Relative outward padding of the interval bounds used as MILP big-M constants (so float64
rounding can never make them cut off a reachable point; padding only loosens)."""


@dataclass(frozen=True, eq=False)
class ExactMargin:
    """The worst-case margin z_y - z_j over the box for one input and class pair.

    Attributes:
        status: "optimal" (the minimum was found), "timeout" (time limit reached), or
            "skipped" (the network or method cannot be handled; see `reason`).
        method: "closed-form", "milp" or "smt".
        margin: the minimum, as the witness's own float64 margin; None unless optimal.
        objective: the solver's optimal value (closed form: the formula's value) or None.
        lower: a lower bound from the solver on timeout (its dual bound; diagnostic, with the
            solver's tolerances), or None.
        incumbent: the margin of the best weights found before a timeout, or None.
        theta: witness weights (every boxed parameter, float64, inside the box) attaining
            `margin` (or `incumbent`), or None.
        seconds: time spent.
        n_binaries: binary variables of the MILP (0 for the closed form).
        reason: why the result is skipped or timed out; empty otherwise.
    """

    status: ExactStatus
    method: ExactMethod
    margin: float | None = None
    objective: float | None = None
    lower: float | None = None
    incumbent: float | None = None
    theta: Mapping[str, Tensor] | None = field(default=None, repr=False)
    seconds: float = 0.0
    n_binaries: int = 0
    reason: str = ""


@dataclass(frozen=True, eq=False)
class HiddenBounds:
    """Class-independent ranges of the reachable hidden layers of a chain (float64).

    Attributes:
        pre1_lower: ul, the exact lower end of layer 1's pre-activations, shape (n_1,).
        pre1_upper: uu, shape (n_1,).
        hidden_lower: per hidden layer k = 1..K-1, a lower bound on h_k (exact for k = 1).
        hidden_upper: per hidden layer, an upper bound on h_k (exact for k = 1).
        side_lower: per layer k = 2..K-1 (index k - 2), a lower bound on Wu_k h_{k-1} + bu_k,
            padded outwards.
        side_upper: per layer k = 2..K-1, an upper bound on Wu_k h_{k-1} + bu_k, padded.
        low_side_upper: per layer k = 2..K-1, an upper bound on Wl_k h_{k-1} + bl_k, padded.
    """

    pre1_lower: Tensor
    pre1_upper: Tensor
    hidden_lower: list[Tensor]
    hidden_upper: list[Tensor]
    side_lower: list[Tensor]
    side_upper: list[Tensor]
    low_side_upper: list[Tensor]


@dataclass(frozen=True, eq=False)
class ReducedProblem:
    """min cl + dl . h_{K-1} over the reachable set R of the theorem above (K >= 1).

    Attributes:
        chain: the network's boxed tail for the fixed input.
        bounds: its hidden-layer ranges.
        label: the true class y.
        other: the class j.
        coefficient: dl = Wl_K[y] - Wu_K[j], shape (n_{K-1},) (or (n_0,) when K = 1).
        coefficient_upper: du = Wu_K[y] - Wl_K[j], same shape.
        offset: cl = bl_K[y] - bu_K[j].
    """

    chain: ReluChain
    bounds: HiddenBounds
    label: int
    other: int
    coefficient: Tensor
    coefficient_upper: Tensor
    offset: float


def _split(w: Tensor) -> tuple[Tensor, Tensor]:
    return w.clamp(min=0.0), w.clamp(max=0.0)


def _pad(value: Tensor, magnitude: Tensor, sign: float) -> Tensor:
    return value + sign * BOUND_PAD * (magnitude + 1e-300)


def hidden_bounds(chain: ReluChain) -> HiddenBounds:
    """Ranges of the hidden layers reachable from the box, for the chain's fixed input.

    Layer 1's range is exact (part (c) of the theorem); deeper layers get interval bounds
    over the box of the layer before (valid outer bounds, padded outwards by `BOUND_PAD`).

    Args:
        chain: the boxed tail.

    Returns:
        The ranges; empty lists beyond layer 1 when K <= 2.
    """
    first = chain.layers[0]
    x = chain.x
    pos, neg = x.clamp(min=0.0), x.clamp(max=0.0)
    ul = first.weight_lower @ pos + first.weight_upper @ neg + first.bias_lower
    uu = first.weight_upper @ pos + first.weight_lower @ neg + first.bias_upper
    lows, ups = [ul.clamp(min=0.0)], [uu.clamp(min=0.0)]
    side_lower: list[Tensor] = []
    side_upper: list[Tensor] = []
    low_side_upper: list[Tensor] = []
    for layer in chain.layers[1:-1]:
        hl, hu = lows[-1], ups[-1]
        wl_pos, wl_neg = _split(layer.weight_lower)
        wu_pos, wu_neg = _split(layer.weight_upper)
        mag_l = layer.weight_lower.abs() @ hu + layer.bias_lower.abs()
        mag_u = layer.weight_upper.abs() @ hu + layer.bias_upper.abs()
        a_lo = _pad(wl_pos @ hl + wl_neg @ hu + layer.bias_lower, mag_l, -1.0)
        a_hi = _pad(wl_pos @ hu + wl_neg @ hl + layer.bias_lower, mag_l, 1.0)
        b_lo = _pad(wu_pos @ hl + wu_neg @ hu + layer.bias_upper, mag_u, -1.0)
        b_hi = _pad(wu_pos @ hu + wu_neg @ hl + layer.bias_upper, mag_u, 1.0)
        side_lower.append(b_lo)
        side_upper.append(b_hi)
        low_side_upper.append(a_hi)
        lows.append(a_lo.clamp(min=0.0))
        ups.append(b_hi.clamp(min=0.0))
    return HiddenBounds(ul, uu, lows, ups, side_lower, side_upper, low_side_upper)


def reduce_problem(
    chain: ReluChain, bounds: HiddenBounds, label: int, other: int
) -> ReducedProblem:
    """The reduced problem of the theorem for the class pair (label, other).

    Args:
        chain: the boxed tail.
        bounds: `hidden_bounds(chain)`.
        label: the true class y.
        other: the class j != y.

    Returns:
        The problem (coefficients dl, du and offset cl).
    """
    last = chain.layers[-1]
    dl = last.weight_lower[label] - last.weight_upper[other]
    du = last.weight_upper[label] - last.weight_lower[other]
    cl = float(last.bias_lower[label] - last.bias_upper[other])
    return ReducedProblem(chain, bounds, label, other, dl, du, cl)


def _last_layer_fractions(problem: ReducedProblem, fractions: list[tuple[Tensor, Tensor]]) -> None:
    """Rows y and j of the last layer at the ends that give d = dl (h >= 0) or the x-sign ends."""
    t_w, t_b = fractions[-1]
    y, j = problem.label, problem.other
    if problem.chain.depth == 1:
        low = (problem.chain.x >= 0).to(torch.float64)  # d_k = dl_k where x_k >= 0, else du_k
        t_w[y] = 1.0 - low
        t_w[j] = low
    else:
        t_w[y] = 0.0
        t_w[j] = 1.0
    t_b[y] = 0.0
    t_b[j] = 1.0


def _row_towards(t_w: Tensor, t_b: Tensor, row: int, low: Tensor, s: float) -> None:
    """Set one row at fraction s between its low corner (`low`, weights) and the high one."""
    t_w[row] = low + s * (1.0 - 2.0 * low)
    t_b[row] = s


def witness(problem: ReducedProblem, targets: list[Tensor] | None = None) -> dict[str, Tensor]:
    """Weights inside the box that attain the reduced problem's value at a solution.

    Args:
        problem: the reduced problem.
        targets: values of h_1, ..., h_{K-2} at the solution (the hidden layers before the
            last one); None when K <= 2. The last hidden layer follows the corollary's corner
            rule, which is optimal for any h_{K-2}.

    Returns:
        Every boxed parameter of the graph, float64, inside the box.
    """
    chain = problem.chain
    fractions = chain.base_fractions()
    _last_layer_fractions(problem, fractions)
    depth = chain.depth
    if depth == 1:
        return chain.parameters(fractions)
    ul, uu = problem.bounds.pre1_lower, problem.bounds.pre1_upper
    coefficient = problem.coefficient
    x_low = (chain.x < 0).to(torch.float64)  # low corner of layer 1: lower weight where x >= 0
    h = torch.zeros(0, dtype=torch.float64)
    for k, layer in enumerate(chain.layers[:-1]):
        t_w, t_b = fractions[k]
        is_last_hidden = k == depth - 2
        if k == 0:
            lo_v, hi_v, low = ul, uu, x_low
        else:
            lo_v = layer.weight_lower @ h + layer.bias_lower
            hi_v = layer.weight_upper @ h + layer.bias_upper
            low = torch.zeros(layer.n_in, dtype=torch.float64)
        for r in range(layer.n_out):
            lo_r, hi_r = float(lo_v[r]), float(hi_v[r])
            if is_last_hidden:
                c = float(coefficient[r])
                if c == 0.0:
                    continue  # the row does not enter the margin; keep the model's weights
                s = 0.0 if c > 0 else 1.0
            else:
                assert targets is not None
                goal = float(targets[k][r])
                v = goal if goal > 0 else lo_r
                v = min(max(v, lo_r), hi_r)
                s = 0.0 if hi_r <= lo_r else (v - lo_r) / (hi_r - lo_r)
            _row_towards(t_w, t_b, r, low, min(max(s, 0.0), 1.0))
        w = layer.weight_lower + t_w * (layer.weight_upper - layer.weight_lower)
        b = layer.bias_lower + t_b * (layer.bias_upper - layer.bias_lower)
        h = torch.relu(w @ (chain.x if k == 0 else h) + b)
    return chain.parameters(fractions)


def closed_form_margin(problem: ReducedProblem) -> ExactMargin:
    """The exact minimum for K <= 2 by the closed form of the theorem, with its witness.

    Args:
        problem: a reduced problem of a chain with at most one hidden layer.

    Returns:
        An optimal `ExactMargin` (method "closed-form").

    Raises:
        ValueError: the chain has two or more hidden layers.
    """
    started = time.perf_counter()
    chain = problem.chain
    if chain.depth > 2:
        raise ValueError(f"the closed form covers at most one hidden layer; K = {chain.depth}")
    dl, du = problem.coefficient, problem.coefficient_upper
    if chain.depth == 1:
        x = chain.x
        terms = torch.minimum(dl * x, du * x)
    else:
        hl, hu = problem.bounds.hidden_lower[0], problem.bounds.hidden_upper[0]
        terms = torch.minimum(dl * hl, dl * hu)
    value = float(terms.sum()) + problem.offset
    theta = witness(problem)
    return ExactMargin(
        "optimal",
        "closed-form",
        margin=chain.margin(theta, problem.label, problem.other),
        objective=value,
        theta=theta,
        seconds=time.perf_counter() - started,
    )


def margin_tolerance(value: float, scale: float = 1.0) -> float:
    """Absolute tolerance for comparing a solver's optimum with a witness margin.

    HiGHS meets its constraints to about 1e-7 (relative to the data); 1e-6 of the margin's
    magnitude (at least of `scale`) covers that and float64 forward rounding.
    """
    return 1e-6 * max(abs(value), scale, 1.0) if math.isfinite(value) else math.inf
