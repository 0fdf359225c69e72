"""The exact worst-case margin of a ReLU chain over a weight box: one entry point that picks the
solver.

One hidden layer, and two with `method="auto"`, have the closed form of
`verifier.crosscheck.problem`; deeper chains (or an explicit choice) go to the MILP
(`verifier.crosscheck.milp`, scipy HiGHS) or to z3 (`verifier.crosscheck.smt`).
"""

from __future__ import annotations

from verifier.crosscheck.chain import ReluChain
from verifier.crosscheck.milp import solve_reduced
from verifier.crosscheck.problem import (
    ExactChoice,
    ExactMargin,
    closed_form_margin,
    hidden_bounds,
    reduce_problem,
)
from verifier.crosscheck.smt import minimize_reduced


def exact_margins(
    chain: ReluChain,
    label: int,
    *,
    method: ExactChoice = "auto",
    timeout_s: float = 60.0,
    classes: list[int] | None = None,
) -> dict[int, ExactMargin]:
    """The worst-case margin over the box against every other class, exactly where possible.

    Args:
        chain: the boxed tail for one input (`verifier.crosscheck.chain.relu_chain`).
        label: the true class y.
        method: "auto" (closed form for K <= 2, else MILP), "milp" (MILP for K >= 2) or
            "smt" (z3 optimisation over the reduced problem in exact rational arithmetic,
            K >= 2). K = 1 always uses the closed form.
        timeout_s: time limit of one solve (one class), seconds.
        classes: the classes j to check (default: all but `label`).

    Returns:
        One `ExactMargin` per class j.
    """
    bounds = hidden_bounds(chain)
    n_classes = chain.layers[-1].n_out
    others = [c for c in range(n_classes) if c != label] if classes is None else classes
    out: dict[int, ExactMargin] = {}
    for j in others:
        problem = reduce_problem(chain, bounds, label, j)
        if chain.depth == 1 or (method == "auto" and chain.depth == 2):
            out[j] = closed_form_margin(problem)
        elif method == "smt":
            out[j] = minimize_reduced(problem, timeout_s=timeout_s)
        else:
            out[j] = solve_reduced(problem, timeout_s=timeout_s)
    return out
