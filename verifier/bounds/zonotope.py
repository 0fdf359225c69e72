"""Margin bounds for every network whose parameters lie in a zonotope (`verifier.domains`).

Parameters are θ = y + Σ_k ε_k G_k with y in the box part [lower, upper] and one ε ∈ [-1, 1]^k
shared by every layer. Per Linear layer W = Wc + R∘Δ + Σ_k ε_k G_k (Wc = (lower + upper) / 2,
R = (upper - lower) / 2, Δ ∈ [-1, 1] per entry); likewise the bias (bc, br, bg).

Activations are enclosed by *affine forms* in ε with an interval remainder (`AffineForm`):

    h ∈ c + Σ_k ε_k A_k + [-ρ, ρ]      for every (δ, ε), per sample and unit

(in proof mode widened by ±e, the float64 error bound). The ε-part is what a box cannot express:
it is shared by all neurons and layers, so it cancels where the network is insensitive to a
generator's direction.

**Affine layer** (one output unit; |h|max = |c| + Σ_j |A_j| + ρ):

    W h + b = (Wc c + bc)                                   centre
            + Σ_k ε_k (Wc A_k + G_k c + bg_k)               coefficients, exact in ε
            + Wc i,  i ∈ [-ρ, ρ]          ∈ ± |Wc| ρ
            + (R∘Δ) h                     ∈ ± R |h|max
            + Σ_k ε_k G_k (Σ_j ε_j A_j + i) ∈ ± (Σ_k |G_k|)(Σ_j |A_j| + ρ)   cross terms, folded
            + br δ_b                      ∈ ± br

The last four terms form the new remainder ρ'. For the first layer h = x is a point (A = 0,
ρ = 0), so its output is exact in ε: the remainder is the box part's ±(R|x| + br) only.

**ReLU** (DeepZ: Singh et al., "Fast and Effective Robustness Certification", NeurIPS 2018).
Pre-activation bounds [l, u] are the tighter of the form's interval hull and interval bound
propagation (`verifier.bounds.ibp`) over the zonotope's interval hull (both sound, so is their
intersection). u <= 0: 0. l >= 0: identity. Crossing: relu(x) ∈ s x + [0, t] with s = u/(u-l)
and t = max(-s l, (1-s) u), which holds for x ∈ [l, u] and any s ∈ [0, 1]. A unit whose form has
no ε-part, or whose interval [relu(l), relu(u)] is narrower than INTERVAL_RATIO times the hull of
the form's output, becomes that interval instead. Sigmoid and tanh give the interval
[f(l), f(u)].

**Margins** are folded into the last Linear layer: the centre and coefficients of z_y - z_j are
differences of the logit form's (exact linear algebra); its remainder uses the class-pair tables
|Wc_y - Wc_j| and Σ_k |G_ky - G_kj|, and R_y + R_j, br_y + br_j. The lower bound is
centre - Σ_k |coef_k| - remainder. The result is, per sample and class, the better of this and
the interval bound over the interval hull (`combine_margin_bounds`), so it is never looser than
the box bound of the hull, and with k = 0 it equals the box bound.

**Proof mode** (`track_rounding=True`, float64) follows `verifier.bounds.ibp`: Higham, "Accuracy
and Stability of Numerical Algorithms", Lemma 3.1 / Eq. 3.5, γ_n = n u / (1 - n u), u = 2^-53.
With |W|max = |Wc| + R + Σ_k |G_k| (a bound on |W| over T) and n the layer's fan-in:

    e_out = 2 γ_{n+k+8} (2 |h|max·|W|max + |b|max) + e_in·|W|max

(each product |h-term|·|W-term| occurs at most twice among the computed centre, coefficients
and remainder; their dot products have length n and the sums over k add k). Centre/radius of
the corners, Gemm/BatchNorm scales and shifts are computed in float; their rounding is absorbed
by inflating R (and br) by 4u (|Wc| + R + Σ_k |G_k|). Interval hulls before an activation are
widened by γ_{k+4} of their magnitude; the crossing relaxation rounds t up by (1 + 8u) and adds
4u of the output's magnitude to e; interval units add 2u of theirs, sigmoid and tanh 8u more
(libm). IBP bounds are taken with their own allowance (`propagate(track_rounding=True)`). The
margin's allowance (`MarginBounds.rounding`) is e carried through the fold plus γ_{k+6} of the
final sum's magnitude. The factor 2 covers the rounding of the allowance itself.

Supported ops: Linear (Gemm, MatMul), Relu / Sigmoid / Tanh, Reshape / Flatten, and Elementwise
with a constant (except constant / x). Conv and Pool raise `GraphError`: use the box domain for
convolutional models.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from verifier.bounds.affine_forms import AffineForm, LinearTerms, ZonotopeParameters
from verifier.bounds.ibp import class_pair_product, last_linear_index, margin_bounds, propagate
from verifier.bounds.margins import MarginBounds, combine_margin_bounds, mask_true_class
from verifier.domains.zonotope import hull_corners
from verifier.errors import GraphError
from verifier.graph import Activation, Conv, Elementwise, Graph, Linear, Pool, Reshape
from verifier.rounding import UNIT_ROUNDOFF_64, gamma, mapped_error

INTERVAL_RATIO = 0.5
"""A unit switches from its affine form to the plain interval [act(l), act(u)] when that
interval is narrower than this fraction of the hull of the form's output."""


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _centre_and_coefficients(form: AffineForm, terms: LinearTerms) -> tuple[Tensor, Tensor | None]:
    """Wc c + bc and the coefficients Wc A_k + G_k c + bg_k (shapes (batch, n_out), (batch, k,
    n_out)); h of shape (batch, n_in)."""
    c, coef_in = form.centre, form.coefficients
    centre = c @ terms.centre.transpose(0, 1)
    if terms.bias_centre is not None:
        centre = centre + terms.bias_centre
    coef: Tensor | None = None
    if coef_in is not None:
        coef = coef_in @ terms.centre.transpose(0, 1)
    if terms.generators is not None:
        coef = _add(coef, torch.einsum("bn,kon->bko", c, terms.generators))
    if terms.bias_generators is not None:
        bias_coef = terms.bias_generators[None].expand(c.shape[0], -1, -1)
        coef = bias_coef.clone() if coef is None else coef + bias_coef
    return centre, coef


def _check_flat(form: AffineForm, node: str) -> None:
    """Raise unless the form has shape (batch, features), the input a Linear layer needs."""
    if form.centre.dim() != 2:
        raise GraphError(
            f"node '{node}': zonotope bounds need a flat (batch, features) input to Linear layers"
        )


def _affine(form: AffineForm, terms: LinearTerms, node: str) -> AffineForm:
    """Enclose W h + b for every (δ, ε) (see the module docstring); h of shape (batch, n_in)."""
    _check_flat(form, node)
    c, coef_in, rho = form.centre, form.coefficients, form.radius
    centre, coef = _centre_and_coefficients(form, terms)
    mass_in = form.mass()
    radius: Tensor | None = None
    if rho is not None:
        radius = rho @ terms.centre.abs().transpose(0, 1)
    if terms.radius is not None:
        radius = _add(radius, form.magnitude() @ terms.radius.transpose(0, 1))
    g_mass = terms.generator_mass()
    cross_in = _add(mass_in, rho)
    if g_mass is not None and cross_in is not None:
        radius = _add(radius, cross_in @ g_mass.transpose(0, 1))
    if terms.bias_radius is not None:
        radius = _add(radius, terms.bias_radius.expand_as(centre))
    error = None
    if form.error is not None:
        n_in = c.shape[1]
        k = 0 if terms.generators is None else terms.generators.shape[0]
        if coef_in is not None:
            k = max(k, coef_in.shape[1])
        w_mag = terms.magnitude().transpose(0, 1)
        error = 2 * gamma(n_in + k + 8) * (2 * (form.magnitude() @ w_mag) + terms.bias_magnitude())
        error = error + form.error @ w_mag
    return AffineForm(centre, coef, radius, error)


def _interval_form(lo: Tensor, up: Tensor, proof: bool, extra: float = 0.0) -> AffineForm:
    """The form of the interval [lo, up] (no ε-part); `extra` adds that relative error."""
    centre, radius = (lo + up) / 2, (up - lo) / 2
    error = None
    if proof:
        error = (2 * UNIT_ROUNDOFF_64 + extra) * (lo.abs() + up.abs())
    return AffineForm(centre, None, radius, error)


def _activation(
    op: Activation,
    form: AffineForm,
    ibp: tuple[Tensor, Tensor] | None,
) -> AffineForm:
    """Enclose the activation of the form (DeepZ for ReLU, intervals otherwise)."""
    proof = form.error is not None
    lo, up = form.hull()
    if ibp is not None:
        lo, up = torch.maximum(lo, ibp[0]), torch.minimum(up, ibp[1])
    if op.function != "relu":
        fn = torch.sigmoid if op.function == "sigmoid" else torch.tanh
        return _interval_form(fn(lo), fn(up), proof, extra=8 * UNIT_ROUNDOFF_64)
    int_lo, int_up = torch.relu(lo), torch.relu(up)
    interval = _interval_form(int_lo, int_up, proof)
    coef = form.coefficients
    if coef is None:
        return interval
    active, dead = lo >= 0, up <= 0
    crossing = ~(active | dead)
    one = torch.ones_like(lo)
    denominator = torch.where(crossing, up - lo, one)
    slope = torch.where(crossing, up / denominator, torch.where(active, one, 0 * one))
    slope = slope.clamp(0.0, 1.0)
    offset = torch.where(crossing, torch.maximum(-slope * lo, (1 - slope) * up), 0 * one)
    if proof:
        offset = offset * (1 + 8 * UNIT_ROUNDOFF_64)
    mass = coef.abs().sum(dim=1)
    rho = form.radius if form.radius is not None else torch.zeros_like(lo)
    form_width = 2 * slope * (mass + rho) + offset
    use_form = (mass > 0) & ~dead & ((int_up - int_lo) > INTERVAL_RATIO * form_width)
    centre = torch.where(use_form, slope * form.centre + offset / 2, interval.centre)
    assert interval.radius is not None
    radius = torch.where(use_form, slope * rho + offset / 2, interval.radius)
    scale = torch.where(use_form, slope, 0 * one)
    new_coef = coef * scale.unsqueeze(1)
    error = None
    if proof:
        assert form.error is not None and interval.error is not None
        magnitude = slope * (form.centre.abs() + mass + rho) + offset
        form_error = mapped_error(form.error, slope, magnitude)
        error = torch.where(use_form, form_error, interval.error)
    return AffineForm(centre, new_coef, radius, error)


def _check_not_reciprocal(op: Elementwise) -> None:
    """Raise for constant / x: it is not affine in x, and the forms have no relaxation of it."""
    if op.op == "div" and op.constant_first:
        raise GraphError(
            f"node '{op.node}': zonotope bounds cannot propagate constant / x; use domain: box"
        )


def _elementwise(op: Elementwise, form: AffineForm) -> AffineForm:
    """Enclose an Elementwise op with a constant (affine in h, so exact up to rounding)."""
    _check_not_reciprocal(op)
    c = op.constant.to(form.centre)
    coef, radius = form.coefficients, form.radius
    if op.op in ("add", "sub"):
        negate = op.op == "sub" and op.constant_first
        offset = -c if op.op == "sub" and not op.constant_first else c
        centre = (-form.centre if negate else form.centre) + offset
        if negate and coef is not None:
            coef = -coef
        growth: Tensor | float = 1.0
    else:
        factor = c if op.op == "mul" else 1.0 / c
        centre = form.centre * factor
        coef = None if coef is None else coef * factor
        radius = None if radius is None else radius * factor.abs()
        growth = factor.abs()
    error = None
    if form.error is not None:
        out = AffineForm(centre, coef, radius, None)
        error = mapped_error(form.error, growth, out.magnitude())
    return AffineForm(centre, coef, radius, error)


def _pick_true(t: Tensor, y: Tensor) -> Tensor:
    """t[b, y_b] as a (batch, 1) column."""
    return t.gather(1, y[:, None])


def _coefficient_spread(coef: Tensor, y: Tensor) -> Tensor:
    """Σ_k |A_k,y - A_k,j|, shape (batch, n_classes), for A of shape (batch, k, n_classes)."""
    true = coef.gather(2, y[:, None, None].expand(-1, coef.shape[1], 1))
    return (true - coef).abs().sum(dim=1)


def _fold_margins(
    form: AffineForm, terms: LinearTerms, y: Tensor, node: str
) -> tuple[Tensor, Tensor | None]:
    """Lower bounds and allowances of z_y - z_j through the last Linear layer."""
    _check_flat(form, node)
    logit_centre, coef = _centre_and_coefficients(form, terms)
    centre = _pick_true(logit_centre, y) - logit_centre
    spread = torch.zeros_like(centre)
    k = 0
    if coef is not None:
        k = coef.shape[1]
        spread = _coefficient_spread(coef, y)
    if form.radius is not None:
        spread = spread + class_pair_product(form.radius, _pair_abs(terms.centre), y)
    h_mag = form.magnitude()
    if terms.radius is not None:
        side = h_mag @ terms.radius.transpose(0, 1)
        spread = spread + _pick_true(side, y) + side
    g_mass = terms.generators
    cross_in = _add(form.mass(), form.radius)
    if g_mass is not None and cross_in is not None:
        table = (g_mass[:, :, None, :] - g_mass[:, None, :, :]).abs().sum(dim=0)
        spread = spread + class_pair_product(cross_in, table, y)
    if terms.bias_radius is not None:
        spread = spread + _pick_true(terms.bias_radius[None].expand_as(centre), y)
        spread = spread + terms.bias_radius
    lower = centre - spread
    if form.error is None:
        return lower, None
    n_in = form.centre.shape[1]
    k = max(k, 0 if form.coefficients is None else form.coefficients.shape[1])
    w_mag = terms.magnitude().transpose(0, 1)
    per_class = 2 * (h_mag @ w_mag) + terms.bias_magnitude()
    carried = form.error @ w_mag
    rounding = 2 * gamma(n_in + k + 12) * (_pick_true(per_class, y) + per_class)
    rounding = rounding + _pick_true(carried, y) + carried
    rounding = rounding + gamma(k + 6) * (centre.abs() + spread)
    return lower, rounding


def _pair_abs(w: Tensor) -> Tensor:
    """|W_y - W_j| for every class pair, shape (C, C, n_in)."""
    return (w[:, None, :] - w[None, :, :]).abs()


def _margins_from_logits(form: AffineForm, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """Lower bounds of z_y - z_j from a logit form (when the margin cannot be folded)."""
    form = form.reshape((form.centre.shape[-1],)) if form.centre.dim() != 2 else form
    centre = _pick_true(form.centre, y) - form.centre
    spread = torch.zeros_like(centre)
    k = 0
    if form.coefficients is not None:
        k = form.coefficients.shape[1]
        spread = _coefficient_spread(form.coefficients, y)
    if form.radius is not None:
        spread = spread + _pick_true(form.radius, y) + form.radius
    lower = centre - spread
    if form.error is None:
        return lower, None
    rounding = _pick_true(form.error, y) + form.error
    return lower, rounding + gamma(k + 6) * (centre.abs() + spread)


def check_supported(graph: Graph) -> None:
    """Raise if the graph has an op the zonotope bounds do not handle.

    Raises:
        GraphError: naming the node (a branch or join of the DAG, Conv, Pool, an op other
            than Linear / activation / Elementwise / Reshape, or Elementwise constant / x).
    """
    branching = graph.first_non_chain_op()
    if branching is not None:
        raise GraphError(
            f"node '{branching.node}' ({branching.kind}): zonotope bounds support chains of ops "
            "only, and this graph branches or joins here; use domain: box for this model"
        )
    for op in graph.ops:
        if isinstance(op, Activation) and op.function not in ("relu", "sigmoid", "tanh"):
            raise GraphError(
                f"node '{op.node}': zonotope bounds do not support the {op.function} "
                "activation; use domain: box for this model"
            )
        if not isinstance(op, Linear | Conv | Pool | Activation | Elementwise | Reshape):
            raise GraphError(
                f"node '{op.node}': zonotope bounds do not support {op.kind} ops; "
                "use domain: box for this model"
            )
        if isinstance(op, Conv | Pool):
            kind = "Conv" if isinstance(op, Conv) else "Pool"
            raise GraphError(
                f"node '{op.node}': zonotope bounds support Linear (Gemm/MatMul) layers only, "
                f"not {kind}; use domain: box for this model"
            )
        if isinstance(op, Elementwise):
            _check_not_reciprocal(op)


def zonotope_margin_bounds(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    generators: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    track_rounding: bool = False,
    with_intervals: bool = True,
) -> MarginBounds:
    """Lower-bound every margin z_y - z_j for all parameters in the zonotope (sound).

    The zonotope is {y + Σ_k ε_k G_k : lower <= y <= upper, ε ∈ [-1, 1]^k} on the named
    parameters (the others fixed). Differentiable with respect to the corners and generators.
    For proofs pass float64 inputs and `track_rounding=True` (see the module docstring for the
    allowance); a margin then counts only above its allowance (`MarginBounds.certified`).

    Args:
        graph: the network (Linear / activation / reshape / elementwise ops).
        lower: box-part lower corners, keyed by initializer name.
        upper: box-part upper corners, same keys and shapes.
        generators: (k, *shape) per name, the same k for all.
        x: inputs, shape (batch, *input_shape); dtype and device follow x.
        y: labels, shape (batch,), int64.
        track_rounding: attach the float64 rounding allowance of every entry.
        with_intervals: intersect with interval bounds over the interval hull (pre-activation
            bounds and final margins); False gives the zonotope propagation alone.

    Returns:
        MarginBounds with `lower` of shape (batch, n_classes), +inf at the true class.

    Raises:
        GraphError: the graph has a Conv or Pool (use the box domain).
    """
    check_supported(graph)
    hull = None
    if with_intervals:
        hull = hull_corners(
            {n: t.to(x) for n, t in lower.items()},
            {n: t.to(x) for n, t in upper.items()},
            {n: t.to(x) for n, t in generators.items()},
            outward=track_rounding,
        )
    params = ZonotopeParameters(graph, lower, upper, generators, x, track_rounding)
    form = AffineForm(x, None, None, torch.zeros_like(x) if track_rounding else None)
    last = last_linear_index(graph)
    stop = len(graph.ops) if last is None else last
    for index, op in enumerate(graph.ops[:stop]):
        if isinstance(op, Linear):
            form = _affine(form, params.linear(op), op.node)
        elif isinstance(op, Activation):
            ibp = None
            if hull is not None:
                ibp = _interval_bounds(graph, hull, x, index, track_rounding)
            form = _activation(op, form, ibp)
        elif isinstance(op, Elementwise):
            form = _elementwise(op, form)
        elif isinstance(op, Reshape):
            form = form.reshape(op.shape)
    if last is None:
        lower_m, rounding = _margins_from_logits(form, y)
    else:
        op = graph.ops[last]
        assert isinstance(op, Linear)
        flat = form.reshape((form.centre[0].numel(),)) if form.centre.dim() != 2 else form
        lower_m, rounding = _fold_margins(flat, params.linear(op), y, op.node)
    bounds = mask_true_class(lower_m, rounding, y)
    if hull is None:
        return bounds
    boxed = margin_bounds(graph, hull[0], hull[1], x, y, track_rounding=track_rounding)
    return combine_margin_bounds(bounds, boxed)


def _interval_bounds(
    graph: Graph,
    hull: tuple[dict[str, Tensor], dict[str, Tensor]],
    x: Tensor,
    stop: int,
    proof: bool,
) -> tuple[Tensor, Tensor]:
    """Sound interval bounds of the input of ops[stop] over the interval hull."""
    enclosure, err = propagate(graph, hull[0], hull[1], x, stop=stop, track_rounding=proof)
    lo, up = enclosure.lower, enclosure.upper
    if err is None:
        return lo, up
    spread = err + 2 * UNIT_ROUNDOFF_64 * (torch.maximum(lo.abs(), up.abs()) + err)
    return lo - spread, up + spread
