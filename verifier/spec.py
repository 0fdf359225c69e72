"""Spec files (specs/*.yaml) to validated, frozen configuration objects.

Every key has a documented default (see specs/reference.yaml); unknown keys are errors. Any
validation failure becomes one `SpecError` naming the file, the key path, what was expected and
what was found. Relative paths in a spec are resolved against the spec file's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from verifier.errors import SpecError

TARGET_PATTERN = re.compile(r"^\s*acc\s*-\s*([0-9]*\.?[0-9]+)\s*$")


DEFAULT_SCALES: tuple[float, ...] = tuple(round(2.0 ** (k / 3), 4) for k in range(0, -5, -1))
"""Five scales 2^(k/3), k = 0 .. -4 (1 down to 0.40): steps of 26%; a wider box than the
search result comes from the next search, at a lower target."""


class _Section(BaseModel, extra="forbid", frozen=True, validate_default=True):
    """Base of every spec section: unknown keys are errors, defaults are validated."""


class DataSection(_Section):
    """Where a task's samples come from."""

    name: str = Field(description="Built-in data set (digits, mnist, cifar10) or an .npz path.")
    split: str = "test"
    classes: tuple[int, ...] | None = Field(
        None, description="Keep only these labels (split tasks); None keeps all."
    )
    data_dir: str | None = None


class TaskSection(_Section):
    """One constraint: (balanced) accuracy on a data set at least a target."""

    name: str = "task"
    metric: Literal["accuracy", "balanced_accuracy"] = "accuracy"
    target: float | str = Field(
        "acc - 0.05",
        description="Absolute τ in (0, 1], or 'acc - δ' relative to the clean accuracy.",
    )
    data: DataSection | None = None

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: float | str) -> float | str:
        if isinstance(value, str):
            if TARGET_PATTERN.match(value) is None:
                raise ValueError(f"target must be a number in (0, 1] or 'acc - δ'; got '{value}'")
            return value
        if not 0.0 < value <= 1.0:
            raise ValueError(f"target must be in (0, 1]; got {value}")
        return value

    def resolve_target(self, clean: float) -> float:
        """τ as a number, given the clean metric of the current weights."""
        if isinstance(self.target, str):
            match = TARGET_PATTERN.match(self.target)
            assert match is not None  # validated above
            return clean - float(match.group(1))
        return float(self.target)


class ImportanceSection(_Section):
    """Freezing the least important parameters (diagonal Fisher or Synaptic Intelligence)."""

    kind: Literal["none", "fisher", "si"] = "none"
    fraction: float = Field(0.0, ge=0.0, lt=1.0, description="q: fraction of entries frozen.")
    lookahead: DataSection | None = Field(
        None, description="Next task's data: freeze the q entries least important for it."
    )
    n_samples: int = Field(512, ge=1)


class LinearBoundSection(_Section):
    """Options of the linear-bound engine (`search.bound: linear`; `verifier.bounds.linear`)."""

    intermediate: Literal["ibp", "crown"] = Field(
        "ibp",
        description="Pre-activation bounds: from intervals (CROWN-IBP, cheap) or from "
        "back-substitution to every layer (CROWN, tighter, cost grows with depth squared).",
    )
    slopes: Literal["adaptive", "optimized"] = Field(
        "adaptive", description="Lower ReLU slopes: adaptive (0 or 1) or optimised by gradient."
    )
    warm_start: int = Field(
        0, ge=0, description="Iterations of interval bounds before the linear bounds start."
    )
    every: int = Field(
        1, ge=1, description="Use the linear bounds every k-th iteration (intervals otherwise)."
    )
    classes: int | None = Field(
        None,
        ge=1,
        description="In search steps, bound linearly only the k classes per sample whose "
        "interval margin bounds are lowest (intervals for the rest); null: every class. "
        "Proofs always bound every class.",
    )
    samples: float | None = Field(
        None,
        gt=0,
        le=1,
        description="In search steps, bound linearly only this fraction of the batch: the "
        "samples the box centre classifies correctly whose interval margin bounds are lowest "
        "(intervals for the rest); null: every sample. Proofs always bound every sample.",
    )


class ReshapeSection(_Section):
    """Reshaping the searched box toward the shape that maximises its size (`search.reshape`,
    `verifier.search.reshape`)."""

    rounds: int = Field(
        0, ge=0, description="Rounds after the search (0: keep the search's own shape)."
    )
    step: float = Field(
        0.5, gt=0.0, le=1.0, description="α: each round moves a width by (q̄ / q_i)^α."
    )
    clamp: float = Field(
        2.0, gt=1.0, description="A round changes no width by more than this factor."
    )
    costs: Literal["search", "ibp"] = Field(
        "search",
        description=(
            "The bound that prices each width in a round: the search's guide, or interval "
            "bounds (moves by interval costs; scaling and proofs keep the search's bound)."
        ),
    )


class SearchSection(_Section):
    """The primal-dual LID search."""

    iterations: int = Field(300, ge=0)
    batch_size: int = Field(500, ge=1)
    lr: float = Field(
        0.05, gt=0.0, description="η: primal Adam learning rate is η / p (p = boxed parameters)."
    )
    dual_lr: float = Field(0.5, gt=0.0, description="η_d: dual ascent step on hard violation.")
    penalty: float = Field(10.0, ge=0.0, description="ρ0 of the augmented Lagrangian.")
    penalty_growth: float = Field(1.01, ge=1.0)
    temperature: float = Field(10.0, gt=0.0, description="t of the soft-accuracy surrogate.")
    size: Literal["mean_width", "mean_log_width", "layer_log_width"] = Field(
        "mean_width",
        description="S maximised: mean width over entries; mean log-width over entries; or "
        "layer_log_width, the mean over tensors of each tensor's mean log-width, so that small "
        "tensors (convolutions) open as well as large ones.",
    )
    checkpoint_every: int = Field(20, ge=1)
    max_width: float | None = Field(None, gt=0.0)
    bound: Literal["ibp", "midrad", "linear"] = Field(
        "ibp",
        description="Bounds that drive the search: intervals (exact products), the paper's "
        "midpoint-radius intervals, or linear bounds over the box (`search.linear`).",
    )
    linear: LinearBoundSection = LinearBoundSection()
    init_width: float = Field(1e-6, ge=0.0)
    target_slack: Literal["auto"] | float = Field(
        "auto",
        description="Search for τ + slack on the optimisation part; 'auto' (default) picks the "
        "rate whose held-out Clopper-Pearson bound at beta / m (m: the ladder's candidates, a "
        "cautious aim) would just meet τ, and the certification ladder (`certify.ladder`) "
        "keeps the widest candidate the held-out data certify, so no slack needs tuning.",
    )
    shrink: bool = True
    validation_fraction: float = Field(
        0.3,
        ge=0.0,
        lt=1.0,
        description="Part of the optimisation data kept out of the gradient and used, with the "
        "rest, to choose and shrink the box (guards against a box that fits its batch only).",
    )
    seed: int = 0
    importance: ImportanceSection = ImportanceSection()
    reshape: ReshapeSection = ReshapeSection()

    @field_validator("target_slack")
    @classmethod
    def _check_slack(cls, value: str | float) -> str | float:
        if isinstance(value, float | int) and not 0.0 <= value < 1.0:
            raise ValueError(f"target_slack must be 'auto' or in [0, 1); got {value}")
        return value


class ZonotopeSection(_Section):
    """The zonotope domain (`domain: zonotope`): a box plus k generators shared by all
    parameters, searched with the same primal-dual scheme (verifier/search/zonotope.py).

    Size maximised: with w the box-part widths and p the free entries, `search.size`
    mean_width gives S = (Σ_i w_i + 2 γ Σ_k ||G_k||) / p and mean_log_width gives
    S = (Σ_i log w_i + γ Σ_k log(1 + 2 ||G_k|| / w_g)) / p (w_g: geometric mean width), where
    γ = generator_weight and ||.|| is the Euclidean norm (`size: isotropic_width`: proportional
    to T's mean width over random directions) or the L1 norm (`size: hull_width`: the interval
    hull's mean width). The box search runs first; the zonotope starts from its box.
    """

    k: int = Field(8, ge=0, le=256, description="Number of generators; 0 is the box.")
    init: Literal["random", "fisher", "lookahead"] = Field(
        "random",
        description="Initial generators: Gaussian entries; Gaussian entries scaled by "
        "(F + mean F)^-1/2 with F the diagonal Fisher information on the search data; or "
        "lookahead: the top-k principal directions of the next task's loss gradients "
        "(data: search.importance.lookahead), pointing downhill.",
    )
    init_scale: float = Field(
        1e-5, gt=0.0, description="Root-mean-square entry of the initial generators."
    )
    size: Literal["isotropic_width", "hull_width"] = "isotropic_width"
    generator_weight: float = Field(
        1.0, ge=0.0, description="γ: weight of the generator term in the size measure."
    )
    generator_lr: float = Field(
        0.1,
        gt=0.0,
        description="Generators' learning rate relative to the box widths' (Adam moves every "
        "entry at about the same rate, so generators at 1.0 outgrow what they add to S).",
    )
    iterations: int | None = Field(
        None,
        ge=0,
        description="Steps of the second stage (generators and box together), after the box "
        "search's search.iterations; null: search.iterations.",
    )


class LadderSection(_Section):
    """The certification ladder (verifier/ladder.py): the results of up to `targets` searches,
    each scaled by `scales` (narrowest first), certified on the held-out part at beta in that
    fixed sequence until one misses τ; the widest accepted is kept."""

    scales: tuple[float, ...] = Field(
        DEFAULT_SCALES,
        description="Scales c of each search result (θ0 + c (box - θ0)) certified on the "
        "held-out part; [1.0] certifies the search result alone.",
    )
    targets: int = Field(
        3,
        ge=1,
        le=16,
        description="Searches run, at the search target and at `step`, 2 `step`, ... standard "
        "deviations of the held-out rate below it (never below τ); 1: one search.",
    )
    step: float = Field(1.0, gt=0.0, le=5.0)

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("ladder needs at least one scale")
        if any(not 0.0 < c <= 1e3 for c in value):
            raise ValueError(f"ladder scales must lie in (0, 1000]; got {list(value)}")
        if len(set(value)) != len(value):
            raise ValueError(f"ladder scales must be distinct; got {list(value)}")
        return tuple(sorted(value, reverse=True))


class BabSection(_Section):
    """Branch and bound for `certify.method: bab` (`verifier.bounds.bab`): applied per margin
    that intervals and linear bounds leave unproved; deterministic unless timeout_s is set."""

    max_domains: int = Field(
        200, ge=0, description="Domains bounded per margin (split children and polishing runs)."
    )
    timeout_s: float | None = Field(
        None,
        gt=0.0,
        description="Seconds per margin; null: none (a time limit makes `verifier verify`'s "
        "recomputation machine-dependent).",
    )
    steps: int = Field(20, ge=0, description="Adam steps on slopes and multipliers per domain.")


class CertifySection(_Section):
    """The held-out finite-sample certificate."""

    certification_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    n_samples: int | None = Field(
        None, ge=1, description="Cap on held-out samples (default: the whole held-out part)."
    )
    beta: float = Field(1e-3, gt=0.0, lt=0.5)
    bound: Literal["clopper-pearson", "hoeffding"] = "clopper-pearson"
    method: Literal["ibp", "midrad", "linear", "crown-ibp", "best", "bab"] = Field(
        "ibp",
        description="Bound that proves samples: ibp, midrad, linear (our back-substitution over "
        "the box), crown-ibp (auto_LiRPA, Linear boxes only), best (per sample and class the "
        "tighter of ibp and linear) or bab (best, then branch and bound on the margins it "
        "leaves unproved; MLPs only). Default: best when search.bound is linear, else ibp.",
    )
    bab: BabSection = BabSection()
    split_seed: int = 0
    ladder: LadderSection = LadderSection()


class Spec(_Section):
    """A whole job: model, parameters boxed, tasks, domain, search and certificate settings."""

    model: str
    data: DataSection
    parameters: Literal["all"] | tuple[str, ...] = "all"
    tasks: tuple[TaskSection, ...] = (TaskSection(),)
    domain: Literal["box", "zonotope"] = "box"
    zonotope: ZonotopeSection = ZonotopeSection()
    outer_box: str | None = Field(None, description="LID file the new box must lie inside.")
    search: SearchSection = SearchSection()
    certify: CertifySection = CertifySection()
    device: str = "cpu"

    @model_validator(mode="after")
    def _default_method(self) -> Spec:
        # a search driven by linear bounds needs them in its proofs too, or its box fails
        if self.search.bound == "linear" and "method" not in self.certify.model_fields_set:
            certify = self.certify.model_copy(update={"method": "best"})
            object.__setattr__(self, "certify", certify)
        if self.domain != "box" and self.search.reshape.rounds > 0:
            raise ValueError("search.reshape applies to box LIDs only (domain: box)")
        return self

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, tasks: tuple[TaskSection, ...]) -> tuple[TaskSection, ...]:
        # a field validator (not a model validator) so that the error names the key `tasks`
        if not tasks:
            raise ValueError("tasks must list at least one constraint")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique; got {names}")
        return tasks


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The spec section inside a field's type (`X`, `X | None`, `tuple[X, ...]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        section = _section_of(arg)
        if section is not None:
            return section
    return None


def _key_path(loc: tuple[int | str, ...]) -> str:
    """The YAML key path of a pydantic error location, e.g. `tasks.0.target`.

    Pydantic adds the member of a union it tried (`float`, `literal['auto']`) to the location;
    those are not keys, so they are dropped: only field names, list indices and unknown keys
    under a section remain.
    """
    parts: list[str] = []
    model: type[BaseModel] | None = Spec
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif model is not None and item in model.model_fields:
            parts.append(item)
            model = _section_of(model.model_fields[item].annotation)
        elif model is not None:  # an unknown key under a section
            parts.append(item)
            model = None
    return ".".join(parts)


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    where = _key_path(first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key '{where}'; see specs/reference.yaml for the known keys"
    if kind == "missing":
        return f"{path}: missing key '{where}'"
    message = first["msg"].removeprefix("Value error, ")
    found = first.get("input")
    found_text = f"; got {found!r}" if not isinstance(found, dict | list) else ""
    return f"{path}: {where}: {message}{found_text if 'got' not in message else ''}"


def parse_spec(raw: Any, *, source: Path) -> Spec:
    """Validate a decoded YAML document as a Spec.

    Raises:
        SpecError: naming the file, the key path, what was expected and what was found.
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of keys at the top level")
    try:
        return Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_error(source, err)) from None


def load_spec(path: Path) -> Spec:
    """Read and validate a spec file; relative paths become relative to its folder.

    Raises:
        SpecError: missing, unreadable or malformed file, or an invalid key.
    """
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = err.problem or err.context or err.__class__.__name__
        raise SpecError(f"{path}: not valid YAML{where}: {problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as err:
        # PyYAML's constructors fail this way on a bad !!timestamp, !!binary or deep nesting
        problem = " ".join(str(err).split())[:200]
        raise SpecError(f"{path}: not valid YAML (a value cannot be read: {problem})") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot be read ({err.__class__.__name__})") from None
    spec = parse_spec(raw, source=path)
    return resolve_paths(spec, path.parent)


def _resolve(value: str, base: Path) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else (base / p).resolve())


def _map_data(data: DataSection | None, change: Callable[[str], str]) -> DataSection | None:
    if data is None:
        return None
    updates: dict[str, Any] = {}
    if data.name.endswith(".npz"):
        updates["name"] = change(data.name)
    if data.data_dir is not None:
        updates["data_dir"] = change(data.data_dir)
    return data.model_copy(update=updates) if updates else data


def map_paths(spec: Spec, change: Callable[[str], str]) -> Spec:
    """The spec with `change` applied to every file path in it: the model, .npz data and data
    folders (top level, tasks, look-ahead) and the outer box."""
    tasks = tuple(t.model_copy(update={"data": _map_data(t.data, change)}) for t in spec.tasks)
    importance = spec.search.importance
    importance = importance.model_copy(
        update={"lookahead": _map_data(importance.lookahead, change)}
    )
    return spec.model_copy(
        update={
            "model": change(spec.model),
            "data": _map_data(spec.data, change),
            "tasks": tasks,
            "outer_box": None if spec.outer_box is None else change(spec.outer_box),
            "search": spec.search.model_copy(update={"importance": importance}),
        }
    )


def resolve_paths(spec: Spec, base: Path) -> Spec:
    """Make the model, data and outer-box paths of a spec absolute, relative to `base`."""
    return map_paths(spec, lambda value: _resolve(value, base))


def spec_hash(spec: Spec) -> str:
    """sha256 of the normalised spec (JSON with sorted keys)."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
