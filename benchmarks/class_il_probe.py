"""Why Split-MNIST Class-IL LIDs learn later tasks slowly (issue 20; RESULTS.md, "Session 13:
why Class-IL falls short"): three probes on the paper's protocol.

* ``head``: the body trained on task 1 alone, frozen; a fresh copy of the head trained without
  any box on the training parts of tasks (1, 2) and of all five tasks; accuracy over their
  digits on the test splits. Shows whether the frozen body limits the head-only LIDs.
* ``lookahead``: the head-only zero-buffer LID with look-ahead at several q (the fraction of
  boxed entries frozen), Class-IL; each task's accuracy at creation and the final average.
* ``certify-all``: the Class-IL buffer protocol ("LID buffer SIZE") with every certificate on
  the task's whole test split (about 2,000 samples; the paper's protocol certifies on 400), at
  several search aims τ + slack: how much of the accuracy / certificate trade-off is the
  400-sample bound. Seeds run on `--workers` processes.

Usage::

    LID_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/class_il_probe.py head --seed 1
    LID_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/class_il_probe.py lookahead \\
        --seed 0 --q 0 0.5 0.825 0.95
    LID_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/class_il_probe.py certify-all \\
        --seeds 0 1 2 3 4 --sizes SMALL --slacks 0.04 0.08
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import split_mnist as sm  # noqa: E402

from verifier.cl.training import train_first_task  # noqa: E402


def _settings(seed: int) -> sm.Settings:
    args = sm.build_parser().parse_args(["--seeds", str(seed), "--scenarios", "class"])
    return sm.with_pairs(sm.settings_for(args), args.pairs)


def head_probe(seed: int, epochs: int = 5, lr: float = 1e-3) -> None:
    """Train a fresh head (no box) on the frozen task-1 body; print its accuracy."""
    settings = _settings(seed)
    tasks = sm._tasks(settings, "class", seed, sm._MNIST)
    model = sm._model(seed)
    train_first_task(model, tasks, settings.train, sm._batches(seed))
    print("pairs", [t.digits for t in tasks])
    for ks in ((0, 1), tuple(range(len(tasks)))):
        rows = [torch.tensor(tasks[k].rows) for k in ks]
        x = torch.cat([tasks[k].x_train for k in ks])
        y = torch.cat([r[tasks[k].y_train] for k, r in zip(ks, rows, strict=True)])
        xt = torch.cat([tasks[k].x_test for k in ks])
        yt = torch.cat([r[tasks[k].y_test] for k, r in zip(ks, rows, strict=True)])
        mask = torch.full((10,), float("-inf"))
        mask[sorted({d for k in ks for d in tasks[k].digits})] = 0.0
        with torch.no_grad():
            features, test_features = model.features(x), model.features(xt)
        head = torch.nn.Linear(features.shape[1], 10)
        head.load_state_dict(model.fc.state_dict())
        optimiser = torch.optim.Adam(head.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).split(64):
                loss = F.cross_entropy(head(features[idx]) + mask, y[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            accuracy = float(((head(test_features) + mask).argmax(1) == yt).double().mean())
        print(
            f"tasks {[k + 1 for k in ks]}: head alone on the frozen body, accuracy {accuracy:.3f}"
        )


def lookahead_probe(seed: int, qs: Sequence[float]) -> None:
    """The head-only Class-IL LID with look-ahead at each q: accuracy at creation, final."""
    settings = _settings(seed)
    base = settings.lid_variants["LID+look-ahead"]
    for q in qs:
        config = dataclasses.replace(base, lookahead=q)
        run = dataclasses.replace(settings, lid_variants={"probe": config})
        started = time.perf_counter()
        record = sm.method_job(run, "class", seed, "probe", None, sm._MNIST)
        matrix = np.array(record["matrix"])
        print(
            f"q={q}: final average {matrix[-1].mean():.3f}; at creation "
            f"{np.round(np.diag(matrix), 2).tolist()}; certified last row "
            f"{np.round(record['certified'][-1], 2).tolist()} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


def certify_all_probe(
    seeds: Sequence[int], sizes: Sequence[str], slacks: Sequence[float], workers: int
) -> None:
    """The Class-IL "LID buffer SIZE" runs with every certificate on the task's whole test
    split (about 2,000 samples) in place of the paper's 400, at each search aim τ + slack:
    final average accuracy, certified value and the certificates that meet τ."""
    for slack in slacks:
        argv = ["--seeds", *map(str, seeds), "--scenarios", "class", "--target-slack", str(slack)]
        args = sm.build_parser().parse_args(argv)
        settings = sm.with_pairs(sm.settings_for(args), args.pairs)
        variants = {
            f"LID buffer {size}": dataclasses.replace(
                sm.cl_report.replay_variant(settings.lid_variants["LID"], size, args),
                n_certify=None,
            )
            for size in sizes
        }
        run = dataclasses.replace(settings, lid_variants=variants, baselines=())
        started = time.perf_counter()
        results, _ = sm.run_all(run, workers, lambda message: None)
        for method in variants:
            records = [r for r in results if r["method"] == method]
            final = [np.mean(r["matrix"][-1]) for r in records]
            certified = [np.mean(r["certified"][-1]) for r in records]
            held = [h for r in records for stage in r["stages"] for h in stage["holds"].values()]
            n = sorted({r["stages"][0]["certified_counts"]["0"][1] for r in records})
            print(
                f"aim τ + {slack}, {method}, certified on the whole test split ({n} samples "
                f"for task 1): final average {np.mean(final):.3f} (certified "
                f"{np.mean(certified):.3f}); per seed {np.round(final, 3).tolist()}; "
                f"certificates meeting τ {sum(held)}/{len(held)} "
                f"({time.perf_counter() - started:.0f} s so far)",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=("head", "lookahead", "certify-all"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--q", type=float, nargs="+", default=[0.0, 0.5, 0.825, 0.95])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--sizes", nargs="+", choices=("SMALL", "MEDIUM", "LARGE"), default=["SMALL"]
    )
    parser.add_argument("--slacks", type=float, nargs="+", default=[0.04, 0.08])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.probe == "certify-all":
        certify_all_probe(args.seeds, args.sizes, args.slacks, args.workers)
        return 0
    sm._init_worker(1)
    if args.probe == "head":
        head_probe(args.seed)
    else:
        lookahead_probe(args.seed, args.q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
