"""Continual-learning baselines as `Strategy` hooks on the shared training loop.

* `FineTune`: plain sequential training ("SGD fine-tuning"; the optimiser is the protocol's Adam).
* `EWC` (Kirkpatrick et al., 2017): quadratic penalty λ/2 Σ_j Σ_i F_j,i (θ_i - θ*_j,i)^2 with the
  diagonal empirical Fisher F_j of every earlier task j at its final weights θ*_j: per sample
  (the mean squared per-sample gradient), or with `fisher_batch` b the estimate common CL
  libraries compute (the mean over batches of b of the squared batch-mean gradient; about b
  times smaller where per-sample gradients disagree, hence the paper's λ = 1e6 with b = 64).
* `SI` (Zenke et al., 2017): path-integral importance ω accumulated during training,
  Ω += ω / (Δθ^2 + ξ) after each task; penalty c Σ Ω (θ - θ*)^2.
* `LwF` (Li & Hoiem, 2016): distillation of the previous model's outputs on the current data,
  T^2 KL(softmax(old/T) || softmax(new/T)) over every earlier task's rows (Class-IL: the rows of
  every class seen so far), weighted by α.
* `AGEM` (Chaudhry et al., 2019): episodic memory (equal share per seen task, `memory_size` in
  all, or a named buffer size of `verifier.cl.buffers`: the same per-task allocation and the
  same samples as the replay LID learner's buffers); when the gradient conflicts with the memory
  gradient (negative dot product) it is projected onto the half-space of non-increasing memory
  loss.
* `Joint`: trains on the union of the tasks seen so far (upper bound), warm-started, with the
  same number of optimiser steps per task as every other method.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verifier.cl.buffers import BufferSize, buffer_order
from verifier.cl.scenarios import SplitTask, masked_logits
from verifier.cl.training import Strategy, TrainingData, task_loss


class FineTune(Strategy):
    """Sequential training with no protection of earlier tasks."""

    name = "fine-tune"


def empirical_fisher(
    model: nn.Module, data: TrainingData, *, chunk_size: int = 250
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher, the mean over samples of the squared per-sample gradient of
    the masked log-likelihood of the true label, keyed by parameter name."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def log_lik(theta: dict[str, Tensor], x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        logits = functional_call(model, theta, (x.unsqueeze(0),))[0].gather(0, rows)
        return torch.log_softmax(logits, dim=0).gather(0, y.unsqueeze(0))[0]

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    per_sample = vmap(grad(log_lik), in_dims=(None, 0, 0, 0))
    for start in range(0, len(data), chunk_size):
        part = slice(start, start + chunk_size)
        grads = per_sample(params, data.x[part], data.y[part], data.rows[part])
        for n in total:
            total[n] += grads[n].pow(2).sum(0)
    return {n: t / max(len(data), 1) for n, t in total.items()}


def batch_fisher(model: nn.Module, data: TrainingData, batch_size: int) -> dict[str, Tensor]:
    """Diagonal Fisher from batches: the mean over consecutive batches of `batch_size` samples
    (the last one may be short) of the squared gradient of the batch's mean masked
    log-likelihood of the true labels, keyed by parameter name."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = 0
    for start in range(0, len(data), batch_size):
        part = slice(start, start + batch_size)
        loss = task_loss(model, data.x[part], data.y[part], data.rows[part])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            if g is not None:
                total[n] += g.detach().pow(2)
        n_batches += 1
    return {n: t / max(n_batches, 1) for n, t in total.items()}


class EWC(Strategy):
    """Elastic weight consolidation, one Fisher and anchor per earlier task.

    Args:
        strength: λ.
        n_fisher: samples of each task's training split used for its Fisher (None: all).
        fisher_batch: None for the per-sample empirical Fisher (`empirical_fisher`), or the
            batch size of the batch estimate (`batch_fisher`; the paper's Split-CIFAR-10: 64).
    """

    name = "EWC"

    def __init__(
        self, strength: float, *, n_fisher: int | None = 1000, fisher_batch: int | None = None
    ) -> None:
        self.strength = strength
        self.n_fisher = n_fisher
        self.fisher_batch = fisher_batch
        self.anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def penalty(self, model: nn.Module, x: Tensor) -> Tensor | None:
        if not self.anchors:
            return None
        total = x.new_zeros(())
        for fisher, theta in self.anchors:
            for n, p in model.named_parameters():
                total = total + (fisher[n] * (p - theta[n]).pow(2)).sum()
        return self.strength / 2 * total

    def after_task(self, model: nn.Module, task: SplitTask, seen: Sequence[SplitTask]) -> None:
        data = TrainingData.of_task(task)
        part = TrainingData(
            data.x[: self.n_fisher], data.y[: self.n_fisher], data.rows[: self.n_fisher]
        )
        if self.fisher_batch is None:
            fisher = empirical_fisher(model, part)
        else:
            fisher = batch_fisher(model, part, self.fisher_batch)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.anchors.append((fisher, theta))


class SI(Strategy):
    """Synaptic intelligence.

    Args:
        strength: c.
        damping: ξ.
    """

    name = "SI"

    def __init__(self, strength: float, *, damping: float = 0.1) -> None:
        self.strength = strength
        self.damping = damping
        self.omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self._path: dict[str, Tensor] = {}
        self._start: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}
        self._grad: dict[str, Tensor] = {}

    def before_task(self, model: nn.Module, task: SplitTask, seen: Sequence[SplitTask]) -> None:
        self._start = {n: p.detach().clone() for n, p in model.named_parameters()}
        self._path = {n: torch.zeros_like(p) for n, p in self._start.items()}

    def penalty(self, model: nn.Module, x: Tensor) -> Tensor | None:
        if not self.omega:
            return None
        total = x.new_zeros(())
        for n, p in model.named_parameters():
            total = total + (self.omega[n] * (p - self.anchor[n]).pow(2)).sum()
        return self.strength * total

    def adjust_gradients(self, model: nn.Module, generator: torch.Generator) -> None:
        for n, p in model.named_parameters():
            self._before[n] = p.detach().clone()
            self._grad[n] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()

    def after_step(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self._path[n] -= self._grad[n] * (p.detach() - self._before[n])

    def after_task(self, model: nn.Module, task: SplitTask, seen: Sequence[SplitTask]) -> None:
        for n, p in model.named_parameters():
            delta = p.detach() - self._start[n]
            contribution = torch.relu(self._path[n]) / (delta.pow(2) + self.damping)
            self.omega[n] = self.omega.get(n, torch.zeros_like(delta)) + contribution
            self.anchor[n] = p.detach().clone()


class LwF(Strategy):
    """Learning without forgetting.

    Args:
        weight: α, the weight of the distillation term.
        temperature: T.
    """

    name = "LwF"

    def __init__(self, weight: float = 1.0, *, temperature: float = 2.0) -> None:
        self.weight = weight
        self.temperature = temperature
        self.teacher: nn.Module | None = None
        self.old_rows: list[tuple[int, ...]] = []

    def before_task(self, model: nn.Module, task: SplitTask, seen: Sequence[SplitTask]) -> None:
        if not seen:
            self.teacher, self.old_rows = None, []
            return
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        heads = sorted({t.rows for t in seen})
        if all(len(r) == 10 for r in heads):  # Class-IL: the classes seen so far
            heads = [tuple(sorted({d for t in seen for d in t.digits}))]
        self.old_rows = [r for r in heads if len(r) >= 2]

    def penalty(self, model: nn.Module, x: Tensor) -> Tensor | None:
        if self.teacher is None or not self.old_rows:
            return None
        with torch.no_grad():
            old = self.teacher(x)
        new = model(x)
        t = self.temperature
        total = x.new_zeros(())
        for rows in self.old_rows:
            target = torch.softmax(masked_logits(old, rows) / t, dim=1)
            log_pred = torch.log_softmax(masked_logits(new, rows) / t, dim=1)
            total = total + F.kl_div(log_pred, target, reduction="batchmean") * t * t
        return self.weight * total / len(self.old_rows)


class AGEM(Strategy):
    """Averaged gradient episodic memory.

    Args:
        memory_size: samples kept in all, an equal share per seen task (the first samples of
            each task's training split, re-shared after every task); or a `BufferSize`
            (SMALL / MEDIUM / LARGE): task j keeps `memory_size.stored(j, n_train)` samples,
            the first of `buffer_order(task, buffer_seed)`, i.e. the same per-task allocation
            and the same samples as `verifier.cl.replay`'s buffers with that seed, all in use
            from the start.
        reference_batch: memory samples per reference gradient.
        buffer_seed: with a `BufferSize`, the seed of the buffers' sample order.
    """

    name = "A-GEM"

    def __init__(
        self,
        memory_size: int | BufferSize = 1000,
        *,
        reference_batch: int = 64,
        buffer_seed: int = 0,
    ) -> None:
        self.memory_size = memory_size
        self.reference_batch = reference_batch
        self.buffer_seed = buffer_seed
        self.per_task: list[TrainingData] = []
        self.memory: TrainingData | None = None

    def adjust_gradients(self, model: nn.Module, generator: torch.Generator) -> None:
        if self.memory is None:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad.detach().clone() for p in params if p.grad is not None]
        idx = torch.randint(0, len(self.memory), (self.reference_batch,), generator=generator)
        loss = task_loss(model, self.memory.x[idx], self.memory.y[idx], self.memory.rows[idx])
        reference = torch.autograd.grad(loss, params)
        dot = sum(float((g * r).sum()) for g, r in zip(grads, reference, strict=True))
        if dot >= 0:
            return
        norm = sum(float(r.pow(2).sum()) for r in reference)
        for p, g, r in zip(params, grads, reference, strict=True):
            p.grad = g - dot / max(norm, 1e-12) * r

    def after_task(self, model: nn.Module, task: SplitTask, seen: Sequence[SplitTask]) -> None:
        data = TrainingData.of_task(task)
        if isinstance(self.memory_size, BufferSize):
            keep = buffer_order(task, self.buffer_seed)
            keep = keep[: self.memory_size.stored(task.index, len(data))]
            self.per_task.append(TrainingData(data.x[keep], data.y[keep], data.rows[keep]))
            parts = [d for d in self.per_task if len(d)]
        else:
            self.per_task.append(data)
            share = self.memory_size // len(self.per_task)
            parts = [TrainingData(d.x[:share], d.y[:share], d.rows[:share]) for d in self.per_task]
        self.memory = TrainingData.union(parts) if parts else None


class Joint(Strategy):
    """Training on the union of the tasks seen so far (an upper bound, not continual)."""

    name = "joint"

    def training_data(self, task: SplitTask, seen: Sequence[SplitTask]) -> TrainingData:
        return TrainingData.union([TrainingData.of_task(t) for t in (*seen, task)])
