"""Split-MNIST / Split-CIFAR-10 task sequences in the three continual-learning scenarios.

The ten classes (MNIST digits, CIFAR-10 classes; `split_pairs` takes any 10-class samples,
images or frozen-encoder features) are split into five pairs, drawn per seed. Every scenario
is expressed the same way: a task names the output rows that compete for its prediction
(`rows`) and labels each sample by its position among those rows, so training, evaluation and
certification all work on the *masked* logits `logits[:, rows]`:

* ``task`` (Task-IL, multi-head): rows = the task's two digits; only those two logits compete.
* ``domain`` (Domain-IL): rows = (0, 1), one shared two-way head (the first two logits of the
  network); label = the digit's parity (0 even, 1 odd), as the Split-MNIST protocol defines it
  (`domain_label="parity"`, the default). With pairs drawn per seed a task can hold two digits
  of one parity, i.e. a single label. `domain_label="position"` labels instead which class of
  the pair (0 for the smaller, 1 for the larger; Split-CIFAR-10 uses it, since a CIFAR class
  index has no parity of meaning). With the classic pairs (0,1), (2,3), ... the two agree.
* ``class`` (Class-IL): rows = all ten logits; label = the digit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import torch
from torch import Tensor

from verifier.errors import InputError

Scenario = Literal["task", "domain", "class"]
DomainLabel = Literal["parity", "position"]
SCENARIOS: Final[tuple[Scenario, ...]] = ("task", "domain", "class")
SCENARIO_NAMES: Final[dict[Scenario, str]] = {
    "task": "Task-IL",
    "domain": "Domain-IL",
    "class": "Class-IL",
}
N_DIGITS: Final = 10


@dataclass(frozen=True, eq=False)
class SplitTask:
    """One task of a split sequence.

    Attributes:
        index: position in the sequence (0-based).
        digits: the two digits of the task, ascending.
        rows: the output rows whose logits compete for this task's prediction.
        x_train: training samples, shape (n, *input_shape), float32 (MNIST: (1, 28, 28)).
        y_train: labels as positions in `rows`, shape (n,), int64.
        x_test: test samples (the held-out part), shape (m, *input_shape).
        y_test: labels as positions in `rows`, shape (m,).
    """

    index: int
    digits: tuple[int, int]
    rows: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def name(self) -> str:
        """A short name such as ``t1(3,8)``."""
        return f"t{self.index + 1}({self.digits[0]},{self.digits[1]})"


def draw_pairs(generator: torch.Generator, n_tasks: int = 5) -> list[tuple[int, int]]:
    """Split the ten digits into `n_tasks` disjoint pairs in a random order.

    Args:
        generator: source of randomness (one seed, one split).
        n_tasks: number of pairs, at most 5.

    Returns:
        The pairs, each sorted ascending.

    Raises:
        InputError: more pairs than the digits allow.
    """
    if not 1 <= n_tasks <= N_DIGITS // 2:
        raise InputError(f"Split-MNIST has at most {N_DIGITS // 2} tasks; got {n_tasks}")
    perm = torch.randperm(N_DIGITS, generator=generator).tolist()
    pairs = [(perm[2 * i], perm[2 * i + 1]) for i in range(n_tasks)]
    return [(min(a, b), max(a, b)) for a, b in pairs]


def task_rows(scenario: Scenario, digits: tuple[int, int]) -> tuple[int, ...]:
    """The output rows that compete for a task's prediction in a scenario."""
    if scenario == "task":
        return digits
    if scenario == "domain":
        return (0, 1)
    return tuple(range(N_DIGITS))


def task_labels(
    scenario: Scenario, digits: tuple[int, int], y: Tensor, domain_label: DomainLabel = "parity"
) -> Tensor:
    """Digit labels of a task's samples as positions in its `task_rows` (Domain-IL: the digit's
    parity, or with `domain_label="position"` which digit of the pair)."""
    if scenario == "class":
        return y.clone()
    if scenario == "domain" and domain_label == "parity":
        return (y % 2).to(torch.int64)
    return (y == digits[1]).to(torch.int64)


def _subset(
    x: Tensor, y: Tensor, digits: tuple[int, int], limit: int | None
) -> tuple[Tensor, Tensor]:
    keep = torch.nonzero((y == digits[0]) | (y == digits[1])).flatten()
    if limit is not None:
        keep = keep[:limit]
    return x[keep], y[keep]


def split_pairs(
    scenario: Scenario,
    pairs: Sequence[tuple[int, int]],
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    domain_label: DomainLabel = "parity",
) -> list[SplitTask]:
    """Build the task sequence of one scenario from the train and test arrays of any
    10-class data set (MNIST images, CIFAR-10 images or their frozen-encoder features).

    Args:
        scenario: "task", "domain" or "class".
        pairs: the class pairs, in task order (see `draw_pairs`).
        train: (x, y) of the train split (x: (n, *input_shape)); y holds classes 0-9.
        test: (x, y) of the test split.
        train_limit: keep at most this many training samples per task (quick runs).
        test_limit: keep at most this many test samples per task (quick runs).
        domain_label: Domain-IL labels: "parity" (digit mod 2) or "position" (which of the pair).

    Returns:
        One `SplitTask` per pair.

    Raises:
        InputError: unknown scenario, or pairs that overlap or are not digits.
    """
    if scenario not in SCENARIOS:
        raise InputError(f"unknown scenario '{scenario}'; expected one of {', '.join(SCENARIOS)}")
    seen = [d for pair in pairs for d in pair]
    if len(set(seen)) != len(seen) or not all(0 <= d < N_DIGITS for d in seen):
        raise InputError(f"task pairs must be disjoint digits 0-9; got {list(pairs)}")
    tasks = []
    for index, pair in enumerate(pairs):
        digits = (min(pair), max(pair))
        x_tr, y_tr = _subset(*train, digits, train_limit)
        x_te, y_te = _subset(*test, digits, test_limit)
        tasks.append(
            SplitTask(
                index=index,
                digits=digits,
                rows=task_rows(scenario, digits),
                x_train=x_tr,
                y_train=task_labels(scenario, digits, y_tr, domain_label),
                x_test=x_te,
                y_test=task_labels(scenario, digits, y_te, domain_label),
            )
        )
    return tasks


split_mnist = split_pairs
"""Build the task sequence of one scenario from MNIST train and test arrays: `split_pairs`
under the name the Split-MNIST code uses."""


def masked_logits(logits: Tensor, rows: Sequence[int] | Tensor) -> Tensor:
    """The logits that compete for a prediction: one row set for all, or one per sample.

    Args:
        logits: full logits, shape (n, n_outputs).
        rows: a row sequence (k,) shared by every sample, or a tensor (n, k) of rows per sample.

    Returns:
        Shape (n, k).
    """
    index = torch.as_tensor(rows, dtype=torch.int64, device=logits.device)
    if index.dim() == 1:
        return logits[:, index]
    return logits.gather(1, index)
