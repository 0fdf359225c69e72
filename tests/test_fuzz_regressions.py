"""The bugs the fuzzer found (issue 23), one case each: exit 2 with one `error:` line, where
each used to end in a traceback (or ran on with no limit).

The ONNX ones (external locations that cannot be opened, constants and samples too large,
unknown data types) are in `tests/test_onnx_limits.py`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_cli_pipeline import MODEL, assert_bad_input, invoke, write_spec
from verifier.data.digits import digits_arrays
from verifier.domains.io import SCHEMA_VERSION, tensors_sha256


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "[" * 100_000 + "]" * 100_000,
            r"certificate\.json: not readable JSON \(nested too deeply",
        ),
        ('{"schema_version": ' + "1" * 5000 + "}", r"not readable JSON \(Exceeds the limit"),
    ],
)
def test_certificate_json_too_deep_or_too_long_exits_2(
    tmp_path: Path, text: str, pattern: str
) -> None:
    (tmp_path / "certificate.json").write_text(text, encoding="utf-8")
    assert_bad_input(invoke("verify", tmp_path), pattern)


def test_npz_with_a_damaged_member_header_exits_2(tmp_path: Path) -> None:
    x, y = digits_arrays("test")
    buffer = io.BytesIO()
    np.savez(buffer, x=x[:20], y=y[:20])
    data = bytearray(buffer.getvalue())
    second = data.index(b"PK\x03\x04", 4)  # the local header of y.npy; the directory is intact
    data[second : second + 4] = b"PK\x00\x00"
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(data))
    assert_bad_input(
        invoke("inspect", MODEL, "--data", path), r"damaged\.npz: cannot read array 'y' \(Bad magic"
    )


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"device": "tpu"}, r"device 'tpu' is not supported; use cpu, cuda or cuda:N"),
        ({"parameters": []}, r"parameters: nothing to box \(an empty list\)"),
    ],
)
def test_spec_values_torch_would_reject_exit_2(
    tmp_path: Path, overrides: dict[str, object], pattern: str
) -> None:
    spec = write_spec(tmp_path, **overrides)
    assert_bad_input(invoke("lid", spec, "-o", tmp_path / "out"), pattern)


def test_spec_with_a_bad_yaml_timestamp_exits_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    text = spec.read_text(encoding="utf-8").replace("model:", "model: !!timestamp", 1)
    spec.write_text(text, encoding="utf-8")
    assert "!!timestamp" in text
    assert_bad_input(
        invoke("lid", spec, "-o", tmp_path / "out"), r"not valid YAML \(a value cannot be read"
    )


@pytest.mark.parametrize("parameters", ["[" * 5000, '{"a": 1}', "7"])
def test_lid_metadata_parameters_malformed_exits_2(tmp_path: Path, parameters: str) -> None:
    tensors = {
        "fc3.bias.lower": torch.zeros(10, dtype=torch.float64),
        "fc3.bias.upper": torch.ones(10, dtype=torch.float64),
    }
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "domain": "box",
        "parameters": parameters,
        "content_sha256": tensors_sha256(tensors),
    }
    path = tmp_path / "lid.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    assert_bad_input(
        invoke("certify", MODEL, path, "digits"),
        r"metadata 'parameters' is missing or malformed \(expected a JSON list",
    )


def test_lirpa_import_keeps_the_recursion_limit() -> None:
    """auto_LiRPA raises the limit to 10^6 on import; deep JSON then crashed the process (a C
    stack overflow) instead of raising RecursionError. The compat layer restores it."""
    import sys

    from verifier.bounds.lirpa_compat import apply_lirpa_compat

    before = sys.getrecursionlimit()
    apply_lirpa_compat()
    assert sys.getrecursionlimit() == before


def test_model_path_too_long_exits_2(tmp_path: Path) -> None:
    assert_bad_input(invoke("inspect", tmp_path / ("x" * 5000)), r"cannot be opened \(")


def test_project_with_a_malformed_certificate_in_the_lid_metadata(tmp_path: Path) -> None:
    """`project` printed `lower_bound` with :.4f and crashed on a null; now it names the
    malformed certificate and reports none."""
    from verifier.domains import Box
    from verifier.domains.io import save_lid
    from verifier.onnx.importer import load_graph

    theta = load_graph(MODEL).parameters
    box = Box.around({"fc3.bias": theta["fc3.bias"]}, radius=0.01)
    lid = tmp_path / "lid.safetensors"
    save_lid(lid, box, {"certificate": '[{"task": "t", "lower_bound": null}]'})
    result = invoke("project", MODEL, "--lid", lid, "--base", MODEL, "-o", tmp_path / "x.onnx")
    assert result.exit_code == 0, result.output
    assert "the certificate in its metadata is malformed" in result.stdout
