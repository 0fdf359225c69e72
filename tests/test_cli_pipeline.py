"""`verifier lid` / `certify` end to end on the digits MLP: artifacts, exit codes, bad input.

Exit codes: 0 when the certificate holds, 1 when it does not (the LID is still written), 2 with
one `error:` line on stderr for anything the user can fix. One short LID search is shared by
the module (20 iterations, a few seconds).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result

from verifier.cli import ExitCode, cli
from verifier.domains import Box
from verifier.domains.io import load_lid, save_lid
from verifier.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "onnx_models" / "digits_mlp.onnx"
ITERATIONS = 20


def write_spec(folder: Path, name: str = "spec.yaml", **overrides: Any) -> Path:
    """A small digits job (absolute model path) with `overrides` merged at the top level."""
    document: dict[str, Any] = {
        "model": str(MODEL),
        "data": {"name": "digits", "split": "test"},
        "tasks": [{"name": "digits", "metric": "accuracy", "target": 0.5}],
        "search": {"iterations": ITERATIONS},
        "certify": {"beta": 0.001},
    }
    document.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@dataclass(frozen=True)
class LidRunOutput:
    result: Result
    out_dir: Path

    @property
    def lid_path(self) -> Path:
        return self.out_dir / "lid.safetensors"

    @property
    def certificate(self) -> dict[str, Any]:
        return json.loads((self.out_dir / "certificate.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def easy_run(tmp_path_factory: pytest.TempPathFactory) -> LidRunOutput:
    """`verifier lid --json` with an absolute target of 0.5, which the clean 0.97 easily meets."""
    folder = tmp_path_factory.mktemp("easy")
    out_dir = folder / "out"
    result = invoke("lid", write_spec(folder), "-o", out_dir, "--json")
    return LidRunOutput(result, out_dir)


# ---------------------------------------------------------------- verifier lid


def test_lid_that_holds_exits_0_and_writes_its_artifacts(easy_run: LidRunOutput) -> None:
    result = easy_run.result
    assert result.exit_code == ExitCode.OK, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for name in ("lid.safetensors", "certificate.json", "history.jsonl"):
        assert (easy_run.out_dir / name).is_file(), name
    doc = easy_run.certificate
    assert doc["verdict"] == "holds"
    assert doc["holds"] is True
    (task,) = doc["tasks"]
    assert task["target"] == 0.5
    assert 0 < task["k"] <= task["n"]
    assert task["lower_bound"] >= task["target"]
    assert task["holds"] is True
    # --json: stdout is exactly the certificate document, progress went to stderr
    assert json.loads(result.stdout) == doc
    assert "LID search" in result.stderr


def test_lid_history_has_one_json_line_per_iteration(easy_run: LidRunOutput) -> None:
    lines = (easy_run.out_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == ITERATIONS
    steps = [json.loads(line) for line in lines]
    assert all(isinstance(step, dict) for step in steps)
    assert [step["iteration"] for step in steps] == list(range(1, ITERATIONS + 1))


def test_lid_file_loads_and_matches_the_certificate(easy_run: LidRunOutput) -> None:
    lid = load_lid(easy_run.lid_path)
    doc = easy_run.certificate
    assert lid.model_sha256 == doc["model"]["sha256"]
    assert lid.box.n_parameters() == doc["lid"]["n_parameters"]
    assert doc["lid"]["sha256"] == file_sha256(easy_run.lid_path)


def test_lid_with_unreachable_target_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    # k <= n = 399 held-out samples: even k = n gives a Clopper-Pearson bound below 0.999
    spec = write_spec(tmp_path, tasks=[{"name": "digits", "target": 0.999}])
    out_dir = tmp_path / "out"
    result = invoke("lid", spec, "-o", out_dir)
    assert result.exit_code == ExitCode.SPEC_NOT_MET, result.output
    assert "not certifiable: task 'digits': τ = 0.9990" in result.stderr
    assert not (out_dir / "lid.safetensors").exists()


def test_lid_with_a_failing_certificate_exits_1_and_still_writes(tmp_path: Path) -> None:
    # a search aimed at τ itself on the optimisation part (slack 0, no ladder) leaves the
    # held-out rate near τ, so its Clopper-Pearson bound falls below τ
    spec = write_spec(
        tmp_path,
        tasks=[{"name": "digits", "target": 0.9}],
        search={"iterations": 300, "lr": 1.0, "target_slack": 0.0},
        certify={"beta": 0.001, "ladder": {"scales": [1.0], "targets": 1}},
    )
    out_dir = tmp_path / "out"
    result = invoke("lid", spec, "-o", out_dir)
    assert result.exit_code == ExitCode.SPEC_NOT_MET, result.output
    assert "verdict: not met" in result.stdout
    assert "WARNING: no candidate of the ladder met every target" in result.stdout
    assert (out_dir / "lid.safetensors").is_file()
    doc = json.loads((out_dir / "certificate.json").read_text(encoding="utf-8"))
    assert doc["verdict"] == "not met"
    assert doc["holds"] is False
    assert doc["tasks"][0]["holds"] is False
    assert load_lid(out_dir / "lid.safetensors").box.n_parameters() > 0


# ---------------------------------------------------------------- verifier certify


@pytest.mark.parametrize(("target", "code"), [(0.5, ExitCode.OK), (0.999, ExitCode.SPEC_NOT_MET)])
def test_certify_exit_code_follows_the_target(
    easy_run: LidRunOutput, target: float, code: ExitCode
) -> None:
    result = invoke(
        "certify",
        MODEL,
        easy_run.lid_path,
        "digits",
        "--split",
        "test",
        "--target",
        str(target),
        "--json",
    )
    assert result.exit_code == code, result.output
    doc = json.loads(result.stdout)
    assert doc["n"] == 797  # the whole digits test split counts as held out
    assert 0 < doc["k"] <= doc["n"]
    assert doc["holds"] is (code == ExitCode.OK)
    assert doc["verdict"] == ("holds" if code == ExitCode.OK else "not met")
    assert doc["lid_model_match"] is True


# ---------------------------------------------------------------- bad input: exit 2


def assert_bad_input(result: Result, pattern: str) -> str:
    """Exit 2, nothing on stdout, exactly one `error:` line on stderr matching `pattern`."""
    assert result.exit_code == ExitCode.BAD_INPUT, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def test_lid_bad_spec_key_names_the_key(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, search={"iterations": 5, "foo": 1})
    line = assert_bad_input(
        invoke("lid", spec, "-o", tmp_path / "out"), r"unknown key 'search\.foo'"
    )
    assert str(spec) in line
    assert not (tmp_path / "out").exists()


def test_lid_missing_spec_file(tmp_path: Path) -> None:
    spec = tmp_path / "absent.yaml"
    line = assert_bad_input(invoke("lid", spec, "-o", tmp_path / "out"), "not found")
    assert str(spec) in line


def test_lid_spec_naming_a_missing_model(tmp_path: Path) -> None:
    model = tmp_path / "absent.onnx"
    spec = write_spec(tmp_path, model=str(model))
    line = assert_bad_input(invoke("lid", spec, "-o", tmp_path / "out"), "no such file")
    assert str(model) in line


def test_run_bad_spec_key_exits_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, colour="blue")
    assert_bad_input(invoke("run", spec, "-o", tmp_path / "out"), "unknown key 'colour'")


def _safetensors_data_start(path: Path) -> int:
    """Offset of the tensor bytes: 8-byte little-endian header length, then the JSON header."""
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_length


def _not_safetensors(folder: Path, lid: Path) -> Path:
    path = folder / "lid.safetensors"
    path.write_bytes(b"this is not a safetensors file\n" * 4)
    return path


def _truncated(folder: Path, lid: Path) -> Path:
    path = folder / "lid.safetensors"
    path.write_bytes(lid.read_bytes()[: _safetensors_data_start(lid) + 16])
    return path


def _tampered(folder: Path, lid: Path) -> Path:
    path = folder / "lid.safetensors"
    shutil.copyfile(lid, path)
    data = bytearray(path.read_bytes())
    start = _safetensors_data_start(path)
    for i in range(start, start + 8):  # the first float64 of the first tensor
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def _other_model(folder: Path, lid: Path) -> Path:
    name = next(iter(load_lid(lid).box.lower))  # a real parameter name, another shape
    box = Box({name: torch.zeros(2, 3)}, {name: torch.ones(2, 3)})
    path = folder / "lid.safetensors"
    save_lid(path, box, {"model_sha256": "0" * 64})
    return path


BAD_LIDS = {
    "not safetensors": (_not_safetensors, "not a valid LID"),
    "truncated": (_truncated, "not a valid LID"),
    "tampered": (_tampered, "content hash mismatch"),
    "other model": (_other_model, r"shape \(\d+(, \d+)*\) in the model but \(2, 3\) in the LID"),
}


@pytest.mark.parametrize("case", sorted(BAD_LIDS))
def test_certify_bad_lid_exits_2(easy_run: LidRunOutput, tmp_path: Path, case: str) -> None:
    make, pattern = BAD_LIDS[case]
    path = make(tmp_path, easy_run.lid_path)
    result = invoke("certify", MODEL, path, "digits", "--target", "0.5")
    line = assert_bad_input(result, pattern)
    assert str(path) in line


def _digits_like(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 64), dtype=np.float32)


BAD_DATA = {
    "label outside the classes": (
        {"x": _digits_like(8), "y": np.array([0, 1, 2, 3, 4, 5, 6, 12])},
        r"label 12 at index 7 is outside the model's classes 0\.\.9",
    ),
    "negative label": (
        {"x": _digits_like(4), "y": np.array([0, -1, 2, 3])},
        r"'y' must hold class indices >= 0; found -1 at index 1",
    ),
    "float labels": (
        {"x": _digits_like(4), "y": np.array([0.0, 1.0, 2.0, 3.0])},
        "'y' must hold integer class labels",
    ),
    "labels of another length": (
        {"x": _digits_like(4), "y": np.array([0, 1, 2])},
        "same length",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_certify_npz_with_bad_labels_exits_2(
    easy_run: LidRunOutput, tmp_path: Path, case: str
) -> None:
    arrays, pattern = BAD_DATA[case]
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    result = invoke("certify", MODEL, easy_run.lid_path, str(path), "--target", "0.5")
    assert_bad_input(result, pattern)


def test_certify_unknown_data_set_exits_2(easy_run: LidRunOutput) -> None:
    result = invoke("certify", MODEL, easy_run.lid_path, "no-such-data", "--target", "0.5")
    assert_bad_input(result, "unknown data set 'no-such-data'")


def test_lid_unknown_data_set_exits_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, data={"name": "no-such-data"})
    result = invoke("lid", spec, "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown data set 'no-such-data'" in errors[0], result.stderr
    assert result.stderr.splitlines()[-1] == errors[0]


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name: str) -> None:
    command = cli.commands[name]
    assert command.help and command.help.strip(), f"command '{name}' has no help text"
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    first_line = command.help.strip().splitlines()[0]
    assert " ".join(first_line.split()) in " ".join(result.stdout.split())  # click rewraps


def test_group_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for name in cli.commands:
        assert re.search(rf"^\s+{re.escape(name)}\s", result.stdout, re.MULTILINE), name


@pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"
)
def test_bab_on_a_cnn_exits_2_before_the_search_and_writes_nothing(tmp_path: Path) -> None:
    from tests.model_zoo import TORCH_MODELS, export_torch

    model = export_torch("cnn_geometry", "legacy", tmp_path)
    shape = TORCH_MODELS["cnn_geometry"][1]
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.random((40, *shape)).astype(np.float32), y=rng.integers(0, 2, 40))
    spec = write_spec(
        tmp_path,
        model=str(model.path),
        data={"name": str(data)},
        certify={"method": "bab"},
    )
    out = tmp_path / "out"
    line = assert_bad_input(invoke("run", spec, "-o", out), r"node .*branch and bound")
    assert "conv" in line.lower()
    assert not (out / "lid.safetensors").exists() and not (out / "certificate.json").exists()
