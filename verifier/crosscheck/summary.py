"""A short human summary of a crosscheck.json document (what `verifier crosscheck` prints)."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _gap_line(name: str, gap: dict[str, Any] | None) -> str:
    if gap is None:
        return f"  {name:<10} not computed"
    if not gap["n"]:
        return f"  {name:<10} no exact margins to compare"
    return (
        f"  {name:<10} mean {_fmt(gap['mean'])}  median {_fmt(gap['median'])}  "
        f"max {_fmt(gap['max'])}  (n={gap['n']})"
    )


def render_crosscheck(doc: dict[str, Any]) -> str:
    """A short human summary of a crosscheck.json document."""
    summary = doc["summary"]
    exact = summary["exact"]
    crown = summary["certified_crown_ibp"]
    bab = summary.get("certified_bab")
    lines = [
        f"cross-check of {summary['n_samples']} samples of {doc['data']['name']} "
        f"[{doc['data']['split']}], {summary['n_margins']} margins; exact: {doc['exact_method']}"
        f" (timeout {doc['timeout_s']:g} s)",
        f"certified: ibp {summary['certified_ibp']}/{summary['n_samples']}"
        + f", linear {summary['certified_linear']}/{summary['n_samples']}"
        + ("" if crown is None else f", crown-ibp {crown}/{summary['n_samples']}")
        + ("" if bab is None else f", bab {bab}/{summary['n_samples']}"),
        f"exact margins: {exact['solved']} solved, {exact['timeout']} timed out, "
        f"{exact['skipped']} skipped",
        "gap exact - bound (how loose each bound is):",
        _gap_line("ibp", summary["gaps"]["ibp"]),
        _gap_line("linear", summary["gaps"]["linear"]),
        _gap_line("crown-ibp", summary["gaps"]["crown_ibp"]),
        _gap_line("bab", summary["gaps"].get("bab")),
        "gap falsified - bound (an upper bound on the looseness):",
        _gap_line("ibp", summary["gaps_to_falsified"]["ibp"]),
        _gap_line("linear", summary["gaps_to_falsified"]["linear"]),
        _gap_line("crown-ibp", summary["gaps_to_falsified"]["crown_ibp"]),
        _gap_line("bab", summary["gaps_to_falsified"].get("bab")),
    ]
    if summary["exact_inconsistent"]:
        lines.append(
            f"warning: {summary['exact_inconsistent']} exact minima lie above a falsified margin"
        )
    lines.append(
        f"verdict: {summary['verdict']} ({summary['violations']} violations) "
        f"in {summary['time_s']:.1f} s"
    )
    return "\n".join(lines)
