"""certificate.json against its schema, `verifier run` / `report` and the HTML in Chromium.

One short `verifier run` (the digits MLP, 20 iterations, model and data copied under the
module's temporary folder) is shared by the module; tests that change artifacts work on a copy.
Browser tests skip when Chromium is absent (`make test` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from PIL import Image

from tests.test_cli_pipeline import MODEL, assert_bad_input, invoke, write_spec
from verifier.cli import ExitCode
from verifier.data.digits import digits_arrays
from verifier.files import file_sha256
from verifier.report.browser import console_messages, find_chromium, screenshot
from verifier.report.certificate import schema_errors

N_SAMPLES = 400
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium; "
    "`make test` installs it)",
)


@dataclass(frozen=True)
class RunFolder:
    """A finished `verifier run`: its spec, model and data copies, and its output folder."""

    result: Result
    folder: Path
    model: Path
    data: Path
    out_dir: Path

    @property
    def certificate(self) -> dict[str, Any]:
        return json.loads((self.out_dir / "certificate.json").read_text(encoding="utf-8"))


def make_run(folder: Path) -> RunFolder:
    """`verifier run` on a copy of the digits MLP and the digits test split saved as .npz."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    shutil.copyfile(MODEL, model)
    x, y = digits_arrays("test")
    data = folder / "digits_test.npz"
    np.savez(data, x=x[:N_SAMPLES], y=y[:N_SAMPLES])  # half of the split keeps verify quick
    spec = write_spec(folder, model=str(model), data={"name": str(data)})
    out_dir = folder / "out"
    result = invoke("run", spec, "-o", out_dir)
    return RunFolder(result, folder, model, data, out_dir)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> RunFolder:
    return make_run(tmp_path_factory.mktemp("report"))


def copy_out(run: RunFolder, tmp_path: Path) -> Path:
    """A copy of the run's output folder, with copies of the model and data where the
    certificate says (its paths are relative to its folder)."""
    out = tmp_path / "out"
    shutil.copytree(run.out_dir, out)
    for source in (run.model, run.data):
        shutil.copyfile(source, out / os.path.relpath(source, run.out_dir))
    return out


# ---------------------------------------------------------------- certificate.json


def test_run_exits_0_and_writes_every_artifact(run_folder: RunFolder) -> None:
    assert run_folder.result.exit_code == ExitCode.OK, run_folder.result.output
    for name in ("lid.safetensors", "certificate.json", "history.jsonl", "report.html"):
        assert (run_folder.out_dir / name).is_file(), name
    assert f"report: {run_folder.out_dir / 'report.html'}" in run_folder.result.stderr
    assert "verdict: holds" in run_folder.result.stdout


def test_schema_is_valid_draft_2020_12_shipped_in_the_package() -> None:
    from jsonschema import Draft202012Validator

    text = resources.files("verifier.report").joinpath("certificate.schema.json").read_text()
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema_version"] == {"enum": ["2", "3"]}


def test_real_certificate_matches_the_schema(run_folder: RunFolder) -> None:
    from jsonschema import Draft202012Validator

    schema_path = Path(__file__).resolve().parents[1] / "verifier/report/certificate.schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    Draft202012Validator(schema).validate(run_folder.certificate)
    assert schema_errors(run_folder.certificate) == []


def test_certificate_records_hashes_versions_and_statistics(run_folder: RunFolder) -> None:
    doc = run_folder.certificate
    out = run_folder.out_dir
    assert set(doc["software"]) >= {"lid-verifier", "torch", "onnx", "auto_LiRPA", "python"}
    # paths relative to the certificate's folder (issue 23: relocatable output folders)
    assert doc["model"] == {"path": "../model.onnx", "sha256": file_sha256(run_folder.model)}
    assert doc["spec"]["model"] == "../model.onnx"
    assert doc["spec"]["data"]["name"] == "../digits_test.npz"
    assert not Path(doc["working_directory"]).is_absolute()
    assert doc["lid"]["path"] == "lid.safetensors"
    assert doc["lid"]["sha256"] == file_sha256(out / "lid.safetensors")
    assert doc["lid"]["file"] == "lid.safetensors"
    assert doc["search"]["history_sha256"] == file_sha256(out / "history.jsonl")
    assert doc["search"]["iterations"] == 20
    per_tensor = doc["lid"]["per_tensor"]
    assert sum(t["n"] for t in per_tensor.values()) == doc["lid"]["n_parameters"] == 3466
    assert sum(t["total_width"] for t in per_tensor.values()) == pytest.approx(
        doc["lid"]["total_width"]
    )
    (task,) = doc["tasks"]
    assert task["data"]["name"] == "../digits_test.npz"
    assert sum(c["n"] for c in task["per_class"]) == task["n"]
    assert sum(c["k"] for c in task["per_class"]) == task["k"]
    assert task["n"] + task["n_optimisation"] == N_SAMPLES
    assert task["optimisation_data_sha256"] != task["certification_data_sha256"]
    assert doc["proof"] == {
        "method": "ibp",
        "bound_kind": "clopper-pearson",
        "beta": 0.001,
        "arithmetic": "float64",
        "rounding_allowance": doc["proof"]["rounding_allowance"],
    }
    assert doc["crosscheck"] is None


def _drop_k(doc: dict[str, Any]) -> None:
    del doc["tasks"][0]["k"]


def _negative_n(doc: dict[str, Any]) -> None:
    doc["tasks"][0]["n"] = -1


def _short_hash(doc: dict[str, Any]) -> None:
    doc["model"]["sha256"] = "abc"


def _extra_key(doc: dict[str, Any]) -> None:
    doc["signed_by"] = "nobody"


def _bad_verdict(doc: dict[str, Any]) -> None:
    doc["verdict"] = "probably"


BROKEN = {
    "missing k": (_drop_k, r"at tasks\[0\]: 'k' is a required property"),
    "negative n": (_negative_n, r"at tasks\[0\]\.n: -1 is less than the minimum of 0"),
    "short sha256": (_short_hash, r"at model\.sha256: 'abc' does not match"),
    "unknown key": (_extra_key, r"'signed_by' was unexpected"),
    "bad verdict": (_bad_verdict, r"at verdict: 'probably' is not one of"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_schema_rejects_broken_certificates(run_folder: RunFolder, case: str) -> None:
    mutate, pattern = BROKEN[case]
    doc = run_folder.certificate
    mutate(doc)
    errors = schema_errors(doc)
    assert errors, case
    assert any(re.search(pattern, e) for e in errors), errors


# ---------------------------------------------------------------- report.html


def test_report_is_self_contained_and_states_the_verdict_first(run_folder: RunFolder) -> None:
    page = (run_folder.out_dir / "report.html").read_text(encoding="utf-8")
    doc = run_folder.certificate
    task = doc["tasks"][0]
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "external resource"
    assert "url(" not in page
    assert page.count('src="data:image/svg+xml;base64,') >= 3
    verdict = page.index("PASSED")
    assert verdict < page.index("What exactly is guaranteed")
    assert f"{100 * task['lower_bound']:.2f} %" in page
    for phrase in (
        "i.i.d.",
        "float64",
        "rounding allowance",
        f"1 − β = {1 - doc['proof']['beta']:g}",
        "Per-class certified accuracy",
        "How much the weights may change",
        "How the LID was found",
        "No cross-check was run",
        f"verifier verify {run_folder.out_dir}",
        doc["model"]["sha256"],
        doc["lid"]["sha256"],
        task["certification_data_sha256"],
    ):
        assert phrase in page, phrase
    for name in doc["lid"]["per_tensor"]:
        assert f"<code>{name}</code>" in page


def test_report_command_rebuilds_the_html(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    (out / "report.html").unlink()
    result = invoke("report", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout == "verdict: holds\n"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "PASSED" in page
    assert not (out / "report.pdf").exists()


def test_report_of_a_certificate_that_is_not_met(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    path = out / "certificate.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["tasks"][0]["target"] = 0.999
    doc["tasks"][0]["holds"] = False
    doc["holds"], doc["verdict"] = False, "not met"
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = invoke("report", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout == "verdict: not met\n"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "NOT MET" in page and "PASSED" not in page


def crosscheck_document(doc: dict[str, Any], *, violations: int = 0) -> dict[str, Any]:
    """A crosscheck.json of the layout `verifier crosscheck` writes."""
    return {
        "schema_version": "1",
        "model_sha256": doc["model"]["sha256"],
        "lid_sha256": doc["lid"]["sha256"],
        "samples": [],
        "summary": {
            "n_samples": 16,
            "n_margins": 144,
            "violations": violations,
            "verdict": "violation" if violations else "sound",
            "gaps": {
                "ibp": {"mean": 0.8, "median": 0.6, "max": 2.5},
                "crown_ibp": {"mean": 0.3, "median": 0.2, "max": 1.1},
            },
            "exact": {"solved": 140, "timeout": 4, "skipped": 0},
            "time_s": 12.5,
        },
    }


def test_report_attaches_a_matching_crosscheck(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    cross = crosscheck_document(run_folder.certificate)
    (out / "crosscheck.json").write_text(json.dumps(cross), encoding="utf-8")
    result = invoke("report", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert "cross-check attached" in result.stderr
    doc = json.loads((out / "certificate.json").read_text(encoding="utf-8"))
    assert schema_errors(doc) == []
    assert doc["crosscheck"]["summary"] == cross["summary"]
    assert doc["crosscheck"]["sha256"] == file_sha256(out / "crosscheck.json")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "no violation found" in page and "140 solved, 4 timed out" in page
    assert page.count('src="data:image/svg+xml;base64,') >= 4  # the gap chart
    again = invoke("report", out)
    assert again.exit_code == ExitCode.OK and "attached" not in again.stderr


def test_report_leaves_out_a_crosscheck_of_another_lid(
    run_folder: RunFolder, tmp_path: Path
) -> None:
    out = copy_out(run_folder, tmp_path)
    cross = crosscheck_document(run_folder.certificate)
    cross["lid_sha256"] = "0" * 64
    (out / "crosscheck.json").write_text(json.dumps(cross), encoding="utf-8")
    result = invoke("report", out)
    assert result.exit_code == ExitCode.OK, result.output
    assert "for another model or LID; left out" in result.stderr
    assert json.loads((out / "certificate.json").read_text(encoding="utf-8"))["crosscheck"] is None


def test_report_warns_loudly_on_a_crosscheck_violation(
    run_folder: RunFolder, tmp_path: Path
) -> None:
    out = copy_out(run_folder, tmp_path)
    cross = crosscheck_document(run_folder.certificate, violations=2)
    (out / "crosscheck.json").write_text(json.dumps(cross), encoding="utf-8")
    assert invoke("report", out).exit_code == ExitCode.OK
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "DO NOT RELY ON THIS CERTIFICATE" in page and "2 violation(s) found" in page


def test_report_rejects_a_malformed_crosscheck(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    (out / "crosscheck.json").write_text('{"schema_version": "1"}', encoding="utf-8")
    assert_bad_input(invoke("report", out), r"crosscheck\.json: at \(top level\): 'model_sha256'")


def _no_folder(tmp_path: Path) -> Path:
    return tmp_path / "absent"


def _no_certificate(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _malformed(tmp_path: Path) -> Path:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "certificate.json").write_text('{"schema_version": "2",', "utf-8")
    return tmp_path / "bad"


BAD_FOLDERS = {
    "no such folder": (_no_folder, "no such folder"),
    "no certificate": (_no_certificate, r"certificate\.json: missing"),
    "malformed JSON": (_malformed, r"not valid JSON at line 1, column \d+"),
}


@pytest.mark.parametrize("command", ["report", "verify"])
@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_output_folder_exits_2(tmp_path: Path, command: str, case: str) -> None:
    make, pattern = BAD_FOLDERS[case]
    folder = make(tmp_path)
    line = assert_bad_input(invoke(command, folder), pattern)
    assert str(folder) in line


def test_report_of_a_certificate_failing_its_schema_exits_2(
    run_folder: RunFolder, tmp_path: Path
) -> None:
    out = copy_out(run_folder, tmp_path)
    doc = run_folder.certificate
    del doc["tasks"][0]["k"]
    (out / "certificate.json").write_text(json.dumps(doc), encoding="utf-8")
    assert_bad_input(invoke("report", out), r"fails its schema at tasks\[0\]: 'k' is a required")


# ---------------------------------------------------------------- headless Chromium


@needs_chromium
def test_console_capture_sees_errors(tmp_path: Path) -> None:
    """The no-console-error check below is not vacuous: a faulty page is caught."""
    page = tmp_path / "faulty.html"
    page.write_text(
        '<html><body><p>x</p><script>console.error("boom"); missing();</script></body></html>',
        encoding="utf-8",
    )
    messages = screenshot(
        page, tmp_path / "faulty.png", width=400, height=300, profile_dir=tmp_path / "profile"
    )
    assert any('"boom"' in m for m in messages), messages
    assert any("missing is not defined" in m for m in messages), messages


@needs_chromium
def test_report_renders_in_chromium_without_console_errors(
    run_folder: RunFolder, tmp_path: Path
) -> None:
    png = tmp_path / "report.png"
    messages = screenshot(
        run_folder.out_dir / "report.html",
        png,
        width=1200,
        height=1600,
        profile_dir=tmp_path / "profile",
    )
    assert messages == []
    with Image.open(png) as image:
        assert image.size == (1200, 1600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert colours is not None and len(colours) > 100  # text, tables and charts, not one colour
    white = sum(count for count, colour in colours if colour == (255, 255, 255))
    assert white / (1200 * 1600) < 0.95
    assert any(colour == (0xE8, 0xF5, 0xE9) for _, colour in colours)  # the green verdict box


@needs_chromium
def test_report_pdf(run_folder: RunFolder, tmp_path: Path) -> None:
    out = copy_out(run_folder, tmp_path)
    result = invoke("report", out, "--pdf")
    assert result.exit_code == ExitCode.OK, result.output
    pdf = (out / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and len(pdf) > 20_000
    assert f"pdf: {out / 'report.pdf'}" in result.stderr


def test_console_messages_parses_chromium_log_lines() -> None:
    stderr = (
        "[1:2:1124/154817.389557:ERROR:dbus/bus.cc:405] Failed to connect to the bus\n"
        '[1:1:1124/154817.876258:INFO:CONSOLE:1] "boom", source: file:///x.html (1)\n'
    )
    assert console_messages(stderr) == [
        '[1:1:1124/154817.876258:INFO:CONSOLE:1] "boom", source: file:///x.html (1)'
    ]
