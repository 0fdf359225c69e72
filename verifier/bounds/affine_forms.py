"""Affine forms in the zonotope's coefficients ε, and a layer's parameters in that form.

An activation is enclosed by c + Σ_k ε_k a_k + [-r, r] (`AffineForm`, with an optional float64
rounding term); a Linear or Conv layer's weights and bias by centre, radius and generator parts
(`LinearTerms`), built from the zonotope's box corners and generators (`ZonotopeParameters`).
See `verifier.bounds.zonotope` for the propagation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.graph import Graph, Linear
from verifier.rounding import UNIT_ROUNDOFF_64, gamma


@dataclass(frozen=True, eq=False)
class AffineForm:
    """The enclosure c + Σ_k ε_k A_k + [-ρ - e, ρ + e] of an activation, per sample and unit.

    Attributes:
        centre: c, shape (batch, *shape).
        coefficients: A, shape (batch, k, *shape); None means 0.
        radius: ρ >= 0, shape (batch, *shape); None means 0.
        error: e >= 0, the float64 rounding bound (proof mode), else None.
    """

    centre: Tensor
    coefficients: Tensor | None
    radius: Tensor | None
    error: Tensor | None

    def mass(self) -> Tensor | None:
        """Σ_k |A_k|, shape (batch, *shape), or None."""
        return None if self.coefficients is None else self.coefficients.abs().sum(dim=1)

    def magnitude(self) -> Tensor:
        """|c| + Σ_k |A_k| + ρ: a bound on |h| over T (without e)."""
        out = self.centre.abs()
        mass = self.mass()
        if mass is not None:
            out = out + mass
        if self.radius is not None:
            out = out + self.radius
        return out

    def hull(self) -> tuple[Tensor, Tensor]:
        """Sound lower and upper bounds of the form (rounding accounted for in proof mode)."""
        spread = torch.zeros_like(self.centre)
        mass = self.mass()
        if mass is not None:
            spread = spread + mass
        if self.radius is not None:
            spread = spread + self.radius
        if self.error is None:
            return self.centre - spread, self.centre + spread
        k = 0 if self.coefficients is None else self.coefficients.shape[1]
        spread = spread + self.error
        spread = spread + gamma(k + 4) * (self.centre.abs() + spread)
        return self.centre - spread, self.centre + spread

    def reshape(self, shape: tuple[int, ...]) -> AffineForm:
        """The same form with every sample reshaped to `shape`."""
        batch = self.centre.shape[0]

        def per_sample(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(batch, *shape)

        coef = self.coefficients
        if coef is not None:
            coef = coef.reshape(batch, coef.shape[1], *shape)
        return AffineForm(
            self.centre.reshape(batch, *shape),
            coef,
            per_sample(self.radius),
            per_sample(self.error),
        )


@dataclass(frozen=True, eq=False)
class LinearTerms:
    """A Linear op's weight and bias over T, in (n_out, n_in) layout, scales folded in."""

    centre: Tensor
    radius: Tensor | None
    generators: Tensor | None  # (k, n_out, n_in)
    bias_centre: Tensor | None
    bias_radius: Tensor | None
    bias_generators: Tensor | None  # (k, n_out)

    def generator_mass(self) -> Tensor | None:
        return None if self.generators is None else self.generators.abs().sum(dim=0)

    def magnitude(self) -> Tensor:
        """|Wc| + R + Σ_k |G_k|, a bound on |W| over T."""
        out = self.centre.abs()
        if self.radius is not None:
            out = out + self.radius
        mass = self.generator_mass()
        return out if mass is None else out + mass

    def bias_magnitude(self) -> Tensor:
        """|bc| + br + Σ_k |bg_k|, a bound on |b| over T (0 without a bias)."""
        out = torch.zeros_like(self.centre[:, 0])
        if self.bias_centre is not None:
            out = out + self.bias_centre.abs()
        if self.bias_radius is not None:
            out = out + self.bias_radius
        if self.bias_generators is not None:
            out = out + self.bias_generators.abs().sum(dim=0)
        return out


class ZonotopeParameters:
    """Centre, radius and generators of every parameter, in the dtype/device of the inputs."""

    def __init__(
        self,
        graph: Graph,
        lower: Mapping[str, Tensor],
        upper: Mapping[str, Tensor],
        generators: Mapping[str, Tensor],
        like: Tensor,
        proof: bool,
    ) -> None:
        self.graph = graph
        self.lower = lower
        self.upper = upper
        self.generators = generators
        self.like = like
        self.proof = proof

    def cast(self, t: Tensor) -> Tensor:
        return t.to(dtype=self.like.dtype, device=self.like.device)

    def get(self, name: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(centre, radius or None, generators or None) of one parameter."""
        if name not in self.lower:
            return self.cast(self.graph.parameters[name]), None, None
        lo, up = self.cast(self.lower[name]), self.cast(self.upper[name])
        g = self.cast(self.generators[name])
        return (lo + up) / 2, (up - lo) / 2, (g if g.shape[0] > 0 else None)

    def linear(self, op: Linear) -> LinearTerms:
        wc, wr, wg = self.get(op.weight)
        if op.weight_layout == "in_out":
            wc = wc.transpose(0, 1)
            wr = None if wr is None else wr.transpose(0, 1)
            wg = None if wg is None else wg.transpose(1, 2)
        bc: Tensor | None = None
        br: Tensor | None = None
        bg: Tensor | None = None
        if op.bias is not None:
            bc, br, bg = self.get(op.bias)
        if op.scale is not None:
            ws = self.cast(op.scale.weight_scale)
            wc = wc * ws[:, None]
            wr = None if wr is None else wr * ws.abs()[:, None]
            wg = None if wg is None else wg * ws[None, :, None]
            bs = self.cast(op.scale.bias_scale)
            bc = None if bc is None else bc * bs
            br = None if br is None else br * bs.abs()
            bg = None if bg is None else bg * bs[None, :]
            shift = self.cast(op.scale.shift)
            bc = shift if bc is None else bc + shift
        if self.proof:
            # absorb the rounding of (lo+up)/2, (up-lo)/2 and the scales into the box radius
            w_mass = wc.abs() + (0 if wr is None else wr)
            if wg is not None:
                w_mass = w_mass + wg.abs().sum(dim=0)
            wr = (0 if wr is None else wr) + 4 * UNIT_ROUNDOFF_64 * w_mass
            if bc is not None:
                b_mass = bc.abs() + (0 if br is None else br)
                if bg is not None:
                    b_mass = b_mass + bg.abs().sum(dim=0)
                br = (0 if br is None else br) + 4 * UNIT_ROUNDOFF_64 * b_mass
        return LinearTerms(wc, wr, wg, bc, br, bg)
