"""Split-MNIST / Split-CIFAR-10 task sequences in the three continual-learning scenarios.

The ten classes (MNIST digits, CIFAR-10 classes; `split_pairs` takes any 10-class samples,
images or frozen-encoder features) are split into five pairs, drawn per seed by one of three
rules:

* `draw_even_odd_pairs` (the paper's Split-MNIST protocol): every pair holds one even and one
  odd digit, e.g. [[7, 8], [0, 9], [1, 2], [3, 6], [4, 5]], so every Domain-IL (parity) task
  has both labels.
* `draw_animal_vehicle_pairs` (the paper's Split-CIFAR-10 protocol): the 6 animal and the 4
  vehicle classes are split into 5 chunks each; every task holds an animal, four tasks pair an
  animal with a vehicle and one task holds two animals (see the function for the reading).
* `draw_pairs`: a free draw (an earlier variant of both benchmarks; a task may hold two digits
  of one parity, or two vehicles).

Every scenario is expressed the same way: a task names the output rows that compete for its
prediction (`rows`) and labels each sample by its position among those rows, so training,
evaluation and certification all work on the *masked* logits `logits[:, rows]`:

* ``task`` (Task-IL, multi-head): rows = the task's two classes; only those two logits compete.
* ``domain`` (Domain-IL): rows = (0, 1), one shared two-way head (the first two logits of the
  network). The label is chosen by `domain_label`:
  - "parity" (Split-MNIST, the default): the digit's parity (0 even, 1 odd);
  - "animal-vehicle" (Split-CIFAR-10, the paper's): 0 for an animal class (2-7), 1 for a
    vehicle class (0, 1, 8, 9); the two-animal task then has one label only, as in the paper;
  - "position": which class of the pair (0 for the smaller, 1 for the larger; the earlier
    Split-CIFAR-10 variant). With the classic pairs (0,1), (2,3), ... it agrees with parity.
* ``class`` (Class-IL): rows = all ten logits; label = the class.

`hold_out_validation` moves a random part of each task's training split into a validation part
that no method trains on (the paper's 80/20 Split-MNIST split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

import torch
from torch import Tensor

from verifier.errors import InputError

Scenario = Literal["task", "domain", "class"]
DomainLabel = Literal["parity", "animal-vehicle", "position"]
DOMAIN_LABELS: Final[tuple[DomainLabel, ...]] = ("parity", "animal-vehicle", "position")
SCENARIOS: Final[tuple[Scenario, ...]] = ("task", "domain", "class")
SCENARIO_NAMES: Final[dict[Scenario, str]] = {
    "task": "Task-IL",
    "domain": "Domain-IL",
    "class": "Class-IL",
}
N_DIGITS: Final = 10
CIFAR_ANIMALS: Final[tuple[int, ...]] = (2, 3, 4, 5, 6, 7)
"""CIFAR-10 animal classes: bird, cat, deer, dog, frog, horse."""
CIFAR_VEHICLES: Final[tuple[int, ...]] = (0, 1, 8, 9)
"""CIFAR-10 vehicle classes: airplane, automobile, ship, truck."""


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
        x_val: validation samples taken out of the training split (`hold_out_validation`),
            which no method trains on, shape (v, *input_shape); None: no validation part.
        y_val: labels as positions in `rows`, shape (v,), or None.
    """

    index: int
    digits: tuple[int, int]
    rows: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None

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
    _check_tasks(n_tasks)
    perm = torch.randperm(N_DIGITS, generator=generator).tolist()
    pairs = [(perm[2 * i], perm[2 * i + 1]) for i in range(n_tasks)]
    return [(min(a, b), max(a, b)) for a, b in pairs]


def _check_tasks(n_tasks: int) -> None:
    if not 1 <= n_tasks <= N_DIGITS // 2:
        raise InputError(f"a split of ten classes has at most {N_DIGITS // 2} tasks; got {n_tasks}")


def draw_even_odd_pairs(generator: torch.Generator, n_tasks: int = 5) -> list[tuple[int, int]]:
    """The paper's Split-MNIST pairs: one even and one odd digit in every task, drawn per seed.

    The evens and the odds are each put in a random order and paired position by position, so
    the task order is random too (e.g. [(7, 8), (0, 9), (1, 2), (3, 6), (4, 5)]).

    Args:
        generator: source of randomness (one seed, one split).
        n_tasks: number of pairs, at most 5 (the first `n_tasks` of the five).

    Returns:
        The pairs, each sorted ascending.

    Raises:
        InputError: more pairs than the digits allow.
    """
    _check_tasks(n_tasks)
    evens = [2 * i for i in torch.randperm(N_DIGITS // 2, generator=generator).tolist()]
    odds = [2 * i + 1 for i in torch.randperm(N_DIGITS // 2, generator=generator).tolist()]
    return [(min(e, o), max(e, o)) for e, o in zip(evens, odds, strict=True)][:n_tasks]


def draw_animal_vehicle_pairs(
    generator: torch.Generator, n_tasks: int = 5
) -> list[tuple[int, int]]:
    """The paper's Split-CIFAR-10 tasks: every task holds an animal, one holds two animals.

    The paper builds its five two-class tasks "by splitting the 6 animal and the 4 vehicle
    classes into 5 chunks each, so every task holds an animal and one task holds two animals".
    Read literally: the animals form five chunks, four of one animal and one of two; the
    vehicles form five chunks, four of one vehicle and one empty; task i joins animal chunk i
    and vehicle chunk i. Every task has two classes only if the two-animal chunk meets the
    empty vehicle chunk, so: four tasks of (animal, vehicle), one task of two animals, no task
    of two vehicles, all ten classes used once. (Pairing the chunks in the order
    `numpy.array_split` leaves them would give tasks of 3, 2, 2, 2 and 1 classes instead,
    against "tasks of two classes".) Random per seed: the animals' order, the vehicles' order,
    and the position of the two-animal task.

    Args:
        generator: source of randomness (one seed, one split).
        n_tasks: number of tasks, at most 5 (the first `n_tasks` of the five).

    Returns:
        The pairs, each sorted ascending.

    Raises:
        InputError: more tasks than the classes allow.
    """
    _check_tasks(n_tasks)
    animals = [CIFAR_ANIMALS[i] for i in torch.randperm(6, generator=generator).tolist()]
    vehicles = [CIFAR_VEHICLES[i] for i in torch.randperm(4, generator=generator).tolist()]
    two_animals = int(torch.randint(0, 5, (1,), generator=generator))
    pairs = [(a, v) for a, v in zip(animals[:4], vehicles, strict=True)]
    pairs.insert(two_animals, (animals[4], animals[5]))
    return [(min(a, b), max(a, b)) for a, b in pairs][:n_tasks]


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
    """Class labels of a task's samples as positions in its `task_rows` (Domain-IL: the
    digit's parity, animal (0) or vehicle (1), or with `domain_label="position"` which class
    of the pair)."""
    if scenario == "class":
        return y.clone()
    if scenario == "domain" and domain_label == "parity":
        return (y % 2).to(torch.int64)
    if scenario == "domain" and domain_label == "animal-vehicle":
        return torch.isin(y, torch.tensor(CIFAR_VEHICLES)).to(torch.int64)
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
        pairs: the class pairs, in task order (see `draw_even_odd_pairs`,
            `draw_animal_vehicle_pairs`, `draw_pairs`).
        train: (x, y) of the train split (x: (n, *input_shape)); y holds classes 0-9.
        test: (x, y) of the test split.
        train_limit: keep at most this many training samples per task (quick runs).
        test_limit: keep at most this many test samples per task (quick runs).
        domain_label: Domain-IL labels: "parity" (digit mod 2), "animal-vehicle" (CIFAR-10:
            0 animal, 1 vehicle) or "position" (which of the pair).

    Returns:
        One `SplitTask` per pair.

    Raises:
        InputError: unknown scenario or Domain-IL label, or pairs that overlap or are not
            digits.
    """
    if scenario not in SCENARIOS:
        raise InputError(f"unknown scenario '{scenario}'; expected one of {', '.join(SCENARIOS)}")
    if domain_label not in DOMAIN_LABELS:
        raise InputError(
            f"unknown Domain-IL label '{domain_label}'; expected one of {', '.join(DOMAIN_LABELS)}"
        )
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


def hold_out_validation(
    tasks: Sequence[SplitTask], fraction: float, generator: torch.Generator
) -> list[SplitTask]:
    """Move a random `fraction` of each task's training split into its validation part.

    The paper's Split-MNIST protocol (DESIGN.md section 5, "80/20 train/val split"): every
    method then trains on the remaining `x_train`, and the validation part (`x_val`) is data
    no method trains on (the LID search and τ use it with `search_data="validation"`). The
    two parts are disjoint and together hold the training split; each keeps the split's order.

    Args:
        tasks: the task sequence (`split_pairs`), none with a validation part yet.
        fraction: the part of each training split moved, in (0, 1) (the paper's: 0.2).
        generator: source of randomness (one seed, one split; tasks drawn in order).

    Returns:
        The tasks with `x_train` / `y_train` the training part and `x_val` / `y_val` the
        validation part (round(fraction * n) samples); everything else unchanged.

    Raises:
        InputError: a fraction outside (0, 1), a part left empty, or a task that already
            holds a validation part.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"the validation fraction must be in (0, 1); got {fraction}")
    out = []
    for task in tasks:
        if task.x_val is not None:
            raise InputError(f"task {task.name} already holds a validation part")
        n = task.x_train.shape[0]
        n_val = round(fraction * n)
        if not 0 < n_val < n:
            raise InputError(
                f"task {task.name}: a validation fraction {fraction} of {n} training samples "
                "leaves the training or the validation part empty"
            )
        perm = torch.randperm(n, generator=generator)
        val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
        out.append(
            replace(
                task,
                x_train=task.x_train[train],
                y_train=task.y_train[train],
                x_val=task.x_train[val],
                y_val=task.y_train[val],
            )
        )
    return out


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
