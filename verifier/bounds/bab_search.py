"""The search behind `verifier.bounds.bab`: domains, their bounds, branching and the budget.

See `verifier.bounds.bab` for the method and its soundness argument. Every domain of every
margin is one entry of `Leaves`; a round bounds the children of all margins in one batch
(the batch axis of the back-substitution is the domain axis, each domain reading its sample's
root enclosures), so the result of one margin does not depend on the others.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from verifier.bounds.linear import Intermediate, LinearEngine
from verifier.bounds.linear_backward import BackSubstitution
from verifier.bounds.linear_ledger import Enclosure
from verifier.bounds.linear_relax import default_slopes
from verifier.bounds.margins import MarginBounds
from verifier.errors import InputError
from verifier.graph import Activation, Graph, Linear

CHUNK = 2048
"""Most domains bounded in one pass (memory); chunks are independent, so any size is sound."""
LR_DECAY = 0.98
"""Adam's learning rate shrinks by this factor per step (as alpha-CROWN's schedule)."""
POLISH = 10
POLISH_DECAY = 0.3
"""Polishing runs of an exhausted leaf, the k-th at `POLISH_DECAY`**k times the learning rate
(from its best point, the first Adam steps at the full rate overshoot)."""


@dataclass(frozen=True)
class BabOptions:
    """Options of `bab_margin_bounds`.

    Attributes:
        max_domains: domains bounded per margin (split children and polishing runs; the root
            is free); None: no limit (until the lowest leaf is proved or final).
        timeout_s: seconds per margin (its share of each round's time); None: no limit. A time
            limit makes the result machine-dependent.
        branch_per_round: leaves of one margin split per round (its lowest open leaves).
        steps: Adam steps on alpha and beta per bounding of a child.
        root_steps: Adam steps on alpha at the root.
        lr: Adam learning rate of the lower ReLU slopes alpha.
        beta_lr: Adam learning rate of the multipliers beta.
        intermediate: pre-activation bounds at the root: "ibp" or "crown" (`linear_margin_bounds`).
        stop_at: leaves whose bound exceeds this are not split (0: a margin is proved when every
            leaf is positive); None: keep splitting the lowest leaf until the budget is spent
            (tightness).
    """

    max_domains: int | None = 200
    timeout_s: float | None = None
    branch_per_round: int = 8
    steps: int = 20
    root_steps: int = 40
    lr: float = 0.1
    beta_lr: float = 0.1
    intermediate: Intermediate = "ibp"
    stop_at: float | None = 0.0

    def __post_init__(self) -> None:
        def bad(name: str, expected: str, value: object) -> InputError:
            return InputError(f"branch and bound option {name} must be {expected}; got {value!r}")

        if self.max_domains is not None and (
            not isinstance(self.max_domains, int) or self.max_domains < 0
        ):
            raise bad("max_domains", "an integer >= 0 or None", self.max_domains)
        if self.timeout_s is not None and not (
            isinstance(self.timeout_s, int | float) and self.timeout_s > 0
        ):
            raise bad("timeout_s", "> 0 or None", self.timeout_s)
        for name in ("branch_per_round", "steps", "root_steps"):
            value = getattr(self, name)
            least = 1 if name == "branch_per_round" else 0
            if not isinstance(value, int) or value < least:
                raise bad(name, f"an integer >= {least}", value)
        for name in ("lr", "beta_lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise bad(name, "a finite number > 0", value)
        if self.intermediate not in ("ibp", "crown"):
            raise bad("intermediate", "ibp or crown", self.intermediate)
        if self.stop_at is not None and not (
            isinstance(self.stop_at, int | float) and math.isfinite(self.stop_at)
        ):
            raise bad("stop_at", "a finite number or None", self.stop_at)


@dataclass(frozen=True)
class _Layer:
    """A ReLU whose input depends on the box."""

    node: str
    pre: str
    post: str
    shape: tuple[int, ...]
    independent: bool
    """Its pre-activations are outputs of a dense Linear on a point input: each ranges over its
    own exact interval, so alpha = 0 is exact there and splitting cannot help."""

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class _State:
    """Per layer splits (+1 active, -1 inactive, 0 free), lower slopes and multipliers of a set
    of domains, each (N, layer size), and their bound (N,)."""

    splits: list[Tensor]
    alpha: list[Tensor]
    beta: list[Tensor]
    value: Tensor

    def take(self, index: Tensor) -> _State:
        return _State(
            [t[index] for t in self.splits],
            [t[index] for t in self.alpha],
            [t[index] for t in self.beta],
            self.value[index],
        )

    def where(self, mask: Tensor, other: _State) -> _State:
        """Entries of self where mask, else of other."""
        column = mask.unsqueeze(1)

        def pick(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
            return [torch.where(column, u, v) for u, v in zip(a, b, strict=True)]

        return _State(
            pick(self.splits, other.splits),
            pick(self.alpha, other.alpha),
            pick(self.beta, other.beta),
            torch.where(mask, self.value, other.value),
        )

    @staticmethod
    def join(a: _State, b: _State) -> _State:
        def cat(s: list[Tensor], t: list[Tensor]) -> list[Tensor]:
            return [torch.cat([u, v]) for u, v in zip(s, t, strict=True)]

        return _State(
            cat(a.splits, b.splits),
            cat(a.alpha, b.alpha),
            cat(a.beta, b.beta),
            torch.cat([a.value, b.value]),
        )


@dataclass
class _Leaves:
    """The leaves of every margin's search, one entry per domain.

    `own` holds the leaf's splits and the best slopes, multipliers and bound found on it;
    `witness` the splits, slopes and multipliers behind the leaf's bound `witness.value`
    (its own, or an ancestor's when that was higher: an ancestor's bound holds on the leaf).
    `choice` is the neuron to split next (flat index over the layers), -1 when exhausted;
    `age` counts polishing runs of an exhausted leaf (`POLISH`: final).
    """

    margin: Tensor
    own: _State
    witness: _State
    choice: Tensor
    age: Tensor

    def take(self, index: Tensor) -> _Leaves:
        return _Leaves(
            self.margin[index],
            self.own.take(index),
            self.witness.take(index),
            self.choice[index],
            self.age[index],
        )

    @staticmethod
    def join(a: _Leaves, b: _Leaves) -> _Leaves:
        return _Leaves(
            torch.cat([a.margin, b.margin]),
            _State.join(a.own, b.own),
            _State.join(a.witness, b.witness),
            torch.cat([a.choice, b.choice]),
            torch.cat([a.age, b.age]),
        )


class _Gathered(Mapping[str, Enclosure]):
    """The root enclosures of each domain's sample (gathered on first use), with the split
    neurons' clamped ones."""

    def __init__(
        self, base: Mapping[str, Enclosure], sample: Tensor, clamped: dict[str, Enclosure]
    ) -> None:
        self._base, self._sample, self._cache = base, sample, dict(clamped)

    def __getitem__(self, name: str) -> Enclosure:
        if name not in self._cache:
            enc, s = self._base[name], self._sample
            self._cache[name] = Enclosure(
                enc.lower[s],
                enc.upper[s],
                None if enc.point is None else enc.point[s],
                None if enc.error is None else enc.error[s],
                None if enc.magnitude is None else enc.magnitude[s],
            )
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


class Search:
    """Branch and bound on the chosen margins of a batch.

    Args:
        graph: the network (a checked chain of Linear, ReLU and Reshape ops).
        lower: lower corners of the boxed parameters (detached).
        upper: upper corners.
        x: inputs, (batch, *input_shape).
        y: labels, (batch,).
        chosen: (batch, n_classes) mask of the margins to branch on (never the label).
        options: the budget and optimiser options.
        track: proof mode for the final evaluation of the leaves.
    """

    def __init__(
        self,
        graph: Graph,
        lower: Mapping[str, Tensor],
        upper: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        chosen: Tensor,
        options: BabOptions,
        track: bool,
    ) -> None:
        self.graph, self.options, self.track = graph, options, track
        self.batch, self.n_classes = x.shape[0], graph.n_classes
        self.engine = LinearEngine(graph, lower, upper, x, options.intermediate, track)
        self.layers = self._find_layers()
        pairs = torch.nonzero(chosen)
        self.sample, self.other = pairs[:, 0], pairs[:, 1]
        eye = torch.eye(self.n_classes, dtype=x.dtype, device=x.device)
        self.rows = eye[y[self.sample]] - eye[self.other]  # (margins, n_classes)
        self.dtype, self.device = x.dtype, x.device
        self.failed_samples = torch.zeros(self.batch, dtype=torch.bool, device=x.device)
        self.domains = torch.zeros(self.sample.shape[0], dtype=torch.long, device=x.device)
        """Domains bounded per margin (children and polishing runs)."""

    def _find_layers(self) -> list[_Layer]:
        producers = {op.output: op for op in self.graph.ops}
        layers = []
        for op in self.graph.ops:
            if not isinstance(op, Activation):
                continue
            pre = op.inputs[0]
            enc = self.engine.enclosures[pre]
            if enc.point is not None:
                continue
            source = producers.get(pre)
            independent = False
            if isinstance(source, Linear):
                h = self.engine.enclosures[source.inputs[0]]
                independent = h.point is not None and h.lower.dim() == 2
            layers.append(_Layer(op.node, pre, op.output, enc.shape, independent))
        return layers

    # ------------------------------------------------------------------ bounding

    def _walker(self, sample: Tensor, splits: list[Tensor], track: bool) -> BackSubstitution:
        """A back-substitution over the domains' enclosures (split neurons clamped)."""
        clamped = {}
        for layer, s in zip(self.layers, splits, strict=True):
            enc = self.engine.enclosures[layer.pre]
            s = s.reshape(-1, *layer.shape)
            lo, up = enc.lower[sample], enc.upper[sample]
            lo = torch.where(s > 0, torch.clamp(lo, min=0), lo)
            up = torch.where(s < 0, torch.clamp(up, max=0), up)
            magnitude = None if enc.magnitude is None else torch.maximum(lo.abs(), up.abs())
            error = None if enc.error is None else enc.error[sample]
            clamped[layer.pre] = Enclosure(lo, up, None, error, magnitude)
        enclosures = _Gathered(self.engine.enclosures, sample, clamped)
        return BackSubstitution(self.graph, enclosures, self.engine.walker.boxes, track=track)

    def _pass(
        self, walker: BackSubstitution, margin: Tensor, state: _State
    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """One back-substitution: bounds (D,), allowances or None, and the coefficients on the
        ReLU outputs, (D, size) per layer."""
        lam = self.rows[margin].unsqueeze(1)
        count = lam.shape[0]
        slopes: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        extra = {}
        for layer, s, a, b in zip(self.layers, state.splits, state.alpha, state.beta, strict=True):
            shape = (count, 1, *layer.shape)
            slopes[layer.node] = (a.reshape(shape), None)
            if not layer.independent:
                # f >= f - beta z on z >= 0 and f >= f + beta z on z <= 0
                sign = (s < 0).to(self.dtype) - (s > 0).to(self.dtype)
                extra[layer.pre] = (b * sign).reshape(shape)
        capture = [layer.post for layer in self.layers]
        ledger = walker.run(
            self.graph.output_name, lam, slopes=slopes, extra=extra, capture=capture
        )
        coefficients = [
            ledger.captured[layer.post].reshape(count, -1)
            if layer.post in ledger.captured
            else torch.zeros(count, layer.size, dtype=self.dtype, device=self.device)
            for layer in self.layers
        ]
        rounding = ledger.rounding()
        return ledger.const[:, 0], None if rounding is None else rounding[:, 0], coefficients

    def _optimise(
        self, margin: Tensor, start: _State, steps: int, lr_scale: Tensor
    ) -> tuple[_State, Tensor]:
        """Projected Adam on alpha and beta from `start` (learning rates times `lr_scale`, one per
        domain, decaying by `LR_DECAY` per step): the best state seen per domain (the first
        evaluation is at `start`) and its branching choice."""
        walker = self._walker(self.sample[margin], start.splits, track=False)
        free = [not layer.independent for layer in self.layers]
        grad = steps > 0 and any(free)
        alpha = [a.clone() for a in start.alpha]
        beta = [b.clone() for b in start.beta]
        count = margin.shape[0]
        scale = lr_scale.to(self.dtype).unsqueeze(1)
        variables = [(alpha, k, self.options.lr) for k in range(len(free)) if free[k]]
        variables += [(beta, k, self.options.beta_lr) for k in range(len(free)) if free[k]]
        moments = [(torch.zeros_like(v[k]), torch.zeros_like(v[k])) for v, k, _ in variables]
        best = _State(
            start.splits,
            [a.clone() for a in alpha],
            [b.clone() for b in beta],
            torch.full((count,), -torch.inf, dtype=self.dtype, device=self.device),
        )
        best_coef = [
            torch.zeros(count, layer.size, dtype=self.dtype, device=self.device)
            for layer in self.layers
        ]
        for step in range(steps + 1):
            differentiate = grad and step < steps
            with torch.set_grad_enabled(differentiate):
                for v, k, _ in variables:
                    v[k] = v[k].detach().requires_grad_(differentiate)
                value, _, coefficients = self._pass(
                    walker, margin, _State(start.splits, alpha, beta, best.value)
                )
            seen = torch.where(torch.isnan(value), -torch.inf, value.detach())
            better = seen > best.value
            column = better.unsqueeze(1)
            best = _State(
                start.splits,
                [
                    torch.where(column, a.detach(), b)
                    for a, b in zip(alpha, best.alpha, strict=True)
                ],
                [torch.where(column, a.detach(), b) for a, b in zip(beta, best.beta, strict=True)],
                torch.where(better, seen, best.value),
            )
            best_coef = [
                torch.where(column, c.detach(), b)
                for c, b in zip(coefficients, best_coef, strict=True)
            ]
            if not differentiate:
                break
            with torch.enable_grad():
                objective = value[torch.isfinite(value)].sum()
                grads = torch.autograd.grad(objective, [v[k] for v, k, _ in variables])
            # Adam (Kingma and Ba, Algorithm 1) ascending the bound, then the projection
            t = step + 1
            decay = LR_DECAY**step
            for (v, k, lr), (m1, m2), g in zip(variables, moments, grads, strict=True):
                m1.mul_(0.9).add_(g, alpha=0.1)
                m2.mul_(0.999).addcmul_(g, g, value=0.001)
                move = (m1 / (1 - 0.9**t)) / ((m2 / (1 - 0.999**t)).sqrt() + 1e-8)
                moved = v[k].detach() + (lr * decay) * scale * move
                v[k] = moved.clamp(0.0, 1.0) if v is alpha else moved.clamp(min=0.0)
        return best, self._choose(margin, best, best_coef)

    def _choose(self, margin: Tensor, state: _State, coef: list[Tensor]) -> Tensor:
        """The neuron to split next (flat index over the layers), -1 if none.

        BaBSR-style: the unstable, unsplit neuron of a non-independent layer with the largest
        (-lambda)+ (-u l / (u - l)) (what the upper line's intercept costs at most), lambda its
        output's coefficient; where every such score is zero, the largest lower-line gap
        lambda+ max((1 - alpha) u, -alpha l).
        """
        sample = self.sample[margin]
        primary, secondary = [], []
        for layer, s, a, lam in zip(self.layers, state.splits, state.alpha, coef, strict=True):
            enc = self.engine.enclosures[layer.pre]
            lo = enc.lower[sample].reshape(sample.shape[0], -1)
            up = enc.upper[sample].reshape(sample.shape[0], -1)
            candidate = (lo < 0) & (up > 0) & (s == 0) & (not layer.independent)
            width = torch.where(candidate, up - lo, torch.ones_like(up))
            upper_gap = torch.clamp(-lam, min=0) * (-up * lo / width)
            lower_gap = torch.clamp(lam, min=0) * torch.maximum((1 - a) * up, -a * lo)
            none = torch.full_like(lo, -1.0)
            primary.append(torch.where(candidate, upper_gap, none))
            secondary.append(torch.where(candidate, lower_gap, none))
        if not primary:
            return torch.full((margin.shape[0],), -1, dtype=torch.long, device=self.device)
        top1, pick1 = torch.cat(primary, dim=1).max(dim=1)
        top2, pick2 = torch.cat(secondary, dim=1).max(dim=1)
        return torch.where(top1 > 0, pick1, torch.where(top2 > 0, pick2, -1))

    def _bound(
        self, margin: Tensor, start: _State, steps: int, lr_scale: Tensor | None = None
    ) -> tuple[_State, Tensor]:
        """`_optimise` in chunks of at most `CHUNK` domains."""
        states, choices = [], []
        for first in range(0, margin.shape[0], CHUNK):
            index = torch.arange(first, min(first + CHUNK, margin.shape[0]), device=self.device)
            scale = (
                torch.ones(index.shape[0], device=self.device)
                if lr_scale is None
                else lr_scale[index]
            )
            state, choice = self._optimise(margin[index], start.take(index), steps, scale)
            states.append(state)
            choices.append(choice)
        out = states[0]
        for state in states[1:]:
            out = _State.join(out, state)
        return out, torch.cat(choices)

    # ------------------------------------------------------------------ search

    def _root(self) -> _Leaves:
        m = self.sample.shape[0]
        margin = torch.arange(m, device=self.device)
        splits, alpha, beta = [], [], []
        for layer in self.layers:
            enc = self.engine.enclosures[layer.pre]
            op = next(o for o in self.graph.ops if o.node == layer.node)
            assert isinstance(op, Activation)
            adaptive, _ = default_slopes(op, enc.lower, enc.upper)
            start = torch.zeros_like(adaptive) if layer.independent else adaptive
            alpha.append(start[self.sample].reshape(m, -1))
            beta.append(torch.zeros(m, layer.size, dtype=self.dtype, device=self.device))
            splits.append(torch.zeros(m, layer.size, dtype=torch.int8, device=self.device))
        value = torch.full((m,), -torch.inf, dtype=self.dtype, device=self.device)
        own, choice = self._bound(
            margin, _State(splits, alpha, beta, value), self.options.root_steps
        )
        return _Leaves(margin, own, own, choice, torch.zeros_like(margin))

    def run(self) -> MarginBounds:
        """Search until every margin is proved, exhausted or out of budget; the bounds."""
        leaves = self._root()
        options, m, device = self.options, self.sample.shape[0], self.device
        spent = torch.zeros(m, dtype=torch.float64, device=device)
        active = torch.ones(m, dtype=torch.bool, device=device)
        stop = math.inf if options.stop_at is None else options.stop_at
        offsets = torch.tensor([0, *(layer.size for layer in self.layers)], device=device)
        offsets = offsets.cumsum(0)
        while True:
            order, rank = self._sorted(leaves.margin, leaves.witness.value)
            first = order[rank == 0]  # each margin's lowest leaf, in margin order
            unproved = ~(leaves.witness.value[first] > stop)
            exhausted = leaves.choice[first] < 0
            left = torch.full_like(self.domains, 2**62)
            if options.max_domains is not None:
                left = options.max_domains - self.domains
            done = ~unproved | (exhausted & (leaves.age[first] >= POLISH)) | (left < 1)
            done |= ~exhausted & (left < 2)
            if options.timeout_s is not None:
                done |= spent >= options.timeout_s
            if options.stop_at is not None:  # a sample with an unproved margin stays unproved
                self.failed_samples[self.sample[done & unproved & active]] = True
                done |= self.failed_samples[self.sample]
            active &= ~done
            open_ = (leaves.choice >= 0) & ~(leaves.witness.value > stop)
            allow = torch.clamp(left // 2, max=options.branch_per_round)
            allow = torch.where(active & ~exhausted, allow, torch.zeros_like(allow))
            pick = self._pick(leaves.margin, order, open_, allow)
            polish = first[active & exhausted]
            if pick.numel() == 0 and polish.numel() == 0:
                break
            began = time.perf_counter()
            keep = torch.ones(leaves.margin.shape[0], dtype=torch.bool, device=device)
            keep[pick] = False
            keep[polish] = False
            work = [self._polish(leaves.take(polish))] if polish.numel() else []
            if pick.numel():
                work.append(self._split(leaves.take(pick), offsets))
            leaves = leaves.take(torch.nonzero(keep).flatten())
            counts = torch.zeros_like(self.domains)
            for part in work:
                leaves = _Leaves.join(leaves, part)
                counts += torch.bincount(part.margin, minlength=m)
            self.domains += counts
            seconds = time.perf_counter() - began
            spent += seconds * counts.to(torch.float64) / max(int(counts.sum()), 1)
        return self._result(leaves)

    def _split(self, parents: _Leaves, offsets: Tensor) -> _Leaves:
        """Both children of every parent, bounded from the parent's own slopes and multipliers;
        each keeps the better of its bound and its parent's, with the witness behind it."""
        count = parents.margin.shape[0]
        index = torch.arange(count, device=self.device)
        kids = parents.take(torch.cat([index, index]))
        sign = torch.cat([torch.ones_like(index), -torch.ones_like(index)]).to(torch.int8)
        splits = []
        for k, s in enumerate(kids.own.splits):
            inside = (kids.choice >= offsets[k]) & (kids.choice < offsets[k + 1])
            rows = torch.nonzero(inside).flatten()
            s = s.clone()
            s[rows, kids.choice[rows] - offsets[k]] = sign[rows]
            splits.append(s)
        own, choice = self._bound(kids.margin, replace(kids.own, splits=splits), self.options.steps)
        witness = own.where(own.value >= kids.witness.value, kids.witness)
        return _Leaves(kids.margin, own, witness, choice, torch.zeros_like(kids.age))

    def _polish(self, leaves: _Leaves) -> _Leaves:
        """More Adam steps on exhausted lowest leaves (nothing left to split: only alpha and
        beta can move), from their own best at `POLISH_DECAY`**(age + 1) times the learning
        rate (at the full rate the first steps overshoot the best point)."""
        scale = POLISH_DECAY ** (leaves.age.to(torch.float64) + 1)
        own, _ = self._bound(leaves.margin, leaves.own, self.options.steps, scale)
        better = own.value > leaves.own.value
        own = own.where(better, leaves.own)
        witness = own.where(own.value > leaves.witness.value, leaves.witness)
        return _Leaves(leaves.margin, own, witness, leaves.choice, leaves.age + 1)

    def _sorted(self, margin: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Indices ordered by (margin, value), NaN first, and each one's rank in its margin."""
        value = torch.where(torch.isnan(value), -torch.inf, value)
        order = torch.argsort(value, stable=True)
        order = order[torch.argsort(margin[order], stable=True)]
        counts = torch.bincount(margin, minlength=self.sample.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.shape[0], device=self.device) - starts[margin[order]]
        return order, rank

    def _pick(self, margin: Tensor, order: Tensor, open_: Tensor, allow: Tensor) -> Tensor:
        """Per margin, its `allow` lowest open leaves."""
        sorted_open = open_[order].long()
        before = torch.cumsum(sorted_open, 0) - sorted_open
        margins = margin[order]
        counts = torch.bincount(margin, minlength=allow.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        base = before[starts.clamp(max=max(order.shape[0] - 1, 0))]
        rank = before - base[margins]
        return order[(sorted_open > 0) & (rank < allow[margins])]

    def _result(self, leaves: _Leaves) -> MarginBounds:
        """Per margin the minimum over its leaves; in proof mode every witness is evaluated
        again with rounding tracked, and the leaf with the smallest bound - allowance gives the
        margin's bound and allowance."""
        m = self.sample.shape[0]
        lower = torch.full((m,), -torch.inf, dtype=self.dtype, device=self.device)
        rounding = None
        witness = leaves.witness
        if not self.track:
            value = torch.where(torch.isnan(witness.value), -torch.inf, witness.value)
            lower = lower.scatter_reduce(0, leaves.margin, value, "amin", include_self=False)
        else:
            consts, allowances = [], []
            for first in range(0, leaves.margin.shape[0], CHUNK):
                index = torch.arange(
                    first, min(first + CHUNK, leaves.margin.shape[0]), device=self.device
                )
                margin, state = leaves.margin[index], witness.take(index)
                walker = self._walker(self.sample[margin], state.splits, track=True)
                const, allowance, _ = self._pass(walker, margin, state)
                assert allowance is not None
                consts.append(const)
                allowances.append(allowance)
            const, allowance = torch.cat(consts), torch.cat(allowances)
            order, rank = self._sorted(leaves.margin, const - allowance)
            best = order[rank == 0]
            lower[leaves.margin[best]] = torch.where(
                torch.isnan(const[best]), -torch.inf, const[best]
            )
            rounding = torch.zeros(m, dtype=self.dtype, device=self.device)
            rounding[leaves.margin[best]] = allowance[best]
        out = torch.full(
            (self.batch, self.n_classes), -torch.inf, dtype=self.dtype, device=self.device
        )
        out[self.sample, self.other] = lower
        out_rounding = None
        if rounding is not None:
            out_rounding = torch.zeros_like(out)
            out_rounding[self.sample, self.other] = rounding
        return MarginBounds(out, out_rounding)
