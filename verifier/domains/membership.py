"""Membership in a zonotope, exactly: the coefficients ε by projected Newton, and the float64 /
rational residual test (see `verifier.domains.zonotope` for the method and its exactness).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from verifier.rounding import gamma

INWARD = 2.0**-16
"""Projected points land in the box part shrunk by this fraction of its half-width, so that a
later `contains` (which re-solves ε) certifies them despite rounding."""


NEWTON_ITERATIONS = 200


NUDGE_STEPS = 40


@dataclass(frozen=True, eq=False)
class FlatZonotope:
    """A zonotope's tensors flattened in name order, float64 on the CPU."""

    names: list[str]
    shapes: list[torch.Size]
    lower: Tensor  # (p,)
    upper: Tensor  # (p,)
    generators: Tensor  # (k, p)


def certify_membership(point: Tensor, flat: FlatZonotope, atol: float) -> bool:
    """True only if the point lies in T (box part widened by atol), proved exactly."""
    # the solver stops on the boundary of the zone it aims at, so aim inside first
    zones = [shrunk_box(flat.lower, flat.upper, INWARD)]
    if atol > 0:
        zones.append((flat.lower - atol / 2, flat.upper + atol / 2))
    zones.append((flat.lower - atol, flat.upper + atol))
    for lo, up in zones:
        eps = solve_coefficients(point, lo, up, flat.generators)
        if bool(residual_inside(point, eps, flat, atol=atol).all()):
            return True
        if flat.generators.shape[0] == 0:
            return False
    return False


def shrunk_box(lower: Tensor, upper: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """[lower, upper] shrunk toward its midpoint by `fraction` of the half-width (a subset)."""
    margin = fraction * (upper - lower) / 2
    return lower + margin, upper - margin


def _dead_zone(v: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """v minus its clamp into [lower, upper]: the signed distance outside the box."""
    return torch.clamp(v - upper, min=0) - torch.clamp(lower - v, min=0)


def solve_coefficients(point: Tensor, lower: Tensor, upper: Tensor, generators: Tensor) -> Tensor:
    """ε ∈ [-1, 1]^k minimising f(ε) = Σ_i dist(point_i - (Gᵀε)_i, [lower_i, upper_i])^2.

    Projected Newton on the convex piecewise-quadratic f (Bertsekas, "Projected Newton
    methods for optimization problems with simple constraints", SIAM J. Control Optim. 1982):
    the generalised Hessian is 2 G_S G_Sᵀ over the entries S outside the box; bounds that are
    active with the gradient pointing out are fixed; Armijo (1e-4) halving along the
    projection arc. Tolerances: see the module docstring.

    Args:
        point: θ, flattened, float64, shape (p,).
        lower: box-part lower corner (the dead zone), shape (p,).
        upper: box-part upper corner, shape (p,).
        generators: G, shape (k, p).

    Returns:
        ε, float64, shape (k,).
    """
    k = generators.shape[0]
    eps = torch.zeros(k, dtype=torch.float64)
    if k == 0 or point.numel() == 0:
        return eps

    def objective(e: Tensor) -> tuple[Tensor, Tensor]:
        w = _dead_zone(point - e @ generators, lower, upper)
        return w, w @ w

    w, f = objective(eps)
    for _ in range(NEWTON_ITERATIONS):
        if float(f) == 0.0:
            break
        grad = -2.0 * (generators @ w)
        fixed = ((eps <= -1.0) & (grad > 0)) | ((eps >= 1.0) & (grad < 0))
        free = ~fixed
        projected = torch.where(free, grad, torch.zeros_like(grad))
        if float(projected.abs().max()) == 0.0:
            break
        outside = w != 0
        gs = generators[:, outside]
        hessian = 2.0 * (gs @ gs.T)
        direction = torch.zeros_like(eps)
        if bool(free.any()):
            h_free = hessian[free][:, free]
            damping = 1e-12 * float(torch.diagonal(h_free).sum()) + 1e-300
            h_free = h_free + damping * torch.eye(int(free.sum()), dtype=torch.float64)
            direction[free] = torch.linalg.solve(h_free, -grad[free])
        step, accepted = 1.0, False
        while step >= 1e-12:
            trial = torch.clamp(eps + step * direction, -1.0, 1.0)
            w_trial, f_trial = objective(trial)
            if float(f_trial) <= float(f) + 1e-4 * float(grad @ (trial - eps)):
                accepted = True
                break
            step /= 2
        if not accepted:
            # Newton failed on a kink: one projected-gradient step with Armijo halving
            step = 1.0 / (float(hessian.diagonal().max()) + 1e-300)
            while step >= 1e-30:
                trial = torch.clamp(eps - step * grad, -1.0, 1.0)
                w_trial, f_trial = objective(trial)
                if float(f_trial) <= float(f) + 1e-4 * float(grad @ (trial - eps)):
                    accepted = True
                    break
                step /= 2
            if not accepted:
                break
        decrease = float(f) - float(f_trial)
        eps, w, f = trial, w_trial, f_trial
        if decrease <= 1e-15 * float(f) and float(f) > 0:
            break
    return eps


def residual_inside(point: Tensor, eps: Tensor, flat: FlatZonotope, *, atol: float = 0.0) -> Tensor:
    """Exactly decide lower_i - atol <= point_i - Σ_k G_ki ε_k <= upper_i + atol, per entry.

    Float64 first: the computed residual differs from the exact one by at most
    γ_{k+4} (|point| + Σ|G||ε| + |lower| + |upper| + atol), doubled to cover the rounding of the
    comparisons themselves; entries within that of a corner are decided with rationals.
    """
    k = flat.generators.shape[0]
    if k == 0 and atol == 0.0:
        return (point >= flat.lower) & (point <= flat.upper)  # float comparisons are exact
    if k:
        shift = eps @ flat.generators
        mass = eps.abs() @ flat.generators.abs()
    else:
        shift = torch.zeros_like(point)
        mass = torch.zeros_like(point)
    residual = point - shift
    lo, up = flat.lower - atol, flat.upper + atol
    slack = 2.0 * gamma(k + 4) * (point.abs() + mass + lo.abs() + up.abs() + atol)
    inside = (residual >= lo + slack) & (residual <= up - slack)
    outside = (residual < lo - slack) | (residual > up + slack) | torch.isnan(residual)
    undecided = torch.nonzero(~inside & ~outside).flatten().tolist()
    if undecided:
        eps_q = [Fraction(float(e)) for e in eps.tolist()]
        columns = flat.generators[:, undecided].T.tolist() if k else [[] for _ in undecided]
        atol_q = Fraction(atol)
        for i, column in zip(undecided, columns, strict=True):
            exact = Fraction(float(point[i])) - sum(
                (Fraction(g) * e for g, e in zip(column, eps_q, strict=True)), Fraction(0)
            )
            ok = Fraction(float(flat.lower[i])) - atol_q <= exact
            ok = ok and exact <= Fraction(float(flat.upper[i])) + atol_q
            inside[i] = ok
    return inside
