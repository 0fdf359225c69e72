"""Small random graphs and boxes for bound tests, built straight from `verifier.graph`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from verifier.graph import (
    Activation,
    AffineScale,
    Binary,
    Concat,
    Conv,
    Elementwise,
    Graph,
    Linear,
    Op,
    Pad,
    Pool,
    Reshape,
    Slice,
    Transpose,
)


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


def _scale(generator: torch.Generator, n: int, dtype: torch.dtype) -> AffineScale:
    """A random AffineScale with weight scales of both signs."""

    def randn() -> Tensor:
        return torch.randn(n, generator=generator, dtype=dtype)

    return AffineScale(weight_scale=randn(), bias_scale=randn(), shift=0.1 * randn())


def op_zoo_cnn(generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Graph:
    """A small CNN on a (2, 7, 7) input using every spatial op with its awkward options.

    Normalisation (sub, div by constants) -> grouped Conv with asymmetric pads and a signed
    AffineScale -> Clip -> Pad(0.25) -> MaxPool -> Conv -> Sigmoid -> 1/x -> *0.1 ->
    AveragePool (pads, ceil_mode, count_include_pad=False) -> Transpose -> Slice(step 2) ->
    MatMul on the last axis ("in_out" weight) -> ReLU -> Reshape -> Gemm ("in_out", scaled).

    Args:
        generator: source of randomness.
        dtype: dtype of the parameters.

    Returns:
        The graph; parameters `c0.*`, `c1.*`, `mm.weight`, `head.*`.
    """

    def randn(*shape: int, fan_in: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype) * (2.0 / fan_in) ** 0.5

    parameters = {
        "c0.weight": randn(4, 1, 3, 3, fan_in=9),
        "c0.bias": 0.1 * randn(4, fan_in=2),
        "c1.weight": randn(3, 4, 3, 3, fan_in=36),
        "c1.bias": 0.1 * randn(3, fan_in=2),
        "mm.weight": randn(3, 4, fan_in=3),
        "head.weight": randn(24, 3, fan_in=24),
        "head.bias": 0.1 * randn(3, fan_in=2),
    }
    mean = torch.tensor([0.1, -0.2], dtype=dtype).reshape(2, 1, 1)
    ops: tuple[Op, ...] = (
        Elementwise("sub", "sub", mean, inputs=("x",), output="n0"),
        Elementwise("div", "div", torch.tensor(0.5, dtype=dtype), inputs=("n0",), output="n1"),
        Conv(
            "c0",
            "c0.weight",
            "c0.bias",
            pads=(1, 0, 0, 1),
            groups=2,
            scale=_scale(generator, 4, dtype),
            inputs=("n1",),
            output="a0",
        ),
        Activation("clip", "clip", low=-0.5, high=1.0, inputs=("a0",), output="h0"),
        Pad("pad", (1, 1, 1, 1), value=0.25, inputs=("h0",), output="p0"),
        Pool("max", "max", (2, 2), (2, 2), inputs=("p0",), output="m0"),
        Conv("c1", "c1.weight", "c1.bias", pads=(1, 1, 1, 1), inputs=("m0",), output="a1"),
        Activation("sig", "sigmoid", inputs=("a1",), output="h1"),
        Elementwise(
            "inv",
            "div",
            torch.tensor(1.0, dtype=dtype),
            constant_first=True,
            inputs=("h1",),
            output="r1",
        ),
        Elementwise("mul", "mul", torch.tensor(0.1, dtype=dtype), inputs=("r1",), output="r2"),
        Pool(
            "avg",
            "average",
            (3, 3),
            (2, 2),
            pads=(1, 1, 1, 1),
            ceil_mode=True,
            inputs=("r2",),
            output="q",
        ),
        Transpose("swap", (0, 1, 3, 2), inputs=("q",), output="t"),
        Slice("every_other", 1, 0, 3, 2, inputs=("t",), output="s"),
        Linear("mm", "mm.weight", None, weight_layout="in_out", inputs=("s",), output="u"),
        Activation("relu", "relu", inputs=("u",), output="v"),
        Reshape("flat", (24,), inputs=("v",), output="f"),
        Linear(
            "head",
            "head.weight",
            "head.bias",
            weight_layout="in_out",
            scale=_scale(generator, 3, dtype),
            inputs=("f",),
            output="logits",
        ),
    )
    return Graph(ops, parameters, "x", (2, 7, 7), "logits", 3)


def op_zoo_mlp(generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Graph:
    """An MLP on a (6,) input with LeakyReLU, Tanh, Clip, every constant op on computed
    tensors, a product of two computed tensors, a residual subtraction, Concat, a strided Slice
    and a broadcast add.

    Args:
        generator: source of randomness.
        dtype: dtype of the parameters.

    Returns:
        The graph; parameters `fc0.*`, `fc1.*`, `head.*`.
    """

    def randn(*shape: int, fan_in: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype) * (2.0 / fan_in) ** 0.5

    parameters = {
        "fc0.weight": randn(8, 6, fan_in=6),
        "fc0.bias": 0.1 * randn(8, fan_in=2),
        "fc1.weight": randn(8, 8, fan_in=8),
        "fc1.bias": 0.1 * randn(8, fan_in=2),
        "head.weight": randn(3, 6, fan_in=6),
        "head.bias": 0.1 * randn(3, fan_in=2),
    }
    offset = 0.1 * torch.randn(8, generator=generator, dtype=dtype)
    ops: tuple[Op, ...] = (
        Linear("fc0", "fc0.weight", "fc0.bias", inputs=("x",), output="a0"),
        Activation("leaky", "leaky_relu", alpha=0.2, inputs=("a0",), output="h0"),
        Linear("fc1", "fc1.weight", "fc1.bias", inputs=("h0",), output="a1"),
        Activation("tanh", "tanh", inputs=("a1",), output="h1"),
        Elementwise("add", "add", offset, inputs=("h1",), output="h2"),
        Elementwise(
            "flip",
            "sub",
            torch.tensor(1.0, dtype=dtype),
            constant_first=True,
            inputs=("h2",),
            output="h3",
        ),
        Binary("gate", "mul", inputs=("h0", "h3"), output="g"),
        Binary("diff", "sub", inputs=("g", "h0"), output="d"),
        Elementwise("halve", "div", torch.tensor(2.0, dtype=dtype), inputs=("d",), output="d2"),
        Elementwise("centre", "sub", offset, inputs=("d2",), output="d3"),
        Concat("cat", 1, inputs=("d3", "h1"), output="c"),
        Slice("pick", 1, 0, 16, 3, inputs=("c",), output="s"),
        Activation("clip", "clip", low=-1.0, high=1.0, inputs=("s",), output="k"),
        Slice("first", 1, 0, 1, inputs=("h1",), output="h1_0"),
        Binary("shift", "add", inputs=("k", "h1_0"), output="k2"),  # broadcast (6,) + (1,)
        Linear("head", "head.weight", "head.bias", inputs=("k2",), output="logits"),
    )
    return Graph(ops, parameters, "x", (6,), "logits", 3)
