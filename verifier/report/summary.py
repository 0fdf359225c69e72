"""The report's first sections: the verdict, the key facts, the guarantee, and the evidence per
task and per class."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

from verifier.report import plots
from verifier.report.elements import (
    BOUND_NAMES,
    METHOD_NAMES,
    facts,
    html_figure,
    html_table,
    metric_name,
    num,
    ours,
    pct,
    target_text,
    width_text,
)


def verdict_section(doc: Mapping[str, Any], crosscheck: Mapping[str, Any] | None) -> str:
    tasks = doc["tasks"]
    confidence = pct(1 - doc["proof"]["beta"])
    n_params = doc["lid"]["n_parameters"]
    model = escape(Path(doc["model"]["path"]).name)
    sentences = []
    for task in tasks:
        comparison = "at least" if task["holds"] else "only"
        sentences.append(
            f"on task <b>{escape(task['task'])}</b>, {metric_name(task)} is guaranteed to be "
            f"{comparison} <b>{pct(task['lower_bound'])}</b> (required: "
            f"{pct(task['target'])}) {'✔' if task['holds'] else '✘'}"
        )
    refuted = crosscheck is not None and crosscheck["summary"].get("verdict") == "violation"
    if doc["holds"] and not refuted:
        word, css = "PASSED — the requirement holds", "pass"
        lead = (
            f"Every version of the model <code>{model}</code> whose {n_params:,} weights each "
            "stay inside their certified range (the <i>locally invariant domain</i>, LID) meets "
            f"the requirement, with {confidence} confidence:"
        )
    elif refuted:
        word, css = "DO NOT RELY ON THIS CERTIFICATE", "fail"
        lead = (
            "The independent cross-check found weights inside the LID for which a sample that "
            "the bounds claimed safe is misclassified: the bound method was refuted here."
        )
    else:
        word, css = "NOT MET — the requirement is not guaranteed", "fail"
        lead = (
            f"The certified lower bound misses the required level on at least one task (at "
            f"{confidence} confidence). The weight ranges were written, but they carry no "
            "guarantee of meeting the requirement:"
        )
    items = "".join(f"<li>{s}</li>" for s in sentences)
    return (
        f'<div class="verdict {css}"><div class="word">{word}</div><p>{lead}</p>'
        f"<ul>{items}</ul></div>"
    )


def key_facts_section(doc: Mapping[str, Any]) -> str:
    lid = doc["lid"]
    rows = [
        ["Model file", f"<code>{escape(doc['model']['path'])}</code>"],
        ["Model sha256", f'<span class="hash">{doc["model"]["sha256"]}</span>'],
        ["LID file", f"<code>{escape(lid['path'])}</code>"],
        ["LID sha256", f'<span class="hash">{lid["sha256"]}</span>'],
        [
            "Weights covered",
            f"{lid['n_parameters']:,} in {len(lid['per_tensor'])} tensors; mean allowed change "
            f"{width_text(lid['mean_width'])}",
        ],
        ["Proof method", escape(METHOD_NAMES.get(doc["proof"]["method"], doc["proof"]["method"]))],
        [
            "Statistical bound",
            f"{escape(BOUND_NAMES.get(doc['proof']['bound_kind'], doc['proof']['bound_kind']))}, "
            f"β = {doc['proof']['beta']:g} (confidence {pct(1 - doc['proof']['beta'])})",
        ],
        ["Created", f"{escape(doc['created'])} with lid-verifier {escape(ours(doc))}"],
    ]
    return facts(rows)


def guarantee_section(doc: Mapping[str, Any]) -> str:
    beta = doc["proof"]["beta"]
    parts = []
    for task in doc["tasks"]:
        bound = BOUND_NAMES[task["bound_kind"]]
        if task["metric"] == "balanced_accuracy":
            n_classes = max(len(task["per_class"]), 1)
            how = (
                f"L is the mean over the {n_classes} classes of the {bound} of each class's "
                f"proven fraction, each at confidence 1 − β/{n_classes}, so that all hold "
                "together with confidence 1 − β"
            )
        else:
            how = f"L is the {bound} for k = {task['k']} proven samples out of n = {task['n']}"
        parts.append(
            f"<li>Task <b>{escape(task['task'])}</b>: with probability at least 1 − β = "
            f"{1 - beta:g} over the random draw of the n = {task['n']} held-out certification "
            f"samples, <b>every</b> network whose weights lie in the LID has "
            f"{metric_name(task)} at least L = {num(task['lower_bound'])} on the distribution "
            f"those samples come from. {how}.</li>"
        )
    assumptions = "".join(f"<li>{escape(a)}</li>" for a in doc["assumptions"])
    return f"""
<p>A held-out sample counts as <i>proven</i> when a mathematical bound shows that the model
classifies it correctly for <b>all</b> weight settings in the LID at once, not just for the
current weights. The proportion of proven samples, corrected for the size of the sample, gives
the guaranteed level:</p>
<ul>{"".join(parts)}</ul>
<h3>This rests on these assumptions</h3>
<ol>{assumptions}</ol>
<h3>What is not guaranteed</h3>
<ul>
<li>Weights outside the LID: an update must be projected onto the LID (each weight clipped into
its range) for the guarantee to apply.</li>
<li>Data from another distribution than the held-out samples (other users, other sensors,
drift over time), and robustness of single inputs to small input changes.</li>
<li>A single run of the model is not guaranteed to be correct: the statement is about the
proportion of correct answers.</li>
<li>The β chance that the held-out sample was unrepresentative; the statement says how small
that chance is, not that it is zero.</li>
</ul>"""


def evidence_section(doc: Mapping[str, Any]) -> str:
    spec_tasks = {t.get("name"): t for t in doc["spec"].get("tasks", [])}
    rows = []
    for task in doc["tasks"]:
        ok = (
            '<span class="ok">holds</span>' if task["holds"] else '<span class="bad">not met</span>'
        )
        rows.append(
            [
                escape(task["task"]),
                escape(metric_name(task)),
                target_text(task, spec_tasks.get(task["task"])),
                str(task["n"]),
                str(task["k"]),
                pct(task["certified_fraction"]),
                num(task["lower_bound"]),
                str(task["n_nonfinite"]),
                ok,
            ]
        )
    table = html_table(
        [
            "task",
            "metric",
            "required τ",
            "held-out n",
            "proven k",
            "k / n",
            "guaranteed L",
            "NaN/Inf",
            "result",
        ],
        rows,
        {3, 4, 5, 6, 7},
    )
    data_rows = [
        [
            escape(t["task"]),
            f"<code>{escape(t['data']['name'])}</code> [{escape(t['data']['split'])}]"
            + ("" if t["data"]["classes"] is None else f" classes {t['data']['classes']}"),
            str(t["n_optimisation"]),
            f'<span class="hash">{t["optimisation_data_sha256"]}</span>',
            str(t["n"]),
            f'<span class="hash">{t["certification_data_sha256"]}</span>',
        ]
        for t in doc["tasks"]
    ]
    data_table = html_table(
        ["task", "data", "optimisation n", "optimisation sha256", "held-out n", "held-out sha256"],
        data_rows,
        {2, 4},
    )
    return f"""{table}
<p>The data of each task was split once, with a fixed seed, into an <i>optimisation</i> part
that the search for the LID used and a <i>held-out</i> part that only this certificate used.
Their fingerprints (sha256) let anyone check that the same data was used:</p>
{data_table}"""


def per_class_section(doc: Mapping[str, Any]) -> str:
    out = []
    for task in doc["tasks"]:
        classes = task["per_class"]
        if not classes:
            continue
        n_classes = len(classes)
        caption = (
            f"Task {escape(task['task'])}: bars are the fraction of held-out samples of each "
            f"class proven correct for every weight setting in the LID; the marks are per-class "
            f"guaranteed lower bounds, each at confidence 1 − β/{n_classes} so that all "
            f"{n_classes} hold together with confidence 1 − β. Dashed: the task's τ."
        )
        out.append(
            html_figure(plots.per_class_chart(task), "per-class certified accuracy", caption)
        )
        rows = [
            [
                str(c["label"]),
                str(c["n"]),
                str(c["k"]),
                pct(c["k"] / c["n"]) if c["n"] else "–",
                num(c["lower_bound"]),
            ]
            for c in classes
        ]
        out.append(
            html_table(
                ["class", "held-out n", "proven k", "k / n", "lower bound"], rows, {1, 2, 3, 4}
            )
        )
    return "".join(out) or "<p>No per-class counts were recorded.</p>"
