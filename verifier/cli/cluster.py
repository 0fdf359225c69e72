"""The `--ray local|auto|ADDRESS` option of `lid`, `run`, `certify` and `crosscheck` (issue 22).

Without the option nothing here imports Ray. With it, the command runs inside a Ray session
(`verifier.distributed`): its proofs (or cross-check samples) run as Ray tasks, with one
progress bar in this process across all workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from verifier.cli.conventions import progress_bar

if TYPE_CHECKING:
    from verifier.distributed import RayCertifier, RayTaskRunner

RAY_OPT = click.option(
    "--ray",
    "ray_address",
    default=None,
    metavar="local|auto|ADDRESS",
    help="Run the work as Ray tasks: 'local' starts a Ray instance for this run and stops it; "
    "'auto' or HOST:PORT joins a running cluster (results are identical to a local run).",
)


def progress_callback(
    desc: str, unit: str
) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A (done, total) callback drawing one progress bar, and its close."""
    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is not None and bar.total != total:  # a new call: a new bar
            bar.close()
            bar = None
        if bar is None:
            bar = progress_bar(total, desc, unit)
        bar.update(done - bar.n)

    def close() -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None

    return update, close


@contextmanager
def ray_certifier(
    address: str | None, *, on_progress: Callable[[int, int], None] | None = None
) -> Iterator[RayCertifier | None]:
    """Inside: every certification runs as Ray tasks on the cluster at `address` (None:
    nothing changes and None is yielded). Prints the cluster in one line on stderr."""
    if address is None:
        yield None
        return
    from verifier.distributed import ray_certification

    with ray_certification(address, on_progress=on_progress) as (info, certifier):
        click.echo(info.describe(), err=True)
        yield certifier
        stats = certifier.stats
        click.echo(f"ray: {stats.tasks} task(s) on {len(stats.nodes)} node(s)", err=True)


@contextmanager
def ray_runner(address: str | None) -> Iterator[RayTaskRunner | None]:
    """Inside: a runner for per-sample work as Ray tasks on the cluster at `address` (None:
    None is yielded). Prints the cluster in one line on stderr."""
    if address is None:
        yield None
        return
    from verifier.distributed import RayTaskRunner, ray_session

    with ray_session(address) as info:
        click.echo(info.describe(), err=True)
        runner = RayTaskRunner()
        yield runner
        stats = runner.stats
        click.echo(f"ray: {stats.tasks} task(s) on {len(stats.nodes)} node(s)", err=True)


def certify_document(
    model_path: Path,
    lid_path: Path,
    data_ref: str,
    *,
    ray_address: str | None,
    split: str,
    data_dir: Path | None,
    target: float | None,
    beta: float,
    bound_kind: str,
    method: str,
) -> dict[str, Any]:
    """The job of `verifier certify`: `run_certify` on a data set in memory, or
    `run_certify_stream` on a stream folder (x.npy/y.npy or .npz shards, read chunk by chunk),
    here or on Ray; a progress bar on stderr across all workers."""
    from verifier.data.stream import is_stream_folder

    update, close = progress_callback("certifying", "sample")
    try:
        with ray_certifier(ray_address, on_progress=update) as certifier:
            if is_stream_folder(data_ref):
                from verifier.distributed.streaming import run_certify_stream

                return run_certify_stream(
                    model_path,
                    lid_path,
                    Path(data_ref),
                    target=target,
                    beta=beta,
                    bound_kind=bound_kind,  # type: ignore[arg-type]
                    method=method,  # type: ignore[arg-type]
                    ray=certifier,
                    on_progress=update,
                )
            from verifier.pipeline import run_certify

            return run_certify(
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
    finally:
        close()
