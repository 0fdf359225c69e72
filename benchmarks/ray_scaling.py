"""Scale-out on Ray (issue 22): certification throughput, local vs Ray, and a speed-up model.

For the paper's Split-MNIST CNN and the 784-100-100-10 MLP (seeded untrained weights: the cost
of a float64 interval proof does not depend on the values; every parameter boxed at
θ0 ± 1%·|θ0|), on MNIST test samples:

* local: `certify_samples` in this process (1 torch thread, as one Ray worker has; and torch's
  default thread count);
* Ray with 1 and 2 workers (`ray.init(num_cpus=1 | 2)` on this machine), after warm-up calls
  that start the workers and let the certifier measure its cost per sample (its task sizes);
  the mask is checked to equal the local one, bit for bit. Instances alternate (1, 2, 1, 2
  workers: `--rounds`), each network is timed `--repeats` times per instance and the best rate
  counts; the load average is recorded for each instance, and each run's CPU time is split
  into the driver, the workers and Ray's other processes (from /proc);
* the machine's own ceiling at the time: the same MLP proof in 2 plain processes vs 1
  (multiprocessing, no Ray), measured at the start of each round, so a round's Ray ratio can
  be read against what the cores allowed then;
* the per-task overhead (a no-op task, 1 worker) and the per-chunk cost (256 samples);
* the exact cross-check (MILP, 784-100-100-10 MLP) on Ray with 2 workers vs 1;
* from those, a model of the speed-up on N nodes.

Run:  LID_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/ray_scaling.py
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lid import export, paper_cnn  # benchmarks/lid.py
from linear import mlp  # benchmarks/linear.py

from verifier.certify import certify_samples
from verifier.crosscheck import CrosscheckConfig, FalsifierConfig, crosscheck_samples
from verifier.data import load_dataset
from verifier.distributed import RayCertifier, RayTaskRunner, map_tasks
from verifier.distributed.certification import MAX_SAMPLES_PER_TASK, MIN_TASK_S, guided_tasks
from verifier.domains.box import Box
from verifier.graph import Graph
from verifier.onnx.importer import load_graph

CHUNK = 256
LOAD = os.getloadavg()
MLP = "784-100-100-10 MLP"
CNN = "paper CNN"
TICK = os.sysconf("SC_CLK_TCK")
Case = tuple[Graph, Box, torch.Tensor, torch.Tensor, torch.Tensor]


def network(name: str, folder: Path) -> Graph:
    torch.manual_seed(0)
    net = paper_cnn() if name == CNN else mlp([784, 100, 100, 10])
    path = folder / f"{name.replace(' ', '_')}.onnx"
    if not path.exists():
        export(net.eval(), path)
    return load_graph(path)


def box_of(graph: Graph) -> Box:
    lower = {n: t - 0.01 * t.abs() for n, t in graph.parameters.items()}
    upper = {n: t + 0.01 * t.abs() for n, t in graph.parameters.items()}
    return Box(lower, upper)


def local_rate(
    graph: Graph, box: Box, x: torch.Tensor, y: torch.Tensor, threads: int
) -> tuple[float, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        mask, _ = certify_samples(graph, box, x, y)
        return len(x) / (time.perf_counter() - started), mask
    finally:
        torch.set_num_threads(before)


def noop(_shared: int, item: int) -> int:
    return item


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of this process and every process below it, by pid."""
    parents: dict[int, list[int]] = {}
    found: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()
            name = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        parents.setdefault(int(stat[1]), []).append(int(entry))
        found[int(entry)] = (name, (int(stat[11]) + int(stat[12])) / TICK)
    tree, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in found:
            tree[pid] = found[pid]
        todo += parents.get(pid, [])
    return tree


def cpu_split(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds since `before`: this driver, Ray's worker processes, Ray's other ones."""
    out = {"driver": 0.0, "workers": 0.0, "ray other": 0.0}
    for pid, (name, seconds) in cpu_seconds().items():
        used = seconds - before.get(pid, (name, 0.0))[1]
        if pid == os.getpid():
            out["driver"] += used
        elif name.startswith("ray::") and "Agent" not in name:
            out["workers"] += used
        else:
            out["ray other"] += used
    return out


def ray_figures(workers: int, cases: dict[str, Case], repeats: int) -> dict[str, Any]:
    """Each network's best rate over `repeats` calls on a fresh `workers`-CPU instance, with
    the profile of its best call; the per-task overhead on 1 worker."""
    import ray as ray_module

    ray_module.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"load": [os.getloadavg()[0]]}
    try:
        learned: dict[str, RayCertifier] = {}
        for name, (graph, box, x, y, _) in cases.items():  # warm-up: start the workers
            learned[name] = RayCertifier()
            learned[name](graph, box, x[: 4 * CHUNK], y[: 4 * CHUNK])
            learned[name](graph, box, x, y)  # and measure the cost per sample
        for name, (graph, box, x, y, local_mask) in cases.items():
            runs = []
            for _ in range(repeats):
                certifier = RayCertifier(seconds_per_sample=dict(learned[name].seconds_per_sample))
                before, driver = cpu_seconds(), time.process_time()
                started = time.perf_counter()
                mask, _ = certifier(graph, box, x, y)
                wall = time.perf_counter() - started
                assert torch.equal(mask, local_mask), f"{name}: Ray mask differs from the local one"
                cpu = cpu_split(before)
                cpu["driver"] = time.process_time() - driver  # this thread's view, exact
                runs.append(
                    {
                        "rate": len(x) / wall,
                        "wall": wall,
                        "tasks": certifier.stats.tasks,
                        # in-task seconds per chunk: when it grows with the workers, the cores
                        # are not ours
                        "chunk_s": sum(certifier.stats.task_seconds) / -(-len(x) // CHUNK),
                        **cpu,
                    }
                )
            out[name] = max(runs, key=lambda run: run["rate"])
            out[f"{name} rates"] = [run["rate"] for run in runs]
        if workers == 1:
            items = 400
            map_tasks(noop, (0,), range(20))
            started = time.perf_counter()
            map_tasks(noop, (0,), range(items))
            out["overhead_s"] = (time.perf_counter() - started) / items
    finally:
        out["load"].append(os.getloadavg()[0])
        ray_module.shutdown()
    return out


_POOL_CASE: tuple[Graph, Box, torch.Tensor, torch.Tensor] | None = None


def _pool_setup(path: str, n: int) -> None:
    global _POOL_CASE
    torch.set_num_threads(1)
    graph = load_graph(Path(path))
    x, y = samples(load_dataset("mnist", split="test"), n)
    _POOL_CASE = (graph, box_of(graph), x, y)


def _pool_prove(bounds: tuple[int, int]) -> int:
    assert _POOL_CASE is not None
    graph, box, x, y = _POOL_CASE
    mask, _ = certify_samples(graph, box, x[bounds[0] : bounds[1]], y[bounds[0] : bounds[1]])
    return int(mask.sum())


def process_ceiling(path: Path, n: int, rounds: int) -> list[tuple[float, float, float]]:
    """The same proof split over 2 plain processes vs 1 (no Ray), alternating: per round,
    (rate with 1 process, rate with 2, load average)."""
    context = multiprocessing.get_context("spawn")
    rates: dict[int, float] = {}
    out = []
    for _ in range(rounds):
        for workers in (1, 2):
            with context.Pool(workers, _pool_setup, (str(path), n)) as pool:
                pool.map(_pool_prove, [(0, CHUNK)] * workers)  # started and warm
                half = math.ceil(n / CHUNK / workers) * CHUNK
                parts = [(i * half, min(n, (i + 1) * half)) for i in range(workers)]
                started = time.perf_counter()
                pool.map(_pool_prove, parts, chunksize=1)
                rates[workers] = n / (time.perf_counter() - started)
        out.append((rates[1], rates[2], os.getloadavg()[0]))
    return out


def samples(data: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n MNIST test samples; more than the split holds: the split repeated (throughput only)."""
    reps = -(-n // data.x.shape[0])
    return data.x.repeat(reps, 1, 1, 1)[:n], data.y.repeat(reps)[:n]


def crosscheck_seconds(
    graph: Graph, x: torch.Tensor, y: torch.Tensor, workers: int
) -> tuple[float, list[float | None]]:
    import ray as ray_module

    lower = {n: t - 0.002 * t.abs() for n, t in graph.parameters.items()}
    upper = {n: t + 0.002 * t.abs() for n, t in graph.parameters.items()}
    box = Box(lower, upper)
    config = CrosscheckConfig(
        exact="milp",
        timeout_s=120,
        falsifier=FalsifierConfig(n_uniform=4, n_vertex=4, pgd_steps=4, pgd_restarts=0),
    )
    ray_module.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        crosscheck_samples(graph, box, x[:2].double(), y[:2], config=config, runner=RayTaskRunner())
        started = time.perf_counter()
        result = crosscheck_samples(
            graph, box, x.double(), y, config=config, runner=RayTaskRunner()
        )
        seconds = time.perf_counter() - started
    finally:
        ray_module.shutdown()
    exact = [m.exact_value for s in result.samples for m in s.margins]
    return seconds, exact


def speedup_model(
    chunk_s: float, overhead_s: float, n: int, cores: int, nodes: list[int]
) -> list[str]:
    """The certifier's own guided tasks on N·C workers (shortest `MIN_TASK_S`, at most
    `MAX_SAMPLES_PER_TASK` samples), handed to whichever worker is free first; a task costs
    its passes · chunk_s + overhead_s; speed-up = T_local / T(N), T_local = passes · chunk_s."""
    import heapq

    rows = []
    t_local = math.ceil(n / CHUNK) * chunk_s
    shortest = max(CHUNK, math.ceil(MIN_TASK_S / (chunk_s / CHUNK)))
    for count in nodes:
        workers = count * cores
        tasks = guided_tasks(n, CHUNK, workers, shortest, MAX_SAMPLES_PER_TASK)
        free = [0.0] * workers
        for start, stop in tasks:
            heapq.heappush(
                free, heapq.heappop(free) + math.ceil((stop - start) / CHUNK) * chunk_s + overhead_s
            )
        rows.append(f"| {count} | {workers} | {len(tasks)} | {t_local / max(free):.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mlp-samples", type=int, default=10000)
    parser.add_argument("--cnn-samples", type=int, default=2000)
    parser.add_argument("--milp-samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per instance")
    parser.add_argument("--rounds", type=int, default=2, help="1- and 2-worker instances each")
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU shared with other jobs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", split="test")
    cases: dict[str, Case] = {}
    rates: dict[str, dict[str, float]] = {}
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    graphs = {name: network(name, folder) for name in (MLP, CNN)}
    for name, graph in graphs.items():
        x, y = samples(data, args.cnn_samples if name == CNN else args.mlp_samples)
        box = box_of(graph)
        threads = os.cpu_count() or 1
        one = max(local_rate(graph, box, x, y, 1)[0] for _ in range(args.repeats))
        _, mask = local_rate(graph, box, x, y, 1)
        default, mask_default = local_rate(graph, box, x, y, threads)
        assert torch.equal(mask, mask_default)
        rates[name] = {"local 1 thread": one, "local default threads": default}
        cases[name] = (graph, box, x, y, mask)
        print(
            f"{name}: local {one:.0f} samples/s (1 thread, best of {args.repeats}), "
            f"{default:.0f} ({threads} threads)",
            file=sys.stderr,
        )
    onnx = folder / f"{MLP.replace(' ', '_')}.onnx"
    rounds, ceiling = [], []
    for _ in range(args.rounds):  # each round: plain processes, then Ray, 1 and 2 workers
        ceiling += process_ceiling(onnx, args.mlp_samples, 1)
        rounds.append((ray_figures(1, cases, args.repeats), ray_figures(2, cases, args.repeats)))
    tmp.cleanup()
    print(f"\n## ray (issue 22): certification throughput, {args.machine}\n")
    print(
        "| round | network | samples | local, 1 thread | local, default threads | Ray 1 worker "
        "| Ray 2 workers | Ray 1 / local | Ray 2 / Ray 1 | load avg (1 w / 2 w) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for index, (ray_one, ray_two) in enumerate(rounds, 1):
        for name, (_, _, x, _, _) in cases.items():
            local, default = rates[name]["local 1 thread"], rates[name]["local default threads"]
            r1, r2 = ray_one[name]["rate"], ray_two[name]["rate"]
            load = "{:.1f}-{:.1f} / {:.1f}-{:.1f}".format(*ray_one["load"], *ray_two["load"])
            print(
                f"| {index} | {name} | {len(x)} | {local:.0f} | {default:.0f} | {r1:.0f} "
                f"| {r2:.0f} | {r1 / local:.3f} | {r2 / r1:.2f}x | {load} |"
            )
    print(
        "\nEach run's profile (the best of each instance's calls): tasks, in-task time per "
        "chunk, CPU seconds of the driver, the Ray workers and Ray's other processes, wall.\n"
    )
    print(
        "| round | network | workers | tasks | in-task ms/chunk | driver s | workers s "
        "| Ray other s | wall s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for index, (ray_one, ray_two) in enumerate(rounds, 1):
        for name in cases:
            for workers, found in ((1, ray_one), (2, ray_two)):
                run = found[name]
                print(
                    f"| {index} | {name} | {workers} | {run['tasks']} | {run['chunk_s'] * 1e3:.1f} "
                    f"| {run['driver']:.2f} | {run['workers']:.2f} | {run['ray other']:.2f} "
                    f"| {run['wall']:.3f} |"
                )
    print(
        f"\nThe machine's ceiling, {MLP}, {args.mlp_samples} samples split over plain "
        "processes (no Ray), 1 torch thread each:"
    )
    for index, (one_p, two_p, load) in enumerate(ceiling, 1):
        print(
            f"round {index}: 1 process {one_p:.0f}, 2 processes {two_p:.0f} samples/s: "
            f"{two_p / one_p:.2f}x (load average {load:.1f})"
        )
    print(f"Load average at the start / end: {LOAD[0]:.1f} / {os.getloadavg()[0]:.1f}.")
    chunk_s = {name: CHUNK / rates[name]["local 1 thread"] for name in cases}
    overhead = statistics.median(float(ray_one["overhead_s"]) for ray_one, _ in rounds)
    print(f"\nPer-task overhead (a no-op task, 1 worker, 400 tasks): {overhead * 1e3:.2f} ms.")
    for name, seconds in chunk_s.items():
        print(
            f"Per-chunk cost ({CHUNK} samples, float64 IBP, 1 thread), {name}: "
            f"{seconds * 1e3:.1f} ms."
        )
    graph = graphs[MLP]
    x, y = data.x[: args.milp_samples], data.y[: args.milp_samples]
    one_s, exact_one = crosscheck_seconds(graph, x, y, 1)
    two_s, exact_two = crosscheck_seconds(graph, x, y, 2)
    assert exact_one == exact_two, "cross-check results differ between 1 and 2 workers"
    print(
        f"\nCross-check ({args.milp_samples} samples x 9 classes, exact MILP, {MLP}): "
        f"1 worker {one_s:.1f} s, 2 workers {two_s:.1f} s, speed-up {one_s / two_s:.2f}x "
        "(identical exact margins)."
    )
    for name in cases:
        print(f"\nModel of the speed-up on N nodes of 2 cores, {name}, 1,000,000 samples:\n")
        print("| nodes | workers | tasks | speed-up vs 1 core |")
        print("|---:|---:|---:|---:|")
        for row in speedup_model(chunk_s[name], overhead, 1_000_000, 2, [1, 2, 4, 8, 16, 64]):
            print(row)


if __name__ == "__main__":
    main()
