"""Scale-out on Ray (issue 22): certification throughput, local vs Ray, and a speed-up model.

For the paper's Split-MNIST CNN and the 784-100-100-10 MLP (seeded untrained weights: the cost
of a float64 interval proof does not depend on the values; every parameter boxed at
θ0 ± 1%·|θ0|), on MNIST test samples:

* local: `certify_samples` in this process (1 torch thread, as one Ray worker has; and torch's
  default thread count);
* Ray with 1 and 2 workers (`ray.init(num_cpus=1 | 2)` on this machine), after a warm-up call
  that starts the workers; the mask is checked to equal the local one, bit for bit;
* the per-task overhead (a no-op task, 1 worker) and the per-chunk cost (256 samples);
* the exact cross-check (MILP, 784-100-100-10 MLP) on Ray with 2 workers vs 1;
* from those, a model of the speed-up on N nodes.

Run:  LID_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/ray_scaling.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from lid import export, paper_cnn  # benchmarks/lid.py
from linear import mlp  # benchmarks/linear.py

from verifier.certify import certify_samples
from verifier.crosscheck import CrosscheckConfig, FalsifierConfig, crosscheck_samples
from verifier.data import load_dataset
from verifier.distributed import RayCertifier, RayTaskRunner, map_tasks
from verifier.domains.box import Box
from verifier.graph import Graph
from verifier.onnx.importer import load_graph

CHUNK = 256
LOAD = os.getloadavg()


def network(name: str, folder: Path) -> Graph:
    torch.manual_seed(0)
    net = paper_cnn() if name == "paper CNN" else mlp([784, 100, 100, 10])
    path = folder / f"{name.replace(' ', '_')}.onnx"
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


def ray_figures(
    ray: object,
    workers: int,
    cases: dict[str, tuple[Graph, Box, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> dict[str, object]:
    import ray as ray_module

    ray_module.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    out: dict[str, object] = {}
    try:
        certifier = RayCertifier()
        for graph, box, x, y, _ in cases.values():  # warm-up: start the workers
            certifier(graph, box, x[: 4 * CHUNK], y[: 4 * CHUNK])
        for name, (graph, box, x, y, local_mask) in cases.items():
            certifier = RayCertifier()
            started = time.perf_counter()
            mask, _ = certifier(graph, box, x, y)
            out[name] = len(x) / (time.perf_counter() - started)
            assert torch.equal(mask, local_mask), f"{name}: Ray mask differs from the local one"
            out[f"{name} tasks"] = certifier.stats.tasks
            # in-task seconds per chunk: when it grows with the workers, the cores are not ours
            out[f"{name} chunk_s"] = sum(certifier.stats.task_seconds) / -(-len(x) // CHUNK)
        if workers == 1:
            items = 400
            map_tasks(noop, (0,), range(20))
            started = time.perf_counter()
            map_tasks(noop, (0,), range(items))
            out["overhead_s"] = (time.perf_counter() - started) / items
    finally:
        ray_module.shutdown()
    return out


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
    """T(N) = ceil(tasks / (N·C)) · (chunks_per_task · chunk_s + overhead_s), tasks of
    `TASKS_PER_CPU` per core (at most 16384 samples); speed-up = T_local / T(N)."""
    import math

    rows = []
    t_local = math.ceil(n / CHUNK) * chunk_s
    for count in nodes:
        workers = count * cores
        per_task = min(16384, math.ceil(n / (4 * workers)))
        per_task = max(1, math.ceil(per_task / CHUNK)) * CHUNK
        tasks = math.ceil(n / per_task)
        rounds = math.ceil(tasks / workers)
        t = rounds * (per_task / CHUNK * chunk_s + overhead_s)
        rows.append(f"| {count} | {workers} | {tasks} | {t_local / t:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mlp-samples", type=int, default=10000)
    parser.add_argument("--cnn-samples", type=int, default=2000)
    parser.add_argument("--milp-samples", type=int, default=8)
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU shared with other jobs")
    args = parser.parse_args()
    data = load_dataset("mnist", split="test")
    cases: dict[str, tuple[Graph, Box, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    rates: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {name: network(name, Path(tmp)) for name in ("784-100-100-10 MLP", "paper CNN")}
    for name, graph in graphs.items():
        n = args.cnn_samples if name == "paper CNN" else args.mlp_samples
        # more samples than the test split holds: the split repeated (throughput only)
        reps = -(-n // data.x.shape[0])
        x, y = data.x.repeat(reps, 1, 1, 1)[:n], data.y.repeat(reps)[:n]
        box = box_of(graph)
        one, mask = local_rate(graph, box, x, y, 1)
        default, mask_default = local_rate(graph, box, x, y, torch.get_num_threads())
        assert torch.equal(mask, mask_default)
        rates[name] = {"local 1 thread": one, f"local {torch.get_num_threads()} threads": default}
        cases[name] = (graph, box, x, y, mask)
        print(
            f"{name}: local {one:.0f} samples/s (1 thread), {default:.0f} (default threads)",
            file=sys.stderr,
        )
    ray_one = ray_figures(None, 1, cases)
    ray_two = ray_figures(None, 2, cases)
    print(f"\n## ray (issue 22): certification throughput, {args.machine}\n")
    print(
        "| network | samples | local, 1 thread | local, default threads | Ray 1 worker "
        "| Ray 2 workers | Ray 1 / local | Ray 2 / Ray 1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (_, _, x, _, _) in cases.items():
        local = rates[name]["local 1 thread"]
        default = [v for k, v in rates[name].items() if k != "local 1 thread"][0]
        r1, r2 = float(ray_one[name]), float(ray_two[name])  # type: ignore[arg-type]
        print(
            f"| {name} | {len(x)} | {local:.0f} | {default:.0f} | {r1:.0f} | {r2:.0f} "
            f"| {r1 / local:.3f} | {r2 / r1:.2f}x |"
        )
    for name in cases:
        c1, c2 = float(ray_one[f"{name} chunk_s"]), float(ray_two[f"{name} chunk_s"])  # type: ignore[arg-type]
        print(
            f"In-task time per chunk, {name}: 1 worker {c1 * 1e3:.1f} ms, 2 workers "
            f"{c2 * 1e3:.1f} ms (load average at start / now: {LOAD[0]:.1f} / "
            f"{os.getloadavg()[0]:.1f})"
        )
    mlp_name = "784-100-100-10 MLP"
    chunk_s = {name: CHUNK / rates[name]["local 1 thread"] for name in cases}
    overhead = float(ray_one["overhead_s"])  # type: ignore[arg-type]
    print(f"\nPer-task overhead (a no-op task, 1 worker, 400 tasks): {overhead * 1e3:.2f} ms.")
    for name, seconds in chunk_s.items():
        print(
            f"Per-chunk cost ({CHUNK} samples, float64 IBP, 1 thread), {name}: "
            f"{seconds * 1e3:.1f} ms."
        )
    graph = graphs[mlp_name]
    x, y = data.x[: args.milp_samples], data.y[: args.milp_samples]
    one_s, exact_one = crosscheck_seconds(graph, x, y, 1)
    two_s, exact_two = crosscheck_seconds(graph, x, y, 2)
    assert exact_one == exact_two, "cross-check results differ between 1 and 2 workers"
    print(
        f"\nCross-check ({args.milp_samples} samples x 9 classes, exact MILP, {mlp_name}): "
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
