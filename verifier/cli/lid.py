"""`verifier lid`, `run` and `certify`: search a box LID, certify it, re-certify any LID."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from verifier.cli.cluster import RAY_OPT, certify_document, ray_certifier
from verifier.cli.conventions import (
    DEVICE_OPT,
    JSON_OPT,
    MAX_MEMORY_OPT,
    ExitCode,
    NotCertifiable,
    data_dir_option,
    emit_json,
    input_errors_exit_2,
    memory_limit,
    progress,
)

if TYPE_CHECKING:
    from verifier.spec import Spec


def _lid_job(
    spec_path: Path, out_dir: Path, device: str | None, as_json: bool, max_memory: int | None
) -> bool:
    from verifier.errors import TargetUnreachable
    from verifier.pipeline import run_lid
    from verifier.spec import load_spec

    spec = load_spec(spec_path)
    on_step, on_phase, close = progress(search_steps(spec))
    try:
        with memory_limit(max_memory, device or spec.device):
            run = run_lid(
                spec,
                out_dir,
                device=device,
                on_step=on_step,
                on_phase=on_phase,
                command=" ".join(["verifier", *sys.argv[1:]]),
            )
    except TargetUnreachable as err:  # explained before any search; nothing written
        raise NotCertifiable(str(err)) from err
    finally:
        close()
    if as_json:
        emit_json(run.document)
    else:
        click.echo(render_certificate(run.document))
    return run.holds


def search_steps(spec: Spec) -> int:
    """Steps the search reports: the box search's, plus the zonotope stage's for a zonotope."""
    steps = spec.search.iterations
    if spec.domain == "zonotope":
        extra = spec.zonotope.iterations
        steps += spec.search.iterations if extra is None else extra
    return steps


def render_certificate(doc: dict[str, Any]) -> str:
    """A short human summary of a certificate document."""
    lines = [f"verdict: {doc['verdict']}"]
    lid = doc["lid"]
    lines.append(
        f"LID: {lid['domain']} over {lid['n_parameters']} parameters, mean width "
        f"{lid['mean_width']:.4g} ({doc['search']['chosen']})"
    )
    if lid["domain"] == "zonotope":
        lines.append(
            f"  k = {lid['n_generators']} generators (norms {lid['generator_norms']['min']:.4g}"
            f" to {lid['generator_norms']['max']:.4g}), isotropic width "
            f"{lid['isotropic_width']:.4g}; mean width is that of the interval hull"
        )
    for task in doc["tasks"]:
        lines.append(
            f"task {task['task']}: {task['metric']} clean {task['clean_metric']:.4f}, "
            f"target {task['target']:.4f}; held-out certified {task['k']}/{task['n']}, "
            f"{task['bound_kind']} lower bound {task['lower_bound']:.4f} at "
            f"beta={task['beta']:.3g} -> {'holds' if task['holds'] else 'NOT MET'}"
        )
    for entry in doc.get("inherited", []):
        status = "applies" if entry["applies"] else f"does NOT apply ({entry['applies_reason']})"
        lines.append(
            f"earlier task {entry['task']} (outer LID {entry['lid_path']}): held-out "
            f"{entry['k']}/{entry['n']}, lower bound {entry['lower_bound']:.4f}, target "
            f"{entry['target']:.4f}; this LID lies inside it, so the certificate {status}"
        )
    ladder = doc.get("ladder")
    if ladder is not None and len(ladder["tried"]) > 1:
        lines.append(
            f"ladder: scale {ladder['chosen_scale']:g} of search {ladder['chosen_search'] + 1} "
            f"kept, the widest of {len(ladder['tried'])} candidates certified in a fixed "
            f"sequence (each at beta = {ladder['beta']:g})"
        )
    lines.extend(f"WARNING: {warning}" for warning in doc.get("warnings", []))
    lines.append(f"written: {lid['path']} and certificate.json beside it")
    return "\n".join(lines)


SPEC_ARG = click.argument("spec_path", type=click.Path(path_type=Path))
OUT_OPT = click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder (lid.safetensors, certificate.json, history.jsonl).",
)


@click.command()
@SPEC_ARG
@OUT_OPT
@DEVICE_OPT
@JSON_OPT
@RAY_OPT
@MAX_MEMORY_OPT
@click.pass_context
@input_errors_exit_2
def lid(
    ctx: click.Context,
    spec_path: Path,
    out_dir: Path,
    device: str | None,
    as_json: bool,
    ray_address: str | None,
    max_memory: int | None,
) -> None:
    """Search a box LID for SPEC_PATH and certify it on held-out data."""
    with ray_certifier(ray_address):  # issue 22: checkpoint proofs and certificate as Ray tasks
        holds = _lid_job(spec_path, out_dir, device, as_json, max_memory)
    ctx.exit(ExitCode.OK if holds else ExitCode.SPEC_NOT_MET)


@click.command()
@SPEC_ARG
@OUT_OPT
@DEVICE_OPT
@JSON_OPT
@click.option("--pdf", is_flag=True, help="Also print the report to PDF (headless Chromium).")
@RAY_OPT
@MAX_MEMORY_OPT
@click.pass_context
@input_errors_exit_2
def run(
    ctx: click.Context,
    spec_path: Path,
    out_dir: Path,
    device: str | None,
    as_json: bool,
    pdf: bool,
    ray_address: str | None,
    max_memory: int | None,
) -> None:
    """Run the whole pipeline for SPEC_PATH: the `lid` job, then the compliance report.

    Writes what `lid` writes plus OUT/report.html (and report.pdf with --pdf); the exit code
    follows the certificate as for `lid`.
    """
    from verifier.cli.report import write_report_files

    with ray_certifier(ray_address):  # issue 22: checkpoint proofs and certificate as Ray tasks
        holds = _lid_job(spec_path, out_dir, device, as_json, max_memory)
    # the cross-check (`verifier crosscheck`) goes here, before the report that shows it
    write_report_files(out_dir, pdf=pdf)
    ctx.exit(ExitCode.OK if holds else ExitCode.SPEC_NOT_MET)


@click.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("lid_path", type=click.Path(path_type=Path))
@click.argument("data_ref")
@click.option("--split", default="test", show_default=True, help="Split of the data set.")
@data_dir_option
@click.option("--target", type=click.FloatRange(0.0, 1.0), default=None, help="τ to check.")
@click.option(
    "--beta",
    type=click.FloatRange(0.0, 0.5, min_open=True, max_open=True),
    default=1e-3,
    show_default=True,
    help="1 - confidence.",
)
@click.option(
    "--bound",
    "bound_kind",
    type=click.Choice(["clopper-pearson", "hoeffding"]),
    default="clopper-pearson",
    show_default=True,
)
@click.option(
    "--method",
    type=click.Choice(["ibp", "midrad", "linear", "crown-ibp", "best", "bab"]),
    default="ibp",
    show_default=True,
    help="Bound method of the proof.",
)
@JSON_OPT
@RAY_OPT
@MAX_MEMORY_OPT
@click.pass_context
@input_errors_exit_2
def certify(
    ctx: click.Context,
    model_path: Path,
    lid_path: Path,
    data_ref: str,
    split: str,
    data_dir: Path | None,
    target: float | None,
    beta: float,
    bound_kind: str,
    method: str,
    as_json: bool,
    ray_address: str | None,
    max_memory: int | None,
) -> None:
    """Certify the LID at LID_PATH for MODEL_PATH on DATA_REF (all of it counts as held out).

    DATA_REF is a data set, an .npz file, or a folder read chunk by chunk with flat memory
    (x.npy and y.npy, or .npz shards with arrays x and y).
    """
    with memory_limit(max_memory, None):
        doc = certify_document(
            model_path,
            lid_path,
            data_ref,
            ray_address=ray_address,
            split=split,
            data_dir=data_dir,
            target=target,
            beta=beta,
            bound_kind=bound_kind,
            method=method,
        )
    if as_json:
        emit_json(doc)
    else:
        click.echo(
            f"certified {doc['k']}/{doc['n']}; {doc['bound_kind']} lower bound "
            f"{doc['lower_bound']:.4f} at beta={doc['beta']}; verdict: {doc['verdict']}"
        )
        if not doc["lid_model_match"]:
            click.echo("note: the LID was computed for a different model file", err=True)
    ctx.exit(ExitCode.SPEC_NOT_MET if doc["holds"] is False else ExitCode.OK)
