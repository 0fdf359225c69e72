"""Task sequences: LID_2 is searched inside LID_1 and carries LID_1's certificate forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_cli_pipeline import MODEL, invoke, write_spec
from verifier.cli import ExitCode
from verifier.domains.io import load_lid
from verifier.onnx.export import save_with_parameters
from verifier.onnx.importer import load_graph
from verifier.report.certificate import schema_errors


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chain")
    first = folder / "first"
    assert invoke("lid", write_spec(folder, "one.yaml"), "-o", first).exit_code == 0
    spec_two = write_spec(
        folder,
        "two.yaml",
        tasks=[{"name": "low-digits", "metric": "accuracy", "target": 0.5,
                "data": {"name": "digits", "split": "test", "classes": [0, 1, 2, 3, 4]}}],
        outer_box=str(first / "lid.safetensors"),
        search={"iterations": 20},
    )  # fmt: skip
    second = folder / "second"
    result = invoke("lid", spec_two, "-o", second)
    assert result.exit_code == 0, result.output
    return first, second


def test_second_lid_lies_inside_the_first(chain: tuple[Path, Path]) -> None:
    first, second = (load_lid(p / "lid.safetensors").box for p in chain)
    for name, lo in second.lower.items():
        assert bool(
            (lo >= first.lower[name]).all() and (second.upper[name] <= first.upper[name]).all()
        )


def test_earlier_certificate_is_carried_forward_and_applies(chain: tuple[Path, Path]) -> None:
    first, second = chain
    doc = json.loads((second / "certificate.json").read_text())
    assert schema_errors(doc) == []
    (entry,) = doc["inherited"]
    earlier = json.loads((first / "certificate.json").read_text())["tasks"][0]
    assert entry["task"] == earlier["task"] and entry["k"] == earlier["k"]
    assert entry["applies"] is True
    assert entry["lid_sha256"] == doc["inherited"][0]["lid_sha256"]
    meta = load_lid(second / "lid.safetensors").metadata
    assert json.loads(meta["inherited"])[0]["task"] == earlier["task"]  # a third LID inherits it


def test_model_outside_the_outer_lid_is_refused(chain: tuple[Path, Path], tmp_path: Path) -> None:
    first, _ = chain
    graph = load_graph(MODEL)
    moved = {n: t + 1.0 for n, t in graph.parameters.items()}
    model = tmp_path / "moved.onnx"
    save_with_parameters(MODEL, {n: t.to(torch.float32) for n, t in moved.items()}, model)
    spec = write_spec(tmp_path, model=str(model), outer_box=str(first / "lid.safetensors"))
    result = invoke("lid", spec, "-o", tmp_path / "out")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "outside the outer LID" in result.output and "verifier project" in result.output


def test_cli_summary_names_the_earlier_certificate(chain: tuple[Path, Path]) -> None:
    from verifier.cli.lid import render_certificate

    _, second = chain
    text = render_certificate(json.loads((second / "certificate.json").read_text()))
    assert "earlier task digits" in text and "certificate applies" in text
