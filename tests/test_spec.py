"""Spec files: the committed specs load, specs survive YAML round trips, bad specs are named.

`specs/reference.yaml` must list every key of the schema with its default; the test walks the
pydantic sections of `verifier.spec` so that a new field cannot be left out of it.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

import verifier.spec as spec_module
from verifier.errors import SpecError
from verifier.spec import Spec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
REFERENCE = SPECS / "reference.yaml"
MODEL = ROOT / "onnx_models" / "digits_mlp.onnx"

# Keys of reference.yaml whose value is not the default, on purpose (see the comments there).
REFERENCE_NOT_DEFAULT = {"search.iterations"}

# Hypothesis keeps no example database: tests write only under tmp_path.
ROUND_TRIP = settings(max_examples=60, database=None, deadline=None)


# ---------------------------------------------------------------- committed specs


@pytest.mark.parametrize("name", ["digits.yaml", "reference.yaml"])
def test_committed_spec_loads_with_paths_resolved(name: str) -> None:
    spec = load_spec(SPECS / name)
    assert Path(spec.model) == MODEL.resolve()
    assert spec.data.name == "digits"


def test_cifar_cnn_spec_boxes_everything_and_holds_out_half() -> None:
    spec = load_spec(SPECS / "cifar_cnn.yaml")  # the model itself is rebuilt by a script
    assert Path(spec.model) == (ROOT / "onnx_models" / "cifar_cnn.onnx").resolve()
    assert spec.parameters == "all" and spec.data.name == "cifar10"
    assert spec.certify.certification_fraction == 0.5 and spec.search.size == "layer_log_width"


def test_cifar_cnn_variants_differ_from_the_whole_network_spec_only_where_they_say() -> None:
    whole = load_spec(SPECS / "cifar_cnn.yaml")
    linear = load_spec(SPECS / "cifar_cnn_linear.yaml")
    head = load_spec(SPECS / "cifar_cnn_head.yaml")
    assert linear.search.bound == "linear" and linear.certify.method == "best"
    assert linear.search.linear.every == 4 and linear.search.linear.classes == 2
    assert tuple(head.parameters) == ("head.3.*",) and head.search.size == "mean_width"
    for variant in (linear, head):  # same model, task, τ rule and held-out half
        assert variant.model == whole.model and variant.data == whole.data
        assert variant.tasks == whole.tasks
        assert variant.certify.certification_fraction == whole.certify.certification_fraction
        assert variant.certify.beta == whole.certify.beta


def test_reference_spec_reloads_from_its_own_dump(tmp_path: Path) -> None:
    spec = load_spec(REFERENCE)
    copy = tmp_path / "copy.yaml"
    copy.write_text(yaml.safe_dump(spec.model_dump(mode="json")), encoding="utf-8")
    assert load_spec(copy).model_dump(mode="json") == spec.model_dump(mode="json")


# ---------------------------------------------------------------- reference.yaml is complete


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic section inside a field type (`X`, `X | None`, `tuple[X, ...]`), if any."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        section = _section_of(arg)
        if section is not None:
            return section
    return None


def _walk_reference(
    section: type[BaseModel], raw: Any, path: str, seen: set[type[BaseModel]]
) -> list[str]:
    """Problems of `raw` as a complete listing of `section`: missing keys, non-defaults."""
    if not isinstance(raw, dict):
        return [f"{path or '(top level)'}: expected a mapping listing {section.__name__}'s keys"]
    seen.add(section)
    problems = []
    for name, field in section.model_fields.items():
        key = f"{path}.{name}" if path else name
        if name not in raw:
            problems.append(f"{key}: missing")
            continue
        value = raw[name]
        inner = _section_of(field.annotation)
        if inner is not None and isinstance(value, dict | list):
            items = value if isinstance(value, list) else [value]
            if not items:
                problems.append(f"{key}: empty list; show one {inner.__name__} with its keys")
            for i, item in enumerate(items):
                where = f"{key}.{i}" if isinstance(value, list) else key
                problems.extend(_walk_reference(inner, item, where, seen))
        elif inner is not None:
            problems.append(f"{key}: shown as {value!r}; show the {inner.__name__} with its keys")
        elif not field.is_required() and key not in REFERENCE_NOT_DEFAULT:
            default = to_jsonable_python(field.get_default(call_default_factory=True))
            if value != default:
                problems.append(f"{key}: {value!r} is not the default {default!r}")
    return problems


def _spec_sections() -> set[type[BaseModel]]:
    """Every pydantic section defined in verifier.spec (those with fields)."""
    return {
        obj
        for obj in vars(spec_module).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseModel)
        and obj.__module__ == spec_module.__name__
        and obj.model_fields
    }


def test_reference_lists_every_key_of_every_section_with_its_default() -> None:
    raw = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    seen: set[type[BaseModel]] = set()
    problems = _walk_reference(Spec, raw, "", seen)
    missed = sorted(s.__name__ for s in _spec_sections() - seen)
    assert not problems, f"{REFERENCE} is behind the schema:\n" + "\n".join(problems)
    assert not missed, f"{REFERENCE} shows no instance of the sections {missed}"


def test_reference_walk_catches_a_missing_nested_key() -> None:
    raw = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    del raw["search"]["importance"]["n_samples"]
    raw["certify"]["beta"] = 0.01
    problems = _walk_reference(Spec, raw, "", set())
    assert "search.importance.n_samples: missing" in problems
    assert any(p.startswith("certify.beta:") for p in problems)


# ---------------------------------------------------------------- round trip


def _round_trip(spec: Spec) -> dict[str, Any]:
    text = yaml.safe_dump(spec.model_dump(mode="json"), allow_unicode=True)
    return parse_spec(yaml.safe_load(text), source=Path("round-trip.yaml")).model_dump(mode="json")


def _open_unit(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, exclude_min=True, exclude_max=True, allow_subnormal=False)


targets = st.one_of(
    st.floats(0.0, 1.0, exclude_min=True, allow_subnormal=False),
    st.floats(0.0, 1.0).map(lambda d: f"acc - {d:.6f}"),
    st.decimals("0", "0.5", places=3).map(lambda d: f" acc-{d} "),
)


@ROUND_TRIP
@given(
    beta=_open_unit(0.0, 0.5),
    targets=st.lists(targets, min_size=1, max_size=3),
    iterations=st.integers(0, 10**6),
    size=st.sampled_from(["mean_width", "mean_log_width"]),
    search_bound=st.sampled_from(["ibp", "midrad"]),
    certify_bound=st.sampled_from(["clopper-pearson", "hoeffding"]),
    slack=st.one_of(st.just("auto"), st.floats(0.0, 1.0, exclude_max=True, allow_subnormal=False)),
)
def test_spec_survives_a_yaml_round_trip(
    beta: float,
    targets: list[float | str],
    iterations: int,
    size: str,
    search_bound: str,
    certify_bound: str,
    slack: float | str,
) -> None:
    raw = {
        "model": "model.onnx",
        "data": {"name": "digits", "classes": [0, 1]},
        "tasks": [{"name": f"t{i}", "target": t} for i, t in enumerate(targets)],
        "search": {
            "iterations": iterations,
            "size": size,
            "bound": search_bound,
            "target_slack": slack,
        },
        "certify": {"beta": beta, "bound": certify_bound},
    }
    spec = parse_spec(raw, source=Path("generated.yaml"))
    dumped = spec.model_dump(mode="json")
    assert _round_trip(spec) == dumped
    assert dumped["certify"]["beta"] == beta
    assert [t["target"] for t in dumped["tasks"]] == targets


# ---------------------------------------------------------------- bad specs

GOOD: dict[str, Any] = {"model": "model.onnx", "data": {"name": "digits"}}

# name -> (document, key path the message must name, pattern the message must match)
BAD_SPECS: dict[str, tuple[Any, str, str]] = {
    "unknown top-level key": ({**GOOD, "colour": 1}, "colour", "unknown key"),
    "unknown nested key": ({**GOOD, "search": {"foo": 1}}, "search.foo", "unknown key"),
    "unknown task key": ({**GOOD, "tasks": [{"bar": 1}]}, "tasks.0.bar", "unknown key"),
    "missing model": ({"data": {"name": "digits"}}, "model", "missing key"),
    "missing data": ({"model": "model.onnx"}, "data", "missing key"),
    "missing data name": ({**GOOD, "data": {"split": "test"}}, "data.name", "missing key"),
    "beta too large": ({**GOOD, "certify": {"beta": 0.7}}, "certify.beta", r"0\.5.*0\.7"),
    "target above 1": ({**GOOD, "tasks": [{"target": 1.5}]}, "tasks.0.target", r"1\.5"),
    "target acc plus": (
        {**GOOD, "tasks": [{"target": "acc + 0.1"}]},
        "tasks.0.target",
        r"acc - δ.*acc \+ 0\.1",
    ),
    "negative iterations": ({**GOOD, "search": {"iterations": -1}}, "search.iterations", "-1"),
    "wrong type": (
        {**GOOD, "search": {"iterations": "lots"}},
        "search.iterations",
        "integer.*lots",
    ),
    "section not a mapping": ({**GOOD, "certify": 5}, "certify", "dictionary"),
    "bad literal in a union": (
        {**GOOD, "search": {"target_slack": "often"}},
        "search.target_slack",
        "often",
    ),
    "duplicate task names": (
        {**GOOD, "tasks": [{"name": "a"}, {"name": "a"}]},
        "tasks",
        "unique",
    ),
    "no tasks": ({**GOOD, "tasks": []}, "tasks", "at least one"),
}


def _key_named(message: str, key: str) -> bool:
    """The message names exactly this key path (not a longer one such as `key.float`)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.\[])", message) is not None


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_names_file_and_key(tmp_path: Path, case: str) -> None:
    document, key, pattern = BAD_SPECS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert _key_named(message.removeprefix(f"{path}: "), key), f"{key!r} not named: {message}"
    assert re.search(pattern, message), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("- model.onnx\n- digits\n", "mapping"),
        ("just a string\n", "mapping"),
        ("", "mapping"),
        ("model: [unclosed\ndata: {name: digits}\n", r"not valid YAML at line 2, column \d+"),
        ("model: a\n  data: b\n", r"not valid YAML at line 2"),
    ],
    ids=["list", "scalar", "empty", "unclosed bracket", "bad indent"],
)
def test_malformed_yaml_names_the_file(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match=pattern) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_spec_file_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(SpecError, match="not found") as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ")


def test_parse_spec_rejects_a_non_mapping() -> None:
    with pytest.raises(SpecError, match="^inline.yaml: expected a mapping"):
        parse_spec(["model"], source=Path("inline.yaml"))


def _minimal(**search: Any) -> dict[str, Any]:
    return {"model": "m.onnx", "data": {"name": "digits"}, "search": search}


def test_linear_search_proves_with_best_unless_told_otherwise(tmp_path: Path) -> None:
    implicit = parse_spec(_minimal(bound="linear"), source=tmp_path / "s.yaml")
    assert implicit.certify.method == "best"
    raw = _minimal(bound="linear") | {"certify": {"method": "ibp"}}
    explicit = parse_spec(raw, source=tmp_path / "s.yaml")
    assert explicit.certify.method == "ibp"
    assert parse_spec(_minimal(), source=tmp_path / "s.yaml").certify.method == "ibp"


def test_linear_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"search\.linear\.every"):
        parse_spec(_minimal(bound="linear", linear={"every": 0}), source=tmp_path / "s.yaml")
    with pytest.raises(SpecError, match=r"search\.linear\.slopes"):
        parse_spec(_minimal(linear={"slopes": "magic"}), source=tmp_path / "s.yaml")
