"""The `verifier` command line: parse, call one library function, render, pick the exit code.

Exit codes: 0 success, 1 specification not met or verification failed, 2 bad input.
Results go to stdout (JSON with --json); messages and progress go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import click

from verifier.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(IntEnum):
    """Process exit codes shared by every command."""

    OK = 0
    SPEC_NOT_MET = 1
    BAD_INPUT = 2


class BadInput(click.ClickException):
    """One line on stderr, exit code 2."""

    exit_code = ExitCode.BAD_INPUT

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def input_errors_exit_2(func: F) -> F:
    """Turn an InputError raised by the library into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as err:
            raise BadInput(str(err)) from err

    return wrapper  # type: ignore[return-value]


def data_dir_option(func: F) -> F:
    """The --data-dir option (env LID_DATA_DIR; default ../shared/data next to the project)."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="LID_DATA_DIR",
        default=None,
        help="Folder of the shared data sets (env LID_DATA_DIR; default ../shared/data).",
    )(func)


def emit_json(payload: Any) -> None:
    """Write a JSON document to stdout."""
    click.echo(json.dumps(payload, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lid-verifier")
def cli() -> None:
    """Locally invariant domains: prove that updated weights still meet a specification."""


@cli.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option(
    "--data", "data_ref", default=None, help="Data set name (digits, mnist, ...) or .npz."
)
@click.option("--split", default="test", show_default=True, help="Split of the data set to use.")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@input_errors_exit_2
def inspect(
    model_path: Path, data_ref: str | None, split: str, data_dir: Path | None, as_json: bool
) -> None:
    """Show the op graph and parameters of MODEL_PATH and, with --data, its clean accuracy."""
    from verifier.inspection import inspect_model, render_inspection

    summary = inspect_model(model_path, data_ref=data_ref, split=split, data_dir=data_dir)
    if as_json:
        emit_json(summary)
    else:
        click.echo(render_inspection(summary))


def _progress(
    total: int,
) -> tuple[Callable[[Any], None], Callable[[str], None], Callable[[], None]]:
    """A tqdm bar on stderr for the search; returns (on_step, on_phase, close).

    The bar opens at the first search step and closes before the next phase message, so a
    message (or an input error before the search) never lands on the bar's line.
    """
    from tqdm import tqdm

    bar: Any = None

    def on_step(step: Any) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total,
                desc="LID search",
                unit="it",
                file=sys.stderr,
                leave=False,
                mininterval=0.5,
            )
        bar.update(1)
        hard = ",".join(f"{h:.3f}" for h in step.hard)
        soft = ",".join(f"{s:.3f}" for s in step.soft)
        lam = ",".join(f"{v:.2f}" for v in step.lam)
        bar.set_postfix_str(f"width={step.mean_width:.4g} soft={soft} hard={hard} λ={lam}")

    def close() -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None

    def on_phase(message: str) -> None:
        close()
        click.echo(message, err=True)

    return on_step, on_phase, close


def _lid_job(spec_path: Path, out_dir: Path, device: str | None, as_json: bool) -> bool:
    from verifier.pipeline import run_lid
    from verifier.spec import load_spec

    spec = load_spec(spec_path)
    on_step, on_phase, close = _progress(spec.search.iterations)
    try:
        run = run_lid(
            spec,
            out_dir,
            device=device,
            on_step=on_step,
            on_phase=on_phase,
            command=" ".join(["verifier", *sys.argv[1:]]),
        )
    finally:
        close()
    if as_json:
        emit_json(run.document)
    else:
        click.echo(render_certificate(run.document))
    return run.holds


def render_certificate(doc: dict[str, Any]) -> str:
    """A short human summary of a certificate document."""
    lines = [f"verdict: {doc['verdict']}"]
    lid = doc["lid"]
    lines.append(
        f"LID: box over {lid['n_parameters']} parameters, mean width {lid['mean_width']:.4g} "
        f"({doc['search']['chosen']})"
    )
    for task in doc["tasks"]:
        lines.append(
            f"task {task['task']}: {task['metric']} clean {task['clean_metric']:.4f}, "
            f"target {task['target']:.4f}; held-out certified {task['k']}/{task['n']}, "
            f"{task['bound_kind']} lower bound {task['lower_bound']:.4f} at beta={task['beta']} "
            f"-> {'holds' if task['holds'] else 'NOT MET'}"
        )
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
DEVICE_OPT = click.option("--device", default=None, help="cpu or cuda (default: the spec's).")
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print the certificate as JSON.")


@cli.command()
@SPEC_ARG
@OUT_OPT
@DEVICE_OPT
@JSON_OPT
@click.pass_context
@input_errors_exit_2
def lid(
    ctx: click.Context, spec_path: Path, out_dir: Path, device: str | None, as_json: bool
) -> None:
    """Search a box LID for SPEC_PATH and certify it on held-out data."""
    holds = _lid_job(spec_path, out_dir, device, as_json)
    ctx.exit(ExitCode.OK if holds else ExitCode.SPEC_NOT_MET)


@cli.command()
@SPEC_ARG
@OUT_OPT
@DEVICE_OPT
@JSON_OPT
@click.pass_context
@input_errors_exit_2
def run(
    ctx: click.Context, spec_path: Path, out_dir: Path, device: str | None, as_json: bool
) -> None:
    """Run the whole pipeline for SPEC_PATH: LID search, held-out certificate, artifacts."""
    holds = _lid_job(spec_path, out_dir, device, as_json)
    ctx.exit(ExitCode.OK if holds else ExitCode.SPEC_NOT_MET)


@cli.command()
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
    type=click.Choice(["ibp", "midrad", "crown-ibp", "best"]),
    default="ibp",
    show_default=True,
    help="Bound method of the proof.",
)
@JSON_OPT
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
) -> None:
    """Certify the LID at LID_PATH for MODEL_PATH on DATA_REF (all of it counts as held out)."""
    from verifier.pipeline import run_certify

    doc = run_certify(
        model_path,
        lid_path,
        data_ref,
        split=split,
        data_dir=data_dir,
        target=target,
        beta=beta,
        bound_kind=bound_kind,
        method=method,  # type: ignore[arg-type]
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


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
