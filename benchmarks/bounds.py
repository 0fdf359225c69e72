"""Bound-engine benchmark: speed, memory and tightness of ibp / midrad / crown-ibp / best.

Networks (all parameters boxed): the 784-64-64-10 MLP and the paper's Split-MNIST CNN
(Conv(1->8,5x5,pad 1)-ReLU-Conv(8->1,5x5,pad 1)-ReLU-Flatten(576)-Linear(576->10), p = 6179),
each trained briefly on MNIST (read in place from the shared data folder).

Run:  .venv/bin/python benchmarks/bounds.py [--quick]
Prints a Markdown table to stdout; copy it into benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable

import torch
from torch import nn

from verifier.bounds.ibp import logit_bounds, margin_bounds
from verifier.bounds.margins import MarginBounds, combine_margin_bounds
from verifier.data import load_dataset
from verifier.graph import Activation, Conv, Graph, Linear, Reshape


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def mlp_graph(x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[Graph, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    train(net, x, y, steps)
    params = {
        f"fc{i}.{k}": v.detach().clone()
        for i, m in enumerate([net[1], net[3], net[5]])
        for k, v in m.state_dict().items()
    }
    ops = (
        Reshape("flatten", (784,)),
        Linear("fc0", "fc0.weight", "fc0.bias"),
        Activation("r0", "relu"),
        Linear("fc1", "fc1.weight", "fc1.bias"),
        Activation("r1", "relu"),
        Linear("fc2", "fc2.weight", "fc2.bias"),
    )
    return Graph(ops, params, "x", (1, 28, 28), "y", 10), net


def cnn_graph(x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[Graph, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 1, 5, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(576, 10),
    )
    train(net, x, y, steps)
    params = {
        "conv0.weight": net[0].weight.detach().clone(),
        "conv0.bias": net[0].bias.detach().clone(),
        "conv1.weight": net[2].weight.detach().clone(),
        "conv1.bias": net[2].bias.detach().clone(),
        "fc.weight": net[5].weight.detach().clone(),
        "fc.bias": net[5].bias.detach().clone(),
    }
    ops = (
        Conv("conv0", "conv0.weight", "conv0.bias", pads=(1, 1, 1, 1)),
        Activation("r0", "relu"),
        Conv("conv1", "conv1.weight", "conv1.bias", pads=(1, 1, 1, 1)),
        Activation("r1", "relu"),
        Reshape("flatten", (576,)),
        Linear("fc", "fc.weight", "fc.bias"),
    )
    return Graph(ops, params, "x", (1, 28, 28), "y", 10), net


def box(graph: Graph, radius: float) -> tuple[dict, dict]:
    lower = {n: p - radius * p.abs() for n, p in graph.parameters.items()}
    upper = {n: p + radius * p.abs() for n, p in graph.parameters.items()}
    return lower, upper


def saved_mb(fn: Callable[[], object]) -> float:
    """Megabytes of tensors autograd keeps for the backward pass of fn (its memory peak)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total / 2**20


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def speed_rows(name: str, graph: Graph, net: nn.Module, x, y, batches, repeats) -> list[str]:
    lower, upper = box(graph, 0.01)
    return [
        speed_row(name, graph, net, x[:batch], y[:batch], lower, upper, repeats)
        for batch in batches
    ]


def speed_row(name: str, graph: Graph, net: nn.Module, xb, yb, lower, upper, repeats) -> str:
    from verifier.bounds.lirpa import lirpa_logit_bounds, lirpa_margin_bounds

    batch = xb.shape[0]
    lo = {k: v.clone().requires_grad_(True) for k, v in lower.items()}
    up = {k: v.clone().requires_grad_(True) for k, v in upper.items()}

    def ours_fwd() -> None:
        with torch.no_grad():
            margin_bounds(graph, lower, upper, xb, yb)

    def ours_fwd_bwd() -> None:
        b = margin_bounds(graph, lo, up, xb, yb).lower
        b[~torch.isinf(b)].sum().backward()

    def plain_fwd_bwd() -> None:
        net.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()

    repeats = repeats * 10 if batch == 1 else repeats
    t_plain = timed(plain_fwd_bwd, repeats)
    t_fwd = timed(ours_fwd, repeats)
    t_fb = timed(ours_fwd_bwd, repeats)
    row = [
        name,
        str(batch),
        f"{t_fwd * 1e3:.2f}",
        f"{t_fb * 1e3:.2f}",
        f"{t_plain * 1e3:.2f}",
        f"{t_fb / t_plain:.1f}x",
        f"{saved_mb(ours_fwd_bwd):.1f} / {saved_mb(plain_fwd_bwd):.1f}",
    ]
    if name == "mlp":
        t_l_ibp = timed(
            lambda: lirpa_margin_bounds(
                graph, lower, upper, xb, yb, method="ibp", dtype=torch.float32
            ),
            max(1, repeats // 4),
        )
        t_crown = (
            timed(
                lambda: lirpa_margin_bounds(
                    graph, lower, upper, xb, yb, method="crown-ibp", dtype=torch.float32
                ),
                max(1, repeats // 4),
            )
            if batch <= 100
            else float("nan")
        )
        # identical-bounds check on logit intervals (our margins fold the last layer, tighter)
        lo64 = {k: v.double() for k, v in lower.items()}
        up64 = {k: v.double() for k, v in upper.items()}
        ours = logit_bounds(graph, lo64, up64, xb.double())
        theirs = lirpa_logit_bounds(graph, lo64, up64, xb.double(), method="ibp")
        rel = max(
            float(((a - b).abs() / a.abs().clamp(min=1e-3)).max())
            for a, b in ((ours.lower, theirs[0]), (ours.upper, theirs[1]))
        )
        row += [
            f"{t_l_ibp * 1e3:.2f}",
            f"{t_l_ibp / t_fwd:.1f}x",
            f"{t_crown * 1e3:.1f}",
            f"{rel:.1e}",
        ]
    else:
        row += ["n/a (Conv)", "", "n/a (Conv)", ""]
    return "| " + " | ".join(row) + " |"


def tightness_rows(name: str, graph: Graph, x, y, radii) -> list[str]:
    from verifier.bounds.lirpa import lirpa_margin_bounds

    rows = []
    x64 = x.double()
    for radius in radii:
        lower, upper = box(graph, radius)
        lo64 = {k: v.double() for k, v in lower.items()}
        up64 = {k: v.double() for k, v in upper.items()}
        results = {}
        ibp = margin_bounds(graph, lo64, up64, x64, y, track_rounding=True)
        mid = margin_bounds(graph, lo64, up64, x64, y, rule="midrad", track_rounding=True)
        results["ibp"] = (ibp.lower, ibp.certified())
        results["midrad"] = (mid.lower, mid.certified())
        if name == "mlp":
            crown = torch.cat(
                [
                    lirpa_margin_bounds(graph, lo64, up64, x64[i : i + 100], y[i : i + 100])
                    for i in range(0, x64.shape[0], 100)
                ]
            )
            crown_b = MarginBounds(crown, 1000 * ibp.rounding + 1e-9)  # as verifier.certify
            results["crown-ibp"] = (crown, crown_b.certified())
            best = combine_margin_bounds(ibp, crown_b)
            results["best"] = (best.lower, best.certified())
        for method, (lower_b, cert) in results.items():
            mask = ~torch.isinf(lower_b)
            rows.append(
                f"| {name} | {radius} | {method} | {float(lower_b[mask].mean()):.3f} | "
                f"{int(cert.sum())}/{x.shape[0]} |"
            )
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_data = load_dataset("mnist", split="train")
    test_data = load_dataset("mnist", split="test")
    steps = 300 if args.quick else 1500
    repeats = 3 if args.quick else 10
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("## Speed (ms per call, float32, all parameters boxed, radius 1% of |w|)\n")
    print(
        "| net | batch | ours IBP fwd | ours IBP fwd+bwd | plain fwd+bwd | ours fwd+bwd / plain "
        "| saved for backward MB, ours / plain | auto_LiRPA IBP | LiRPA IBP / ours "
        "| auto_LiRPA CROWN-IBP | max rel. diff ours vs LiRPA IBP logits (float64) |"
    )
    print("|" + "---|" * 11)
    graphs = {}
    for name, build in (("mlp", mlp_graph), ("cnn", cnn_graph)):
        graph, net = build(train_data.x, train_data.y, steps)
        graphs[name] = graph
        for row in speed_rows(name, graph, net, test_data.x, test_data.y, (1, 100, 1000), repeats):
            print(row, flush=True)
    print(f"\npeak RSS of the process so far: {peak_rss_mb():.0f} MB\n")
    n = 200 if args.quick else 500
    print(f"## Tightness (float64 proofs, first {n} MNIST test samples)\n")
    print("| net | radius (fraction of |w|) | method | mean margin lower bound | certified |")
    print("|---|---|---|---|---|")
    for name, graph in graphs.items():
        radii = (0.001, 0.005, 0.02) if name == "mlp" else (0.001, 0.005, 0.02)
        for row in tightness_rows(name, graph, test_data.x[:n], test_data.y[:n], radii):
            print(row, flush=True)


if __name__ == "__main__":
    main()
