"""The compliance report: one self-contained HTML file (and a PDF print of it).

The page has no script and loads nothing: styles are inline and every chart is an SVG image
embedded as a data URI. It is written for a reviewer who is not an ML expert: the verdict in
plain words first, then the precise guarantee and its assumptions, the evidence per task and
per class, how much the weights may change, how the LID was found, the cross-check, and how to
reproduce and re-verify it. The report shows the certificate as recorded; `verifier verify`
is what recomputes it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Final

from verifier.domains.io import write_text_atomic
from verifier.report import plots
from verifier.report.artifacts import (
    CERTIFICATE_FILE,
    PDF_FILE,
    REPORT_FILE,
    ArtifactError,
    load_certificate,
    load_history,
)
from verifier.report.certificate import (
    SCHEMA_VERSION,
    CrosscheckStatus,
    attach_crosscheck,
    schema_errors,
)

METHOD_NAMES: Final = {
    "ibp": "interval bound propagation with exact interval products (ibp)",
    "midrad": "interval bound propagation, midpoint-radius products (midrad)",
    "crown-ibp": "CROWN-IBP linear relaxation from auto_LiRPA (crown-ibp)",
    "best": "the tightest of exact intervals and auto_LiRPA CROWN-IBP, per sample (best)",
}
BOUND_NAMES: Final = {
    "clopper-pearson": "one-sided Clopper–Pearson (exact binomial) bound",
    "hoeffding": "one-sided Hoeffding bound",
}

STYLE: Final = """
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; color: #1d2327;
       max-width: 980px; margin: 24px auto; padding: 0 20px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 20px; border-bottom: 2px solid #dde3e8; padding-bottom: 4px; margin-top: 34px; }
h3 { font-size: 16px; margin-bottom: 6px; }
.sub { color: #55606a; margin-top: 0; }
.verdict { border-radius: 8px; padding: 16px 20px; margin: 18px 0; border: 2px solid; }
.verdict.pass { background: #e8f5e9; border-color: #2e7d32; }
.verdict.fail { background: #fdecea; border-color: #c62828; }
.verdict .word { font-size: 24px; font-weight: bold; letter-spacing: 0.5px; }
.verdict.pass .word { color: #2e7d32; } .verdict.fail .word { color: #c62828; }
.verdict p { margin: 8px 0 0 0; font-size: 16px; }
.warn { background: #fff4e5; border-left: 5px solid #ef6c00; padding: 10px 14px; margin: 12px 0; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13.5px; width: 100%; }
th, td { border: 1px solid #d5dbe0; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f2f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, pre, .hash { font-family: "DejaVu Sans Mono", Consolas, monospace; font-size: 12.5px; }
.hash { word-break: break-all; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-all; }
figure { margin: 12px 0; } figure img { width: 100%; height: auto; }
figcaption { color: #55606a; font-size: 13px; }
.ok { color: #2e7d32; font-weight: bold; } .bad { color: #c62828; font-weight: bold; }
ol li, ul li { margin-bottom: 4px; }
footer { margin-top: 40px; color: #7a848d; font-size: 12px; border-top: 1px solid #dde3e8;
         padding-top: 8px; }
@page { size: A4; margin: 14mm; }
@media print { body { margin: 0; max-width: none; font-size: 12px; }
  h2 { break-after: avoid; } figure, table, .verdict { break-inside: avoid; } }
"""


@dataclass(frozen=True)
class ReportFiles:
    """What `write_report` wrote, and what it did with crosscheck.json."""

    html: Path
    pdf: Path | None
    crosscheck: CrosscheckStatus
    verdict: str


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _num(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def _width(value: float) -> str:
    return f"{value:.3g}"


def _figure(svg: str, alt: str, caption: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return (
        f'<figure><img alt="{escape(alt)}" src="data:image/svg+xml;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
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


def _facts(rows: Sequence[Sequence[str]]) -> str:
    """A two-column table of labelled facts (cells are HTML already)."""
    body = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    return f"<table>{body}</table>"


def _target_text(task: Mapping[str, Any], spec_task: Mapping[str, Any] | None) -> str:
    raw = None if spec_task is None else spec_task.get("target")
    if isinstance(raw, str):
        return (
            f"{_pct(task['target'])} (spec: <code>{escape(raw)}</code>: the current model's "
            f"{_pct(task['clean_metric'])} on the optimisation data, minus the margin)"
        )
    return f"{_pct(task['target'])} (fixed in the spec)"


def _metric_name(task: Mapping[str, Any]) -> str:
    return "balanced accuracy" if task["metric"] == "balanced_accuracy" else "accuracy"


def _verdict(doc: Mapping[str, Any], crosscheck: Mapping[str, Any] | None) -> str:
    tasks = doc["tasks"]
    confidence = _pct(1 - doc["proof"]["beta"])
    n_params = doc["lid"]["n_parameters"]
    model = escape(Path(doc["model"]["path"]).name)
    sentences = []
    for task in tasks:
        comparison = "at least" if task["holds"] else "only"
        sentences.append(
            f"on task <b>{escape(task['task'])}</b>, {_metric_name(task)} is guaranteed to be "
            f"{comparison} <b>{_pct(task['lower_bound'])}</b> (required: "
            f"{_pct(task['target'])}) {'✔' if task['holds'] else '✘'}"
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


def _key_facts(doc: Mapping[str, Any]) -> str:
    lid = doc["lid"]
    rows = [
        ["Model file", f"<code>{escape(doc['model']['path'])}</code>"],
        ["Model sha256", f'<span class="hash">{doc["model"]["sha256"]}</span>'],
        ["LID file", f"<code>{escape(lid['path'])}</code>"],
        ["LID sha256", f'<span class="hash">{lid["sha256"]}</span>'],
        [
            "Weights covered",
            f"{lid['n_parameters']:,} in {len(lid['per_tensor'])} tensors; mean allowed change "
            f"{_width(lid['mean_width'])}",
        ],
        ["Proof method", escape(METHOD_NAMES.get(doc["proof"]["method"], doc["proof"]["method"]))],
        [
            "Statistical bound",
            f"{escape(BOUND_NAMES.get(doc['proof']['bound_kind'], doc['proof']['bound_kind']))}, "
            f"β = {doc['proof']['beta']:g} (confidence {_pct(1 - doc['proof']['beta'])})",
        ],
        ["Created", f"{escape(doc['created'])} with lid-verifier {escape(_ours(doc))}"],
    ]
    return _facts(rows)


def _ours(doc: Mapping[str, Any]) -> str:
    return str(doc["software"].get("lid-verifier", "?"))


def _guarantee(doc: Mapping[str, Any]) -> str:
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
            f"{_metric_name(task)} at least L = {_num(task['lower_bound'])} on the distribution "
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


def _evidence(doc: Mapping[str, Any]) -> str:
    spec_tasks = {t.get("name"): t for t in doc["spec"].get("tasks", [])}
    rows = []
    for task in doc["tasks"]:
        ok = (
            '<span class="ok">holds</span>' if task["holds"] else '<span class="bad">not met</span>'
        )
        rows.append(
            [
                escape(task["task"]),
                escape(_metric_name(task)),
                _target_text(task, spec_tasks.get(task["task"])),
                str(task["n"]),
                str(task["k"]),
                _pct(task["certified_fraction"]),
                _num(task["lower_bound"]),
                str(task["n_nonfinite"]),
                ok,
            ]
        )
    table = _table(
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
    data_table = _table(
        ["task", "data", "optimisation n", "optimisation sha256", "held-out n", "held-out sha256"],
        data_rows,
        {2, 4},
    )
    return f"""{table}
<p>The data of each task was split once, with a fixed seed, into an <i>optimisation</i> part
that the search for the LID used and a <i>held-out</i> part that only this certificate used.
Their fingerprints (sha256) let anyone check that the same data was used:</p>
{data_table}"""


def _per_class(doc: Mapping[str, Any]) -> str:
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
        out.append(_figure(plots.per_class_chart(task), "per-class certified accuracy", caption))
        rows = [
            [
                str(c["label"]),
                str(c["n"]),
                str(c["k"]),
                _pct(c["k"] / c["n"]) if c["n"] else "–",
                _num(c["lower_bound"]),
            ]
            for c in classes
        ]
        out.append(
            _table(["class", "held-out n", "proven k", "k / n", "lower bound"], rows, {1, 2, 3, 4})
        )
    return "".join(out) or "<p>No per-class counts were recorded.</p>"


def _size(doc: Mapping[str, Any]) -> str:
    lid = doc["lid"]
    per_tensor = lid["per_tensor"]
    rows = [
        [
            f"<code>{escape(name)}</code>",
            f"{w['n']:,}",
            _width(w["mean_width"]),
            _width(w["max_width"]),
            _width(w["total_width"]),
            _pct(w["frozen_fraction"]),
        ]
        for name, w in per_tensor.items()
    ]
    rows.append(
        [
            "<b>all</b>",
            f"{lid['n_parameters']:,}",
            _width(lid["mean_width"]),
            "",
            _width(lid["total_width"]),
            "",
        ]
    )
    figure = _figure(
        plots.width_chart(per_tensor),
        "width per parameter tensor",
        "How far each group of weights (parameter tensor, named as in the ONNX model) may move: "
        "the mean width of its intervals (bars) and its widest interval (marks).",
    )
    table = _table(
        ["tensor", "weights", "mean width", "max width", "total width", "kept fixed"],
        rows,
        {1, 2, 3, 4, 5},
    )
    return f"""<p>The LID gives every weight its own interval [lower, upper] around its current
value. Any update that keeps each weight in its interval keeps the guarantee. Wider intervals
leave more room for later fine-tuning.</p>{figure}{table}"""


def _search(doc: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> str:
    search = doc["search"]
    figure = _figure(
        plots.search_chart(history, search["checkpoints"], doc["tasks"]),
        "certified accuracy and width against search iteration",
        "Top: accuracy proven over the whole box at each iteration of the search (thin line: "
        "on the search's batch; dots: on all optimisation data at each checkpoint); dashed: "
        "τ; dotted: the search's own, stricter target; star: the guaranteed bound L of the "
        "chosen LID on the held-out data. Bottom: the box's mean width. The search only ever "
        "saw the optimisation data.",
    )
    hard = ", ".join(_num(h) for h in search["optimisation_hard_metric"])
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
{figure}{_facts(rows)}"""


def _crosscheck(doc: Mapping[str, Any]) -> str:
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
    table = _facts(rows)
    figure = ""
    if series:
        figure = _figure(
            plots.gap_chart(series),
            "cross-check gaps",
            "How cautious the bounds are: the margin reached by the exact worst case (or by "
            "the best attack, which over-estimates the gap) minus the margin the bound "
            "proved. 0 = exact; larger = more cautious. A negative gap would be a violation.",
        )
    return f"""<p>An independent check tried to break the proof: it searched for weights inside
the LID that misclassify a sample the bounds proved, and compared the bounds with the exact
worst case where a solver could compute it.</p>{table}{figure}"""


def _reproduce(doc: Mapping[str, Any], out_dir: Path) -> str:
    command = doc["command"] or "(not recorded: the run was started from Python)"
    software = _table(
        ["package", "version"],
        [[escape(k), escape(v)] for k, v in doc["software"].items()],
        set(),
    )
    spec = escape(json.dumps(doc["spec"], indent=2))
    return f"""<p>The run was produced by this command, in the folder
<code>{escape(doc["working_directory"])}</code>:</p>
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


def render_report(
    doc: Mapping[str, Any], history: Sequence[Mapping[str, Any]], *, out_dir: Path
) -> str:
    """The report as one self-contained HTML document.

    Args:
        doc: a certificate that passed its schema.
        history: the search history (history.jsonl entries; may be empty).
        out_dir: the run's folder (named in the re-verification command).
    """
    crosscheck = doc["crosscheck"]
    title = f"Compliance report: {Path(doc['model']['path']).name}"
    sections = [
        ("What exactly is guaranteed", _guarantee(doc)),
        ("Evidence per task", _evidence(doc)),
        ("Per-class certified accuracy", _per_class(doc)),
        ("How much the weights may change", _size(doc)),
        ("How the LID was found", _search(doc, history)),
        ("Independent cross-check", _crosscheck(doc)),
        ("Reproduce and re-verify", _reproduce(doc, out_dir)),
    ]
    body = "".join(
        f"<h2>{i}. {escape(name)}</h2>{part}" for i, (name, part) in enumerate(sections, 1)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="sub">Certificate of a locally invariant domain (LID): weight ranges within which
every updated model provably keeps its accuracy requirement.</p>
{_verdict(doc, crosscheck)}
{_key_facts(doc)}
{body}
<footer>Generated by lid-verifier from <code>{CERTIFICATE_FILE}</code> (schema version
{escape(str(doc["schema_version"]))}).</footer>
</body></html>
"""


def write_report(out_dir: Path, *, pdf: bool = False) -> ReportFiles:
    """Rebuild OUT/report.html (and OUT/report.pdf) from the artifacts of a run.

    A crosscheck.json of this LID is first folded into certificate.json (see
    `attach_crosscheck`). Files are written atomically.

    Args:
        out_dir: the run's output folder.
        pdf: also print the report to PDF with headless Chromium.

    Returns:
        The paths written and the crosscheck status.

    Raises:
        ArtifactError: missing folder, missing or malformed certificate.json, a certificate
            that fails its schema, or a malformed crosscheck.json or history.jsonl.
        BackendError: pdf requested and Chromium is missing or fails.
    """
    doc = load_certificate(out_dir)
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{out_dir / CERTIFICATE_FILE}: schema version {doc.get('schema_version')!r}; "
            f"this version reports on {SCHEMA_VERSION!r}"
        )
    errors = schema_errors(doc)
    if errors:
        raise ArtifactError(
            f"{out_dir / CERTIFICATE_FILE}: fails its schema {errors[0]} "
            f"({len(errors)} problem(s); run `verifier verify`)"
        )
    status = attach_crosscheck(out_dir)
    if status == "attached":
        doc = load_certificate(out_dir)
    html_path = out_dir / REPORT_FILE
    write_text_atomic(html_path, render_report(doc, load_history(out_dir), out_dir=out_dir))
    pdf_path = None
    if pdf:
        from verifier.report.browser import print_pdf

        pdf_path = out_dir / PDF_FILE
        print_pdf(html_path, pdf_path)
    return ReportFiles(html_path, pdf_path, status, doc["verdict"])
