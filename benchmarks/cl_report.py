"""What the continual-learning benchmarks (split_mnist.py, split_cifar.py) share in reporting.

The raw JSON record of a LID sequence (the task pairs recorded per run), the per-(scenario,
method) summaries over seeds (mean ± sample std and the 10th-90th percentile range, as the paper
plots), the Markdown tables both scripts print, their accuracy-matrix and average-accuracy
plots, and the small pieces of their command lines that agree (choosing methods, progress on
stderr). What the two reports say differently (the paper's figures, titles, data set names)
comes in as arguments.

The scripts import this module as `cl_report` (a script's folder is first on sys.path); the
tests, which load the scripts from their files, reach it as `benchmarks.cl_report`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import numpy as np
import torch

from verifier.cl.buffers import BUFFER_SIZES
from verifier.cl.lid_learner import LidConfig, LidRun, lid_proof_method, run_lid_sequence
from verifier.cl.metrics import average_accuracy, backward_transfer, forgetting, mean_std
from verifier.cl.network import ContinualNetwork
from verifier.cl.replay import ReplayConfig, ReplayRun, run_replay_sequence
from verifier.cl.scenarios import SCENARIO_NAMES, Scenario, SplitTask
from verifier.cl.training import FirstTask, Strategy, TrainConfig, run_sequence
from verifier.domains.box import Box

Summaries = dict[tuple[str, str], dict[str, Any]]
"""Per (scenario, method): the summary over seeds that `summarise` computes."""
PaperLid = Mapping[str, tuple[float, float | None]]
"""Per scenario: the paper's LID final average accuracy and its certified value (None: none)."""


class RunSettings(Protocol):
    """The part of a benchmark's `Settings` (a dataclass) that the report reads."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    seeds: tuple[int, ...]
    scenarios: tuple[Scenario, ...]
    lid_variants: dict[str, Any]
    baselines: tuple[str, ...]
    n_tasks: int


SettingsT = TypeVar("SettingsT", bound=RunSettings)


def keep_methods(settings: SettingsT, methods: Sequence[str] | None) -> SettingsT:
    """The settings with only the named LID variants and baselines (all when none is named);
    a name that is neither is one `error:` line and exit 2."""
    if not methods:
        return settings
    known = [*settings.lid_variants, *settings.baselines]
    unknown = [m for m in methods if m not in known]
    if unknown:
        print(
            f"error: unknown method(s) {', '.join(map(repr, unknown))}; this run knows "
            f"{', '.join(map(repr, known))}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return replace(
        settings,
        lid_variants={k: v for k, v in settings.lid_variants.items() if k in methods},
        baselines=tuple(m for m in settings.baselines if m in methods),
    )


def add_buffers_argument(parser: argparse.ArgumentParser) -> None:
    """`--buffers SIZE ...`: also run the replay-buffer methods of these sizes."""
    parser.add_argument(
        "--buffers",
        nargs="+",
        choices=tuple(BUFFER_SIZES),
        help="also run the replay-buffer methods of these sizes, 'LID buffer SIZE' (the paper's "
        "replay protocol) and 'A-GEM buffer SIZE' (not run by default; --methods may name them)",
    )
    parser.add_argument(
        "--fit-z",
        type=_fit_z,
        default=None,
        metavar="Z|none",
        help="the replay LIDs' validation fit (verifier.cl.replay_fit.fit_to_views): scale each "
        "recomputed LID until its proved rate on every task's search view reaches the rate "
        "whose held-out bound just meets τ plus Z standard errors (reads every earlier task's "
        "search view: data beyond the buffer, not the paper's protocol); default none: no fit",
    )
    parser.add_argument(
        "--buffer-lookahead",
        type=_fraction,
        default=LOOKAHEAD_Q,
        metavar="Q",
        help=f"q of the '{LOOKAHEAD_BUFFER}SIZE' methods: each recomputed LID freezes the q of "
        f"its entries least important (Fisher) for the task trained in it (default {LOOKAHEAD_Q})",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1); got '{text}'") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1); got '{text}'")
    return value


def _fit_z(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none'; got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or 'none'; got '{text}'")
    return value


LOOKAHEAD_BUFFER = "LID+look-ahead buffer "
"""Prefix of the buffer methods whose recomputed LIDs freeze by look-ahead (then SIZE)."""
ALL_LAYER_BUFFER = "LID all-layer buffer "
"""Prefix of the buffer methods with every parameter boxed (then SIZE; split_mnist.py)."""
LOOKAHEAD_Q = 0.825
"""Their default q: the paper's best look-ahead fraction (DESIGN.md section 5, "Biases")."""


def paper_buffer_row(method: str) -> str:
    """The paper's buffer row a method stands beside: "LID buffer SIZE" for every LID buffer
    method (plain, look-ahead, all-layer), "A-GEM buffer" for A-GEM at any size (the paper
    gives one A-GEM figure per scenario); other methods unchanged."""
    if method.startswith("A-GEM buffer"):
        return "A-GEM buffer"
    for prefix in (LOOKAHEAD_BUFFER, ALL_LAYER_BUFFER):
        if method.startswith(prefix):
            return "LID buffer " + method.removeprefix(prefix)
    return method


def replay_variant(base: LidConfig, size: str, args: argparse.Namespace) -> ReplayConfig:
    """The buffer protocol at `size` with `base`'s LID settings (look-ahead off), the Class-IL
    active-class loss and `--fit-z` (when the parser has it)."""
    return ReplayConfig.of(
        base,
        BUFFER_SIZES[size],
        lookahead=0.0,
        active_classes=True,
        fit_z=getattr(args, "fit_z", None),
    )


def with_buffers(
    settings: SettingsT, args: argparse.Namespace, results: Sequence[dict[str, Any]] = ()
) -> SettingsT:
    """The settings plus the buffer methods of every size that `--buffers` gives, `--methods`
    names or the raw `results` hold: "LID buffer SIZE" (`verifier.cl.replay`, with the first
    LID variant's search, boxes, τ and search data, and the Class-IL active-class loss) and
    "A-GEM buffer SIZE" (A-GEM storing the same samples per task; the script's strategy
    factory builds it as `AGEM(BUFFER_SIZES[SIZE])`); and "LID+look-ahead buffer SIZE" (the
    first, with look-ahead q = `--buffer-lookahead`) for the sizes `--methods` or `results`
    name."""
    named = set(getattr(args, "buffers", None) or [])
    ahead = []
    for method in [*(getattr(args, "methods", None) or []), *(r["method"] for r in results)]:
        size = method.rsplit(" ", 1)[-1]
        if " buffer " in method and size in BUFFER_SIZES:
            named.add(size)
        if method == f"{LOOKAHEAD_BUFFER}{size}":
            ahead.append(size)
    sizes = [size for size in BUFFER_SIZES if size in named]
    if not sizes:
        return settings
    base = next(iter(settings.lid_variants.values()), LidConfig())
    variants = dict(settings.lid_variants)
    for size in sizes:
        variants[f"LID buffer {size}"] = replay_variant(base, size, args)
        if size in ahead:
            q = float(getattr(args, "buffer_lookahead", LOOKAHEAD_Q))
            variants[f"{LOOKAHEAD_BUFFER}{size}"] = replace(
                variants[f"LID buffer {size}"], lookahead=q
            )
    baselines = (*settings.baselines, *(f"A-GEM buffer {size}" for size in sizes))
    return replace(settings, lid_variants=variants, baselines=baselines)


def log(message: str) -> None:
    """Progress and file names go to stderr; the Markdown goes to stdout."""
    print(message, file=sys.stderr, flush=True)


PERCENTILES = (10.0, 90.0)
"""The spread over seeds the tables and plots show beside mean ± std (the paper plots the
10th-90th percentile range)."""


@dataclass(frozen=True)
class Spread:
    """The 10th and 90th percentiles of a few runs' values (numpy's linear interpolation
    between order statistics; one run: both equal its value)."""

    low: float
    high: float

    def format(self, digits: int = 2) -> str:
        """``0.64–0.71``."""
        return f"{self.low:.{digits}f}–{self.high:.{digits}f}"


def spread(values: Sequence[float]) -> Spread:
    """The `PERCENTILES` of `values` (at least one value)."""
    low, high = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return Spread(float(low), float(high))


# ---- raw results ----------------------------------------------------------------------


def lid_record(run: LidRun, *, counts: bool = False) -> dict[str, Any]:
    """The raw JSON of a LID sequence: accuracy matrix, certified bounds (None where not
    certified) and one record per stage (LID_t).

    Args:
        run: what `run_lid_sequence` returned.
        counts: also record each certificate's certified count and sample count, [k, n].
    """
    stages = []
    for s in run.stages:
        stage = {
            "task": s.task,
            "clean": s.clean,
            "target": s.target,
            "search_target": s.search_target,
            "chosen": s.chosen,
            "feasible": s.feasible,
            "optimisation_metric": s.optimisation_metric,
            "mean_width": s.mean_width,
            "layer_log_width": s.search_box.size("layer_log_width"),
            "open_tensors": open_tensors(s.search_box),
            "n_frozen": s.n_frozen,
            "n_boxed": s.n_boxed,
            "search_seconds": s.seconds,
            "holds": {str(j): c.holds for j, c in s.certificates.items()},
            "methods": {str(j): c.method for j, c in s.certificates.items()},
        }
        if counts:
            stage["certified_counts"] = {str(j): [c.k, c.n] for j, c in s.certificates.items()}
        if s.ladder_bounds:  # a certification ladder ran: the kept scale, every candidate's bound
            stage["ladder_scale"] = s.ladder_scale
            stage["ladder_bounds"] = list(s.ladder_bounds)
            stage["certificate_beta"] = {str(j): c.beta for j, c in s.certificates.items()}
        stages.append(stage)
    return {
        "matrix": run.matrix.tolist(),
        "certified": [[None if math.isnan(v) else v for v in r] for r in run.certified.tolist()],
        "stages": stages,
    }


def open_tensors(box: Box) -> list[int]:
    """[tensors of the box with width > 0 on some entry, tensors]."""
    widths = box.widths()
    return [sum(int(bool((w > 0).any())) for w in widths.values()), len(widths)]


def lid_settings(config: LidConfig) -> dict[str, Any]:
    """What tells LID variants apart in the raw JSON: the boxed parameters, the search's bound
    (with its linear schedule), its size measure, and the held-out proof that matches."""
    search = config.search
    return {
        "boxed": config.boxed,
        "bound": search.bound,
        "linear": (
            {"every": search.linear.every, "classes": search.linear.classes}
            if search.bound == "linear"
            else None
        ),
        "size": search.size,
        "proof": lid_proof_method(config),
    }


def describe_lid(settings: Mapping[str, Any] | None) -> str:
    """`lid_settings` in a few words, e.g. "all layers, linear (every 4th step, 2 classes),
    layer_log_width"; "–" for runs recorded before the settings were."""
    if not settings:
        return "–"
    bound = settings["bound"]
    linear = settings.get("linear")
    if linear:
        classes = linear["classes"]
        bound += f" (every {linear['every']}, {'all' if classes is None else classes} classes)"
    boxed = "head" if settings["boxed"] == "head" else "all layers"
    return f"{boxed}, {bound}, {settings['size']}"


def replay_record(run: ReplayRun, config: ReplayConfig) -> dict[str, Any]:
    """The raw JSON of a replay run's buffer protocol: the size, each task's buffer samples in
    use at the end, and every round (buffer sizes, τ of the previous tasks, their proved rates
    on the buffers, the current task's accuracy, the gain and the loosened task)."""
    return {
        "size": config.buffer.name,
        "per_task": list(config.buffer.per_task),
        "repeats": config.buffer.repeats,
        "fit_z": config.fit_z,
        "in_use": [int(i.numel()) for i in run.buffer_indices],
        "rounds": [
            {
                "task": r.task,
                "round": r.round,
                "buffer_sizes": list(r.buffer_sizes),
                "targets": list(r.targets),
                "rates": list(r.rates),
                "accuracy": r.accuracy,
                "gain": r.gain,
                "loosened": r.loosened,
                "seconds": r.seconds,
            }
            for r in run.rounds
        ],
    }


def job_record(
    scenario: Scenario,
    seed: int,
    method: str,
    tasks: Sequence[SplitTask],
    model: ContinualNetwork,
    generator: torch.Generator,
    train: TrainConfig,
    learner: LidConfig | Strategy,
    first: FirstTask | None,
    *,
    counts: bool = False,
) -> dict[str, Any]:
    """The raw JSON of one method on one (scenario, seed): the task pairs, the accuracy matrix
    (and for a LID learner its certificates, `lid_record`), wall and CPU seconds.

    Args:
        learner: the LID variant's settings (a `ReplayConfig`: the replay-buffer protocol),
            or a fresh baseline strategy.
        first: the shared first-task training to resume from (None: train it here).
        counts: also record each task's train / test sizes and each certificate's [k, n].
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {"scenario": scenario, "seed": seed, "method": method}
    out["pairs"] = [list(t.digits) for t in tasks]
    if counts:
        out["n_train"] = [int(t.x_train.shape[0]) for t in tasks]
        out["n_test"] = [int(t.x_test.shape[0]) for t in tasks]
    if isinstance(learner, ReplayConfig):  # a LidConfig too: the buffer protocol first
        replay = run_replay_sequence(
            model, tasks, train, learner, generator, scenario=scenario, first=first
        )
        out.update(lid_record(replay, counts=counts))
        out["buffer"] = replay_record(replay, learner)
    elif isinstance(learner, LidConfig):
        run = run_lid_sequence(model, tasks, train, learner, generator, first=first)
        out.update(lid_record(run, counts=counts))
    if isinstance(learner, LidConfig):
        out["lid"] = lid_settings(learner)
    else:
        matrix = run_sequence(model, learner, tasks, train, generator, first=first)
        out["matrix"] = matrix.tolist()
    out["seconds"] = time.perf_counter() - started
    out["cpu_seconds"] = time.process_time() - cpu_started
    return out


def summarise(results: list[dict[str, Any]]) -> Summaries:
    """Mean ± sample std over seeds of every (scenario, method) in the raw results.

    Every method: final average accuracy (with its 10th-90th percentile `Spread`), the
    average-accuracy curve (with its spread per task), forgetting, backward transfer, the mean
    accuracy matrix, the seeds and the summed job seconds. LIDs also: certified final (mean of
    the last row, with its spread), diagonal, curve and last row; how many runs and
    certificates meet τ; τ, box width and frozen fraction per task; summed search seconds.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["scenario"], r["method"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        mats = [torch.tensor(r["matrix"], dtype=torch.float64) for r in runs]
        avgs = [average_accuracy(m) for m in mats]
        finals = [float(a[-1]) for a in avgs]
        summary: dict[str, Any] = {
            "n": len(runs),
            "seeds": sorted({r["seed"] for r in runs}),
            "final": mean_std(finals),
            "final_spread": spread(finals),
            "curve": [mean_std([float(a[t]) for a in avgs]) for t in range(len(avgs[0]))],
            "curve_spread": [spread([float(a[t]) for a in avgs]) for t in range(len(avgs[0]))],
            "forgetting": mean_std([forgetting(m) for m in mats]),
            "bwt": mean_std([backward_transfer(m) for m in mats]),
            "matrix": torch.stack(mats).mean(0),
            "seconds": sum(r["seconds"] for r in runs),
        }
        if "certified" in runs[0]:
            certs = [
                torch.tensor(
                    [[math.nan if v is None else v for v in row] for row in r["certified"]],
                    dtype=torch.float64,
                )
                for r in runs
            ]
            n = len(certs[0])
            certified_finals = [float(c[-1].mean()) for c in certs]
            summary["certified_final"] = mean_std(certified_finals)
            summary["certified_final_spread"] = spread(certified_finals)
            summary["certified_diag"] = mean_std([float(c.diagonal().mean()) for c in certs])
            summary["certified_curve"] = [
                mean_std([float(c[t, : t + 1].mean()) for c in certs]) for t in range(n)
            ]
            summary["certified_last_row"] = [
                mean_std([float(c[-1, j]) for c in certs]) for j in range(n)
            ]
            summary["holds"] = sum(all(all(s["holds"].values()) for s in r["stages"]) for r in runs)
            summary["certificates_holding"] = (
                sum(v for r in runs for s in r["stages"] for v in s["holds"].values()),
                sum(len(s["holds"]) for r in runs for s in r["stages"]),
            )
            summary["targets"] = [
                mean_std([r["stages"][t]["target"] for r in runs]) for t in range(n)
            ]
            summary["widths"] = [
                mean_std([r["stages"][t]["mean_width"] for r in runs]) for t in range(n)
            ]
            summary["frozen"] = [
                sum(r["stages"][t]["n_frozen"] / r["stages"][t]["n_boxed"] for r in runs)
                / len(runs)
                for t in range(n)
            ]
            summary["search_seconds"] = sum(s["search_seconds"] for r in runs for s in r["stages"])
            summary["lid"] = runs[0].get("lid")
            summary["proofs"] = sorted(
                {m for r in runs for s in r["stages"] for m in s.get("methods", {}).values()}
            )
            if all("open_tensors" in s for r in runs for s in r["stages"]):
                summary["layer_log_widths"] = [
                    mean_std([r["stages"][t]["layer_log_width"] for r in runs]) for t in range(n)
                ]
                summary["open_tensors"] = (
                    [min(r["stages"][t]["open_tensors"][0] for r in runs) for t in range(n)],
                    runs[0]["stages"][0]["open_tensors"][1],
                )
        out[key] = summary
    return out


# ---- Markdown tables --------------------------------------------------------------------


def final_accuracy_table(
    summaries: Summaries,
    methods: Sequence[str],
    scenarios: Sequence[Scenario],
    paper: Callable[[str, str, bool], str],
) -> list[str]:
    """Final average accuracy per method and scenario, certified in brackets, beside the paper:
    per scenario mean ± sample std over seeds, the 10th-90th percentile range over seeds, and
    the paper's figure.

    Args:
        summaries: from `summarise`.
        methods: the rows, in order.
        scenarios: the column triples, in order.
        paper: the paper column's cell for (method, scenario, whether the results hold it).
    """
    lines = [
        "### Final average accuracy (LID: held-out certified lower bound in brackets)",
        "",
        "Mean ± sample std over seeds, then the 10th–90th percentile over seeds (linear "
        "interpolation between the order statistics).",
        "",
        "| method | "
        + " | ".join(f"{SCENARIO_NAMES[s]} | 10th–90th pct. | paper" for s in scenarios)
        + " |",
        "|---|" + "---|---|---|" * len(scenarios),
    ]
    for method in methods:
        cells = []
        for s in scenarios:
            summary = summaries.get((s, method))
            if summary is None:
                cells += ["–", "–", paper(method, s, False)]
                continue
            cell = summary["final"].format()
            range_cell = summary["final_spread"].format()
            if "certified_final" in summary:
                cell += f" ({summary['certified_final'].format()})"
                range_cell += f" ({summary['certified_final_spread'].format()})"
            cells += [cell, range_cell, paper(method, s, True)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def forgetting_table(
    summaries: Summaries, methods: Sequence[str], scenarios: Sequence[Scenario]
) -> list[str]:
    """Forgetting and backward transfer per method and scenario."""
    lines = [
        "### Forgetting and backward transfer (lower forgetting / higher BWT is better)",
        "",
        "| method | "
        + " | ".join(f"{SCENARIO_NAMES[s]} forgetting | BWT" for s in scenarios)
        + " |",
        "|---|" + "---|---|" * len(scenarios),
    ]
    for method in methods:
        cells = []
        for s in scenarios:
            summary = summaries.get((s, method))
            cells += (
                ["–", "–"]
                if summary is None
                else [summary["forgetting"].format(), summary["bwt"].format()]
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def curve_tables(
    summaries: Summaries, methods: Sequence[str], scenarios: Sequence[Scenario], n_tasks: int
) -> list[str]:
    """Per scenario, the average accuracy after each task (and the LIDs' certified values)."""
    lines: list[str] = []
    for s in scenarios:
        lines += [
            "",
            f"### {SCENARIO_NAMES[s]}: average accuracy after each task",
            "",
            "| method | " + " | ".join(f"after t{t + 1}" for t in range(n_tasks)) + " |",
            "|---|" + "---|" * n_tasks,
        ]
        for method in methods:
            summary = summaries.get((s, method))
            if summary is None:
                continue
            lines.append(f"| {method} | " + " | ".join(v.format() for v in summary["curve"]) + " |")
            if "certified_curve" in summary:
                lines.append(
                    f"| {method} certified | "
                    + " | ".join(v.format() for v in summary["certified_curve"])
                    + " |"
                )
    return lines


LidColumn = Literal[
    "search",
    "proof",
    "targets",
    "last_row",
    "final",
    "diagonal",
    "runs_holding",
    "certificates_holding",
    "widths",
    "frozen",
    "layer_log_widths",
    "open_tensors",
    "search_seconds",
]
LID_COLUMNS: dict[LidColumn, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "search": ("box, search bound, size measure", lambda s: describe_lid(s.get("lid"))),
    "proof": ("held-out proof", lambda s: ", ".join(s.get("proofs", [])) or "–"),
    "targets": ("τ per task", lambda s: ", ".join(f"{v.mean:.2f}" for v in s["targets"])),
    "last_row": (
        "certified, last row per task",
        lambda s: ", ".join(v.format() for v in s["certified_last_row"]),
    ),
    "final": ("mean last row", lambda s: s["certified_final"].format()),
    "diagonal": ("mean diagonal", lambda s: s["certified_diag"].format()),
    "runs_holding": ("runs whose every certificate meets τ", lambda s: f"{s['holds']}/{s['n']}"),
    "certificates_holding": (
        "certificates meeting τ",
        lambda s: "{}/{}".format(*s["certificates_holding"]),
    ),
    "widths": (
        "mean box width per task",
        lambda s: ", ".join(f"{v.mean:.3g}" for v in s["widths"]),
    ),
    "frozen": ("frozen fraction", lambda s: ", ".join(f"{v:.2f}" for v in s["frozen"])),
    "layer_log_widths": (
        "layer log-width per task",
        lambda s: (
            ", ".join(f"{v.mean:.2f}" for v in s["layer_log_widths"])
            if "layer_log_widths" in s
            else "–"
        ),
    ),
    "open_tensors": (
        "tensors open per task (of all boxed)",
        lambda s: (
            "{} of {}".format(", ".join(map(str, s["open_tensors"][0])), s["open_tensors"][1])
            if "open_tensors" in s
            else "–"
        ),
    ),
    "search_seconds": ("search + certify s", lambda s: f"{s['search_seconds']:.0f}"),
}
"""The columns a LID details table may show: header and cell of a LID summary."""


def lid_details_table(
    summaries: Summaries,
    scenarios: Sequence[Scenario],
    variants: Sequence[str],
    columns: Sequence[LidColumn],
) -> list[str]:
    """One row per scenario and LID variant with the chosen `LID_COLUMNS`."""
    chosen = [LID_COLUMNS[c] for c in columns]
    lines = [
        "| scenario | variant | " + " | ".join(header for header, _ in chosen) + " |",
        "|---|---|" + "---|" * len(chosen),
    ]
    for s in scenarios:
        for method in variants:
            summary = summaries.get((s, method))
            if summary is None:
                continue
            cells = [SCENARIO_NAMES[s], method, *(cell(summary) for _, cell in chosen)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def compute_table(
    summaries: Summaries, methods: Sequence[str], scenarios: Sequence[Scenario], *, clock: str
) -> list[str]:
    """Seconds per scenario and method, summed over seeds; `clock` names what was timed."""
    lines = ["", f"### Compute ({clock}, summed over seeds; first task excluded)", ""]
    lines += ["| scenario | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for s in scenarios:
        cells = [
            f"{summaries[(s, m)]['seconds']:.0f}" if (s, m) in summaries else "–" for m in methods
        ]
        lines.append(f"| {SCENARIO_NAMES[s]} | " + " | ".join(cells) + " |")
    return lines


# ---- plots ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotStyle:
    """What one benchmark's plots name and lay out differently.

    Attributes:
        dataset: the benchmark's name in the titles, e.g. "Split-MNIST".
        file_prefix: the files are `<file_prefix>_<scenario>_matrix.png` and `..._average.png`.
        paper_lid: the paper's LID figures, starred at the last task of the average plot.
        columns: panels per row of the accuracy-matrix figure.
        fit_columns: use fewer columns when there are fewer panels.
        wrap_title: break the matrix figure's title into two lines.
        subtitle: appended to the average plot's title.
    """

    dataset: str
    file_prefix: str
    paper_lid: PaperLid
    columns: int
    fit_columns: bool = False
    wrap_title: bool = False
    subtitle: str = ""


def _seed_count(summaries: Summaries, scenario: str, methods: Sequence[str]) -> str:
    """The number of seeds behind a scenario's summaries ("a-b" when methods differ)."""
    counts = sorted({summaries[(scenario, m)]["n"] for m in methods})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def plot(
    results: list[dict[str, Any]], settings: RunSettings, folder: Path, style: PlotStyle
) -> list[Path]:
    """Accuracy-matrix heatmaps and average-accuracy curves, one pair of PNGs per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarise(results)
    methods = [*settings.lid_variants, *settings.baselines]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    n = settings.n_tasks
    for s in settings.scenarios:
        present = [m for m in methods if (s, m) in summaries]
        cols = min(style.columns, len(present)) if style.fit_columns else style.columns
        rows = math.ceil(len(present) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        for ax, method in zip(axes.flat, present, strict=False):
            matrix = summaries[(s, method)]["matrix"].clone()
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
            matrix[mask] = float("nan")
            ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
            for t in range(n):
                for j in range(t + 1):
                    value = float(matrix[t, j])
                    ax.text(
                        j,
                        t,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value < 0.6 else "black",
                    )
            ax.set_title(method, fontsize=9)
            ax.set_xticks(range(n), [f"t{j + 1}" for j in range(n)], fontsize=7)
            ax.set_yticks(range(n), [f"after t{t + 1}" for t in range(n)], fontsize=7)
        for ax in list(axes.flat)[len(present) :]:
            ax.axis("off")
        fig.suptitle(
            f"{style.dataset} {SCENARIO_NAMES[s]}: test accuracy on task j (column) after"
            + ("\n" if style.wrap_title else " ")
            + f"training task t (row), mean of {_seed_count(summaries, s, present)} seed(s)",
            fontsize=10,
        )
        fig.tight_layout()
        path = folder / f"{style.file_prefix}_{s}_matrix.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(8.4, 4.4))
        steps = list(range(1, n + 1))
        for method in present:
            summary = summaries[(s, method)]
            mean = [v.mean for v in summary["curve"]]
            (line,) = ax.plot(steps, mean, marker="o", label=method)
            ax.fill_between(  # the 10th-90th percentile band over seeds
                steps,
                [v.low for v in summary["curve_spread"]],
                [v.high for v in summary["curve_spread"]],
                color=line.get_color(),
                alpha=0.15,
            )
            if "certified_curve" in summary:
                ax.plot(
                    steps,
                    [v.mean for v in summary["certified_curve"]],
                    linestyle="--",
                    marker="x",
                    color=line.get_color(),
                    label=f"{method} certified",
                )
        paper_acc, paper_cert = style.paper_lid[s]
        ax.scatter([n], [paper_acc], marker="*", s=120, color="black", label="paper LID", zorder=5)
        if paper_cert is not None:
            ax.scatter(
                [n],
                [paper_cert],
                marker="*",
                s=120,
                color="grey",
                label="paper LID certified",
                zorder=5,
            )
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("average accuracy over tasks seen")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(steps)
        ax.set_title(
            f"{style.dataset} {SCENARIO_NAMES[s]}{style.subtitle}: mean and 10th-90th "
            f"percentile over {_seed_count(summaries, s, present)} seed(s)",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{style.file_prefix}_{s}_average.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
