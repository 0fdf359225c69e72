"""ONNX classifiers that are DAGs, not chains, for the graph-import tests (issue 18).

Torch models (ResNet-style blocks, parallel branches, a residual MLP, Clip / LeakyReLU, Split and
Slice, an unbatched CNN) are exported with the legacy TorchScript exporter (`dynamo=False`) and,
where the name says so, with torch.export (`dynamo=True`), like `tests.model_zoo`. Other models
are written with `onnx.helper` to reach what neither exporter emits: an NHWC CNN the way tf2onnx
writes Keras CNNs, Pad + Conv, an MLP without batch axis, old-opset Clip and Split.
Builders never touch global torch state: they build and seed inside `torch.random.fork_rng`.
Test modules that export apply `tests.model_zoo.EXPORT_WARNING_FILTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests.model_zoo import EXPORT_BATCH, export_module, random_batchnorm, save_helper_model


@dataclass(frozen=True)
class DagModel:
    """One model file of the zoo.

    Attributes:
        id: test id, e.g. `resnet-dynamo`.
        path: the .onnx file.
        batched: whether the ONNX input has a batch axis first (else onnxruntime runs it on one
            sample at a time).
    """

    id: str
    path: Path
    batched: bool = True


# ---------------------------------------------------------------------- torch models
class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a skip: the identity, or a strided 1x1 conv + bn."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = random_batchnorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = random_batchnorm(c_out)
        self.down: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), random_batchnorm(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """A stem, an identity block, a downsampling block, global average pool and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = BasicBlock(4, 4, 1)
        self.layer2 = BasicBlock(4, 8, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(h), 1))


class Branches(nn.Module):
    """Two parallel Linear/ReLU branches of one input, concatenated, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(6, 5)
        self.right = nn.Linear(6, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.head(both)


class ResidualMLP(nn.Module):
    """h = W0 x; h + relu(W1 h); then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return self.head(h + torch.relu(self.block(h)))


class ClipLeaky(nn.Module):
    """ReLU6 and Hardtanh (Clip), LeakyReLU, and a residual difference."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(3.0 * self.a(x))
        g = nn.functional.leaky_relu(self.b(h), 0.1)
        return self.head(nn.functional.hardtanh(g - h, -1.0, 1.0))


class SplitSlice(nn.Module):
    """chunk (Split) into two halves, a strided Slice, a product of halves and a Concat."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        left, right = h.chunk(2, dim=1)
        return self.head(torch.cat([left * right, h[:, 1:7:2]], dim=1))


class UnbatchedCNN(nn.Module):
    """One (1, 8, 8) image, no batch axis: torch exports Unsqueeze, Conv, Squeeze."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten())


TORCH_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet": (ResNet, (3, 8, 8)),
    "branches": (Branches, (6,)),
    "residual_mlp": (ResidualMLP, (6,)),
    "clip_leaky": (ClipLeaky, (6,)),
    "split_slice": (SplitSlice, (6,)),
}
DYNAMO_MODELS = ("resnet", "residual_mlp", "split_slice")
"""The torch models also exported with torch.export (slower), the others legacy only."""


def export_torch(name: str, dynamo: bool, folder: Path, *, seed: int = 0) -> DagModel:
    """Build TORCH_MODELS[name] (seeded, eval mode) and export it to `folder`.

    Args:
        name: key of TORCH_MODELS.
        dynamo: torch.export (True) or the legacy TorchScript exporter (False).
        folder: where the .onnx file goes.
        seed: seed of the weights and the example input.

    Returns:
        The model; input "input" of shape (batch, ...), output "logits".
    """
    factory, sample_shape = TORCH_MODELS[name]
    exporter = "dynamo" if dynamo else "legacy"
    path = folder / f"{name}-{exporter}.onnx"
    export_module(factory, sample_shape, path, dynamo=dynamo, seed=seed)
    return DagModel(f"{name}-{exporter}", path)


def resnet_unfolded(folder: Path) -> DagModel:
    """The ResNet exported without constant folding: BatchNormalization nodes stay in the file
    (the importer folds them into the preceding Conv)."""
    path = folder / "resnet_unfolded-legacy.onnx"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = ResNet().eval()
        torch.onnx.export(
            model,
            (torch.randn(EXPORT_BATCH, 3, 8, 8),),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return DagModel("resnet_unfolded-legacy", path)


def unbatched_cnn(folder: Path) -> DagModel:
    """UnbatchedCNN exported on one (1, 8, 8) image: the ONNX input has no batch axis."""
    path = folder / "unbatched_cnn-legacy.onnx"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = UnbatchedCNN().eval()
        torch.onnx.export(
            model,
            (torch.randn(1, 8, 8),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
        )
    return DagModel("unbatched_cnn-legacy", path, batched=False)


# ---------------------------------------------------------------------- onnx.helper models
def _init(
    name: str, shape: tuple[int, ...], rng: np.random.Generator, *, fan_in: int | None = None
) -> TensorProto:
    """Normal entries scaled by 1/sqrt(fan_in), so that logits stay of order 1."""
    scale = 1.0 / np.sqrt(fan_in) if fan_in else 1.0
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def _ints(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _io(
    input_shape: list[int | str], output_shape: list[int | str]
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    return (
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_shape)],
    )


NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def nhwc_cnn(path: Path) -> Path:
    """A Keras CNN as tf2onnx writes it: NHWC input, a Transpose to NCHW before every Conv and
    pool and back after (one back-and-forth pair with nothing in between), a per-channel Add in
    NHWC, Reshape, then MatMul + Add heads."""
    rng = np.random.default_rng(20)
    t = helper.make_node
    nodes = [
        t("Transpose", ["input"], ["x_nchw"], name="conv1/to_nchw", perm=NCHW),
        t("Conv", ["x_nchw", "conv1/kernel", "conv1/bias"], ["c1"], name="conv1", pads=[1] * 4),
        t("Transpose", ["c1"], ["c1_nhwc"], name="conv1/to_nhwc", perm=NHWC),
        t("Relu", ["c1_nhwc"], ["r1"], name="relu1"),
        t("Transpose", ["r1"], ["r1_nchw"], name="conv2/to_nchw", perm=NCHW),
        t("Conv", ["r1_nchw", "conv2/kernel", "conv2/bias"], ["c2"], name="conv2"),
        t("Transpose", ["c2"], ["c2_nhwc"], name="conv2/to_nhwc", perm=NHWC),
        t("Transpose", ["c2_nhwc"], ["c2_nchw"], name="pool/to_nchw", perm=NCHW),
        t("MaxPool", ["c2_nchw"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        t("Transpose", ["p"], ["p_nhwc"], name="pool/to_nhwc", perm=NHWC),
        t("Add", ["p_nhwc", "channel_shift"], ["shifted"], name="shift"),
        t("Relu", ["shifted"], ["r2"], name="relu2"),
        t("Reshape", ["r2", "flat_shape"], ["flat"], name="flatten"),
        t("MatMul", ["flat", "dense/kernel"], ["d1"], name="dense/MatMul"),
        t("Add", ["d1", "dense/bias"], ["d1b"], name="dense/BiasAdd"),
        t("Relu", ["d1b"], ["r3"], name="relu3"),
        t("MatMul", ["r3", "out/kernel"], ["d2"], name="out/MatMul"),
        t("Add", ["d2", "out/bias"], ["logits"], name="out/BiasAdd"),
    ]
    inits = [_init("conv1/kernel", (4, 1, 3, 3), rng, fan_in=9), _init("conv1/bias", (4,), rng)]
    inits += [_init("conv2/kernel", (6, 4, 3, 3), rng, fan_in=36), _init("conv2/bias", (6,), rng)]
    inits += [_init("channel_shift", (6,), rng), _ints("flat_shape", [-1, 3 * 3 * 6])]
    inits += [_init("dense/kernel", (54, 10), rng, fan_in=54), _init("dense/bias", (10,), rng)]
    inits += [_init("out/kernel", (10, 4), rng, fan_in=10), _init("out/bias", (4,), rng)]
    inputs, outputs = _io(["N", 8, 8, 1], ["N", 4])
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs, opset=13)


def pad_conv(path: Path) -> Path:
    """A zero Pad (pads from a constant input) folded into the next Conv; a Pad with a non-zero
    value and an opset-18 `axes` input that stays a Pad op; a zero Pad read by two nodes."""
    rng = np.random.default_rng(21)
    t = helper.make_node
    nodes = [
        t("Pad", ["input", "pads1"], ["p1"], name="pad_zero"),
        t("Conv", ["p1", "w1", "b1"], ["c1"], name="conv1", strides=[2, 2]),
        t("Relu", ["c1"], ["r1"], name="relu1"),
        t("Pad", ["r1", "pads2", "half", "hw"], ["p2"], name="pad_half"),
        t("Conv", ["p2", "w2"], ["c2"], name="conv2", pads=[0, 1, 0, 1]),
        t("Pad", ["c2", "pads3"], ["p3"], name="pad_shared"),
        t("Conv", ["p3", "w3"], ["c3"], name="conv3"),
        t("Relu", ["p3"], ["r3"], name="relu3"),
        t("GlobalAveragePool", ["r3"], ["g3"], name="gap3"),
        t("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        t("Add", ["g", "g3"], ["gg"], name="add"),
        t("Flatten", ["gg"], ["f"], name="flatten"),
        t("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    inits = [_ints("pads1", [0, 0, 1, 2, 0, 0, 2, 1]), _init("w1", (3, 2, 3, 3), rng, fan_in=18)]
    inits += [_init("b1", (3,), rng), _ints("pads2", [1, 0, 0, 1]), _ints("hw", [2, 3])]
    inits += [numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")]
    inits += [_init("w2", (3, 3, 2, 2), rng, fan_in=12), _ints("pads3", [0, 0, 1, 1, 0, 0, 1, 1])]
    inits += [
        _init("w3", (3, 3, 3, 3), rng, fan_in=27),
        _init("fw", (4, 3), rng),
        _init("fb", (4,), rng),
    ]
    inputs, outputs = _io(["N", 2, 9, 8], ["N", 4])
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs, opset=18)


def unbatched_mlp(path: Path) -> Path:
    """Input (20,), no batch axis: (x - mean) @ W1 + b1, Relu, @ W2 + b2 -> (10,)."""
    rng = np.random.default_rng(22)
    t = helper.make_node
    nodes = [
        t("Sub", ["input", "mean"], ["centred"], name="centre"),
        t("MatMul", ["centred", "w1"], ["h"], name="mm1"),
        t("Add", ["h", "b1"], ["hb"], name="add1"),
        t("Relu", ["hb"], ["r"], name="relu"),
        t("MatMul", ["r", "w2"], ["o"], name="mm2"),
        t("Add", ["o", "b2"], ["logits"], name="add2"),
    ]
    inits = [
        _init("mean", (20,), rng),
        _init("w1", (20, 16), rng, fan_in=20),
        _init("b1", (16,), rng),
    ]
    inits += [_init("w2", (16, 10), rng, fan_in=16), _init("b2", (10,), rng)]
    inputs, outputs = _io([20], [10])
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs)


def old_opset_clip_split(path: Path) -> Path:
    """Opset 9: Clip with min/max attributes, Split with a `split` attribute, Slice with
    attributes (no steps); LeakyRelu with its default alpha."""
    rng = np.random.default_rng(23)
    t = helper.make_node
    nodes = [
        t("Gemm", ["input", "w1", "b1"], ["h"], name="gemm1", transB=1),
        t("Clip", ["h"], ["c"], name="clip", min=-0.5, max=1.0),
        t("Split", ["c"], ["s1", "s2", "s3"], name="split", axis=1, split=[2, 3, 4]),
        t("LeakyRelu", ["s2"], ["l2"], name="leaky"),
        t("Slice", ["s3"], ["s3b"], name="slice", starts=[-3], ends=[100], axes=[1]),
        t("Mul", ["l2", "s3b"], ["m"], name="mul"),
        t("Concat", ["s1", "m"], ["cat"], name="concat", axis=1),
        t("Gemm", ["cat", "w2", "b2"], ["logits"], name="gemm2", transB=1),
    ]
    inits = [_init("w1", (9, 4), rng), _init("b1", (9,), rng)]
    inits += [_init("w2", (3, 5), rng), _init("b2", (3,), rng)]
    inputs, outputs = _io(["N", 4], ["N", 3])
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs, opset=9)


def split_num_outputs(path: Path) -> Path:
    """Opset 18: Split into uneven parts (4, 4, 3) by `num_outputs` (one part unused), Slice
    with steps and a negative start, Flatten at axis 2 of a (N, 1, 11, 1) tensor, and a Sub
    of computed tensors."""
    rng = np.random.default_rng(24)
    t = helper.make_node
    nodes = [
        t("Reshape", ["input", "shape4d"], ["x4"], name="to_4d"),
        t("Flatten", ["x4"], ["f"], name="flatten_axis2", axis=2),
        t("Split", ["f"], ["a", "b", "unused"], name="split", axis=1, num_outputs=3),
        t("Slice", ["f", "starts", "ends", "axes", "steps"], ["sl"], name="slice_steps"),
        t("Sub", ["a", "b"], ["d"], name="sub"),
        t("Concat", ["d", "sl"], ["cat"], name="concat", axis=1),
        t("Gemm", ["cat", "w", "bias"], ["logits"], name="gemm", transB=1),
    ]
    inits = [_ints("shape4d", [-1, 1, 11, 1]), _ints("starts", [-10]), _ints("ends", [12])]
    inits += [_ints("axes", [-1]), _ints("steps", [3])]
    inits += [_init("w", (2, 8), rng), _init("bias", (2,), rng)]
    inputs, outputs = _io(["N", 11], ["N", 2])
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs, opset=18)


def conv_shared_batchnorm(path: Path) -> Path:
    """A Conv whose output feeds a BatchNormalization and a skip Add: the BatchNormalization
    cannot fold into the Conv (its output has another reader) and becomes mul + add."""
    rng = np.random.default_rng(25)
    t = helper.make_node
    bn = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 3).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.uniform(-1, 1, 3).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(rng.uniform(-1, 1, 3).astype(np.float32), "bn_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "bn_var"),
    ]
    nodes = [
        t("Conv", ["input", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        t("BatchNormalization", ["c", *(i.name for i in bn)], ["n"], name="bn"),
        t("Relu", ["n"], ["r"], name="relu"),
        t("Add", ["r", "c"], ["skip"], name="skip"),
        t("GlobalAveragePool", ["skip"], ["g"], name="gap"),
        t("Flatten", ["g"], ["f"], name="flatten"),
        t("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("cw", (3, 2, 3, 3), rng), _init("cb", (3,), rng), *bn]
    inits += [_init("fw", (4, 3), rng), _init("fb", (4,), rng)]
    inputs, outputs = _io(["N", 2, 5, 5], ["N", 4])
    return save_helper_model(nodes, inits, path, inputs=inputs, outputs=outputs)


HELPER_MODELS: dict[str, Callable[[Path], Path]] = {
    "nhwc_cnn": nhwc_cnn,
    "pad_conv": pad_conv,
    "unbatched_mlp": unbatched_mlp,
    "old_opset_clip_split": old_opset_clip_split,
    "split_num_outputs": split_num_outputs,
    "conv_shared_batchnorm": conv_shared_batchnorm,
}
UNBATCHED = {"unbatched_mlp-helper", "unbatched_cnn-legacy"}
"""Models whose ONNX input has no batch axis."""

DAG_IDS: list[str] = (
    [f"{n}-legacy" for n in TORCH_MODELS]
    + [f"{n}-dynamo" for n in DYNAMO_MODELS]
    + ["resnet_unfolded-legacy", "unbatched_cnn-legacy"]
    + [f"{n}-helper" for n in HELPER_MODELS]
)


def build_dag_zoo(folder: Path, ids: list[str] | None = None) -> dict[str, DagModel]:
    """Export (or write) every model named in `ids` (default: all) into `folder`."""
    zoo: dict[str, DagModel] = {}
    for model_id in ids or DAG_IDS:
        name, exporter = model_id.rsplit("-", 1)
        if model_id == "resnet_unfolded-legacy":
            zoo[model_id] = resnet_unfolded(folder)
        elif model_id == "unbatched_cnn-legacy":
            zoo[model_id] = unbatched_cnn(folder)
        elif exporter == "helper":
            path = HELPER_MODELS[name](folder / f"{name}.onnx")
            zoo[model_id] = DagModel(model_id, path, batched=model_id not in UNBATCHED)
        else:
            zoo[model_id] = export_torch(name, exporter == "dynamo", folder)
    return zoo
