"""What data the LID learner's search, τ and certificates see of each task (`LidConfig`).

A *view* of a task is a `SplitTask` whose ``x_train`` is the search's data (and τ's clean
accuracy) and whose ``x_test`` is the certificate's samples; training and the accuracy matrix
keep using the task itself. ``search_data`` picks the view:

* "train": the task's training split for the search; its test split certifies.
* "test": a seeded split of the test split into an optimisation part for the search and a
  certification part (`held_out_view`).
* "validation": the task's validation part (`verifier.cl.scenarios.hold_out_validation`,
  taken out of the training split, so no method trains on it) for the search; its test split
  certifies (`validation_view`).

In every mode `n_certify` (when set) keeps that many certification samples, drawn seeded
(`certification_view`), e.g. the paper's 400 per LID. The certification samples are always
test samples, so neither training nor the search sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Final, Literal

import torch

from verifier.cl.scenarios import SplitTask
from verifier.errors import InputError

if TYPE_CHECKING:
    from verifier.cl.lid_learner import LidConfig

SearchData = Literal["train", "test", "validation"]
SEARCH_DATA: Final[tuple[SearchData, ...]] = ("train", "test", "validation")


def held_out_view(task: SplitTask, certification_fraction: float, seed: int) -> SplitTask:
    """The task as the LID search and certificate see it with `search_data="test"`: a seeded
    split of its test split into an optimisation part (as `x_train`) and a certification
    part (as `x_test`), disjoint.

    Raises:
        InputError: the fraction leaves either part empty.
    """
    n = task.x_test.shape[0]
    n_cert = int(round(certification_fraction * n))
    if not 0 < n_cert < n:
        raise InputError(
            f"task {task.name}: certification_fraction {certification_fraction} of {n} test "
            "samples leaves the optimisation or the certification part empty"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + task.index))
    cert, opt = perm[:n_cert], perm[n_cert:]
    return replace(
        task,
        x_train=task.x_test[opt],
        y_train=task.y_test[opt],
        x_test=task.x_test[cert],
        y_test=task.y_test[cert],
    )


def certification_view(task: SplitTask, n_certify: int | None, seed: int) -> SplitTask:
    """The task with `x_test` cut to `n_certify` of its samples, drawn at random (generator
    seeded `seed` + task index, so every LID of a run certifies task j on the same samples);
    kept in their order. None: the task unchanged.

    Raises:
        InputError: `n_certify` below 1 or above the task's test samples.
    """
    if n_certify is None:
        return task
    n = task.x_test.shape[0]
    if not 1 <= n_certify <= n:
        raise InputError(
            f"task {task.name}: n_certify must be in [1, {n}] (its certification samples); "
            f"got {n_certify}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + task.index))
    keep = perm[:n_certify].sort().values
    return replace(task, x_test=task.x_test[keep], y_test=task.y_test[keep])


def validation_view(task: SplitTask, n_certify: int | None, seed: int) -> SplitTask:
    """The task as the LID search and certificate see it with `search_data="validation"`:
    its validation part as `x_train` (search and τ), and `n_certify` of its test samples
    (`certification_view`; None: all) as `x_test`.

    Raises:
        InputError: the task has no validation part, or `n_certify` does not fit.
    """
    if task.x_val is None or task.y_val is None:
        raise InputError(
            f"task {task.name} has no validation part; search_data='validation' needs tasks "
            "from verifier.cl.scenarios.hold_out_validation"
        )
    view = replace(task, x_train=task.x_val, y_train=task.y_val)
    return certification_view(view, n_certify, seed)


def lid_views(tasks: Sequence[SplitTask], config: LidConfig) -> list[SplitTask]:
    """One view per task for `config.search_data` (see the module), with `config.n_certify`
    certification samples (None: all that mode holds out).

    Raises:
        InputError: an unknown `search_data`, a task without a validation part in
            "validation" mode, or a split or `n_certify` that does not fit.
    """
    mode, seed = config.search_data, config.split_seed
    if mode == "train":
        return [certification_view(t, config.n_certify, seed) for t in tasks]
    if mode == "test":
        return [
            certification_view(
                held_out_view(t, config.certification_fraction, seed), config.n_certify, seed
            )
            for t in tasks
        ]
    if mode == "validation":
        return [validation_view(t, config.n_certify, seed) for t in tasks]
    raise InputError(f"unknown search_data '{mode}'; expected one of {', '.join(SEARCH_DATA)}")
