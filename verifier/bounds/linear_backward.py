"""One back-substitution pass: linear bounds on a tensor of a `Graph` over a weight box.

Starting from coefficients L on a target tensor (the margin rows at the logits, or +-identity
rows at a pre-activation), the pass walks the ops backward in reverse topological order. Every
op maps the coefficients on its output to coefficients on its inputs plus a constant per row,
such that L_out . out >= sum over inputs of L_in . in + constant for every weight in the box and
every input in its enclosure. A tensor read by several ops sums the coefficients of all of them;
a tensor that does not depend on the box (a point) is concretised at once, so the walk stops at
the first boxed layer. Rules (`verifier.bounds.linear` derives the rounding charges):

* Linear, Conv: `verifier.bounds.linear_affine` (weight box, chord on inputs crossing zero).
* Activation: the two lines of `verifier.bounds.linear_relax`; L+ takes the lower line, L- the
  upper one.
* Elementwise with a constant: affine (add, sub, mul, x/c); c/x is concretised at its output
  with the interval bounds (the IBP fallback: its output is treated as an independent variable).
* Reshape, Transpose, Pad, Slice, Concat: coefficients are moved (reshaped, inverse-permuted,
  cropped, scattered into zeros, split); Pad's constant adds value * (coefficients on the pad).
* Average Pool: the transposed pooling (autograd of the linear map).
* Max Pool: lower line max >= x_k with k the window's entry of largest lower bound (L+ flows
  there); upper side concretised at the output's upper bound (L- * u).
* Binary add/sub: coefficients flow to both inputs (summed over broadcast axes); mul: the
  averaged McCormick planes of `relax_product`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from verifier.bounds.linear_affine import BoxCache, backward_affine, concretise_shared_weight
from verifier.bounds.linear_ledger import Enclosure, Ledger, row_dot, row_sum
from verifier.bounds.linear_relax import Relaxation, relax_activation, relax_product
from verifier.errors import GraphError
from verifier.graph import (
    Activation,
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
    Slice,
    Transpose,
    pool2d,
)

Slopes = Mapping[str, tuple[Tensor | None, Tensor | None]]
"""Activation node -> (lower slopes, upper slopes), each (batch, rows, *shape) or None."""


class BackSubstitution:
    """Linear bounds on any tensor of the graph, from fixed enclosures of every tensor.

    Args:
        graph: the network.
        enclosures: tensor name -> enclosure (every tensor the pass may reach).
        boxes: the affine ops' parameter boxes.
        track: proof mode (charge rounding to the ledger).
    """

    def __init__(
        self,
        graph: Graph,
        enclosures: Mapping[str, Enclosure],
        boxes: BoxCache,
        *,
        track: bool,
    ) -> None:
        self.graph = graph
        self.enclosures = enclosures
        self.boxes = boxes
        self.track = track
        self._relaxations: dict[str, Relaxation] = {}
        self._index = {op.output: i for i, op in enumerate(graph.ops)}

    def run(
        self,
        target: str,
        lam: Tensor,
        *,
        slopes: Slopes | None = None,
        extra: Mapping[str, Tensor] | None = None,
        capture: Collection[str] = (),
    ) -> Ledger:
        """Lower-bound lam . target for every weight in the box.

        Args:
            target: a tensor name.
            lam: coefficients, shape (batch, rows, *target_shape).
            slopes: per-row activation slopes overriding CROWN's (the optimiser's), or None.
            extra: coefficients (batch, rows, *shape) on tensors upstream of the target, added
                to the objective: the pass bounds lam . target + sum extra . tensor (branch and
                bound's Lagrangian terms on split pre-activations, `verifier.bounds.bab`).
            capture: tensor names whose total coefficients the pass keeps in
                `ledger.captured` (branching scores).

        Returns:
            The ledger: `const` is the lower bound of each row, `rounding()` its allowance.
        """
        ledger = Ledger(lam.shape[0], lam.shape[1], lam, track=self.track)
        pending: dict[str, Tensor] = {}
        self._send(target, lam, pending, ledger)
        for name, coefficients in (extra or {}).items():
            self._send(name, coefficients, pending, ledger)
        stop = self._index.get(target, -1)
        for op in reversed(self.graph.ops[: stop + 1]):
            out = pending.pop(op.output, None)
            if out is not None:
                if op.output in capture:
                    ledger.captured[op.output] = out
                self._step(op, out, pending, ledger, slopes)
        for name, rest in pending.items():  # only the graph input can be left, and it is a point
            self._concretise(name, rest, ledger)
        return ledger

    def _send(self, name: str, lam: Tensor, pending: dict[str, Tensor], ledger: Ledger) -> None:
        """Hand coefficients to a tensor: concretise a point, else add them to its pending sum."""
        enc = self.enclosures[name]
        if enc.point is not None:
            self._concretise(name, lam, ledger)
            return
        if name not in pending:
            pending[name] = lam
            return
        total = pending[name] + lam
        pending[name] = total
        if self.track:
            assert enc.magnitude is not None
            n = enc.numel()
            ledger.charge(1, n + 1, row_dot(total.abs(), enc.magnitude))

    def _concretise(self, name: str, lam: Tensor, ledger: Ledger) -> None:
        """Bound lam . t by the enclosure of t (its computed value for a point)."""
        enc = self.enclosures[name]
        n = enc.numel()
        if enc.point is not None:
            ledger.add(row_dot(lam, enc.point))
            if self.track:
                assert enc.magnitude is not None and enc.error is not None
                abs_lam = lam.abs()
                ledger.charge(n, n + 1, row_dot(abs_lam, enc.magnitude))
                ledger.charge(0, n + 1, row_dot(abs_lam, enc.error))
            return
        # L+ l + L- u = L l + L- (u - l)
        negative = torch.clamp(lam, max=0)
        ledger.add(row_dot(lam, enc.lower) + row_dot(negative, enc.upper - enc.lower))
        if self.track:
            assert enc.magnitude is not None
            # L l + L- (u - l): one subtraction, two dot products of n terms, their sum
            ledger.charge(n + 2, n + 2, 3 * row_dot(lam.abs(), enc.magnitude))

    def _step(
        self,
        op: Op,
        lam: Tensor,
        pending: dict[str, Tensor],
        ledger: Ledger,
        slopes: Slopes | None,
    ) -> None:
        """Move lam from op's output to its inputs."""
        batch, rows = lam.shape[:2]
        if isinstance(op, Binary | Concat):
            self._join(op, lam, pending, ledger)
            return
        name = op.inputs[0]
        enc = self.enclosures[name]
        if isinstance(op, Linear | Conv):
            if enc.point is not None and isinstance(op, Linear) and enc.lower.dim() == 2:
                self._concretise(op.output, lam, ledger)  # exact in its interval enclosure
            elif enc.point is not None:
                concretise_shared_weight(self.boxes.get(op), lam, enc, ledger)
            else:
                self._send(
                    name, backward_affine(self.boxes.get(op), lam, enc, ledger), pending, ledger
                )
            return
        if isinstance(op, Activation):
            self._send(name, self._activation(op, lam, enc, ledger, slopes), pending, ledger)
            return
        if isinstance(op, Elementwise):
            lam_h = self._elementwise(op, lam, enc, ledger)
            if lam_h is not None:
                self._send(name, lam_h, pending, ledger)
            return
        if isinstance(op, Reshape):
            self._send(name, lam.reshape(batch, rows, *enc.shape), pending, ledger)
            return
        if isinstance(op, Pool):
            self._send(name, self._pool(op, lam, enc, ledger), pending, ledger)
            return
        if isinstance(op, Transpose):
            inverse = [0] * len(op.perm)
            for k, axis in enumerate(op.perm):
                inverse[axis] = k
            order = [0, 1, *(inverse[j] + 1 for j in range(1, len(op.perm)))]
            self._send(name, lam.permute(*order), pending, ledger)
            return
        if isinstance(op, Pad):
            self._send(name, self._pad(op, lam, enc, ledger), pending, ledger)
            return
        if isinstance(op, Slice):
            lam_h = lam.new_zeros((batch, rows, *enc.shape))
            index: list[slice] = [slice(None)] * lam_h.dim()
            index[op.axis + 1] = slice(op.start, op.stop, op.step)
            lam_h[tuple(index)] = lam
            self._send(name, lam_h, pending, ledger)
            return
        raise GraphError(f"node '{op.node}': the linear bound engine cannot handle op {op.kind}")

    def _activation(
        self,
        op: Activation,
        lam: Tensor,
        enc: Enclosure,
        ledger: Ledger,
        slopes: Slopes | None,
    ) -> Tensor:
        chosen = None if slopes is None else slopes.get(op.node)
        if chosen is None:
            if op.node not in self._relaxations:
                self._relaxations[op.node] = relax_activation(
                    op, enc.lower, enc.upper, track=self.track
                )
            relax = self._relaxations[op.node]
        else:
            lo, up = enc.lower.unsqueeze(1), enc.upper.unsqueeze(1)
            relax = relax_activation(
                op, lo, up, lower_slope=chosen[0], upper_slope=chosen[1], track=self.track
            )
        per_row = chosen is not None
        lower, upper = relax.lower, relax.upper
        # L+ s_lo + L- s_up = L s_lo + L- (s_up - s_lo); likewise the intercepts
        negative = torch.clamp(lam, max=0)
        lam_h = lam * _rows(lower.slope, per_row) + negative * _rows(
            upper.slope - lower.slope, per_row
        )
        piece = row_dot(negative, _rows(upper.intercept - lower.intercept, per_row))
        if not lower.zero:
            piece = piece + row_dot(lam, _rows(lower.intercept, per_row))
        ledger.add(piece)
        if self.track:
            assert enc.magnitude is not None
            assert lower.slack is not None and upper.slack is not None
            n = enc.numel()
            positive = lam >= 0
            abs_lam = lam.abs()
            # L s_lo + L- (s_up - s_lo): four roundings per entry; the constant: one
            # subtraction, two dot products of n terms and their sum
            slopes_mag = _rows(lower.slope.abs() + upper.slope.abs(), per_row)
            icpt = _rows(2 * lower.intercept.abs() + upper.intercept.abs(), per_row)
            magnitude = enc.magnitude.unsqueeze(1)
            ledger.charge(n + 4, n + 4, row_sum(abs_lam * (slopes_mag * magnitude + icpt)))
            slack = torch.where(positive, _rows(lower.slack, per_row), _rows(upper.slack, per_row))
            ledger.charge(0, n + 1, row_sum(abs_lam * slack))
        return lam_h

    def _elementwise(
        self, op: Elementwise, lam: Tensor, enc: Enclosure, ledger: Ledger
    ) -> Tensor | None:
        c = op.constant.to(lam)
        n = enc.numel()
        if op.op == "div" and op.constant_first:  # c / x: the IBP fallback at the output
            self._concretise(op.output, lam, ledger)
            return None
        if op.op in ("add", "sub"):
            sign = -1.0 if op.op == "sub" and not op.constant_first else 1.0
            ledger.add(sign * row_sum(lam * c))
            if self.track:
                ledger.charge(n + 1, n + 1, row_sum((lam * c).abs()))
            return -lam if op.op == "sub" and op.constant_first else lam
        lam_h = lam * c if op.op == "mul" else lam / c
        if self.track:
            assert enc.magnitude is not None
            ledger.charge(1, n + 1, row_dot(lam_h.abs(), enc.magnitude))
        return lam_h

    def _pool(self, op: Pool, lam: Tensor, enc: Enclosure, ledger: Ledger) -> Tensor:
        batch, rows = lam.shape[:2]
        flat = lam.reshape(batch * rows, *lam.shape[2:])
        windows = op.kernel[0] * op.kernel[1]
        n_out = math.prod(lam.shape[2:])
        if op.function == "average":
            with torch.enable_grad():
                probe = torch.zeros(
                    (batch * rows, *enc.shape), dtype=lam.dtype, device=lam.device
                ).requires_grad_(True)
                (lam_h,) = torch.autograd.grad(
                    pool2d(op, probe), probe, flat, create_graph=flat.requires_grad
                )
            if self.track:
                assert enc.magnitude is not None
                pooled = pool2d(op, enc.magnitude).unsqueeze(1)
                ledger.charge(windows + 1, windows + n_out + 2, row_sum(lam.abs() * pooled))
            return lam_h.reshape(batch, rows, *enc.shape)
        # max: L+ flows to each window's entry of largest lower bound; L- meets the output's upper
        out_enc = self.enclosures[op.output]
        negative = torch.clamp(lam, max=0)
        ledger.add(row_dot(negative, out_enc.upper))
        top, left, bottom, right = op.pads
        height, width = enc.shape[1] + top + bottom, enc.shape[2] + left + right
        padded = F.pad(enc.lower, (left, right, top, bottom), value=-math.inf)
        _, index = F.max_pool2d(
            padded, op.kernel, op.strides, 0, op.dilations, op.ceil_mode, return_indices=True
        )
        out_h, out_w = lam.shape[-2], lam.shape[-1]
        index = index[..., :out_h, :out_w]
        positive = torch.clamp(lam, min=0)
        target = positive.new_zeros((batch, rows, enc.shape[0], height * width))
        spread = index.flatten(2).unsqueeze(1).expand(batch, rows, -1, -1)
        target = target.scatter_add(3, spread, positive.flatten(3))
        lam_h = target.reshape(batch, rows, enc.shape[0], height, width)
        lam_h = lam_h[..., top : top + enc.shape[1], left : left + enc.shape[2]]
        if self.track:
            assert enc.magnitude is not None and out_enc.magnitude is not None
            pooled = pool2d(op, enc.magnitude).unsqueeze(1)
            ledger.charge(windows, windows + n_out + 2, row_sum(positive * pooled))
            size = row_dot(negative.abs(), out_enc.magnitude)
            ledger.charge(n_out, n_out + 1, size)
        return lam_h

    def _pad(self, op: Pad, lam: Tensor, enc: Enclosure, ledger: Ledger) -> Tensor:
        lam_h = F.pad(lam, [-p for p in op.pads])
        if op.value != 0.0:
            filled = F.pad(lam.new_zeros((1, *enc.shape)), op.pads, value=op.value)
            ledger.add(row_dot(lam, filled))
            n = math.prod(lam.shape[2:])
            ledger.charge(n, n + 1, row_dot(lam.abs(), filled.abs()))
        return lam_h

    def _join(
        self, op: Binary | Concat, lam: Tensor, pending: dict[str, Tensor], ledger: Ledger
    ) -> None:
        encs = [self.enclosures[name] for name in op.inputs]
        if isinstance(op, Concat):
            axis = op.axis % (lam.dim() - 1) + 1
            sizes = [e.lower.shape[axis - 1] for e in encs]
            for name, part in zip(op.inputs, torch.split(lam, sizes, dim=axis), strict=True):
                self._send(name, part, pending, ledger)
            return
        a, b = encs
        if op.op in ("add", "sub"):
            self._send(op.inputs[0], _unbroadcast(op, lam, a), pending, ledger)
            lam_b = _unbroadcast(op, lam, b)
            self._send(op.inputs[1], -lam_b if op.op == "sub" else lam_b, pending, ledger)
            return
        relax = relax_product(a.lower, a.upper, b.lower, b.upper, track=self.track)
        coef_a, coef_b = relax.coef_a.unsqueeze(1), relax.coef_b.unsqueeze(1)
        positive = lam >= 0
        ledger.add(
            row_sum(
                torch.where(positive, lam * relax.low.unsqueeze(1), lam * relax.high.unsqueeze(1))
            )
        )
        if self.track:
            assert a.magnitude is not None and b.magnitude is not None
            assert relax.slack is not None
            n = math.prod(lam.shape[2:])
            a_mag, b_mag = a.magnitude.unsqueeze(1), b.magnitude.unsqueeze(1)
            icpt = torch.maximum(relax.low.abs(), relax.high.abs()).unsqueeze(1)
            size = lam.abs() * (coef_a.abs() * a_mag + coef_b.abs() * b_mag + icpt)
            ledger.charge(n + 1, n + 2, row_sum(size))
            ledger.charge(0, n + 1, row_dot(lam.abs(), relax.slack))
        self._send(op.inputs[0], _unbroadcast(op, lam * coef_a, a), pending, ledger)
        self._send(op.inputs[1], _unbroadcast(op, lam * coef_b, b), pending, ledger)


def _rows(t: Tensor, per_row: bool) -> Tensor:
    """A relaxation tensor against coefficients (batch, rows, *shape): per-sample ones get a
    row axis of 1 (and `row_dot` then takes them as one batched product)."""
    return t if per_row else t.unsqueeze(1)


def _unbroadcast(op: Binary, lam: Tensor, enc: Enclosure) -> Tensor:
    """Sum lam (batch, rows, *out) over the axes the input was broadcast along."""
    out_shape, in_shape = tuple(lam.shape[2:]), enc.shape
    if out_shape == in_shape:
        return lam
    if len(out_shape) != len(in_shape) or enc.lower.shape[0] != lam.shape[0]:
        raise GraphError(
            f"node '{op.node}': the linear bound engine needs both inputs of rank "
            f"{len(out_shape) + 1} with the batch axis; got shape {tuple(enc.lower.shape)}"
        )
    axes = [k + 2 for k, (o, i) in enumerate(zip(out_shape, in_shape, strict=True)) if i != o]
    return lam.sum(dim=axes, keepdim=True)
