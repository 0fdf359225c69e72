"""The certification ladder (issue 23: no hand-tuned slack, unattainable targets explained).

Properties: scaled candidates are nested about θ0 and respect the outer box and max_width; the
bisection keeps the widest candidate that holds and certifies few of them; the union bound over
m candidates at beta/m keeps the simultaneous miss rate under beta (simulated binomials); a
target the held-out data cannot certify ends the run with exit 1 and an explanation before any
search, writing nothing; a run records its ladder and `verifier verify` recomputes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_cli_pipeline import invoke, write_spec
from verifier.certify import (
    TaskCertificate,
    clopper_pearson_lower,
    proportion_lower,
    required_rate,
)
from verifier.cli import ExitCode
from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.ladder import LadderResult, Rung, climb, lid_warnings, samples_needed, scale_domain


def _box(seed: int = 0) -> tuple[Box, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    theta0 = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    lower = {n: t - torch.rand(t.shape, generator=gen) * 0.1 for n, t in theta0.items()}
    upper = {n: t + torch.rand(t.shape, generator=gen) * 0.1 for n, t in theta0.items()}
    return Box(lower, upper), theta0


def _inside(inner: Box, outer: Box) -> bool:
    return all(
        bool((inner.lower[n] >= outer.lower[n]).all() and (inner.upper[n] <= outer.upper[n]).all())
        for n in inner.lower
    )


def _cert(holds: bool, k: int = 5) -> TaskCertificate:
    return TaskCertificate(
        "t", "accuracy", 0.5, 10, k, 0.001, "clopper-pearson", 0.1, holds, "ibp", 0
    )


def test_scales_are_nested_about_theta0() -> None:
    box, theta0 = _box()
    point = Box(theta0, theta0)
    previous = point
    for scale in (0.25, 0.5, 1.0, 2.0, 4.0):
        candidate = scale_domain(box, theta0, scale)
        assert isinstance(candidate, Box)
        assert _inside(previous, candidate) and _inside(point, candidate)
        previous = candidate
    same = scale_domain(box, theta0, 1.0)
    assert all(torch.equal(same.lower[n], box.lower[n]) for n in box.lower)


def test_growth_stays_in_the_outer_box_and_max_width() -> None:
    box, theta0 = _box(1)
    outer = Box(
        {n: v - 0.15 for n, v in box.lower.items()}, {n: v + 0.02 for n, v in box.upper.items()}
    )
    grown = scale_domain(box, theta0, 8.0, outer=outer, max_width=0.25)
    assert isinstance(grown, Box)
    assert _inside(grown, outer) and _inside(box, grown)
    widths = torch.cat([w.flatten() for w in grown.widths().values()])
    original = torch.cat([w.flatten() for w in box.widths().values()])
    assert bool((widths <= torch.clamp(original, min=0.25) + 1e-6).all())
    assert float(widths.sum()) > float(original.sum())  # it did grow where it could


def test_zonotope_scales_box_and_generators() -> None:
    box, theta0 = _box(2)
    gens = {n: 0.01 * torch.ones(2, *t.shape) for n, t in theta0.items()}
    zono = Zonotope(box.lower, box.upper, gens)
    half = scale_domain(zono, theta0, 0.5)
    assert isinstance(half, Zonotope)
    assert all(torch.allclose(half.generators[n], 0.5 * gens[n]) for n in gens)
    assert _inside(half.interval_hull(), zono.interval_hull())
    with pytest.raises(ValueError):
        scale_domain(zono, theta0, 2.0, max_width=1.0)


@pytest.mark.parametrize("threshold", [5.0, 1.5, 1.0, 0.7, 0.3, 0.05])
def test_climb_keeps_the_widest_candidate_that_holds(threshold: float) -> None:
    box, theta0 = _box(3)
    scales = (4.0, 2.0, 1.414, 1.0, 0.707, 0.5, 0.25, 0.125)
    seen: list[float] = []

    def certify(candidate: Box | Zonotope) -> list[TaskCertificate]:
        assert isinstance(candidate, Box)
        scale = float((candidate.upper["b"] - theta0["b"]).sum()) / float(
            (box.upper["b"] - theta0["b"]).sum()
        )
        seen.append(scale)
        return [_cert(scale <= threshold + 1e-6)]

    result = climb(box, theta0, scales, certify)
    holding = [c for c in scales if c <= threshold]
    if holding:
        assert result.chosen.holds and result.chosen.scale == max(holding)
    else:  # none holds: the narrowest, with its failing certificate
        assert not result.chosen.holds and result.chosen.scale == min(scales)
    assert len(seen) <= math.ceil(math.log2(len(scales))) + 2
    assert {r.scale for r in result.tried} <= set(scales)
    assert all(r.holds == (r.scale <= threshold) for r in result.tried)
    assert seen[0] == pytest.approx(1.0, rel=1e-5)  # bisection starts at the search result


def test_union_bound_over_the_ladder_holds_by_simulation() -> None:
    """m candidates with true rates p_i, each bound at beta/m: the chance that any bound
    exceeds its p_i stays under beta (simulated, beta = 0.2 to see misses at all)."""
    rng = np.random.default_rng(0)
    n, m, beta, draws = 200, 8, 0.2, 3000
    p = np.linspace(0.80, 0.95, m)
    k = rng.binomial(n, p, size=(draws, m))
    misses = 0
    for row in k:
        bounds = [clopper_pearson_lower(int(ki), n, beta / m) for ki in row]
        misses += any(b > pi for b, pi in zip(bounds, p, strict=True))
    assert misses / draws <= beta  # union bound (its miss rate is far below beta in practice)
    # and without the correction the same choice misses more often than beta / m would allow
    naive = sum(
        any(clopper_pearson_lower(int(ki), n, beta) > pi for ki, pi in zip(row, p, strict=True))
        for row in k
    )
    assert naive > misses


@pytest.mark.parametrize(
    ("target", "n", "beta"),
    [(0.85, 399, 0.001), (0.9, 72, 1e-4), (0.5, 30, 0.05), (0.99, 50, 0.01)],
)
def test_required_rate_bisection_matches_a_scan(target: float, n: int, beta: float) -> None:
    scan = next(
        (k / n for k in range(n + 1) if proportion_lower(k, n, beta, "clopper-pearson") >= target),
        1.0 + 1.0 / n,
    )
    assert required_rate(target, n, beta, "clopper-pearson") == scan


def test_samples_needed_reaches_the_target() -> None:
    need = samples_needed(0.8577, 0.9777, 1e-3 / 12, "clopper-pearson")
    assert need is not None
    assert proportion_lower(math.floor(0.9777 * need), need, 1e-3 / 12, "clopper-pearson") >= (
        0.8577
    )
    assert proportion_lower(math.floor(0.9777 * 72), 72, 1e-3 / 12, "clopper-pearson") < 0.8577
    assert samples_needed(0.9, 0.9, 0.001, "clopper-pearson") is None


def test_zero_width_lid_is_never_silent() -> None:
    box, theta0 = _box(4)
    point = Box(theta0, theta0)
    rung = Rung(1.0, point, [_cert(True)])
    warnings = lid_warnings(point, LadderResult((1.0,), rung, [rung]))
    assert any("zero width" in w for w in warnings)
    wide = Rung(1.0, box, [_cert(True)])
    assert lid_warnings(box, LadderResult((1.0,), wide, [wide])) == []


def test_unattainable_target_exits_1_before_the_search(tmp_path: Path) -> None:
    # 40 held-out samples at beta = 0.001 / 12 cannot certify accuracy 0.9 on this MLP
    spec = write_spec(
        tmp_path,
        tasks=[{"name": "digits", "metric": "accuracy", "target": 0.9}],
        certify={"beta": 0.001, "n_samples": 40},
    )
    out = tmp_path / "out"
    result = invoke("lid", spec, "-o", out)
    assert result.exit_code == ExitCode.SPEC_NOT_MET, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("not certifiable: task 'digits': τ = 0.9000")
    assert "40 held-out samples" in message and "held-out samples certified" in message
    assert "searching" not in result.stderr  # explained before any search
    assert not (out / "lid.safetensors").exists() and not (out / "certificate.json").exists()


def test_run_records_its_ladder_and_verify_recomputes_it(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, certify={"beta": 0.001, "ladder": {"targets": 2}})
    out = tmp_path / "out"
    result = invoke("lid", spec, "-o", out)
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads((out / "certificate.json").read_text())
    ladder = doc["ladder"]
    assert ladder["m"] == 2 * len(ladder["scales"]) == 8
    task = doc["tasks"][0]
    assert task["beta"] == pytest.approx(0.001 / 8)
    chosen = [
        r
        for r in ladder["tried"]
        if r["scale"] == ladder["chosen_scale"] and r["search"] == ladder["chosen_search"]
    ]
    assert len(chosen) == 1 and chosen[0]["k"] == [task["k"]] and chosen[0]["holds"]
    assert chosen[0]["mean_width"] == pytest.approx(doc["lid"]["mean_width"])
    # the kept candidate is the widest that holds among those certified
    holding = [r["mean_width"] for r in ladder["tried"] if r["holds"]]
    assert chosen[0]["mean_width"] == pytest.approx(max(holding))
    assert task["search_target"] == pytest.approx(chosen[0]["search_targets"][0])
    assert "ladder: scale" in result.output
    check = invoke("verify", out)
    assert check.exit_code == ExitCode.OK, check.output
