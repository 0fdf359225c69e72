"""Scale-out on Ray (issue 22): the same masks, counts and certificates as one process.

One local Ray instance (`num_cpus=2`) is shared by the module and stopped at its end. Every
comparison is exact: masks with `torch.equal`, certificates and cross-check numbers with `==`.
The two-node cluster lives in `tests/test_ray_cluster.py`; streaming without Ray is tested
here too.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.test_cli_pipeline import MODEL, write_spec
from tests.tiny_nets import box_around, random_mlp
from verifier.bounds.memory import bound_pass_cost, memory_budget
from verifier.certify import certification_backend, certify_samples, certify_task, proof_plan
from verifier.cli import cli
from verifier.crosscheck import CrosscheckConfig, FalsifierConfig, crosscheck_samples
from verifier.data import data_sha256, load_dataset
from verifier.data.stream import open_stream, stream_sha256
from verifier.distributed import RayCertifier, RayTaskRunner, check_address, map_tasks
from verifier.distributed.certification import (
    MIN_TASK_S,
    SampleSlice,
    SliceResult,
    _slices,
    certify_slice,
    guided_tasks,
    task_device,
)
from verifier.distributed.streaming import certificate_from_counts, certify_stream
from verifier.domains import Box, Zonotope
from verifier.domains.io import load_lid, save_lid
from verifier.errors import BackendError, MemoryBudgetError
from verifier.graph import Graph
from verifier.pipeline import run_lid
from verifier.spec import load_spec

ray = pytest.importorskip("ray")
# a Ray call that never returns fails the test instead of holding CI (pytest-timeout)
pytestmark = pytest.mark.timeout(600)

QUICK = FalsifierConfig(n_uniform=8, n_vertex=8, pgd_steps=5, pgd_restarts=0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The local reference runs on one torch thread, as each Ray worker does (on a busy 2-core
    machine two threads are much slower); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local Ray instance for the module; stopped afterwards."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def digits() -> tuple[Graph, Box, torch.Tensor, torch.Tensor]:
    """The digits MLP, a box that certifies some samples and not others, and all of digits."""
    from verifier.onnx.importer import load_graph

    graph = load_graph(MODEL)
    box = Box.around(dict(graph.parameters), radius=0.004)
    data = load_dataset("digits", split="all")
    return graph, box, data.x, data.y


# ------------------------------------------------------------------ without a cluster


@pytest.mark.parametrize("value", ["local", "auto", "10.0.0.5:6379", "ray://head:10001", "h:1"])
def test_check_address_accepts_the_documented_forms(value: str) -> None:
    assert check_address(f" {value} ") == value


@pytest.mark.parametrize("value", ["", "locale", "10.0.0.5", "host:0", "host:70000", "a b:1"])
def test_check_address_refuses_anything_else_in_one_line(value: str) -> None:
    with pytest.raises(BackendError, match="expected local, auto, HOST:PORT") as info:
        check_address(value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("n", "chunk", "cpus", "low", "high"),
    [
        (10000, 256, 2, 256, 16384),
        (100000, 256, 2, 1024, 16384),
        (1797, 64, 8, 1, 300),
        (7, 4, 1, 4, 4),
    ],
)
def test_guided_tasks_cover_the_samples_in_whole_passes_largest_first(
    n: int, chunk: int, cpus: int, low: int, high: int
) -> None:
    tasks = guided_tasks(n, chunk, cpus, low, high)
    assert tasks[0][0] == 0 and tasks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(tasks, tasks[1:], strict=False))  # contiguous
    sizes = [stop - start for start, stop in tasks]
    low_passes = -(-low // chunk) * chunk
    high_passes = max(low_passes, -(-high // chunk) * chunk)
    assert all(size % chunk == 0 and low_passes <= size <= high_passes for size in sizes[:-1])
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)  # largest first
    # each takes 1/(2 x cpus) of what is left, within the bounds; a short rest joins the last
    left = n
    for size in sizes[:-1]:
        wanted = -(-left // (2 * cpus))
        assert size == min(high_passes, max(low_passes, -(-wanted // chunk) * chunk))
        left -= size
    assert sizes[-1] == left <= high_passes
    assert len(sizes) == 1 or left >= low_passes or sizes[-2] + left > high_passes


def test_plan_runs_small_calls_here_and_sizes_tasks_by_measured_cost() -> None:
    certifier = RayCertifier()
    key = ("graph", "Box", "ibp", 256)
    assert certifier.plan(511, 256, 2, key) == [(0, 511)]  # not two passes: one, here
    unknown = certifier.plan(10000, 256, 2, key)
    assert len(unknown) > 4 and unknown[-1][1] - unknown[-1][0] < 2 * 256  # small last
    certifier.seconds_per_sample[key] = MIN_TASK_S / 1000  # a cheap network
    cheap = certifier.plan(10000, 256, 2, key)
    assert all(stop - start >= 1024 for start, stop in cheap[:-1]) and len(cheap) < len(unknown)
    certifier.seconds_per_sample[key] = MIN_TASK_S / 4000  # 4000 samples per shortest task
    assert certifier.plan(8000, 256, 2, key) == [(0, 8000)]
    assert RayCertifier(samples_per_task=200).plan(1000, 256, 2) == [
        (0, 256),
        (256, 512),
        (512, 768),
        (768, 1000),
    ]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 2049])
def test_packed_masks_unpack_to_the_same_bits(n: int) -> None:
    mask = np.random.default_rng(n).random(n) < 0.5
    result = SliceResult(np.packbits(mask), n, 0, 0.0)
    assert result.bits.nbytes == -(-n // 8)
    unpacked = result.mask()
    assert unpacked.dtype == np.bool_ and np.array_equal(unpacked, mask)


def test_tasks_take_a_gpu_only_when_cuda_is_asked_for_and_there_is_one() -> None:
    assert task_device(torch.device("cuda", 0), 2.0) == ("cuda", 1.0)
    assert task_device(torch.device("cuda"), 0.0) == ("cpu", 0.0)
    assert task_device(torch.device("cpu"), 4.0) == ("cpu", 0.0)


@pytest.mark.parametrize("ray_value", ["nonsense", "127.0.0.1:1"])
def test_bad_or_unreachable_address_is_one_line_and_exit_2(tmp_path: Path, ray_value: str) -> None:
    lid_path = tmp_path / "lid.safetensors"
    from verifier.onnx.importer import load_graph

    save_lid(lid_path, Box.around(dict(load_graph(MODEL).parameters), radius=0.001), {})
    result = CliRunner().invoke(
        cli, ["certify", str(MODEL), str(lid_path), "digits", "--ray", ray_value]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --ray"), result.stderr
    assert not ray.is_initialized()


def _write_stream(folder: Path, x: np.ndarray, y: np.ndarray, shards: list[int] | None) -> Path:
    folder.mkdir()
    if shards is None:
        np.save(folder / "x.npy", x)
        np.save(folder / "y.npy", y)
        return folder
    start = 0
    for i, size in enumerate(shards):
        np.savez(folder / f"part{i:03d}.npz", x=x[start : start + size], y=y[start : start + size])
        start += size
    assert start == len(x)
    return folder


@pytest.mark.parametrize("shards", [None, [700, 1, 1000, 96]], ids=["npy-pair", "npz-shards"])
def test_stream_certifies_like_the_set_in_memory(
    tmp_path: Path, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor], shards: list[int] | None
) -> None:
    graph, box, x, y = digits
    folder = _write_stream(tmp_path / "stream", x.numpy(), y.numpy(), shards)
    stream = open_stream(folder)
    assert stream.n == len(x) and stream.sample_shape == (64,)
    progress: list[tuple[int, int]] = []
    found = certify_stream(
        graph, box, stream, block_samples=300, on_progress=lambda d, t: progress.append((d, t))
    )
    mask, nonfinite = certify_samples(graph, box, x, y)
    assert torch.equal(found.mask, mask) and found.n_nonfinite == nonfinite
    assert 0 < int(mask.sum()) < len(mask)  # the comparison has both outcomes in it
    assert progress[-1] == (len(x), len(x))
    options = dict(task="t", metric="balanced_accuracy", target=0.5, beta=1e-3)
    common = dict(bound_kind="clopper-pearson", method="ibp", n_nonfinite=nonfinite)
    expected = certify_task(mask, y, **options, **common)  # type: ignore[arg-type]
    got = certificate_from_counts(found.class_n, found.class_k, **options, **common)  # type: ignore[arg-type]
    assert got == expected
    assert stream_sha256(stream, found.x_digest) == data_sha256(x, y)


def test_stream_refuses_bad_values_naming_file_and_sample(tmp_path: Path) -> None:
    x = np.zeros((10, 64), dtype=np.float32)
    x[7, 3] = np.nan
    folder = _write_stream(tmp_path / "s", x, np.zeros(10, dtype=np.int64), None)
    from verifier.errors import DataError
    from verifier.onnx.importer import load_graph

    graph = load_graph(MODEL)
    with pytest.raises(DataError, match=r"x\.npy: sample 7 of the stream has NaN"):
        certify_stream(graph, Box.around(dict(graph.parameters), radius=0.0), open_stream(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["certify", str(MODEL), str(tmp_path / "l"), str(empty)])
    assert result.exit_code == 2


# ------------------------------------------------------------------ on the shared local instance


@pytest.mark.parametrize("method", ["ibp", "best"])
def test_ray_certification_is_bit_identical(
    cluster: None, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor], method: str
) -> None:
    graph, box, x, y = digits
    local, local_nonfinite = certify_samples(graph, box, x, y, method=method)  # type: ignore[arg-type]
    progress: list[tuple[int, int]] = []
    certifier = RayCertifier(samples_per_task=200, on_progress=lambda d, t: progress.append((d, t)))
    with certification_backend(certifier):
        remote, remote_nonfinite = certify_samples(graph, box, x, y, method=method)  # type: ignore[arg-type]
    assert torch.equal(remote, local) and remote_nonfinite == local_nonfinite
    assert certifier.stats.tasks == 8  # 1797 samples in tasks of 256 (200 rounded up)
    assert progress[-1] == (len(x), len(x)) and len(progress) == 8


def test_default_tasks_read_slices_of_blocks_put_once_and_are_bit_identical(
    cluster: None, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor]
) -> None:
    graph, box, x, y = digits
    local, local_nonfinite = certify_samples(graph, box, x, y)
    block_bytes = 700 * x[:1].numpy().nbytes  # 700 samples a block: several blocks
    certifier = RayCertifier(block_bytes=block_bytes)
    remote, remote_nonfinite = certifier(graph, box, x, y)
    assert torch.equal(remote, local) and remote_nonfinite == local_nonfinite
    tasks = certifier.plan(len(x), 256, 2)
    assert certifier.stats.tasks == len(tasks) > 2  # guided sizes, more tasks than blocks
    slices = list(_slices(ray, x.numpy(), y.numpy(), tasks, block_bytes))
    blocks = {s.block.hex() for s in slices}
    assert 1 < len(blocks) < len(slices)  # several tasks read one block
    for (start, stop), part in zip(tasks, slices, strict=True):
        bx, by = ray.get(part.block)
        assert np.array_equal(bx[part.start : part.stop], x[start:stop].numpy())
        assert np.array_equal(by[part.start : part.stop], y[start:stop].numpy())
    # the cost the tasks measured sizes the next call's tasks (this small network is cheap:
    # its tasks would be too short, so the call runs here), with the same mask
    ((key, cost),) = certifier.seconds_per_sample.items()
    assert cost > 0
    planned = certifier.plan(len(x), 256, 2, key)
    before = certifier.stats.tasks
    again, _ = certifier(graph, box, x, y)
    assert torch.equal(again, local)
    assert certifier.stats.tasks - before == (len(planned) if len(planned) > 1 else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_task_certifies_a_slice_of_a_shared_block(
    cluster: None, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor], dtype: torch.dtype
) -> None:
    """A task given a slice of a block proves exactly those rows, as this process does, and
    leaves the block as it was."""
    graph, box, x, y = digits
    x = x.to(dtype)
    block = ray.put((x.numpy(), y.numpy()))
    parts = [SampleSlice(block, 100, 612), SampleSlice(block, 1500, 1797)]
    shared = (graph, box, "ibp", 256, "cpu", None)
    results = map_tasks(certify_slice, shared, parts, cache_shared=True)
    for part, result in zip(parts, results, strict=True):
        local, nonfinite = certify_samples(
            graph, box, x[part.start : part.stop], y[part.start : part.stop]
        )
        assert result.n == part.stop - part.start and result.n_nonfinite == nonfinite
        assert np.array_equal(result.mask(), local.numpy())
    assert np.array_equal(ray.get(block)[0], x.numpy())  # the block is unchanged


def _row_splitting_budget(graph: Graph) -> int:
    """A budget under which a linear proof pass must split each sample's margin rows: one
    sample with half its rows."""
    cost = bound_pass_cost(graph, "linear")
    assert cost.rows > 2
    return cost.bytes(1, cost.rows // 2)


def test_the_memory_budget_travels_with_the_tasks(
    cluster: None, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor]
) -> None:
    """Worker processes do not inherit the driver's budget: it goes with each task, so the
    bound passes there split samples and margin rows as they would here."""
    graph, box, x, y = digits
    x, y = x[:60], y[:60]  # one sample per pass under this budget: keep it short
    budget = _row_splitting_budget(graph)
    with memory_budget(budget):
        assert proof_plan(graph, box, "linear", 256).rows == 4  # 9 rows in groups of 4
    with memory_budget(budget):
        local, _ = certify_samples(graph, box, x, y, method="linear")
        with certification_backend(RayCertifier(samples_per_task=20)):
            remote, _ = certify_samples(graph, box, x, y, method="linear")
    assert torch.equal(remote, local)
    block = ray.put((x.numpy(), y.numpy()))
    part = SampleSlice(block, 0, 20)
    whole = certify_slice(graph, box, "linear", 256, "cpu", None, part)
    split = certify_slice(graph, box, "linear", 256, "cpu", budget, part)
    assert np.array_equal(whole.mask(), split.mask())
    with pytest.raises(MemoryBudgetError):  # the task's own budget applies, whatever its caller's
        certify_slice(graph, box, "linear", 256, "cpu", 1024, part)


def _tally(seen: list[int], item: int) -> tuple[int, int]:
    seen.append(item)
    return os.getpid(), len(seen)


@pytest.mark.parametrize("cached", [True, False])
def test_cache_shared_deserialises_shared_once_per_worker_and_call(
    cluster: None, cached: bool
) -> None:
    """`_tally` appends to its shared list: cached, a process's tasks see one list (lengths
    1, 2, 3, ...); not cached, each task a fresh copy (always 1). A new call, a new list."""
    for _ in range(2):
        found = map_tasks(_tally, ([],), range(12), cache_shared=cached)
        by_process: dict[int, list[int]] = {}
        for pid, length in found:
            by_process.setdefault(pid, []).append(length)
        for lengths in by_process.values():
            assert sorted(lengths) == (
                list(range(1, len(lengths) + 1)) if cached else [1] * len(lengths)
            )
        assert sum(len(v) for v in by_process.values()) == 12
        assert max(len(v) for v in by_process.values()) > 1  # a process ran several tasks


def test_ray_zonotope_certification_is_bit_identical(cluster: None) -> None:
    gen = torch.Generator().manual_seed(0)
    graph = random_mlp((6, 9, 4), generator=gen, dtype=torch.float64)
    lower, upper = box_around(graph, 0.05, generator=gen)
    generators = {
        n: 0.02 * torch.randn((3, *t.shape), generator=gen, dtype=torch.float64)
        for n, t in graph.parameters.items()
    }
    zonotope = Zonotope(lower, upper, generators)
    x = torch.randn(900, 6, generator=gen, dtype=torch.float64)
    y = graph.forward(x).argmax(dim=1)
    local, _ = certify_samples(graph, zonotope, x, y, chunk_size=64)
    remote, _ = RayCertifier(samples_per_task=100)(graph, zonotope, x, y, chunk_size=64)
    assert torch.equal(remote, local) and 0 < int(local.sum()) < len(local)


def test_lid_run_on_ray_is_bit_identical(cluster: None, tmp_path: Path) -> None:
    search = {"iterations": 12, "checkpoint_every": 4}
    data = {"name": "digits", "split": "all"}  # 899 held-out samples: four tasks of 256
    spec = load_spec(write_spec(tmp_path, search=search, data=data))
    local = run_lid(spec, tmp_path / "local")
    certifier = RayCertifier(samples_per_task=64)
    with certification_backend(certifier):
        remote = run_lid(spec, tmp_path / "ray")
    assert certifier.stats.tasks >= 4  # the certificate (and large proofs) ran as tasks
    a, b = load_lid(local.out_dir / "lid.safetensors"), load_lid(remote.out_dir / "lid.safetensors")
    for name in a.box.names:
        assert torch.equal(a.box.lower[name], b.box.lower[name])
        assert torch.equal(a.box.upper[name], b.box.upper[name])
    assert local.certificates == remote.certificates
    assert local.result.chosen == remote.result.chosen
    assert [c.hard for c in local.result.checkpoints] == [c.hard for c in remote.result.checkpoints]


def test_certify_cli_with_ray_prints_the_local_document(
    cluster: None, tmp_path: Path, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor]
) -> None:
    graph, box, _, _ = digits
    lid_path = tmp_path / "lid.safetensors"
    save_lid(lid_path, box, {})
    args = ["certify", str(MODEL), str(lid_path), "digits", "--split", "all", "--json"]
    local = CliRunner().invoke(cli, args)
    remote = CliRunner().invoke(cli, [*args, "--ray", "local"])
    assert local.exit_code == remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert "certifying: 1797/1797" in remote.stderr  # one bar across the workers
    assert ray.is_initialized()  # the shared instance was joined, not stopped


def test_stream_on_ray_is_bit_identical(
    cluster: None, tmp_path: Path, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor]
) -> None:
    graph, box, x, y = digits
    folder = _write_stream(tmp_path / "s", x.numpy(), y.numpy(), [500, 797, 500])
    certifier = RayCertifier()
    found = certify_stream(graph, box, open_stream(folder), block_samples=256, ray=certifier)
    local, _ = certify_samples(graph, box, x, y)
    assert torch.equal(found.mask, local) and certifier.stats.tasks == 8


def test_crosscheck_on_ray_matches_the_process_run(cluster: None) -> None:
    gen = torch.Generator().manual_seed(4)
    graph = random_mlp((4, 6, 6, 3), generator=gen, dtype=torch.float64)
    box = Box(*box_around(graph, 0.05, generator=gen))
    x = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    y = graph.forward(x).argmax(dim=1)
    config = CrosscheckConfig(exact="milp", falsifier=QUICK)
    local = crosscheck_samples(graph, box, x, y, config=config)
    progress: list[tuple[int, int]] = []
    runner = RayTaskRunner()
    remote = crosscheck_samples(
        graph,
        box,
        x,
        y,
        config=config,
        runner=runner,
        on_progress=lambda d, t: progress.append((d, t)),
    )
    assert runner.stats.tasks == 4 and progress[-1] == (4, 4)
    for a, b in zip(local.samples, remote.samples, strict=True):
        assert (a.index, a.certified_ibp, a.certified_linear) == (
            b.index,
            b.certified_ibp,
            b.certified_linear,
        )
        for m, n in zip(a.margins, b.margins, strict=True):
            assert (m.other, m.ibp, m.linear, m.exact_value, m.falsified, m.falsified_by) == (
                n.other,
                n.ibp,
                n.linear,
                n.exact_value,
                n.falsified,
                n.falsified_by,
            )
    assert local.summary()["verdict"] == remote.summary()["verdict"]


def test_a_failed_task_is_retried(cluster: None, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"

    def flaky(offset: int, item: int) -> int:
        if item == 3 and not marker.exists():
            marker.write_text("x")
            raise RuntimeError("transient failure")
        return offset + item * item

    assert map_tasks(flaky, (10,), range(6)) == [10, 11, 14, 19, 26, 35]
    assert marker.exists()


def _running_task_workers() -> list[int]:
    """Pids of this instance's worker processes running one of our tasks right now."""
    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()[1])
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
        except (OSError, IndexError, ValueError):
            continue
        if parent == raylet and title.startswith(b"ray::_run_timed"):
            found.append(int(entry))
    return found


def test_a_killed_worker_loses_no_result(
    cluster: None, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor]
) -> None:
    graph, box, x, y = digits
    x, y = x.repeat(12, 1), y.repeat(12)
    local, _ = certify_samples(graph, box, x, y, method="best")
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for pid in _running_task_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    certifier = RayCertifier(samples_per_task=2048)
    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        remote, _ = certifier(graph, box, x, y, method="best")
    finally:
        killer.join()
    assert killed, "no worker was caught running a task"
    assert torch.equal(remote, local)
    assert certifier.stats.tasks == -(-len(x) // 2048)  # each task's result arrived once


def _peak_rss_mib(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, object]]:
    """Run a command; its own peak resident memory (MiB, from wait4) and its JSON output."""
    import subprocess

    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as proc:
        out = proc.stdout.read() if proc.stdout is not None else b""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out
    return usage.ru_maxrss / 1024, json.loads(out)


@pytest.mark.slow
def test_a_million_samples_stream_with_flat_memory(
    tmp_path: Path, digits: tuple[Graph, Box, torch.Tensor, torch.Tensor]
) -> None:
    """1,000,000 digits samples (256 MB of float32) certified from a memory-mapped pair: the
    peak memory of `verifier certify` grows by far less than the data between 100,000 and
    1,000,000 samples, and k is that of the repeated set. Peak memory is printed (-s)."""
    import sys

    graph, box, x, y = digits
    lid_path = tmp_path / "lid.safetensors"
    save_lid(lid_path, box, {})
    base, _ = certify_samples(graph, box, x, y)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peaks = {}
    for n in (100_000, 1_000_000):
        folder = tmp_path / f"n{n}"
        folder.mkdir()
        for name, array in (("x.npy", x.numpy()), ("y.npy", y.numpy())):
            with (folder / name).open("wb") as out:  # plain writes: this process stays small
                header = {"descr": array.dtype.str, "fortran_order": False}
                np.lib.format.write_array_header_1_0(
                    out, {**header, "shape": (n, *array.shape[1:])}
                )
                for start in range(0, n, len(array)):
                    out.write(array[: min(len(array), n - start)].tobytes())
        verifier = str(Path(sys.executable).parent / "verifier")
        peak, doc = _peak_rss_mib(
            [verifier, "certify", str(MODEL), str(lid_path), str(folder), "--json"], env
        )
        repeats, rest = divmod(n, len(x))
        assert doc["n"] == n and doc["k"] == repeats * int(base.sum()) + int(base[:rest].sum())
        peaks[n] = peak
        print(f"\nstream of {n} samples: peak RSS {peak:.0f} MiB, k = {doc['k']}")
    data_growth = 900_000 * 64 * 4 / 2**20  # 220 MiB more samples
    assert peaks[1_000_000] - peaks[100_000] < 0.25 * data_growth, peaks
