"""Replay buffers of the paper's protocol (arXiv 2512.01899; DESIGN.md section 5): named sizes,
the per-task allocation, chunks, and which training samples a buffer holds.

A buffer holds samples of a finished task's *training* split (never its test split), in a
seeded random order, added in chunks of 200. Over the five-task protocol the named sizes hold
1,000 / 5,000 / 15,000 samples in total, split over the four tasks that have a later task (the
last task stores nothing: nothing trains after it):

| size   | task 1 | task 2 | task 3 | task 4 | task 5 |  total | repeats |
|--------|-------:|-------:|-------:|-------:|-------:|-------:|--------:|
| SMALL  |    400 |    200 |    200 |    200 |      0 |  1,000 |       1 |
| MEDIUM |  1,600 |  1,200 |  1,200 |  1,000 |      0 |  5,000 |       3 |
| LARGE  |  4,400 |  3,800 |  3,800 |  3,000 |      0 | 15,000 |       7 |

The shares follow the paper's LARGE example [4800, 4000, 4000, 3200, 0], i.e. 6 : 5 : 5 : 4, in
whole chunks (largest remainder, ties to the earlier task). That example sums to 16,000, not
the stated 15,000; we keep the stated totals. A shorter sequence stores the first entries; a
task whose training split is smaller than its allocation stores all of it.

How much of a stored buffer is *in use* grows with the repeat rule (`verifier.cl.replay`):
when task j finishes, its first `step(j)` chunks are in use, `step(j) = ceil(K_j / (R + 1))` with
K_j = allocation / 200 chunks and R = the size's repeats; every repeat at a later task adds
`step(j)` more chunks, up to K_j. A-GEM (`verifier.cl.baselines.AGEM`) stores the same samples
and uses the whole allocation from the start (it has no repeat rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch
from torch import Tensor

from verifier.cl.scenarios import SplitTask
from verifier.errors import InputError

CHUNK_SIZE: Final = 200


@dataclass(frozen=True)
class BufferSize:
    """A named buffer size: samples stored per finished task, repeats of the repeat rule.

    Attributes:
        name: "SMALL", "MEDIUM", "LARGE" (or a test's own).
        per_task: samples stored for task j (0-based), each a multiple of `chunk_size`; tasks
            past the end store nothing.
        repeats: the most repeats per task (the paper: 1 / 3 / 7).
        chunk_size: samples per chunk (the paper: 200).

    Raises:
        InputError: a negative or non-chunk allocation, negative repeats or a chunk below 1.
    """

    name: str
    per_task: tuple[int, ...]
    repeats: int
    chunk_size: int = CHUNK_SIZE

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise InputError(f"buffer {self.name}: chunk_size must be >= 1; got {self.chunk_size}")
        if self.repeats < 0:
            raise InputError(f"buffer {self.name}: repeats must be >= 0; got {self.repeats}")
        bad = [a for a in self.per_task if a < 0 or a % self.chunk_size]
        if bad:
            raise InputError(
                f"buffer {self.name}: every allocation must be a non-negative multiple of "
                f"{self.chunk_size}; got {list(self.per_task)}"
            )

    @property
    def total(self) -> int:
        """Samples stored over the whole sequence (before capping at the splits' sizes)."""
        return sum(self.per_task)

    def allocation(self, task_index: int) -> int:
        """Samples stored for task `task_index` (0 past the table)."""
        return self.per_task[task_index] if task_index < len(self.per_task) else 0

    def step(self, task_index: int) -> int:
        """Chunks that enter use when the task finishes and at every later repeat."""
        chunks = self.allocation(task_index) // self.chunk_size
        return math.ceil(chunks / (self.repeats + 1))

    def in_use(self, task_index: int, grown: int, n_available: int) -> int:
        """Samples of the task's buffer in use after `grown` repeats since the task finished.

        Args:
            task_index: the finished task.
            grown: repeats made (at later tasks) since it finished.
            n_available: size of its training split (the cap).
        """
        chunks = self.allocation(task_index) // self.chunk_size
        used = min(chunks, self.step(task_index) * (1 + grown))
        return min(used * self.chunk_size, n_available)

    def stored(self, task_index: int, n_available: int) -> int:
        """Samples stored for the task: its allocation, capped at its training split."""
        return min(self.allocation(task_index), n_available)


SMALL: Final = BufferSize("SMALL", (400, 200, 200, 200), repeats=1)
MEDIUM: Final = BufferSize("MEDIUM", (1600, 1200, 1200, 1000), repeats=3)
LARGE: Final = BufferSize("LARGE", (4400, 3800, 3800, 3000), repeats=7)
BUFFER_SIZES: Final[dict[str, BufferSize]] = {b.name: b for b in (SMALL, MEDIUM, LARGE)}


def buffer_order(task: SplitTask, seed: int) -> Tensor:
    """The order in which a task's training samples enter its buffer: a permutation of
    range(n_train) seeded by (seed, task index), independent of any other randomness.

    The buffer after any number of chunks is a prefix of this order, so a larger buffer holds
    the smaller one, and the replay learner and A-GEM with the same seed store the same samples.
    """
    n = int(task.x_train.shape[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(1000 * seed + task.index))
