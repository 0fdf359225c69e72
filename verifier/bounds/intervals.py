"""Exact interval arithmetic for bilinear maps (matrix products and convolutions).

For one output unit, z = sum_k x_k w_k with every x_k in [xl_k, xu_k] and every w_k in
[wl_k, wu_k] independent, the exact range is the sum of the exact per-term ranges
min/max{xl wl, xl wu, xu wl, xu wu}. The per-term minimum splits on the sign of x:

* x >= 0:  min = xl*max(wl, 0) + xu*min(wl, 0),   max = xu*max(wu, 0) + xl*min(wu, 0)
* x <= 0:  min = xl*max(wu, 0) + xu*min(wu, 0),   max = xl*min(wl, 0) + xu*max(wl, 0)
* x a point: centre/radius form, x wc -/+ |x| wr (exact, two products)
* x crossing zero: min = min(xl wu, xu wl), max = max(xl wl, xu wu) (elementwise, no product form)

so a layer costs two bilinear products for a point input and four for a sign-definite input
(post-ReLU, post-sigmoid). Inputs that cross zero use the sign split for their definite
entries and an elementwise pass for the crossing ones. This is tighter than the
midpoint-radius rule (Rump) used in the paper's code, which is offered as `rule="midrad"`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Rule = Literal["exact", "midrad"]
Bilinear = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Interval:
    """The set {v : lower <= v <= upper}, elementwise; a value, never mutated."""

    lower: Tensor
    upper: Tensor

    @classmethod
    def point(cls, value: Tensor) -> Interval:
        """The degenerate interval [value, value]."""
        return cls(value, value)

    @property
    def is_point(self) -> bool:
        """True when lower and upper are the same tensor object (a point, not a box)."""
        return self.lower is self.upper

    def centre(self) -> Tensor:
        """(lower + upper) / 2."""
        return self.lower if self.is_point else (self.lower + self.upper) / 2

    def radius(self) -> Tensor:
        """(upper - lower) / 2."""
        return torch.zeros_like(self.lower) if self.is_point else (self.upper - self.lower) / 2

    def map_monotone(self, fn: Callable[[Tensor], Tensor]) -> Interval:
        """Image under a non-decreasing elementwise function (exact)."""
        if self.is_point:
            return Interval.point(fn(self.lower))
        return Interval(fn(self.lower), fn(self.upper))

    def scale(self, factor: Tensor) -> Interval:
        """Image under multiplication by a constant tensor (any sign; exact)."""
        if self.is_point:
            return Interval.point(self.lower * factor)
        a, b = self.lower * factor, self.upper * factor
        return Interval(torch.minimum(a, b), torch.maximum(a, b))

    def shift(self, offset: Tensor) -> Interval:
        """Image under addition of a constant tensor."""
        if self.is_point:
            return Interval.point(self.lower + offset)
        return Interval(self.lower + offset, self.upper + offset)

    def add(self, other: Interval) -> Interval:
        """Minkowski sum with an independent interval."""
        if self.is_point and other.is_point:
            return Interval.point(self.lower + other.lower)
        return Interval(self.lower + other.lower, self.upper + other.upper)

    def magnitude(self) -> Tensor:
        """max(|lower|, |upper|), an upper bound on |v| over the interval."""
        if self.is_point:
            return self.lower.abs()
        return torch.maximum(self.lower.abs(), self.upper.abs())

    def reshape(self, *shape: int) -> Interval:
        """The same interval with both corners reshaped (a point stays a point)."""
        if self.is_point:
            return Interval.point(self.lower.reshape(shape))
        return Interval(self.lower.reshape(shape), self.upper.reshape(shape))

    def transpose(self, dim0: int, dim1: int) -> Interval:
        """The same interval with two axes of both corners swapped (a point stays a point)."""
        if self.is_point:
            return Interval.point(self.lower.transpose(dim0, dim1))
        return Interval(self.lower.transpose(dim0, dim1), self.upper.transpose(dim0, dim1))


def enclose_bilinear(
    x: Interval,
    weight: Interval,
    product: Bilinear,
    *,
    rule: Rule = "exact",
    crossing: Callable[[Interval, Interval], Interval] | None = None,
    nonnegative: bool | None = None,
    stack_axis: int | None = None,
) -> Interval:
    """Enclose product(x, w) for every x and w in their intervals.

    `product` must be bilinear and a sum of elementwise products in which, for one output,
    every x entry and every w entry appears at most once (a matrix product or a convolution),
    so the per-term ranges add up to the exact range.

    Args:
        x: input enclosure.
        weight: weight enclosure.
        product: the bilinear map, e.g. `lambda x, w: x @ w.T`.
        rule: "exact" (per-sign split) or "midrad" (midpoint-radius, looser).
        crossing: exact enclosure for inputs whose intervals cross zero; when None those
            entries use the sound split xu*wl + xl*wu (looser, still sound).
        nonnegative: whether every entry of x.lower is >= 0, when the caller has already
            checked it (saves a pass over x); None checks here. A wrong True is unsound.
        stack_axis: the input-channel axis of x (1 for an ungrouped convolution), when
            `product` maps x's channels on that axis through w's axis 1 to outputs on w's
            axis 0 and the output's `stack_axis`: the products that share an input are then
            one product of stacked channels (one convolution instead of two or four; each
            output is the same sum of terms, at most twice as many per sum, which the
            rounding allowance of `verifier.bounds.ibp` covers). None: separate products.

    Returns:
        The enclosure of the output.
    """
    if weight.is_point:
        w = weight.lower
        if x.is_point:
            return Interval.point(product(x.lower, w))
        mid, rad = product(x.centre(), w), product(x.radius(), w.abs())
        return Interval(mid - rad, mid + rad)
    if x.is_point:
        wc, wr = weight.centre(), weight.radius()
        if stack_axis is not None and (
            nonnegative if nonnegative is not None else bool((x.lower >= 0).all())
        ):
            # |x| = x: one product with the centre and radius stacked as outputs
            mid, rad = product(x.lower, torch.cat([wc, wr])).chunk(2, dim=stack_axis)
        else:
            mid, rad = product(x.lower, wc), product(x.lower.abs(), wr)
        return Interval(mid - rad, mid + rad)
    if rule == "midrad":
        xc, xr = x.centre(), x.radius()
        wc, wr = weight.centre(), weight.radius()
        mid = product(xc, wc)
        rad = product(xc.abs(), wr) + product(xr, wc.abs()) + product(xr, wr)
        return Interval(mid - rad, mid + rad)
    wl, wu = weight.lower, weight.upper
    zero = torch.zeros((), dtype=wl.dtype, device=wl.device)
    wl_pos, wl_neg = torch.clamp(wl, min=0), torch.clamp(wl, max=0)
    wu_pos, wu_neg = torch.clamp(wu, min=0), torch.clamp(wu, max=0)
    xl, xu = x.lower, x.upper
    if nonnegative is None:
        nonnegative = bool((xl >= 0).all())
    if nonnegative:
        if stack_axis is not None:
            # inputs [xl, xu] stacked on the channel axis, weights [[wl+, wl-], [wu-, wu+]]:
            # the lower corner's two products and the upper's in one product
            stacked = torch.cat(
                [torch.cat([wl_pos, wl_neg], dim=1), torch.cat([wu_neg, wu_pos], dim=1)]
            )
            lower, upper = product(torch.cat([xl, xu], dim=stack_axis), stacked).chunk(
                2, dim=stack_axis
            )
            return Interval(lower, upper)
        lower = product(xl, wl_pos) + product(xu, wl_neg)
        upper = product(xu, wu_pos) + product(xl, wu_neg)
        return Interval(lower, upper)
    pos = xl >= 0
    neg = xu <= 0
    cross = ~(pos | neg)
    pl, pu = torch.where(pos, xl, zero), torch.where(pos, xu, zero)
    nl, nu = torch.where(neg, xl, zero), torch.where(neg, xu, zero)
    lower = product(pl, wl_pos) + product(pu, wl_neg) + product(nl, wu_pos) + product(nu, wu_neg)
    upper = product(pu, wu_pos) + product(pl, wu_neg) + product(nl, wl_neg) + product(nu, wl_pos)
    if bool(cross.any()):
        cl, cu = torch.where(cross, xl, zero), torch.where(cross, xu, zero)
        if crossing is not None:
            part = crossing(Interval(cl, cu), weight)
        else:
            part = Interval(
                product(cu, wl_neg) + product(cl, wu_pos),
                product(cu, wu_pos) + product(cl, wl_neg),
            )
        lower, upper = lower + part.lower, upper + part.upper
    return Interval(lower, upper)


def crossing_matmul(x: Interval, weight: Interval, *, chunk: int = 64) -> Interval:
    """Exact enclosure of x @ w.T for inputs that may cross zero, elementwise.

    Args:
        x: shape (batch, n_in); entries that do not cross zero must be exactly 0.
        weight: shape (n_out, n_in).
        chunk: samples per elementwise pass, bounding memory at chunk*n_out*n_in.

    Returns:
        Enclosure of shape (batch, n_out).
    """
    lows, ups = [], []
    wl, wu = weight.lower.unsqueeze(0), weight.upper.unsqueeze(0)
    for start in range(0, x.lower.shape[0], chunk):
        xl = x.lower[start : start + chunk].unsqueeze(1)
        xu = x.upper[start : start + chunk].unsqueeze(1)
        lows.append(torch.minimum(xl * wu, xu * wl).sum(-1))
        ups.append(torch.maximum(xl * wl, xu * wu).sum(-1))
    return Interval(torch.cat(lows), torch.cat(ups))


def enclose_matmul(x: Interval, weight: Interval, *, rule: Rule = "exact") -> Interval:
    """Enclose x @ w.T for every x and w in their intervals.

    Args:
        x: shape (batch, n_in).
        weight: shape (n_out, n_in).
        rule: "exact" or "midrad".

    Returns:
        Enclosure of shape (batch, n_out), in the dtype of the inputs.
    """

    def product(a: Tensor, w: Tensor) -> Tensor:
        return a @ w.transpose(0, 1)

    return enclose_bilinear(x, weight, product, rule=rule, crossing=crossing_matmul)
