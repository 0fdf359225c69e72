"""The ONNX front end: every zoo model agrees with onnxruntime; every bad file is a GraphError."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.model_zoo import (
    BAD_MODELS,
    CONVERTS_DTYPE,
    EXPORT_WARNING_FILTERS,
    ZOO_IDS,
    ZooModel,
    build_zoo,
    save_helper_model,
)
from verifier.errors import GraphError
from verifier.graph import Conv, Elementwise, Graph, Linear, Pool, Reshape
from verifier.onnx.importer import load_graph

pytestmark = [pytest.mark.filterwarnings(f) for f in EXPORT_WARNING_FILTERS]

TEST_BATCH = 5  # differs from model_zoo.EXPORT_BATCH on purpose


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ZooModel]:
    """Every zoo model, exported once per session."""
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@contextlib.contextmanager
def expected_warnings(model: ZooModel) -> Iterator[None]:
    """The dtype-conversion warning where the model has a non-float32 weight, else none."""
    if model.name in CONVERTS_DTYPE:
        with pytest.warns(UserWarning, match="converted to float32"):
            yield
    else:
        yield


def load(model: ZooModel) -> Graph:
    with expected_warnings(model):
        return load_graph(model.path)


def run_onnxruntime(path: Path, graph: Graph, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([graph.output_name], {graph.input_name: x.numpy()})
    return torch.from_numpy(out)


def random_input(graph: Graph, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((TEST_BATCH, *graph.input_shape), generator=gen)


def initializer_arrays(path: Path) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values of a model file, by name."""
    model = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = helper.get_attribute_value(node.attribute[0])
            if isinstance(value, TensorProto):
                value = numpy_helper.to_array(value)
            arrays[node.output[0]] = np.asarray(value, dtype=np.float32)
    return arrays


@pytest.mark.parametrize("model_id", ZOO_IDS)
def test_forward_matches_onnxruntime(zoo: dict[str, ZooModel], model_id: str) -> None:
    model = zoo[model_id]
    graph = load(model)
    x = random_input(graph)
    expected = run_onnxruntime(model.path, graph, x)
    got = graph.forward(x)
    assert got.shape == (TEST_BATCH, graph.n_classes)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(graph(x.double()), expected.double(), rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("model_id", ZOO_IDS)
def test_parameters_are_the_affine_initializers(zoo: dict[str, ZooModel], model_id: str) -> None:
    model = zoo[model_id]
    graph = load(model)
    arrays = initializer_arrays(model.path)
    named = {op.weight for op in graph.affine_ops()}
    named |= {op.bias for op in graph.affine_ops() if op.bias is not None}
    assert set(graph.parameters) == named
    assert set(graph.parameters) <= set(arrays)
    for name, value in graph.parameters.items():
        assert value.dtype == torch.float32
        np.testing.assert_array_equal(value.numpy(), arrays[name].astype(np.float32))
    if model.exporter != "helper":  # torch exports feed initializers straight into Gemm/Conv
        nodes = onnx.load(str(model.path)).graph.node
        expected = {
            name
            for n in nodes
            if n.op_type in ("Gemm", "Conv", "MatMul")
            for name in n.input[1:]
            if name
        }
        assert set(graph.parameters) == expected


def test_torch_exports_have_the_expected_ops(zoo: dict[str, ZooModel]) -> None:
    kinds = {
        model_id: [type(op).__name__ for op in load(model).ops]
        for model_id, model in zoo.items()
        if model.exporter != "helper"
    }
    for exporter in ("legacy", "dynamo"):
        assert kinds[f"split_mnist_cnn-{exporter}"] == [
            "Conv",
            "Activation",
            "Conv",
            "Activation",
            "Reshape",
            "Linear",
        ]
        # BatchNorm is folded (by us or by the exporter): no Elementwise op is left
        for name in ("conv_batchnorm", "linear_batchnorm"):
            assert "Elementwise" not in kinds[f"{name}-{exporter}"]
        assert kinds[f"normalised_input-{exporter}"][:2] == ["Elementwise", "Elementwise"]
        assert kinds[f"pooling-{exporter}"].count("Pool") == 3


def test_split_mnist_geometry(zoo: dict[str, ZooModel]) -> None:
    graph = load(zoo["split_mnist_cnn-dynamo"])
    assert graph.input_shape == (1, 28, 28)
    assert graph.n_classes == 10
    assert graph.parameter_shapes() == {
        "0.weight": (8, 1, 5, 5),
        "0.bias": (8,),
        "2.weight": (1, 8, 5, 5),
        "2.bias": (1,),
        "5.weight": (10, 576),
        "5.bias": (10,),
    }
    reshape = next(op for op in graph.ops if isinstance(op, Reshape))
    assert reshape.shape == (576,)


def test_legacy_linear_batchnorm_is_folded_into_scale(zoo: dict[str, ZooModel]) -> None:
    graph = load(zoo["linear_batchnorm-legacy"])
    linears = [op for op in graph.ops if isinstance(op, Linear)]
    assert all(op.scale is not None for op in linears)
    assert set(graph.parameters) == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_helper_models_map_as_expected(zoo: dict[str, ZooModel]) -> None:
    gemm = load(zoo["gemm_alpha_beta-helper"])
    first, second = (op for op in gemm.ops if isinstance(op, Linear))
    assert first.weight_layout == "in_out" and second.weight_layout == "out_in"
    assert first.scale is not None and float(first.scale.weight_scale[0]) == 0.5
    assert float(first.scale.bias_scale[0]) == 2.0

    with pytest.warns(UserWarning, match="'w1_half' is stored as float16"):
        folded = load_graph(zoo["folded_constants-helper"].path)
    assert set(folded.parameters) == {"w1_half", "b1", "w2_out_in", "b2"}
    linears = [op for op in folded.ops if isinstance(op, Linear)]
    assert [op.weight_layout for op in linears] == ["out_in", "out_in"]

    conv = load(zoo["conv_same_global_pool-helper"])
    conv_op = next(op for op in conv.ops if isinstance(op, Conv))
    assert conv_op.pads == (1, 0, 1, 1)  # SAME_UPPER on 7x8, stride 2: extra pad at the end
    assert sum(isinstance(op, Elementwise) for op in conv.ops) == 2  # BatchNorm after Relu
    assert any(isinstance(op, Pool) and op.kernel == (4, 4) for op in conv.ops)

    matmul = load(zoo["matmul_add_reversed-helper"])
    sub, mul = matmul.ops[:2]
    assert isinstance(sub, Elementwise) and sub.op == "sub" and sub.constant_first
    assert isinstance(mul, Elementwise) and mul.op == "mul" and tuple(mul.constant.shape) == (4,)
    linears = [op for op in matmul.ops if isinstance(op, Linear)]
    assert [(op.weight, op.bias, op.weight_layout) for op in linears] == [
        ("w1", "b1", "in_out"),
        ("w2", "b2", "in_out"),
    ]

    constants = load(zoo["constant_node_weights-helper"])
    assert set(constants.parameters) == {"w1", "b1", "w2"}


# ceil_mode cases whose last window would start in the end padding (the 4th and last) are not
# in the torch zoo: onnx shape inference keeps that window, so onnxruntime refuses the legacy
# export of such a model; here the output shape is left open and onnxruntime runs them
POOL_CASES = [
    # op, kernel, strides, pads (top, left, bottom, right), ceil_mode, count_include_pad, dilation
    ("MaxPool", (3, 3), (2, 2), (1, 1, 1, 1), 1, 0, (1, 1)),
    ("MaxPool", (3, 3), (2, 2), (0, 1, 1, 0), 1, 0, (1, 1)),
    ("MaxPool", (3, 3), (1, 1), (2, 2, 2, 2), 0, 0, (1, 1)),
    ("MaxPool", (2, 2), (2, 2), (1, 1, 1, 1), 1, 0, (1, 1)),
    ("MaxPool", (3, 3), (3, 3), (1, 1, 1, 1), 1, 0, (2, 1)),
    ("AveragePool", (3, 3), (2, 2), (0, 0, 1, 1), 0, 0, (1, 1)),
    ("AveragePool", (3, 3), (2, 2), (0, 1, 1, 0), 1, 1, (1, 1)),
    ("AveragePool", (3, 3), (1, 1), (2, 2, 2, 2), 0, 1, (1, 1)),
    ("AveragePool", (3, 3), (1, 1), (2, 2, 2, 2), 0, 0, (1, 1)),
    ("AveragePool", (2, 3), (2, 1), (1, 0, 0, 1), 0, 1, (1, 1)),
    ("AveragePool", (2, 2), (2, 2), (1, 1, 1, 1), 1, 1, (1, 1)),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(i) for i in range(len(POOL_CASES))])
def test_pooling_geometry_matches_onnxruntime(case: tuple, tmp_path: Path) -> None:
    op, kernel, strides, pads, ceil_mode, count_include_pad, dilations = case
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "ceil_mode": ceil_mode}
    if op == "AveragePool":
        attrs["count_include_pad"] = count_include_pad
    if dilations != (1, 1):
        attrs["dilations"] = dilations
    nodes = [
        helper.make_node(op, ["input"], ["pooled"], name="pool", **attrs),
        helper.make_node("Flatten", ["pooled"], ["logits"], name="flatten"),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 9, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])]
    path = save_helper_model(nodes, [], tmp_path / "pool.onnx", inputs=inputs, outputs=outputs)
    graph = load_graph(path)
    x = random_input(graph)
    torch.testing.assert_close(graph(x), run_onnxruntime(path, graph, x), rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("bad", sorted(BAD_MODELS))
def test_bad_models_raise_graph_error(tmp_path: Path, bad: str) -> None:
    write, pattern = BAD_MODELS[bad]
    path = write(tmp_path)
    with pytest.raises(GraphError, match=pattern) as info:
        load_graph(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message


def test_initializer_also_used_as_constant_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [
        helper.make_node("Gemm", ["input", "w", "b"], ["h"], name="gemm", transB=1),
        helper.make_node("Add", ["h", "b"], ["h2"], name="add_b"),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], name="gemm3", transB=1),
    ]
    w3 = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w3")
    b3 = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b3")
    path = save_helper_model(nodes, [w, b, w3, b3], tmp_path / "tied.onnx")
    with pytest.raises(GraphError, match="'b' is a parameter of node 'gemm' and also a constant"):
        load_graph(path)


def test_reshape_hard_coding_the_export_batch_is_refused(tmp_path: Path) -> None:
    shape = numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "shape")
    w = numpy_helper.from_array(np.ones((3, 4), dtype=np.float32), "w")
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["r"], name="reshape_fixed"),
        helper.make_node("Gemm", ["r", "w"], ["logits"], name="gemm", transB=1),
    ]
    path = save_helper_model(nodes, [shape, w], tmp_path / "fixed_batch.onnx")
    with pytest.raises(GraphError, match="reshape_fixed.*batch axis"):
        load_graph(path)


def test_fixed_batch_input_is_accepted(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.eye(3, 4, dtype=np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["r"], name="reshape"),
        helper.make_node("Gemm", ["r", "w"], ["logits"], name="gemm", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 2])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])]
    path = save_helper_model(
        nodes, [w, shape], tmp_path / "b1.onnx", inputs=inputs, outputs=outputs
    )
    graph = load_graph(path)
    assert graph.input_shape == (2, 2)
    x = torch.arange(8.0).reshape(2, 2, 2)
    torch.testing.assert_close(graph(x), x.reshape(2, 4)[:, :3])


def test_external_data_is_read(zoo: dict[str, ZooModel], tmp_path: Path) -> None:
    model = onnx.load(str(zoo["split_mnist_cnn-legacy"].path))
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    assert (tmp_path / "w.bin").stat().st_size > 0
    graph, original = load_graph(path), load_graph(zoo["split_mnist_cnn-legacy"].path)
    x = random_input(graph)
    torch.testing.assert_close(graph(x), original(x), rtol=0.0, atol=0.0)


def test_loading_leaves_warning_filters_and_torch_state_alone(zoo: dict[str, ZooModel]) -> None:
    before = (torch.get_default_dtype(), torch.random.get_rng_state().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_graph(zoo["mlp-legacy"].path)
    assert torch.get_default_dtype() == before[0]
    assert torch.equal(torch.random.get_rng_state(), before[1])
