"""Frozen prefix offloading: a whole exported classifier with only its head boxed.

The model is transformer-style (LayerNorm, Softmax attention, GELU, a residual, mean pooling)
with a linear head, exported with the TorchScript exporter. Boxing the head cuts it at the
head's input: the prefix runs in onnxruntime and the head is our `Graph`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from torch import nn

from tests.graph_zoo import resnet_unfolded, unbatched_mlp
from verifier.cli import ExitCode, cli
from verifier.data import Dataset, validate_for_model
from verifier.errors import GraphError, SpecError
from verifier.graph import Binary, Graph, Linear
from verifier.onnx.prefix import (
    PrefixedGraph,
    load_bounded_graph,
    load_split_model,
    prefix_progress,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENS, WIDTH, TOKEN_FEATURES, CLASSES = 6, 16, 4, 3
N_SAMPLES = 400


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(WIDTH)
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.ln2 = nn.LayerNorm(WIDTH)
        self.ff1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.ff2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / WIDTH**0.5
        x = x + torch.softmax(scores, dim=-1) @ self.v(h)
        return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))


class _Classifier(nn.Module):
    """(batch, TOKENS * TOKEN_FEATURES) -> tokens -> one attention block -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(TOKEN_FEATURES, WIDTH)
        self.block = _Block()
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], TOKENS, TOKEN_FEATURES))
        return self.head(self.norm(self.block(tokens)).mean(dim=1))


class _HeadOnly(nn.Module):
    """The classifier's head alone, its parameters named as in the whole model."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def _export(module: nn.Module, path: Path, n_in: int) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (torch.zeros(2, n_in),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _Classifier]:
    with torch.random.fork_rng():  # restores the global generator afterwards
        torch.manual_seed(0)
        net = _Classifier().eval()
    folder = tmp_path_factory.mktemp("prefix")
    return _export(net, folder / "transformer.onnx", TOKENS * TOKEN_FEATURES), net


@pytest.fixture(scope="module")
def split(model: tuple[Path, _Classifier]) -> PrefixedGraph:
    graph = load_split_model(model[0], ["head.*"], threads=1, batch_size=64)
    assert isinstance(graph, PrefixedGraph)
    return graph


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, TOKENS * TOKEN_FEATURES, generator=torch.Generator().manual_seed(seed))


def _whole_model_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x.numpy()})[0])


def test_only_the_head_is_parsed(split: PrefixedGraph) -> None:
    assert split.input_shape == (WIDTH,)
    assert split.n_classes == CLASSES
    assert [type(op) for op in split.ops] == [Linear]
    assert sorted(split.parameters) == ["head.bias", "head.weight"]
    assert split.prefix is not None and split.prefix.input_name == "x"
    assert split.input_name == split.prefix.cut_tensor


def test_prefix_then_suffix_matches_onnxruntime_on_the_whole_model(
    model: tuple[Path, _Classifier], split: PrefixedGraph
) -> None:
    x = _inputs(200)
    expected = _whole_model_logits(model[0], x)
    torch.testing.assert_close(split.forward_raw(x), torch.from_numpy(expected), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(split.forward_raw(x), model[1](x), rtol=0, atol=1e-5)


def test_features_come_in_batches_with_progress(split: PrefixedGraph) -> None:
    assert split.prefix is not None
    seen: list[tuple[int, int]] = []
    x = _inputs(150)
    batched = split.prefix.features(x, on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(64, 150), (128, 150), (150, 150)]
    assert batched.dtype == torch.float32 and batched.shape == (150, WIDTH)
    torch.testing.assert_close(batched[:10], split.prefix.features(x[:10]), rtol=0, atol=1e-6)


def test_prefix_progress_reports_each_quarter_once() -> None:
    messages: list[str] = []
    report = prefix_progress(messages.append)
    assert report is not None and prefix_progress(None) is None
    for done in (10, 20, 30, 50, 60, 80, 100):
        report(done, 100)
    assert [m.split(" of ")[1] for m in messages] == [
        "10/100 samples",
        "30/100 samples",
        "50/100 samples",
        "80/100 samples",
        "100/100 samples",
    ]


def test_validate_for_model_maps_raw_samples_and_accepts_features(split: PrefixedGraph) -> None:
    assert split.prefix is not None
    x = _inputs(40)
    raw = Dataset.from_arrays("raw", "test", x, torch.zeros(40, dtype=torch.int64), CLASSES)
    mapped = validate_for_model(raw, split)
    assert mapped.sample_shape == (WIDTH,)
    assert mapped.source_sha256 == raw.source_sha256  # the raw data the features came from
    torch.testing.assert_close(mapped.x, split.prefix.features(x), rtol=0, atol=0)
    features = Dataset.from_arrays("f", "test", mapped.x, raw.y, CLASSES)
    assert validate_for_model(features, split).x is features.x
    wrong = Dataset.from_arrays("w", "test", torch.zeros(3, 5), torch.zeros(3).long(), CLASSES)
    with pytest.raises(Exception, match=r"expects \(24,\), or features of the cut tensor"):
        validate_for_model(wrong, split)


def test_a_supported_model_is_not_cut() -> None:
    graph = load_bounded_graph(ROOT / "onnx_models" / "digits_mlp.onnx", ["fc3.*"])
    assert type(graph) is Graph and len(graph.parameters) == 6
    first = load_split_model(ROOT / "onnx_models" / "digits_mlp.onnx", ["fc1.weight"])
    assert type(first) is Graph  # the first boxed layer reads the graph input: nothing to cut


@pytest.mark.parametrize(
    ("boxed", "named"),
    [
        (["block.ln1.*"], ["LayerNormalization", "Softmax", "Erf"]),
        (["block.ff1.bias"], ["Erf", "LayerNormalization"]),
    ],
)
def test_boxing_inside_the_transformer_names_the_unsupported_ops(
    model: tuple[Path, _Classifier], boxed: list[str], named: list[str]
) -> None:
    with pytest.raises(GraphError) as info:
        load_bounded_graph(model[0], boxed)
    message = str(info.value)
    assert f"boxing '{boxed[0].rstrip('*')}" in message and "cuts the model at tensor" in message
    for op in named:
        assert op in message
    assert "box only parameters after the last of them" in message


def test_unknown_parameter_pattern_is_a_spec_error(model: tuple[Path, _Classifier]) -> None:
    with pytest.raises(SpecError, match="'nothing.*' matches no initializer"):
        load_split_model(model[0], ["nothing.*"])


# ---------------------------------------------------------------- the CLI, end to end


def _labelled(split: PrefixedGraph, folder: Path) -> tuple[Path, Path]:
    """Raw inputs and their features, labelled by the model with 10 % of the labels moved."""
    assert split.prefix is not None
    x = _inputs(N_SAMPLES, seed=1)
    features = split.prefix.features(x)
    y = split.forward(features).argmax(dim=1)
    moved = torch.arange(N_SAMPLES) % 10 == 0
    y = torch.where(moved, (y + 1) % CLASSES, y)
    raw_path, features_path = folder / "raw.npz", folder / "features.npz"
    np.savez(raw_path, x=x.numpy(), y=y.numpy())
    np.savez(features_path, x=features.numpy(), y=y.numpy())
    return raw_path, features_path


def _spec(folder: Path, model_path: Path, data: Path, name: str, **overrides: Any) -> Path:
    document: dict[str, Any] = {
        "model": str(model_path),
        "data": {"name": str(data)},
        "parameters": ["head.*"],
        "tasks": [{"name": "t", "metric": "accuracy", "target": "acc - 0.1"}],
        "search": {"iterations": 10, "batch_size": 100},
        # one candidate at beta: these runs compare prefix paths, not the ladder
        "certify": {"beta": 0.01, "ladder": {"scales": [1.0], "targets": 1}},
    }
    document.update(overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def _invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _task(out_dir: Path) -> dict[str, Any]:
    document = json.loads((out_dir / "certificate.json").read_text(encoding="utf-8"))
    task: dict[str, Any] = document["tasks"][0]
    return task


@pytest.fixture(scope="module")
def cli_runs(
    model: tuple[Path, _Classifier], split: PrefixedGraph, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Result, Path]]:
    folder = tmp_path_factory.mktemp("prefix_cli")
    raw, features = _labelled(split, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = _export(_HeadOnly(model[1].head), folder / "head.onnx", WIDTH)
    jobs = {
        "whole": _spec(folder, model[0], raw, "whole.yaml"),
        "head": _spec(folder, head, features, "head.yaml"),
        "strict": _spec(
            folder, model[0], raw, "strict.yaml", tasks=[{"name": "t", "target": 0.99}]
        ),
    }
    runs = {}
    for name, spec in jobs.items():
        out = folder / f"out_{name}"
        runs[name] = (_invoke("lid", spec, "-o", out, "--json"), out)
    return runs


def test_lid_on_a_whole_transformer_with_the_head_boxed(
    cli_runs: dict[str, tuple[Result, Path]],
) -> None:
    result, out = cli_runs["whole"]
    assert result.exit_code == ExitCode.OK, result.output
    task = _task(out)
    assert task["holds"] and task["lower_bound"] >= task["target"]
    assert 0.85 <= task["clean_metric"] <= 0.95  # 10 % of the labels were moved
    from verifier.domains.io import load_lid

    assert sorted(load_lid(out / "lid.safetensors").domain.lower) == ["head.bias", "head.weight"]


def test_features_npz_with_the_head_alone_gives_the_same_certificate(
    cli_runs: dict[str, tuple[Result, Path]],
) -> None:
    result, out = cli_runs["head"]
    assert result.exit_code == ExitCode.OK, result.output
    whole, head = _task(cli_runs["whole"][1]), _task(out)
    for key in ("n", "k", "clean_metric", "target", "lower_bound"):
        assert head[key] == pytest.approx(whole[key], abs=1e-9), key


def test_a_target_above_the_clean_accuracy_is_not_met(
    cli_runs: dict[str, tuple[Result, Path]],
) -> None:
    result, out = cli_runs["strict"]
    assert result.exit_code == ExitCode.SPEC_NOT_MET, result.output
    # explained before the search (the held-out part cannot certify 0.99); nothing written
    assert "not certifiable: task 't': τ = 0.9900" in result.stderr
    assert not (out / "certificate.json").exists()


def test_certify_runs_raw_data_through_the_prefix(
    model: tuple[Path, _Classifier], cli_runs: dict[str, tuple[Result, Path]]
) -> None:
    out = cli_runs["whole"][1]
    raw = out.parent / "raw.npz"
    result = _invoke("certify", model[0], out / "lid.safetensors", raw, "--target", "0.5", "--json")
    assert result.exit_code == ExitCode.OK, result.output
    document = json.loads(result.stdout)
    assert document["n"] == N_SAMPLES and document["verdict"] == "holds"


def test_lid_boxing_inside_the_transformer_exits_2_naming_the_op(
    model: tuple[Path, _Classifier], tmp_path: Path, split: PrefixedGraph
) -> None:
    raw, _ = _labelled(split, tmp_path)
    spec = _spec(tmp_path, model[0], raw, "inside.yaml", parameters=["block.ln1.*"])
    result = _invoke("lid", spec, "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "Softmax" in result.stderr and "cuts the model at tensor" in result.stderr


# ---------------------------------------------------------------- cutting a DAG


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ResNet of tests.graph_zoo, BatchNormalization nodes kept (parameters keep their
    torch names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        return resnet_unfolded(tmp_path_factory.mktemp("resnet")).path


def _resnet_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def test_a_cut_before_a_residual_block_keeps_the_block_as_a_dag(resnet: Path) -> None:
    split = load_split_model(resnet, ["layer2.conv1.weight"], threads=1)
    assert isinstance(split, PrefixedGraph) and split.prefix is not None
    assert split.cut_node.endswith("conv1/Conv") and split.input_shape == (4, 8, 8)
    assert any(isinstance(op, Binary) for op in split.ops)  # the downsampling skip
    assert sorted(split.parameters) == [
        "fc.bias",
        "fc.weight",
        "layer2.conv1.weight",
        "layer2.conv2.weight",
        "layer2.down.0.weight",
    ]
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split.forward_raw(x), _resnet_logits(resnet, x), rtol=0, atol=1e-5)


def test_a_cut_that_a_skip_connection_crosses_is_refused(resnet: Path) -> None:
    with pytest.raises(GraphError, match="skip connection across the cut") as info:
        load_split_model(resnet, ["layer1.conv2.weight"])
    message = str(info.value)
    assert "layer1" in message and "only one computed tensor crosses" in message


def test_a_whole_resnet_is_not_cut(resnet: Path) -> None:
    graph = load_bounded_graph(resnet, ["layer2.*"])
    assert type(graph) is Graph and not graph.is_chain()


def test_a_model_without_batch_axis_is_not_cut(tmp_path: Path) -> None:
    path = unbatched_mlp(tmp_path / "unbatched.onnx")
    with pytest.raises(GraphError, match="'input' has no batch axis, so the model cannot be cut"):
        load_split_model(path, ["w2"])
