"""An ordered map over Ray tasks: the one fan-out every distributed job here uses.

`map_tasks(function, shared, items)` computes `[function(*shared, item) for item in items]`
with one Ray task per item: `shared` (the network, the box, the options) goes to the object
store once, items are submitted as they are drawn (at most `max_in_flight` outstanding, so a
lazy stream of chunks stays lazy), and results come back in item order whatever order the
tasks finish in. With `cache_shared`, each worker process deserialises `shared` once per call
instead of once per task (a per-process cache keyed by its object's ID), for functions that
only read it. Fault tolerance is Ray's: a task whose worker process dies, or that raises, is
run again (`max_retries`), so a killed worker loses no result. An error that persists is
raised here as the task raised it when it is one of ours (`VerifierError`), so the CLI still
reports bad input in one line.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from verifier.distributed.cluster import import_ray
from verifier.errors import VerifierError

R = TypeVar("R")

MAX_RETRIES = 3
"""Times a task is run again after its worker died or it raised."""

SHARED_CACHE_SIZE = 2
"""Deserialised `shared` values a worker process keeps (`map_tasks(cache_shared=True)`)."""

_SHARED_CACHE: OrderedDict[str, tuple[Any, ...]] = OrderedDict()


@dataclass
class TaskStats:
    """What the tasks of a run did (for progress lines, tests and benchmarks).

    Attributes:
        tasks: tasks completed.
        nodes: node id -> tasks completed there.
        task_seconds: wall time of each completed task inside its worker, in completion order.
    """

    tasks: int = 0
    nodes: dict[str, int] = field(default_factory=dict)
    task_seconds: list[float] = field(default_factory=list)

    def add(self, node: str, seconds: float) -> None:
        """Record one completed task."""
        self.tasks += 1
        self.nodes[node] = self.nodes.get(node, 0) + 1
        self.task_seconds.append(seconds)


@dataclass(frozen=True)
class _Timed:
    value: Any
    node: str
    seconds: float


def _run_timed(function: Callable[..., Any], shared: tuple[Any, ...], item: Any) -> _Timed:
    import ray

    from verifier.runtime import tune_allocator

    tune_allocator()
    if isinstance(shared, _SharedRef):
        shared = _shared_value(ray, shared.ref)
    started = time.perf_counter()
    value = function(*shared, item)
    node = ray.get_runtime_context().get_node_id()
    return _Timed(value, node, time.perf_counter() - started)


@dataclass(frozen=True)
class _SharedRef:
    """`shared`'s object, passed as a reference (Ray resolves only bare ObjectRef arguments)."""

    ref: Any


def _shared_value(ray: Any, ref: Any) -> tuple[Any, ...]:
    """`ray.get(ref)`, once per worker process: an object's ID names one immutable value, so
    the cache needs no other key; the last `SHARED_CACHE_SIZE` values are kept."""
    key = ref.hex()
    value = _SHARED_CACHE.get(key)
    if value is None:
        value = ray.get(ref)
        _SHARED_CACHE[key] = value
        while len(_SHARED_CACHE) > SHARED_CACHE_SIZE:
            _SHARED_CACHE.popitem(last=False)
    else:
        _SHARED_CACHE.move_to_end(key)
    return value


_RUNNER: Any = None


def _runner(ray: Any) -> Any:
    """`_run_timed` as a Ray remote function, made once per process: Ray exports a function
    to the cluster when it is first called in a session, and a fresh `ray.remote` on every
    call of `map_tasks` exported it again each time (about 3 ms a call, measured)."""
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = ray.remote(_run_timed)
    return _RUNNER


def default_in_flight(cpus: int | None = None) -> int:
    """Outstanding tasks by default: two per CPU of the cluster (each CPU has the next task
    ready while results travel), at least 2; `cpus`: the cluster's, if already known."""
    if cpus is None:
        cpus = int(import_ray().cluster_resources().get("CPU", 1))
    return max(2, 2 * cpus)


def map_tasks(
    function: Callable[..., R],
    shared: tuple[Any, ...],
    items: Iterable[Any],
    *,
    on_result: Callable[[int, R], None] | None = None,
    max_in_flight: int | None = None,
    num_gpus: float = 0.0,
    stats: TaskStats | None = None,
    cache_shared: bool = False,
) -> list[R]:
    """Run `function(*shared, item)` as one Ray task per item; results in item order.

    Args:
        function: a module-level function (workers import it by name).
        shared: arguments common to every call, stored once in the object store.
        items: the per-task arguments; drawn lazily.
        on_result: called in this process with (item index, result) as each task completes.
        max_in_flight: most tasks outstanding at once (default `default_in_flight()`).
        num_gpus: GPUs each task takes (0 on a CPU cluster).
        stats: filled with what the tasks did.
        cache_shared: each worker process deserialises `shared` once (module docstring);
            only for functions that do not modify it, as a later task sees the same objects.

    Returns:
        The results, in the order of `items`.

    Raises:
        VerifierError: a task raised one (after its retries).
        ray.exceptions.RayError: a task failed for another reason after its retries.
    """
    ray = import_ray()
    limit = max_in_flight or default_in_flight()
    remote = _runner(ray).options(
        num_cpus=1,
        num_gpus=num_gpus,
        max_retries=MAX_RETRIES,
        retry_exceptions=True,
        scheduling_strategy="SPREAD",
    )
    shared_ref = _SharedRef(ray.put(shared)) if cache_shared else ray.put(shared)
    results: dict[int, R] = {}
    pending: dict[Any, int] = {}
    stream = iter(enumerate(items))
    try:
        while True:
            while len(pending) < limit and (drawn := next(stream, None)) is not None:
                pending[remote.remote(function, shared_ref, drawn[1])] = drawn[0]
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                timed = _get(ray, ref)
                if stats is not None:
                    stats.add(timed.node, timed.seconds)
                results[index] = timed.value
                if on_result is not None:
                    on_result(index, timed.value)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)  # a failed or interrupted run leaves no work behind
        raise
    return [results[i] for i in range(len(results))]


def _get(ray: Any, ref: Any) -> _Timed:
    try:
        return ray.get(ref)  # type: ignore[no-any-return]
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, VerifierError):
            raise cause from None
        raise


@dataclass
class RayTaskRunner:
    """`map_tasks` as a `verifier.crosscheck.run.SampleRunner`: the cross-check's per-sample
    work (falsifiers, exact solves) as one Ray task per sample.

    Attributes:
        stats: what the tasks did.
    """

    stats: TaskStats = field(default_factory=TaskStats)

    def __call__(
        self,
        function: Callable[..., Any],
        shared: tuple[Any, ...],
        items: Iterable[Any],
        *,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Run `function(*shared, item)` for every item as Ray tasks; results in item order."""
        return map_tasks(function, shared, items, on_result=on_result, stats=self.stats)
