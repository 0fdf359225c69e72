"""Load a benchmark script (`benchmarks/<name>.py`) as a module, for tests that drive it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`benchmarks/<name>.py` as the module `<name>_benchmark`, registered in sys.modules for
    the test's duration (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module
