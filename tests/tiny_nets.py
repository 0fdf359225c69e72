"""Small random graphs and boxes for bound tests, built straight from `verifier.graph`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from verifier.graph import Activation, Conv, Graph, Linear, Op, Reshape


def random_mlp(
    widths: Sequence[int],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    activation: Literal["relu", "sigmoid", "tanh"] = "relu",
) -> Graph:
    """A fully connected classifier widths[0] -> ... -> widths[-1], activation between layers.

    Weights are He-scaled normals in torch's (out, in) layout, named `fc{k}.weight` and
    `fc{k}.bias`; the graph input is flat, shape (widths[0],).

    Args:
        widths: layer widths, input first, number of classes last; at least two entries.
        generator: source of randomness.
        dtype: dtype of the parameters.
        activation: activation after every hidden layer.

    Returns:
        The graph.
    """
    ops: list[Op] = []
    parameters: dict[str, Tensor] = {}
    layers = list(zip(widths[:-1], widths[1:], strict=True))
    for k, (n_in, n_out) in enumerate(layers):
        weight = torch.randn(n_out, n_in, generator=generator, dtype=dtype) * (2.0 / n_in) ** 0.5
        parameters[f"fc{k}.weight"] = weight
        parameters[f"fc{k}.bias"] = 0.1 * torch.randn(n_out, generator=generator, dtype=dtype)
        ops.append(Linear(node=f"Gemm_{k}", weight=f"fc{k}.weight", bias=f"fc{k}.bias"))
        if k < len(layers) - 1:
            ops.append(Activation(node=f"Act_{k}", function=activation))
    return Graph(
        ops=tuple(ops),
        parameters=parameters,
        input_name="input",
        input_shape=(widths[0],),
        output_name="logits",
        n_classes=widths[-1],
    )


def random_cnn(generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Graph:
    """Conv(1->2, 3x3)-ReLU-Conv(2->2, 3x3, stride 2)-ReLU-Reshape(18)-Linear(18->3), 1x9x9 input.

    Args:
        generator: source of randomness.
        dtype: dtype of the parameters.

    Returns:
        The graph; parameters `conv0.weight`, `conv0.bias`, `conv1.weight`, `conv1.bias`,
        `fc.weight`, `fc.bias`.
    """

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    parameters = {
        "conv0.weight": randn(2, 1, 3, 3) / 3.0,
        "conv0.bias": 0.1 * randn(2),
        "conv1.weight": randn(2, 2, 3, 3) / 4.0,
        "conv1.bias": 0.1 * randn(2),
        "fc.weight": randn(3, 18) / 18**0.5,
        "fc.bias": 0.1 * randn(3),
    }
    ops: tuple[Op, ...] = (
        Conv(node="Conv_0", weight="conv0.weight", bias="conv0.bias"),
        Activation(node="Relu_0", function="relu"),
        Conv(node="Conv_1", weight="conv1.weight", bias="conv1.bias", strides=(2, 2)),
        Activation(node="Relu_1", function="relu"),
        Reshape(node="Flatten_0", shape=(18,)),
        Linear(node="Gemm_0", weight="fc.weight", bias="fc.bias"),
    )
    return Graph(
        ops=ops,
        parameters=parameters,
        input_name="input",
        input_shape=(1, 9, 9),
        output_name="logits",
        n_classes=3,
    )


def box_around(
    graph: Graph,
    radius: float,
    names: Iterable[str] | None = None,
    *,
    absolute: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A box around the graph's parameters: θ0 -/+ (radius*|θ0| + absolute*radius).

    With a generator, the two sides get independent random fractions in [0.5, 1] of that
    width, so the box is asymmetric around θ0.

    Args:
        graph: the graph whose parameters are the centre.
        radius: relative half-width (0 gives a zero-width box).
        names: the parameters to box (default: all).
        absolute: absolute half-width per unit of `radius`, so zero weights get a box too.
        generator: randomness for asymmetric boxes; None for symmetric ones.

    Returns:
        (lower, upper), keyed by parameter name.
    """
    chosen = list(graph.parameters) if names is None else list(names)
    lower: dict[str, Tensor] = {}
    upper: dict[str, Tensor] = {}
    for name in chosen:
        theta = graph.parameters[name]
        width = radius * (theta.abs() + absolute)
        below, above = width, width
        if generator is not None:
            below = width * (0.5 + 0.5 * torch.rand(theta.shape, generator=generator).to(theta))
            above = width * (0.5 + 0.5 * torch.rand(theta.shape, generator=generator).to(theta))
        lower[name] = theta - below
        upper[name] = theta + above
    return lower, upper
