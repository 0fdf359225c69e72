"""Small ONNX classifiers for the front-end tests, and broken files for its rejection paths.

Torch models are exported with both of torch's exporters: the legacy TorchScript one
(`dynamo=False`) and the torch.export one (`dynamo=True`), each with a symbolic batch axis.
Other models are written directly with `onnx.helper` to reach patterns neither exporter emits.
Builders never touch global torch state: they build and seed inside `torch.random.fork_rng`.
Test modules that export apply EXPORT_WARNING_FILTERS as `pytest.mark.filterwarnings` marks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

EXPORT_BATCH = 2
"""Batch size of the example input used for export; tests run other batch sizes."""

Exporter = Literal["legacy", "dynamo", "helper"]
EXPORTERS: tuple[Exporter, ...] = ("legacy", "dynamo")


@dataclass(frozen=True)
class ZooModel:
    """One exported model: where it lies and how it was made."""

    name: str
    exporter: Exporter
    path: Path

    @property
    def id(self) -> str:
        """Test id, e.g. `mlp-dynamo`."""
        return f"{self.name}-{self.exporter}"


# ---------------------------------------------------------------------- torch models
def random_batchnorm(channels: int, dims: int = 2) -> nn.Module:
    """A BatchNorm with non-trivial affine parameters and running statistics."""
    bn = nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
    return bn


class _Normalised(nn.Module):
    """(x - mean) / std with per-channel constants, then a CNN head."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.2, 0.3]).reshape(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv((x - self.mean) / self.std))
        return self.head(h.flatten(1))


class _ViewBatch(nn.Module):
    """x.view(x.size(0), -1): a Shape-based reshape in the legacy exporter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def split_mnist_cnn() -> nn.Module:
    """The paper's Split-MNIST CNN on 1x28x28 inputs (576 features before the head)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 1, 5, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(576, 10),
    )


TORCH_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), (6,)),
    "mlp_sigmoid_tanh": (
        lambda: nn.Sequential(
            nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)
        ),
        (6,),
    ),
    "cnn_geometry": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, groups=2, padding=(1, 0), bias=False),
            _ViewBatch(),
            nn.Linear(4 * 5 * 3, 3),
        ),
        (2, 9, 10),
    ),
    "conv_batchnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3),
            random_batchnorm(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 6 * 6, 4),
        ),
        (1, 8, 8),
    ),
    "linear_batchnorm": (
        lambda: nn.Sequential(
            nn.Linear(6, 8),
            random_batchnorm(8, dims=1),
            nn.ReLU(),
            nn.Linear(8, 3),
            random_batchnorm(3, dims=1),
        ),
        (6,),
    ),
    "pooling": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.ReLU(),
            nn.AvgPool2d(2, padding=1, count_include_pad=False),
            nn.AvgPool2d(2, stride=1, padding=1),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        ),
        (1, 10, 10),
    ),
    "normalised_input": (_Normalised, (3, 6, 6)),
    "split_mnist_cnn": (split_mnist_cnn, (1, 28, 28)),
}


EXPORT_WARNING_FILTERS = (
    # attributed to the caller's module, so pyproject's torch.onnx.* module filter misses it
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    # raised by torch.export internals (attributed to copyreg) during dynamo export
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
)
"""pytest filterwarnings entries for what the exporters emit beyond pyproject's filters."""


def export_module(
    factory: Callable[[], nn.Module],
    sample_shape: tuple[int, ...],
    path: Path,
    *,
    dynamo: bool,
    seed: int = 0,
) -> Path:
    """Build factory() (seeded, eval mode) and export it to `path` with either exporter.

    Args:
        factory: builds the torch module.
        sample_shape: per-sample input shape.
        path: the .onnx file to write.
        dynamo: torch.export (True) or the legacy TorchScript exporter (False).
        seed: seed of the weights and the example input.

    Returns:
        `path`; input "input" of shape (batch, ...), output "logits".
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory().eval()
        x = torch.randn(EXPORT_BATCH, *sample_shape)
        if dynamo:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    return path


def export_torch(name: str, exporter: Exporter, folder: Path, *, seed: int = 0) -> ZooModel:
    """Build TORCH_MODELS[name] (seeded, eval mode) and export it to `folder`.

    Args:
        name: key of TORCH_MODELS.
        exporter: "legacy" (TorchScript, `dynamo=False`) or "dynamo" (torch.export).
        folder: where the .onnx file goes.
        seed: seed of the weights and the example input.

    Returns:
        The exported model; input "input" of shape (batch, ...), output "logits".
    """
    factory, sample_shape = TORCH_MODELS[name]
    path = folder / f"{name}-{exporter}.onnx"
    export_module(factory, sample_shape, path, dynamo=exporter == "dynamo", seed=seed)
    return ZooModel(name, exporter, path)


# ---------------------------------------------------------------------- onnx.helper models
def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _vector_io(n_in: int, n_out: int) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out]),
    )


def save_helper_model(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto],
    path: Path,
    *,
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    opset: int = 17,
    ir_version: int = 8,
    check: bool = True,
) -> Path:
    """Write a single-graph model made with onnx.helper (checked unless check=False)."""
    default_in, default_out = _vector_io(4, 3)
    graph = helper.make_graph(
        nodes,
        path.stem,
        inputs or [default_in],
        outputs or [default_out],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def matmul_add_reversed(path: Path) -> Path:
    """offset - x (constant first), x * factor, then MatMul and Add(bias, h) with the bias
    first, then MatMul and Add(h, bias)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Sub", ["offset", "input"], ["centred"], name="sub_from_offset"),
        helper.make_node("Mul", ["centred", "factor"], ["scaled"], name="mul_factor"),
        helper.make_node("MatMul", ["scaled", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["b1", "h1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        helper.make_node("Add", ["h2", "b2"], ["logits"], name="add2"),
    ]
    inits = [_init("w1", (4, 5), rng), _init("b1", (5,), rng)]
    inits += [_init("w2", (5, 3), rng), _init("b2", (3,), rng)]
    inits += [_init("offset", (4,), rng), _init("factor", (1, 4), rng)]
    return save_helper_model(nodes, inits, path)


def gemm_alpha_beta(path: Path) -> Path:
    """Gemm with transB=0 and alpha/beta != 1, then Gemm with transB=1 and a (1, n) bias."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node(
            "Gemm", ["input", "w1", "b1"], ["h1"], name="gemm1", alpha=0.5, beta=2.0, transB=0
        ),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node(
            "Gemm", ["r1", "w2", "b2"], ["logits"], name="gemm2", alpha=1.5, beta=0.25, transB=1
        ),
    ]
    inits = [_init("w1", (4, 5), rng), _init("b1", (5,), rng)]
    inits += [_init("w2", (3, 5), rng), _init("b2", (1, 3), rng)]
    return save_helper_model(nodes, inits, path)


def constant_node_weights(path: Path) -> Path:
    """Weights and biases given as Constant nodes, one of them as value_floats."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((5, 4)).astype(np.float32)
    w2 = rng.standard_normal((3, 5)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Constant", [], ["w1"], name="const_w1", value=numpy_helper.from_array(w1)
        ),
        helper.make_node(
            "Constant", [], ["b1"], name="const_b1", value_floats=[0.1, -0.2, 0.3, 0.0, 0.5]
        ),
        helper.make_node(
            "Constant", [], ["w2"], name="const_w2", value=numpy_helper.from_array(w2)
        ),
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"], name="gemm1", transB=1),
        helper.make_node("Tanh", ["h1"], ["t1"], name="tanh1"),
        helper.make_node("Gemm", ["t1", "w2"], ["logits"], name="gemm2", transB=1),
    ]
    return save_helper_model(nodes, [], path)


def folded_constants(path: Path) -> Path:
    """A float16 weight behind Cast, a weight behind Transpose, an Identity-ed bias, Dropout."""
    rng = np.random.default_rng(4)
    w1_half = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float16), "w1_half")
    nodes = [
        helper.make_node("Cast", ["w1_half"], ["w1"], name="cast_w1", to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["input", "w1", "b1_alias"], ["h1"], name="gemm1", transB=1),
        helper.make_node("Identity", ["b1"], ["b1_alias"], name="alias_b1"),
        helper.make_node("Dropout", ["h1"], ["d1"], name="dropout1"),
        helper.make_node("Sigmoid", ["d1"], ["s1"], name="sigmoid1"),
        helper.make_node("Transpose", ["w2_out_in"], ["w2"], name="transpose_w2", perm=[1, 0]),
        helper.make_node("MatMul", ["s1", "w2"], ["h2"], name="mm2"),
        helper.make_node("Add", ["h2", "b2"], ["logits"], name="add2"),
    ]
    inits = [w1_half, _init("b1", (5,), rng), _init("w2_out_in", (3, 5), rng)]
    inits += [_init("b2", (3,), rng)]
    # Identity must come before its user: keep a topological order
    nodes = [nodes[0], nodes[2], nodes[1], *nodes[3:5], nodes[5], *nodes[6:]]
    return save_helper_model(nodes, inits, path)


def conv_same_global_pool(path: Path) -> Path:
    """Conv with auto_pad SAME_UPPER, a BatchNormalization with no affine op before it
    (after a Relu), GlobalAveragePool, Squeeze of the spatial axes, Unsqueeze, Flatten, Gemm."""
    rng = np.random.default_rng(5)
    bn = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 3).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.uniform(-1, 1, 3).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(rng.uniform(-1, 1, 3).astype(np.float32), "bn_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "bn_var"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "cw", "cb"], ["c"], name="conv", strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node(
            "BatchNormalization",
            ["r", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
            ["n"],
            name="bn",
            epsilon=1e-3,
        ),
        helper.make_node("GlobalAveragePool", ["n"], ["g"], name="gap"),
        helper.make_node("Squeeze", ["g", "axes"], ["s"], name="squeeze"),
        helper.make_node("Unsqueeze", ["s", "axis1"], ["u"], name="unsqueeze"),
        helper.make_node("Flatten", ["u"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("cw", (3, 2, 3, 3), rng), _init("cb", (3,), rng), *bn]
    inits += [numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")]
    inits += [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    inits += [_init("fw", (4, 3), rng), _init("fb", (4,), rng)]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 7, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])]
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs)


def old_ir_initializer_inputs(path: Path) -> Path:
    """IR version 3: initializers are listed as graph inputs too (they must not count)."""
    rng = np.random.default_rng(6)
    inits = [_init("w", (3, 4), rng), _init("b", (3,), rng)]
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="gemm", transB=1)]
    inputs = [_vector_io(4, 3)[0]]
    inputs += [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits
    ]
    return save_helper_model(nodes, inits, path, inputs=inputs, opset=8, ir_version=3)


HELPER_MODELS: dict[str, Callable[[Path], Path]] = {
    "matmul_add_reversed": matmul_add_reversed,
    "gemm_alpha_beta": gemm_alpha_beta,
    "constant_node_weights": constant_node_weights,
    "folded_constants": folded_constants,
    "conv_same_global_pool": conv_same_global_pool,
    "old_ir_initializer_inputs": old_ir_initializer_inputs,
}

CONVERTS_DTYPE = {"folded_constants"}
"""Zoo models with a non-float32 weight: loading them warns that it is converted."""

ZOO_IDS: list[str] = [f"{n}-{e}" for n in TORCH_MODELS for e in EXPORTERS] + [
    f"{n}-helper" for n in HELPER_MODELS
]


def build_zoo(folder: Path, ids: list[str] | None = None) -> dict[str, ZooModel]:
    """Export (or write) every zoo model named in `ids` (default: all) into `folder`."""
    zoo: dict[str, ZooModel] = {}
    for model_id in ids or ZOO_IDS:
        name, exporter = model_id.rsplit("-", 1)
        if exporter == "helper":
            zoo[model_id] = ZooModel(name, "helper", HELPER_MODELS[name](folder / f"{name}.onnx"))
        else:
            zoo[model_id] = export_torch(name, exporter, folder)  # type: ignore[arg-type]
    return zoo


# ---------------------------------------------------------------------- broken files
def _valid_bytes() -> bytes:
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="gemm", transB=1)]
    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        nodes,
        "g",
        *[[v] for v in _vector_io(4, 3)],
        [_init("w", (3, 4), rng), _init("b", (3,), rng)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _gemm_chain(
    path: Path,
    middle: list[onnx.NodeProto],
    *,
    extra_inits: tuple[TensorProto, ...] = (),
    outputs: list[onnx.ValueInfoProto] | None = None,
) -> Path:
    """input -> gemm1 -> h1 -> <middle nodes> -> m -> gemm2 -> logits."""
    rng = np.random.default_rng(8)
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"], name="gemm1", transB=1),
        *middle,
        helper.make_node("Gemm", ["m", "w2", "b2"], ["logits"], name="gemm2", transB=1),
    ]
    inits = [_init("w1", (5, 4), rng), _init("b1", (5,), rng)]
    inits += [_init("w2", (3, 5), rng), _init("b2", (3,), rng), *extra_inits]
    return save_helper_model(nodes, inits, path, outputs=outputs)


def _nan_weight(path: Path) -> Path:
    rng = np.random.default_rng(9)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    w[1, 2] = np.nan
    nodes = [helper.make_node("Gemm", ["input", "w_nan", "b"], ["logits"], name="gemm", transB=1)]
    inits = [numpy_helper.from_array(w, "w_nan"), _init("b", (3,), rng)]
    return save_helper_model(nodes, inits, path)


def _two_inputs(path: Path) -> Path:
    rng = np.random.default_rng(10)
    nodes = [
        helper.make_node("Add", ["input", "other"], ["s"], name="add_inputs"),
        helper.make_node("Gemm", ["s", "w", "b"], ["logits"], name="gemm", transB=1),
    ]
    inputs = [_vector_io(4, 3)[0]]
    inputs += [helper.make_tensor_value_info("other", TensorProto.FLOAT, ["batch", 4])]
    inits = [_init("w", (3, 4), rng), _init("b", (3,), rng)]
    return save_helper_model(nodes, inits, path, inputs=inputs)


def _two_outputs(path: Path) -> Path:
    outputs = [
        helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 5]),
        _vector_io(4, 3)[1],
    ]
    relu = [helper.make_node("Relu", ["h1"], ["m"], name="relu")]
    return _gemm_chain(path, relu, outputs=outputs)


def _symbolic_feature_axis(path: Path) -> Path:
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "features"])]
    nodes = [helper.make_node("Relu", ["input"], ["logits"], name="relu")]
    return save_helper_model(nodes, [], path, inputs=inputs)


def _no_input_shape(path: Path) -> Path:
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, None)]
    nodes = [helper.make_node("Relu", ["input"], ["logits"], name="relu")]
    return save_helper_model(nodes, [], path, inputs=inputs, check=False)


def _input_rank_1(path: Path) -> Path:
    """A rank-1 input has no batch axis (see verifier.onnx.importer), so its one axis must be
    fixed: a symbolic one is refused."""
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch"])]
    nodes = [helper.make_node("Relu", ["input"], ["logits"], name="relu")]
    return save_helper_model(nodes, [], path, inputs=inputs, outputs=outputs)


def _output_not_2d(path: Path) -> Path:
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["input", "cw"], ["logits"], name="conv")]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 5, 5])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 3, 3])]
    return save_helper_model(
        nodes, [_init("cw", (2, 1, 3, 3), rng)], path, inputs=inputs, outputs=outputs
    )


def _lstm(path: Path) -> Path:
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("LSTM", ["input", "W", "R"], ["y"], name="lstm", hidden_size=3),
        helper.make_node("Flatten", ["y"], ["logits"], name="flatten"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])]
    inits = [_init("W", (1, 12, 4), rng), _init("R", (1, 12, 3), rng)]
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs)


def _mixing_reshape(path: Path) -> Path:
    shape = numpy_helper.from_array(np.array([-1, 10], dtype=np.int64), "shape")
    middle = [
        helper.make_node("Reshape", ["h1", "shape"], ["m0"], name="reshape_mix"),
        helper.make_node("Relu", ["m0"], ["m1"], name="relu"),
        helper.make_node("Reshape", ["m1", "back"], ["m"], name="reshape_back"),
    ]
    back = numpy_helper.from_array(np.array([-1, 5], dtype=np.int64), "back")
    return _gemm_chain(path, middle, extra_inits=(shape, back))


def _ints(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _unknown_opset(path: Path) -> Path:
    """A valid Gemm model that declares opset 99, which no onnx release defines."""
    rng = np.random.default_rng(16)
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="gemm", transB=1)]
    inits = [_init("w", (3, 4), rng), _init("b", (3,), rng)]
    return save_helper_model(nodes, inits, path, opset=99, check=False)


def _cycle(path: Path) -> Path:
    """relu_a reads the output of relu_b, which reads relu_a's: no topological order exists."""
    nodes = [
        helper.make_node("Add", ["input", "b"], ["a"], name="add_a"),
        helper.make_node("Relu", ["a"], ["b"], name="relu_b"),
        helper.make_node("Gemm", ["a", "w", "bias"], ["logits"], name="gemm", transB=1),
    ]
    rng = np.random.default_rng(14)
    inits = [_init("w", (3, 4), rng), _init("bias", (3,), rng)]
    return save_helper_model(nodes, inits, path, check=False)


def _dangling_output(path: Path) -> Path:
    """The graph output 'logits' is produced by no node."""
    rng = np.random.default_rng(15)
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["h"], name="gemm", transB=1)]
    inits = [_init("w", (3, 4), rng), _init("b", (3,), rng)]
    return save_helper_model(nodes, inits, path, check=False)


def _value_dependent_shape(path: Path) -> Path:
    """Reshape to a shape read from the values of a computed tensor."""
    middle = [
        helper.make_node("Cast", ["h1"], ["h1_int"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Reshape", ["h1", "h1_int"], ["m"], name="reshape_by_value"),
    ]
    return _gemm_chain(path, middle)


BAD_MODELS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda folder: folder / "missing.onnx", "no such file"),
    "directory": (lambda folder: folder, "not a file"),
    "empty": (lambda folder: _write(folder / "empty.onnx", b""), "empty"),
    "truncated": (
        lambda folder: _write(folder / "truncated.onnx", _valid_bytes()[:-25]),
        "truncated|not ONNX|checker",
    ),
    "random_bytes": (
        lambda folder: _write(folder / "random.onnx", np.random.default_rng(0).bytes(4096)),
        "not a readable ONNX model|checker|no ONNX graph",
    ),
    "checker_failure": (
        lambda folder: save_helper_model(
            [helper.make_node("Relu", ["undefined"], ["logits"], name="relu")],
            [],
            folder / "unchecked.onnx",
            check=False,
        ),
        "checker rejects",
    ),
    "softmax_in_middle": (
        lambda folder: _gemm_chain(
            folder / "softmax.onnx",
            [helper.make_node("Softmax", ["h1"], ["m"], name="softmax_mid", axis=1)],
        ),
        "softmax_mid.*Softmax",
    ),
    "lstm": (lambda folder: _lstm(folder / "lstm.onnx"), "'lstm' \\(LSTM\\)"),
    "nan_weight": (lambda folder: _nan_weight(folder / "nan.onnx"), "'w_nan'.*NaN"),
    "two_inputs": (lambda folder: _two_inputs(folder / "two_inputs.onnx"), "exactly one input"),
    "two_outputs": (
        lambda folder: _two_outputs(folder / "two_outputs.onnx"),
        "exactly one output",
    ),
    "symbolic_feature_axis": (
        lambda folder: _symbolic_feature_axis(folder / "symbolic.onnx"),
        "axis 1 is 'features'",
    ),
    "no_input_shape": (
        lambda folder: _no_input_shape(folder / "no_shape.onnx"),
        "shape is unknown|checker rejects",
    ),
    "input_rank_1": (
        lambda folder: _input_rank_1(folder / "rank1.onnx"),
        "no batch axis.*axis 0 is 'batch'",
    ),
    "output_not_2d": (lambda folder: _output_not_2d(folder / "out4d.onnx"), "rank 4"),
    "divided_branches": (
        lambda folder: _gemm_chain(
            folder / "branch_div.onnx",
            [
                helper.make_node("Relu", ["h1"], ["r"], name="relu"),
                helper.make_node("Div", ["h1", "r"], ["m"], name="branch_div"),
            ],
        ),
        "'branch_div' \\(Div\\): divides two computed tensors",
    ),
    "cycle": (lambda folder: _cycle(folder / "cycle.onnx"), "checker rejects.*topologically"),
    "unknown_opset": (
        lambda folder: _unknown_opset(folder / "opset99.onnx"),
        r"declares ONNX opset 99; this installation supports opsets 1 to \d+",
    ),
    "dangling_output": (
        lambda folder: _dangling_output(folder / "dangling.onnx"),
        "checker rejects.*'logits' is not an output of any node",
    ),
    "value_dependent_shape": (
        lambda folder: _value_dependent_shape(folder / "value_shape.onnx"),
        "'reshape_by_value'.*shape cannot be resolved",
    ),
    "reflect_pad": (
        lambda folder: _gemm_chain(
            folder / "reflect.onnx",
            [
                helper.make_node("Pad", ["h1", "pads"], ["p"], name="pad_reflect", mode="reflect"),
                helper.make_node("Slice", ["p", "start", "end", "axis1"], ["m"], name="crop"),
            ],
            extra_inits=(
                _ints("pads", [0, 1, 0, 1]),
                _ints("start", [1]),
                _ints("end", [6]),
                _ints("axis1", [1]),
            ),
        ),
        "'pad_reflect' \\(Pad\\): mode 'reflect' is not supported",
    ),
    "batch_misaligned_broadcast": (
        lambda folder: _gemm_chain(
            folder / "misaligned.onnx",
            [
                helper.make_node("Unsqueeze", ["h1", "axis2"], ["u"], name="unsqueeze"),
                helper.make_node("Add", ["u", "h1"], ["a"], name="add_misaligned"),
                helper.make_node("Flatten", ["a"], ["m"], name="flatten"),
            ],
            extra_inits=(_ints("axis2", [2]),),
        ),
        "'add_misaligned'.*align the batch axis",
    ),
    "transpose_batch_axis": (
        lambda folder: _gemm_chain(
            folder / "transpose_batch.onnx",
            [helper.make_node("Transpose", ["h1"], ["m"], name="swap_batch", perm=[1, 0])],
        ),
        "'swap_batch'.*moves the batch axis",
    ),
    "transA": (
        lambda folder: save_helper_model(
            [helper.make_node("Gemm", ["input", "w"], ["logits"], name="gemm_ta", transA=1)],
            [_init("w", (2, 3), np.random.default_rng(13))],
            folder / "transa.onnx",
            inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4])],
            outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 3])],
        ),
        "transA",
    ),
    "mixing_reshape": (
        lambda folder: _mixing_reshape(folder / "mixing.onnx"),
        "reshape_mix.*batch axis",
    ),
}
"""name -> (writes the bad file into a folder and returns its path, regex the message matches)."""
