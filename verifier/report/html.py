"""The compliance report: one self-contained HTML file (and a PDF print of it).

The page has no script and loads nothing: styles are inline and every chart is an SVG image
embedded as a data URI. It is written for a reviewer who is not an ML expert: the verdict in
plain words first, then the precise guarantee and its assumptions, the evidence per task and
per class, how much the weights may change, how the LID was found, the cross-check, and how to
reproduce and re-verify it. The report shows the certificate as recorded; `verifier verify`
is what recomputes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Final

from verifier.files import write_text_atomic
from verifier.report.artifacts import (
    CERTIFICATE_FILE,
    PDF_FILE,
    REPORT_FILE,
    ArtifactError,
    load_certificate,
    load_history,
)
from verifier.report.certificate import (
    READABLE_SCHEMA_VERSIONS,
    CrosscheckStatus,
    attach_crosscheck,
    schema_errors,
)
from verifier.report.details import (
    crosscheck_section,
    reproduce_section,
    search_section,
    size_section,
)
from verifier.report.summary import (
    evidence_section,
    guarantee_section,
    key_facts_section,
    per_class_section,
    verdict_section,
)

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
        ("What exactly is guaranteed", guarantee_section(doc)),
        ("Evidence per task", evidence_section(doc)),
        ("Per-class certified accuracy", per_class_section(doc)),
        ("How much the weights may change", size_section(doc)),
        ("How the LID was found", search_section(doc, history)),
        ("Independent cross-check", crosscheck_section(doc)),
        ("Reproduce and re-verify", reproduce_section(doc, out_dir)),
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
{verdict_section(doc, crosscheck)}
{key_facts_section(doc)}
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
    if doc.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ArtifactError(
            f"{out_dir / CERTIFICATE_FILE}: schema version {doc.get('schema_version')!r}; "
            f"this version reports on {' and '.join(map(repr, READABLE_SCHEMA_VERSIONS))}"
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
