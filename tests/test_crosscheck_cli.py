"""`verifier crosscheck` on the digits MLP: the JSON layout, exit codes 0 / 1 / 2, workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from verifier.cli import ExitCode, cli
from verifier.crosscheck import run as crosscheck_run
from verifier.domains import Box, Zonotope
from verifier.domains.io import save_lid, tensors_sha256
from verifier.files import file_sha256
from verifier.onnx.importer import load_graph

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "onnx_models" / "digits_mlp.onnx"

MARGIN_KEYS = {
    "class",
    "ibp",
    "crown_ibp",
    "exact",
    "exact_status",
    "best_bound",
    "falsified",
}


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_lid(path: Path, relative: float, *, model_sha: str | None = None) -> Path:
    """A box of +-relative*|w| around every parameter of the digits MLP, as `verifier lid`
    would record it (model and θ0 hashes)."""
    graph = load_graph(MODEL)
    theta0 = dict(graph.parameters)
    box = Box.around(
        {n: t.to(torch.float64) for n, t in theta0.items()}, radius=0, relative=relative
    )
    metadata = {
        "model_sha256": model_sha or file_sha256(MODEL),
        "theta0_sha256": tensors_sha256(theta0),
    }
    save_lid(path, box, metadata)
    return path


@pytest.fixture(scope="module")
def lid_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lid(tmp_path_factory.mktemp("lid") / "lid.safetensors", 0.01)


def assert_bad_input(result: Result, pattern: str) -> None:
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and pattern in errors[0], result.stderr
    assert "Traceback" not in result.output


def test_crosscheck_sound_lid_exits_0_and_writes_json(lid_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("crosscheck", MODEL, lid_path, "digits", "--samples", "3", "-o", out, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "crosscheck.json").read_text(encoding="utf-8"))
    assert doc["schema_version"] == "1"
    assert doc["model_sha256"] == file_sha256(MODEL)
    assert doc["lid_sha256"] == file_sha256(lid_path)
    assert doc["data"]["name"] == "digits" and doc["data"]["n_checked"] == 3
    assert doc["exact_method"] == "auto" and doc["timeout_s"] == 60.0
    assert [s["index"] for s in doc["samples"]] == [0, 1, 2]
    for sample in doc["samples"]:
        assert isinstance(sample["certified_ibp"], bool)
        assert len(sample["margins"]) == 9
        for margin in sample["margins"]:
            assert MARGIN_KEYS <= set(margin)
            assert margin["exact_status"] == "optimal"
            assert margin["ibp"] <= margin["exact"] + 1e-9
            assert margin["crown_ibp"] <= margin["exact"] + 1e-9
            assert margin["exact"] <= margin["falsified"] + 1e-6 * max(1, abs(margin["exact"]))
            assert margin["best_bound"] == margin["exact"]
    summary = doc["summary"]
    assert summary["verdict"] == "sound" and summary["violations"] == 0
    assert summary["n_samples"] == 3 and summary["n_margins"] == 27
    assert summary["exact"] == {"solved": 27, "timeout": 0, "skipped": 0}
    for method in ("ibp", "crown_ibp"):
        assert set(summary["gaps"][method]) >= {"mean", "median", "max"}
        assert summary["gaps"][method]["mean"] >= -1e-9
    assert summary["gaps"]["crown_ibp"]["mean"] <= summary["gaps"]["ibp"]["mean"]
    assert summary["time_s"] > 0


def test_crosscheck_text_output_without_exact(lid_path: Path) -> None:
    result = invoke("crosscheck", MODEL, lid_path, "digits", "--samples", "2", "--exact", "none")
    assert result.exit_code == ExitCode.OK, result.output
    assert "verdict: sound (0 violations)" in result.stdout
    assert "0 solved, 0 timed out, 18 skipped" in result.stdout


def test_unsound_bound_exits_1(
    lid_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = crosscheck_run.margin_bounds

    def inflated(*args: object, **kwargs: object) -> object:
        bounds = real(*args, **kwargs)  # type: ignore[arg-type]
        return type(bounds)(bounds.lower + 100.0, bounds.rounding)

    monkeypatch.setattr(crosscheck_run, "margin_bounds", inflated)
    out = tmp_path / "out"
    result = invoke("crosscheck", MODEL, lid_path, "digits", "--samples", "1", "-o", out)
    assert result.exit_code == 1, result.output
    assert "SOUNDNESS VIOLATION: certified sample 0" in result.stderr
    assert "verdict: violation (9 violations)" in result.stdout
    doc = json.loads((out / "crosscheck.json").read_text(encoding="utf-8"))
    assert doc["summary"]["verdict"] == "violation" and doc["summary"]["violations"] == 9
    witness = load_file(str(out / "violation_0_1.safetensors"))
    assert set(witness) == set(load_graph(MODEL).parameters)


@pytest.mark.slow
def test_jobs_give_the_same_result(lid_path: Path) -> None:
    args = ("crosscheck", MODEL, lid_path, "digits", "--samples", "2", "--json")
    one, two = invoke(*args), invoke(*args, "--jobs", "2")
    assert one.exit_code == two.exit_code == ExitCode.OK, two.output
    margins = [json.loads(r.stdout)["samples"] for r in (one, two)]
    for a, b in zip(*margins, strict=True):
        for m, n in zip(a["margins"], b["margins"], strict=True):
            assert (m["exact"], m["falsified"], m["ibp"]) == (n["exact"], n["falsified"], n["ibp"])


def test_missing_files_exit_2(lid_path: Path, tmp_path: Path) -> None:
    assert_bad_input(invoke("crosscheck", tmp_path / "no.onnx", lid_path, "digits"), "no.onnx")
    missing = tmp_path / "no.safetensors"
    assert_bad_input(invoke("crosscheck", MODEL, missing, "digits"), "LID file not found")


def test_lid_for_another_model_exits_2(tmp_path: Path) -> None:
    other = write_lid(tmp_path / "other.safetensors", 0.01, model_sha="0" * 64)
    path = tmp_path / "moved.safetensors"
    # same shapes, other weights: a LID of another model
    graph = load_graph(MODEL)
    shifted = {n: t.to(torch.float64) + 1.0 for n, t in graph.parameters.items()}
    save_lid(path, Box.around(shifted, radius=0.01), {"model_sha256": "0" * 64})
    assert_bad_input(invoke("crosscheck", MODEL, path, "digits"), "computed for another model")
    # another model's hash but this model's own weights (a re-export): accepted
    result = invoke("crosscheck", MODEL, other, "digits", "--samples", "1", "--exact", "none")
    assert result.exit_code == ExitCode.OK, result.output


def test_lid_with_wrong_shapes_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "wrong.safetensors"
    box = Box({"fc1.weight": torch.zeros(3, 3)}, {"fc1.weight": torch.ones(3, 3)})
    save_lid(path, box, {})
    assert_bad_input(invoke("crosscheck", MODEL, path, "digits"), "fc1.weight")


def test_wrong_data_shape_exits_2(lid_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((4, 10), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    assert_bad_input(invoke("crosscheck", MODEL, lid_path, str(path)), "expects (64,)")


def test_bad_options_exit_2(lid_path: Path) -> None:
    result = invoke("crosscheck", MODEL, lid_path, "digits", "--exact", "magic")
    assert result.exit_code == ExitCode.BAD_INPUT
    result = invoke("crosscheck", MODEL, lid_path, "digits", "--jobs", "0")
    assert result.exit_code == ExitCode.BAD_INPUT


def test_zonotope_lid_is_refused_with_one_line_exit_2(tmp_path: Path) -> None:
    """The cross-check's bounds, falsifiers and exact solvers are box-only: a zonotope LID is
    refused (its hull would cross-check another claim than its certificate's)."""
    graph = load_graph(MODEL)
    theta0 = {n: t.to(torch.float64) for n, t in graph.parameters.items()}
    box = Box.around(theta0, radius=0, relative=0.01)
    generators = {
        n: torch.full((2, *t.shape), 1e-3, dtype=torch.float64) for n, t in theta0.items()
    }
    path = tmp_path / "zonotope.safetensors"
    save_lid(path, Zonotope.from_box(box, generators), {"model_sha256": file_sha256(MODEL)})
    result = invoke("crosscheck", MODEL, path, "digits", "--samples", "1", "-o", tmp_path / "o")
    assert_bad_input(result, "a zonotope LID (k = 2 generators)")
    assert "supports box LIDs only" in result.stderr
    assert not (tmp_path / "o").exists()
