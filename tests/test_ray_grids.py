"""Benchmark grids on Ray (issue 22, point 2): the same raw results as the process pool.

Each grid script (`benchmarks/split_mnist.py`, `split_cifar.py`, `heads.py`) runs a tiny grid
on its process pool (from a spawned process: forking a process that runs Ray may crash the
children) and with `--ray local`, which inside the module's shared local Ray instance
(`num_cpus=2`, stopped at the end) joins it; the raw results (accuracy matrices, certificates,
LID boxes, fine-tuning scores) must be equal, everything but the timings compared with `==`.
Split-CIFAR and the heads run on synthetic features (no encoder, no feature cache).
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.benchmark_loader import import_benchmark, load_benchmark

ray = pytest.importorskip("ray")
# a Ray call that never returns fails the test instead of holding CI (pytest-timeout)
pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local Ray instance for the module; stopped afterwards."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_benchmark(name, monkeypatch)


def _untimed(value: Any) -> Any:
    """The raw results without their timings (wall, CPU and search seconds)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a spawned process. The process pools fork, and forking this test
    process while Ray's threads run in it can crash the children (CI saw a SIGSEGV); a
    spawned process holds no Ray, so the pool forks from a clean parent."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def _main_raw(name: str, argv: list[str], tmp_path: Path, tag: str) -> dict:
    """`benchmarks/<name>.py` main on argv; its raw JSON."""
    bench = import_benchmark(name)
    out, raw = tmp_path / f"{tag}.md", tmp_path / f"{tag}.json"
    extra = ["--out", str(out), "--plots", str(tmp_path / f"{tag}-plots"), "--raw", str(raw)]
    assert bench.main([*argv, *extra]) == 0
    return json.loads(raw.read_text(encoding="utf-8"))


def _grid_runs(name: str, tmp_path: Path, argv: list[str]) -> tuple[dict, dict]:
    """The raw JSON of the grid on the pool (2 workers, in a fresh process) and on Ray."""
    pool = _in_fresh_process(_main_raw, name, [*argv, "--workers", "2"], tmp_path, "pool")
    return pool, _main_raw(name, [*argv, "--ray", "local"], tmp_path, "ray")


@pytest.mark.timeout(300)
def test_split_mnist_grid_on_ray_equals_the_pool(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, on_ray = _grid_runs("split_mnist", tmp_path, ["--tiny", "--scenarios", "class"])
    assert ray.is_initialized()  # joined the shared instance, left it running
    methods = [r["method"] for r in pool["results"]]
    assert methods == [r["method"] for r in on_ray["results"]]  # same order
    assert len(methods) == 9 and "LID 10-way loss" in methods and "SI" in methods
    assert _untimed(on_ray["results"]) == _untimed(pool["results"])
    lid = next(r for r in on_ray["results"] if r["method"] == "LID")
    assert "certified" in lid and len(lid["matrix"]) == 2  # certificates were compared too
    assert on_ray["workers"] == 2  # the cluster's CPUs


@pytest.mark.timeout(300)
def test_split_cifar_grid_on_ray_equals_the_pool(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _benchmark("split_cifar", monkeypatch)
    pool, on_ray = _grid_runs("split_cifar", tmp_path, ["--tiny", "--scenarios", "domain", "class"])
    n = len(bench.BASELINES)  # fine-tune, EWC, LwF, joint
    assert len(pool["results"]) == len(on_ray["results"]) == (2 + n) + (3 + n)
    assert _untimed(on_ray["results"]) == _untimed(pool["results"])
    assert sum("certified" in r for r in on_ray["results"]) == 2 + 3  # the LID variants


def _lid_fields(info: Any) -> tuple:
    box = info.box
    tensors = tuple(box.lower[n] for n in box.names) + tuple(box.upper[n] for n in box.names)
    return replace(info, box=None, seconds=0.0), tensors


def _heads_outcome(name: str, tmp_path: Path, bench: Any = None) -> Any:
    """The synthetic heads experiment with its stages on the pool (2 workers) or on Ray."""
    bench = bench or import_benchmark("heads")
    stage = bench.on_pool(2) if name == "pool" else bench.on_ray
    argv = ["--experiment", "synthetic", "--epochs", "10", "--lr", "0.1"]
    args = bench.parse_args([*argv, "--work-dir", str(tmp_path / name)])
    experiment = bench.synthetic_experiment(tmp_path / "data")
    return bench.run_experiment(experiment, args, stage)


@pytest.mark.timeout(300)
def test_heads_stages_on_ray_equal_the_pool(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synthetic heads experiment: its LIDs and fine-tunings on the pool and on Ray."""
    bench = _benchmark("heads", monkeypatch)
    pool = _in_fresh_process(_heads_outcome, "pool", tmp_path)
    outcomes = [pool, _heads_outcome("ray", tmp_path, bench)]
    pool, on_ray = outcomes
    assert [replace(r, seconds=0.0) for r in on_ray.rows] == [
        replace(r, seconds=0.0) for r in pool.rows
    ]
    assert len(pool.rows) == 2 * 6  # two Task 2s: start, plain, EWC x2, LID, look-ahead
    start = {r.task: r.task2 for r in pool.rows if r.method == "Task-1 head (start)"}
    plain = {r.task: r.task2 for r in pool.rows if r.method == "plain fine-tuning"}
    assert plain != start  # the fine-tuning moved the head
    infos = [(pool.base, on_ray.base)]
    infos += [(pool.lookahead[n], on_ray.lookahead[n]) for n in pool.lookahead]
    for a, b in infos:
        fields_a, tensors_a = _lid_fields(a)
        fields_b, tensors_b = _lid_fields(b)
        assert fields_a == fields_b
        assert all(torch.equal(x, y) for x, y in zip(tensors_a, tensors_b, strict=True))
