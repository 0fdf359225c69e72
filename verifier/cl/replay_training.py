"""Training with replay for the replay-buffer LID learner (`verifier.cl.replay`): each batch
joins the current task's samples and random buffer samples, and the weights are projected onto
the LID after every optimiser step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from verifier.cl.lid_learner import Projection
from verifier.cl.network import ContinualNetwork
from verifier.cl.scenarios import masked_logits
from verifier.cl.training import TrainConfig, TrainingData, batches, n_steps
from verifier.domains.box import Box


def _pins_all_but(box: Box, keep: Sequence[str]) -> bool:
    return all(torch.equal(box.lower[n], box.upper[n]) for n in box.lower if n not in keep)


def train_replay(
    model: ContinualNetwork,
    data: TrainingData,
    buffer: TrainingData,
    box: Box | None,
    config: TrainConfig,
    generator: torch.Generator,
    *,
    replay_batch: int,
) -> None:
    """Train on `data` with `replay_batch` random buffer samples in every batch (one
    cross-entropy over the joined batch of masked logits), projecting onto `box` after every
    optimiser step (a fresh Adam; `config.epochs` epochs of `data`).

    When the box pins every parameter but the head's, the body cannot move: the head is
    trained alone on precomputed features (the same updates as the full loop and the clamp).

    Args:
        model: the network, trained in place; it must lie in `box`.
        data: the current task's samples.
        buffer: the replayed samples (rows of the same width as `data`'s); may be empty.
        box: the LID to project onto, or None.
        config: optimisation settings.
        generator: randomness of the batches and the replayed samples.
        replay_batch: buffer samples per batch.
    """
    head = ("fc.weight", "fc.bias")
    projection = Projection(box)
    head_only = box is not None and _pins_all_but(box, head)
    if head_only:
        with torch.no_grad():
            x_data = torch.cat(
                [model.features(data.x[i : i + 2000]) for i in range(0, len(data), 2000)]
            )
            x_buffer = (
                torch.cat(
                    [model.features(buffer.x[i : i + 2000]) for i in range(0, len(buffer), 2000)]
                )
                if len(buffer)
                else x_data[:0]
            )
        forward: Callable[[Tensor], Tensor] = model.fc
        parameters = list(model.fc.parameters())
    else:
        x_data, x_buffer, forward, parameters = data.x, buffer.x, model, list(model.parameters())
    optimiser = torch.optim.Adam(parameters, lr=config.lr)
    model.train()
    for idx in batches(len(data), n_steps(len(data), config), config.batch_size, generator):
        x, y, rows = x_data[idx], data.y[idx], data.rows[idx]
        if len(buffer) and replay_batch > 0:
            pick = torch.randint(0, len(buffer), (replay_batch,), generator=generator)
            x = torch.cat([x, x_buffer[pick]])
            y = torch.cat([y, buffer.y[pick]])
            rows = torch.cat([rows, buffer.rows[pick]])
        loss = F.cross_entropy(masked_logits(forward(x), rows), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        projection.after_step(model)


def active_only(data: TrainingData, active: Sequence[int]) -> TrainingData:
    """Class-IL data whose loss compares only the `active` classes (labels re-indexed)."""
    position = torch.full((int(data.rows.max()) + 1,), -1, dtype=torch.int64)
    position[torch.tensor(active)] = torch.arange(len(active))
    classes = data.rows.gather(1, data.y[:, None])[:, 0]
    rows = torch.tensor(active, dtype=torch.int64).expand(len(data), len(active))
    return TrainingData(data.x, position[classes], rows)
