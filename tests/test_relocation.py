"""Relocatable output folders (issue 23): `verifier verify` works where the folder was moved.

The certificate records its paths relative to its own folder. A reviewer who receives the
output folder, the model and the data on another machine (here: another folder, another working
directory, the original deleted) verifies it as it is; a model put elsewhere is found by its
sha256 beside the folder, or given with `--model`; a wrong model fails with one clear line.
Certificates of schema version 2 (absolute paths) still verify.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from tests.test_cli_pipeline import MODEL, invoke
from tests.test_report import make_run
from verifier.cli import ExitCode
from verifier.domains.io import load_lid, save_lid
from verifier.files import file_sha256
from verifier.spec import parse_spec, resolve_paths, spec_hash


@dataclass(frozen=True)
class Moved:
    """A run's folder (out/, model.onnx, digits_test.npz) copied elsewhere, the original gone."""

    root: Path
    certificate: dict[str, Any]

    @property
    def out(self) -> Path:
        return self.root / "out"


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> Moved:
    run = make_run(tmp_path_factory.mktemp("relocation_original"))
    assert run.result.exit_code == ExitCode.OK, run.result.output
    root = tmp_path_factory.mktemp("relocation_elsewhere") / "received"
    shutil.copytree(run.folder, root)
    shutil.rmtree(run.folder)  # nothing may be read from the original place
    doc = json.loads((root / "out" / "certificate.json").read_text(encoding="utf-8"))
    return Moved(root, doc)


def _copy(moved: Moved, target: Path) -> Path:
    shutil.copytree(moved.root, target)
    return target


def _verified(result: Result) -> str:
    assert result.exit_code == ExitCode.OK, result.output
    assert "Traceback" not in result.output
    assert result.stdout.splitlines()[-1].startswith("verdict: verified (")
    return result.stdout


def _one_failure(result: Result) -> str:
    assert result.exit_code == ExitCode.SPEC_NOT_MET, result.output
    assert "Traceback" not in result.output
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("FAILED")]
    assert result.stdout.splitlines()[-1].startswith("verdict: FAILED")
    return line


def test_certificate_records_no_absolute_path(moved: Moved) -> None:
    doc = moved.certificate
    assert doc["schema_version"] == "3"
    assert doc["model"]["path"] == "../model.onnx"
    assert doc["lid"]["path"] == "lid.safetensors"
    assert not Path(doc["working_directory"]).is_absolute()
    assert doc["spec"]["model"] == "../model.onnx"
    assert doc["spec"]["data"]["name"] == "../digits_test.npz"
    assert doc["tasks"][0]["data"]["name"] == "../digits_test.npz"
    # the recorded spec, read as a spec file saved in the folder, names the files beside it
    spec = resolve_paths(parse_spec(doc["spec"], source=Path("certificate.json")), moved.out)
    assert Path(spec.model) == (moved.root / "model.onnx").resolve()
    assert doc["spec_sha256"] == spec_hash(parse_spec(doc["spec"], source=Path("x")))
    assert load_lid(moved.out / "lid.safetensors").metadata["spec_sha256"] == doc["spec_sha256"]


def test_moved_folder_verifies_from_another_working_directory(
    moved: Moved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = _verified(invoke("verify", moved.out))
    assert re.search(
        rf"^ok\s+model\s+sha256 of {re.escape(str(moved.root))}/model\.onnx", text, re.M
    )
    assert "note" not in text.split()  # found where recorded: nothing to remark


def test_verify_by_a_relative_folder_path(moved: Moved, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(moved.root)
    _verified(invoke("verify", "out"))


def test_model_found_beside_the_folder_by_sha256(moved: Moved, tmp_path: Path) -> None:
    root = _copy(moved, tmp_path / "review")
    (root / "model.onnx").rename(root / "out" / "the-model-we-got.onnx")
    (root / "digits_test.npz").rename(root / "out" / "digits_test.npz")
    (root / "another.onnx").write_bytes(b"not even onnx")  # hashed, not taken
    text = _verified(invoke("verify", root / "out"))
    assert re.search(
        r"^note\s+model\s+using .*/the-model-we-got\.onnx, found by its sha256", text, re.M
    )
    assert re.search(r"^note\s+data\s+data .*digits_test\.npz not found; using", text, re.M)


def test_model_given_with_the_model_option(moved: Moved, tmp_path: Path) -> None:
    root = _copy(moved, tmp_path / "review")
    given = tmp_path / "models" / "renamed.onnx"
    given.parent.mkdir()
    (root / "model.onnx").rename(given)
    text = _verified(invoke("verify", root / "out", "--model", given))
    assert f"using --model {given}" in text


def test_wrong_model_fails_with_one_clear_line(moved: Moved, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.onnx"
    shutil.copyfile(MODEL, wrong)
    data = bytearray(wrong.read_bytes())
    data[-40] ^= 0x01  # a different weight: same graph, another sha256
    wrong.write_bytes(bytes(data))
    line = _one_failure(invoke("verify", moved.out, "--model", wrong))
    recorded = moved.certificate["model"]["sha256"]
    assert re.search(
        rf"--model {re.escape(str(wrong))} is not the model of this certificate: its sha256 is "
        rf"{file_sha256(wrong)}; certificate\.json model\.sha256 records {recorded}",
        line,
    )


def test_missing_model_fails_with_one_clear_line(moved: Moved, tmp_path: Path) -> None:
    root = _copy(moved, tmp_path / "review")
    (root / "model.onnx").unlink()
    line = _one_failure(invoke("verify", root / "out"))
    assert "model.onnx: model file not found, and no .onnx file in" in line
    assert "pass --model PATH" in line


def _as_version_2(out: Path) -> None:
    """Rewrite a folder the way schema version 2 recorded it: absolute paths, and the spec hash
    (in the certificate and the LID's metadata) of the spec with absolute paths."""
    path = out / "certificate.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    spec = resolve_paths(parse_spec(doc["spec"], source=path), out)
    lid_path = out / "lid.safetensors"
    lid = load_lid(lid_path)
    metadata = {k: v for k, v in lid.metadata.items() if k != "content_sha256"}
    metadata["spec_sha256"] = spec_hash(spec)
    save_lid(lid_path, lid.domain, metadata)
    doc["schema_version"] = "2"
    doc["working_directory"] = str(out.parent)
    doc["model"]["path"] = spec.model
    doc["lid"]["path"] = str(lid_path)
    doc["lid"]["sha256"] = file_sha256(lid_path)
    doc["lid"]["content_sha256"] = load_lid(lid_path).metadata["content_sha256"]
    doc["spec"] = spec.model_dump(mode="json")
    doc["spec_sha256"] = spec_hash(spec)
    doc["tasks"][0]["data"]["name"] = spec.data.name
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def test_schema_version_2_certificate_still_verifies(
    moved: Moved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(moved, tmp_path / "old")
    _as_version_2(root / "out")
    monkeypatch.chdir(tmp_path)
    text = _verified(invoke("verify", root / "out"))
    assert "matches its JSON Schema (version 2)" in text
    assert invoke("report", root / "out").exit_code == ExitCode.OK
