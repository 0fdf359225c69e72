"""Linear relaxations of activations and of products of two bounded tensors.

Every relaxation here is a pair of lines per element, valid on the element's enclosure [l, u]:

    slope_lo * z + icpt_lo  <=  f(z)  <=  slope_up * z + icpt_up      for every z in [l, u].

The slopes are a free choice (CROWN's heuristics by default, or the optimiser's); the intercepts
are then the tightest ones for those slopes, computed exactly rather than from a formula that
holds only for one slope:

    icpt_up = max over [l, u] of (f(z) - s z),      icpt_lo = min over [l, u] of (f(z) - s z).

Every activation we support is monotone and convex below one point and concave above another
(ReLU, LeakyReLU and Clip piecewise linear; Sigmoid and Tanh S-shaped with f' even), so
h(z) = f(z) - s z has at most one interior local maximum and one interior local minimum, and
both extremes over [l, u] are among h(l), h(u) and h at the clamped critical point:

* ReLU, LeakyReLU: kink at 0 (a local minimum of h for slopes between the two pieces);
* Clip(low, high): local minimum at `low`, local maximum at `high`;
* Sigmoid, Tanh: f'(z) = s at z = +-z_c(s), z_c = 2 atanh(sqrt(1 - 4s)) for the sigmoid and
  atanh(sqrt(1 - s)) for tanh (+inf for s <= 0); maximum at +z_c, minimum at -z_c.

So any slope gives a valid line, which is what lets `slopes="optimized"` move slopes freely, and
float errors in a slope only cost tightness. Proof mode adds a `slack` per line: how far the
computed intercept may fall short of the exact extreme, from (a) rounding in evaluating h at the
candidates (f from libm within 4 ulp, one product, one subtraction: gamma_6 (|f|max + |s| |z|max))
and (b) for Sigmoid/Tanh, a computed critical point z~ off the exact one z*: h is concave on
[0, inf), so its tangent at z~ lies above it there (below it on (-inf, 0], where h is convex),
and the maximum over [max(l, 0), u] is at most h(z~) + max(0, h'(z~) (u - z~),
h'(z~) (max(l, 0) - z~)) (zero when z~ sits at the end the exact extreme is at), plus the
evaluation error of h'(z~), gamma_8 (1 + |s|) (u - l).

CROWN's slope choices (Zhang et al., "Efficient Neural Network Robustness Certification with
General Activation Functions", NeurIPS 2018, Table 1 and Section 3.2): the upper line of a convex
piece is its chord; a ReLU's lower slope is 1 if u >= -l else 0 ("adaptive"); an S-shaped
function's line on its convex (concave) side is the chord or the tangent at the midpoint, and on
an interval crossing 0 it is the chord when that is valid, else the tangent through the far end
point (found by bisection here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.graph import Activation, apply_activation
from verifier.rounding import gamma

_BISECTION_STEPS = 12
"""Bisection steps for an S-shaped function's tangent through an end point (tightness only)."""
_NEWTON_STEPS = 3
"""Newton steps after the bisection: the tangent point to machine precision, so that its
implicit gradient (`_attach`) is the gradient of the computed slope."""


@dataclass(frozen=True, eq=False)
class Line:
    """slope * z + intercept, elementwise; `slack` bounds how far it may be off in proof mode.

    A lower line satisfies slope*z + intercept - slack <= f(z) on the element's enclosure, an
    upper line slope*z + intercept + slack >= f(z).
    """

    slope: Tensor
    intercept: Tensor
    slack: Tensor | None = None
    zero: bool = False
    """Whether the intercept is exactly zero everywhere (ReLU's and LeakyReLU's lower line)."""


@dataclass(frozen=True, eq=False)
class Relaxation:
    """The lower and upper line of one activation on its input enclosure."""

    lower: Line
    upper: Line


def _derivative(op: Activation, z: Tensor) -> Tensor:
    """f'(z) of a sigmoid or tanh."""
    if op.function == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    t = torch.tanh(z)
    return 1 - t * t


def _peak_slope(op: Activation) -> float:
    """The largest slope of f: f'(0) for S-shaped functions, 1 for the piecewise-linear ones."""
    return 0.25 if op.function == "sigmoid" else 1.0


def slope_range(op: Activation) -> tuple[float, float]:
    """Sensible slopes for an optimiser: any slope is valid, these are the useful ones."""
    if op.function == "leaky_relu":
        return op.alpha, 1.0
    return 0.0, _peak_slope(op)


def _critical(op: Activation, slope: Tensor) -> Tensor:
    """z_c >= 0 where f'(z_c) = slope (S-shaped f); +inf for slope <= 0, 0 above f'(0)."""
    if op.function == "sigmoid":
        return 2 * torch.atanh(torch.sqrt(torch.clamp(1 - 4 * slope, 0.0, 1.0)))
    return torch.atanh(torch.sqrt(torch.clamp(1 - slope, 0.0, 1.0)))


def _extremes(
    op: Activation, slope: Tensor, lo: Tensor, up: Tensor, track: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(min, max) over [lo, up] of h(z) = f(z) - slope*z, and their proof-mode slacks.

    The critical point is detached from the slope (at an interior extreme dh/dz = 0, so the
    intercept's gradient does not depend on it) but not from the ends it is clamped to.
    """

    def h(z: Tensor) -> Tensor:
        return apply_activation(op, z) - slope * z

    ends = (h(lo), h(up))
    fn = op.function
    if fn in ("relu", "leaky_relu"):
        low_point, high_point = torch.clamp(torch.zeros_like(lo), lo, up), up
    elif fn == "clip":
        low_point = torch.clamp(torch.full_like(lo, op.low), lo, up)
        high_point = torch.clamp(torch.full_like(lo, op.high), lo, up)
    else:
        z_c = _critical(op, slope.detach())
        low_point, high_point = torch.clamp(-z_c, lo, up), torch.clamp(z_c, lo, up)
    low = torch.minimum(torch.minimum(*ends), h(low_point))
    high = torch.maximum(torch.maximum(*ends), h(high_point))
    if not track:
        return low, high, None, None
    f_mag = torch.maximum(apply_activation(op, lo).abs(), apply_activation(op, up).abs())
    z_mag = torch.maximum(lo.abs(), up.abs())
    base = gamma(6) * (f_mag + slope.abs() * z_mag)
    if fn not in ("sigmoid", "tanh"):
        return low, high, base, base
    # h is concave on [0, inf) and convex on (-inf, 0], so its tangent at the candidate bounds
    # it there from above (below): the exact max over [max(l, 0), u] is at most
    # h(z~) + max(0, h'(z~) (u - z~), h'(z~) (max(l, 0) - z~)); zero where z~ is clamped to an
    # end that the exact critical point is clamped to as well
    zero = torch.zeros_like(low)
    width = up - lo
    miss = gamma(8) * (1 + slope.abs()) * width
    rise = _derivative(op, high_point) - slope
    reach = torch.maximum(rise * (up - high_point), rise * (torch.clamp(lo, min=0) - high_point))
    high_slack = base + miss + torch.where(up > 0, torch.clamp(reach, min=0), zero)
    rise = _derivative(op, low_point) - slope
    reach = torch.minimum(rise * (lo - low_point), rise * (torch.clamp(up, max=0) - low_point))
    low_slack = base + miss + torch.where(lo < 0, torch.clamp(-reach, min=0), zero)
    return low, high, low_slack, high_slack


def _chord(op: Activation, lo: Tensor, up: Tensor) -> Tensor:
    """(f(u) - f(l)) / (u - l), or a one-sided derivative where u == l."""
    width = up - lo
    flat = width <= 0
    rise = apply_activation(op, up) - apply_activation(op, lo)
    chord = rise / torch.where(flat, torch.ones_like(width), width)
    if op.function in ("sigmoid", "tanh"):
        at_point = _derivative(op, lo)
    elif op.function == "clip":
        at_point = ((lo >= op.low) & (lo < op.high)).to(lo.dtype)
    else:
        at_point = torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, op.alpha))
    return torch.where(flat, at_point, chord)


def _s_upper_slope(op: Activation, lo: Tensor, up: Tensor) -> Tensor:
    """CROWN's upper slope of an S-shaped f on [lo, up]."""
    chord = _chord(op, lo, up)
    mid = _derivative(op, (lo + up) / 2)
    cross = (lo < 0) & (up > 0)
    chord_ok = _derivative(op, up) >= chord
    # tangent at d in [0, up] through (lo, f(lo)): g(d) = f(d) + f'(d)(lo - d) - f(lo) rises
    # in d on [0, up]; bisection keeps g(hi) >= 0 (any d is valid: the intercept is refitted)
    need = cross & ~chord_ok
    safe_lo = torch.where(need, lo, -torch.ones_like(lo)).detach()
    safe_up = torch.where(need, up, torch.ones_like(up)).detach()
    f_lo = apply_activation(op, safe_lo)
    a, b = torch.zeros_like(safe_lo), safe_up
    for _ in range(_BISECTION_STEPS):
        d = (a + b) / 2
        g = apply_activation(op, d) + _derivative(op, d) * (safe_lo - d) - f_lo
        a, b = torch.where(g >= 0, a, d), torch.where(g >= 0, d, b)
    for _ in range(_NEWTON_STEPS):  # polish to the exact tangent point, kept in the bracket
        g = apply_activation(op, b) + _derivative(op, b) * (safe_lo - b) - f_lo
        rate = _second_derivative(op, b) * (safe_lo - b)
        step = g / torch.where(rate > 0, rate, torch.ones_like(rate))
        b = torch.where(rate > 0, torch.clamp(b - step, a, safe_up), b)
    tangent = _derivative(op, _attach(op, b, lo, need))
    crossing = torch.where(chord_ok, chord, tangent)
    return torch.where(up <= 0, chord, torch.where(lo >= 0, mid, crossing))


def _second_derivative(op: Activation, z: Tensor) -> Tensor:
    """f''(z) of a sigmoid or tanh."""
    if op.function == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s) * (1 - 2 * s)
    t = torch.tanh(z)
    return -2 * t * (1 - t * t)


def _attach(op: Activation, d: Tensor, lo: Tensor, need: Tensor) -> Tensor:
    """The bisection's tangent point d (a detached value) with its implicit gradient in lo.

    d solves G(d, l) = f(d) + f'(d)(l - d) - f(l) = 0, so dd/dl = -(f'(d) - f'(l)) / G_d with
    G_d = f''(d)(l - d); the value stays d exactly (G's value is added and taken away).
    """
    g = apply_activation(op, d) + _derivative(op, d) * (lo - d) - apply_activation(op, lo)
    slope = (_second_derivative(op, d) * (lo - d)).detach()
    usable = need & (slope.abs() > 1e-12)
    step = (g - g.detach()) / torch.where(usable, slope, torch.ones_like(slope))
    return d - torch.where(usable, step, torch.zeros_like(step))


def default_slopes(op: Activation, lo: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """CROWN's (lower, upper) slopes on [lo, up] ("adaptive").

    Args:
        op: the activation.
        lo: lower ends of the input enclosure.
        up: upper ends, same shape.

    Returns:
        (lower slope, upper slope), each of lo's shape.
    """
    fn = op.function
    if fn in ("sigmoid", "tanh"):
        return _s_upper_slope(op, -up, -lo), _s_upper_slope(op, lo, up)
    chord = _chord(op, lo, up)
    one = torch.ones_like(lo)
    if fn in ("relu", "leaky_relu"):
        alpha = torch.where(up >= -lo, one, torch.full_like(lo, op.alpha))
        return alpha, chord  # `relax_activation` puts 1 or alpha on definite inputs
    # clip: convex below `high`, concave above `low`; the kink crossed picks the adaptive side
    cross_low = (lo < op.low) & (up > op.low)
    cross_high = (lo < op.high) & (up > op.high)
    zero = torch.zeros_like(lo)
    lower = torch.where(
        cross_low & ~cross_high, torch.where(up - op.low >= op.low - lo, one, zero), chord
    )
    upper = torch.where(
        cross_high & ~cross_low, torch.where(op.high - lo >= up - op.high, one, zero), chord
    )
    return lower, upper


def relax_activation(
    op: Activation,
    lo: Tensor,
    up: Tensor,
    *,
    lower_slope: Tensor | None = None,
    upper_slope: Tensor | None = None,
    track: bool = False,
) -> Relaxation:
    """Lower and upper lines of the activation on [lo, up], valid for any given slopes.

    Args:
        op: the activation.
        lo: lower ends of the input enclosure (sound: in proof mode already widened).
        up: upper ends, same shape.
        lower_slope: slopes of the lower line (broadcastable against lo, e.g. with a leading
            row axis), or None for CROWN's.
        upper_slope: slopes of the upper line, or None for CROWN's.
        track: also return each line's proof-mode slack.

    Returns:
        The relaxation; intercepts are the tightest for the slopes.
    """
    if op.function == "relu" and lower_slope is None and upper_slope is None and not track:
        return _relax_relu(lo, up)
    if lower_slope is None or upper_slope is None:
        default_lower, default_upper = default_slopes(op, lo, up)
        lower_slope = default_lower if lower_slope is None else lower_slope
        upper_slope = default_upper if upper_slope is None else upper_slope
    if op.function in ("relu", "leaky_relu"):
        return _relax_kinked(op, lo, up, lower_slope, upper_slope, track)
    low, _, low_slack, _ = _extremes(op, lower_slope, lo, up, track)
    _, high, _, high_slack = _extremes(op, upper_slope, lo, up, track)
    return Relaxation(Line(lower_slope, low, low_slack), Line(upper_slope, high, high_slack))


def _relax_relu(lo: Tensor, up: Tensor) -> Relaxation:
    """CROWN's adaptive ReLU lines in few tensor ops (the search loop's hot path).

    With u+ = max(u, 0) and l- = min(l, 0): upper slope u+ / (u+ - l-) (1 on active inputs,
    0 on dead ones, the chord on crossing ones), refitted intercept max(-s l-, (1 - s) u+)
    (the same extremes as `_extremes`), lower slope 1 where u+ + l- >= 0 else 0, intercept 0.
    """
    u_pos, l_neg = torch.clamp(up, min=0), torch.clamp(lo, max=0)
    span = u_pos - l_neg
    slope = u_pos / torch.where(span > 0, span, torch.ones_like(span))
    high = torch.maximum(-slope * l_neg, (1 - slope) * u_pos)
    alpha = (u_pos + l_neg >= 0).to(lo.dtype)
    lower = Line(alpha, torch.zeros_like(alpha), zero=True)
    return Relaxation(lower, Line(slope, high))


def _relax_kinked(
    op: Activation, lo: Tensor, up: Tensor, lower_slope: Tensor, upper_slope: Tensor, track: bool
) -> Relaxation:
    """ReLU and LeakyReLU: only a crossing input has a choice; a definite one is the function.

    The lower line through the kink with a slope in [alpha, 1] has intercept exactly 0 (the
    minimum of f(z) - s z over an interval containing 0 is at 0) and no slack. On a definite
    input both lines are the function itself: slope exactly 1 or alpha, intercept computed as
    f(z) - s z = 0 exactly, so no slack either.
    """
    cross = (lo < 0) & (up > 0)
    definite = torch.where(lo >= 0, torch.ones_like(lo), torch.full_like(lo, op.alpha))
    lower_slope = torch.where(cross, torch.clamp(lower_slope, op.alpha, 1.0), definite)
    upper_slope = torch.where(cross, upper_slope, definite)
    _, high, _, high_slack = _extremes(op, upper_slope, lo, up, track)
    zero = torch.zeros_like(high)
    if high_slack is not None:
        high_slack = torch.where(cross, high_slack, zero)
    low_slack = zero if track else None
    lower = Line(lower_slope, torch.zeros_like(lower_slope), low_slack, zero=True)
    return Relaxation(lower, Line(upper_slope, high, high_slack))


@dataclass(frozen=True, eq=False)
class ProductRelaxation:
    """Lines of z = a*b over a box: coef_a*a + coef_b*b + low <= z <= same + high."""

    coef_a: Tensor
    coef_b: Tensor
    low: Tensor
    high: Tensor
    slack: Tensor | None = None


def relax_product(
    a_lo: Tensor, a_up: Tensor, b_lo: Tensor, b_up: Tensor, *, track: bool = False
) -> ProductRelaxation:
    """McCormick-style lines of a*b on [a_lo, a_up] x [b_lo, b_up], tightest for their slopes.

    The slopes are the centres (coefficient of a: b's centre; of b: a's centre), the average of
    the two McCormick planes on each side. a*b - ca*a - cb*b is bilinear, so its extremes over
    the box are at the four vertices: the intercepts are their min and max, valid for any
    computed slopes. Proof-mode slack: each vertex value takes three roundings,
    gamma_4 (|a||b| + |cb||a| + |ca||b|) at the magnitudes.

    Args:
        a_lo: lower ends of a; a_up, b_lo, b_up likewise (broadcastable to one shape).
        a_up: upper ends of a.
        b_lo: lower ends of b.
        b_up: upper ends of b.
        track: also return the proof-mode slack.

    Returns:
        The relaxation, broadcast to the product's shape.
    """
    coef_a, coef_b = (b_lo + b_up) / 2, (a_lo + a_up) / 2
    values = [a * b - coef_a * a - coef_b * b for a in (a_lo, a_up) for b in (b_lo, b_up)]
    stacked = torch.stack(torch.broadcast_tensors(*values))
    low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
    slack = None
    if track:
        a_mag = torch.maximum(a_lo.abs(), a_up.abs())
        b_mag = torch.maximum(b_lo.abs(), b_up.abs())
        slack = gamma(4) * (a_mag * b_mag + coef_a.abs() * a_mag + coef_b.abs() * b_mag)
    coef_a, coef_b = (
        torch.broadcast_tensors(coef_a, low)[0],
        torch.broadcast_tensors(coef_b, low)[0],
    )
    return ProductRelaxation(coef_a, coef_b, low, high, slack)
