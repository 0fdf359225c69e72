"""Load a benchmark script (`benchmarks/<name>.py`) as a module, for tests that drive it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str) -> tuple[Any, Any]:
    """The module `<name>_benchmark` of `benchmarks/<name>.py`, not yet run, and its loader."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    return importlib.util.module_from_spec(spec), spec.loader


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`benchmarks/<name>.py` as the module `<name>_benchmark`, registered in sys.modules for
    the test's duration (dataclasses look their module up)."""
    module, loader = _module(name)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    loader.exec_module(module)
    return module


def import_benchmark(name: str) -> Any:
    """`benchmarks/<name>.py` as the module `<name>_benchmark`, kept in sys.modules (in a
    spawned process that the test discards afterwards)."""
    module, loader = _module(name)
    sys.modules[module.__name__] = module
    loader.exec_module(module)
    return module
