"""The report's charts, drawn with matplotlib (Agg, no pyplot) and returned as SVG text.

Each function takes plain values from the certificate and history and returns one SVG
document. Text is drawn as paths, so the SVG needs no font, and the output carries no date, so
the same inputs give the same bytes. rcParams are changed only inside a context manager.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any, Final

import matplotlib
from matplotlib.figure import Figure

COLOURS: Final = ("#1f6f8b", "#e07b39", "#4e9f3d", "#8b5fbf", "#c44e52", "#6c757d")
_RC: Final[dict[Any, Any]] = {
    "svg.fonttype": "path",
    "svg.hashsalt": "lid-verifier",
    "font.size": 9.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def width_chart(per_tensor: Mapping[str, Mapping[str, float]]) -> str:
    """Horizontal bars: mean width of each parameter tensor's intervals, with its max width.

    Args:
        per_tensor: tensor name -> {"mean_width", "max_width", ...} from the certificate.
    """
    names = list(per_tensor)[::-1]
    with matplotlib.rc_context(_RC):
        fig = _figure(7.5, 0.5 + 0.32 * max(len(names), 2))
        ax = fig.add_subplot()
        means = [per_tensor[n]["mean_width"] for n in names]
        maxima = [per_tensor[n]["max_width"] for n in names]
        ax.barh(names, means, color=COLOURS[0], label="mean width of the interval")
        ax.scatter(maxima, names, color=COLOURS[1], marker="|", s=120, label="largest interval")
        ax.set_xlabel("allowed change of a weight: upper minus lower end of its interval")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
        ax.set_xlim(left=0)
        return _svg(fig)


def search_chart(
    history: Sequence[Mapping[str, Any]],
    checkpoints: Sequence[Mapping[str, Any]],
    tasks: Sequence[Mapping[str, Any]],
) -> str:
    """Two panels against the search iteration: certified accuracy and mean width.

    Top: the certified metric of each task on the search's batch at every iteration, the
    metric on the whole optimisation data at each checkpoint, the search target and τ, and the
    final held-out lower bound L. Bottom: the mean width of the box.

    Args:
        history: history.jsonl entries (iteration, mean_width, hard, ...).
        checkpoints: the certificate's search.checkpoints.
        tasks: the certificate's tasks (task, target, search_target, lower_bound).
    """
    with matplotlib.rc_context(_RC):
        fig = _figure(9.0, 4.6)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
        iterations = [int(h["iteration"]) for h in history]
        last = max([*iterations, *(int(c["iteration"]) for c in checkpoints), 1])
        for i, task in enumerate(tasks):
            colour = COLOURS[i % len(COLOURS)]
            name = task["task"]
            if history:
                top.plot(
                    iterations,
                    [h["hard"][i] for h in history],
                    color=colour,
                    linewidth=0.9,
                    alpha=0.6,
                    label=f"{name}: certified on the search batch",
                )
            if checkpoints:
                top.plot(
                    [c["iteration"] for c in checkpoints],
                    [c["hard"][i] for c in checkpoints],
                    "o",
                    color=colour,
                    markersize=4,
                    label=f"{name}: certified on all optimisation data (checkpoint)",
                )
            top.axhline(task["target"], color=colour, linestyle="--", linewidth=1.2)
            top.annotate(
                f"required τ = {task['target']:.3f}",
                (last, task["target"]),
                xytext=(-4, 3),
                textcoords="offset points",
                ha="right",
                color=colour,
            )
            top.axhline(task["search_target"], color=colour, linestyle=":", linewidth=1)
            top.plot(
                [last],
                [task["lower_bound"]],
                "*",
                color=colour,
                markeredgecolor="#222222",
                markersize=13,
                label=f"{name}: held-out guaranteed bound L = {task['lower_bound']:.3f}",
            )
        top.set_ylabel("certified accuracy")
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7.5)
        if history:
            bottom.plot(iterations, [h["mean_width"] for h in history], color=COLOURS[0])
        bottom.set_ylabel("mean width")
        bottom.set_xlabel("search iteration (dotted: search target on optimisation data)")
        return _svg(fig)


def per_class_chart(task: Mapping[str, Any]) -> str:
    """Bars per class: certified fraction k/n on held-out data, with its lower bound.

    Args:
        task: one task of the certificate (per_class with label, n, k, lower_bound; target).
    """
    classes = task["per_class"]
    labels = [str(c["label"]) for c in classes]
    with matplotlib.rc_context(_RC):
        fig = _figure(7.5, 2.8)
        ax = fig.add_subplot()
        rates = [c["k"] / c["n"] if c["n"] else 0.0 for c in classes]
        ax.bar(labels, rates, color=COLOURS[0], label="certified fraction k/n (held-out)")
        ax.scatter(
            labels,
            [c["lower_bound"] for c in classes],
            color=COLOURS[1],
            marker="_",
            s=300,
            linewidths=2.5,
            zorder=3,
            label="guaranteed lower bound per class",
        )
        ax.axhline(task["target"], color="#222222", linestyle="--", linewidth=1, label="τ (task)")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("class")
        ax.set_ylabel("certified accuracy")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
        return _svg(fig)


def gap_chart(gaps: Mapping[str, Mapping[str, float | None] | None]) -> str:
    """Grouped bars: mean, median and max gap between a bound's margin and the exact margin.

    Args:
        gaps: series name (e.g. "ibp vs exact worst case") -> {"mean", "median", "max"}, or
            None for a series that was not computed (left out).
    """
    methods = [m for m, v in gaps.items() if v is not None]
    stats = ("mean", "median", "max")
    with matplotlib.rc_context(_RC):
        fig = _figure(7.5, 2.6)
        ax = fig.add_subplot()
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            values = gaps[method] or {}
            heights = [float(values.get(s) or 0.0) for s in stats]
            positions = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(stats))]
            ax.bar(positions, heights, width=width, color=COLOURS[j % len(COLOURS)], label=method)
        ax.set_xticks(range(len(stats)), [f"{s} gap" for s in stats])
        ax.set_ylabel("margin reached minus bound")
        ax.legend(frameon=False)
        return _svg(fig)
