"""The report's later sections: how much the weights may change, the search, the cross-check,
and how to reproduce and re-verify."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from verifier.report import plots
from verifier.report.artifacts import (
    CERTIFICATE_FILE,
)
from verifier.report.elements import (
    facts,
    html_figure,
    html_table,
    num,
    pct,
    width_text,
)


def size_section(doc: Mapping[str, Any]) -> str:
    lid = doc["lid"]
    per_tensor = lid["per_tensor"]
    rows = [
        [
            f"<code>{escape(name)}</code>",
            f"{w['n']:,}",
            width_text(w["mean_width"]),
            width_text(w["max_width"]),
            width_text(w["total_width"]),
            pct(w["frozen_fraction"]),
        ]
        for name, w in per_tensor.items()
    ]
    rows.append(
        [
            "<b>all</b>",
            f"{lid['n_parameters']:,}",
            width_text(lid["mean_width"]),
            "",
            width_text(lid["total_width"]),
            "",
        ]
    )
    figure = html_figure(
        plots.width_chart(per_tensor),
        "width per parameter tensor",
        "How far each group of weights (parameter tensor, named as in the ONNX model) may move: "
        "the mean width of its intervals (bars) and its widest interval (marks).",
    )
    table = html_table(
        ["tensor", "weights", "mean width", "max width", "total width", "kept fixed"],
        rows,
        {1, 2, 3, 4, 5},
    )
    return f"""<p>The LID gives every weight its own interval [lower, upper] around its current
value. Any update that keeps each weight in its interval keeps the guarantee. Wider intervals
leave more room for later fine-tuning.</p>{figure}{table}"""


def search_section(doc: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> str:
    search = doc["search"]
    figure = html_figure(
        plots.search_chart(history, search["checkpoints"], doc["tasks"]),
        "certified accuracy and width against search iteration",
        "Top: accuracy proven over the whole box at each iteration of the search (thin line: "
        "on the search's batch; dots: on all optimisation data at each checkpoint); dashed: "
        "τ; dotted: the search's own, stricter target; star: the guaranteed bound L of the "
        "chosen LID on the held-out data. Bottom: the box's mean width. The search only ever "
        "saw the optimisation data.",
    )
    hard = ", ".join(num(h) for h in search["optimisation_hard_metric"])
    rows = [
        ["Iterations", str(search["iterations"])],
        ["Chosen LID", escape(search["chosen"])],
        ["Proven metric of the chosen LID on the optimisation data", hard],
        [
            "Meets the search target on the optimisation data",
            "yes" if search["feasible_on_optimisation_data"] else "no",
        ],
        ["Run time", f"{search['seconds']:.1f} s"],
        [
            "History file (sha256)",
            f'<span class="hash">{search["history_sha256"] or "absent"}</span>',
        ],
    ]
    if not history:
        figure = "<p>No history.jsonl was found next to the certificate.</p>" + figure
    return f"""<p>The LID is found by an optimisation that widens the intervals as far as
possible while the proven accuracy on the optimisation data stays above a target; the widest
candidate that meets it is chosen (shrunk toward the current weights if needed).</p>
{figure}{facts(rows)}"""


def crosscheck_section(doc: Mapping[str, Any]) -> str:
    section = doc["crosscheck"]
    if section is None:
        return (
            "<p>No cross-check was run for this LID. <code>verifier crosscheck</code> tries to "
            "break the proof with random and extreme weights in the LID and compares the "
            "bounds with exact solutions on a sample.</p>"
        )
    summary = section["summary"]
    sound = summary["verdict"] == "sound"
    verdict = (
        '<span class="ok">no violation found</span>'
        if sound
        else f'<span class="bad">{summary["violations"]} violation(s) found</span>'
    )
    exact = summary["exact"]
    rows = [
        ["Verdict", verdict],
        ["Samples / margins checked", f"{summary['n_samples']} / {summary['n_margins']}"],
        [
            "Exact solver",
            f"{exact['solved']} solved, {exact['timeout']} timed out, {exact['skipped']} skipped",
        ],
        ["Time", f"{summary['time_s']:.1f} s"],
        ["crosscheck.json sha256", f'<span class="hash">{section["sha256"]}</span>'],
    ]
    series: dict[str, Mapping[str, float | None]] = {}
    for key, against in (("gaps", "exact worst case"), ("gaps_to_falsified", "best attack")):
        for method, stats in (summary.get(key) or {}).items():
            if isinstance(stats, Mapping) and stats.get("mean") is not None:
                series[f"{method} vs {against}"] = stats
    for name, stats in series.items():
        rows.append(
            [
                f"Gap, {escape(name)} (mean / median / max)",
                " / ".join(
                    "–" if stats.get(k) is None else f"{stats[k]:.4g}"
                    for k in ("mean", "median", "max")
                ),
            ]
        )
    table = facts(rows)
    figure = ""
    if series:
        figure = html_figure(
            plots.gap_chart(series),
            "cross-check gaps",
            "How cautious the bounds are: the margin reached by the exact worst case (or by "
            "the best attack, which over-estimates the gap) minus the margin the bound "
            "proved. 0 = exact; larger = more cautious. A negative gap would be a violation.",
        )
    return f"""<p>An independent check tried to break the proof: it searched for weights inside
the LID that misclassify a sample the bounds proved, and compared the bounds with the exact
worst case where a solver could compute it.</p>{table}{figure}"""


def reproduce_section(doc: Mapping[str, Any], out_dir: Path) -> str:
    command = doc["command"] or "(not recorded: the run was started from Python)"
    software = html_table(
        ["package", "version"],
        [[escape(k), escape(v)] for k, v in doc["software"].items()],
        set(),
    )
    spec = escape(json.dumps(doc["spec"], indent=2))
    where = str(doc["working_directory"])
    relative = "" if Path(where).is_absolute() else " (relative to the report's folder)"
    return f"""<p>The run was produced by this command, in the folder
<code>{escape(where)}</code>{relative}:</p>
<pre>{escape(command)}</pre>
<p>Recompute every number of this certificate from the model, the LID and the data, and check
every fingerprint (exit code 0 when everything matches):</p>
<pre>verifier verify {escape(str(out_dir))}</pre>
<p>This report displays the certificate as recorded in
<code>{CERTIFICATE_FILE}</code>; it does not re-check it. The search is seeded, so re-running
the command with the same software versions reproduces the same LID.</p>
<h3>Software</h3>{software}
<h3>The full specification (normalised; spec sha256
<span class="hash">{doc["spec_sha256"]}</span>)</h3>
<pre>{spec}</pre>"""
