"""What a search returns: per-iteration steps, checkpoints and the chosen box."""

from __future__ import annotations

from dataclasses import dataclass, field

from verifier.domains.box import Box


@dataclass(frozen=True)
class SearchStep:
    """What one iteration did; handed to `on_step` and written to history.jsonl."""

    iteration: int
    mean_width: float
    size: float
    soft: tuple[float, ...]
    hard: tuple[float, ...]
    lam: tuple[float, ...]
    lr_scale: float


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A candidate LID with its hard certified metric per task on the optimisation part,
    from the float32 guide (`hard_metrics(proof=False)`); proved in float64 before use."""

    iteration: int
    box: Box
    hard: tuple[float, ...]
    mean_width: float


@dataclass(frozen=True, eq=False)
class SearchResult:
    """The chosen LID and how it was chosen."""

    box: Box
    hard: tuple[float, ...]
    feasible: bool
    chosen: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    history: list[SearchStep] = field(default_factory=list)
