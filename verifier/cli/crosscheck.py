"""`verifier crosscheck`: bound-engine margins vs exact margins vs falsifiers on a LID."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from verifier.cli.cluster import RAY_OPT, ray_runner
from verifier.cli.conventions import (
    JSON_OPT,
    ExitCode,
    data_dir_option,
    emit_json,
    input_errors_exit_2,
    progress_bar,
)
from verifier.crosscheck.summary import render_crosscheck


@contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr meanwhile: HiGHS and z3 print diagnostics straight to
    fd 1, which would corrupt the results (JSON) this command writes to stdout afterwards.
    Worker processes spawned meanwhile inherit the redirection."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no usable fd 1 (embedded use): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@click.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("lid_path", type=click.Path(path_type=Path))
@click.argument("data_ref")
@click.option(
    "--exact",
    "exact",
    type=click.Choice(["auto", "milp", "smt", "none"]),
    default="auto",
    show_default=True,
    help="Exact worst-case margins: closed form / MILP (auto), MILP, z3 (smt) or none.",
)
@click.option(
    "--samples",
    "n_samples",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Check the first N samples of the split.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.0, min_open=True),
    default=60.0,
    show_default=True,
    help="Time limit of one exact solve (one sample and class), seconds.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes for the per-sample work (with --ray: the cluster's instead).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Falsifier seed.")
@click.option(
    "--bab-domains",
    type=click.IntRange(min=0),
    default=None,
    help="Also bound every margin by branch and bound on ReLU splits with this many domains "
    "per margin (chains of Linear and ReLU only); default: not computed.",
)
@click.option("--split", default="test", show_default=True, help="Split of the data set.")
@data_dir_option
@JSON_OPT
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write OUT_DIR/crosscheck.json (and each violation's weights).",
)
@RAY_OPT
@click.pass_context
@input_errors_exit_2
def crosscheck(
    ctx: click.Context,
    model_path: Path,
    lid_path: Path,
    data_ref: str,
    exact: str,
    n_samples: int,
    timeout_s: float,
    jobs: int,
    seed: int,
    bab_domains: int | None,
    split: str,
    data_dir: Path | None,
    as_json: bool,
    out_dir: Path | None,
    ray_address: str | None,
) -> None:
    """Cross-check the bounds of LID_PATH for MODEL_PATH on DATA_REF: exact margins, attacks.

    Per sample and class: the bound engine's margin (IBP; CROWN-IBP for Linear-only boxes),
    the exact worst-case margin over the LID, and the smallest margin that falsifiers
    (random and vertex weights, weight-space PGD) attain. Exits 1 when weights inside the LID
    contradict a bound (a soundness violation), 0 otherwise, 2 on bad input.
    """
    from verifier.bounds.bab import BabOptions
    from verifier.crosscheck.document import run_crosscheck, write_crosscheck
    from verifier.crosscheck.falsify import FalsifierConfig
    from verifier.crosscheck.results import describe_violation
    from verifier.crosscheck.run import CrosscheckConfig

    bab = None if bab_domains is None else BabOptions(max_domains=bab_domains, stop_at=None)
    config = CrosscheckConfig(
        exact=exact,  # type: ignore[arg-type]
        timeout_s=timeout_s,
        jobs=jobs,
        seed=seed,
        falsifier=FalsifierConfig(),
        bab=bab,
    )
    bar: Any = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total, "cross-check", "sample")
        bar.update(done - bar.n)

    try:
        with native_stdout_to_stderr(), ray_runner(ray_address) as runner:
            report = run_crosscheck(
                model_path,
                lid_path,
                data_ref,
                split=split,
                data_dir=data_dir,
                n_samples=n_samples,
                config=config,
                on_progress=on_progress,
                runner=runner,
            )
    finally:
        if bar is not None:
            bar.close()
    if out_dir is not None:
        for path in write_crosscheck(out_dir, report):
            click.echo(f"written: {path}", err=True)
    for sample in report.result.samples:
        for margin in sample.violations:
            click.echo(f"SOUNDNESS VIOLATION: {describe_violation(sample, margin)}", err=True)
    if as_json:
        emit_json(report.document)
    else:
        click.echo(render_crosscheck(report.document))
    ctx.exit(ExitCode.OK if report.result.sound else ExitCode.SPEC_NOT_MET)
