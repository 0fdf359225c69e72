"""z3 decides "some weights in the box give margin <= t" in exact rational arithmetic.

Two encodings of the same question, for one input x and class pair (y, j):

* **Nonlinear real arithmetic** (`decide_nonlinear`): every boxed scalar of the tail is a real
  variable between its box corners, every other parameter a constant, and the network is
  written out as it is (weight times activation is a product of two variables after the first
  layer; ReLU is an if-then-else). It shares nothing with the reduction of
  `verifier.crosscheck.exact` but the parsing of the op chain, so it checks that reduction
  independently. Practical for tiny nets (about 150 varying parameters).
* **Linear real arithmetic** (`decide_reduced`, `minimize_reduced`): the reduced problem of
  `verifier.crosscheck.exact` (for two hidden layers: the fixed one-hidden-layer ReLU network
  over the box of layer-1 activations), pruned as the MILP is (`verifier.crosscheck.milp`):
  convex units as epigraphs, a disjunction h <= b or h <= 0 only for units whose upper side b
  changes sign (decided by padded, hence safe, float bounds). Its constants are recomputed from
  the box in exact rationals. z3's optimiser returns the exact minimum as a rational.

Floats enter z3 as the exact rationals they denote, so verdicts are exact for the stored
corners and inputs (the frozen prefix, if any, is evaluated in float64 first). z3 is imported
only in this module.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor

from verifier.crosscheck.chain import IntervalLayer, ReluChain, relu_chain
from verifier.crosscheck.problem import ExactMargin, ReducedProblem, witness
from verifier.domains.box import Box
from verifier.errors import BackendError
from verifier.graph import Graph, Linear

SmtStatus = Literal["sat", "unsat", "unknown"]
SmtEncoding = Literal["nonlinear", "linear"]

DEFAULT_MAX_PARAMETERS = 150


@dataclass(frozen=True, eq=False)
class SmtVerdict:
    """z3's answer to "exist weights in the box with margin <= threshold".

    Attributes:
        status: "sat" (such weights exist), "unsat" (none exist), "unknown" (z3 gave up or
            ran out of time).
        encoding: "nonlinear" (the network as is) or "linear" (the reduced problem).
        threshold: the t of the question.
        seconds: time spent.
        theta: on sat, counterexample weights (every boxed parameter, float64, inside the
            box); else None.
        margin: on sat, the counterexample's margin from a plain float64 forward pass.
        reason: z3's reason for unknown; empty otherwise.
    """

    status: SmtStatus
    encoding: SmtEncoding
    threshold: float
    seconds: float
    theta: Mapping[str, Tensor] | None = field(default=None, repr=False)
    margin: float | None = None
    reason: str = ""


def _z3() -> Any:
    try:
        import z3
    except ImportError as err:  # pragma: no cover - z3-solver is a dependency
        raise BackendError("z3 is not installed; install it with `pip install z3-solver`") from err
    return z3


def _q(value: float) -> Fraction:
    """The exact rational a float denotes."""
    return Fraction(float(value))


def _rational(z3mod: Any, value: Fraction) -> Any:
    return z3mod.Q(value.numerator, value.denominator)


def _to_fraction(value: Any) -> Fraction:
    """A z3 numeral (integer, rational or algebraic) as a Fraction (algebraic: 1e-30 close)."""
    z3mod = _z3()
    if z3mod.is_int_value(value):
        return Fraction(value.as_long())
    if z3mod.is_algebraic_value(value):
        value = value.approx(30)
    return Fraction(value.numerator_as_long(), value.denominator_as_long())


def _relu(z3mod: Any, term: Any) -> Any:
    return z3mod.If(term > 0, term, 0)


@dataclass(frozen=True)
class _ExactLayer:
    """Effective interval weights and biases of one layer in exact rationals."""

    weight_lower: list[list[Fraction]]
    weight_upper: list[list[Fraction]]
    bias_lower: list[Fraction]
    bias_upper: list[Fraction]


def _effective(
    value_lo: Fraction, value_up: Fraction, factor: Fraction | None
) -> tuple[Fraction, Fraction]:
    if factor is None:
        return value_lo, value_up
    a, b = factor * value_lo, factor * value_up
    return min(a, b), max(a, b)


def _corners(chain: ReluChain, name: str) -> tuple[Tensor, Tensor]:
    if name in chain.box.lower:
        return chain.box.lower[name], chain.box.upper[name]
    value = chain.graph.parameters[name].to(torch.float64)
    return value, value


def _oriented(op: Linear, tensor: Tensor) -> Tensor:
    return tensor if op.weight_layout == "out_in" else tensor.transpose(0, 1)


def _exact_layer(chain: ReluChain, layer: IntervalLayer) -> _ExactLayer:
    """Recompute a layer's effective intervals from the box in rationals (no rounding)."""
    op = layer.op
    lo, up = (_oriented(op, t).tolist() for t in _corners(chain, op.weight))
    n_out, n_in = layer.n_out, layer.n_in
    scale = op.scale
    w_scale = [None] * n_out if scale is None else [_q(v) for v in scale.weight_scale.tolist()]
    wl: list[list[Fraction]] = []
    wu: list[list[Fraction]] = []
    for r in range(n_out):
        row_lo, row_up = [], []
        for c in range(n_in):
            a, b = _effective(_q(lo[r][c]), _q(up[r][c]), w_scale[r])
            row_lo.append(a)
            row_up.append(b)
        wl.append(row_lo)
        wu.append(row_up)
    shift = [Fraction(0)] * n_out if scale is None else [_q(v) for v in scale.shift.tolist()]
    if op.bias is None:
        return _ExactLayer(wl, wu, list(shift), list(shift))
    b_lo, b_up = (t.reshape(n_out).tolist() for t in _corners(chain, op.bias))
    b_scale = [None] * n_out if scale is None else [_q(v) for v in scale.bias_scale.tolist()]
    bl, bu = [], []
    for r in range(n_out):
        a, b = _effective(_q(b_lo[r]), _q(b_up[r]), b_scale[r])
        bl.append(a + shift[r])
        bu.append(b + shift[r])
    return _ExactLayer(wl, wu, bl, bu)


def _reduced_encoding(
    z3mod: Any, problem: ReducedProblem
) -> tuple[list[Any], Any, list[list[Any]]]:
    """Constraints, the margin term and the hidden variables of the reduced problem."""
    chain = problem.chain
    if chain.depth < 2:
        raise ValueError("a linear head has a closed form; the reduced encoding needs K >= 2")
    layers = [_exact_layer(chain, layer) for layer in chain.layers]
    x = [_q(v) for v in chain.x.tolist()]
    first = layers[0]
    constraints: list[Any] = []
    hidden: list[list[Any]] = []
    current: list[Any] = []
    for r in range(len(first.bias_lower)):
        ul = first.bias_lower[r] + sum(
            (first.weight_lower[r][c] if x[c] >= 0 else first.weight_upper[r][c]) * x[c]
            for c in range(len(x))
        )
        uu = first.bias_upper[r] + sum(
            (first.weight_upper[r][c] if x[c] >= 0 else first.weight_lower[r][c]) * x[c]
            for c in range(len(x))
        )
        h = z3mod.Real(f"h1_{r}")
        constraints += [h >= _rational(z3mod, max(ul, Fraction(0)))]
        constraints += [h <= _rational(z3mod, max(uu, Fraction(0)))]
        current.append(h)
    hidden.append(current)
    last = layers[-1]
    y, j = problem.label, problem.other
    n_last = len(last.weight_lower[y])
    coefficient = [last.weight_lower[y][c] - last.weight_upper[j][c] for c in range(n_last)]
    depth = chain.depth
    for k, layer in enumerate(layers[1:-1], start=2):
        is_last = k == depth - 1
        side_lower = problem.bounds.side_lower[k - 2].tolist()
        side_upper = problem.bounds.side_upper[k - 2].tolist()
        nxt = []
        for r in range(len(layer.bias_lower)):
            h_new = z3mod.Real(f"h{k}_{r}")
            nxt.append(h_new)
            need_low = not is_last or coefficient[r] > 0
            need_up = not is_last or coefficient[r] < 0
            if not (need_low or need_up):
                continue  # dl_r = 0: the unit does not enter the margin
            constraints.append(h_new >= 0)
            if need_low:
                low = z3mod.Sum(
                    [_rational(z3mod, layer.weight_lower[r][c]) * h for c, h in enumerate(current)]
                ) + _rational(z3mod, layer.bias_lower[r])
                constraints.append(h_new >= low)
            if not need_up:
                continue
            high = z3mod.Sum(
                [_rational(z3mod, layer.weight_upper[r][c]) * h for c, h in enumerate(current)]
            ) + _rational(z3mod, layer.bias_upper[r])
            if side_upper[r] <= 0.0:  # padded bounds: Wu h + bu <= 0 everywhere
                constraints.append(h_new <= 0)
            elif side_lower[r] >= 0.0:  # Wu h + bu >= 0 everywhere
                constraints.append(h_new <= high)
            else:
                constraints.append(z3mod.Or(h_new <= high, h_new <= 0))
        current = nxt
        hidden.append(current)
    margin = z3mod.Sum(
        [_rational(z3mod, coefficient[c]) * h for c, h in enumerate(current) if coefficient[c]]
    ) + _rational(z3mod, last.bias_lower[y] - last.bias_upper[j])
    return constraints, margin, hidden


def _targets(z3mod: Any, model: Any, hidden: list[list[Any]]) -> list[Tensor]:
    out = []
    for layer in hidden[:-1]:
        values = [float(_to_fraction(model.eval(h, model_completion=True))) for h in layer]
        out.append(torch.tensor(values, dtype=torch.float64))
    return out


def decide_reduced(
    problem: ReducedProblem, *, threshold: float = 0.0, timeout_s: float = 60.0
) -> SmtVerdict:
    """Decide "min margin <= threshold" on the reduced problem in linear real arithmetic.

    Args:
        problem: the reduced problem (K >= 2).
        threshold: t.
        timeout_s: z3 time limit, seconds.

    Returns:
        The verdict; on sat, witness weights rebuilt from z3's hidden values.
    """
    z3mod = _z3()
    started = time.perf_counter()
    constraints, margin, hidden = _reduced_encoding(z3mod, problem)
    solver = z3mod.Solver()
    solver.set("timeout", max(1, int(timeout_s * 1000)))
    solver.add(*constraints)
    solver.add(margin <= _rational(z3mod, _q(threshold)))
    answer = solver.check()
    seconds = time.perf_counter() - started
    if answer == z3mod.sat:
        theta = witness(problem, _targets(z3mod, solver.model(), hidden))
        value = problem.chain.margin(theta, problem.label, problem.other)
        return SmtVerdict("sat", "linear", threshold, seconds, theta, value)
    if answer == z3mod.unsat:
        return SmtVerdict("unsat", "linear", threshold, seconds)
    return SmtVerdict("unknown", "linear", threshold, seconds, reason=solver.reason_unknown())


def minimize_reduced(problem: ReducedProblem, *, timeout_s: float = 60.0) -> ExactMargin:
    """The exact minimum of the reduced problem, by z3's optimiser over linear real arithmetic.

    Args:
        problem: the reduced problem (K >= 2).
        timeout_s: z3 time limit, seconds.

    Returns:
        "optimal" with `objective` the exact rational minimum (as a float) and `margin` its
        witness's forward margin, or "timeout" when z3 gives up.
    """
    z3mod = _z3()
    started = time.perf_counter()
    constraints, margin, hidden = _reduced_encoding(z3mod, problem)
    optimizer = z3mod.Optimize()
    optimizer.set("timeout", max(1, int(timeout_s * 1000)))
    optimizer.add(*constraints)
    value = z3mod.Real("margin")
    optimizer.add(value == margin)
    optimizer.minimize(value)
    answer = optimizer.check()
    seconds = time.perf_counter() - started
    if answer != z3mod.sat:
        reason = optimizer.reason_unknown() if answer == z3mod.unknown else str(answer)
        return ExactMargin("timeout", "smt", seconds=seconds, reason=f"z3: {reason}")
    model = optimizer.model()
    objective = float(_to_fraction(model.eval(value, model_completion=True)))
    theta = witness(problem, _targets(z3mod, model, hidden))
    return ExactMargin(
        "optimal",
        "smt",
        margin=problem.chain.margin(theta, problem.label, problem.other),
        objective=objective,
        theta=theta,
        seconds=time.perf_counter() - started,
    )


def _parameter_terms(
    z3mod: Any, chain: ReluChain, name: str, variables: dict[str, Any]
) -> list[Any] | list[list[Any]]:
    """Nested lists of z3 terms for one parameter: variables where its box has width."""
    lo, up = _corners(chain, name)
    flat_lo, flat_up = lo.reshape(-1).tolist(), up.reshape(-1).tolist()
    terms: list[Any] = []
    for i, (a, b) in enumerate(zip(flat_lo, flat_up, strict=True)):
        if a == b:
            terms.append(_rational(z3mod, _q(a)))
            continue
        var = z3mod.Real(f"{name}[{i}]")
        variables[f"{name}\x00{i}"] = var
        terms.append(var)
    if lo.dim() == 2:
        cols = lo.shape[1]
        return [terms[r * cols : (r + 1) * cols] for r in range(lo.shape[0])]
    return terms


def _box_constraints(z3mod: Any, chain: ReluChain, variables: dict[str, Any]) -> list[Any]:
    out = []
    for key, var in variables.items():
        name, index = key.split("\x00")
        lo = chain.box.lower[name].reshape(-1)[int(index)]
        up = chain.box.upper[name].reshape(-1)[int(index)]
        out += [var >= _rational(z3mod, _q(float(lo))), var <= _rational(z3mod, _q(float(up)))]
    return out


def decide_nonlinear(
    graph: Graph,
    box: Box,
    x: Tensor,
    label: int,
    other: int,
    *,
    threshold: float = 0.0,
    timeout_s: float = 60.0,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> SmtVerdict:
    """Decide "some weights in the box give z_label - z_other <= threshold" in nonlinear reals.

    Args:
        graph: the network (its boxed tail must be Linear layers with ReLU between).
        box: the weight box.
        x: one input, shape (*graph.input_shape) or (1, *graph.input_shape).
        label: the true class y.
        other: the class j.
        threshold: t.
        timeout_s: z3 time limit, seconds.
        max_parameters: refuse (status "unknown") above this many varying parameters.

    Returns:
        The verdict; on sat, z3's weights (rounded to float64, clamped into the box) and
        their forward margin.

    Raises:
        BackendError: the tail is not a ReLU chain (from `relu_chain`).
    """
    z3mod = _z3()
    started = time.perf_counter()
    chain = relu_chain(graph, box, x)
    n_vary = chain.n_boxed_parameters()
    if n_vary > max_parameters:
        return SmtVerdict(
            "unknown",
            "nonlinear",
            threshold,
            time.perf_counter() - started,
            reason=f"{n_vary} varying parameters exceed the limit of {max_parameters}",
        )
    variables: dict[str, Any] = {}
    h: list[Any] = [_rational(z3mod, _q(v)) for v in chain.x.tolist()]
    logits: list[Any] = []
    for k, layer in enumerate(chain.layers):
        op = layer.op
        weight = _parameter_terms(z3mod, chain, op.weight, variables)
        bias = None if op.bias is None else _parameter_terms(z3mod, chain, op.bias, variables)
        scale = op.scale
        rows = [label, other] if k == chain.depth - 1 else range(layer.n_out)
        out: dict[int, Any] = {}
        for r in rows:
            if op.weight_layout == "out_in":
                w_row = [weight[r][c] for c in range(layer.n_in)]  # type: ignore[index]
            else:
                w_row = [weight[c][r] for c in range(layer.n_in)]  # type: ignore[index]
            term = z3mod.Sum([w * v for w, v in zip(w_row, h, strict=True)])
            if scale is not None:
                term = _rational(z3mod, _q(float(scale.weight_scale.reshape(-1)[r]))) * term
                term = term + _rational(z3mod, _q(float(scale.shift.reshape(-1)[r])))
            if bias is not None:
                b = bias[r]
                if scale is not None:
                    b = _rational(z3mod, _q(float(scale.bias_scale.reshape(-1)[r]))) * b
                term = term + b
            out[r] = term
        if k == chain.depth - 1:
            logits = [out[label], out[other]]
        else:
            h = [_relu(z3mod, out[r]) for r in range(layer.n_out)]
    solver = z3mod.Solver()
    solver.set("timeout", max(1, int(timeout_s * 1000)))
    solver.add(*_box_constraints(z3mod, chain, variables))
    solver.add(logits[0] - logits[1] <= _rational(z3mod, _q(threshold)))
    answer = solver.check()
    seconds = time.perf_counter() - started
    if answer == z3mod.unsat:
        return SmtVerdict("unsat", "nonlinear", threshold, seconds)
    if answer != z3mod.sat:
        return SmtVerdict(
            "unknown", "nonlinear", threshold, seconds, reason=solver.reason_unknown()
        )
    model = solver.model()
    theta = {name: value.clone() for name, value in chain.base.items()}
    for key, var in variables.items():
        name, index = key.split("\x00")
        value = float(_to_fraction(model.eval(var, model_completion=True)))
        theta[name].view(-1)[int(index)] = value
    theta = chain.box.project(theta)
    margin = chain.margin(theta, label, other)
    return SmtVerdict("sat", "nonlinear", threshold, seconds, theta, margin)
