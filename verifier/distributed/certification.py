"""Certification as Ray tasks, bit-identical to the run in one process.

`RayCertifier` is a `verifier.certify.SampleCertifier`: inside `ray_certification(...)` every
`certify_samples` call (the search's checkpoint proofs and the held-out certificate alike)
splits its samples into tasks of whole bound passes. A task's samples are `chunk_size`-aligned
slices of the call's samples, so every bound pass sees exactly the rows it sees in one process
and the mask is the same bit for bit; masks come back in order and are concatenated.

The data path, per call: the network, the box and the options go to the object store once and
each worker process deserialises them once (`map_tasks(cache_shared=True)`); the samples go
there once too, in blocks of about `BLOCK_BYTES` (`ray.put` of numpy arrays, which workers map
without deserialising them), each put just before its first task, so the first task starts
after one block's copy and a node fetches only the blocks it works on. A task is sent only
(block, start, stop) and returns its mask as packed bits. Task sizes are guided (each takes
1/(`GUIDED_SHARE` x CPUs) of the samples still to hand out), so the first tasks are large and
the last ones small, which keeps a slow or busy worker from holding the end of the call; no
task is shorter than `MIN_TASK_S` at the cost per sample the certifier's earlier tasks
measured, nor longer than `MAX_SAMPLES_PER_TASK` samples. A call too small for two such tasks
runs in this process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verifier.bounds.memory import current_memory_budget, memory_budget
from verifier.certify import CertMethod, certification_backend, certify_samples
from verifier.distributed.cluster import ClusterInfo, import_ray, ray_session
from verifier.distributed.tasks import TaskStats, default_in_flight, map_tasks
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.graph import Graph

GUIDED_SHARE = 2
"""A task takes 1/(GUIDED_SHARE x cluster CPUs) of the samples not yet handed out."""

MIN_TASK_S = 0.04
"""Shortest task, in seconds of measured proof time: about 10x a task's own cost (2-5 ms of
CPU over the driver, the worker and the raylet, measured on this machine;
`benchmarks/ray_scaling.py`); before any measurement, one bound pass."""

MAX_SAMPLES_PER_TASK = 16384
"""Most samples one task certifies (bounds its memory and the cost of a retry)."""

BLOCK_BYTES = 16 * 2**20
"""Sample bytes of one object-store block (a task reads a slice of one block; a block holds at
least its first task): small enough that the first task waits for one short copy, the later
blocks being put while workers prove the first ones."""


@dataclass(frozen=True)
class SampleSlice:
    """What a task is sent: samples [start, stop) of a block in the object store.

    Attributes:
        block: ObjectRef of an (x, y) pair of numpy arrays.
        start: first sample of the slice, in the block.
        stop: one past its last sample.
    """

    block: Any
    start: int
    stop: int


@dataclass(frozen=True)
class SliceResult:
    """What a task returns: its mask as packed bits, and what the proof cost.

    Attributes:
        bits: `np.packbits` of the certified mask.
        n: samples in the slice.
        n_nonfinite: samples whose bounds were NaN or Inf.
        seconds: the task's wall time (reading its slice and proving it).
    """

    bits: np.ndarray
    n: int
    n_nonfinite: int
    seconds: float

    def mask(self) -> np.ndarray:
        """The certified mask, bool of shape (n,)."""
        return np.unpackbits(self.bits, count=self.n).astype(bool)


def certify_slice(
    graph: Graph,
    box: Box | Zonotope,
    method: CertMethod,
    chunk_size: int,
    device: str,
    budget: int | None,
    part: SampleSlice,
) -> SliceResult:
    """One task: `certify_samples` on a slice of a block of samples, on `device` (a worker's
    GPU or the CPU), under the caller's memory budget (`verifier.bounds.memory`; a worker
    process does not inherit the driver's context, so the budget travels with the task and
    bound passes split their samples and margin rows there as they would locally).

    Samples and masks travel as numpy arrays: Ray stores those without a copy, while a torch
    tensor goes through torch's own pickling, which costs about 15 ms per MB here (measured;
    `benchmarks/ray_scaling.py`)."""
    ray = import_ray()
    started = time.perf_counter()
    x_block, y_block = ray.get(part.block)
    # a copy of the slice (about 2% of a task): the block's memory is the object store's,
    # shared by every task that reads the block, and nothing here may ever write to it
    x = torch.from_numpy(np.array(x_block[part.start : part.stop])).to(device)
    y = torch.from_numpy(np.array(y_block[part.start : part.stop])).to(device)
    with memory_budget(budget):
        mask, nonfinite = certify_samples(graph, box, x, y, method=method, chunk_size=chunk_size)
    bits = np.packbits(mask.cpu().numpy())
    return SliceResult(bits, int(x.shape[0]), nonfinite, time.perf_counter() - started)


def guided_tasks(
    n: int, chunk_size: int, cpus: int, min_samples: int, max_samples: int
) -> list[tuple[int, int]]:
    """Guided task sizes: [start, stop) ranges covering n samples, each a whole number of
    bound passes (the last one excepted), taking 1/(GUIDED_SHARE x cpus) of what is left,
    at least min_samples and at most max_samples (both rounded up to whole passes); a rest
    shorter than min_samples joins the task before it where that stays within max_samples."""
    low = max(1, math.ceil(min_samples / chunk_size)) * chunk_size
    high = max(low, math.ceil(max_samples / chunk_size) * chunk_size)
    tasks, start = [], 0
    while start < n:
        wanted = math.ceil((n - start) / (GUIDED_SHARE * max(1, cpus)))
        stop = min(n, start + min(high, max(low, math.ceil(wanted / chunk_size) * chunk_size)))
        if n - stop < low and n - start <= high:
            stop = n
        tasks.append((start, stop))
        start = stop
    return tasks


def task_device(requested: torch.device, cluster_gpus: float) -> tuple[str, float]:
    """Where the tasks run and the GPUs each takes: a GPU when the run asks for CUDA (its
    samples are on a CUDA device) and the cluster has one, else the CPU.

    Returns:
        (device name for the worker, GPUs per task).
    """
    if requested.type == "cuda" and cluster_gpus >= 1:
        return "cuda", 1.0
    return "cpu", 0.0


@dataclass
class RayCertifier:
    """Runs `certify_samples` calls as Ray tasks (module docstring); use it through
    `ray_certification`, or call it like `certify_samples` inside a Ray session.

    Attributes:
        samples_per_task: samples per task, rounded up to whole bound passes (`chunk_size`);
            None: guided sizes (module docstring).
        on_progress: called in this process with (samples done, samples) of the current call
            as each task completes: one progress bar across all workers.
        stats: what the tasks did.
        seconds_per_sample: proof time per sample measured by earlier tasks, per (network,
            domain kind, method, pass size); sets the shortest task (`MIN_TASK_S`). Task sizes
            never change a result, so an estimate that is off costs only speed.
        block_bytes: most sample bytes per object-store block (`BLOCK_BYTES`).
    """

    samples_per_task: int | None = None
    on_progress: Callable[[int, int], None] | None = None
    stats: TaskStats = field(default_factory=TaskStats)
    seconds_per_sample: dict[tuple[int, str, str, int], float] = field(default_factory=dict)
    block_bytes: int = BLOCK_BYTES

    def plan(
        self, n: int, chunk_size: int, cpus: int, cost_key: Any = None
    ) -> list[tuple[int, int]]:
        """The tasks of a call of n samples on `cpus` CPUs: [start, stop) ranges; one range
        when the call is too small for two tasks (`seconds_per_sample[cost_key]`)."""
        if self.samples_per_task is not None:
            size = max(1, math.ceil(self.samples_per_task / chunk_size)) * chunk_size
            return [(s, min(n, s + size)) for s in range(0, n, size)]
        cost = self.seconds_per_sample.get(cost_key)
        shortest = chunk_size if cost is None else max(1, math.ceil(MIN_TASK_S / cost))
        shortest = max(1, math.ceil(shortest / chunk_size)) * chunk_size
        if n < 2 * shortest:  # not two tasks' worth: one, which runs in this process
            return [(0, n)]
        return guided_tasks(n, chunk_size, cpus, shortest, MAX_SAMPLES_PER_TASK)

    def __call__(
        self,
        graph: Graph,
        box: Box | Zonotope,
        x: Tensor,
        y: Tensor,
        *,
        method: CertMethod = "ibp",
        chunk_size: int = 256,
        on_chunk: Callable[[int], None] | None = None,
    ) -> tuple[Tensor, int]:
        """`certify_samples` (same arguments, same result), its chunks run as Ray tasks."""
        n = int(x.shape[0])
        ray = import_ray()
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        key = (id(graph), type(box).__name__, str(method), chunk_size)
        tasks = self.plan(n, chunk_size, cpus, key)
        if len(tasks) < 2:
            mask, nonfinite = certify_samples(
                graph, box, x, y, method=method, chunk_size=chunk_size, on_chunk=on_chunk
            )
            if self.on_progress is not None:
                self.on_progress(n, n)
            return mask, nonfinite
        device, gpus = task_device(x.device, float(resources.get("GPU", 0.0)))
        finished, seconds = 0, 0.0

        def done(index: int, result: SliceResult) -> None:
            nonlocal finished, seconds
            finished += result.n
            seconds += result.seconds
            if on_chunk is not None:
                on_chunk(result.n)
            if self.on_progress is not None:
                self.on_progress(finished, n)

        results = map_tasks(
            certify_slice,
            (graph, box, method, chunk_size, device, current_memory_budget()),
            _slices(ray, _numpy(x), _numpy(y), tasks, self.block_bytes),
            on_result=done,
            max_in_flight=default_in_flight(cpus),
            num_gpus=gpus,
            stats=self.stats,
            cache_shared=True,
        )
        self.seconds_per_sample[key] = seconds / n
        mask = torch.from_numpy(np.concatenate([r.mask() for r in results])).to(x.device)
        return mask, sum(r.n_nonfinite for r in results)


def _slices(
    ray: Any, x: np.ndarray, y: np.ndarray, tasks: list[tuple[int, int]], block_bytes: int
) -> Iterator[SampleSlice]:
    """The tasks' slices, each block of samples put into the object store once, just before
    its first task is submitted; a block starts where a task starts and holds at least that
    whole task, so no task spans two blocks."""
    per_sample = max(1, x[:1].nbytes)
    block = max(1, block_bytes // per_sample)
    ref, block_start, block_stop = None, 0, 0
    for start, stop in tasks:  # contiguous, in order
        if ref is None or stop > block_stop:
            block_start, block_stop = start, min(len(x), start + max(block, stop - start))
            ref = ray.put((x[block_start:block_stop], y[block_start:block_stop]))
        yield SampleSlice(ref, start - block_start, stop - block_start)


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


@contextmanager
def ray_certification(
    address: str,
    *,
    num_cpus: int | None = None,
    samples_per_task: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[ClusterInfo, RayCertifier]]:
    """Join Ray (`ray_session`) and run every `certify_samples` call of the block as tasks.

    Args:
        address: `local`, `auto` or the cluster's HOST:PORT.
        num_cpus: CPUs of a `local` instance (default: all).
        samples_per_task: see `RayCertifier`.
        on_progress: progress callback, see `RayCertifier`.

    Yields:
        The cluster and the certifier (its `stats` fill as tasks complete).

    Raises:
        BackendError: Ray missing, a malformed address, or no cluster there.
    """
    certifier = RayCertifier(samples_per_task, on_progress)
    with ray_session(address, num_cpus=num_cpus) as info, certification_backend(certifier):
        yield info, certifier
