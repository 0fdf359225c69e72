"""Ctrl-C ends a run with exit code 130 and one line, never 1 ("specification not met")."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_during_a_search_exits_130(tmp_path: Path) -> None:
    spec = tmp_path / "long.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "model": str(ROOT / "onnx_models" / "digits_mlp.onnx"),
                "data": {"name": "digits", "split": "test"},
                "tasks": [{"name": "digits", "metric": "accuracy", "target": 0.5}],
                "search": {"iterations": 100000},
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from verifier.cli import main; main()",
            "lid",
            str(spec),
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    seen = ""
    assert process.stderr is not None
    while "searching" not in seen and time.monotonic() < deadline:
        seen += process.stderr.read(1)
    time.sleep(1.0)  # well inside the 100,000-iteration search
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130, seen + rest
    last = [line for line in rest.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted:"), rest
    assert "Traceback" not in rest
    assert not (out / "certificate.json").exists()
