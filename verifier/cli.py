"""The `verifier` command line: parse, call one library function, render, pick the exit code.

Exit codes: 0 success, 1 specification not met or verification failed, 2 bad input.
Results go to stdout (JSON with --json); messages and progress go to stderr.
"""

from __future__ import annotations

import functools
import json
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


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
