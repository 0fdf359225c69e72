"""Reshaping the searched box (`search.reshape`, verifier/search/reshape.py): the reshaped box
is larger by the size measure, proved feasible in float64, respects frozen entries and the
outer box, and what it certifies holds for networks sampled inside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from verifier import load_model
from verifier.certify import certify_samples
from verifier.data import load_dataset
from verifier.domains import Box
from verifier.search import SearchTask, hard_metrics, search_lid
from verifier.search.reshape import _moved
from verifier.spec import ReshapeSection, SearchSection

ROOT = Path(__file__).resolve().parents[1]


def _task() -> tuple[SearchTask, torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", split="test")
    x, y = data.x, data.y
    task = SearchTask("digits", "accuracy", 0.85, x[:200], y[:200], x[200:300], y[200:300])
    return task, x[300:], y[300:]


def _config(
    rounds: int, bound: str = "ibp", costs: str = "search", **extra: object
) -> SearchSection:
    return SearchSection(
        iterations=30,
        batch_size=200,
        lr=1.0,
        size="layer_log_width",
        bound=bound,
        reshape=ReshapeSection(rounds=rounds, costs=costs),
        **extra,
    )


@pytest.mark.parametrize(
    ("bound", "costs"), [("ibp", "search"), ("linear", "search"), ("linear", "ibp")]
)
def test_reshaping_widens_the_box_and_keeps_it_feasible(bound: str, costs: str) -> None:
    graph = load_model(ROOT / "onnx_models" / "digits_mlp.onnx")
    task, x_held, y_held = _task()
    names = list(graph.parameters)
    plain = search_lid(graph, [task], _config(0, bound), names=names)
    reshaped = search_lid(graph, [task], _config(4, bound, costs), names=names)
    assert plain.feasible and reshaped.feasible
    assert "reshaped (round" in reshaped.chosen, reshaped.chosen
    assert reshaped.box.size("layer_log_width") > plain.box.size("layer_log_width") + 0.1
    method = "best" if bound == "linear" else "ibp"
    proved = hard_metrics(graph, reshaped.box, [task], method=method)
    assert proved == reshaped.hard and proved[0] >= task.target
    assert reshaped.box.contains(graph.parameters)
    # what the reshaped box certifies on unseen samples, sampled networks classify correctly
    certified, _ = certify_samples(graph, reshaped.box, x_held, y_held, method=method)
    assert int(certified.sum()) > 0
    xs, ys = x_held[certified].double(), y_held[certified]
    gen = torch.Generator().manual_seed(3)
    for kind in ("uniform", "vertex"):
        for theta in reshaped.box.sample(30, generator=gen, kind=kind):
            assert bool((graph.forward(xs, theta).argmax(1) == ys).all())


def test_reshaping_keeps_frozen_entries_and_the_outer_box() -> None:
    graph = load_model(ROOT / "onnx_models" / "digits_mlp.onnx")
    task, _, _ = _task()
    names = list(graph.parameters)
    first = names[0]
    frozen = {first: torch.zeros_like(graph.parameters[first], dtype=torch.bool)}
    frozen[first].view(-1)[::2] = True
    outer = Box(
        {n: t.double() - 0.01 for n, t in graph.parameters.items()},
        {n: t.double() + 0.01 for n, t in graph.parameters.items()},
    )
    result = search_lid(graph, [task], _config(4), names=names, frozen=frozen, outer=outer)
    assert result.feasible and "reshaped (round" in result.chosen
    widths = result.box.widths()
    assert bool((widths[first][frozen[first]] == 0).all())
    for n in names:
        assert bool((result.box.lower[n] >= outer.lower[n]).all())
        assert bool((result.box.upper[n] <= outer.upper[n]).all())


def test_a_round_equalises_the_margin_cost_per_unit_of_size() -> None:
    """Hand-worked KKT step for layer_log_width: q_i = g_i * n_t * w_i; with α = 1 and no
    clamp every positive q moves to the geometric mean; an entry with q = 0 keeps its width."""
    d = {"a": torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)}
    zero = {"a": torch.zeros(3, dtype=torch.float64)}
    g = {"a": torch.tensor([1.0, 4.0, 0.0], dtype=torch.float64)}
    config = SearchSection(
        size="layer_log_width", reshape=ReshapeSection(rounds=1, step=1.0, clamp=100.0)
    )
    lo, hi = _moved(d, zero, g, zero, {"a": 3}, config)
    # q = 3 * [1, 4] (widths 1, 1); geometric mean 6: factors 2 and 1/2; the third keeps 2
    torch.testing.assert_close(lo["a"], torch.tensor([2.0, 0.5, 2.0], dtype=torch.float64))
    assert bool((hi["a"] == 0).all())
    clamped = config.model_copy(update={"reshape": ReshapeSection(rounds=1, step=1.0, clamp=1.5)})
    lo, _ = _moved(d, zero, g, zero, {"a": 3}, clamped)
    torch.testing.assert_close(lo["a"], torch.tensor([1.5, 1 / 1.5, 2.0], dtype=torch.float64))


def test_reshape_on_a_zonotope_is_refused_in_one_line(tmp_path: Path) -> None:
    from verifier.errors import SpecError
    from verifier.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(
        "model: m.onnx\ndata: {name: digits}\ndomain: zonotope\n"
        "tasks: [{name: t, target: 0.9}]\nsearch: {reshape: {rounds: 2}}\n",
        encoding="utf-8",
    )
    with pytest.raises(SpecError, match="search.reshape applies to box LIDs only") as info:
        load_spec(path)
    assert "\n" not in str(info.value)
