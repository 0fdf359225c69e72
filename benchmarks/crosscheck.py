"""Cross-check benchmark: exact MILP margins on an MNIST MLP, z3 time against size, bound gaps.

1. A 784-64-64-10 MLP trained briefly on MNIST (read in place from the shared data folder),
   every parameter boxed at +-s|w| for several scales s; for the first 20 test inputs and their
   9 other classes: the exact worst-case margin by MILP (HiGHS), its time and binaries, and
   the gaps exact - IBP and exact - CROWN-IBP (float64).
2. z3 on random tiny ReLU nets of growing parameter count: nonlinear (the network as is) and
   linear (the reduced problem) decisions of "margin <= t" at t just above (sat) and just below
   (unsat) the exact minimum, against the MILP's time.

Run:  .venv/bin/python benchmarks/crosscheck.py [--quick]
Prints Markdown tables to stdout (one torch thread: the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from bounds import mlp_graph  # benchmarks/bounds.py: a script's folder is first on sys.path

from verifier.bounds.ibp import margin_bounds
from verifier.bounds.lirpa import lirpa_margin_bounds
from verifier.crosscheck.chain import relu_chain
from verifier.crosscheck.milp import solve_reduced
from verifier.crosscheck.problem import hidden_bounds, reduce_problem
from verifier.crosscheck.smt import decide_nonlinear, decide_reduced
from verifier.data import load_dataset
from verifier.domains import Box
from verifier.graph import Activation, Graph, Linear, Op


def random_net(widths: tuple[int, ...], generator: torch.Generator) -> Graph:
    """A random ReLU MLP (He-scaled normal weights, small biases), float64."""
    ops: list[Op] = []
    params = {}
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        scale = (2.0 / n_in) ** 0.5
        params[f"w{k}"] = torch.randn(n_out, n_in, generator=generator, dtype=torch.float64) * scale
        params[f"b{k}"] = 0.1 * torch.randn(n_out, generator=generator, dtype=torch.float64)
        if ops:
            ops.append(Activation(f"r{k}", "relu"))
        ops.append(Linear(f"l{k}", f"w{k}", f"b{k}"))
    return Graph(tuple(ops), params, "x", (widths[0],), "z", widths[-1])


def mnist_mlp(steps: int) -> tuple[Graph, float]:
    """The 784-64-64-10 MLP after `steps` Adam steps of batch 128; returns it and test accuracy."""
    train = load_dataset("mnist", split="train")
    test = load_dataset("mnist", split="test")
    graph, net = mlp_graph(train.x, train.y, steps)
    with torch.no_grad():
        accuracy = float((net(test.x).argmax(1) == test.y).float().mean())
    return graph, accuracy


def stats(values: list[float]) -> str:
    """min / mean / median / max (a negative min would be a soundness violation)."""
    if not values:
        return "n/a"
    return (
        f"{min(values):.2g} / {statistics.fmean(values):.3g} / "
        f"{statistics.median(values):.3g} / {max(values):.3g}"
    )


def milp_table(graph: Graph, scales: list[float], n_inputs: int, timeout_s: float) -> None:
    test = load_dataset("mnist", split="test")
    x = test.x[:n_inputs].to(torch.float64)
    y = test.y[:n_inputs]
    theta = {n: t.to(torch.float64) for n, t in graph.parameters.items()}
    print(
        f"\n### Exact MILP, 784-64-64-10 MNIST MLP, {n_inputs} inputs x 9 classes, all "
        f"{graph.n_parameters()} parameters boxed at +-s|w| (timeout {timeout_s:g} s per solve)\n"
    )
    print(
        "| s | MILP total s | per solve median / max s | binaries mean / max | timeouts | "
        "certified ibp / crown-ibp / exact | gap exact-IBP min / mean / median / max | "
        "gap exact-CROWN-IBP min / mean / median / max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for scale in scales:
        box = Box.around(theta, radius=0.0, relative=scale)
        ibp = margin_bounds(graph, box.lower, box.upper, x, y, track_rounding=True)
        crown = lirpa_margin_bounds(graph, box.lower, box.upper, x, y, method="crown-ibp")
        times, binaries, gaps_ibp, gaps_crown = [], [], [], []
        timeouts = 0
        exact_certified = 0
        started = time.perf_counter()
        for i in range(n_inputs):
            chain = relu_chain(graph, box, x[i])
            bounds = hidden_bounds(chain)
            label = int(y[i])
            worst = float("inf")
            for j in range(10):
                if j == label:
                    continue
                result = solve_reduced(reduce_problem(chain, bounds, label, j), timeout_s=timeout_s)
                times.append(result.seconds)
                binaries.append(result.n_binaries)
                if result.status != "optimal" or result.margin is None:
                    timeouts += 1
                    worst = float("-inf")  # unknown: not counted as exactly certified
                    continue
                worst = min(worst, result.margin)
                gaps_ibp.append(result.margin - float(ibp.lower[i, j]))
                gaps_crown.append(result.margin - float(crown[i, j]))
            exact_certified += worst > 0
        total = time.perf_counter() - started
        n_ibp = int(ibp.certified().sum())
        n_crown = int((crown > 0).all(dim=1).sum())
        print(
            f"| {scale:g} | {total:.1f} | {statistics.median(times):.3f} / {max(times):.2f} | "
            f"{statistics.fmean(binaries):.1f} / {max(binaries)} | {timeouts} | "
            f"{n_ibp} / {n_crown} / {exact_certified} | {stats(gaps_ibp)} | {stats(gaps_crown)} |",
            flush=True,
        )


def z3_table(widths_list: list[tuple[int, ...]], timeout_s: float) -> None:
    print(
        f"\n### z3 against parameter count (random ReLU nets, box +-0.3|w|, one input, class "
        f"pair 0/1; t = exact minimum -+ 1e-6 relative; timeout {timeout_s:g} s)\n"
    )
    print(
        "| widths | params | exact min | MILP s | z3 linear sat / unsat s | "
        "z3 nonlinear sat / unsat s |"
    )
    print("|---|---|---|---|---|---|")
    for widths in widths_list:
        gen = torch.Generator().manual_seed(0)
        graph = random_net(widths, gen)
        box = Box.around(graph.parameters, radius=0.0, relative=0.3)
        x = torch.randn(1, widths[0], generator=gen, dtype=torch.float64)
        chain = relu_chain(graph, box, x)
        problem = reduce_problem(chain, hidden_bounds(chain), 0, 1)
        exact = solve_reduced(problem)
        assert exact.margin is not None
        delta = 1e-6 * max(1.0, abs(exact.margin))
        cells = []
        for decide in ("linear", "nonlinear"):
            parts = []
            for threshold, expected in (
                (exact.margin + delta, "sat"),
                (exact.margin - delta, "unsat"),
            ):
                if decide == "linear":
                    verdict = decide_reduced(problem, threshold=threshold, timeout_s=timeout_s)
                else:
                    verdict = decide_nonlinear(
                        graph,
                        box,
                        x,
                        0,
                        1,
                        threshold=threshold,
                        timeout_s=timeout_s,
                        max_parameters=10_000,
                    )
                mark = "" if verdict.status == expected else f" ({verdict.status})"
                parts.append(f"{verdict.seconds:.2f}{mark}")
            cells.append(" / ".join(parts))
        print(
            f"| {'-'.join(map(str, widths))} | {graph.n_parameters()} | {exact.margin:.4f} | "
            f"{exact.seconds:.3f} | {cells[0]} | {cells[1]} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer inputs, scales and nets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (1 torch thread), "
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; command: benchmarks/crosscheck.py"
        + (" --quick" if args.quick else "")
    )
    graph, accuracy = mnist_mlp(300 if args.quick else 1000)
    print(f"MNIST MLP test accuracy {accuracy:.4f}")
    scales = [0.01, 0.05, 0.2] if args.quick else [0.01, 0.02, 0.05, 0.1, 0.2]
    milp_table(graph, scales, 5 if args.quick else 20, timeout_s=60.0)
    nets = [(2, 3, 2), (3, 4, 3, 2), (4, 6, 6, 3)]
    if not args.quick:
        nets += [(2, 2, 2, 2), (5, 7, 7, 3), (6, 8, 8, 3), (4, 5, 5, 5, 3), (8, 10, 10, 3)]
        nets.sort(key=lambda w: random_net(w, torch.Generator()).n_parameters())
    z3_table(nets, timeout_s=60.0)


if __name__ == "__main__":
    main()
