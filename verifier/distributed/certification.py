"""Certification as Ray tasks, bit-identical to the run in one process.

`RayCertifier` is a `verifier.certify.SampleCertifier`: inside `ray_certification(...)` every
`certify_samples` call (the search's checkpoint proofs and the held-out certificate alike)
splits its samples into tasks of whole bound passes. A task's samples are `chunk_size`-aligned
slices of the call's samples, so every bound pass sees exactly the rows it sees in one process
and the mask is the same bit for bit; masks come back in order and are concatenated.

A call with fewer samples than two tasks' worth runs in this process: a task costs a few
milliseconds of scheduling and transfer, more than a small proof saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from verifier.certify import CertMethod, certification_backend, certify_samples
from verifier.distributed.cluster import ClusterInfo, import_ray, ray_session
from verifier.distributed.tasks import TaskStats, map_tasks
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.graph import Graph

TASKS_PER_CPU = 4
"""Tasks per cluster CPU a large call is split into by default (load balance vs overhead)."""

MAX_SAMPLES_PER_TASK = 16384
"""Most samples one task certifies by default (bounds its memory and the cost of a retry)."""


def certify_chunk(
    graph: Graph,
    box: Box | Zonotope,
    method: CertMethod,
    chunk_size: int,
    device: str,
    samples: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, int]:
    """One task: `certify_samples` on a slice of the samples, on `device` (a worker's GPU or
    the CPU); returns its mask and its count of non-finite bounds.

    Samples and masks travel as numpy arrays: Ray stores those without a copy, while a torch
    tensor goes through torch's own pickling, which costs about 15 ms per MB here (measured;
    `benchmarks/ray_scaling.py`)."""
    x = torch.from_numpy(np.array(samples[0])).to(device)  # a copy: Ray's buffers are read-only
    y = torch.from_numpy(np.array(samples[1])).to(device)
    mask, nonfinite = certify_samples(graph, box, x, y, method=method, chunk_size=chunk_size)
    return mask.cpu().numpy(), nonfinite


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
            None: `TASKS_PER_CPU` tasks per cluster CPU, at most `MAX_SAMPLES_PER_TASK`.
        on_progress: called in this process with (samples done, samples) of the current call
            as each task completes: one progress bar across all workers.
        stats: what the tasks did.
    """

    samples_per_task: int | None = None
    on_progress: Callable[[int, int], None] | None = None
    stats: TaskStats = field(default_factory=TaskStats)

    def task_size(self, n: int, chunk_size: int) -> int:
        """Samples per task for a call of n samples: a multiple of chunk_size."""
        if self.samples_per_task is not None:
            wanted = self.samples_per_task
        else:
            ray = import_ray()
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            wanted = min(MAX_SAMPLES_PER_TASK, math.ceil(n / (TASKS_PER_CPU * cpus)))
        return max(1, math.ceil(wanted / chunk_size)) * chunk_size

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
        size = self.task_size(n, chunk_size)
        if n < 2 * size:
            mask, nonfinite = certify_samples(
                graph, box, x, y, method=method, chunk_size=chunk_size, on_chunk=on_chunk
            )
            if self.on_progress is not None:
                self.on_progress(n, n)
            return mask, nonfinite
        ray = import_ray()
        device, gpus = task_device(x.device, float(ray.cluster_resources().get("GPU", 0.0)))
        starts = range(0, n, size)
        finished = 0

        def done(index: int, result: tuple[np.ndarray, int]) -> None:
            nonlocal finished
            count = int(result[0].size)
            finished += count
            if on_chunk is not None:
                on_chunk(count)
            if self.on_progress is not None:
                self.on_progress(finished, n)

        slices = ((_numpy(x[s : s + size]), _numpy(y[s : s + size])) for s in starts)
        results = map_tasks(
            certify_chunk,
            (graph, box, method, chunk_size, device),
            slices,
            on_result=done,
            num_gpus=gpus,
            stats=self.stats,
        )
        mask = torch.from_numpy(np.concatenate([m for m, _ in results])).to(x.device)
        return mask, sum(count for _, count in results)


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
