"""Zonotope against box LIDs (issue 10) at the same τ, and what each leaves for a second task.

(a) digits: `specs/digits.yaml` (the embedded 64-32-32-10 MLP, τ = clean - 0.12) as a box and
    as a zonotope (the same spec with `domain: zonotope`). Second task: the digits moved one
    pixel to the right (same labels), fine-tuned on the digits train split (10 epochs), scored
    on the test split.
(b) mnist: a 784-64-64-10 MLP trained briefly on MNIST, LIDs for τ = clean - 0.12 on the
    MNIST test split (half optimisation, half held out). Second task (`--mnist-task2`):
    `shift` (default), the same digits moved two pixels right and two down (train split,
    1 epoch; scored on the shifted test split); or `classes`, the class-incremental variant:
    trained on digits 0-4 only, second task digits 5-9 (10-way argmax), where no LID of task 1
    leaves room to learn (measured: task-2 accuracy 0 for every LID).
    Search settings: lr 1.0, batch 400, target slack 0.05, 300 iterations.

LIDs: box; box with the paper's look-ahead freezing (Fisher on the second task's data,
q = 0.5); zonotope with k = 0 (the zonotope search's second stage without generators: the box
search continued from its box); zonotope with k random generators; zonotope with k generators
along the second task's gradient directions (`init: lookahead`).

Per LID: held-out certificate, sizes (box mean width; hull mean width; isotropic width
(Σ box widths + 2 Σ_k ||G_k||_2) / p, which is proportional to the mean width over random
directions and equals the box mean width for a box), search + certification wall time, and
projected fine-tuning on the second task (Adam, projection onto the LID after every step:
`Box.project` / `Zonotope.project`, exact in float32), with task-1 and task-2 accuracy after
it. Rows for the model itself and for unconstrained fine-tuning frame them.

Run:  .venv/bin/python benchmarks/zonotope.py [--only digits|mnist] [--k 8] [--iterations N]
Prints Markdown (one thread: torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from verifier.data import load_dataset
from verifier.domains import Box, Zonotope
from verifier.domains.io import load_lid
from verifier.graph import Graph
from verifier.onnx.importer import load_graph
from verifier.pipeline import run_lid
from verifier.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

HEADER = (
    "| job | LID | held-out k/n | L | τ | verdict | box mean width | hull mean width "
    "| isotropic width | search + certify | task-1 acc | task-2 acc | projection |\n|" + "---|" * 13
)


def accuracy(graph: Graph, theta: dict[str, Tensor] | None, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((graph.forward(x, theta).argmax(1) == y).float().mean())


def finetune(
    graph: Graph,
    lid: Box | Zonotope | None,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
) -> tuple[dict[str, Tensor], float]:
    """Adam on cross-entropy over (x, y), projecting onto the LID after every step.

    Returns:
        (the final parameters, mean milliseconds per projection).
    """
    theta = {
        n: t.detach().clone().float().requires_grad_(True) for n, t in graph.parameters.items()
    }
    opt = torch.optim.Adam(theta.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    spent, count = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(graph.forward(x[idx], theta), y[idx]).backward()
            opt.step()
            if lid is not None:
                start = time.perf_counter()
                with torch.no_grad():
                    safe = lid.project({n: t.detach() for n, t in theta.items()})
                    for n, t in theta.items():
                        t.copy_(safe[n])
                spent += time.perf_counter() - start
                count += 1
    final = {n: t.detach() for n, t in theta.items()}
    if lid is not None and not lid.contains(final):
        raise AssertionError("projected fine-tuning ended outside the LID")
    return final, 1e3 * spent / max(count, 1)


def sizes(lid: Box | Zonotope) -> tuple[float, float, float]:
    """(box(-part) mean width, hull mean width, isotropic width)."""
    if isinstance(lid, Box):
        width = lid.size("mean_width")
        return width, width, width
    return lid.box_part().size("mean_width"), lid.size("mean_width"), lid.size("isotropic_width")


def run_spec(raw: dict[str, Any], tmp: Path, name: str) -> tuple[Any, Box | Zonotope, float]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    spec = load_spec(path)
    start = time.perf_counter()

    def phase(message: str) -> None:
        print(f"  [{time.perf_counter() - start:7.1f} s] {name}: {message}", file=sys.stderr)

    run = run_lid(spec, tmp / name, on_phase=phase)
    seconds = time.perf_counter() - start
    return run, load_lid(tmp / name / "lid.safetensors").domain, seconds


def compare(
    job: str,
    graph: Graph,
    base: dict[str, Any],
    variants: list[tuple[str, dict[str, Any]]],
    task1: tuple[Tensor, Tensor],
    task2_train: tuple[Tensor, Tensor],
    task2_test: tuple[Tensor, Tensor],
    tmp: Path,
    *,
    epochs: int,
    lr: float,
) -> list[str]:
    rows = []
    a1, a2 = accuracy(graph, None, *task1), accuracy(graph, None, *task2_test)
    rows.append(f"| {job} | none: θ0, no fine-tuning | | | | | | | | | {a1:.4f} | {a2:.4f} | |")
    free, _ = finetune(graph, None, *task2_train, epochs=epochs, lr=lr, seed=0)
    rows.append(
        f"| {job} | none: unconstrained fine-tuning | | | | | | | | | "
        f"{accuracy(graph, free, *task1):.4f} | {accuracy(graph, free, *task2_test):.4f} | |"
    )
    for number, (label, overrides) in enumerate(variants):
        overrides = dict(overrides)
        importance = overrides.pop("importance", None)
        raw = {**base, **overrides}
        if importance is not None:
            raw["search"] = {**raw.get("search", {}), "importance": importance}
        run, lid, seconds = run_spec(raw, tmp, f"{job.split()[0]}-{number}")
        cert = run.certificates[0]
        theta, ms = finetune(graph, lid, *task2_train, epochs=epochs, lr=lr, seed=0)
        box_w, hull_w, iso_w = sizes(lid)
        rows.append(
            f"| {job} | {label} ({run.result.chosen}) | {cert.k}/{cert.n} | "
            f"{cert.lower_bound:.4f} | {cert.target:.4f} | {'holds' if cert.holds else 'NOT MET'} "
            f"| {box_w:.4g} | {hull_w:.4g} | {iso_w:.4g} | {seconds:.0f} s | "
            f"{accuracy(graph, theta, *task1):.4f} | {accuracy(graph, theta, *task2_test):.4f} | "
            f"{ms:.1f} ms/step |"
        )
        print(rows[-1], file=sys.stderr)
    return rows


def variants(k: int, lookahead: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The LIDs compared: boxes (plain, and with the paper's look-ahead freezing) and
    zonotopes (k = 0: the second stage without generators, i.e. the box search continued;
    random generators; generators along the next task's gradient directions)."""
    freeze = {"kind": "fisher", "fraction": 0.5, "lookahead": lookahead}
    ahead = {"kind": "none", "lookahead": lookahead}
    return [
        ("box", {"domain": "box"}),
        ("box, look-ahead freezing q=0.5", {"domain": "box", "importance": freeze}),
        ("zonotope k=0", {"domain": "zonotope", "zonotope": {"k": 0}}),
        (f"zonotope k={k} random", {"domain": "zonotope", "zonotope": {"k": k}}),
        (
            f"zonotope k={k} look-ahead",
            {"domain": "zonotope", "zonotope": {"k": k, "init": "lookahead"}, "importance": ahead},
        ),
    ]


def bench_digits(tmp: Path, k: int, iterations: int | None, epochs: int) -> list[str]:
    spec_path = ROOT / "specs" / "digits.yaml"
    raw = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    raw["model"] = str((spec_path.parent / raw["model"]).resolve())
    if iterations is not None:
        raw["search"] = {**raw.get("search", {}), "iterations": iterations}
    parse_spec(raw, source=spec_path)
    graph = load_graph(Path(raw["model"]))
    test, train = load_dataset("digits", split="test"), load_dataset("digits", split="train")

    def shifted(x: Tensor) -> Tensor:
        """Every image moved one pixel to the right (the second task: the same digits)."""
        image = x.reshape(-1, 8, 8)
        out = torch.zeros_like(image)
        out[:, :, 1:] = image[:, :, :-1]
        return out.reshape(-1, 64)

    ahead = tmp / "digits_shifted.npz"
    np.savez(ahead, x=shifted(train.x).numpy(), y=train.y.numpy())
    return compare(
        "digits MLP",
        graph,
        raw,
        variants(k, {"name": str(ahead), "split": "test"}),
        (test.x, test.y),
        (shifted(train.x), train.y),
        (shifted(test.x), test.y),
        tmp,
        epochs=epochs,
        lr=1e-3,
    )


def train_mlp(x: Tensor, y: Tensor, *, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def shifted_mnist(x: Tensor, pixels: int = 2) -> Tensor:
    """MNIST images moved `pixels` right and `pixels` down (zeros enter at the edges)."""
    image = x.reshape(-1, 28, 28)
    out = torch.zeros_like(image)
    out[:, pixels:, pixels:] = image[:, :-pixels, :-pixels]
    return out.reshape(x.shape)


def bench_mnist(
    tmp: Path, k: int, iterations: int | None, epochs: int, task2: str = "shift"
) -> list[str]:
    train, test = load_dataset("mnist", split="train"), load_dataset("mnist", split="test")
    first = torch.arange(10) if task2 == "shift" else torch.tensor([0, 1, 2, 3, 4])
    second = torch.tensor([5, 6, 7, 8, 9])

    def part(data: Any, classes: Tensor) -> tuple[Tensor, Tensor]:
        keep = torch.isin(data.y, classes)
        return data.x[keep], data.y[keep]

    start = time.perf_counter()
    net = train_mlp(*part(train, first), epochs=2, seed=0)
    print(f"  trained the MNIST MLP in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    model = tmp / "mnist_mlp.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, 28, 28),),
        str(model),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    graph = load_graph(model)
    raw: dict[str, Any] = {
        "model": str(model),
        "data": {"name": "mnist", "split": "test", "classes": first.tolist()},
        "tasks": [{"name": "mnist", "metric": "accuracy", "target": "acc - 0.12"}],
        "search": {"lr": 1.0, "batch_size": 400, "target_slack": 0.05}
        | ({} if iterations is None else {"iterations": iterations}),
        "certify": {"certification_fraction": 0.5, "beta": 0.001, "method": "ibp"},
    }
    if task2 == "shift":
        ahead_path = tmp / "mnist_shifted.npz"
        np.savez(ahead_path, x=shifted_mnist(train.x[:5000]).numpy(), y=train.y[:5000].numpy())
        ahead: dict[str, Any] = {"name": str(ahead_path), "split": "test"}
        task2_train = (shifted_mnist(train.x), train.y)
        task2_test = (shifted_mnist(test.x), test.y)
        job = "MNIST 784-64-64-10, shifted"
    else:
        ahead = {"name": "mnist", "split": "train", "classes": second.tolist()}
        task2_train, task2_test = part(train, second), part(test, second)
        job = "MNIST 784-64-64-10, 0-4 then 5-9"
    return compare(
        job,
        graph,
        raw,
        variants(k, ahead),
        part(test, first),
        task2_train,
        task2_test,
        tmp,
        epochs=epochs,
        lr=1e-3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["digits", "mnist"], action="append")
    parser.add_argument("--k", type=int, default=8, help="zonotope generators")
    parser.add_argument("--iterations", type=int, default=None, help="override search iterations")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs on task 2")
    parser.add_argument(
        "--mnist-task2",
        choices=["shift", "classes"],
        default="shift",
        help="MNIST second task: shifted digits, or digits 5-9 after training on 0-4",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    which = set(args.only or ["digits", "mnist"])
    print(f"machine: {platform.machine()}, 1 thread, torch {torch.__version__}")
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "digits" in which:
            rows += bench_digits(tmp, args.k, args.iterations, args.epochs * 10)
        if "mnist" in which:
            rows += bench_mnist(tmp, args.k, args.iterations, args.epochs, args.mnist_task2)
    print("\n## Box against zonotope LIDs at the same τ\n")
    print(HEADER)
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
