"""Reshaping the searched box (issue 19): LID width with and without `search.reshape`, under
interval and linear bounds, at equal held-out τ; the attack ceiling of each shape; use.

Sections (`--only`, default all), every figure from one run on this machine:

* width (always run; the others use its LIDs): LIDs of the 784-100-100-10 MLP and the
  paper's CNN (`benchmarks/linear.py`'s trained networks: 2 epochs on MNIST, Adam 1e-3, batch
  64), τ = clean − 0.12, search on 5,000 MNIST
  test images, held-out certificate on the other 5,000, through `verifier run`'s pipeline,
  size `layer_log_width`: the interval search and the linear search, each without and with
  `--rounds` rounds of reshaping. The CNN's linear search runs the interval search's
  iterations and bounds linearly from the reshaping on (`linear.warm_start` = iterations);
  the MLP's bounds linearly at every step. One held-out certificate per job
  (`certify.ladder: {targets: 1, scales: [1.0]}`, the same for every job).
* ceiling: per LID, the largest scale of its shape (1 = the LID) at which the interval bounds,
  the best bounds (intervals and linear) and weight-space PGD leave the search target's rate on
  `--ceiling-samples` optimisation samples. PGD attains its margins with real weights, so no
  sound bound can certify a larger scale than its figure: the room a tighter bound has left.
* use: projected fine-tuning of the CNN on MNIST shifted by 2 pixels inside each CNN LID
  (`benchmarks/linear.py`'s use section).
* settings (`--only settings`, runs alone): the MLP's linear / interval mean-width ratio over
  the search schedules on offer, each job's own settings the same for both bounds: no
  reshaping, `--rounds` and 2 x `--rounds` reshaping rounds, linear bounds from the start or
  only from the reshaping on (`linear.warm_start` = iterations), reshaping moves priced by the
  search's bound or by intervals (`reshape.costs: ibp`).

Run:  .venv/bin/python benchmarks/reshape.py [--only width ceiling use] [--rounds 8]
Prints Markdown; copy it into benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from linear import conv_open, lid_spec, run_job, section_use, trained  # benchmarks/linear.py
from torch import Tensor
from torch.func import grad, vmap

from verifier.domains.box import Box
from verifier.graph import Graph
from verifier.onnx.importer import load_graph
from verifier.pipeline import LidRun, prepare_task
from verifier.search.dual import SearchTask, hard_metrics
from verifier.search.float32 import inward_float32
from verifier.spec import load_spec

SECTIONS = ("width", "ceiling", "use", "settings")

JOBS = (
    ("mlp_100_100", "ibp"),
    ("mlp_100_100", "linear"),
    ("paper_cnn", "ibp"),
    ("paper_cnn", "linear"),
)


def job_spec(path: Path, name: str, bound: str, rounds: int, iterations: int) -> dict[str, Any]:
    spec = lid_spec(
        path,
        drop=0.12,
        bound=bound,
        size="layer_log_width",
        iterations=iterations,
        lr=10.0,
        classes=2 if bound == "linear" else None,
        samples=0.25 if bound == "linear" else None,
    )
    if bound == "linear" and name == "paper_cnn":
        spec["search"]["linear"]["warm_start"] = iterations
    spec["search"]["reshape"] = {"rounds": rounds}
    spec["certify"]["ladder"] = {"targets": 1, "scales": [1.0]}
    return spec


def width_row(label: str, graph: Graph, run: LidRun, wall: float) -> str:
    box, cert = run.result.box, run.certificates[0]
    widths = torch.cat([(box.upper[n] - box.lower[n]).flatten() for n in box.names])
    return (
        f"| {label} | {box.size('mean_width'):.4g} | {float(widths.median()):.4g} | "
        f"{box.size('layer_log_width'):.2f} | {conv_open(graph, box)} | {cert.k}/{cert.n} | "
        f"{cert.lower_bound:.4f} | {cert.target:.4f} | {'holds' if cert.holds else 'NOT MET'} | "
        f"{wall:.0f} s |"
    )


def section_width(
    models: Path, tmp: Path, rounds: int, iterations: int, nets: Sequence[str]
) -> tuple[list[str], dict[str, tuple[Box, SearchTask]]]:
    lines = [
        "| job | mean width | median width | layer log-width | Conv entries with width > 0 "
        "| held-out k/n | L | τ | verdict | wall |",
        "|" + "---|" * 10,
    ]
    lids: dict[str, tuple[Box, SearchTask]] = {}
    for name, bound in (job for job in JOBS if job[0] in nets):
        path, _ = trained(name, models)
        graph = load_graph(path)
        for r in (0, rounds):
            spec = job_spec(path, name, bound, r, iterations)
            run, wall = run_job(tmp, f"{name}-{bound}-{r}", spec)
            task = _search_task(tmp / f"{name}-{bound}-{r}.yaml", graph)
            lids[f"{name}/{bound}/reshape {r}"] = (run.result.box, task)
            lines.append(width_row(f"{name} {bound}, reshape {r}", graph, run, wall))
            print(lines[-1], file=sys.stderr, flush=True)
    return lines, lids


SETTINGS: tuple[tuple[str, int, dict[str, Any]], ...] = (
    ("linear at every step", 0, {}),
    ("linear from the reshaping on", 0, {"warm_start": True}),
    ("linear at every step", 1, {}),
    ("linear from the reshaping on", 1, {"warm_start": True}),
    ("linear at every step, moves priced by intervals", 1, {"costs": "ibp"}),
    (
        "linear from the reshaping on, moves priced by intervals",
        1,
        {"warm_start": True, "costs": "ibp"},
    ),
    ("linear at every step", 2, {}),
    ("linear at every step, moves priced by intervals", 2, {"costs": "ibp"}),
)
"""The MLP's linear jobs of the settings section: label, reshaping rounds in units of
`--rounds`, changes to `job_spec`'s linear job."""


def section_settings(models: Path, tmp: Path, rounds: int, iterations: int) -> list[str]:
    """The MLP's linear LID against the interval LID at the same reshaping rounds, over the
    linear search schedules of `SETTINGS`."""
    name = "mlp_100_100"
    path, _ = trained(name, models)
    lines = [
        "| linear job | rounds | interval mean width | linear mean width | ratio | linear held-out "
        "k/n | L | τ | verdict | wall |",
        "|" + "---|" * 10,
    ]
    interval: dict[int, float] = {}
    for label, units, change in SETTINGS:
        r = units * rounds
        if r not in interval:
            run, _ = run_job(tmp, f"settings-ibp-{r}", job_spec(path, name, "ibp", r, iterations))
            interval[r] = run.result.box.size("mean_width")
        spec = job_spec(path, name, "linear", r, iterations)
        if change.get("warm_start"):
            spec["search"]["linear"]["warm_start"] = iterations
        if "costs" in change:
            spec["search"]["reshape"]["costs"] = change["costs"]
        run, wall = run_job(tmp, f"settings-linear-{r}-{len(lines)}", spec)
        width, cert = run.result.box.size("mean_width"), run.certificates[0]
        lines.append(
            f"| {label} | {r} | {interval[r]:.4g} | {width:.4g} | {width / interval[r]:.2f}x | "
            f"{cert.k}/{cert.n} | {cert.lower_bound:.4f} | {cert.target:.4f} | "
            f"{'holds' if cert.holds else 'NOT MET'} | {wall:.0f} s |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _search_task(spec_path: Path, graph: Graph) -> SearchTask:
    """The job's optimisation samples and search target, as its pipeline split them."""
    spec = load_spec(spec_path)
    return prepare_task(spec, spec.tasks[0], graph).search


def _shape(graph: Graph, box: Box) -> Callable[[float], Box]:
    """The LID's shape at scale s around θ0 (s = 1: the LID), corners rounded inward."""
    theta0 = {n: graph.parameters[n].double() for n in box.names}
    return lambda s: inward_float32(box.scaled(theta0, s))


def _worst_margin(graph: Graph) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
    def margin(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        z = graph.forward(x.unsqueeze(0), theta)[0]
        mask = (torch.arange(z.shape[0]) == y).to(z.dtype)
        return (z * mask).sum() - (z - 1e9 * mask).max()

    return margin


def attacked_rate(graph: Graph, box: Box, x: Tensor, y: Tensor, steps: int) -> float:
    """Fraction of samples whose smallest margin stays > 0 under per-sample weight-space PGD
    (signed steps on the margin to the runner-up, the first one the full box width): the PGD of
    `verifier.crosscheck.falsify`, batched over samples with vmap (that one attacks one sample
    and class at a time, too slow for thousands of samples per scale)."""
    margin = _worst_margin(graph)
    value, slope = vmap(margin), vmap(grad(margin))
    names = box.names
    lo = {n: box.lower[n].float() for n in names}
    hi = {n: box.upper[n].float() for n in names}
    centre = {n: graph.parameters[n].float() for n in names}
    broken = 0
    for i in range(0, x.shape[0], 100):
        xb, yb = x[i : i + 100].float(), y[i : i + 100]
        theta = {n: centre[n].expand(xb.shape[0], *centre[n].shape).clone() for n in names}
        worst = value(theta, xb, yb)
        for step in range(steps):
            g = slope(theta, xb, yb)
            size = 1.0 if step == 0 else 0.5 * (1 - step / steps)
            theta = {
                n: torch.minimum(
                    torch.maximum(theta[n] - size * (hi[n] - lo[n]) * torch.sign(g[n]), lo[n]),
                    hi[n],
                )
                for n in names
            }
            worst = torch.minimum(worst, value(theta, xb, yb))
        broken += int((worst <= 0).sum())
    return 1.0 - broken / x.shape[0]


def _largest(rate: Callable[[float], float], target: float, low: float, steps: int = 8) -> float:
    """The largest scale with rate >= target: doubling from `low`, then bisection."""
    high = 2 * low
    while rate(high) >= target and high < 1e4:
        low, high = high, 2 * high
    if rate(low) < target:
        low = 0.0
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if rate(mid) >= target else (low, mid)
    return low


def ceiling_row(key: str, graph: Graph, box: Box, task: SearchTask, n: int, steps: int) -> str:
    x = torch.cat([task.x, task.x_val])[:n]
    y = torch.cat([task.y, task.y_val])[:n]
    part = SearchTask(task.name, task.metric, task.target, x, y, x[:0], y[:0])
    scaled = _shape(graph, box)

    def certified(method: Any, s: float) -> float:
        return hard_metrics(graph, scaled(s), [part], proof=False, method=method)[0]

    s_ibp = _largest(lambda s: certified("ibp", s), task.target, 0.5)
    s_best = _largest(lambda s: certified("best", s), task.target, max(s_ibp, 0.5))
    s_pgd = _largest(
        lambda s: attacked_rate(graph, scaled(s), x, y, steps), task.target, s_best, steps=6
    )
    return (
        f"| {key} | {box.size('mean_width'):.4g} | {task.target:.4f} | {s_ibp:.3f} | "
        f"{s_best:.3f} | {s_pgd:.3f} | {s_best / s_ibp:.2f}x | {s_pgd / s_ibp:.2f}x | "
        f"{s_pgd / s_best:.2f}x |"
    )


def section_ceiling(
    models: Path, lids: dict[str, tuple[Box, SearchTask]], n: int, steps: int
) -> list[str]:
    lines = [
        "| LID | mean width | search target | interval scale | best scale | PGD ceiling scale "
        "| best / interval | ceiling / interval | ceiling / best |",
        "|" + "---|" * 9,
    ]
    for key, (box, task) in lids.items():
        graph = load_graph(trained(key.split("/")[0], models)[0])
        lines.append(ceiling_row(key, graph, box, task, n, steps))
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--models", type=Path, default=Path("/tmp/lid-linear-models"))
    parser.add_argument("--rounds", type=int, default=8, help="reshaping rounds")
    parser.add_argument("--nets", nargs="+", default=["mlp_100_100", "paper_cnn"])
    parser.add_argument("--iterations", type=int, default=200, help="search iterations")
    parser.add_argument("--ceiling-samples", type=int, default=2000)
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.only == ["settings"]:
            print("\n## The MLP's width ratio over the linear search schedules\n")
            lines = section_settings(args.models, tmp, args.rounds, args.iterations)
            print("\n".join(lines), flush=True)
            return
        print(f"\n## LID width with and without reshaping ({args.rounds} rounds)\n")
        lines, lids = section_width(args.models, tmp, args.rounds, args.iterations, args.nets)
        print("\n".join(lines), flush=True)
        if "ceiling" in args.only:
            print(f"\n## Attack ceiling of each LID's shape ({args.ceiling_samples} samples)\n")
            lines = section_ceiling(args.models, lids, args.ceiling_samples, args.pgd_steps)
            print("\n".join(lines), flush=True)
        if "use" in args.only:
            print("\n## Use: projected fine-tuning of the CNN on MNIST shifted by 2 pixels\n")
            boxes = {k: box for k, (box, _) in lids.items()}
            print("\n".join(section_use(args.models, boxes)), flush=True)


if __name__ == "__main__":
    main()
