"""Benchmark grids as Ray tasks (issue 22): `--ray local|auto|ADDRESS` of the grid scripts.

`split_mnist.py`, `split_cifar.py` and `heads.py` run each stage of their grid (shared first
tasks, then the methods; or LIDs, then the fine-tunings) as one `verifier.distributed.map_tasks`
call, with results in item order and Ray's retries; nothing here schedules work itself.

Shipping the job functions. The scripts are files, not an installed package, so a Ray worker
cannot import them by name (run as a script their module is `__main__`; under pytest it is
loaded from its file). `map_stage` registers the script's module and `cl_report` with Ray's
cloudpickle to be pickled by value: the job functions, and the script's dataclasses they use
(`Settings`), travel with each task, and a worker needs only `verifier` installed, as for
`verifier ... --ray`. What a by-value function reads from its module's globals travels with it,
so the jobs take everything they use as arguments (module-level caches such as the process
pool's data would be pickled with their contents); the data goes in `shared`, once into the
object store, as numpy arrays (stored without a copy). Job results are plain values (dicts,
tensors, `verifier` types), never the script's own classes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

from verifier.distributed import ClusterInfo, TaskStats, map_tasks, ray_session

R = TypeVar("R")


@contextmanager
def ray_grid(address: str, log: Callable[[str], None]) -> Iterator[ClusterInfo]:
    """Join Ray at `address` (`local`, `auto` or HOST:PORT) for the grid and log the cluster in
    one line."""
    with ray_session(address) as info:
        log(info.describe())
        yield info


def ship_by_value(modules: Sequence[ModuleType]) -> None:
    """Have Ray pickle the functions and classes of these modules by value (module docstring);
    `__main__` is pickled by value already."""
    from ray import cloudpickle

    for module in modules:
        if module.__name__ != "__main__" and sys.modules.get(module.__name__) is module:
            cloudpickle.register_pickle_by_value(module)


def map_stage(
    function: Callable[..., R],
    shared: tuple[Any, ...],
    items: Iterable[Any],
    *,
    modules: Sequence[ModuleType] = (),
    on_result: Callable[[int, R], None] | None = None,
    stats: TaskStats | None = None,
) -> list[R]:
    """One stage of a grid: `[function(*shared, item) for item in items]` as Ray tasks, in
    item order (inside `ray_grid`).

    Args:
        function: a job function of a grid script (it and `modules` are pickled by value).
        shared: arguments common to every job (the data, the settings), stored once.
        items: the per-job arguments.
        modules: further modules the job needs by value (`cl_report`).
        on_result: called with (item index, result) as each job completes.
        stats: filled with what the tasks did.
    """
    ship_by_value([sys.modules[function.__module__], *modules])
    return map_tasks(function, shared, items, on_result=on_result, stats=stats)
