"""The shared training loop of every continual learner, and evaluation on masked heads.

A learner is a `Strategy`: hooks around the plain loop "cross-entropy on the task's masked
logits, Adam step" (a fresh Adam per task, as in the paper's protocol). Baselines add a penalty
(EWC, SI, LwF), edit the gradient (A-GEM), change the training data (joint training) or project
the weights after each step (LID). Every sample carries the rows that compete for its
prediction (`rows`, shape (n, k)), so replayed samples of other Task-IL heads mix freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verifier.cl.scenarios import SplitTask, masked_logits


@dataclass(frozen=True)
class TrainConfig:
    """Per-task optimisation settings: Adam, a fresh optimiser per task. The defaults (lr 1e-3,
    5 epochs, batch 64) are the Split-MNIST benchmark's; `PAPER_CIFAR_TRAIN` is the paper's
    Split-CIFAR-10 protocol."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3


PAPER_CIFAR_TRAIN = TrainConfig(epochs=5, batch_size=128, lr=0.02)
"""The paper's Split-CIFAR-10 training (DESIGN.md section 5): Adam, lr 0.02, 5 epochs,
batch 128."""


@dataclass(frozen=True, eq=False)
class TrainingData:
    """Samples to train on: images, labels as positions in their rows, and the rows."""

    x: Tensor
    y: Tensor
    rows: Tensor

    @classmethod
    def of_task(cls, task: SplitTask) -> TrainingData:
        """A task's training split, every sample with the task's rows."""
        n = task.x_train.shape[0]
        rows = torch.tensor(task.rows, dtype=torch.int64).expand(n, len(task.rows))
        return cls(task.x_train, task.y_train, rows)

    @classmethod
    def union(cls, parts: Sequence[TrainingData]) -> TrainingData:
        """Concatenate several parts (their rows must have the same width)."""
        return cls(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.rows for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.x.shape[0])


class Strategy:
    """A continual learner: the plain loop with hooks; every hook defaults to doing nothing.

    Subclasses override what they need. `name` labels the method in results.
    """

    name = "fine-tune"

    def training_data(self, task: SplitTask, seen: Sequence[SplitTask]) -> TrainingData:
        """What to train on for `task` (`seen` lists the earlier tasks)."""
        return TrainingData.of_task(task)

    def before_task(self, model: nn.Module, task: SplitTask, seen: Sequence[SplitTask]) -> None:
        """Called before training on `task`."""

    def penalty(self, model: nn.Module, x: Tensor) -> Tensor | None:
        """An extra loss term for the batch `x` (None for none)."""
        return None

    def adjust_gradients(self, model: nn.Module, generator: torch.Generator) -> None:
        """Edit the gradients after backward and before the optimiser step."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step."""

    def after_task(self, model: nn.Module, task: SplitTask, seen: Sequence[SplitTask]) -> None:
        """Called after training on `task` (`seen` excludes it)."""


def task_loss(model: nn.Module, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
    """Mean cross-entropy of the masked logits."""
    return F.cross_entropy(masked_logits(model(x), rows), y)


def n_steps(n_samples: int, config: TrainConfig) -> int:
    """Optimiser steps of `config.epochs` epochs over `n_samples` samples."""
    return config.epochs * math.ceil(n_samples / config.batch_size)


def batches(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches of `steps` steps over fresh random permutations of range(n).

    Each epoch is one permutation cut into batches (the last one may be short); epochs repeat
    until `steps` batches exist.
    """
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


def train_task(
    model: nn.Module,
    strategy: Strategy,
    task: SplitTask,
    seen: Sequence[SplitTask],
    config: TrainConfig,
    generator: torch.Generator,
) -> None:
    """Train `model` on one task with a strategy's hooks (fresh Adam, in place).

    The number of steps is `config.epochs` epochs of the *task's* training split, also when
    the strategy trains on more data (joint training), so every method gets the same compute.

    Args:
        model: the network.
        strategy: the learner's hooks.
        task: the task to learn.
        seen: the earlier tasks, in order.
        config: optimisation settings.
        generator: randomness of the batches.
    """
    data = strategy.training_data(task, seen)
    strategy.before_task(model, task, seen)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = n_steps(task.x_train.shape[0], config)
    model.train()
    for idx in batches(len(data), steps, config.batch_size, generator):
        x = data.x[idx]
        loss = task_loss(model, x, data.y[idx], data.rows[idx])
        extra = strategy.penalty(model, x)
        if extra is not None:
            loss = loss + extra
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        strategy.adjust_gradients(model, generator)
        optimiser.step()
        strategy.after_step(model)
    strategy.after_task(model, task, seen)


def evaluate(model: nn.Module, task: SplitTask, *, batch_size: int = 2000) -> float:
    """Test accuracy of the masked prediction argmax(logits[:, task.rows])."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, task.x_test.shape[0], batch_size):
            logits = masked_logits(model(task.x_test[start : start + batch_size]), task.rows)
            correct += int((logits.argmax(1) == task.y_test[start : start + batch_size]).sum())
    return correct / max(task.x_test.shape[0], 1)


def accuracy_row(model: nn.Module, tasks: Sequence[SplitTask]) -> Tensor:
    """Test accuracy on every task of the sequence, shape (T,), float64."""
    return torch.tensor([evaluate(model, t) for t in tasks], dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class FirstTask:
    """The state after plain training on the first task, shared by learners whose first task
    is plain training (every method here but SI): weights, batch generator state, and the
    accuracy row."""

    parameters: dict[str, Tensor]
    generator_state: Tensor
    row: Tensor


def train_first_task(
    model: nn.Module,
    tasks: Sequence[SplitTask],
    config: TrainConfig,
    generator: torch.Generator,
) -> FirstTask:
    """Plain training on tasks[0] (in place), recorded for `run_sequence(..., first=...)`."""
    train_task(model, Strategy(), tasks[0], [], config, generator)
    parameters = {n: p.detach().clone() for n, p in model.named_parameters()}
    return FirstTask(parameters, generator.get_state(), accuracy_row(model, tasks))


def resume_first_task(model: nn.Module, first: FirstTask, generator: torch.Generator) -> None:
    """Put the weights and the generator in the state `first` recorded."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in first.parameters.items():
            params[name].copy_(value)
    generator.set_state(first.generator_state)


def run_sequence(
    model: nn.Module,
    strategy: Strategy,
    tasks: Sequence[SplitTask],
    config: TrainConfig,
    generator: torch.Generator,
    *,
    first: FirstTask | None = None,
) -> Tensor:
    """Train on the tasks in order; return the accuracy matrix (T x T, float64).

    Row t holds the test accuracy on every task after training on tasks 0..t. With `first`,
    the first task's plain training is taken from it (identical for strategies whose hooks
    leave the first task's training alone) and only the strategy's `after_task` runs for it.
    """
    rows = []
    for t, task in enumerate(tasks):
        if t == 0 and first is not None:
            resume_first_task(model, first, generator)
            strategy.after_task(model, task, [])
            rows.append(first.row.clone())
            continue
        train_task(model, strategy, task, tasks[:t], config, generator)
        rows.append(accuracy_row(model, tasks))
    return torch.stack(rows)
