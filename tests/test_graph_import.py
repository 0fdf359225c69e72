"""ONNX graphs that are DAGs (issue 18): every zoo model agrees with onnxruntime; residual
blocks, branches, tf2onnx NHWC transposes, Pad, Split/Slice, Clip/LeakyRelu and inputs without a
batch axis load; bad graphs are one-line GraphErrors; IBP encloses a residual model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.graph_zoo import DAG_IDS, DagModel, build_dag_zoo
from tests.model_zoo import EXPORT_WARNING_FILTERS, save_helper_model
from verifier.bounds.ibp import margin_bounds
from verifier.errors import GraphError
from verifier.graph import (
    Activation,
    Binary,
    Concat,
    Conv,
    Elementwise,
    Graph,
    Linear,
    Pad,
    Pool,
    Slice,
    Transpose,
)
from verifier.onnx.importer import graph_from_model, load_graph

pytestmark = [pytest.mark.filterwarnings(f) for f in EXPORT_WARNING_FILTERS]

TEST_BATCH = 5


@pytest.fixture(scope="session")
def dag_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DagModel]:
    """Every DAG zoo model, exported once per session."""
    return build_dag_zoo(tmp_path_factory.mktemp("dag_zoo"))


def random_input(graph: Graph, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((TEST_BATCH, *graph.input_shape), generator=gen)


def run_onnxruntime(model: DagModel, graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """onnxruntime on the batch; one sample at a time when the input has no batch axis."""
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    if model.batched:
        (out,) = session.run([graph.output_name], {graph.input_name: x.numpy()})
        return torch.from_numpy(out)
    rows = [session.run([graph.output_name], {graph.input_name: s.numpy()})[0] for s in x]
    return torch.from_numpy(np.stack(rows).reshape(len(x), -1))


def kinds(graph: Graph) -> list[str]:
    return [type(op).__name__ for op in graph.ops]


@pytest.mark.parametrize("model_id", DAG_IDS)
def test_forward_matches_onnxruntime(dag_zoo: dict[str, DagModel], model_id: str) -> None:
    model = dag_zoo[model_id]
    graph = load_graph(model.path)
    x = random_input(graph)
    expected = run_onnxruntime(model, graph, x)
    got = graph.forward(x)
    assert got.shape == (TEST_BATCH, graph.n_classes)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(graph(x.double()), expected.double(), rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("model_id", DAG_IDS)
def test_parameters_are_the_affine_initializers(
    dag_zoo: dict[str, DagModel], model_id: str
) -> None:
    path = dag_zoo[model_id].path
    graph = load_graph(path)
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    named = {op.weight for op in graph.affine_ops()}
    named |= {op.bias for op in graph.affine_ops() if op.bias is not None}
    assert set(graph.parameters) == named
    for name, value in graph.parameters.items():
        np.testing.assert_array_equal(value.numpy(), arrays[name].astype(np.float32))


@pytest.mark.parametrize("model_id", ["resnet-legacy", "resnet-dynamo", "resnet_unfolded-legacy"])
def test_resnet_is_a_dag_with_both_skips(dag_zoo: dict[str, DagModel], model_id: str) -> None:
    path = dag_zoo[model_id].path
    graph = load_graph(path)
    assert not graph.is_chain()
    assert kinds(graph).count("Binary") == 2 and kinds(graph).count("Conv") == 6
    assert "Elementwise" not in kinds(graph)  # every BatchNormalization is folded
    downsample = [op for op in graph.ops if isinstance(op, Conv) and op.strides == (2, 2)]
    assert len(downsample) == 2  # the block's first conv and the 1x1 skip conv
    skip = next(op for op in downsample if graph.parameters[op.weight].shape[-1] == 1)
    join = graph.ops[-5]
    assert isinstance(join, Binary) and skip.output in join.inputs
    assert isinstance(graph.ops[-4], Activation) and isinstance(graph.ops[-3], Pool)
    if model_id == "resnet_unfolded-legacy":
        nodes = onnx.load(str(path)).graph.node
        assert sum(n.op_type == "BatchNormalization" for n in nodes) == 5
        scaled = [op.node for op in graph.ops if isinstance(op, Conv) and op.scale is not None]
        assert len(scaled) == 5  # every Conv but the stem


def test_tf2onnx_nhwc_transposes_load_and_cancelling_pairs_fold(
    dag_zoo: dict[str, DagModel],
) -> None:
    path = dag_zoo["nhwc_cnn-helper"].path
    graph = load_graph(path)
    nodes = onnx.load(str(path)).graph.node
    assert sum(n.op_type == "Transpose" for n in nodes) == 6
    transposes = [op for op in graph.ops if isinstance(op, Transpose)]
    assert [op.perm for op in transposes] == [(0, 3, 1, 2), (0, 2, 3, 1), (0, 3, 1, 2)] + [
        (0, 2, 3, 1)
    ]
    # conv2 -> to NHWC -> to NCHW -> pool: the pool reads the conv directly
    conv2 = next(op for op in graph.ops if isinstance(op, Conv) and op.node == "conv2")
    pool = next(op for op in graph.ops if isinstance(op, Pool))
    assert pool.inputs == (conv2.output,)
    assert graph.input_shape == (8, 8, 1)
    assert {op.weight for op in graph.affine_ops()} == {
        "conv1/kernel",
        "conv2/kernel",
        "dense/kernel",
        "out/kernel",
    }


def test_zero_pad_before_conv_is_folded_and_other_pads_stay(
    dag_zoo: dict[str, DagModel],
) -> None:
    graph = load_graph(dag_zoo["pad_conv-helper"].path)
    convs = {op.node: op for op in graph.ops if isinstance(op, Conv)}
    assert convs["conv1"].pads == (1, 2, 2, 1)  # Pad begins (H 1, W 2), ends (H 2, W 1)
    assert convs["conv1"].inputs == (graph.input_name,)
    assert convs["conv2"].pads == (0, 1, 0, 1)  # after a 0.5 Pad, which is not folded
    pads = {op.node: op for op in graph.ops if isinstance(op, Pad)}
    assert set(pads) == {"pad_half", "pad_shared"}
    assert pads["pad_half"].value == 0.5 and pads["pad_half"].pads == (0, 1, 1, 0)
    assert pads["pad_shared"].pads == (1, 1, 1, 1)  # read by a Conv and a Relu


def test_inputs_without_batch_axis_are_served_as_a_batch(dag_zoo: dict[str, DagModel]) -> None:
    mlp = load_graph(dag_zoo["unbatched_mlp-helper"].path)
    assert mlp.input_shape == (20,) and mlp.n_classes == 10
    assert kinds(mlp) == ["Elementwise", "Linear", "Activation", "Linear"]
    assert [op.bias for op in mlp.affine_ops()] == ["b1", "b2"]
    cnn = load_graph(dag_zoo["unbatched_cnn-legacy"].path)
    assert cnn.input_shape == (1, 8, 8) and cnn.n_classes == 4
    # Unsqueeze(0) before the Conv becomes the batch axis, Squeeze(0) after gives it back
    assert kinds(cnn) == ["Conv", "Activation", "Reshape", "Linear"]
    x = random_input(cnn)
    torch.testing.assert_close(cnn(x[:1]), cnn(x)[:1])


def test_branches_concat_residual_clip_and_slices(dag_zoo: dict[str, DagModel]) -> None:
    branches = load_graph(dag_zoo["branches-legacy"].path)
    concat = next(op for op in branches.ops if isinstance(op, Concat))
    assert concat.axis == 1 and len(concat.inputs) == 2

    residual = load_graph(dag_zoo["residual_mlp-dynamo"].path)
    add = next(op for op in residual.ops if isinstance(op, Binary))
    linears = [op for op in residual.ops if isinstance(op, Linear)]
    assert add.op == "add" and linears[0].output in add.inputs

    clip = load_graph(dag_zoo["clip_leaky-legacy"].path)
    acts = [op for op in clip.ops if isinstance(op, Activation)]
    assert [(op.function, op.low, op.high) for op in acts] == [
        ("clip", 0.0, 6.0),
        ("leaky_relu", -np.inf, np.inf),
        ("clip", -1.0, 1.0),
    ]
    assert acts[1].alpha == pytest.approx(0.1)
    old = load_graph(dag_zoo["old_opset_clip_split-helper"].path)
    acts = [op for op in old.ops if isinstance(op, Activation)]
    assert [(op.function, op.low, op.high) for op in acts][0] == ("clip", -0.5, 1.0)
    assert acts[1].function == "leaky_relu" and acts[1].alpha == pytest.approx(0.01)
    slices = [(op.axis, op.start, op.stop, op.step) for op in old.ops if isinstance(op, Slice)]
    assert slices == [(1, 0, 2, 1), (1, 2, 5, 1), (1, 5, 9, 1), (1, 1, 4, 1)]

    split = load_graph(dag_zoo["split_num_outputs-helper"].path)
    slices = [(op.axis, op.start, op.stop, op.step) for op in split.ops if isinstance(op, Slice)]
    assert slices == [(1, 0, 4, 1), (1, 4, 8, 1), (1, 1, 11, 3)]  # the unused part is dropped
    assert kinds(split)[:3] == ["Slice", "Slice", "Slice"]  # the two reshapes cancel

    shared = load_graph(dag_zoo["conv_shared_batchnorm-helper"].path)
    conv = next(op for op in shared.ops if isinstance(op, Conv))
    assert conv.scale is None  # its output also feeds the skip Add: BatchNorm stays separate
    assert [op.op for op in shared.ops if isinstance(op, Elementwise)] == ["mul", "add"]


@pytest.mark.parametrize("model_id", ["residual_mlp-legacy", "resnet-dynamo"])
def test_ibp_encloses_sampled_weights_on_residual_models(
    dag_zoo: dict[str, DagModel], model_id: str
) -> None:
    graph = load_graph(dag_zoo[model_id].path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((8, *graph.input_shape), generator=gen, dtype=torch.float64)
    centre = {name: t.double() for name, t in graph.parameters.items()}
    radius = {name: 0.02 * t.abs() + 1e-3 for name, t in centre.items()}
    lower = {name: centre[name] - radius[name] for name in centre}
    upper = {name: centre[name] + radius[name] for name in centre}
    y = graph.forward(x).argmax(dim=1)
    bounds = margin_bounds(graph, lower, upper, x, y)
    rows = torch.arange(len(y))
    for corner in range(64):
        theta = {
            name: lower[name]
            + (upper[name] - lower[name])
            * (
                torch.rand(lower[name].shape, generator=gen, dtype=torch.float64)
                if corner % 2
                else torch.randint(0, 2, lower[name].shape, generator=gen).double()
            )
            for name in lower
        }
        logits = graph.forward(x, theta)
        margins = logits[rows, y][:, None] - logits
        margins[rows, y] = torch.inf
        assert bool((margins >= bounds.lower).all()), float((margins - bounds.lower).min())


# ---------------------------------------------------------------------- bad graphs
def _model(
    nodes: list[onnx.NodeProto],
    inits: list[TensorProto],
    *,
    input_shape: list[int | str] | None = None,
    output_shape: list[int | str] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape or ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_shape or ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weights(rng: np.random.Generator) -> list[TensorProto]:
    return [
        numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
    ]


def test_cycle_is_one_graph_error_also_without_the_checker(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Add", ["input", "back"], ["a"], name="add_a"),
        helper.make_node("Relu", ["a"], ["back"], name="relu_back"),
        helper.make_node("Gemm", ["a", "w", "b"], ["logits"], name="gemm", transB=1),
    ]
    model = _model(nodes, _weights(np.random.default_rng(0)))
    with pytest.raises(GraphError, match="'add_a' \\(Add\\): reads 'back' before .*cycle") as info:
        graph_from_model(model, tmp_path / "cycle.onnx")
    assert "\n" not in str(info.value)
    onnx.save(model, str(tmp_path / "cycle.onnx"))
    with pytest.raises(GraphError, match="topologically sorted") as info:
        load_graph(tmp_path / "cycle.onnx")
    assert "\n" not in str(info.value)


def test_dangling_output_is_one_graph_error_also_without_the_checker(tmp_path: Path) -> None:
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["h"], name="gemm", transB=1)]
    model = _model(nodes, _weights(np.random.default_rng(1)))
    with pytest.raises(GraphError, match="graph output 'logits' is produced by no node"):
        graph_from_model(model, tmp_path / "dangling.onnx")


def test_nodes_the_output_does_not_need_are_pruned(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="gemm", transB=1),
        helper.make_node("Softmax", ["input"], ["unused"], name="dead_softmax"),
        helper.make_node("Unsqueeze", ["unused", "axis"], ["unused3"], name="dead_unsqueeze"),
        helper.make_node("LSTM", ["unused3", "W", "R"], ["dead_y"], name="dead_lstm"),
    ]
    inits = _weights(rng) + [
        numpy_helper.from_array(rng.standard_normal((1, 8, 4)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 8, 2)).astype(np.float32), "R"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
    ]
    path = save_helper_model(nodes, inits, tmp_path / "dead.onnx")
    graph = load_graph(path)
    assert kinds(graph) == ["Linear"] and set(graph.parameters) == {"w", "b"}


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_non_constant_padding_names_the_node_and_mode(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Pad", ["input", "pads"], ["p"], name="pad_x", mode=mode),
        helper.make_node("Conv", ["p", "cw"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["logits"], name="flatten"),
    ]
    inits = [
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads"),
        numpy_helper.from_array(rng.standard_normal((3, 1, 3, 3)).astype(np.float32), "cw"),
    ]
    path = save_helper_model(
        nodes,
        inits,
        tmp_path / "pad.onnx",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 1, 1])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    with pytest.raises(GraphError, match=f"node 'pad_x' \\(Pad\\): mode '{mode}' is not"):
        load_graph(path)


@pytest.mark.parametrize(
    ("middle", "pattern"),
    [
        (
            [helper.make_node("Transpose", ["h"], ["m"], name="t", perm=[1, 0])],
            "'t' \\(Transpose\\): perm \\[1, 0\\] moves the batch axis",
        ),
        (
            [helper.make_node("Concat", ["h", "h"], ["m"], name="cat", axis=0)],
            "'cat' \\(Concat\\): works along axis 0, the batch axis",
        ),
        (
            [helper.make_node("Slice", ["h", "zero", "two", "zero"], ["m"], name="batch_slice")],
            "'batch_slice' \\(Slice\\): works along axis 0",
        ),
        (
            [helper.make_node("Split", ["h", "ones"], ["m", "n"], name="halves", axis=0)],
            "'halves' \\(Split\\): works along axis 0",
        ),
        (
            [helper.make_node("MatMul", ["h", "h"], ["m"], name="mm")],
            "'mm' \\(MatMul\\): multiplies two computed tensors",
        ),
    ],
    ids=["transpose", "concat", "slice", "split", "matmul"],
)
def test_ops_that_would_mix_samples_are_refused(
    tmp_path: Path, middle: list[onnx.NodeProto], pattern: str
) -> None:
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Gemm", ["input", "w", "b"], ["h"], name="gemm", transB=1),
        *middle,
        helper.make_node("Gemm", ["m", "w2"], ["logits"], name="gemm2", transB=1),
    ]
    inits = _weights(rng) + [
        numpy_helper.from_array(rng.standard_normal((3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "two"),
        numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "ones"),
    ]
    model = _model(nodes, inits)
    onnx.save(model, str(tmp_path / "mix.onnx"))
    with pytest.raises(GraphError, match=pattern) as info:
        load_graph(tmp_path / "mix.onnx")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("node", "pattern"),
    [
        (
            helper.make_node("LeakyRelu", ["h"], ["m"], name="leaky", alpha=2.0),
            "'leaky' \\(LeakyRelu\\): alpha 2.0 is not supported; it must lie in \\[0, 1\\]",
        ),
        (
            helper.make_node("Clip", ["h", "h"], ["m"], name="clip_by_itself"),
            "'clip_by_itself' \\(Clip\\): its input 1 'h' is computed",
        ),
    ],
    ids=["leaky_alpha", "clip_bound"],
)
def test_activations_with_unsupported_settings_are_refused(
    tmp_path: Path, node: onnx.NodeProto, pattern: str
) -> None:
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Gemm", ["input", "w", "b"], ["h"], name="gemm", transB=1),
        node,
        helper.make_node("Gemm", ["m", "w2"], ["logits"], name="gemm2", transB=1),
    ]
    inits = _weights(rng) + [
        numpy_helper.from_array(rng.standard_normal((3, 3)).astype(np.float32), "w2")
    ]
    onnx.save(_model(nodes, inits), str(tmp_path / "act.onnx"))
    with pytest.raises(GraphError, match=pattern):
        load_graph(tmp_path / "act.onnx")
