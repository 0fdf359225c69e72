"""The certification ladder: candidate LIDs certified in a fixed sequence, each at full beta.

How wide a box the held-out data will certify is known only once it is certified, and aiming
the search at τ plus a hand-tuned slack makes the verdict hang on that slack. Instead the spec
fixes, before any held-out sample is used, an ordered sequence of candidates: for each search
j = 1, 2, ... (at the search target, then at lower targets; `certify.ladder`), its result T_j
scaled about the current weights θ0 by each scale c, narrowest first,

    θ0 + c (lower - θ0) <= θ <= θ0 + c (upper - θ0)   (generators of a zonotope times c),

where a scale above 1 is kept inside the outer box and `search.max_width`. A candidate no wider
(in the search's size measure) than the widest one accepted so far is skipped; that decision
uses only the searches' results, never held-out data. The candidates are certified on the
held-out part in that order, each with its Clopper-Pearson bound at confidence 1 - beta, and
the sequence stops at the first candidate whose bound misses τ. This is fixed-sequence testing
(Maurer, Hothorn and Lehmacher 1995): a false certificate among those accepted needs the first
candidate whose true metric is below τ to pass its own test, which happens with probability at
most beta, whatever the dependence between the tests. So with probability at least 1 - beta
every accepted certificate holds at once, and the widest accepted candidate is kept, without
the beta / m a union bound over m candidates would cost.
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
        return self.domain.interval_hull().size("mean_width")


@dataclass(frozen=True, eq=False)
class LadderResult:
    """The kept candidate and every candidate certified, in the order tried."""

    scales: tuple[float, ...]
    chosen: Rung
    tried: list[Rung]
    searches: int = 1

    def to_json(self, beta: float) -> dict[str, object]:
        """The certificate's `ladder` entry."""
        return {
            "procedure": "fixed-sequence",
            "scales": list(self.scales),
            "searches": self.searches,
            "beta": beta,
            "chosen_scale": self.chosen.scale,
            "chosen_search": self.chosen.search,
            "rule": (
                f"up to {self.searches} searches, at the search target and at lower ones (never "
                "below τ); each result scaled about θ0 by the scales, narrowest first, a "
                "candidate no wider than the widest accepted skipped; each certified on the "
                "held-out part at beta, in that order, stopping at the first that misses τ "
                "(fixed-sequence testing: with probability >= 1 - beta every accepted "
                "certificate holds); the widest accepted kept"
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


class FixedSequence:
    """Runs the fixed sequence across searches: `offer` each search's result in turn."""

    def __init__(
        self,
        theta0: Mapping[str, Tensor],
        scales: Sequence[float],
        certify: Callable[[Domain], list[TaskCertificate]],
        size: Callable[[Domain], float],
        *,
        searches: int = 1,
        outer: Box | None = None,
        max_width: float | None = None,
        on_rung: Callable[[int, float], None] | None = None,
    ) -> None:
        self.theta0, self.certify, self.size = theta0, certify, size
        self.scales = tuple(sorted(scales))  # narrowest first
        self.searches, self.outer, self.max_width = searches, outer, max_width
        self.on_rung = on_rung
        self.tried: list[Rung] = []
        self.best: Rung | None = None
        self.best_size = -math.inf
        self.stopped = False

    def offer(self, domain: Domain, search: int, search_targets: tuple[float, ...]) -> None:
        """Certify this search's candidates in order until one misses τ (then stop for good).

        A zonotope is not scaled above 1 inside an outer box or max_width (those scales are
        skipped)."""
        capped = self.outer is not None or self.max_width is not None
        for scale in self.scales:
            if self.stopped:
                return
            if isinstance(domain, Zonotope) and capped and scale > 1.0:
                continue
            candidate = scale_domain(
                domain, self.theta0, scale, outer=self.outer, max_width=self.max_width
            )
            size = self.size(candidate)
            if size <= self.best_size:
                continue  # no wider than one accepted: decided without held-out data
            if self.on_rung is not None:
                self.on_rung(search, scale)
            rung = Rung(scale, candidate, self.certify(candidate), search, search_targets)
            self.tried.append(rung)
            if not rung.holds:
                self.stopped = True
                return
            self.best, self.best_size = rung, size

    def result(self) -> LadderResult:
        """The widest accepted candidate, or (none accepted) the first, failing one."""
        if not self.tried:
            raise ValueError("no candidate was certified")
        chosen = self.best if self.best is not None else self.tried[0]
        scales = tuple(sorted(self.scales, reverse=True))
        return LadderResult(scales, chosen, self.tried, self.searches)


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
        f"samples at beta = {beta:.3g}{' (over the classes)' if beta < spec.certify.beta else ''}"
        f" give a {kind} lower "
        f"bound of at most {at_clean:.4f} at the clean metric {clean:.4f} (at most {best:.4f} "
        f"if every sample were certified); {more}. Raise certify.certification_fraction, "
        "add data, or lower the target."
    )


def lid_warnings(domain: Box | Zonotope, ladder: LadderResult) -> list[str]:
    """What a reader must not miss: a LID of zero width, a ladder with no candidate holding."""
    warnings = []
    box = domain.interval_hull()
    if box.size("mean_width") == 0.0:
        warnings.append(
            "the LID has zero width: it is the current weights alone, so no update can move "
            "any parameter; the search found no room (see search.chosen and the history)"
        )
    if not ladder.chosen.holds:
        warnings.append(
            f"no candidate of the ladder met every target; the first one certified (scale "
            f"{ladder.chosen.scale:g} of search {ladder.chosen.search + 1}) is written with its "
            "failing certificate"
        )
    return warnings
