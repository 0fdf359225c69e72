"""HTML building blocks of the compliance report: numbers, tables, figures and method names."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any, Final

METHOD_NAMES: Final = {
    "ibp": "interval bound propagation with exact interval products (ibp)",
    "midrad": "interval bound propagation, midpoint-radius products (midrad)",
    "linear": "linear bounds back-substituted over the weight box (linear)",
    "crown-ibp": "CROWN-IBP linear relaxation from auto_LiRPA (crown-ibp)",
    "best": "the tighter of exact intervals and linear bounds, per sample and class (best)",
    "bab": "best, then branch and bound on unstable ReLUs where it falls short (bab)",
}


BOUND_NAMES: Final = {
    "clopper-pearson": "one-sided Clopper–Pearson (exact binomial) bound",
    "hoeffding": "one-sided Hoeffding bound",
}


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def num(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def width_text(value: float) -> str:
    return f"{value:.3g}"


def html_figure(svg: str, alt: str, caption: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return (
        f'<figure><img alt="{escape(alt)}" src="data:image/svg+xml;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """An HTML table; cells are HTML already (escape before), columns in `numeric` align right."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def facts(rows: Sequence[Sequence[str]]) -> str:
    """A two-column table of labelled facts (cells are HTML already)."""
    body = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    return f"<table>{body}</table>"


def target_text(task: Mapping[str, Any], spec_task: Mapping[str, Any] | None) -> str:
    raw = None if spec_task is None else spec_task.get("target")
    if isinstance(raw, str):
        return (
            f"{pct(task['target'])} (spec: <code>{escape(raw)}</code>: the current model's "
            f"{pct(task['clean_metric'])} on the optimisation data, minus the margin)"
        )
    return f"{pct(task['target'])} (fixed in the spec)"


def metric_name(task: Mapping[str, Any]) -> str:
    return "balanced accuracy" if task["metric"] == "balanced_accuracy" else "accuracy"


def ours(doc: Mapping[str, Any]) -> str:
    return str(doc["software"].get("lid-verifier", "?"))
