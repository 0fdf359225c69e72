"""Writing new parameter values back to ONNX: round trips through onnxruntime and load_graph."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from tests.model_zoo import EXPORT_WARNING_FILTERS, ZooModel, build_zoo
from verifier.errors import DomainError
from verifier.graph import Graph
from verifier.onnx.export import linear_head_model, save_with_parameters
from verifier.onnx.importer import load_graph

pytestmark = [pytest.mark.filterwarnings(f) for f in EXPORT_WARNING_FILTERS]

ROUND_TRIP_IDS = [
    "mlp-legacy",
    "conv_batchnorm-legacy",
    "linear_batchnorm-legacy",
    "split_mnist_cnn-dynamo",
    "normalised_input-dynamo",
    "gemm_alpha_beta-helper",
    "matmul_add_reversed-helper",
    "constant_node_weights-helper",
]


@pytest.fixture(scope="session")
def export_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ZooModel]:
    """The zoo models the round trips use, exported once per session."""
    return build_zoo(
        tmp_path_factory.mktemp("export_zoo"), [*ROUND_TRIP_IDS, "folded_constants-helper"]
    )


def perturbed(graph: Graph, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: value + scale * torch.randn(value.shape, generator=gen)
        for name, value in graph.parameters.items()
    }


def onnxruntime_logits(path: Path, graph: Graph, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([graph.output_name], {graph.input_name: x.numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("model_id", ROUND_TRIP_IDS)
def test_round_trip_matches_forward_with_theta(
    export_zoo: dict[str, ZooModel], model_id: str, tmp_path: Path
) -> None:
    source = export_zoo[model_id].path
    graph = load_graph(source)
    theta = perturbed(graph, seed=1)
    out = tmp_path / "updated.onnx"
    save_with_parameters(source, theta, out)

    x = torch.randn((7, *graph.input_shape), generator=torch.Generator().manual_seed(2))
    expected = graph.forward(x, theta)
    torch.testing.assert_close(onnxruntime_logits(out, graph, x), expected, rtol=0.0, atol=1e-5)
    reloaded = load_graph(out)
    assert reloaded.parameter_shapes() == graph.parameter_shapes()
    for name, value in theta.items():
        torch.testing.assert_close(reloaded.parameters[name], value, rtol=0.0, atol=0.0)
    torch.testing.assert_close(reloaded.forward(x), expected, rtol=0.0, atol=1e-6)
    # the original is untouched and no temporary file is left behind
    assert not torch.equal(load_graph(source).forward(x), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["updated.onnx"]


def test_unchanged_tensors_and_structure_are_kept(
    export_zoo: dict[str, ZooModel], tmp_path: Path
) -> None:
    source = export_zoo["conv_batchnorm-legacy"].path
    graph = load_graph(source)
    name = next(iter(graph.parameters))
    out = tmp_path / "one.onnx"
    save_with_parameters(source, {name: graph.parameters[name] * 2}, out)
    before, after = onnx.load(str(source)), onnx.load(str(out))
    assert before.graph.node == after.graph.node
    assert [i.name for i in before.graph.initializer] == [i.name for i in after.graph.initializer]
    for old, new in zip(before.graph.initializer, after.graph.initializer, strict=True):
        old_value, new_value = numpy_helper.to_array(old), numpy_helper.to_array(new)
        assert old.data_type == new.data_type
        if old.name == name:
            np.testing.assert_array_equal(new_value, old_value * 2)
        else:
            np.testing.assert_array_equal(new_value, old_value)


def test_float16_weight_keeps_its_dtype(export_zoo: dict[str, ZooModel], tmp_path: Path) -> None:
    source = export_zoo["folded_constants-helper"].path
    with pytest.warns(UserWarning, match="converted to float32"):
        graph = load_graph(source)
    theta = perturbed(graph, seed=3)
    out = tmp_path / "half.onnx"
    save_with_parameters(source, theta, out)
    stored = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert stored["w1_half"].data_type == TensorProto.FLOAT16
    rounded = dict(theta, w1_half=theta["w1_half"].half().float())
    x = torch.randn((4, *graph.input_shape), generator=torch.Generator().manual_seed(4))
    expected = graph.forward(x, rounded)
    torch.testing.assert_close(onnxruntime_logits(out, graph, x), expected, rtol=0.0, atol=1e-5)
    with pytest.warns(UserWarning, match="converted to float32"):
        reloaded = load_graph(out)
    torch.testing.assert_close(reloaded.parameters["w1_half"], rounded["w1_half"])


def test_overwriting_the_source_in_place(export_zoo: dict[str, ZooModel], tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(export_zoo["mlp-legacy"].path.read_bytes())
    graph = load_graph(path)
    theta = perturbed(graph, seed=5)
    save_with_parameters(path, theta, path)
    reloaded = load_graph(path)
    for name, value in theta.items():
        torch.testing.assert_close(reloaded.parameters[name], value, rtol=0.0, atol=0.0)


@pytest.mark.parametrize(
    ("make_theta", "pattern"),
    [
        (lambda p: {"no_such_weight": torch.zeros(3)}, "'no_such_weight' is not an initializer"),
        (lambda p: {"0.weight": torch.zeros(2, 2)}, "'0.weight': expected shape \\(8, 6\\)"),
        (
            lambda p: {"0.bias": torch.full(p["0.bias"].shape, float("nan"))},
            "'0.bias'.*NaN",
        ),
    ],
    ids=["unknown-name", "wrong-shape", "nan-value"],
)
def test_bad_parameters_raise_domain_error(
    export_zoo: dict[str, ZooModel],
    tmp_path: Path,
    make_theta: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
    pattern: str,
) -> None:
    source = export_zoo["mlp-legacy"].path
    params = load_graph(source).parameters
    out = tmp_path / "bad.onnx"
    with pytest.raises(DomainError, match=pattern):
        save_with_parameters(source, make_theta(params), out)
    assert list(tmp_path.iterdir()) == []


def test_linear_head_model_computes_the_affine_map(tmp_path: Path) -> None:
    """The exported head is features @ W.T + b in onnxruntime and in our graph."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 7)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    features = rng.normal(size=(5, 7)).astype(np.float32)
    path = tmp_path / "head.onnx"
    onnx.save(linear_head_model(weight, bias, prefix="fc"), str(path))
    expected = features @ weight.T + bias
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"features": features})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    graph = load_graph(path)
    assert set(graph.parameters) == {"fc.weight", "fc.bias"}
    ours = graph(torch.from_numpy(features)).detach().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
