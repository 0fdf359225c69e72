"""Issue 21, point 4: projected fine-tuning of the 1,092,906-parameter CIFAR-10 CNN on a second
task, inside its whole-network LID, inside its head-only LID, and unconstrained.

Task 1 is CIFAR-10 (the spec's task); Task 2 is CIFAR-10 under a brightness/contrast shift,
x -> clip(CONTRAST * x + BRIGHTNESS, 0, 1) (washed-out, low-contrast images), learnt by Adam
(lr 1e-3, batch 64) on `--n-train` shifted training images (a seeded random subset: the split
is stored class by class), projecting onto the LID after every step (parameters a LID does not
box stay at their trained values). Scored on the shifted and the plain CIFAR-10 test split
(all 10,000 images). The Task-1 certificate of each
LID is the held-out certificate `verifier run` wrote beside it (`certificate.json`): it holds
for every network in the LID, so for the fine-tuned one (the script checks it lies inside).

Usage (after `verifier run specs/cifar_cnn.yaml -o reports/examples/cifar_cnn` and
`verifier run specs/cifar_cnn_head.yaml -o <dir>`):

    LID_DATA_DIR=../shared/data .venv/bin/python benchmarks/cifar_use.py \
        --lid whole=reports/examples/cifar_cnn --lid head=<dir>
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from zonotope import finetune  # benchmarks/zonotope.py: Adam, projecting after every step

from verifier.data import load_dataset
from verifier.domains import Box
from verifier.domains.io import load_lid
from verifier.graph import Graph
from verifier.onnx.importer import load_graph

ROOT = Path(__file__).resolve().parents[1]
CONTRAST = 0.4
BRIGHTNESS = 0.4


def shifted(x: Tensor) -> Tensor:
    """Task 2's images: contrast scaled by CONTRAST, brightness raised by BRIGHTNESS."""
    return (CONTRAST * x + BRIGHTNESS).clamp(0.0, 1.0)


def pinned(box: Box, theta0: dict[str, Tensor]) -> Box:
    """The LID over every parameter: the ones `box` leaves out are points at theta0."""
    lower = {n: box.lower.get(n, t).detach().to(torch.float64) for n, t in theta0.items()}
    upper = {n: box.upper.get(n, t).detach().to(torch.float64) for n, t in theta0.items()}
    return Box(lower, upper)


def accuracy(graph: Graph, theta: dict[str, Tensor] | None, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy, in batches of 1,000."""
    with torch.no_grad():
        hits = sum(
            int((graph.forward(x[i : i + 1000], theta).argmax(1) == y[i : i + 1000]).sum())
            for i in range(0, len(y), 1000)
        )
    return hits / len(y)


def certificate_text(folder: Path) -> str:
    """'L (k/n held out, τ, verdict)' from a run folder's certificate.json."""
    cert = json.loads((folder / "certificate.json").read_text())
    task = cert["tasks"][0]
    verdict = "holds" if task["holds"] else "fails"
    return (
        f"L {task['lower_bound']:.4f} ≥ τ {task['target']:.4f}: {verdict} "
        f"({task['k']}/{task['n']} held out, {task['method']})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "onnx_models" / "cifar_cnn.onnx")
    parser.add_argument(
        "--lid", action="append", default=[], metavar="NAME=DIR", help="a `verifier run` folder"
    )
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    graph = load_graph(args.model)
    theta0 = {n: t.detach() for n, t in graph.parameters.items()}
    train, test = load_dataset("cifar10", split="train"), load_dataset("cifar10", split="test")
    # the train split is stored class by class: draw a seeded subset of every class
    pick = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(args.seed))
    pick = pick[: args.n_train]
    x2, y2 = shifted(train.x[pick]), train.y[pick]
    xt2 = shifted(test.x)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; Task 2: CIFAR-10 at contrast {CONTRAST}, brightness +{BRIGHTNESS}, "
        f"{args.n_train} training images, {args.epochs} epoch(s) Adam {args.lr}, batch 64",
        file=sys.stderr,
    )
    lines = [
        "| fine-tuned inside | boxed parameters | LID mean width | Task-2 (shifted) test accuracy "
        "| Task-1 test accuracy | Task-1 held-out certificate (kept by projection) | wall s |",
        "|" + "---|" * 7,
        f"| (start) | - | - | {accuracy(graph, None, xt2, test.y):.4f} | "
        f"{accuracy(graph, None, test.x, test.y):.4f} | - | - |",
    ]
    jobs: list[tuple[str, Box | None, str, str, str]] = [
        ("nothing (plain)", None, "-", "-", "none")
    ]
    for item in args.lid:
        name, _, folder = item.partition("=")
        box = load_lid(Path(folder) / "lid.safetensors").box
        jobs.append(
            (
                name,
                pinned(box, theta0),
                f"{box.n_parameters():,}",
                f"{box.size('mean_width'):.3g}",
                certificate_text(Path(folder)),
            )
        )
    for name, box, boxed, width, cert in jobs:
        start = time.perf_counter()
        theta, _ = finetune(graph, box, x2, y2, epochs=args.epochs, lr=args.lr, seed=args.seed)
        wall = time.perf_counter() - start
        lines.append(
            f"| {name} | {boxed} | {width} | {accuracy(graph, theta, xt2, test.y):.4f} | "
            f"{accuracy(graph, theta, test.x, test.y):.4f} | {cert} | {wall:.0f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
