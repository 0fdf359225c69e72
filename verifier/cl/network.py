"""The continual learners' networks as torch modules and as `Graph`s for the bound engine.

* `SplitMnistCNN`, the paper's Split-MNIST CNN: Conv(1->8, 5x5, pad 1)-ReLU-Conv(8->1, 5x5,
  pad 1)-ReLU-Flatten(576)-Linear(576->10), p = 6179 parameters (arXiv 2512.01899).
* `LinearHead`, a linear classifier on frozen-encoder features (Split-CIFAR-10 on cached
  EfficientNet-Lite0 features): Linear(k->10), p = 10k + 10.

Parameters are named as the module's state dict (`conv0.weight`, ..., `fc.bias`); the graph,
the boxes and the checkpoints use the same names. Both expose `features` (the inputs of the
final Linear) and `fc`, which is all the head-only LID learner needs.
"""

from __future__ import annotations

import math
from typing import Final

import torch
from torch import Tensor, nn

from verifier.graph import Activation, Conv, Graph, Linear, Op, Reshape

INPUT_SHAPE: Final = (1, 28, 28)
N_OUTPUTS: Final = 10
N_FEATURES: Final = 576
HEAD_WEIGHT: Final = "fc.weight"
HEAD_BIAS: Final = "fc.bias"


class SplitMnistCNN(nn.Module):
    """The paper's CNN; weights drawn from `generator` (torch's default uniform ranges).

    Args:
        generator: source of the initial weights; the global RNG is left untouched.
    """

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 5, padding=1, device="meta")
        self.conv1 = nn.Conv2d(8, 1, 5, padding=1, device="meta")
        self.fc = nn.Linear(N_FEATURES, N_OUTPUTS, device="meta")
        self.to_empty(device="cpu")
        with torch.no_grad():
            for layer in (self.conv0, self.conv1, self.fc):
                bound = 1.0 / math.sqrt(layer.weight[0].numel())  # torch's default ranges
                for _, param in layer.named_parameters():
                    param.uniform_(-bound, bound, generator=generator)

    def features(self, x: Tensor) -> Tensor:
        """The 576 inputs of the linear head, shape (n, 576)."""
        h = torch.relu(self.conv0(x))
        return torch.relu(self.conv1(h)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits, shape (n, 10)."""
        return self.fc(self.features(x))


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of every parameter, keyed by state-dict name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def cnn_graph(model: SplitMnistCNN) -> Graph:
    """The module as a `Graph` with the module's current weights (float32 copies)."""
    ops = (
        Conv("conv0", "conv0.weight", "conv0.bias", pads=(1, 1, 1, 1)),
        Activation("relu0", "relu"),
        Conv("conv1", "conv1.weight", "conv1.bias", pads=(1, 1, 1, 1)),
        Activation("relu1", "relu"),
        Reshape("flatten", (N_FEATURES,)),
        Linear("fc", HEAD_WEIGHT, HEAD_BIAS),
    )
    return Graph(ops, parameters_of(model), "input", INPUT_SHAPE, "logits", N_OUTPUTS)


class LinearHead(nn.Module):
    """A linear classifier on precomputed features; weights drawn from `generator` (torch's
    default uniform ranges, as `nn.Linear`).

    Args:
        n_features: length of a feature vector.
        generator: source of the initial weights; the global RNG is left untouched.
        n_outputs: number of logits.
    """

    def __init__(
        self, n_features: int, generator: torch.Generator, *, n_outputs: int = N_OUTPUTS
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(n_features, n_outputs, device="meta")
        self.to_empty(device="cpu")
        with torch.no_grad():
            bound = 1.0 / math.sqrt(n_features)
            for _, param in self.fc.named_parameters():
                param.uniform_(-bound, bound, generator=generator)

    def features(self, x: Tensor) -> Tensor:
        """The inputs of the linear head, flattened to (n, k)."""
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits, shape (n, n_outputs)."""
        return self.fc(self.features(x))


ContinualNetwork = SplitMnistCNN | LinearHead
"""The networks the continual learners train (both have `features` and a final `fc`)."""


def network_graph(model: ContinualNetwork) -> Graph:
    """The module as a `Graph` with its current weights (float32 copies).

    Raises:
        TypeError: not a network of this module.
    """
    if isinstance(model, SplitMnistCNN):
        return cnn_graph(model)
    if isinstance(model, LinearHead):
        ops: tuple[Op, ...] = (Linear("fc", HEAD_WEIGHT, HEAD_BIAS),)
        n_in, n_out = model.fc.in_features, model.fc.out_features
        return Graph(ops, parameters_of(model), "input", (n_in,), "logits", n_out)
    raise TypeError(f"no graph for a {type(model).__name__}; expected SplitMnistCNN or LinearHead")
