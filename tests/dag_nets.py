"""Small random DAG graphs (residual, concatenating, transposing) built from `verifier.graph`.

Every op names the tensors it reads and writes, as the ONNX importer builds them; parameters are
float64 by default and named like initializers (`<layer>.weight`, `<layer>.bias`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from verifier.graph import (
    Activation,
    Binary,
    Concat,
    Conv,
    Graph,
    Linear,
    Pad,
    Pool,
    Reshape,
    Slice,
    Transpose,
)


def _randn(gen: torch.Generator, dtype: torch.dtype, *shape: int, fan_in: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype) * (2.0 / fan_in) ** 0.5


def residual_mlp(gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Graph:
    """x(6) -> fc0 -> relu = h; h + fc2(relu(fc1 h)) -> relu -> (h2 - fc3 h2)... -> head(3).

    Two residual adds and one residual subtraction; `h` is read by three ops.
    """
    params = {
        "fc0.weight": _randn(gen, dtype, 8, 6, fan_in=6),
        "fc0.bias": _randn(gen, dtype, 8, fan_in=8),
        "fc1.weight": _randn(gen, dtype, 8, 8, fan_in=8),
        "fc1.bias": _randn(gen, dtype, 8, fan_in=8),
        "fc2.weight": _randn(gen, dtype, 8, 8, fan_in=8),
        "fc2.bias": _randn(gen, dtype, 8, fan_in=8),
        "fc3.weight": _randn(gen, dtype, 8, 8, fan_in=8),
        "head.weight": _randn(gen, dtype, 3, 8, fan_in=8),
        "head.bias": _randn(gen, dtype, 3, fan_in=3),
    }
    ops = (
        Linear("fc0", "fc0.weight", "fc0.bias", inputs=("x",), output="a0"),
        Activation("relu0", "relu", inputs=("a0",), output="h"),
        Linear("fc1", "fc1.weight", "fc1.bias", inputs=("h",), output="a1"),
        Activation("relu1", "relu", inputs=("a1",), output="h1"),
        Linear("fc2", "fc2.weight", "fc2.bias", inputs=("h1",), output="a2"),
        Binary("add0", "add", inputs=("h", "a2"), output="s"),
        Activation("relu2", "relu", inputs=("s",), output="h2"),
        Linear("fc3", "fc3.weight", None, inputs=("h2",), output="a3"),
        Binary("sub0", "sub", inputs=("h2", "a3"), output="d"),
        Binary("add1", "add", inputs=("d", "h"), output="e"),
        Activation("tanh0", "tanh", inputs=("e",), output="h3"),
        Linear("head", "head.weight", "head.bias", inputs=("h3",), output="logits"),
    )
    return Graph(ops, params, "x", (6,), "logits", 3)


def concat_mlp(gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Graph:
    """Two branches (ReLU and LeakyReLU) of x(5), concatenated, sliced, clipped, multiplied."""
    params = {
        "left.weight": _randn(gen, dtype, 4, 5, fan_in=5),
        "left.bias": _randn(gen, dtype, 4, fan_in=4),
        "right.weight": _randn(gen, dtype, 6, 5, fan_in=5),
        "head.weight": _randn(gen, dtype, 3, 10, fan_in=10),
        "head.bias": _randn(gen, dtype, 3, fan_in=3),
    }
    ops = (
        Linear("left", "left.weight", "left.bias", inputs=("x",), output="l0"),
        Activation("relu", "relu", inputs=("l0",), output="l1"),
        Linear("right", "right.weight", None, inputs=("x",), output="r0"),
        Activation("leaky", "leaky_relu", alpha=0.1, inputs=("r0",), output="r1"),
        Concat("cat", 1, inputs=("l1", "r1"), output="c"),
        Slice("first", 1, 0, 5, inputs=("c",), output="c0"),
        Slice("rest", 1, 5, 10, inputs=("c",), output="c1"),
        Activation("clip", "clip", low=-0.5, high=1.0, inputs=("c1",), output="c2"),
        Binary("gate", "mul", inputs=("c0", "c2"), output="g"),
        Concat("cat2", 1, inputs=("g", "c1"), output="f"),
        Linear("head", "head.weight", "head.bias", inputs=("f",), output="logits"),
    )
    return Graph(ops, params, "x", (5,), "logits", 3)


def residual_cnn(gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Graph:
    """NHWC input (6, 6, 2) -> Transpose -> Pad -> Conv -> ReLU -> Conv + skip -> pool -> head."""
    params = {
        "c1.weight": _randn(gen, dtype, 3, 2, 3, 3, fan_in=18),
        "c1.bias": _randn(gen, dtype, 3, fan_in=3),
        "c2.weight": _randn(gen, dtype, 3, 3, 3, 3, fan_in=27),
        "c2.bias": _randn(gen, dtype, 3, fan_in=3),
        "head.weight": _randn(gen, dtype, 3, 12, fan_in=12),
        "head.bias": _randn(gen, dtype, 3, fan_in=3),
    }
    ops = (
        Transpose("nchw", (0, 3, 1, 2), inputs=("x",), output="t"),
        Pad("pad", (1, 1, 1, 1), inputs=("t",), output="p"),
        Conv("c1", "c1.weight", "c1.bias", inputs=("p",), output="a1"),
        Activation("relu1", "relu", inputs=("a1",), output="h1"),
        Conv("c2", "c2.weight", "c2.bias", pads=(1, 1, 1, 1), inputs=("h1",), output="a2"),
        Binary("skip", "add", inputs=("a2", "h1"), output="s"),
        Activation("relu2", "relu", inputs=("s",), output="h2"),
        Pool("pool", "average", (3, 3), (3, 3), inputs=("h2",), output="q"),
        Reshape("flat", (12,), inputs=("q",), output="f"),
        Linear("head", "head.weight", "head.bias", inputs=("f",), output="logits"),
    )
    return Graph(ops, params, "x", (6, 6, 2), "logits", 3)


DAG_NETS = {"residual-mlp": residual_mlp, "concat-mlp": concat_mlp, "residual-cnn": residual_cnn}
"""Name -> builder(generator, dtype) of every DAG test net."""
