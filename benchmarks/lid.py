"""LID benchmark (issue 6): the digits default and the paper's Split-MNIST CNN on MNIST.

(a) digits: `specs/digits.yaml` through the same pipeline as `verifier run`.
(b) cnn: the paper's CNN (Conv(1->8,5x5,pad 1)-ReLU-Conv(8->1,5x5,pad 1)-ReLU-Flatten(576)-
    Linear(576->10), p = 6179) trained 2 epochs on the MNIST train split, exported to ONNX;
    τ = clean accuracy - 0.12; 200 iterations, batch 400; optimisation and held-out parts
    from the MNIST test split (5,000 each); search η = 10 (`--lr`; η/p is Adam's step), target
    slack 0.04.
(c) paper: the same with the paper's choices (midpoint-radius bounds, no shrink, no target
    slack) and its way of counting the certificate (on the search data), next to the
    held-out certificate of the same box and of its widest checkpoint that meets τ there;
    η = 1.0 (`--paper-lr`; the paper's own η_p is 0.33, which grows boxes more slowly).

Seconds per iteration are set against a plain training step (forward, backward, Adam step)
of the same network on a batch of the same size, timed in the same process.

Run:  .venv/bin/python benchmarks/lid.py [--only digits|cnn|paper] [--iterations N]
Prints Markdown; copy it into benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from verifier.bounds.ibp import margin_bounds
from verifier.bounds.margins import MarginBounds, soft_margin_accuracy
from verifier.certify import certify_samples, clopper_pearson_lower
from verifier.data import load_dataset
from verifier.domains.box import Box
from verifier.graph import Graph
from verifier.onnx.importer import load_graph
from verifier.pipeline import LidRun, prepare_task, run_lid
from verifier.search import SearchStep
from verifier.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


class StepClock:
    """Records the wall time of every search step (the search's on_step callback)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, step: SearchStep) -> None:
        self.stamps.append(time.perf_counter())

    def per_iteration(self) -> tuple[float, float]:
        """(mean seconds per iteration including checkpoints, median step interval)."""
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        if not gaps:
            return float("nan"), float("nan")
        return sum(gaps) / len(gaps), statistics.median(gaps)


BoundFn = Callable[
    [Graph, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor],
    MarginBounds,
]


def interleaved_step_ratio(
    graph: Graph,
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    repeats: int,
    bounds_fn: BoundFn = margin_bounds,
) -> tuple[float, float]:
    """Median seconds of one search step and one plain training step, timed alternately.

    The search step is what `search_lid` does per iteration: margin bounds over the box
    (float32) with the soft-accuracy loss, backward to both corners' width variables, an Adam
    step and the projection. Alternating the two keeps a shared machine's load the same for
    both; the ratio of the medians is the figure the issue asks for.
    """
    theta0 = {n: t.float() for n, t in graph.parameters.items()}
    d_lo = {n: torch.full_like(t, 1e-3).requires_grad_(True) for n, t in theta0.items()}
    d_hi = {n: torch.full_like(t, 1e-3).requires_grad_(True) for n, t in theta0.items()}
    box_opt = torch.optim.Adam([*d_lo.values(), *d_hi.values()], lr=1e-4)
    plain_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def search_step() -> None:
        lower = {n: theta0[n] - d_lo[n] for n in theta0}
        upper = {n: theta0[n] + d_hi[n] for n in theta0}
        bounds = bounds_fn(graph, lower, upper, x, y)
        soft = soft_margin_accuracy(bounds, temperature=10.0)
        size = sum((d_lo[n] + d_hi[n]).sum() for n in theta0)
        loss = -size + 10.0 * torch.relu(0.9 - soft) ** 2
        box_opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        box_opt.step()
        with torch.no_grad():
            for v in [*d_lo.values(), *d_hi.values()]:
                v.clamp_(min=0)
        bounds.certified().float().mean().item()

    def plain_step() -> None:
        plain_opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        plain_opt.step()

    searches, plains = [], []
    for _ in range(repeats + 2):
        for fn, out in ((search_step, searches), (plain_step, plains)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    net.load_state_dict(state)
    return statistics.median(searches[2:]), statistics.median(plains[2:])


def torch_from_graph_mlp(onnx_path: Path) -> nn.Module:
    """A torch copy of a Linear/ReLU chain stored as an ONNX graph (for the plain step)."""
    graph = load_graph(onnx_path)
    layers: list[nn.Module] = [nn.Flatten()]
    for op in graph.ops:
        weight = getattr(op, "weight", None)
        if weight is not None:
            w = graph.parameters[weight]
            if getattr(op, "weight_layout", "out_in") == "in_out":
                w = w.t()
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(graph.parameters[op.bias])  # type: ignore[attr-defined]
            layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def paper_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 1, 5, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(576, 10),
    )


def train_cnn(epochs: int, seed: int) -> tuple[nn.Module, float]:
    """The paper's CNN trained on the MNIST train split (Adam 1e-3, batch 64)."""
    torch.manual_seed(seed)
    data = load_dataset("mnist", split="train")
    net = paper_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(data.x[idx]), data.y[idx]).backward()
            opt.step()
    return net.eval(), time.perf_counter() - start


def export(net: nn.Module, path: Path) -> None:
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def cnn_spec(
    model: Path, iterations: int, *, paper: bool, slack: float, lr: float
) -> dict[str, Any]:
    search: dict[str, Any] = {
        "iterations": iterations,
        "batch_size": 400,
        "checkpoint_every": 20,
        "lr": lr,
        "size": "mean_width",
        "target_slack": slack,
    }
    if paper:
        search.update({"bound": "midrad", "shrink": False, "target_slack": 0.0})
    return {
        "model": str(model),
        "data": {"name": "mnist", "split": "test"},
        "parameters": "all",
        "tasks": [{"name": "mnist", "metric": "accuracy", "target": "acc - 0.12"}],
        "search": search,
        "certify": {"certification_fraction": 0.5, "beta": 0.001, "method": "ibp"},
    }


def run_spec(spec_path: Path, out: Path) -> tuple[LidRun, StepClock, float]:
    spec = load_spec(spec_path)
    clock = StepClock()
    start = time.perf_counter()

    def phase(message: str) -> None:
        elapsed = time.perf_counter() - start
        print(f"  [{elapsed:7.1f} s] {spec_path.stem}: {message}", file=sys.stderr)

    result = run_lid(spec, out, on_step=clock, on_phase=phase)
    return result, clock, time.perf_counter() - start


def width_spread(box: Box) -> str:
    """How the width is spread: the fraction of entries with width > 0, the median width and
    each tensor's mean width (mean width alone rewards piling width on a few entries)."""
    widths = {n: (box.upper[n] - box.lower[n]).double() for n in box.lower}
    flat = torch.cat([w.flatten() for w in widths.values()])
    per = ", ".join(f"{n} {float(w.mean()):.3g}" for n, w in widths.items())
    return f"{float((flat > 0).double().mean()):.2f}, {float(flat.median()):.3g}; {per}"


def row(name: str, run: LidRun, clock: StepClock, steps: tuple[float, float], total: float) -> str:
    mean_it, median_it = clock.per_iteration()
    search_step, plain = steps
    cert = run.certificates[0]
    return (
        f"| {name} | {run.document['lid']['n_parameters']} | {len(clock.stamps)} | "
        f"{mean_it:.3f} | {median_it:.3f} | {search_step * 1e3:.1f} ms | {plain * 1e3:.1f} ms "
        f"| {search_step / plain:.1f}x | "
        f"{run.document['lid']['mean_width']:.4g} | {width_spread(run.result.box)} | "
        f"{run.result.chosen} | "
        f"{cert.k}/{cert.n} | {cert.lower_bound:.4f} | {cert.target:.4f} | "
        f"{'holds' if cert.holds else 'NOT MET'} | {total:.0f} s |"
    )


HEADER = (
    "| job | p | iterations | s/iter (incl. checkpoints) | s/iter (median step) | search step "
    "(interleaved) | plain training step (interleaved) | ratio search / plain | mean width "
    "| entries with width > 0, median width, per tensor mean | chosen | held-out k/n | L | τ "
    "| verdict | wall |\n|" + "---|" * 16
)


def bench_digits(tmp: Path) -> list[str]:
    spec_path = ROOT / "specs" / "digits.yaml"
    spec = load_spec(spec_path)
    run, clock, total = run_spec(spec_path, tmp / "digits")
    data = load_dataset("digits", split="test")
    batch = min(spec.search.batch_size, len(data))
    net = torch_from_graph_mlp(Path(spec.model))
    graph = load_graph(Path(spec.model))
    steps = interleaved_step_ratio(graph, net, data.x[:batch], data.y[:batch], 50)
    return [row("digits MLP (specs/digits.yaml)", run, clock, steps, total)]


def write_spec(tmp: Path, name: str, spec: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def bench_cnn(
    tmp: Path, iterations: int, which: set[str], slack: float, lr: float, paper_lr: float
) -> tuple[list[str], list[str]]:
    net, train_s = train_cnn(epochs=2, seed=0)
    model = tmp / "mnist_cnn.onnx"
    export(net, model)
    test = load_dataset("mnist", split="test")
    steps = interleaved_step_ratio(load_graph(model), net, test.x[:400], test.y[:400], 20)
    rows, paper_rows = [], []
    note = f"(CNN trained 2 epochs in {train_s:.0f} s)"
    if "cnn" in which:
        path = write_spec(tmp, "cnn", cnn_spec(model, iterations, paper=False, slack=slack, lr=lr))
        run, clock, total = run_spec(path, tmp / "cnn")
        rows.append(row(f"Split-MNIST CNN, ours, η = {lr:g} {note}", run, clock, steps, total))
    if "paper" in which:
        spec = cnn_spec(model, iterations, paper=True, slack=0.0, lr=paper_lr)
        path = write_spec(tmp, "paper", spec)
        run, clock, total = run_spec(path, tmp / "paper")
        label = f"Split-MNIST CNN, paper's choices, η = {paper_lr:g} {note}"
        rows.append(row(label, run, clock, steps, total))
        paper_rows = paper_comparison(path, run)
    return rows, paper_rows


def paper_comparison(spec_path: Path, run: LidRun) -> list[str]:
    """The paper's certificate (on the search data) against held-out truth, per checkpoint."""
    spec = load_spec(spec_path)
    graph = load_graph(Path(spec.model))
    task = prepare_task(spec, spec.tasks[0], graph)
    x_opt = torch.cat([task.search.x, task.search.x_val])
    y_opt = torch.cat([task.search.y, task.search.y_val])
    lines = [
        "| box | mean width | entries with width > 0, median width, per tensor mean "
        "| certified on search data (paper's figure) | held-out k/n | held-out L "
        "| meets τ on held-out |",
        "|---|---|---|---|---|---|---|",
    ]
    candidates = [(f"checkpoint {c.iteration}", c.box) for c in run.result.checkpoints]
    candidates.append(("final box (paper reports this)", run.result.box))
    for name, box in candidates:
        on_search, _ = certify_samples(graph, box, x_opt, y_opt, method="midrad")
        held, _ = certify_samples(graph, box, task.x_cert, task.y_cert, method="midrad")
        k, n = int(held.sum()), held.shape[0]
        lower = clopper_pearson_lower(k, n, spec.certify.beta)
        lines.append(
            f"| {name} | {box.size('mean_width'):.4g} | {width_spread(box)} "
            f"| {float(on_search.float().mean()):.4f} "
            f"| {k}/{n} | {lower:.4f} | {'yes' if lower >= task.target else 'no'} |"
        )
    lines.append(f"\nτ = {task.target:.4f} (clean {task.clean:.4f} - 0.12)")
    return lines


def timed_section(title: str, fn: Callable[[], list[str]]) -> None:
    print(f"\n## {title}\n", flush=True)
    for line in fn():
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["digits", "cnn", "paper"], action="append")
    parser.add_argument("--iterations", type=int, default=200, help="CNN search iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--slack",
        type=float,
        default=0.04,
        help="target_slack of our CNN run: search target τ' = τ + slack (held-out margin)",
    )
    parser.add_argument("--lr", type=float, default=10.0, help="η of our CNN search")
    parser.add_argument(
        "--paper-lr",
        type=float,
        default=1.0,
        help="η of the paper-choices run (the paper's η_p is 0.33; 1.0 is more generous)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    which = set(args.only or ["digits", "cnn", "paper"])
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows: list[str] = []
        if "digits" in which:
            rows += bench_digits(tmp)
        paper_rows: list[str] = []
        if which & {"cnn", "paper"}:
            cnn_rows, paper_rows = bench_cnn(
                tmp, args.iterations, which, args.slack, args.lr, args.paper_lr
            )
            rows += cnn_rows
        print("\n## LID search and held-out certificate\n")
        print(HEADER)
        for line in rows:
            print(line)
        if paper_rows:
            print("\n## The paper's choices: what it reports against the held-out truth\n")
            for line in paper_rows:
                print(line)


if __name__ == "__main__":
    main()
