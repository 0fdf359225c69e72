"""Fuzz the command line (issue 23): 10,000 seeded mutation cases, counted by outcome.

Each case mutates one input (an ONNX model, a spec, an .npz, a LID file, an output folder's
certificate.json and its neighbours; `tests/fuzzing.py`, `tests/fuzz_mutations.py`) and runs
one `verifier` command in-process with a per-case timeout. Every case must end with exit 0, 1
or 2: the table counts tracebacks, hangs and bad exits (targets: 0) and lists each failure.

Run:  .venv/bin/python benchmarks/fuzz.py [--cases 10000] [--workers 2] [--timeout 30]
      .venv/bin/python benchmarks/fuzz.py --target spec --case 187 --show   # replay one case
Cases are split evenly over the targets; each worker process builds no seeds (the parent writes
them once) and runs its chunk of cases in order. Prints Markdown to stdout.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `tests.fuzzing`

from tests.fuzzing import TARGETS, Seeds, build_seeds, make_case, run_case  # noqa: E402

CHUNK = 50


def run_chunk(
    seeds_folder: str, target: str, indices: list[int], seed: int, timeout_s: float
) -> list[tuple[str, int, str, int | None, float, str]]:  # a `Row` each
    """Run cases in a worker: (target, index, outcome, exit code, seconds, description)."""
    import torch

    torch.set_num_threads(1)
    seeds = Seeds(Path(seeds_folder))
    out = []
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        for index in indices:
            result = run_case(seeds, target, index, Path(scratch), seed=seed, timeout_s=timeout_s)
            out.append(
                (
                    target,
                    index,
                    result.outcome,
                    result.result.code,
                    result.result.seconds,
                    result.describe(),
                )
            )
    return out


Row = tuple[str, int, str, int | None, float, str]


def run_jobs(jobs: list[tuple[str, list[int]]], folder: str, args: argparse.Namespace) -> list[Row]:
    """Run chunks of cases on a process pool. A case that kills its worker (a crash the
    timeout cannot catch) breaks the pool: the chunks left unfinished are halved and run again
    on a fresh pool until the case is alone, and it is recorded as a `crash`."""
    rows: list[Row] = []
    pending = list(jobs)
    while pending:
        failed: list[tuple[str, list[int]]] = []
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = {
                pool.submit(run_chunk, folder, t, chunk, args.seed, args.timeout): (t, chunk)
                for t, chunk in pending
            }
            for future in as_completed(futures):
                try:
                    rows.extend(future.result())
                except BrokenProcessPool:
                    failed.append(futures[future])
        pending = []
        for target, chunk in failed:
            if len(chunk) == 1:
                what = f"[{target} #{chunk[0]}] killed its worker process"
                rows.append((target, chunk[0], "crash", None, 0.0, what))
            else:
                half = len(chunk) // 2
                pending += [(target, chunk[:half]), (target, chunk[half:])]
    return rows


def show(seeds: Seeds, target: str, index: int, seed: int, timeout_s: float) -> None:
    """Replay one case and print everything it gave."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        folder = Path(scratch) / "case"
        folder.mkdir()
        case = make_case(seeds, target, index, folder, seed=seed)
        print(f"mutation: {case.mutation}\ncommand: verifier {' '.join(case.argv)}")
        result = run_case(seeds, target, index, Path(scratch), seed=seed, timeout_s=timeout_s)
        print(f"outcome: {result.outcome} {result.reason}\nexit: {result.result.code}")
        print(f"--- stdout\n{result.result.stdout}--- stderr\n{result.result.stderr}")
        if result.result.error:
            print(f"--- traceback\n{result.result.error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=TARGETS)
    parser.add_argument("--case", type=int, help="replay this case index (with --target)")
    parser.add_argument("--show", action="store_true")
    parser.add_argument("--seeds", type=Path, help="reuse a seeds folder written earlier")
    args = parser.parse_args()
    os.environ.setdefault("LID_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared/data"))
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        started = time.perf_counter()
        folder = args.seeds or Path(tmp) / "seeds"
        seeds = Seeds(folder) if (folder / "spec.yaml").is_file() else build_seeds(folder)
        seeds_s = time.perf_counter() - started
        if args.case is not None:
            show(seeds, args.target or "onnx", args.case, args.seed, args.timeout)
            return
        targets = [args.target] if args.target else list(TARGETS)
        per_target = args.cases // len(targets)
        jobs = [
            (t, list(range(start, min(start + CHUNK, per_target))))
            for t in targets
            for start in range(0, per_target, CHUNK)
        ]
        started = time.perf_counter()
        rows = run_jobs(jobs, str(folder), args)
        wall_s = time.perf_counter() - started
    report(rows, args, seeds_s, wall_s)


def report(
    rows: list[Row],
    args: argparse.Namespace,
    seeds_s: float,
    wall_s: float,
) -> None:
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {len(rows)} cases, seed {args.seed}, {args.workers} "
        f"workers, timeout {args.timeout:g} s per case; seeds {seeds_s:.1f} s, cases "
        f"{wall_s:.1f} s wall\n"
    )
    print(
        "| target | cases | exit 0 | exit 1 | exit 2 | tracebacks | hangs | crashes | bad exits "
        "| mean s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals: collections.Counter[str] = collections.Counter()
    for target in [*TARGETS, "all"]:
        mine = [r for r in rows if target in ("all", r[0])]
        if not mine:
            continue
        outcomes = collections.Counter(r[2] for r in mine)
        codes = collections.Counter(r[3] for r in mine if r[2] == "ok")
        mean = sum(r[4] for r in mine) / len(mine)
        print(
            f"| {target} | {len(mine)} | {codes[0]} | {codes[1]} | {codes[2]} | "
            f"{outcomes['traceback']} | {outcomes['hang']} | {outcomes['crash']} | "
            f"{outcomes['bad exit']} | {mean:.3f} |"
        )
        if target == "all":
            totals = outcomes
    failures = sorted((r for r in rows if r[2] != "ok"), key=lambda r: (r[0], r[1]))
    print(
        f"\ntracebacks: {totals['traceback']}, hangs: {totals['hang']}, crashes: "
        f"{totals['crash']}, bad exits: {totals['bad exit']}"
    )
    for row in failures[:100]:
        print(f"- {row[5][:300]}")


if __name__ == "__main__":
    main()
