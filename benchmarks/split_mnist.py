"""Split-MNIST continual-learning benchmark: nested LIDs against the usual baselines (issues 7, 20).

The paper's protocol (DESIGN.md section 5) is the default: five tasks of two digits, each
pairing one even and one odd digit, drawn per seed (`--pairs even-odd`; seed 0 draws the
paper's example [[7, 8], [0, 9], [1, 2], [3, 6], [4, 5]]), so every Domain-IL task has both
labels; seeds 0-4. Earlier variants stay selectable: `--pairs drawn` (pairs drawn freely per
seed, so a Domain-IL task may hold two digits of one parity, a single label; issue 7's runs)
and `--pairs paper` (the fixed (0,1), (2,3), ... order for every seed). Scenarios: Task-IL
(multi-head: only the task's two logits compete), Domain-IL (shared head = logits 0 and 1;
label = the digit's parity) and Class-IL (10-way). The paper's CNN (p = 6179); per task Adam,
lr 1e-3, 5 epochs, batch 64. The tables give mean ± std and the 10th-90th percentile over
seeds; the raw results record each run's pairs. Methods, all on the same splits and the same
first-task training:

* Data (`--protocol paper`, the default: DESIGN.md section 5): each task's MNIST train split
  is split 80/20 (seeded per run) into a training part, on which every method trains, and a
  validation part no method trains on. The LID search and τ = validation accuracy - 0.12 use
  the validation part; each LID is certified (float64 IBP, Clopper-Pearson, β = 1e-3) on 400
  samples drawn (seeded) from the task's MNIST test split; accuracies are on the whole test
  split. `--protocol issue7` (the earlier runs): every method trains on the whole train split,
  the search and τ use it too, and the certificate uses the whole test split.
* LID variants (verifier.cl.lid_learner): τ = clean accuracy on the search data - 0.12, 200
  search iterations, batch 400, checkpoints every 20; projected training onto the previous
  LID.
* Not run by default (`--all-layer`, or named in `--methods`): "LID all-layer IBP" and "LID
  all-layer linear", the "LID" variant with every parameter boxed and the per-layer size
  measure (`search.size: layer_log_width`, which opens the convolutions), searched by interval
  bounds or by linear bounds (every 4th step, the 2 lowest classes per sample) and certified by
  the matching proof ("ibp" / "best"); "LID" itself stays the head-only box (with `--boxed
  head`, the default).
* fine-tune, EWC, SI, LwF, A-GEM (memory 1,000), joint training (upper bound).
* Not run by default (`--buffers SMALL MEDIUM LARGE`, or named in `--methods`): the paper's
  replay-buffer protocol, "LID buffer SIZE" (verifier.cl.replay: LIDs recomputed on the
  buffers, replay plus projection, the repeat and loosening rules) and "A-GEM buffer SIZE"
  (the same samples per task; sizes and allocation in verifier.cl.buffers).

Run:  .venv/bin/python benchmarks/split_mnist.py [--quick] [--workers 2] [--seeds 0 1 2 3 4]
      .venv/bin/python benchmarks/split_mnist.py --methods LID "LID all-layer IBP" \
          "LID all-layer linear" --seeds 0 1 2          # head-only beside all-layer LIDs
      .venv/bin/python benchmarks/split_mnist.py --pairs drawn|paper   # the earlier variants
      .venv/bin/python benchmarks/split_mnist.py --protocol issue7     # issue 7's data use
      .venv/bin/python benchmarks/split_mnist.py --quick --ray local|auto|HOST:PORT
With --ray the jobs run as Ray tasks (`ray_grid`: two stages, the shared first tasks with the
methods that train their own, then the other methods), the results identical to the pool's.
Writes a Markdown table to stdout and to --out, plots to --plots, raw results to --raw.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from verifier.cl.baselines import AGEM, EWC, SI, FineTune, Joint, LwF
from verifier.cl.buffers import BUFFER_SIZES
from verifier.cl.cl_ladder import checked_ladder
from verifier.cl.lid_learner import PAPER_SEARCH, LidConfig
from verifier.cl.lid_views import SearchData
from verifier.cl.metrics import average_accuracy
from verifier.cl.network import SplitMnistCNN
from verifier.cl.scenarios import (
    SCENARIOS,
    Scenario,
    SplitTask,
    draw_even_odd_pairs,
    draw_pairs,
    hold_out_validation,
    split_mnist,
)
from verifier.cl.training import (
    FirstTask,
    Strategy,
    TrainConfig,
    train_first_task,
)
from verifier.data import load_dataset
from verifier.errors import InputError
from verifier.runtime import tune_allocator
from verifier.spec import LinearBoundSection

try:  # run as a script: its folder, benchmarks/, is first on sys.path
    import cl_report
    import ray_grid
except ModuleNotFoundError:  # loaded from its file (the tests): the project root is on sys.path
    from benchmarks import cl_report, ray_grid

ROOT = Path(__file__).resolve().parents[1]
PAPER_LID = {"task": (0.98, 0.92), "domain": (0.68, 0.61), "class": (0.29, 0.24)}
PAPER_BASELINES = {
    "fine-tune": {"task": 0.80, "domain": 0.61, "class": 0.10},
    "EWC": {"task": 0.86, "domain": 0.64, "class": 0.19},
    "LwF": {"task": 0.86, "domain": 0.71, "class": 0.10},
}
# strengths picked on a short sweep (seed 9, 3,000 training samples per task), not on test data
EWC_STRENGTH: dict[str, float] = {"task": 1e4, "domain": 1e4, "class": 1e4}
SI_STRENGTH: dict[str, float] = {"task": 1.0, "domain": 1.0, "class": 1.0}
BASELINES = ("fine-tune", "EWC", "SI", "LwF", "A-GEM", "joint")
PLOT_STYLE = cl_report.PlotStyle("Split-MNIST", "split_mnist", PAPER_LID, columns=4)
PAPER_BUFFERS: dict[str, dict[str, tuple[float, float | None]]] = {
    "LID buffer SMALL": {"task": (0.98, 0.88), "domain": (0.75, 0.65), "class": (0.48, 0.42)},
    "LID buffer MEDIUM": {"task": (0.98, 0.88), "domain": (0.76, 0.67), "class": (0.60, 0.52)},
    "LID buffer LARGE": {"task": (0.98, 0.88), "domain": (0.77, 0.67), "class": (0.71, 0.62)},
    "A-GEM buffer": {"task": (0.98, None), "domain": (0.83, None), "class": (0.61, None)},
}
"""The paper's buffer figures (DESIGN.md section 5): final average accuracy (certified). It
gives one A-GEM figure with buffers, shown beside every A-GEM buffer size."""
Pairs = Literal["even-odd", "drawn", "paper"]
PAIRS: tuple[Pairs, ...] = ("even-odd", "drawn", "paper")
"""`--pairs`: one even and one odd digit per task, drawn per seed (the paper's protocol, the
default); a free draw per seed (issue 7's runs); the fixed (0,1), (2,3), ... order."""
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
"""The default seeds (the protocol asks for at least 5)."""
Protocol = Literal["paper", "issue7"]
PROTOCOLS: tuple[Protocol, ...] = ("paper", "issue7")
"""`--protocol`, the data each part sees: "paper" (DESIGN.md section 5, the default): an
80/20 train/validation split of each task's train split, every method training on the 80%,
the LID search and τ on the 20%, each LID certified on `N_CERTIFY` test samples; "issue7":
training, search and τ on the whole train split, the certificate on the whole test split."""
VALIDATION_FRACTION = 0.2
"""The part of each task's train split held out for validation (protocol "paper")."""
N_CERTIFY = 400
"""Certification samples per LID and task (protocol "paper"; fewer in --tiny)."""


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on (the protocol, or the reduced quick / tiny ones)."""

    seeds: tuple[int, ...]
    scenarios: tuple[Scenario, ...]
    train: TrainConfig
    lid_variants: dict[str, LidConfig]
    baselines: tuple[str, ...]
    train_limit: int | None = None
    test_limit: int | None = None
    n_tasks: int = 5
    label: str = "full protocol"
    pairs: Pairs = "even-odd"
    protocol: Protocol = "paper"
    extra: dict[str, Any] = field(default_factory=dict)


TARGET_SLACK = 0.08
"""The searches aim at τ + 0.08 on their data: with "auto" (the rate whose held-out
Clopper-Pearson bound would just meet τ) the boxes of issue 7's runs fit the training data, on
which the network is more accurate than on the test split, and some held-out certificates fell
below τ."""


def slack_value(text: str) -> float | str:
    """--target-slack: "auto" or a number."""
    return text if text == "auto" else float(text)


# variants that only make sense in some scenarios (active classes exist in Class-IL only)
VARIANT_SCENARIOS: dict[str, tuple[str, ...]] = {"LID 10-way loss": ("class",)}
ALL_LAYER = ("LID all-layer IBP", "LID all-layer linear")
"""The all-layer variants (`--all-layer`, or named in `--methods`): every parameter boxed, the
search maximising `layer_log_width` (so the convolutions open), by interval bounds or by linear
bounds every 4th step on the 2 lowest classes per sample (certified by "best")."""
ALL_LAYER_BUFFER = cl_report.ALL_LAYER_BUFFER
"""Prefix of the replay-buffer runs with every parameter boxed ("LID all-layer buffer SIZE",
named in `--methods`): the paper's buffer protocol with the "LID all-layer IBP" search (the
paper boxes every layer; "LID buffer SIZE" boxes the head)."""
LINEAR_SCHEDULE = LinearBoundSection(every=4, classes=2)
"""The linear-bound schedule of "LID all-layer linear" (RESULTS.md, linear.py (issue 19):
the paper's CNN search step at 7.7x a training step instead of 63x for every class)."""


def lid_variants(
    search_iterations: int,
    checkpoint_every: int,
    batch: int,
    lr: float = PAPER_SEARCH.lr,
    target_slack: float | str = TARGET_SLACK,
    boxed: Literal["head", "all"] = "head",
    *,
    search_data: SearchData = "train",
    n_certify: int | None = None,
    ladder: Sequence[float] = (),
) -> dict[str, LidConfig]:
    """The LID variants reported, head-only boxes unless `boxed="all"`: plain and look-ahead
    (q = 0.5), with the Class-IL training loss over the classes seen so far; and, for
    Class-IL, plain with the 10-way training loss of the baselines. `search_data` and
    `n_certify`: the protocol's (`protocol_data`); `ladder`: `--ladder`'s scales (none: no
    certification ladder)."""
    search = PAPER_SEARCH.model_copy(
        update={
            "iterations": search_iterations,
            "checkpoint_every": checkpoint_every,
            "batch_size": batch,
            "lr": lr,
            "target_slack": target_slack,
        }
    )
    plain = LidConfig(
        search=search,
        boxed=boxed,
        search_data=search_data,
        n_certify=n_certify,
        ladder=tuple(ladder),
    )
    return {
        "LID": replace(plain, active_classes=True),
        "LID+look-ahead": replace(plain, lookahead=0.5, active_classes=True),
        "LID 10-way loss": plain,
    }


def all_layer_variants(base: LidConfig) -> dict[str, LidConfig]:
    """`ALL_LAYER`: `base` (the "LID" variant's search, τ and Class-IL loss) with every
    parameter boxed and the per-layer size measure; "LID all-layer IBP" searches with interval
    bounds, "LID all-layer linear" with linear bounds on `LINEAR_SCHEDULE`."""
    ibp = base.search.model_copy(update={"size": "layer_log_width", "bound": "ibp"})
    linear = ibp.model_copy(update={"bound": "linear", "linear": LINEAR_SCHEDULE})
    return {
        "LID all-layer IBP": replace(base, boxed="all", search=ibp),
        "LID all-layer linear": replace(base, boxed="all", search=linear),
    }


def with_all_layer(
    settings: Settings, args: argparse.Namespace, results: Sequence[dict[str, Any]] = ()
) -> Settings:
    """The settings plus `ALL_LAYER` when `--all-layer` is given, `--methods` names one of
    them or the raw `results` hold one; they follow the "LID" variant's settings."""
    named = {*(getattr(args, "methods", None) or []), *(r["method"] for r in results)}
    buffered = [
        size for size in BUFFER_SIZES if f"{ALL_LAYER_BUFFER}{size}" in named
    ]  # "LID all-layer buffer SIZE": the replay protocol with the all-layer IBP box
    if not (getattr(args, "all_layer", False) or named & set(ALL_LAYER) or buffered):
        return settings
    base = settings.lid_variants.get("LID", LidConfig())
    variants = all_layer_variants(base)
    for size in buffered:
        variants[f"{ALL_LAYER_BUFFER}{size}"] = cl_report.replay_variant(
            variants["LID all-layer IBP"], size, args
        )
    return replace(settings, lid_variants={**settings.lid_variants, **variants})


def _lid_of(settings: Settings) -> LidConfig:
    """The settings the LID variants share (search, boxed; the defaults when none runs)."""
    configs = list(settings.lid_variants.values())
    return configs[0] if configs else LidConfig()


def applies(settings: Settings, method: str, scenario: str) -> bool:
    """Whether a method runs in a scenario."""
    return scenario in VARIANT_SCENARIOS.get(method, (scenario,))


def shares_first_task(settings: Settings, method: str, scenario: str) -> bool:
    """Whether the method's first task is the shared plain training (not SI, whose hooks
    record the first task, nor a Class-IL LID trained with the active-class loss)."""
    if method == "SI":
        return False
    config = settings.lid_variants.get(method)
    return not (config is not None and config.active_classes and scenario == "class")


def n_certify_of(test_limit: int | None) -> int:
    """Protocol "paper": `N_CERTIFY` certification samples per LID and task (--quick: 400 of
    its 500 test samples), or half the test samples when a reduced mode keeps fewer (--tiny:
    32 of 64)."""
    return N_CERTIFY if test_limit is None or test_limit >= N_CERTIFY else test_limit // 2


def protocol_data(protocol: Protocol, test_limit: int | None) -> dict[str, Any]:
    """The LID settings a protocol fixes: `search_data` and `n_certify`."""
    if protocol == "paper":
        return {"search_data": "validation", "n_certify": n_certify_of(test_limit)}
    return {"search_data": "train", "n_certify": None}


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings of the chosen mode, `--protocol` and `--ladder`."""
    scenarios = tuple(args.scenarios)
    protocol: Protocol = args.protocol
    ladder = tuple(args.ladder or ())
    if args.tiny:
        # protocol "paper": 512 training / 128 validation samples (the search sees as many as
        # issue7's 128 training samples)
        tiny_train = 640 if protocol == "paper" else 128
        return Settings(
            seeds=(0,),
            scenarios=scenarios,
            train=TrainConfig(epochs=1),
            lid_variants=lid_variants(
                10, 5, 100, boxed=args.boxed, ladder=ladder, **protocol_data(protocol, 64)
            ),
            baselines=BASELINES,
            train_limit=tiny_train,
            test_limit=64,
            n_tasks=2,
            label=f"tiny (tests only): 2 tasks, {tiny_train} train / 64 test samples, 1 epoch",
            protocol=protocol,
        )
    if args.quick:
        return Settings(
            seeds=(args.seeds[0],),
            scenarios=scenarios,
            train=TrainConfig(epochs=1),
            lid_variants=lid_variants(
                50, 10, 400, boxed=args.boxed, ladder=ladder, **protocol_data(protocol, 500)
            ),
            baselines=BASELINES,
            train_limit=2000,
            test_limit=500,
            label="quick: 1 seed, 2,000 train / 500 test samples per task, 1 epoch, 50 iterations",
            protocol=protocol,
        )
    return Settings(
        seeds=tuple(args.seeds),
        scenarios=scenarios,
        train=TrainConfig(),
        lid_variants=lid_variants(
            200,
            20,
            400,
            args.search_lr,
            args.target_slack,
            args.boxed,
            ladder=ladder,
            **protocol_data(protocol, None),
        ),
        baselines=BASELINES,
        protocol=protocol,
    )


def with_pairs(settings: Settings, pairs: Pairs) -> Settings:
    """The settings with the task pairs of `--pairs`: "even-odd" or "drawn" per seed, or the
    fixed "paper" order."""
    if pairs == "even-odd":
        text = "one even and one odd digit per task, drawn per seed (the paper's protocol)"
    elif pairs == "drawn":
        text = "pairs drawn freely per seed (a Domain-IL task may hold a single parity)"
    else:
        text = f"fixed pairs {', '.join(map(str, PAPER_PAIRS))} for every seed"
    return replace(settings, pairs=pairs, label=f"{settings.label}; {text}")


def make_strategy(method: str, scenario: Scenario) -> Strategy:
    """A fresh baseline strategy."""
    if method == "fine-tune":
        return FineTune()
    if method == "EWC":
        return EWC(EWC_STRENGTH[scenario])
    if method == "SI":
        return SI(SI_STRENGTH[scenario])
    if method == "LwF":
        return LwF(1.0, temperature=2.0)
    if method == "A-GEM":
        return AGEM(1000)
    if method.startswith("A-GEM buffer "):  # the replay LIDs' per-task allocation and samples
        return AGEM(BUFFER_SIZES[method.removeprefix("A-GEM buffer ")])
    if method == "joint":
        return Joint()
    raise ValueError(f"unknown method '{method}'")


# ---- worker side ----------------------------------------------------------------------

Mnist = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""MNIST by split: "train" and "test", each (x, y)."""

_MNIST: Mnist = {}
"""A pool worker's copy of MNIST (`_init_worker`); the Ray jobs get theirs as an argument."""


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    for split in ("train", "test"):
        data = load_dataset("mnist", split=split)
        _MNIST[split] = (data.x, data.y)


PAPER_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
"""`--pairs paper`: the usual fixed Split-MNIST order, the same for every seed."""


def _tasks(settings: Settings, scenario: Scenario, seed: int, mnist: Mnist) -> list[SplitTask]:
    """The run's task sequence; under protocol "paper" each task's train split is split 80/20
    (`hold_out_validation`, seeded by the run's seed: every method and scenario of a seed
    trains on the same 80%)."""
    if settings.pairs == "paper":
        pairs = list(PAPER_PAIRS[: settings.n_tasks])
    elif settings.pairs == "drawn":
        pairs = draw_pairs(torch.Generator().manual_seed(seed), settings.n_tasks)
    else:
        pairs = draw_even_odd_pairs(torch.Generator().manual_seed(seed), settings.n_tasks)
    tasks = split_mnist(
        scenario,
        pairs,
        mnist["train"],
        mnist["test"],
        train_limit=settings.train_limit,
        test_limit=settings.test_limit,
    )
    if settings.protocol == "paper":
        split = torch.Generator().manual_seed(3000 + seed)
        tasks = hold_out_validation(tasks, VALIDATION_FRACTION, split)
    return tasks


def _model(seed: int) -> SplitMnistCNN:
    return SplitMnistCNN(torch.Generator().manual_seed(1000 + seed))


def _batches(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(2000 + seed)


def first_job(
    settings: Settings, scenario: Scenario, seed: int, mnist: Mnist
) -> tuple[FirstTask, float]:
    """Plain training on the first task, shared by every method but SI."""
    started = time.process_time()
    tasks = _tasks(settings, scenario, seed, mnist)
    first = train_first_task(_model(seed), tasks, settings.train, _batches(seed))
    return first, time.process_time() - started


def method_job(
    settings: Settings,
    scenario: Scenario,
    seed: int,
    method: str,
    first: FirstTask | None,
    mnist: Mnist,
) -> dict[str, Any]:
    """One method on one (scenario, seed): accuracy matrix (and certificates for LIDs, each
    with its certified count and sample count), each task's train and test sizes."""
    learner = settings.lid_variants.get(method) or make_strategy(method, scenario)
    if isinstance(learner, LidConfig):  # each run draws its own certification samples
        learner = replace(learner, split_seed=seed)
    shared = None if isinstance(learner, SI) else first
    tasks = _tasks(settings, scenario, seed, mnist)
    return cl_report.job_record(
        scenario,
        seed,
        method,
        tasks,
        _model(seed),
        _batches(seed),
        settings.train,
        learner,
        shared,
        counts=True,
    )


def pool_first_job(settings: Settings, scenario: Scenario, seed: int) -> tuple[FirstTask, float]:
    """`first_job` in a pool worker, on its copy of MNIST."""
    return first_job(settings, scenario, seed, _MNIST)


def pool_method_job(
    settings: Settings, scenario: Scenario, seed: int, method: str, first: FirstTask | None
) -> dict[str, Any]:
    """`method_job` in a pool worker, on its copy of MNIST."""
    return method_job(settings, scenario, seed, method, first, _MNIST)


MnistArrays = dict[str, tuple[np.ndarray, np.ndarray]]
Job = tuple[Scenario, int, str | None, FirstTask | None]
"""(scenario, seed, method, shared first task); method None: the shared first task itself."""


def ray_job(
    settings: Settings, arrays: MnistArrays, job: Job
) -> tuple[FirstTask, float] | dict[str, Any]:
    """One job as a Ray task, on one torch thread as in a pool worker: `first_job` (method
    None) or `method_job`, on MNIST from the object store (copied: its buffers are read-only)."""
    torch.set_num_threads(1)
    mnist = {
        s: (torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)))
        for s, (x, y) in arrays.items()
    }
    scenario, seed, method, first = job
    if method is None:
        return first_job(settings, scenario, seed, mnist)
    return method_job(settings, scenario, seed, method, first, mnist)


# ---- orchestration --------------------------------------------------------------------


def run_all(
    settings: Settings, workers: int, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], float]:
    """Every (scenario, seed, method) job over a pool of single-threaded workers.

    Returns:
        The per-job results and the CPU seconds of the shared first-task trainings.
    """
    methods = [*settings.lid_variants, *settings.baselines]
    units = [(sc, seed) for sc in settings.scenarios for seed in settings.seeds]
    own = [(m, u) for u in units for m in methods if applies(settings, m, u[0])]
    shared_units = {u for m, u in own if shares_first_task(settings, m, u[0])}
    results: list[dict[str, Any]] = []
    if workers == 0:  # in this process (tests)
        _init_worker(torch.get_num_threads())
        first_cpu = 0.0
        for unit in units:
            first = None
            if unit in shared_units:
                first, seconds = first_job(settings, *unit, _MNIST)
                first_cpu += seconds
            for method in methods:
                if applies(settings, method, unit[0]):
                    shared = first if shares_first_task(settings, method, unit[0]) else None
                    results.append(method_job(settings, *unit, method, shared, _MNIST))
        return results, first_cpu
    order = _shared_order(methods)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(1,)
    ) as pool:
        firsts = {
            u: pool.submit(pool_first_job, settings, u[0], u[1]) for u in units if u in shared_units
        }
        # methods with their own first task start while the shared first tasks train
        pending = [
            pool.submit(pool_method_job, settings, *u, m, None)
            for m, u in own
            if not shares_first_task(settings, m, u[0])
        ]
        first_cpu = 0.0
        for unit, future in firsts.items():
            first, seconds = future.result()
            first_cpu += seconds
            log(f"first task {unit[0]} seed {unit[1]}: {seconds:.0f} CPU s")
            pending += [
                pool.submit(pool_method_job, settings, *unit, m, first)
                for m in order
                if applies(settings, m, unit[0]) and shares_first_task(settings, m, unit[0])
            ]
        for future in pending:
            results.append(future.result())
            _log_result(results[-1], log)
    return results, first_cpu


def _ladder_flag(settings: Settings) -> str:
    ladder = _lid_of(settings).ladder
    return " --ladder " + " ".join(f"{s:g}" for s in ladder) if ladder else ""


def _beta_text(settings: Settings) -> str:
    """How the certificates' β reads in the report: β = 1e-3 per entry, or with a
    certification ladder of m scales β / m (`verifier.cl.cl_ladder`)."""
    ladder = _lid_of(settings).ladder
    if not ladder:
        return f"β = {_lid_of(settings).beta:g} per entry"
    return (
        f"β = {_lid_of(settings).beta:g} / {len(ladder)} per entry: a certification ladder "
        f"({', '.join(f'{s:g}' for s in ladder)}) replaces a LID whose diagonal certificate "
        "misses τ by the widest narrower candidate around θ_t that meets it, a union bound "
        "over the candidates"
    )


def _shared_order(methods: Sequence[str]) -> list[str]:
    """The methods that may share a first task, slowest first (the pool's submission order)."""
    slow = ("A-GEM", "joint", "LwF", "EWC", "fine-tune")
    return sorted(
        (m for m in methods if m != "SI"), key=lambda m: slow.index(m) if m in slow else 9
    )


def _log_result(result: dict[str, Any], log: Callable[[str], None]) -> None:
    final = average_accuracy(torch.tensor(result["matrix"]))[-1]
    log(
        f"{result['scenario']:>6} seed {result['seed']} {result['method']:<15} "
        f"final average accuracy {float(final):.3f}  ({result['seconds']:.0f}s)"
    )


def run_on_ray(
    settings: Settings, address: str, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], float, int]:
    """`run_all`'s jobs as Ray tasks in two stages (`ray_grid.map_stage`): the shared first
    tasks with the methods that train their own first task, then the methods resuming from a
    shared first task. MNIST goes to the object store once per stage. Results come in the
    pool's order and are identical to the pool's (one torch thread per job there and here).

    Returns:
        The per-job results, the CPU seconds of the shared first-task trainings, and the
        cluster's CPUs.
    """
    methods = [*settings.lid_variants, *settings.baselines]
    units = [(sc, seed) for sc in settings.scenarios for seed in settings.seeds]
    own = [(m, u) for u in units for m in methods if applies(settings, m, u[0])]
    shared_units = [
        u for u in units if any(v == u and shares_first_task(settings, m, u[0]) for m, v in own)
    ]
    arrays: MnistArrays = {}
    for split in ("train", "test"):
        data = load_dataset("mnist", split=split)
        arrays[split] = (data.x.numpy(), data.y.numpy())
    first_stage: list[Job] = [(*u, None, None) for u in shared_units]
    first_stage += [(*u, m, None) for m, u in own if not shares_first_task(settings, m, u[0])]
    order = _shared_order(methods)

    def done(index: int, result: Any) -> None:
        if isinstance(result, dict):
            _log_result(result, log)
        else:
            unit = first_stage[index]
            log(f"first task {unit[0]} seed {unit[1]}: {result[1]:.0f} CPU s")

    with ray_grid.ray_grid(address, log) as info:
        found = ray_grid.map_stage(
            ray_job, (settings, arrays), first_stage, modules=[cl_report], on_result=done
        )
        firsts = dict(zip(shared_units, found[: len(shared_units)], strict=True))
        second_stage: list[Job] = [
            (*unit, m, first)
            for unit, (first, _) in firsts.items()
            for m in order
            if applies(settings, m, unit[0]) and shares_first_task(settings, m, unit[0])
        ]
        found += ray_grid.map_stage(
            ray_job, (settings, arrays), second_stage, modules=[cl_report], on_result=done
        )
    results = [r for r in found if isinstance(r, dict)]
    first_cpu = sum(seconds for _, seconds in firsts.values())
    return results, first_cpu, int(info.cpus)


def _paper(method: str, scenario: str) -> str:
    buffer = PAPER_BUFFERS.get(cl_report.paper_buffer_row(method))
    if buffer is not None:
        acc, cert = buffer[scenario]
        return f"{acc:.2f}" + ("" if cert is None else f" ({cert:.2f})")
    if method == "LID":
        acc, cert = PAPER_LID[scenario]
        return f"{acc:.2f} ({cert:.2f})"
    value = PAPER_BASELINES.get(method, {}).get(scenario)
    return "–" if value is None else f"{value:.2f}"


def protocol_text(settings: Settings) -> str:
    """What data training, the LID searches, τ and the certificates use, in words."""
    if settings.protocol == "paper":
        return (
            "Protocol `paper` (DESIGN.md §5): each task's MNIST train split is split 80/20 "
            "(seeded per run) into a training part, on which every method trains, and a "
            "validation part that no method trains on; the LID searches and τ use the "
            f"validation part, and each LID is certified on {n_certify_of(settings.test_limit)} "
            "samples drawn (seeded per run) from the task's MNIST test split; accuracies are on "
            "the whole test split."
        )
    return (
        "Protocol `issue7`: every method trains on the task's whole MNIST train split; the LID "
        "searches and τ use that split too, and each LID is certified on the whole test split."
    )


def _data_notes(settings: Settings) -> tuple[str, str]:
    """(τ's data, the certificate's samples) in words, for the notes under the tables."""
    if settings.protocol == "issue7":
        return "the task's train split", "the task's MNIST test split (never seen by any search)"
    n = n_certify_of(settings.test_limit)
    buffers = any(" buffer " in method for method in settings.lid_variants)
    return (
        "the task's validation part (20% of its train split, never trained on)",
        f"{n} samples drawn (seeded per run) from the task's MNIST test split, the same for "
        "every LID of a run (never seen by training or any search)"
        + ("; the `LID buffer` rows' buffers hold samples of the training part only" * buffers),
    )


def _lookahead_buffer_note(settings: Settings) -> str:
    """The deviation of the `LID+look-ahead buffer` rows, in words ("" when none runs)."""
    ahead = {
        m: c for m, c in settings.lid_variants.items() if m.startswith(cl_report.LOOKAHEAD_BUFFER)
    }
    if not ahead:
        return ""
    qs = ", ".join(sorted({f"{c.lookahead:g}" for c in ahead.values()}))
    return (
        f" (the `{'` / `'.join(ahead)}` rows add look-ahead of ours to the paper's buffer "
        f"protocol: every recomputed LID freezes the q = {qs} of its entries least important "
        "(Fisher) for the task trained in it; frozen fraction in the details table)"
    )


def markdown(
    results: list[dict[str, Any]], settings: Settings, wall_s: float, workers: int, cpu_s: float
) -> str:
    """The results as Markdown: final average accuracy beside the paper, then the details."""
    summaries = cl_report.summarise(results)
    methods = [*settings.lid_variants, *settings.baselines]
    scenarios = [s for s in SCENARIOS if s in settings.scenarios]

    def paper(method: str, scenario: str, measured: bool) -> str:
        """A measured LID variant stands beside the paper's LID row."""
        # the buffer rows stand beside the paper's buffer cells
        measured = measured and cl_report.paper_buffer_row(method) not in PAPER_BUFFERS
        return _paper("LID" if measured and method in settings.lid_variants else method, scenario)

    seeds = sorted({r["seed"] for r in results})
    tau_data, certificate_data = _data_notes(settings)
    lines = [
        "## Split-MNIST continual learning (issues 7, 20)",
        "",
        f"Mode: {settings.label}; seeds {seeds}; mean ± sample std and the 10th–90th "
        "percentile over seeds; each run's task pairs are in the raw results. "
        f"Wall time {wall_s / 60:.1f} min on {workers} worker processes, 1 torch thread each "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}); the cores "
        "were shared with other jobs, so the wall time is pessimistic. CPU time of all jobs "
        f"{cpu_s / 60:.1f} core-min, i.e. {cpu_s / 60 / max(workers, 1):.1f} min on "
        f"{max(workers, 1)} otherwise idle cores. {protocol_text(settings)} "
        "Command: `.venv/bin/python benchmarks/split_mnist.py"
        + (" --quick" if "quick" in settings.label else "")
        + ("" if settings.protocol == "paper" else f" --protocol {settings.protocol}")
        + (" --all-layer" if any(m in settings.lid_variants for m in ALL_LAYER) else "")
        + ("" if settings.pairs == "even-odd" else f" --pairs {settings.pairs}")
        + _ladder_flag(settings)
        + "`.",
        "",
        *cl_report.final_accuracy_table(summaries, methods, scenarios, paper),
        "",
        "The paper's LID row is its best LID result; its look-ahead trick is reported there for "
        "Class-IL task 2 only (0.20 -> 0.73). "
        + (
            "Our LIDs box the final Linear only (the convolutions are pinned after task 1; a "
            "full-network box costs ~25x the CPU time per run, RESULTS.md)"
            if _lid_of(settings).boxed == "head"
            else "Our LIDs box every parameter, convolutions included (the paper's setting)"
        )
        + (
            f" (the `{'` / `'.join(ALL_LAYER)}` rows box every parameter, convolutions "
            "included, and search for the widest per-layer log-width, `layer_log_width`, by "
            "interval bounds or by linear bounds every 4th step on the 2 lowest classes per "
            "sample, certified by `best`; the details table says which is which)"
            if any(m in settings.lid_variants for m in ALL_LAYER)
            else ""
        )
        + _lookahead_buffer_note(settings)
        + f"; τ = accuracy on {tau_data} - 0.12; search η_p = "
        f"{_lid_of(settings).search.lr:g}, target τ + {_lid_of(settings).search.target_slack}. "
        "`LID` / `LID+look-ahead` train Class-IL tasks with the loss over the classes seen so "
        "far (prediction and certificates stay 10-way); `LID 10-way loss` uses the baselines' "
        "10-way loss. Look-ahead freezes the half of the boxed entries least important (Fisher) "
        "for the next task's training data; in Task-IL that is the whole of the task's own head "
        "(the next task never reads it), so those LIDs are single points in the head and the "
        "certificate is the fixed network's held-out bound. Certified values are the mean over "
        "tasks of the last row (LID_5 on every task).",
        "",
        *cl_report.forgetting_table(summaries, methods, scenarios),
        *cl_report.curve_tables(summaries, methods, scenarios, settings.n_tasks),
        "",
        "### LID details",
        "",
        f"Certified = one-sided Clopper-Pearson lower bound ({_beta_text(settings)}) of the "
        "float64-certified accuracy (`held-out proof`: ibp, or best = per sample and class the "
        f"tighter of intervals and linear bounds) of the LID on {certificate_data}. "
        "`tensors open` counts the searched tensors with width > 0 on some entry. `last row` = "
        "LID_5 on every task: the final network lies in it, so these bound the final "
        "network's accuracy; `diagonal` = LID_t on task t, at creation.",
        "",
        *cl_report.lid_details_table(
            summaries,
            scenarios,
            list(settings.lid_variants),
            [
                "search",
                "proof",
                "last_row",
                "final",
                "diagonal",
                "runs_holding",
                "widths",
                "open_tensors",
                "frozen",
            ],
        ),
        *cl_report.compute_table(summaries, methods, scenarios, clock="worker wall seconds"),
    ]
    return "\n".join(lines) + "\n"


class LadderAction(argparse.Action):
    """--ladder: the scales, checked as `LidConfig` checks them (a usage error otherwise)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        """Store the checked scales, or exit with the check's one-line message."""
        try:
            setattr(namespace, self.dest, checked_ladder(values))
        except ValueError as err:
            parser.error(f"--ladder: {err}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the paper's protocol (even/odd pairs, seeds 0-4)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, small subsets, 1 epoch")
    parser.add_argument("--tiny", action="store_true", help="smoke test size (seconds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes, 1 thread each (0: in-process)"
    )
    parser.add_argument(
        "--ray",
        metavar="local|auto|ADDRESS",
        help="run the jobs as Ray tasks instead of on --workers: 'local' starts a Ray instance "
        "for the run, 'auto' or HOST:PORT joins a running cluster (same results as the pool)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "split_mnist_results.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "plots")
    parser.add_argument(
        "--raw", type=Path, default=ROOT / "benchmarks" / "plots" / "split_mnist_raw.json"
    )
    parser.add_argument("--from-raw", action="store_true", help="re-render --raw, no training")
    parser.add_argument(
        "--pairs",
        choices=PAIRS,
        default="even-odd",
        help="task pairs: one even and one odd digit, drawn per seed (the paper's protocol), "
        "drawn freely per seed (issue 7), or the fixed (0,1), (2,3), ... order",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="paper",
        help="data use: 'paper' (80/20 train/validation split of each task, every method "
        "training on the 80%%, LID search and τ on the 20%%, each LID certified on 400 test "
        "samples) or 'issue7' (search and τ on the whole train split, certificate on the whole "
        "test split)",
    )
    parser.add_argument("--methods", nargs="+", help="run only these methods (default: all)")
    cl_report.add_buffers_argument(parser)
    parser.add_argument(
        "--target-slack",
        type=slack_value,
        default=TARGET_SLACK,
        help="search target τ + slack for the LIDs ('auto' or a number; default 0.08)",
    )
    parser.add_argument(
        "--search-lr",
        type=float,
        default=PAPER_SEARCH.lr,
        help="η of the LID searches (primal Adam lr η/p; default the paper's η_p)",
    )
    parser.add_argument(
        "--boxed",
        choices=("head", "all"),
        default="head",
        help="LID boxes: the final Linear only (convolutions frozen after task 1) or every "
        "parameter (the paper's setting; each search then bounds the convolutions too)",
    )
    parser.add_argument(
        "--all-layer",
        action="store_true",
        help="also run 'LID all-layer IBP' and 'LID all-layer linear': every parameter boxed, "
        "size layer_log_width, interval or linear-bound search (--methods may name them)",
    )
    parser.add_argument(
        "--ladder",
        type=float,
        nargs="+",
        action=LadderAction,
        metavar="S",
        help="certification ladder of the LID variants, e.g. 1.0 0.7 0.5: a LID whose held-out "
        "certificate misses τ is replaced by the widest candidate θ_t + S (LID_t - θ_t) that "
        "meets it; every certificate is then at β / (number of scales) (default: no ladder)",
    )
    parser.add_argument(
        "--merge", action="store_true", help="replace the matching jobs in --raw, keep the rest"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run (or reload) the benchmark, print and write the results."""
    args = build_parser().parse_args(argv)
    tune_allocator()
    log = cl_report.log
    old: dict[str, Any] = {}
    if args.from_raw or args.merge:
        try:
            old = json.loads(args.raw.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            print(f"error: cannot read the raw results {args.raw}: {err}", file=sys.stderr)
            return 2
        rule = old.get("pairs_rule", "drawn")  # raw files before issue 20 drew pairs freely
        protocol = old.get("protocol", "issue7")  # raw files before the paper's data protocol
        if args.from_raw:
            args.pairs, args.protocol = rule, protocol
        elif (rule, protocol) != (args.pairs, args.protocol):
            print(
                f"error: {args.raw} holds runs with --pairs {rule} --protocol {protocol}; "
                f"--merge needs the same (got --pairs {args.pairs} --protocol {args.protocol})",
                file=sys.stderr,
            )
            return 2
    settings = cl_report.keep_methods(
        with_pairs(
            cl_report.with_buffers(
                with_all_layer(settings_for(args), args, old.get("results", [])),
                args,
                old.get("results", []),
            ),
            args.pairs,
        ),
        args.methods,
    )
    if args.from_raw:
        saved = old
    else:
        started = time.perf_counter()
        workers = args.workers
        if args.ray is None:
            results, first_cpu = run_all(settings, args.workers, log)
        else:
            try:
                results, first_cpu, workers = run_on_ray(settings, args.ray, log)
            except InputError as err:  # a bad --ray address, an unreachable cluster
                print(f"error: {err}", file=sys.stderr)
                return 2
        saved = {
            "results": results,
            "wall_s": time.perf_counter() - started,
            "workers": workers,
            "first_cpu_s": first_cpu,
            "parts": [" ".join(sys.argv[1:] if argv is None else argv)],
            "pairs_rule": args.pairs,
            "protocol": args.protocol,
            "protocol_data": {
                "validation_fraction": VALIDATION_FRACTION if args.protocol == "paper" else None,
                **protocol_data(args.protocol, settings.test_limit),
            },
        }
        if args.merge:
            done = {(r["scenario"], r["seed"], r["method"]) for r in results}
            kept = [
                r for r in old["results"] if (r["scenario"], r["seed"], r["method"]) not in done
            ]
            saved["results"] = kept + results
            saved["wall_s"] += old["wall_s"]
            saved["first_cpu_s"] += old["first_cpu_s"]
            saved["parts"] = old.get("parts", [""]) + saved["parts"]
        args.raw.parent.mkdir(parents=True, exist_ok=True)
        args.raw.write_text(json.dumps(saved) + "\n", encoding="utf-8")
    if args.methods or args.merge:
        # every method the raw holds
        settings = cl_report.with_buffers(
            with_all_layer(settings_for(args), args, saved["results"]), args, saved["results"]
        )
        settings = with_pairs(settings, args.pairs)
    results, wall_s, workers = saved["results"], saved["wall_s"], saved["workers"]
    cpu_s = saved["first_cpu_s"] + sum(r["cpu_seconds"] for r in results)
    parts = saved.get("parts", [""])
    settings = replace(
        settings,
        label=settings.label
        + (
            f"; {len(parts)} runs merged: " + ", ".join(f"`{p or '(defaults)'}`" for p in parts)
            if len(parts) > 1
            else ""
        ),
    )
    text = markdown(results, settings, wall_s, workers, cpu_s)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    for path in cl_report.plot(results, settings, args.plots, PLOT_STYLE):
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
