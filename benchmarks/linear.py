"""Linear bounds over weight boxes (issue 19): speed, tightness, search cost, LID width, depth, use.

Sections (`--only`, default all), every figure from one run on this machine:

* speed: ms per margin pass (float32, all parameters boxed at 1% of |w|) of our linear bounds,
  our IBP and auto_LiRPA CROWN-IBP on a 784-64-64-10 MNIST MLP at batch 1 / 100 / 1000, with
  the mean margin lower bound of each (equal or tighter?); linear vs IBP on the paper's CNN.
* tightness: mean exact - bound gap (exact worst-case margins by MILP, `verifier.crosscheck`)
  on that MLP, 20 test inputs x 9 classes, boxes θ0 ± s|θ0| for s = 0.01 and 0.02; the bounds
  include branch and bound on ReLU splits (`verifier.bounds.bab`, tightness mode: the lowest
  leaves of every margin are split until the domain budget is spent; float64 proof mode, gap
  to bound - allowance).
* step: one search step with linear bounds (bounds, soft-accuracy loss, backward to both
  corners, Adam step) ÷ one plain training step of the same network and batch (400), timed
  alternately, on the 784-100-100-10 MLP and the paper's CNN.
* width: LIDs of the 784-100-100-10 MLP and the paper's CNN (trained 2 epochs on MNIST, Adam
  1e-3, batch 64), τ = clean − 0.12, search on 5,000 MNIST test images, held-out certificate on
  the other 5,000, through `verifier run`'s pipeline: the IBP search against the linear search
  (search target τ + 0.03: the "auto" slack left held-out bounds a hair under τ here).
* depth: LID mean width against depth (2 to 9 hidden ReLU layers of 200, τ = clean − 0.05).
* use: projected fine-tuning of the CNN on MNIST shifted by 2 pixels inside each LID: Task-2
  accuracy, and Task 1's held-out certificate (which the projection keeps by construction).

Trained networks are cached as ONNX in `--models` (default /tmp/lid-linear-models).

Run:  .venv/bin/python benchmarks/linear.py [--only speed tightness step width depth use]
Prints Markdown; copy it into benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lid import BoundFn, export, interleaved_step_ratio, paper_cnn  # benchmarks/lid.py
from torch import nn

from verifier.bounds.bab import BabOptions, bab_margin_bounds
from verifier.bounds.ibp import margin_bounds
from verifier.bounds.linear import linear_margin_bounds
from verifier.bounds.margins import MarginBounds, combine_margin_bounds
from verifier.data import load_dataset
from verifier.domains.box import Box
from verifier.graph import Conv, Graph
from verifier.onnx.importer import load_graph
from verifier.pipeline import LidRun, run_lid
from verifier.search.surrogate import guide_bounds
from verifier.spec import LinearBoundSection, load_spec

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("speed", "tightness", "step", "width", "spread", "depth", "use", "allowance")


# ------------------------------------------------------------------ networks


def mlp(widths: Sequence[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "mlp_64_64": lambda: mlp([784, 64, 64, 10]),
    "mlp_100_100": lambda: mlp([784, 100, 100, 10]),
    "paper_cnn": paper_cnn,
    **{f"mlp_depth{d}": (lambda d=d: mlp([784] + [200] * d + [10])) for d in range(2, 10)},
}


def trained(name: str, folder: Path) -> tuple[Path, nn.Module]:
    """The network trained 2 epochs on the MNIST train split (Adam 1e-3, batch 64), as ONNX."""
    path = folder / f"{name}.onnx"
    net = NETWORKS[name]()
    weights = folder / f"{name}.pt"
    if path.exists() and weights.exists():
        net.load_state_dict(torch.load(weights))
        return path, net.eval()
    torch.manual_seed(0)
    data = load_dataset("mnist", split="train")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(data.x[idx]), data.y[idx]).backward()
            opt.step()
    net.eval()
    folder.mkdir(parents=True, exist_ok=True)
    export(net, path)
    torch.save(net.state_dict(), weights)
    return path, net


def box_at(graph: Graph, scale: float, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """θ0 ± scale·|θ0| on every parameter."""
    lower = {n: (t - scale * t.abs()).to(dtype) for n, t in graph.parameters.items()}
    upper = {n: (t + scale * t.abs()).to(dtype) for n, t in graph.parameters.items()}
    return lower, upper


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mean_finite(t: torch.Tensor) -> float:
    return float(t[~torch.isinf(t)].mean())


# ------------------------------------------------------------------ sections


def speed_row(
    name: str,
    graph: Graph,
    lower: dict[str, torch.Tensor],
    upper: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    repeats: int,
) -> str:
    from verifier.bounds.lirpa import lirpa_margin_bounds

    batch = x.shape[0]
    with torch.no_grad():
        lin = linear_margin_bounds(graph, lower, upper, x, y)
        ibp = margin_bounds(graph, lower, upper, x, y)
    t_lin = timed(lambda: linear_margin_bounds(graph, lower, upper, x, y), repeats)
    t_ibp = timed(lambda: margin_bounds(graph, lower, upper, x, y), repeats)
    crown_ms, ratio, crown_mean = "n/a (Conv)", "", ""
    if name.startswith("mlp"):
        crown = lirpa_margin_bounds(graph, lower, upper, x, y, method="crown-ibp")
        t_crown = timed(
            lambda: lirpa_margin_bounds(graph, lower, upper, x, y, method="crown-ibp"),
            max(1, repeats // 3),
        )
        crown_ms = f"{t_crown * 1e3:.1f}"
        ratio = f"{t_crown / t_lin:.0f}x"
        crown_mean = f"{mean_finite(crown):.4f}"
    return (
        f"| {name} | {batch} | {t_lin * 1e3:.2f} | {t_ibp * 1e3:.2f} | {crown_ms} | "
        f"{ratio} | {t_lin / t_ibp:.1f}x | {mean_finite(lin.lower):.4f} | {crown_mean} "
        f"| {mean_finite(ibp.lower):.4f} |"
    )


def section_speed(models: Path, repeats: int) -> list[str]:
    test = load_dataset("mnist", split="test")
    lines = [
        "| net | batch | linear ms | IBP ms | auto_LiRPA CROWN-IBP ms | CROWN-IBP / linear "
        "| linear / IBP | mean bound linear | mean bound CROWN-IBP | mean bound IBP |",
        "|" + "---|" * 10,
    ]
    for name in ("mlp_64_64", "paper_cnn"):
        path, _ = trained(name, models)
        graph = load_graph(path)
        lower, upper = box_at(graph, 0.01)
        for batch in (1, 100, 1000):
            lines.append(
                speed_row(name, graph, lower, upper, test.x[:batch], test.y[:batch], repeats)
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def section_tightness(models: Path, n_inputs: int) -> list[str]:
    from verifier.bounds.lirpa import lirpa_margin_bounds
    from verifier.crosscheck.chain import relu_chain
    from verifier.crosscheck.exact import exact_margins

    test = load_dataset("mnist", split="test")
    path, _ = trained("mlp_64_64", models)
    graph = load_graph(path)
    x64, y = test.x[:n_inputs].double(), test.y[:n_inputs]
    lines = [
        "| s | bound | margins | gap exact − bound mean / max | certified (of "
        f"{n_inputs}) | ms for the {n_inputs} inputs |",
        "|" + "---|" * 6,
    ]
    variants: dict[str, Callable[[dict, dict], torch.Tensor]] = {
        "IBP": lambda lo, up: margin_bounds(graph, lo, up, x64, y).lower,
        "auto_LiRPA CROWN-IBP": lambda lo, up: lirpa_margin_bounds(
            graph, lo, up, x64, y, method="crown-ibp"
        ),
        "linear (IBP intermediate, adaptive slopes)": lambda lo, up: (
            linear_margin_bounds(graph, lo, up, x64, y).lower
        ),
        "linear (CROWN intermediate, adaptive)": lambda lo, up: (
            linear_margin_bounds(graph, lo, up, x64, y, intermediate="crown").lower
        ),
        "linear (CROWN intermediate, optimised slopes)": lambda lo, up: (
            linear_margin_bounds(
                graph, lo, up, x64, y, intermediate="crown", slopes="optimized"
            ).lower
        ),
        **{
            f"branch and bound, ≤ {budget} domains per margin": (
                lambda lo, up, budget=budget: _bab_slack(graph, lo, up, x64, y, budget)
            )
            for budget in (40, 200)
        },
    }
    excess = -math.inf
    for scale in (0.01, 0.02):
        lower, upper = box_at(graph, scale, torch.float64)
        box = Box(lower, upper)
        exact: dict[tuple[int, int], float] = {}
        exact_ok = 0
        start = time.perf_counter()
        for i in range(n_inputs):
            margins = exact_margins(relu_chain(graph, box, x64[i]), int(y[i]), timeout_s=120.0)
            exact_ok += int(min(m.margin for m in margins.values()) > 0)
            for j, margin in margins.items():
                if margin.status == "optimal":
                    exact[(i, j)] = margin.margin
        spent = time.perf_counter() - start
        lines.append(
            f"| {scale} | exact (MILP) | {len(exact)} | 0 | {exact_ok} | {spent * 1e3:.0f} |"
        )
        for name, bound in variants.items():
            began = time.perf_counter()
            with torch.no_grad():
                values = bound(lower, upper)
            ms = (time.perf_counter() - began) * 1e3
            gaps = [m - float(values[i, j]) for (i, j), m in exact.items()]
            if min(gaps) < -1e-9:
                raise AssertionError(f"{name} above an exact minimum by {-min(gaps)}")
            excess = max(excess, -min(gaps))
            certified = int((values > 0).all(dim=1).sum())
            lines.append(
                f"| {scale} | {name} | {len(gaps)} | {statistics.mean(gaps):.4f} / "
                f"{max(gaps):.4f} | {certified} | {ms:.0f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    lines.append(
        f"\nNo bound exceeds its exact minimum by more than 1e-9 (checked; largest bound - "
        f"exact: {excess:.1e})."
    )
    return lines


def _bab_slack(
    graph: Graph, lower: dict, upper: dict, x: torch.Tensor, y: torch.Tensor, budget: int
) -> torch.Tensor:
    """Branch-and-bound margins minus their float64 rounding allowance (tightness mode)."""
    options = BabOptions(max_domains=budget, stop_at=None)
    bounds = bab_margin_bounds(graph, lower, upper, x, y, options=options, track_rounding=True)
    assert bounds.rounding is not None
    return bounds.lower - bounds.rounding


def linear_bounds(classes: int | None, samples: float | None = None) -> BoundFn:
    """The search's guide bounds with linear bounds on `classes` classes per sample (and on the
    `samples` fraction of the batch whose interval bounds are lowest)."""
    options = LinearBoundSection(classes=classes, samples=samples)

    def bounds(
        graph: Graph, lower: dict, upper: dict, x: torch.Tensor, y: torch.Tensor
    ) -> MarginBounds:
        return guide_bounds(graph, lower, upper, x, y, linear=True, options=options)

    return bounds


STEP_SAMPLES = 0.25
"""The fraction of the batch bounded linearly in the step table's last column (`search.linear.
samples`)."""


def section_step(models: Path, repeats: int) -> list[str]:
    test = load_dataset("mnist", split="test")
    x, y = test.x[:400], test.y[:400]
    lines = [
        "| net | plain step ms | IBP step ms (÷ plain) | linear, all 9 classes | linear, 2 "
        "classes per sample | linear (2 classes) every 2nd step, mean | every 4th step, mean "
        f"| linear, 2 classes, {STEP_SAMPLES:.0%} of the samples, every step |",
        "|" + "---|" * 8,
    ]
    for name in ("mlp_100_100", "paper_cnn"):
        path, net = trained(name, models)
        graph = load_graph(path)
        t_ibp, plain_a = interleaved_step_ratio(graph, net, x, y, repeats)
        t_all, plain_b = interleaved_step_ratio(graph, net, x, y, repeats, linear_bounds(None))
        t_two, plain_c = interleaved_step_ratio(graph, net, x, y, repeats, linear_bounds(2))
        t_part, plain_d = interleaved_step_ratio(
            graph, net, x, y, repeats, linear_bounds(2, STEP_SAMPLES)
        )
        plain = statistics.median([plain_a, plain_b, plain_c, plain_d])

        def cell(seconds: float, plain: float = plain) -> str:
            return f"{seconds * 1e3:.1f} ({seconds / plain:.1f}x)"

        lines.append(
            f"| {name} | {plain * 1e3:.1f} | {cell(t_ibp)} | {cell(t_all)} | {cell(t_two)} | "
            f"{cell((t_ibp + t_two) / 2)} | {cell((3 * t_ibp + t_two) / 4)} | {cell(t_part)} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def lid_spec(
    model: Path,
    *,
    drop: float,
    bound: str,
    size: str,
    iterations: int,
    lr: float,
    every: int = 1,
    classes: int | None = None,
    samples: float | None = None,
    slack: float = 0.03,
) -> dict[str, Any]:
    search: dict[str, Any] = {
        "iterations": iterations,
        "batch_size": 400,
        "checkpoint_every": 20,
        "lr": lr,
        "size": size,
        "bound": bound,
        "target_slack": slack,
    }
    if bound == "linear":
        search["linear"] = {"every": every, "classes": classes, "samples": samples}
    return {
        "model": str(model),
        "data": {"name": "mnist", "split": "test"},
        "parameters": "all",
        "tasks": [{"name": "mnist", "metric": "accuracy", "target": f"acc - {drop}"}],
        "search": search,
        "certify": {
            "certification_fraction": 0.5,
            "beta": 0.001,
            "method": "best" if bound == "linear" else "ibp",
        },
    }


def run_job(tmp: Path, name: str, spec: dict[str, Any]) -> tuple[LidRun, float]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    start = time.perf_counter()

    def phase(message: str) -> None:
        print(f"  [{time.perf_counter() - start:7.1f} s] {name}: {message}", file=sys.stderr)

    run = run_lid(load_spec(path), tmp / name, on_phase=phase)
    return run, time.perf_counter() - start


def conv_open(graph: Graph, box: Box) -> str:
    """Fraction of entries with width > 0 in each Conv weight tensor."""
    parts = []
    for op in graph.ops:
        if isinstance(op, Conv) and op.weight in box.lower:
            width = box.upper[op.weight] - box.lower[op.weight]
            parts.append(f"{op.weight} {float((width > 0).double().mean()):.2f}")
    return ", ".join(parts) or "-"


def lid_row(label: str, graph: Graph, run: LidRun, wall: float) -> str:
    cert = run.certificates[0]
    box = run.result.box
    return (
        f"| {label} | {box.size('mean_width'):.4g} | {box.size('layer_log_width'):.2f} | "
        f"{conv_open(graph, box)} | {cert.k}/{cert.n} | {cert.lower_bound:.4f} | "
        f"{cert.target:.4f} | {'holds' if cert.holds else 'NOT MET'} | {wall:.0f} s |"
    )


LID_HEADER = (
    "| job | mean width | layer log-width | Conv entries with width > 0 | held-out k/n | L | τ "
    "| verdict | wall |\n|" + "---|" * 9
)


WIDTH_VARIANTS = {
    "mlp_100_100": (
        ("ibp", "mean_width"),
        ("ibp", "layer_log_width"),
        ("linear", "mean_width"),
        ("linear", "layer_log_width"),
    ),
    "paper_cnn": (("ibp", "mean_width"), ("ibp", "layer_log_width"), ("linear", "layer_log_width")),
}
"""The searches compared per network (bound, size measure); the CNN's linear search bounds
linearly every `--cnn-every`-th step (intervals between), the MLP's every step."""


def section_width(
    models: Path, tmp: Path, iterations: int, lr: float, cnn_every: int, cnn_classes: int
) -> tuple[list[str], dict]:
    lines = [LID_HEADER]
    lids: dict[str, Box] = {}
    for name, variants in WIDTH_VARIANTS.items():
        path, _ = trained(name, models)
        graph = load_graph(path)
        every = cnn_every if name == "paper_cnn" else 1
        classes = cnn_classes if name == "paper_cnn" else None
        for bound, size in variants:
            label = f"{name} {bound} search, size {size}"
            if bound == "linear" and name == "paper_cnn":
                label += f", linear every {every} steps on the {classes} lowest classes"
            spec = lid_spec(
                path,
                drop=0.12,
                bound=bound,
                size=size,
                iterations=iterations,
                lr=lr,
                every=every,
                classes=classes,
            )
            run, wall = run_job(tmp, f"{name}-{bound}-{size}", spec)
            lids[f"{name}/{bound}/{size}"] = run.result.box
            lines.append(lid_row(label, graph, run, wall))
            print(lines[-1], file=sys.stderr, flush=True)
    return lines, lids


def section_spread(models: Path, tmp: Path, iterations: int, lr: float) -> list[str]:
    """Where the width of the 784-100-100-10 MLP's LIDs lies: interval vs linear searches with
    the default target and certification ladder (mean-width measure), the mean against the
    median and against the mean without the first-layer weights of pixels that are 0 in every
    MNIST test image (those weights move no output, so only the search's growth rate limits
    them)."""
    path, _ = trained("mlp_100_100", models)
    x = load_dataset("mnist", split="test").x.reshape(10000, -1)
    dead = x.abs().amax(dim=0) == 0
    lines = [
        f"{int(dead.sum())} of 784 pixels are 0 in every test image.\n",
        "| search | mean width | median width | mean without dead-pixel weights | first layer, "
        "median over live pixels | layer log-width | held-out k/n | L | τ | wall |",
        "|" + "---|" * 10,
    ]
    stats: dict[str, tuple[float, ...]] = {}
    for bound in ("ibp", "linear"):
        spec = lid_spec(
            path, drop=0.12, bound=bound, size="mean_width", iterations=iterations, lr=lr
        )
        spec["search"]["target_slack"] = "auto"
        run, wall = run_job(tmp, f"spread-{bound}", spec)
        box = run.result.box
        widths = {n: (box.upper[n] - box.lower[n]).double() for n in box.lower}
        first = next(n for n, w in widths.items() if w.dim() == 2)
        rest = [w.flatten() for n, w in widths.items() if n != first]
        every = torch.cat([w.flatten() for w in widths.values()])
        live = torch.cat([widths[first][:, ~dead].flatten(), *rest])
        row = (
            float(every.mean()),
            float(every.median()),
            float(live.mean()),
            float(widths[first][:, ~dead].median()),
        )
        stats[bound] = row
        cert = run.certificates[0]
        lines.append(
            f"| {bound} | {row[0]:.4g} | {row[1]:.4g} | {row[2]:.4g} | {row[3]:.4g} | "
            f"{box.size('layer_log_width'):.2f} | {cert.k}/{cert.n} | {cert.lower_bound:.4f} | "
            f"{cert.target:.4f} | {wall:.0f} s |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    ratios = [a / b for a, b in zip(stats["linear"], stats["ibp"], strict=True)]
    lines.append("| linear / ibp | " + " | ".join(f"{r:.2f}x" for r in ratios) + " | | | | | |")
    return lines


def section_depth(
    models: Path, tmp: Path, iterations: int, lr: float, depths: Sequence[int]
) -> list[str]:
    lines = [
        "| hidden layers | p | clean | IBP mean width | linear mean width | linear / IBP "
        "| IBP L / linear L (τ) | wall IBP / linear |",
        "|" + "---|" * 8,
    ]
    for depth in depths:
        path, _ = trained(f"mlp_depth{depth}", models)
        graph = load_graph(path)
        runs = {}
        for bound in ("ibp", "linear"):
            spec = lid_spec(
                path, drop=0.05, bound=bound, size="mean_width", iterations=iterations, lr=lr
            )
            runs[bound] = run_job(tmp, f"depth{depth}-{bound}", spec)
        (r_ibp, w_ibp), (r_lin, w_lin) = runs["ibp"], runs["linear"]
        width_ibp = r_ibp.result.box.size("mean_width")
        width_lin = r_lin.result.box.size("mean_width")
        c_ibp, c_lin = r_ibp.certificates[0], r_lin.certificates[0]
        ratio = width_lin / width_ibp if width_ibp > 0 else float("inf")
        clean = r_lin.document["tasks"][0]["clean_metric"]
        lines.append(
            f"| {depth} | {graph.n_parameters()} | {clean:.4f} | {width_ibp:.3g} | "
            f"{width_lin:.3g} | {ratio:.1f}x | {c_ibp.lower_bound:.4f} / {c_lin.lower_bound:.4f} "
            f"({c_lin.target:.4f}) | {w_ibp:.0f} / {w_lin:.0f} s |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def section_use(models: Path, lids: dict[str, Box]) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from zonotope import finetune, shifted_mnist  # benchmarks/zonotope.py

    path, _ = trained("paper_cnn", models)
    graph = load_graph(path)
    train, test = load_dataset("mnist", split="train"), load_dataset("mnist", split="test")
    x2, y2 = shifted_mnist(train.x[:20000]), train.y[:20000]
    xt2 = shifted_mnist(test.x)

    def accuracy(theta: dict[str, torch.Tensor] | None, x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((graph.forward(x, theta).argmax(1) == test.y).float().mean())

    lines = [
        "| fine-tuned inside | LID mean width | Task-2 (shifted) test accuracy "
        "| Task-1 test accuracy | Task-1 held-out certificate (kept by projection) |",
        "|" + "---|" * 5,
        f"| (start) | - | {accuracy(None, xt2):.4f} | {accuracy(None, test.x):.4f} | - |",
    ]
    theta, _ = finetune(graph, None, x2, y2, epochs=1, lr=1e-3, seed=0)
    lines.append(
        f"| nothing (plain fine-tuning) | - | {accuracy(theta, xt2):.4f} | "
        f"{accuracy(theta, test.x):.4f} | none |"
    )
    for key, box in lids.items():
        if not key.startswith("paper_cnn/"):
            continue
        theta, _ = finetune(graph, box, x2, y2, epochs=1, lr=1e-3, seed=0)
        lines.append(
            f"| {key} | {box.size('mean_width'):.4g} | {accuracy(theta, xt2):.4f} | "
            f"{accuracy(theta, test.x):.4f} | see width table |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def section_allowance(models: Path) -> list[str]:
    """Float64 rounding allowances at zero width and at 0.1% of |w| on the 9-layer MLP."""
    path, _ = trained("mlp_depth9", models)
    graph = load_graph(path)
    test = load_dataset("mnist", split="test")
    x, y = test.x[:300].double(), test.y[:300]
    lines = [
        "| box | method | max allowance | mean allowance | certified of 300 |",
        "|" + "---|" * 5,
    ]
    for scale in (0.0, 0.001):
        lower, upper = box_at(graph, scale, torch.float64)
        ibp = margin_bounds(graph, lower, upper, x, y, track_rounding=True)
        lin = linear_margin_bounds(graph, lower, upper, x, y, track_rounding=True)
        best = combine_margin_bounds(ibp, lin)
        for name, bounds in (("ibp", ibp), ("linear", lin), ("best", best)):
            assert bounds.rounding is not None
            finite = ~torch.isinf(bounds.lower)
            lines.append(
                f"| θ0 ± {scale}·abs(θ0) | {name} | {float(bounds.rounding[finite].max()):.3g} | "
                f"{float(bounds.rounding[finite].mean()):.3g} | {int(bounds.certified().sum())} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--models", type=Path, default=Path("/tmp/lid-linear-models"))
    parser.add_argument("--iterations", type=int, default=200, help="search iterations")
    parser.add_argument("--lr", type=float, default=10.0, help="search η (Adam step η/p)")
    parser.add_argument("--repeats", type=int, default=10, help="timing repeats")
    parser.add_argument("--inputs", type=int, default=20, help="MILP inputs per box scale")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--depths", type=int, nargs="+", default=list(range(2, 10)), help="hidden layers"
    )
    parser.add_argument(
        "--cnn-every", type=int, default=4, help="CNN linear search: linear bounds every k steps"
    )
    parser.add_argument(
        "--cnn-classes", type=int, default=2, help="CNN linear search: classes bounded linearly"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        lids: dict[str, Box] = {}
        if "speed" in args.only:
            print("\n## Speed (float32, all parameters boxed at 1% of |w|)\n")
            print("\n".join(section_speed(args.models, args.repeats)), flush=True)
        if "tightness" in args.only:
            print("\n## Tightness against exact MILP margins (784-64-64-10, float64)\n")
            print("\n".join(section_tightness(args.models, args.inputs)), flush=True)
        if "step" in args.only:
            print("\n## Search step ÷ plain training step (batch 400)\n")
            print("\n".join(section_step(args.models, args.repeats)), flush=True)
        if "width" in args.only or "use" in args.only:
            print(f"\n## LID width (τ = clean − 0.12, {args.iterations} iterations)\n")
            lines, lids = section_width(
                args.models, tmp, args.iterations, args.lr, args.cnn_every, args.cnn_classes
            )
            print("\n".join(lines), flush=True)
        if "spread" in args.only:
            print(f"\n## Where the MLP's width lies (τ = clean − 0.12, {args.iterations} it.)\n")
            print("\n".join(section_spread(args.models, tmp, args.iterations, args.lr)))
        if "depth" in args.only:
            print(f"\n## Width against depth (τ = clean − 0.05, {args.iterations} iterations)\n")
            lines = section_depth(args.models, tmp, args.iterations, args.lr, args.depths)
            print("\n".join(lines), flush=True)
        if "allowance" in args.only:
            print("\n## Float64 rounding allowance, 9 hidden layers of 200, 300 MNIST samples\n")
            print("\n".join(section_allowance(args.models)), flush=True)
        if "use" in args.only:
            print("\n## Use: projected fine-tuning of the CNN on MNIST shifted by 2 pixels\n")
            print("\n".join(section_use(args.models, lids)), flush=True)


if __name__ == "__main__":
    main()
