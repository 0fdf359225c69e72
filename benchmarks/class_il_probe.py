"""Why Split-MNIST Class-IL LIDs learn later tasks slowly (issue 20; RESULTS.md, "Session 13:
why Class-IL falls short"): two probes on one seed of the paper's protocol.

* ``head``: the body trained on task 1 alone, frozen; a fresh copy of the head trained without
  any box on the training parts of tasks (1, 2) and of all five tasks; accuracy over their
  digits on the test splits. Shows whether the frozen body limits the head-only LIDs.
* ``lookahead``: the head-only zero-buffer LID with look-ahead at several q (the fraction of
  boxed entries frozen), Class-IL; each task's accuracy at creation and the final average.

Usage::

    LID_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/class_il_probe.py head --seed 1
    LID_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/class_il_probe.py lookahead \\
        --seed 0 --q 0 0.5 0.825 0.95
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=("head", "lookahead"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--q", type=float, nargs="+", default=[0.0, 0.5, 0.825, 0.95])
    args = parser.parse_args(argv)
    sm._init_worker(1)
    if args.probe == "head":
        head_probe(args.seed)
    else:
        lookahead_probe(args.seed, args.q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
