"""`verifier report` and `verifier verify`: the compliance report and re-verification of a run."""

from __future__ import annotations

from pathlib import Path

import click

from verifier.cli.conventions import JSON_OPT, ExitCode, emit_json, input_errors_exit_2

OUT_DIR_ARG = click.argument("out_dir", type=click.Path(path_type=Path))
PDF_OPT = click.option(
    "--pdf", is_flag=True, help="Also print the report to PDF (needs headless Chromium)."
)


def write_report_files(out_dir: Path, *, pdf: bool) -> None:
    """Write OUT/report.html (and report.pdf) and say so on stderr; InputErrors propagate."""
    from verifier.report.html import write_report

    files = write_report(out_dir, pdf=pdf)
    if files.crosscheck == "attached":
        click.echo(f"cross-check attached to {out_dir / 'certificate.json'}", err=True)
    elif files.crosscheck == "stale":
        click.echo(
            f"note: {out_dir / 'crosscheck.json'} is for another model or LID; left out", err=True
        )
    click.echo(f"report: {files.html}", err=True)
    if files.pdf is not None:
        click.echo(f"pdf: {files.pdf}", err=True)


@click.command()
@OUT_DIR_ARG
@PDF_OPT
@click.pass_context
@input_errors_exit_2
def report(ctx: click.Context, out_dir: Path, pdf: bool) -> None:
    """Rebuild the HTML report (and --pdf) of the run in OUT_DIR from its artifacts.

    Writes OUT_DIR/report.html, one self-contained file, and attaches a matching
    OUT_DIR/crosscheck.json to certificate.json first. Prints the certificate's verdict on
    stdout; exit 0 when the report was written, whatever the verdict.
    """
    from verifier.report.artifacts import load_certificate

    write_report_files(out_dir, pdf=pdf)
    click.echo(f"verdict: {load_certificate(out_dir)['verdict']}")
    ctx.exit(ExitCode.OK)


@click.command()
@OUT_DIR_ARG
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The model file, if it moved since the run (its sha256 must still match).",
)
@JSON_OPT
@click.pass_context
@input_errors_exit_2
def verify(ctx: click.Context, out_dir: Path, model_path: Path | None, as_json: bool) -> None:
    """Recompute the certificate in OUT_DIR from the model, LID and data; check every hash.

    Exit 0 when every recomputed number and hash matches certificate.json, 1 on any mismatch
    (each reported with its file, field, recomputed and recorded value), 2 on bad input.
    """
    from verifier.verification import verify_artifacts

    result = verify_artifacts(
        out_dir, model_path=model_path, on_phase=lambda m: click.echo(m, err=True)
    )
    if as_json:
        emit_json(result.to_json())
    else:
        for check in result.checks:
            label = {"ok": "ok", "failed": "FAILED", "not recomputed": "not recomputed"}.get(
                check.status, check.status
            )
            click.echo(f"{label:<15} {check.subject:<16} {check.detail}")
        counts = (
            f"{result.count('ok')} checks ok, {result.count('failed')} failed, "
            f"{result.count('not recomputed')} not recomputed"
        )
        click.echo(f"verdict: {'verified' if result.ok else 'FAILED'} ({counts})")
    ctx.exit(ExitCode.OK if result.ok else ExitCode.SPEC_NOT_MET)
