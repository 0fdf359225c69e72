"""How every command behaves: exit codes, one-line errors, shared options, progress output."""

from __future__ import annotations

import functools
import json
import sys
import time
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


class NotCertifiable(click.ClickException):
    """One line on stderr, exit code 1: the specification cannot be met with this data."""

    exit_code = ExitCode.SPEC_NOT_MET

    def show(self, file: Any = None) -> None:
        click.echo(f"not certifiable: {self.format_message()}", err=True)


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


PLAIN_PROGRESS_EVERY_S = 30.0
"""On a non-terminal stderr, seconds between plain progress lines."""


class PlainProgress:
    """Progress for a log file: a plain line now and then (`PLAIN_PROGRESS_EVERY_S`) and one at
    the end, no carriage returns; the subset of tqdm's interface the commands use."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= PLAIN_PROGRESS_EVERY_S:
            self._line()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        self._last = time.monotonic()
        extra = f" ({self.postfix})" if self.postfix else ""
        click.echo(f"{self.desc}: {self.n}/{self.total} {self.unit}{extra}", err=True)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr when stderr is a terminal, else occasional plain lines."""
    if not sys.stderr.isatty():
        return PlainProgress(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, mininterval=0.5)


def progress(
    total: int,
) -> tuple[Callable[[Any], None], Callable[[str], None], Callable[[], None]]:
    """A progress bar on stderr for the search (`progress_bar`); returns (on_step, on_phase,
    close).

    The bar opens at the first search step and closes before the next phase message, so a
    message (or an input error before the search) never lands on the bar's line.
    """
    bar: Any = None

    def on_step(step: Any) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total, "LID search", "it")
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


DEVICE_OPT = click.option("--device", default=None, help="cpu or cuda (default: the spec's).")
JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _memory_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--max-memory SIZE in bytes; a bad size is one line and exit 2."""
    if value is None:
        return None
    from verifier.bounds.memory import parse_size
    from verifier.errors import MemoryBudgetError

    try:
        return parse_size(value)
    except MemoryBudgetError as err:
        raise BadInput(str(err)) from err


MAX_MEMORY_OPT = click.option(
    "--max-memory",
    "max_memory",
    default=None,
    metavar="SIZE",
    callback=_memory_option,
    help="Memory the bound passes may use, e.g. 4G or 512M (default: half of the memory "
    "available now; on CUDA half of the device's free memory). Passes split their samples "
    "(and margin rows) to fit; results do not change.",
)


def memory_limit(max_memory: int | None, device: str | None) -> Any:
    """The `memory_budget` context of a command: --max-memory, else the machine's default
    for `device` (CUDA when it names one and CUDA is there, else the CPU)."""
    import torch

    from verifier.bounds.memory import default_memory_budget, memory_budget

    if max_memory is None:
        cuda = device is not None and device.startswith("cuda") and torch.cuda.is_available()
        max_memory = default_memory_budget(device if cuda else "cpu")  # type: ignore[arg-type]
    return memory_budget(max_memory)
