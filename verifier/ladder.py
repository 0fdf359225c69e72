"""The certification ladder: nested scales of the search result, certified at beta / m each.

How wide a box the held-out data will certify is known only once it is certified, and aiming
the search at τ plus a hand-tuned slack makes the verdict hang on that slack. Instead, before
any held-out sample is used, the spec fixes m scales c_1 > ... > c_m (`certify.ladder`); the
candidate of scale c is the search result scaled about the current weights θ0,

    θ0 + c (lower - θ0) <= θ <= θ0 + c (upper - θ0)   (generators of a zonotope times c),

where a scale above 1 is kept inside the outer box and `search.max_width` (each entry grows
only as far as they allow). Each candidate's Clopper-Pearson bound is computed at confidence
1 - beta / m. With probability at least 1 - beta all m bounds hold at once (union bound over
the m candidates, whichever of them are actually certified), so keeping the widest candidate
that meets every target is sound. The candidates are certified by bisection over the scales
from c = 1 (the certified count falls as the box grows); non-monotone counts only cost width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.certify import BoundKind, TaskCertificate, proportion_lower
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.spec import Spec

Domain = Box | Zonotope


@dataclass(frozen=True, eq=False)
class Rung:
    """One certified candidate: its scale, domain and held-out certificates (one per task)."""

    scale: float
    domain: Domain
    certificates: list[TaskCertificate]
    search: int = 0
    search_targets: tuple[float, ...] = ()

    @property
    def holds(self) -> bool:
        """True when every task's certificate meets its target."""
        return all(c.holds for c in self.certificates)

    @property
    def mean_width(self) -> float:
        """Mean width over every entry (of the interval hull for a zonotope)."""
        box = self.domain.interval_hull() if isinstance(self.domain, Zonotope) else self.domain
        return box.size("mean_width")


@dataclass(frozen=True, eq=False)
class LadderResult:
    """The kept candidate and every candidate certified on the way (in the order tried)."""

    scales: tuple[float, ...]
    chosen: Rung
    tried: list[Rung]
    searches: int = 1

    def to_json(self, beta: float) -> dict[str, object]:
        """The certificate's `ladder` entry."""
        m = len(self.scales) * self.searches
        return {
            "scales": list(self.scales),
            "searches": self.searches,
            "m": m,
            "beta": beta,
            "beta_each": beta / m,
            "chosen_scale": self.chosen.scale,
            "chosen_search": self.chosen.search,
            "rule": (
                f"up to {self.searches} searches, at the search target and at lower ones (never "
                "below τ), each result scaled about θ0 by each scale; each candidate certified "
                f"on the held-out part at beta/{m}; union bound over the {m} candidates; the "
                "widest candidate meeting every target kept (per search, bisection from scale "
                "1; the next, lower target only while the last search held at scale >= 1)"
            ),
            "tried": [
                {
                    "search": rung.search,
                    "search_targets": list(rung.search_targets),
                    "scale": rung.scale,
                    "mean_width": rung.mean_width,
                    "k": [c.k for c in rung.certificates],
                    "lower_bound": [c.lower_bound for c in rung.certificates],
                    "holds": rung.holds,
                }
                for rung in self.tried
            ],
        }


def scale_domain(
    domain: Domain,
    theta0: Mapping[str, Tensor],
    scale: float,
    *,
    outer: Box | None = None,
    max_width: float | None = None,
) -> Domain:
    """The domain scaled about θ0; above scale 1, each entry only as far as `outer` and
    `max_width` allow (it never shrinks below the unscaled domain).

    Raises:
        ValueError: a zonotope scaled above 1 with an outer box or max_width (not supported;
            `climb` skips those candidates).
    """
    if isinstance(domain, Zonotope):
        if scale > 1.0 and (outer is not None or max_width is not None):
            raise ValueError("a zonotope cannot be scaled above 1 inside an outer box/max_width")
        hull = Box(domain.lower, domain.upper).scaled(theta0, scale)
        generators = {n: g * scale for n, g in domain.generators.items()}
        return Zonotope(hull.lower, hull.upper, generators)
    scaled = domain.scaled(theta0, scale)
    if scale <= 1.0 or (outer is None and max_width is None):
        return scaled
    lower, upper = {}, {}
    for name, lo in domain.lower.items():
        up = domain.upper[name]
        new_lo, new_up = scaled.lower[name], scaled.upper[name]
        if outer is not None and name in outer.lower:
            new_lo = torch.minimum(lo, torch.maximum(new_lo, outer.lower[name].to(lo)))
            new_up = torch.maximum(up, torch.minimum(new_up, outer.upper[name].to(up)))
        if max_width is not None:
            new_lo, new_up = _cap_width(lo, up, new_lo, new_up, max_width)
        lower[name], upper[name] = new_lo, new_up
    return Box(lower, upper)


def _cap_width(
    lo: Tensor, up: Tensor, new_lo: Tensor, new_up: Tensor, max_width: float
) -> tuple[Tensor, Tensor]:
    """Pull the grown ends back towards (lo, up) so no entry exceeds max(max_width, up - lo)."""
    grown = (lo - new_lo) + (new_up - up)
    room = torch.clamp(max_width - (up - lo), min=0.0)
    keep = torch.where(grown > room, room / grown.clamp(min=1e-30), torch.ones_like(grown))
    return lo - (lo - new_lo) * keep, up + (new_up - up) * keep


def climb(
    domain: Domain,
    theta0: Mapping[str, Tensor],
    scales: Sequence[float],
    certify: Callable[[Domain], list[TaskCertificate]],
    *,
    outer: Box | None = None,
    max_width: float | None = None,
    on_rung: Callable[[float, int], None] | None = None,
    search: int = 0,
    search_targets: tuple[float, ...] = (),
    searches: int = 1,
) -> LadderResult:
    """Certify candidates by bisection and keep the widest that holds.

    Args:
        domain: the search result.
        theta0: the current weights of the boxed parameters.
        scales: the declared scales, widest first (`CertifySection.ladder`).
        certify: the held-out certificates of a candidate, one per task, each at beta / m.
        outer: the outer box (sequences), or None.
        max_width: the search's cap on an entry's width, or None.
        on_rung: called with (scale, number certified so far) before each certification.
        search, search_targets, searches: which search of how many produced `domain`, and
            its targets (recorded with each candidate).

    Returns:
        The widest certified candidate that holds; if none holds, the narrowest tried (its
        certificates say so).
    """
    order = tuple(sorted(scales, reverse=True))
    if isinstance(domain, Zonotope) and (outer is not None or max_width is not None):
        eligible = [i for i, c in enumerate(order) if c <= 1.0] or [len(order) - 1]
    else:
        eligible = list(range(len(order)))
    done: dict[int, Rung] = {}
    tried: list[Rung] = []

    def rung(i: int) -> Rung:
        if i not in done:
            if on_rung is not None:
                on_rung(order[i], len(tried))
            candidate = scale_domain(domain, theta0, order[i], outer=outer, max_width=max_width)
            done[i] = Rung(order[i], candidate, certify(candidate), search, search_targets)
            tried.append(done[i])
        return done[i]

    # first index (among eligible, widest first) that holds; len(eligible) when none does
    low, high = 0, len(eligible)
    first = min(range(len(eligible)), key=lambda j: abs(order[eligible[j]] - 1.0))
    mid = first
    while low < high:
        if rung(eligible[mid]).holds:
            high = mid
        else:
            low = mid + 1
        mid = (low + high) // 2
    chosen = rung(eligible[min(low, len(eligible) - 1)])
    return LadderResult(order, chosen, tried, searches)


def merge(ladders: Sequence[LadderResult], chosen: LadderResult) -> LadderResult:
    """One record of the ladders of successive searches, keeping `chosen`'s candidate."""
    tried = [rung for ladder in ladders for rung in ladder.tried]
    return LadderResult(chosen.scales, chosen.chosen, tried, chosen.searches)


def samples_needed(target: float, rate: float, beta: float, kind: BoundKind) -> int | None:
    """About how many held-out samples certifying at `rate` give a lower bound >= target at
    `beta`: the smallest n (to 1%, doubling then bisection) with bound(floor(rate n), n) >=
    target; None when rate <= target (no n can)."""

    def enough(n: int) -> bool:
        return proportion_lower(math.floor(rate * n), n, beta, kind) >= target

    if rate <= target:
        return None
    high = 1
    while not enough(high):
        high *= 2
        if high > 2**40:
            return None
    low = high // 2
    while high - low > max(1, low // 100):
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


def unreachable_message(
    spec: Spec, task: str, target: float, clean: float, n: int, beta: float
) -> str:
    """Why a task's target cannot be certified with its held-out data (before any search)."""
    kind = spec.certify.bound
    m = spec.certify.ladder.m
    at_clean = proportion_lower(math.floor(clean * n), n, beta, kind)
    best = proportion_lower(n, n, beta, kind)
    need = samples_needed(target, clean, beta, kind)
    more = (
        f"about {need} held-out samples certified at the clean rate would reach it"
        if need is not None
        else "no number of samples can, since the clean metric does not exceed τ"
    )
    return (
        f"task '{task}': τ = {target:.4f} is not certifiable with this data: {n} held-out "
        f"samples at beta = {beta:.3g} ({spec.certify.beta:g} over the {m} ladder candidates"
        f"{' and the classes' if beta < spec.certify.beta_each else ''}) give a {kind} lower "
        f"bound of at most {at_clean:.4f} at the clean metric {clean:.4f} (at most {best:.4f} "
        f"if every sample were certified); {more}. Raise certify.certification_fraction, "
        "add data, or lower the target."
    )


def lid_warnings(domain: Box | Zonotope, ladder: LadderResult) -> list[str]:
    """What a reader must not miss: a LID of zero width, a ladder with no candidate holding."""
    warnings = []
    box = domain.interval_hull() if isinstance(domain, Zonotope) else domain
    if box.size("mean_width") == 0.0:
        warnings.append(
            "the LID has zero width: it is the current weights alone, so no update can move "
            "any parameter; the search found no room (see search.chosen and the history)"
        )
    if not ladder.chosen.holds:
        warnings.append(
            f"no candidate of the ladder met every target; the narrowest tried (scale "
            f"{ladder.chosen.scale:g}) is written with its failing certificate"
        )
    return warnings
