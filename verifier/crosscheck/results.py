"""What a cross-check finds per margin and per sample (`verifier.crosscheck.run` gathers them
into a `CrosscheckResult`): bounds, exact minima and attacks side by side, a violation's
description, and gap statistics."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from verifier.crosscheck.problem import ExactMargin


@dataclass(frozen=True, eq=False)
class MarginCheck:
    """One sample and class j: bounds, exact minimum and attacks side by side.

    Attributes:
        other: the class j.
        ibp: IBP lower bound on z_y - z_j (float64).
        ibp_allowance: its rounding allowance.
        crown_ibp: CROWN-IBP lower bound, or None when not computed.
        crown_allowance: its rounding allowance, or None.
        linear: our linear-bound lower bound (`verifier.bounds.linear`, float64).
        linear_allowance: its derived rounding allowance.
        exact: the exact solver's result ("skipped" when not requested or not supported).
        falsified: smallest margin attained by the falsifiers.
        falsified_by: which falsifier attained it.
        violation_methods: bound methods whose claim an attained margin contradicts.
        witness: weights attaining the smallest margin, kept only for a violation.
        bab: branch-and-bound lower bound (float64), or None when not computed.
        bab_allowance: its derived rounding allowance, or None.
    """

    other: int
    ibp: float
    ibp_allowance: float
    crown_ibp: float | None
    crown_allowance: float | None
    linear: float
    linear_allowance: float
    exact: ExactMargin
    falsified: float
    falsified_by: str
    violation_methods: tuple[str, ...] = ()
    witness: Mapping[str, Tensor] | None = field(default=None, repr=False)
    bab: float | None = None
    bab_allowance: float | None = None

    @property
    def exact_value(self) -> float | None:
        """The exact minimum when solved, else None."""
        return self.exact.margin if self.exact.status == "optimal" else None

    @property
    def attained(self) -> float:
        """Smallest margin attained by any concrete weights (falsifiers and solver)."""
        values = [self.falsified]
        for value in (self.exact_value, self.exact.incumbent):
            if value is not None:
                values.append(value)
        return min(values)

    @property
    def best_bound(self) -> float:
        """The largest lower bound known: the exact minimum, else the best bound available."""
        if self.exact_value is not None:
            return self.exact_value
        candidates = [self.ibp, self.linear]
        for value in (self.crown_ibp, self.bab):
            if value is not None:
                candidates.append(value)
        if self.exact.lower is not None:
            candidates.append(self.exact.lower)
        return max(candidates)


@dataclass(frozen=True, eq=False)
class SampleCheck:
    """All margins of one sample.

    Attributes:
        index: position of the sample in the data set.
        label: its true class y.
        certified_ibp: every IBP margin bound exceeds its rounding allowance.
        certified_crown_ibp: the same for CROWN-IBP, or None when not computed.
        certified_linear: the same for the linear bounds.
        margins: one `MarginCheck` per class j != y.
        seconds: time of the per-sample work (falsifiers and exact solves).
    """

    index: int
    label: int
    certified_ibp: bool
    certified_crown_ibp: bool | None
    certified_linear: bool
    margins: list[MarginCheck]
    seconds: float

    @property
    def violations(self) -> list[MarginCheck]:
        """The margins where some bound is contradicted."""
        return [m for m in self.margins if m.violation_methods]


def describe_violation(sample: SampleCheck, margin: MarginCheck) -> str:
    """One line naming a soundness violation."""
    bounds = []
    if "ibp" in margin.violation_methods:
        bounds.append(f"ibp bound {margin.ibp:.9g} (allowance {margin.ibp_allowance:.2g})")
    if "crown-ibp" in margin.violation_methods and margin.crown_ibp is not None:
        bounds.append(f"crown-ibp bound {margin.crown_ibp:.9g}")
    if "linear" in margin.violation_methods:
        bounds.append(f"linear bound {margin.linear:.9g} (allowance {margin.linear_allowance:.2g})")
    if "bab" in margin.violation_methods and margin.bab is not None:
        bounds.append(f"bab bound {margin.bab:.9g} (allowance {margin.bab_allowance or 0.0:.2g})")
    proved = sample.certified_ibp or sample.certified_crown_ibp or sample.certified_linear
    certified = "certified " if proved else ""
    return (
        f"{certified}sample {sample.index} (label {sample.label}), class {margin.other}: "
        f"{' and '.join(bounds)} exceeds the margin {margin.attained:.9g} attained by weights "
        "inside the LID"
    )


def gap_stats(pairs: Sequence[tuple[float | None, float | None]]) -> dict[str, Any]:
    """n, mean, median, max and min of a - b over the pairs where both are finite numbers."""
    gaps = [
        a - b
        for a, b in pairs
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    ]
    if not gaps:
        return {"n": 0, "mean": None, "median": None, "max": None, "min": None}
    return {
        "n": len(gaps),
        "mean": statistics.fmean(gaps),
        "median": statistics.median(gaps),
        "max": max(gaps),
        "min": min(gaps),
    }
