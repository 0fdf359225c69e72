"""`verifier verify OUT/`: a clean run verifies; every kind of tampering is caught precisely.

Tampering with the output folder works on a copy; tampering with the model or the data (which
the certificate names by absolute path) changes the module's copies and restores them after.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import Result
from onnx import numpy_helper

from tests.test_cli_pipeline import MODEL, assert_bad_input, invoke, write_spec
from tests.test_prefix import (
    TOKEN_FEATURES,
    TOKENS,
    _Classifier,
    _export,
    _labelled,
    _spec,
)
from tests.test_report import N_SAMPLES, RunFolder, copy_out, make_run
from verifier.cli import ExitCode
from verifier.data.digits import digits_arrays
from verifier.domains import Box, Zonotope
from verifier.domains.io import load_lid, save_lid
from verifier.onnx.prefix import PrefixedGraph, load_split_model


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> RunFolder:
    run = make_run(tmp_path_factory.mktemp("verify"))
    assert run.result.exit_code == ExitCode.OK, run.result.output
    return run


def failed_lines(result: Result) -> list[str]:
    """The FAILED check lines of a human-readable `verifier verify` run that exited 1."""
    assert result.exit_code == ExitCode.SPEC_NOT_MET, result.output
    assert "Traceback" not in result.output
    assert result.stdout.splitlines()[-1].startswith("verdict: FAILED")
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("FAILED")]
    assert lines, result.stdout
    return lines


def assert_reported(lines: list[str], *patterns: str) -> None:
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in lines), (pattern, lines)


@contextlib.contextmanager
def modified(path: Path, change: Callable[[Path], None]) -> Iterator[None]:
    """Apply `change` to a file and restore its bytes afterwards, whatever happens."""
    original = path.read_bytes()
    try:
        change(path)
        yield
    finally:
        path.write_bytes(original)


# ---------------------------------------------------------------- clean run


def test_clean_run_verifies(run_folder: RunFolder) -> None:
    result = invoke("verify", run_folder.out_dir)
    assert result.exit_code == ExitCode.OK, result.output
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("verdict: verified (")
    assert not [ln for ln in lines if ln.startswith("FAILED")]
    text = result.stdout
    task = run_folder.certificate["tasks"][0]
    assert f"{task['k']}/{task['n']} certified" in text
    assert run_folder.certificate["model"]["sha256"] in text
    # what cannot be recomputed is said so, never counted as verified
    assert re.search(r"^not recomputed\s+search\s+\d+ checkpoints", text, re.MULTILINE)
    assert "recomputing the held-out certificate" in result.stderr


def test_verify_json(run_folder: RunFolder) -> None:
    result = invoke("verify", run_folder.out_dir, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "verified"
    assert doc["counts"]["failed"] == 0 and doc["counts"]["ok"] >= 15
    subjects = {c["subject"] for c in doc["checks"] if c["status"] == "ok"}
    assert {"certificate.json", "spec", "model", "lid", "task 'digits'", "search"} <= subjects


def test_verify_with_a_moved_model(run_folder: RunFolder, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.onnx"
    shutil.copyfile(run_folder.model, moved)
    result = invoke("verify", run_folder.out_dir, "--model", moved)
    assert result.exit_code == ExitCode.OK, result.output
    assert f"using --model {moved}" in result.stdout


# ---------------------------------------------------------------- tampered LID


def _data_start(path: Path) -> int:
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_length


def test_lid_bytes_flipped(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    lid = out / "lid.safetensors"
    data = bytearray(lid.read_bytes())
    start = _data_start(lid)
    data[start : start + 8] = bytes(b ^ 0x5A for b in data[start : start + 8])
    lid.write_bytes(bytes(data))
    lines = failed_lines(invoke("verify", out))
    assert_reported(
        lines,
        rf"sha256 of {re.escape(str(lid))} is [0-9a-f]{{64}}; certificate\.json lid\.sha256 "
        rf"records '{run_folder.certificate['lid']['sha256']}'",
        "content hash mismatch: the LID tensors were modified",
    )


def test_lid_tensor_widened_and_resaved(run_folder: RunFolder, tmp_path: Path) -> None:
    """A consistent re-save (valid content hash) with one interval widened is still caught."""
    out = copy_out(run_folder, tmp_path)
    path = out / "lid.safetensors"
    lid = load_lid(path)
    upper = {n: t.clone() for n, t in lid.box.upper.items()}
    upper["fc1.weight"][0, 0] += 0.5
    metadata = {k: v for k, v in lid.metadata.items() if k != "content_sha256"}
    save_lid(path, Box(dict(lid.box.lower), upper), metadata)
    lines = failed_lines(invoke("verify", out))
    recorded = run_folder.certificate["lid"]
    assert_reported(
        lines,
        r"certificate\.json lid\.sha256 records",
        r"certificate\.json lid\.content_sha256: recomputed '[0-9a-f]{64}', recorded",
        rf"certificate\.json lid\.mean_width: recomputed [0-9.e-]+, "
        rf"recorded {recorded['mean_width']}",
        r"lid\.per_tensor\.fc1\.weight\.max_width: recomputed 0\.5",
    )


def test_lid_missing(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    (out / "lid.safetensors").unlink()
    lines = failed_lines(invoke("verify", out))
    assert_reported(lines, rf"{re.escape(str(out / 'lid.safetensors'))}: LID file not found")


# ---------------------------------------------------------------- tampered model and data


def _nudge_model(path: Path) -> None:
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == "fc1.weight")
    array = numpy_helper.to_array(init).copy()
    array[0, 0] += 0.25
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(path))


def test_model_changed(run_folder: RunFolder) -> None:
    recorded = run_folder.certificate["model"]["sha256"]
    with modified(run_folder.model, _nudge_model):
        lines = failed_lines(invoke("verify", run_folder.out_dir))
    model = re.escape(str(run_folder.model))
    assert_reported(
        lines,
        rf"sha256 of {model} is [0-9a-f]{{64}}; certificate\.json model\.sha256 records "
        rf"'{recorded}'",
        rf"lid\.safetensors metadata model_sha256 is '{recorded}'; the model's sha256 is",
        r"metadata theta0_sha256 is '[0-9a-f]{64}'; the sha256 of the model's weights is",
    )


def _nudge_data(path: Path) -> None:
    with np.load(path) as archive:
        x, y = archive["x"], archive["y"]
    np.savez(path, x=x + np.float32(1e-3), y=y)


def test_data_changed(run_folder: RunFolder) -> None:
    task = run_folder.certificate["tasks"][0]
    with modified(run_folder.data, _nudge_data):
        lines = failed_lines(invoke("verify", run_folder.out_dir))
    name = re.escape(str(run_folder.data))
    assert_reported(
        lines,
        rf"optimisation data of {name} \[test\] \(seeded split 0\) has sha256 [0-9a-f]{{64}}; "
        rf"certificate\.json tasks\[0\]\.optimisation_data_sha256 records "
        rf"'{task['optimisation_data_sha256']}'",
        rf"certification data of {name} \[test\] .* records '{task['certification_data_sha256']}'",
    )


def test_data_missing(run_folder: RunFolder, tmp_path: Path) -> None:
    moved = tmp_path / "moved.npz"
    run_folder.data.rename(moved)
    try:
        lines = failed_lines(invoke("verify", run_folder.out_dir))
    finally:
        moved.rename(run_folder.data)
    assert_reported(
        lines, rf"task 'digits'\s+cannot recompute: .*{re.escape(run_folder.data.name)}"
    )


# ---------------------------------------------------------------- tampered certificate


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        key: Any = int(last) if last.isdigit() else last
        node[key] = value(node[key]) if callable(value) else value

    return change


CERTIFICATE_EDITS = {
    # numbers
    "k": (_set("tasks.0.k", lambda k: k - 1), r"tasks\[0\]\.k: recomputed (\d+), recorded \d+"),
    "lower bound": (
        _set("tasks.0.lower_bound", lambda v: v + 0.01),
        r"tasks\[0\]\.lower_bound: recomputed 0\.\d+, recorded 0\.\d+",
    ),
    "per-class count": (
        _set("tasks.0.per_class.3.k", lambda k: k + 1),
        r"tasks\[0\]\.per_class\[3\]\.k: recomputed \d+, recorded \d+",
    ),
    "mean width": (
        _set("lid.mean_width", lambda w: w * 2),
        r"lid\.mean_width: recomputed [0-9.e-]+, recorded [0-9.e-]+",
    ),
    "search metric": (
        _set("search.optimisation_hard_metric", [1.0]),
        r"search\.optimisation_hard_metric\[0\]: recomputed 0\.\d+, recorded 1\.0",
    ),
    "verdict": (_set("verdict", "not met"), r"verdict: recomputed 'holds', recorded 'not met'"),
    # hash fields
    "model sha256": (
        _set("model.sha256", "0" * 64),
        r"sha256 of .*model\.onnx is [0-9a-f]{64}; certificate\.json model\.sha256 records '0{64}'",
    ),
    "lid sha256": (
        _set("lid.sha256", "1" * 64),
        r"sha256 of .*lid\.safetensors is [0-9a-f]{64}; "
        r"certificate\.json lid\.sha256 records '1{64}'",
    ),
    "data sha256": (
        _set("tasks.0.certification_data_sha256", "2" * 64),
        r"certification data of .* has sha256 [0-9a-f]{64}; certificate\.json "
        r"tasks\[0\]\.certification_data_sha256 records '2{64}'",
    ),
    "history sha256": (
        _set("search.history_sha256", "3" * 64),
        r"history\.jsonl is [0-9a-f]{64}; certificate\.json search\.history_sha256 records '3{64}'",
    ),
    "spec sha256": (
        _set("spec_sha256", "4" * 64),
        r"spec_sha256: recomputed '[0-9a-f]{64}', recorded '4{64}'",
    ),
    "spec target": (
        _set("spec.tasks.0.target", 0.1),
        r"spec_sha256: recomputed '[0-9a-f]{64}', recorded '[0-9a-f]{64}'",
    ),
    "schema": (
        _set("tasks.0.n", -5),
        r"fails its schema at tasks\[0\]\.n: -5 is less than the minimum of 0",
    ),
}


@pytest.mark.parametrize("case", sorted(CERTIFICATE_EDITS))
def test_certificate_edit_is_caught(run_folder: RunFolder, tmp_path: Path, case: str) -> None:
    change, pattern = CERTIFICATE_EDITS[case]
    out = copy_out(run_folder, tmp_path)
    path = out / "certificate.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    lines = failed_lines(invoke("verify", out))
    assert_reported(lines, pattern)


def test_history_edit_is_caught(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    history = out / "history.jsonl"
    history.write_text(
        history.read_text(encoding="utf-8").replace('"iteration": 3,', '"iteration": 4,')
    )
    lines = failed_lines(invoke("verify", out))
    assert_reported(
        lines, r"history\.jsonl is [0-9a-f]{64}; certificate\.json search\.history_sha256"
    )


def test_unsupported_schema_version_exits_2(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    path = out / "certificate.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["schema_version"] = "1"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert_bad_input(invoke("verify", out), r"schema version '1'; this verifier reads '2' and '3'")


# ---------------------------------------------------------------- cross-check


def test_attached_crosscheck_is_checked(run_folder: RunFolder, tmp_path: Path) -> None:
    from tests.test_report import crosscheck_document

    out = copy_out(run_folder, tmp_path)
    cross = crosscheck_document(run_folder.certificate)
    (out / "crosscheck.json").write_text(json.dumps(cross), encoding="utf-8")
    assert invoke("report", out).exit_code == ExitCode.OK
    result = invoke("verify", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert re.search(r"^ok\s+crosscheck\s+summary matches", result.stdout, re.MULTILINE)
    assert re.search(r"^not recomputed\s+crosscheck", result.stdout, re.MULTILINE)
    cross["summary"]["violations"] = 3
    (out / "crosscheck.json").write_text(json.dumps(cross), encoding="utf-8")
    lines = failed_lines(invoke("verify", out))
    assert_reported(
        lines,
        r"sha256 of .*crosscheck\.json is [0-9a-f]{64}; certificate\.json crosscheck\.sha256",
        r"crosscheck\.summary\.violations: recomputed 3, recorded 0",
    )


def test_verify_exit_code_1_also_for_json(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    path = out / "certificate.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["tasks"][0]["k"] -= 1
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = invoke("verify", out, "--json")
    assert result.exit_code == ExitCode.SPEC_NOT_MET
    report = json.loads(result.stdout)
    assert report["verdict"] == "failed"
    (failure,) = [c for c in report["checks"] if c["status"] == "failed"]
    assert failure["subject"] == "task 'digits'" and "tasks[0].k" in failure["detail"]


def test_lid_without_the_model_weights(run_folder: RunFolder, tmp_path: Path) -> None:
    """A box moved off the model's weights (consistently re-saved) is reported."""
    out = copy_out(run_folder, tmp_path)
    path = out / "lid.safetensors"
    lid = load_lid(path)
    shift = {n: torch.full_like(t, 10.0) for n, t in lid.box.lower.items()}
    box = Box(
        {n: t + shift[n] for n, t in lid.box.lower.items()},
        {n: t + shift[n] for n, t in lid.box.upper.items()},
    )
    metadata = {k: v for k, v in lid.metadata.items() if k != "content_sha256"}
    save_lid(path, box, metadata)
    lines = failed_lines(invoke("verify", out))
    assert_reported(lines, r"the LID does not contain the model's own weights: \['fc1\.weight'")


# ---------------------------------------------------------------- zonotope LIDs


@pytest.fixture(scope="module")
def zonotope_run(tmp_path_factory: pytest.TempPathFactory) -> RunFolder:
    """`verifier run` with `domain: zonotope` (k = 2, 6 iterations) on the digits copies."""
    folder = tmp_path_factory.mktemp("verify_zonotope")
    model = folder / "model.onnx"
    shutil.copyfile(MODEL, model)
    x, y = digits_arrays("test")
    data = folder / "digits_test.npz"
    np.savez(data, x=x[:N_SAMPLES], y=y[:N_SAMPLES])
    spec = write_spec(
        folder,
        model=str(model),
        data={"name": str(data)},
        domain="zonotope",
        zonotope={"k": 2},
        search={"iterations": 6, "checkpoint_every": 3},
    )
    out_dir = folder / "out"
    result = invoke("run", spec, "-o", out_dir)
    assert result.exit_code == ExitCode.OK, result.output
    return RunFolder(result, folder, model, data, out_dir)


def test_zonotope_run_verifies(zonotope_run: RunFolder) -> None:
    lid = zonotope_run.certificate["lid"]
    assert lid["domain"] == "zonotope" and lid["n_generators"] == 2
    assert 0 < lid["generator_norms"]["min"] <= lid["generator_norms"]["max"]
    assert lid["isotropic_width"] > 0
    assert "LID: zonotope over " in zonotope_run.result.stdout
    assert "k = 2 generators" in zonotope_run.result.stdout
    result = invoke("verify", zonotope_run.out_dir, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "verified" and doc["counts"]["failed"] == 0
    details = [c["detail"] for c in doc["checks"] if c["status"] == "ok"]
    assert "the LID contains the model's own weights" in details
    assert "LID size statistics match" in details
    assert any(d.startswith("held-out certificate recomputed") for d in details)


def test_zonotope_generator_tampered_and_resaved(zonotope_run: RunFolder, tmp_path: Path) -> None:
    """A consistent re-save (valid content hash) with one generator entry changed is caught."""
    out = copy_out(zonotope_run, tmp_path)
    path = out / "lid.safetensors"
    lid = load_lid(path)
    zonotope = lid.domain
    assert isinstance(zonotope, Zonotope)
    generators = {n: g.clone() for n, g in zonotope.generators.items()}
    generators["fc1.weight"][0, 0, 0] += 0.5
    metadata = {k: v for k, v in lid.metadata.items() if k != "content_sha256"}
    save_lid(path, Zonotope(dict(zonotope.lower), dict(zonotope.upper), generators), metadata)
    lines = failed_lines(invoke("verify", out))
    assert_reported(
        lines,
        r"certificate\.json lid\.sha256 records",
        r"certificate\.json lid\.generator_norms\.max: recomputed [0-9.e-]+, recorded",
        r"certificate\.json lid\.isotropic_width: recomputed [0-9.e-]+, recorded",
    )


# ---------------------------------------------------------------- a model with a frozen prefix


def test_prefixed_model_run_verifies(tmp_path: Path) -> None:
    """A transformer whose head alone is boxed: verify cuts the model where the run did."""
    with torch.random.fork_rng():  # restores the global generator afterwards
        torch.manual_seed(0)
        net = _Classifier().eval()
    model = _export(net, tmp_path / "transformer.onnx", TOKENS * TOKEN_FEATURES)
    split = load_split_model(model, ["head.*"], threads=1, batch_size=64)
    assert isinstance(split, PrefixedGraph)
    raw, _ = _labelled(split, tmp_path)
    spec = _spec(tmp_path, model, raw, "spec.yaml", search={"iterations": 5, "batch_size": 100})
    out = tmp_path / "out"
    result = invoke("run", spec, "-o", out)
    assert result.exit_code == ExitCode.OK, result.output
    verified = invoke("verify", out, "--json")
    assert verified.exit_code == ExitCode.OK, verified.output
    doc = json.loads(verified.stdout)
    assert doc["verdict"] == "verified" and doc["counts"]["failed"] == 0
