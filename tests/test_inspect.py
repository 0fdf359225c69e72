"""`verifier inspect` on the embedded default model, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner, Result

from verifier.cli import cli
from verifier.data import load_dataset
from verifier.graph import Activation, Conv, Elementwise, Graph, Linear, Pool, Reshape
from verifier.report.inspection import inspect_model, render_inspection, summarise_graph

MODEL = Path(__file__).resolve().parents[1] / "onnx_models" / "digits_mlp.onnx"
PARAMETERS = {
    "fc1.weight": [32, 64],
    "fc1.bias": [32],
    "fc2.weight": [32, 32],
    "fc2.bias": [32],
    "fc3.weight": [10, 32],
    "fc3.bias": [10],
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_inspect_prints_the_clean_accuracy() -> None:
    result = invoke("inspect", str(MODEL), "--data", "digits")
    assert result.exit_code == 0, result.output
    match = re.search(r"^accuracy\s+([0-9.]+)", result.stdout, re.MULTILINE)
    assert match is not None, result.stdout
    assert float(match.group(1)) >= 0.95
    for name in PARAMETERS:
        assert name in result.stdout
    assert "3,466" in result.stdout


def test_inspect_json_summary() -> None:
    result = invoke("inspect", str(MODEL), "--data", "digits", "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model_sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert (summary["input_shape"], summary["n_classes"]) == ([64], 10)
    assert {p["name"]: p["shape"] for p in summary["parameters"]} == PARAMETERS
    assert summary["n_parameters"] == sum(p["count"] for p in summary["parameters"]) == 3466
    assert [op["kind"] for op in summary["ops"]] == [
        "linear",
        "activation",
        "linear",
        "activation",
        "linear",
    ]
    assert summary["ops"][-1]["output_shape"] == [10]
    data = summary["data"]
    assert (data["name"], data["split"], data["n_samples"]) == ("digits", "test", 797)
    assert data["sha256"] == load_dataset("digits", split="test").source_sha256
    assert data["accuracy"] == pytest.approx(data["n_correct"] / 797) and data["accuracy"] >= 0.95


def test_inspect_without_data_has_no_accuracy() -> None:
    result = invoke("inspect", str(MODEL), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"] is None
    assert "accuracy" not in invoke("inspect", str(MODEL)).stdout


def test_accuracy_matches_onnxruntime() -> None:
    data = load_dataset("digits", split="test")
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: data.x.numpy()})
    expected = int((np.argmax(logits, axis=1) == data.y.numpy()).sum())
    summary = inspect_model(MODEL, data_ref="digits", split="test", data_dir=None)
    assert summary["data"]["n_correct"] == expected


def _npz_writer(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        np.savez(path, **arrays)

    return write


def _not_a_zip(path: Path) -> None:
    path.write_bytes(b"definitely not a zip archive")


_NAN_X = np.zeros((3, 64), np.float32)
_NAN_X[1, 5] = np.nan
_LABELS = np.array([0, 1, 2])

BAD_DATA: dict[str, tuple[Callable[[Path], None] | None, list[str], str]] = {
    "not a zip": (_not_a_zip, [], "not an .npz archive"),
    "missing file": (None, [], "file not found"),
    "missing y": (_npz_writer(x=np.zeros((3, 64), np.float32)), [], "array 'y' is missing"),
    "nan": (_npz_writer(x=_NAN_X, y=_LABELS), [], "NaN or Inf"),
    "float labels": (_npz_writer(x=np.zeros((3, 64)), y=np.ones(3)), [], "integer class labels"),
    "label out of range": (
        _npz_writer(x=np.zeros((3, 64)), y=np.array([0, 10, 1])),
        [],
        "label 10 at index 1",
    ),
    "wrong shape": (_npz_writer(x=np.zeros((3, 63)), y=_LABELS), [], "expects (64,)"),
    "unknown split": (
        _npz_writer(x=np.zeros((3, 64)), y=_LABELS),
        ["--split", "train"],
        "no split 'train'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_file_exits_2_with_one_line(case: str, tmp_path: Path) -> None:
    write, extra, fragment = BAD_DATA[case]
    path = tmp_path / "user.npz"
    if write is not None:
        write(path)
    result = invoke("inspect", str(MODEL), "--data", str(path), *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--data", "fashion"], "unknown data set 'fashion'"),
        (["--data", "digits", "--split", "val"], "no split 'val'"),
        (["--data", "mnist", "--data-dir", "{tmp}"], "LID_DATA_DIR"),
    ],
)
def test_bad_data_reference_exits_2(args: list[str], fragment: str, tmp_path: Path) -> None:
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = invoke("inspect", str(MODEL), *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr


def test_missing_model_exits_2(tmp_path: Path) -> None:
    result = invoke("inspect", str(tmp_path / "absent.onnx"))
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "absent.onnx" in result.stderr


def test_render_covers_every_op_kind() -> None:
    gen = torch.Generator().manual_seed(0)
    graph = Graph(
        ops=(
            Elementwise(node="Sub_0", op="sub", constant=torch.full((1, 1, 1), 0.5)),
            Conv(node="Conv_0", weight="conv.weight", bias="conv.bias"),
            Activation(node="Relu_0", function="relu"),
            Pool(node="MaxPool_0", function="max", kernel=(2, 2), strides=(2, 2)),
            Reshape(node="Flatten_0", shape=(8,)),
            Linear(node="Gemm_0", weight="fc.weight", bias=None),
        ),
        parameters={
            "conv.weight": torch.randn(2, 1, 3, 3, generator=gen),
            "conv.bias": torch.randn(2, generator=gen),
            "fc.weight": torch.randn(3, 8, generator=gen),
        },
        input_name="image",
        input_shape=(1, 6, 6),
        output_name="logits",
        n_classes=3,
    )
    summary = {"model_path": "cnn.onnx", "model_sha256": "0" * 64, **summarise_graph(graph)}
    summary["data"] = None
    json.dumps(summary)
    text = render_inspection(summary)
    assert [op["output_shape"] for op in summary["ops"]] == [
        [1, 6, 6],
        [2, 4, 4],
        [2, 4, 4],
        [2, 2, 2],
        [8],
        [3],
    ]
    assert summary["n_parameters"] == 18 + 2 + 24
    fragments = ("x sub constant (1, 1, 1)", "conv.weight (2, 1, 3, 3)", "max 2x2", "to (8,)")
    for fragment in fragments:
        assert fragment in text, text
