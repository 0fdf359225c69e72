"""How much memory a bound pass needs, and how to split passes to fit a budget (issue 21).

`bound_pass_cost` estimates the peak bytes of one bound pass from the graph's tensor shapes
(one forward pass on a zero sample gives every tensor's entries per sample), the method and the
dtype: a part fixed per pass (copies and tables of the box), a part per sample (the interval
pass: lower, upper, float-error and magnitude tensors of every activation, with temporaries)
and a part per margin row of a sample (the linear engines' back-substitution coefficients, one
(rows, *shape) tensor per pending activation with its products, magnitudes and ledger terms).
Every coefficient below was calibrated against peak RSS measurements (`tests/test_memory.py`,
resident set high-water mark reset through /proc/self/clear_refs before each pass) and then
doubled (`SAFETY`), summing over *all* activations where the engine keeps at most a few alive
at once; so the estimate is an upper bound with room, never a tight figure.

`plan_pass` turns an estimate and a budget into samples per pass and, when one sample's rows
do not fit, margin rows per back-substitution group. Neither changes any result: every sample,
and every margin row, is bounded by the same arithmetic whatever else shares its pass.

The budget is set once at the edge (`memory_budget`, from `--max-memory` or
`default_memory_budget`); inside, `current_memory_budget` reads it (None: no limit). It covers
the bound passes' own tensors, not the model's parameters, the data set or the runtime.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from verifier.errors import MemoryBudgetError
from verifier.graph import Conv, Graph, Linear, evaluate

PassMethod = Literal["ibp", "midrad", "linear", "crown-ibp", "best", "zonotope"]

SAFETY = 2.0
"""Factor between the calibrated coefficients and the measured peaks they were fitted to."""

_IBP_COPIES = 4.0  # lower, upper, error, magnitude of each activation, and temporaries
_FOLD_COPIES = 4.0  # the last layer folded per (sample, class): D_j intervals and products
_ROW_COPIES = 3.0  # coefficients, L+ / L-, two corner products, |L| magnitudes, ledger terms
_GRAD_FACTOR = 2.0  # autograd keeps each pass's intermediates for the backward pass
_SLOPE_COPIES = 4.0  # optimised slopes: variables, Adam moments, best copies, gradients
_LIRPA_COPIES = 40.0  # auto_LiRPA's CROWN-IBP keeps its own bounds per node (~9 MB per input)
_BOX_COPIES = 8.0  # the box in the pass's dtype: corners, centre, radius, |W|max, pair tables
_KERNEL_COPIES = 12.0  # per row and Conv kernel entry: correlations of lam and |lam|, range
# ends, slopes, intercepts, the row's kernel (`linear_affine._shared_kernel`)
_PATCH_COPIES = 5.0  # per sample and Conv: input patches of centre, radius, magnitude, joined
_MIN_ROOM = 1 << 20  # allocator slack and small tensors of a pass

_BUDGET: ContextVar[int | None] = ContextVar("memory_budget", default=None)
_SHAPES: weakref.WeakKeyDictionary[Graph, tuple[list[int], int, tuple[int, int]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class PassCost:
    """Estimated peak bytes of one bound pass: `fixed + samples * (per_sample + rows *
    per_row)`, where `rows` is the margin rows of one sample (0 for a pass without rows)."""

    fixed: int
    per_sample: int
    per_row: int
    rows: int

    def bytes(self, samples: int, rows: int | None = None) -> int:
        """Bytes of a pass over `samples` samples with `rows` rows each (default: all)."""
        rows = self.rows if rows is None else min(rows, self.rows)
        return self.fixed + samples * (self.per_sample + rows * self.per_row)


@dataclass(frozen=True)
class PassPlan:
    """How to run bound passes within a budget: samples per pass and margin rows per
    back-substitution group (None: all rows of a sample at once)."""

    samples: int
    rows: int | None = None


def bound_pass_cost(
    graph: Graph,
    method: PassMethod,
    *,
    dtype: torch.dtype = torch.float64,
    grad: bool = False,
    intermediate: Literal["ibp", "crown"] = "ibp",
    slopes: Literal["adaptive", "optimized"] = "adaptive",
    classes: int | None = None,
    generators: int = 0,
) -> PassCost:
    """Estimate the peak bytes of one bound pass (module docstring); an upper bound by design.

    Args:
        graph: the network.
        method: the bound of the pass; "best" is "ibp" plus "linear", "zonotope" the zonotope
            bounds (which include intervals over the hull).
        dtype: dtype of the pass (float64 for proofs, float32 in the search).
        grad: the pass keeps its graph for a backward pass (the search's gradient).
        intermediate: pre-activation bounds of the linear engine ("crown": one
            back-substitution of 2 n rows per pre-activation of n entries).
        slopes: "optimized" keeps per-row slope variables and Adam moments.
        classes: margin rows per sample of a linear pass (default: n_classes - 1).
        generators: a zonotope's k.

    Returns:
        The estimate.
    """
    numels, n_last = _tensor_sizes(graph)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total, largest = sum(numels), max(numels)
    n_classes = graph.n_classes
    grad_factor = _GRAD_FACTOR if grad else 1.0
    params = graph.n_parameters()
    per_sample = _IBP_COPIES * total + _FOLD_COPIES * n_classes * n_last
    fixed = _BOX_COPIES * params + _FOLD_COPIES * n_classes * n_classes * n_last
    per_row, rows = 0.0, 0
    if method == "zonotope":
        per_sample += _IBP_COPIES * total * (generators + 1)
        fixed += _BOX_COPIES * params * generators
    if method in ("linear", "best", "crown-ibp", "zonotope"):
        rows = n_classes - 1 if classes is None else min(classes, n_classes - 1)
        kernels, patches = _conv_sizes(graph)
        per_row = _ROW_COPIES * total + _KERNEL_COPIES * kernels
        per_sample += _PATCH_COPIES * patches
        if slopes == "optimized":
            per_row += _SLOPE_COPIES * total
        if intermediate == "crown":
            rows = max(rows, 2 * largest)
    if method == "crown-ibp":
        per_sample += _LIRPA_COPIES * total * n_classes
    scale = SAFETY * itemsize * grad_factor
    return PassCost(
        fixed=math.ceil(scale * fixed) + _MIN_ROOM,
        per_sample=math.ceil(scale * per_sample),
        per_row=math.ceil(scale * per_row),
        rows=max(rows, 0),
    )


def plan_pass(cost: PassCost, budget: int | None, *, samples: int) -> PassPlan:
    """Samples per pass (at most `samples`) and rows per group that fit `budget` bytes.

    Args:
        cost: the pass's estimate.
        budget: bytes, or None (no limit: all `samples` at once, all rows).
        samples: the most samples a pass should take (the caller's chunk or batch).

    Returns:
        The plan; rows are split only when one sample's rows do not fit.

    Raises:
        MemoryBudgetError: the budget is below one sample with one margin row.
    """
    samples = max(int(samples), 1)
    if budget is None:
        return PassPlan(samples)
    room = budget - cost.fixed
    whole = cost.per_sample + cost.rows * cost.per_row
    if room >= whole:
        return PassPlan(min(samples, max(1, room // max(whole, 1))))
    least = cost.bytes(1, min(cost.rows, 1))
    if cost.rows > 1 and budget >= least:
        return PassPlan(1, int((room - cost.per_sample) // cost.per_row))
    raise MemoryBudgetError(
        f"a memory budget of {format_size(budget)} is below the {format_size(least)} one bound "
        f"pass needs on this model (one sample{', one margin row' if cost.rows else ''}); "
        "raise --max-memory"
    )


def _tensor_sizes(graph: Graph) -> tuple[list[int], int]:
    """Entries per sample of every tensor of the graph, and the input width of its last
    Linear op (the folded layer); cached per graph."""
    numels, n_last, _ = _sizes(graph)
    return numels, n_last


def _conv_sizes(graph: Graph) -> tuple[int, int]:
    """Kernel entries of every Conv, and the entries per sample of their input patches
    (kernel entries per output channel times output positions), summed over the Convs."""
    return _sizes(graph)[2]


def _sizes(graph: Graph) -> tuple[list[int], int, tuple[int, int]]:
    cached = _SHAPES.get(graph)
    if cached is not None:
        return cached
    params = {k: v.detach().to("cpu", torch.float32) for k, v in graph.parameters.items()}
    with torch.no_grad():
        env = evaluate(graph, torch.zeros(1, *graph.input_shape), params)
    numels = [int(t[0].numel()) for t in env.values()]
    n_last = max(numels)
    for op in reversed(graph.ops):
        if isinstance(op, Linear):
            n_last = int(env[op.inputs[0]][0].numel())
            break
    kernels = patches = 0
    for op in graph.ops:
        if isinstance(op, Conv):
            weight = graph.parameters[op.weight]
            positions = int(env[op.output][0].numel()) // int(weight.shape[0])
            kernels += int(weight.numel())
            patches += int(weight[0].numel()) * op.groups * positions
    _SHAPES[graph] = (numels, n_last, (kernels, patches))
    return _SHAPES[graph]


@contextmanager
def memory_budget(budget: int | None) -> Iterator[None]:
    """Fit every bound pass inside this block to `budget` bytes (None: no limit). Set by the
    edge (CLI) so that no layer threads a budget argument through."""
    token = _BUDGET.set(budget)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def current_memory_budget() -> int | None:
    """The budget of the enclosing `memory_budget` block, or None."""
    return _BUDGET.get()


_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as `4G`, `512M`, `1.5G`, `300000K` or `1000000` (binary units;
    an optional trailing `B`, `iB` and any case).

    Raises:
        MemoryBudgetError: not a positive size in that form.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise MemoryBudgetError(
            f"--max-memory must be a size such as 4G, 512M or 1000000 (bytes); got {text!r}"
        )
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if value < 1:
        raise MemoryBudgetError(f"--max-memory must be positive; got {text!r}")
    return int(value)


def format_size(n_bytes: int) -> str:
    """A size in binary units, e.g. `1.5 GiB`."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.4g} {unit}"
        value /= 1024
    return f"{value:.4g} TiB"


DEFAULT_FRACTION = 0.5
"""Share of the memory available now (or a GPU's free memory) a run's bound passes may use."""


def default_memory_budget(device: str | torch.device = "cpu") -> int | None:
    """Half the memory available now: MemAvailable of /proc/meminfo for the CPU, the free
    memory of the device for CUDA. None where neither can be read (no limit)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEFAULT_FRACTION * free)
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return None if match is None else int(DEFAULT_FRACTION * int(match.group(1)) * 1024)
