"""Branch and bound on unstable ReLUs over a weight box (beta-CROWN style).

`bab_margin_bounds` lower-bounds margins z_y - z_j for every parameter vector in a box, tighter
than the linear bound (`verifier.bounds.linear`) where single-neuron ReLU relaxations lose.

Why splitting pays. The linear engine is exact everywhere on an MLP with a point input except
at the ReLU relaxations: products with sign-definite or point inputs are exact, and a layer
whose pre-activations are outputs of a dense Linear on a point input (the first boxed layer)
ranges over independent intervals (each output depends on its own weight row), where the
relaxation with lower slope 0 is exact too. What is left is the triangle relaxation of the
unstable ReLUs of later layers, which are coupled through the hidden layers before them.

Domains. A domain fixes a set of unstable ReLUs active (z >= 0) or inactive (z <= 0); the
leaves of the search partition the box (every weight vector lies in some leaf: z >= 0 or
z <= 0), so the minimum of the leaves' bounds is a sound bound on the whole box at any
stopping point. The bound of a domain is the linear back-substitution with

* the split neurons' enclosures clamped to [max(l, 0), u] or [l, min(u, 0)] (valid on the
  domain), so their relaxation is the exact linear piece (identity or zero);
* the split constraints enforced by Lagrange multipliers beta >= 0 (Wang et al., "Beta-CROWN",
  NeurIPS 2021, Eq. 5): on a branch z_k >= 0, f >= f - beta_k z_k, and on z_k <= 0,
  f >= f + beta_k z_k, so the pass bounds f + sum_k s_k beta_k z_k (s_k = -1 active, +1
  inactive) through the `extra` coefficients of `BackSubstitution.run`;
* lower ReLU slopes alpha per domain; beta and alpha maximise the bound by projected Adam
  (alpha in [0, 1], beta >= 0), keeping the best seen per domain. Any alpha and beta >= 0
  give a sound bound, so the optimiser only costs tightness. Layers with independent
  pre-activations (above) keep alpha = 0, which is exact there, and are never split.

Intermediate bounds are computed once, at the root (interval pass, or back-substitution with
`intermediate="crown"`), and kept for every domain apart from the split neurons' own
clamping: sound, since the root enclosures hold on every sub-domain. On a two-hidden-layer MLP
with a point input they are exact already (sign-definite products, independent first layer).
Split sets are therefore never infeasible by interval bounds (only unstable neurons are split,
so both halves of every enclosure are non-empty); an infeasible combination shows as a bound
that beta drives up.

A child's bound is the better of its own and its parent's (the parent's is valid on the child),
and the leaf keeps the splits, slopes and multipliers behind that value (its *witness*), so a
proof re-evaluates exactly what the search saw. With the budget spent, the result per margin
is the minimum over its leaves, combined per entry with the plain linear bound (so it is never
looser than the linear bound; the root is that pass with the independent layers' slopes at 0
and the others' optimised from CROWN's adaptive choice).

Branching: per leaf, the unstable, unsplit neuron with the largest BaBSR-style intercept score
(-lambda)+ * (-u l / (u - l)), lambda the coefficient the pass reaches the ReLU's output with
(the most the upper line's intercept can cost the bound; Bunel et al., "Branch and bound for
piecewise linear neural network verification", JMLR 2020); where every such score is zero
(all neurons the bound pushes up are split), the largest lower-line gap
lambda+ * max((1 - alpha) u, -alpha l). A leaf with neither is exhausted. Each round splits, per
margin, the `branch_per_round` lowest open leaves and bounds all children of all margins
together; a leaf whose bound exceeds `stop_at` (0: proved) is not split further.

An exhausted lowest leaf (nothing left to split) is polished instead: more Adam steps from
its own best point, the k-th run at 0.3^k times the learning rates (from a good point the
first steps at the full rate overshoot), up to 10 runs; with every unstable neuron split the
domain's problem is a linear program whose Lagrangian dual the multipliers then approach, so
an unlimited budget reaches the exact minimum (to ~1e-9 on the tests' nets).

Budget (per margin): `max_domains` domains bounded (children and polishing runs; the root is
free) and, optionally, `timeout_s` seconds of the rounds' time (each round's time is shared
among the margins by their domains). A margin stops when its lowest leaf is proved, final or
out of budget. With `stop_at` set (a certification), a sample one of whose margins stops
unproved stops branching on the others, and a sample whose margin at the box centre is already
<= stop_at is not branched on at all: its count cannot change. Domain budgets are deterministic
and the domains of one margin do not depend on the others (Adam acts per entry), so the result
does not depend on the batch's composition; a time budget makes it depend on the machine.

Proof mode (`track_rounding=True`, float64): the search runs on float64 without tracking; each
leaf's witness is then re-evaluated by the same back-substitution in proof mode, whose ledger
derives the rounding allowance exactly as for `linear_margin_bounds` (`verifier.bounds.linear`:
the Lagrangian terms enter as one more coefficient accumulation, the clamped enclosures as
enclosures). Per margin the leaf with the smallest bound - allowance gives the returned bound
and allowance; a NaN counts as -inf (fails closed). Scope: `check_bab_graph`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from verifier.bounds.bab_search import BabOptions, Search
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.margins import MarginBounds, combine_margin_bounds
from verifier.errors import GraphError, InputError
from verifier.graph import Activation, Graph, Linear, Reshape

__all__ = ["BabOptions", "bab_margin_bounds"]


def bab_margin_bounds(
    graph: Graph,
    lower: Mapping[str, Tensor],
    upper: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    options: BabOptions | None = None,
    track_rounding: bool = False,
    base: MarginBounds | None = None,
) -> MarginBounds:
    """Lower-bound every margin z_y - z_j over the box by branch and bound on unstable ReLUs.

    Sound for every θ with lower <= θ <= upper on the boxed parameters (the others fixed), in
    exact arithmetic, at any budget; in proof mode (float64 x, `track_rounding=True`) the
    returned allowance covers the float evaluation. Never looser than `linear_margin_bounds`
    with the same intermediate bounds, nor than `base`. Not differentiable. dtype and device
    follow x.

    Args:
        graph: the network: a chain of Linear/Gemm, ReLU and Reshape/Flatten ops.
        lower: lower corners of the boxed parameters, keyed by initializer name.
        upper: upper corners, same keys and shapes.
        x: inputs, shape (batch, *input_shape).
        y: labels, shape (batch,).
        options: budget and optimiser options (default `BabOptions()`).
        track_rounding: attach the float64 rounding allowance of every entry.
        base: sound bounds already known (e.g. intervals and linear bounds combined), in the
            same mode; margins whose slack (bound - allowance) exceeds `options.stop_at` are not
            branched on, nor (with `stop_at` set) samples whose margin at the box centre does
            not exceed it somewhere (they cannot be proved). The result is combined with it
            per entry.

    Returns:
        MarginBounds of shape (batch, n_classes), +inf at the true class, with `rounding` in
        proof mode.

    Raises:
        GraphError: an op other than Linear, ReLU or Reshape (naming the first such node).
        InputError: proof mode without float64 inputs.
        DomainError, DataError: as `linear_margin_bounds`.
    """
    options = options or BabOptions()
    if track_rounding and x.dtype != torch.float64:
        raise InputError(f"proof mode (track_rounding=True) needs float64 inputs; got {x.dtype}")
    check_bab_graph(graph)
    with torch.no_grad():
        linear = linear_margin_bounds(
            graph,
            {k: v.detach() for k, v in lower.items()},
            {k: v.detach() for k, v in upper.items()},
            x.detach(),
            y,
            intermediate=options.intermediate,
            track_rounding=track_rounding,
        )
    known = linear if base is None else combine_margin_bounds(base, linear)
    slack = known.lower if known.rounding is None else known.lower - known.rounding
    others = torch.arange(graph.n_classes, device=x.device)[None, :] != y[:, None].to(x.device)
    chosen = others.clone()
    if options.stop_at is not None:
        chosen &= ~(slack > options.stop_at)
        # a sample whose margin at the box centre is already <= stop_at cannot be proved
        with torch.no_grad():
            centre = {k: (lower[k].detach() + upper[k].detach()) / 2 for k in lower}
            logits = graph.forward(x.detach(), centre)
        attained = logits.gather(1, y[:, None].to(x.device)) - logits
        chosen &= ~((attained <= options.stop_at) & others).any(dim=1, keepdim=True)
    samples = torch.nonzero(chosen.any(dim=1)).flatten()
    if samples.numel() == 0:
        return known
    sub = chosen[samples]
    with torch.no_grad():
        found = Search(
            graph,
            {k: v.detach() for k, v in lower.items()},
            {k: v.detach() for k, v in upper.items()},
            x.detach()[samples],
            y.to(x.device)[samples],
            sub,
            options,
            track_rounding,
        ).run()
    bounds = torch.full_like(known.lower, -torch.inf)
    bounds[samples] = found.lower
    rounding = None
    if found.rounding is not None:
        rounding = torch.zeros_like(known.lower)
        rounding[samples] = found.rounding
    return combine_margin_bounds(known, MarginBounds(bounds, rounding))


def check_bab_graph(graph: Graph) -> None:
    """Refuse a graph branch and bound cannot take (only chains of Linear, ReLU and Reshape).

    Raises:
        GraphError: naming the first unsupported node.
    """
    branching = graph.first_non_chain_op()
    for op in graph.ops:
        supported = isinstance(op, Linear | Reshape) or (
            isinstance(op, Activation) and op.function == "relu"
        )
        if op is branching or not supported:
            what = op.kind if not isinstance(op, Activation) else f"{op.function} activation"
            raise GraphError(
                f"node '{op.node}' ({what}): branch and bound supports chains of Linear/Gemm, "
                "ReLU and Reshape/Flatten ops (MLPs) only; use certify.method best"
            )
