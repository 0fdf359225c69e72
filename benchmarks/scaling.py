"""Scaling of the bound engines with parameter count (issue 21, point 3).

Two families, every parameter boxed at θ0 ± 1%·|θ0| (seeded random weights: the cost of a
bound pass does not depend on the values), CIFAR-shaped inputs (3x32x32, random in [0, 1]):

* MLP: 3072 -> h -> h -> 10 for h giving about 10^4 .. 10^6 parameters;
* CNN: the issue-21 architecture (scripts/train_cifar_cnn.py) with its channels and dense width
  multiplied by m: conv 3->4m->8m->16m (strided), dense 16m·64 -> 64m -> 10.

Per network, each in a fresh process (so the peak resident memory is its own): seconds per
search step (the search's guide bounds on a batch of 100, float32, soft loss, backward to both
corners) with interval bounds and with linear bounds on 2 classes per sample; float64 interval
certification seconds per 1,000 samples; the peak resident set (ru_maxrss) of the process.
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


def measure(path: Path) -> dict[str, float]:
    """One network's figures (run in its own process by `main`)."""
    import torch

    from verifier import load_model
    from verifier.certify import certify_samples
    from verifier.domains.box import Box
    from verifier.search.surrogate import guide_bounds
    from verifier.spec import LinearBoundSection

    graph = load_model(path)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (100,), generator=gen)
    theta = graph.parameters

    def step(linear: bool) -> float:
        lower = {n: (t - 0.01 * t.abs()).requires_grad_() for n, t in theta.items()}
        upper = {n: (t + 0.01 * t.abs()).requires_grad_() for n, t in theta.items()}
        options = LinearBoundSection(classes=2)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            bounds = guide_bounds(graph, lower, upper, x, y, linear=linear, options=options)
            torch.sigmoid(bounds.lower.clamp(max=50.0)).sum().backward()
            times.append(time.perf_counter() - start)
        return min(times)

    box = Box(
        {n: t - 0.01 * t.abs() for n, t in theta.items()},
        {n: t + 0.01 * t.abs() for n, t in theta.items()},
    )
    ibp_step = step(False)
    linear_step = step(True)
    start = time.perf_counter()
    certify_samples(graph, box, x, y, method="ibp")
    certify = (time.perf_counter() - start) * 10.0  # per 1,000 samples
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ibp_step": ibp_step, "linear_step": linear_step, "certify": certify, "peak": peak_mib}


def slope(ps: list[int], ts: list[float]) -> float:
    """Least-squares exponent a of t ∝ p^a."""
    lx = [math.log(p) for p in ps]
    ly = [math.log(t) for t in ts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(Path(sys.argv[2]))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 100\n")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, sizes in (("mlp", MLP_WIDTHS), ("cnn", CNN_MULTIPLIERS)):
            print(f"### {kind.upper()} family\n")
            print(
                "| size | parameters | IBP search step s | linear search step s (2 classes) "
                "| float64 IBP certification s / 1,000 samples | peak RSS MiB |"
            )
            print("|---|---|---|---|---|---|")
            rows = []
            for size in sizes:
                path = Path(tmp) / f"{kind}_{size}.onnx"
                p = build(kind, size, path)
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append((p, r))
                print(
                    f"| {size} | {p:,} | {r['ibp_step']:.4f} | {r['linear_step']:.4f} | "
                    f"{r['certify']:.3f} | {r['peak']:.0f} |",
                    flush=True,
                )
            ps = [p for p, _ in rows]
            fits = {k: slope(ps, [r[k] for _, r in rows]) for k in ("ibp_step", "linear_step")}
            fits["certify"] = slope(ps, [r["certify"] for _, r in rows])
            print(
                f"\nfitted t ∝ p^a: IBP step a = {fits['ibp_step']:.2f}, linear step a = "
                f"{fits['linear_step']:.2f}, certification a = {fits['certify']:.2f}\n"
            )


if __name__ == "__main__":
    main()
