"""Scaling of the bound engines with parameter count (issue 21, point 3).

Two families, every parameter boxed at θ0 ± 1%·|θ0| (seeded random weights: the cost of a
bound pass does not depend on the values), CIFAR-shaped inputs (3x32x32, random in [0, 1]):

* MLP: 3072 -> h -> h -> 10 for h giving about 10^4 .. 10^6 parameters;
* CNN: the issue-21 architecture (scripts/train_cifar_cnn.py) with its channels and dense width
  multiplied by m: conv 3->4m->8m->16m (strided), dense 16m·64 -> 64m -> 10.

Per network and phase, each in a fresh process (so the peak resident memory is that phase's):
seconds per search step (the search's guide bounds on a batch of 100, float32, soft loss,
backward to both corners) with interval bounds and with linear bounds on 2 classes per sample;
float64 interval certification of 1,000 samples; the resident set after loading the model and
inputs, and the peak resident set (ru_maxrss) of each phase's process.
Then the fitted growth t ∝ p^a (least squares on log-log). Prints Markdown.

Run:  .venv/bin/python benchmarks/scaling.py
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLP_WIDTHS = (3, 30, 100, 280, 700)
CNN_MULTIPLIERS = (1, 2, 4, 8, 16)


def build(kind: str, size: int, path: Path) -> int:
    """Export one seeded network of the family to ONNX; returns its parameter count."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "mlp":
        net: nn.Module = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3072, size),
            nn.ReLU(),
            nn.Linear(size, size),
            nn.ReLU(),
            nn.Linear(size, 10),
        )
    else:
        m = size
        net = nn.Sequential(
            nn.Conv2d(3, 4 * m, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4 * m, 8 * m, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8 * m, 16 * m, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * m * 64, 64 * m),
            nn.ReLU(),
            nn.Linear(64 * m, 10),
        )
    net.eval()
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 32, 32),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return sum(p.numel() for p in net.parameters())


def measure(path: Path, phase: str) -> dict[str, float]:
    """One network's figures for one phase (run in its own process by `main`, so the peak
    resident set is that phase's: `base_mib` after loading the model and the inputs,
    `peak_mib` at the end).

    Phases: "ibp" and "linear" (seconds per search step, batch 100, best of 3), "certify"
    (float64 interval certification of 1,000 samples, in seconds)."""
    import torch

    from verifier import load_model
    from verifier.certify import certify_samples
    from verifier.domains.box import Box
    from verifier.search.surrogate import guide_bounds
    from verifier.spec import LinearBoundSection

    graph = load_model(path)
    gen = torch.Generator().manual_seed(0)
    n = 1000 if phase == "certify" else 100
    x = torch.rand(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    theta = graph.parameters
    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if phase == "certify":
        box = Box(
            {n: t - 0.01 * t.abs() for n, t in theta.items()},
            {n: t + 0.01 * t.abs() for n, t in theta.items()},
        )
        start = time.perf_counter()
        certify_samples(graph, box, x, y, method="ibp")
        seconds = time.perf_counter() - start
    else:
        lower = {n: (t - 0.01 * t.abs()).requires_grad_() for n, t in theta.items()}
        upper = {n: (t + 0.01 * t.abs()).requires_grad_() for n, t in theta.items()}
        options = LinearBoundSection(classes=2)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            bounds = guide_bounds(
                graph, lower, upper, x, y, linear=phase == "linear", options=options
            )
            torch.sigmoid(bounds.lower.clamp(max=50.0)).sum().backward()
            times.append(time.perf_counter() - start)
        seconds = min(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "base_mib": base_mib, "peak_mib": peak_mib}


PHASES = ("ibp", "linear", "certify")


def slope(ps: list[int], ts: list[float]) -> float:
    """Least-squares exponent a of t ∝ p^a."""
    lx = [math.log(p) for p in ps]
    ly = [math.log(t) for t in ts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3])))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, sizes in (("mlp", MLP_WIDTHS), ("cnn", CNN_MULTIPLIERS)):
            print(f"### {kind.upper()} family\n")
            print(
                "| size | parameters | IBP search step s | linear search step s (2 classes) "
                "| float64 IBP certification s / 1,000 samples | model + inputs MiB "
                "| peak MiB: IBP step / linear step / certification of 1,000 |"
            )
            print("|---|---|---|---|---|---|---|")
            rows = []
            for size in sizes:
                path = Path(tmp) / f"{kind}_{size}.onnx"
                p = build(kind, size, path)
                r = {}
                for phase in PHASES:
                    out = subprocess.run(
                        [sys.executable, __file__, "--measure", str(path), phase],
                        capture_output=True,
                        text=True,
                        check=True,
                        cwd=ROOT,
                    )
                    r[phase] = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((p, r))
                base = min(r[phase]["base_mib"] for phase in PHASES)
                peaks = " / ".join(f"{r[phase]['peak_mib']:.0f}" for phase in PHASES)
                print(
                    f"| {size} | {p:,} | {r['ibp']['seconds']:.4f} | "
                    f"{r['linear']['seconds']:.4f} | {r['certify']['seconds']:.3f} | "
                    f"{base:.0f} | {peaks} |",
                    flush=True,
                )
            ps = [p for p, _ in rows]
            fits = {ph: slope(ps, [r[ph]["seconds"] for _, r in rows]) for ph in PHASES}
            grow = {
                ph: slope(ps, [max(r[ph]["peak_mib"] - r[ph]["base_mib"], 1.0) for _, r in rows])
                for ph in PHASES
            }
            print(
                f"\nfitted t ∝ p^a: IBP step a = {fits['ibp']:.2f}, linear step a = "
                f"{fits['linear']:.2f}, certification a = {fits['certify']:.2f}; memory above "
                f"model + inputs ∝ p^b: IBP step b = {grow['ibp']:.2f}, linear step b = "
                f"{grow['linear']:.2f}, certification b = {grow['certify']:.2f}\n"
            )


if __name__ == "__main__":
    main()
