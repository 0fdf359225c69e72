"""Interval bound propagation through a `Graph` whose parameters lie in a box.

`margin_bounds` is the entry point of the search loop and of proofs: it returns, for every
sample and class j, a lower bound on the margin z_y - z_j valid for every parameter vector in
the box. The margin is folded into the last affine layer (the hidden enclosure h is shared by
z_y and z_j), which is tighter than subtracting logit bounds.

Proof mode (`track_rounding=True`, float64): alongside the enclosure we propagate a bound on
the floating-point error of every computed endpoint (Higham, "Accuracy and Stability of
Numerical Algorithms", Lemma 3.1 / Eq. 3.5: a computed dot product of length n has error at
most gamma_n * sum |a_i b_i|, gamma_n = n u / (1 - n u), u = 2^-53). Per layer:

    e_out = gamma_{4n+8} * (|x|max (x) |w|max + |b|max) * |scale| + (e_in (x) |w|max) * |scale|

where (x) is the layer's own product on magnitudes (4n+8 covers the four partial products of
the sign split, the centre/radius halving, bias, scale and shift). Monotone activations are
Lipschitz (1 for relu and tanh, 1/4 for sigmoid) and add 4 ulp of their output for libm; a
ReLU whose computed upper endpoint plus its error is <= 0 outputs exactly 0 in both the computed
and the exact pass, so its error is 0 (without this, errors of dead units compound through every
later layer like the product of the layers' |W| norms).
`rounding_allowance` returns that bound for each margin; a sample counts as certified only if
its margin lower bound exceeds it (see `verifier.certify`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from verifier.bounds.intervals import Interval, Rule, enclose_bilinear, enclose_matmul
from verifier.bounds.margins import MarginBounds, mask_true_class
from verifier.graph import (
    Activation,
    AffineScale,
    Binary,
    Concat,
    Conv,
    Elementwise,
    Graph,
    Linear,
    Op,
    Pad,
    Pool,
    Reshape,
    apply_activation,
    apply_op,
    conv2d,
    pool2d,
)
from verifier.rounding import UNIT_ROUNDOFF_64, gamma, mapped_error


def parameter_interval(
    name: str,
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    like: Tensor,
) -> Interval:
    """The enclosure of one parameter: its box if boxed, else a point at its value."""
    if name in lower:
        lo = lower[name].to(dtype=like.dtype, device=like.device)
        up = upper[name].to(dtype=like.dtype, device=like.device)
        return Interval(lo, up)
    return Interval.point(graph.parameters[name].to(dtype=like.dtype, device=like.device))


def _channel_shape(ndim: int, axis: int) -> list[int]:
    """[1, .., -1, .., 1]: the shape that broadcasts a per-channel vector along `axis`."""
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def _scaled(interval: Interval, factor: Tensor | None, axis: int) -> Interval:
    if factor is None:
        return interval
    shape = _channel_shape(interval.lower.dim(), axis)
    return interval.scale(factor.to(interval.lower).reshape(shape))


def _affine_rest(
    out: Interval, bias: Interval | None, scale: AffineScale | None, axis: int
) -> Interval:
    """Apply weight_scale, then add bias*bias_scale + shift (exact for interval bias)."""
    shape = _channel_shape(out.lower.dim(), axis)
    if scale is not None:
        out = out.scale(scale.weight_scale.to(out.lower).reshape(shape))
    if bias is not None:
        b = bias if scale is None else bias.scale(scale.bias_scale.to(out.lower))
        out = out.add(Interval(b.lower.reshape(shape), b.upper.reshape(shape)))
    if scale is not None:
        out = out.shift(scale.shift.to(out.lower).reshape(shape))
    return out


def _scale_abs(scale: AffineScale | None, like: Tensor, axis: int) -> Tensor | float:
    if scale is None:
        return 1.0
    return scale.weight_scale.to(like).abs().reshape(_channel_shape(like.dim(), axis))


class _Walker:
    """One pass over the ops; carries the enclosure and, in proof mode, its error bound."""

    def __init__(
        self,
        graph: Graph,
        lower: Mapping[str, Tensor],
        upper: Mapping[str, Tensor],
        rule: Rule,
        track_rounding: bool,
    ) -> None:
        self.graph = graph
        self.lower = lower
        self.upper = upper
        self.rule = rule
        self.track = track_rounding

    def param(self, name: str | None, like: Tensor) -> Interval | None:
        if name is None:
            return None
        return parameter_interval(name, self.graph, self.lower, self.upper, like)

    def affine(
        self, op: Linear | Conv, h: Interval, err: Tensor | None
    ) -> tuple[Interval, Tensor | None]:
        w = self.param(op.weight, h.lower)
        assert w is not None
        b = self.param(op.bias, h.lower)
        if isinstance(op, Linear):
            if op.weight_layout == "in_out":
                w = w.transpose(0, 1)
            out = enclose_matmul(h, w, rule=self.rule)
            axis = -1

            def product(a: Tensor, m: Tensor) -> Tensor:
                return a @ m.transpose(0, 1)
        else:

            def product(a: Tensor, m: Tensor) -> Tensor:
                return conv2d(op, a, m)

            stack = 1 if op.groups == 1 else None
            out = enclose_bilinear(h, w, product, rule=self.rule, stack_axis=stack)
            axis = 1
        out = _affine_rest(out, b, op.scale, axis)
        if not self.track:
            return out, None
        n = w.lower[0].numel()
        w_mag = w.magnitude()
        mag = product(h.magnitude(), w_mag)
        if b is not None:
            b_mag = b.magnitude()
            if op.scale is not None:
                b_mag = b_mag * op.scale.bias_scale.to(b_mag).abs()
            mag = mag + b_mag.reshape(_channel_shape(mag.dim(), axis))
        scale_abs = _scale_abs(op.scale, mag, axis)
        new_err = gamma(4 * n + 8) * mag * scale_abs + UNIT_ROUNDOFF_64 * out.magnitude()
        if err is not None:
            new_err = new_err + product(err, w_mag) * scale_abs
        return out, new_err

    def step(self, op: Op, h: Interval, err: Tensor | None) -> tuple[Interval, Tensor | None]:
        """One single-input op."""
        if isinstance(op, Linear | Conv):
            return self.affine(op, h, err)
        if isinstance(op, Activation):
            out = h.map_monotone(lambda t: apply_activation(op, t))
            if err is not None and op.function in ("sigmoid", "tanh", "leaky_relu"):
                lipschitz = 0.25 if op.function == "sigmoid" else 1.0
                err = mapped_error(err, lipschitz, out.magnitude())
            elif err is not None and op.function == "relu":
                # computed upper + its error <= 0: the exact endpoints are <= 0 as well, so both
                # ReLU outputs are exactly 0 and carry no error (stops dead units compounding it)
                err = torch.where(h.upper + err <= 0, torch.zeros_like(err), err)
            return out, err  # relu and clip compute no new value: the error passes through
        if isinstance(op, Elementwise):
            return self.elementwise(op, h, err)
        if isinstance(op, Reshape):
            shape = (h.lower.shape[0], *op.shape)
            return h.reshape(*shape), None if err is None else err.reshape(shape)
        if isinstance(op, Pool):
            return self.pool(op, h, err)
        # Transpose, Pad, Slice move values without arithmetic; Pad's constant is exact
        out = h.map_monotone(lambda v: apply_op(op, v, {}))
        if err is None:
            return out, None
        return out, apply_op(replace(op, value=0.0) if isinstance(op, Pad) else op, err, {})

    def join(
        self, op: Binary | Concat, hs: list[Interval], errs: list[Tensor | None]
    ) -> tuple[Interval, Tensor | None]:
        """An op that reads several computed tensors."""
        if isinstance(op, Concat):
            out = Interval(
                torch.cat([h.lower for h in hs], dim=op.axis),
                torch.cat([h.upper for h in hs], dim=op.axis),
            )
            if errs[0] is None:
                return out, None
            return out, torch.cat([e for e in errs if e is not None], dim=op.axis)
        a, b = hs
        if op.op == "add":
            out = a.add(b)
        elif op.op == "sub":
            out = Interval(a.lower - b.upper, a.upper - b.lower)
        else:
            corners = torch.stack(
                torch.broadcast_tensors(
                    a.lower * b.lower, a.lower * b.upper, a.upper * b.lower, a.upper * b.upper
                )
            )
            out = Interval(corners.min(dim=0).values, corners.max(dim=0).values)
        if errs[0] is None or errs[1] is None:
            return out, None
        err_a, err_b = errs[0], errs[1]
        if op.op == "mul":  # |(a+da)(b+db) - ab| <= |a||db| + |b||da| + |da||db|
            carried = a.magnitude() * err_b + b.magnitude() * err_a + err_a * err_b
        else:
            carried = err_a + err_b
        return out, carried + UNIT_ROUNDOFF_64 * out.magnitude()

    def elementwise(
        self, op: Elementwise, h: Interval, err: Tensor | None
    ) -> tuple[Interval, Tensor | None]:
        c = op.constant.to(h.lower)
        if op.op == "add":
            out = h.shift(c)
        elif op.op == "sub":
            out = h.scale(torch.tensor(-1.0).to(c)).shift(c) if op.constant_first else h.shift(-c)
        elif op.op == "mul":
            out = h.scale(c)
        elif not op.constant_first:
            out = h.scale(1.0 / c) if h.is_point is False else Interval.point(h.lower / c)
        else:
            lo, up = h.lower, h.upper
            definite = (lo > 0) | (up < 0)
            a, b = c / lo, c / up
            inf = torch.full_like(a, float("inf"))
            out = Interval(
                torch.where(definite, torch.minimum(a, b), -inf),
                torch.where(definite, torch.maximum(a, b), inf),
            )
        if err is None:
            return out, None
        growth = c.abs() if op.op == "mul" else 1.0
        if op.op == "div":
            growth = 1.0 / c.abs() if not op.constant_first else float("inf")
        return out, mapped_error(err, growth, out.magnitude())

    def pool(self, op: Pool, h: Interval, err: Tensor | None) -> tuple[Interval, Tensor | None]:
        out = h.map_monotone(lambda t: pool2d(op, t))
        if err is None:
            return out, None
        if op.function == "max":
            return out, pool2d(op, err)
        window = op.kernel[0] * op.kernel[1]
        return out, pool2d(op, err) + gamma(window + 1) * out.magnitude() * 2


def last_linear_index(graph: Graph) -> int | None:
    """Index of the final Linear op when only shape ops follow it (then margins can fold).

    In a DAG the Linear must also read the output of the op just before it (or the graph
    input), so that `propagate(stop=index)` encloses exactly its input, and the ops after it must
    be a chain of Reshapes from its output to the graph output.

    Args:
        graph: the network.

    Returns:
        The op index, or None when there is no such Linear.
    """
    for i in range(len(graph.ops) - 1, -1, -1):
        op = graph.ops[i]
        if isinstance(op, Linear):
            before = graph.ops[i - 1].output if i else graph.input_name
            tail = graph.ops[i:]
            chained = all(b.inputs == (a.output,) for a, b in zip(tail, tail[1:], strict=False))
            return i if op.inputs == (before,) and chained else None
        if not isinstance(op, Reshape):
            return None
    return None


def propagate(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    *,
    rule: Rule = "exact",
    stop: int | None = None,
    track_rounding: bool = False,
) -> tuple[Interval, Tensor | None]:
    """Enclose the output of ops[:stop] for every parameter vector in the box.

    Walks the DAG in topological order; a tensor read by several ops (a residual branch) is
    enclosed once and shared, which is sound (each use takes the whole enclosure).

    Args:
        graph: the network.
        lower: lower corners of the boxed parameters, keyed by initializer name.
        upper: upper corners, same keys and shapes; other parameters stay at their values.
        x: fixed inputs, shape (batch, *input_shape); dtype and device follow x.
        rule: "exact" interval products or the paper's "midrad".
        stop: evaluate ops[:stop] (default: all).
        track_rounding: also return a bound on the float error of every endpoint.

    Returns:
        (enclosure, error bound or None).
    """
    walker = _Walker(graph, lower, upper, rule, track_rounding)
    env: dict[str, tuple[Interval, Tensor | None]] = {
        graph.input_name: (Interval.point(x), torch.zeros_like(x) if track_rounding else None)
    }
    ops = graph.ops[:stop]
    for op in ops:
        if isinstance(op, Binary | Concat):
            values = [env[name] for name in op.inputs]
            env[op.output] = walker.join(op, [v[0] for v in values], [v[1] for v in values])
        else:
            env[op.output] = walker.step(op, *env[op.inputs[0]])
    return env[ops[-1].output if ops else graph.input_name]


Enclosed = tuple[Interval, Tensor | None]
"""An enclosure of one tensor and, in proof mode, the float error bound of its endpoints."""


def propagate_tensors(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    *,
    rule: Rule = "exact",
    track_rounding: bool = False,
    refine: Callable[[Op, dict[str, Enclosed]], Enclosed | None] | None = None,
) -> dict[str, Enclosed]:
    """Enclose every tensor of the graph for every parameter vector in the box.

    The same walk as `propagate`, keeping every tensor. `refine`, when given, is called after
    each op with the op and the enclosures so far (its output included); a non-None result
    replaces the op's output enclosure before later ops read it. It must return a sound
    enclosure (e.g. the intersection with a tighter bound); the linear-bound engine uses it to
    put back-substituted bounds on pre-activations.

    Args:
        graph: the network.
        lower: lower corners of the boxed parameters, keyed by initializer name.
        upper: upper corners, same keys and shapes.
        x: fixed inputs, shape (batch, *input_shape); dtype and device follow x.
        rule: "exact" interval products or the paper's "midrad".
        track_rounding: also carry a bound on the float error of every endpoint.
        refine: optional hook that may tighten an op's output enclosure.

    Returns:
        Tensor name -> (enclosure, error bound or None), the graph input included.
    """
    walker = _Walker(graph, lower, upper, rule, track_rounding)
    env: dict[str, Enclosed] = {
        graph.input_name: (Interval.point(x), torch.zeros_like(x) if track_rounding else None)
    }
    for op in graph.ops:
        if isinstance(op, Binary | Concat):
            values = [env[name] for name in op.inputs]
            env[op.output] = walker.join(op, [v[0] for v in values], [v[1] for v in values])
        else:
            env[op.output] = walker.step(op, *env[op.inputs[0]])
        if refine is not None and (refined := refine(op, env)) is not None:
            env[op.output] = refined
    return env


def logit_bounds(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    *,
    rule: Rule = "exact",
) -> Interval:
    """Enclose the logits, shape (batch, n_classes), for every parameter vector in the box."""
    return propagate(graph, lower, upper, x, rule=rule)[0]


def margin_bounds(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    rule: Rule = "exact",
    track_rounding: bool = False,
) -> MarginBounds:
    """Lower-bound every margin z_y - z_j over the box, folding the margin into the last layer.

    Sound for every θ with lower <= θ <= upper on the boxed parameters (the others fixed).
    Differentiable with respect to both corners. In proof mode pass float64 inputs and
    `track_rounding=True`.

    Args:
        graph: the network.
        lower: lower corners of the boxed parameters, keyed by initializer name.
        upper: upper corners, same keys and shapes.
        x: inputs, shape (batch, *input_shape).
        y: labels, shape (batch,), int64.
        rule: "exact" or "midrad".
        track_rounding: attach the float64 rounding allowance of every entry.

    Returns:
        MarginBounds with `lower` of shape (batch, n_classes), +inf at the true class.
    """
    last = last_linear_index(graph)
    if last is None:
        logits, err = propagate(graph, lower, upper, x, rule=rule, track_rounding=track_rounding)
        ly = logits.lower.gather(1, y[:, None])
        margins = ly - logits.upper
        rounding = None
        if err is not None:
            rounding = err.gather(1, y[:, None]) + err
            rounding = rounding + 2 * UNIT_ROUNDOFF_64 * margins.abs()
        return mask_true_class(margins, rounding, y)
    h, err = propagate(graph, lower, upper, x, rule=rule, stop=last, track_rounding=track_rounding)
    op = graph.ops[last]
    assert isinstance(op, Linear)
    h = h.reshape(h.lower.shape[0], math.prod(h.lower.shape[1:]))
    w = parameter_interval(op.weight, graph, lower, upper, h.lower)
    if op.weight_layout == "in_out":
        w = w.transpose(0, 1)
    w = _scaled(w, None if op.scale is None else op.scale.weight_scale, 0)
    bias_part = _margin_offset(op, graph, lower, upper, y, h.lower)
    n_classes, n_in = w.lower.shape
    nonnegative: bool | None = None  # h.lower >= 0 everywhere; None: not checked yet
    if rule == "exact" and n_classes * n_classes * n_in <= _PAIR_TABLE_LIMIT:
        if not h.is_point:
            nonnegative = bool((h.lower >= 0).all())
        if h.is_point or nonnegative:
            flat_err = None if err is None else err.flatten(1)
            margins, rounding = _folded_by_class_pairs(h, w, y, flat_err)
            margins = margins + bias_part.lower
            if rounding is not None:
                mag = class_pair_product(h.magnitude(), _pair_magnitude(w), y)
                rounding = rounding + gamma(4 * n_in + 12) * (mag + bias_part.magnitude())
            return mask_true_class(margins, rounding, y)
    # D_j = W_y - W_j, as an interval per sample: (batch, n_classes, n_in)
    wy = Interval(w.lower[y], w.upper[y])
    diff = Interval(
        wy.lower[:, None, :] - w.upper[None, :, :], wy.upper[:, None, :] - w.lower[None, :, :]
    )
    if w.is_point:
        diff = Interval.point(diff.lower)

    def product(a: Tensor, m: Tensor) -> Tensor:
        return torch.einsum("bn,bcn->bc", a, m)

    def crossing(a: Interval, m: Interval) -> Interval:
        al, au = a.lower[:, None, :], a.upper[:, None, :]
        return Interval(
            torch.minimum(al * m.upper, au * m.lower).sum(-1),
            torch.maximum(al * m.lower, au * m.upper).sum(-1),
        )

    margins = enclose_bilinear(
        h, diff, product, rule=rule, crossing=crossing, nonnegative=nonnegative
    ).lower
    margins = margins + bias_part.lower
    rounding = None
    if err is not None:
        n = diff.lower.shape[-1]
        d_mag = diff.magnitude()
        mag = product(h.magnitude(), d_mag) + bias_part.magnitude()
        rounding = gamma(4 * n + 12) * mag + product(err.flatten(1), d_mag)
    return mask_true_class(margins, rounding, y)


_PAIR_TABLE_LIMIT = 4_000_000  # elements of the (class, class, n_in) table


def class_pair_product(a: Tensor, table: Tensor, y: Tensor) -> Tensor:
    """out[b, j] = sum_k a[b, k] * table[y_b, j, k], as one matrix product.

    The table has one row per (true class, other class) pair, so the product costs
    batch * C^2 * n_in, with no per-sample (batch, C, n_in) tensor.

    Args:
        a: shape (batch, n_in).
        table: shape (n_classes, n_classes, n_in).
        y: true classes, shape (batch,), int64.

    Returns:
        Shape (batch, n_classes), in the dtype of the inputs.
    """
    n_classes = table.shape[0]
    flat = a @ table.reshape(n_classes * n_classes, -1).transpose(0, 1)
    pairs = flat.reshape(a.shape[0], n_classes, n_classes)
    return pairs[torch.arange(a.shape[0], device=a.device), y]


def _pair_magnitude(w: Interval) -> Tensor:
    """max |W_y - W_j| over the box, shape (C, C, n_in)."""
    lo = w.lower[:, None, :] - w.upper[None, :, :]
    up = w.upper[:, None, :] - w.lower[None, :, :]
    return torch.maximum(lo.abs(), up.abs())


def _folded_by_class_pairs(
    h: Interval, w: Interval, y: Tensor, err: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Exact lower bound of (W_y - W_j) h for h >= 0 or a point h, without the bias.

    For h_k >= 0 the term h_k d_k (d_k in [dl_k, du_k], independent) is smallest at
    d_k = dl_k, with h_k at its upper end where dl_k < 0 and its lower end where dl_k > 0:
    hl max(dl, 0) + hu min(dl, 0). A point h (either sign) gives h+ dl + h- du.
    """
    dl = w.lower[:, None, :] - w.upper[None, :, :]
    if h.is_point:
        pos, neg = torch.clamp(h.lower, min=0), torch.clamp(h.lower, max=0)
        du = dl if w.is_point else w.upper[:, None, :] - w.lower[None, :, :]
        margins = class_pair_product(pos, dl, y) + class_pair_product(neg, du, y)
    else:
        margins = class_pair_product(h.lower, torch.clamp(dl, min=0), y)
        margins = margins + class_pair_product(h.upper, torch.clamp(dl, max=0), y)
    rounding = None
    if err is not None:
        rounding = class_pair_product(err, _pair_magnitude(w), y)
    return margins, rounding


def _margin_offset(
    op: Linear,
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    y: Tensor,
    like: Tensor,
) -> Interval:
    """Enclose (bias_scale*b + shift)_y - (bias_scale*b + shift)_j, shape (batch, n_classes)."""
    n_out = graph.n_classes
    zero = torch.zeros(n_out, dtype=like.dtype, device=like.device)
    b = Interval.point(zero)
    if op.bias is not None:
        b = parameter_interval(op.bias, graph, lower, upper, like)
    if op.scale is not None:
        b = b.scale(op.scale.bias_scale.to(like)).shift(op.scale.shift.to(like))
    return Interval(b.lower[y][:, None] - b.upper[None, :], b.upper[y][:, None] - b.lower[None, :])
