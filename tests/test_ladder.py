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
from verifier.ladder import (
    FixedSequence,
    LadderResult,
    Rung,
    lid_warnings,
    samples_needed,
    scale_domain,
)


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


def _fixed_sequence(threshold: float, seen: list[float]) -> tuple[FixedSequence, Box, dict]:
    """A sequence whose candidates hold when their width (relative to `box`) <= threshold."""
    box, theta0 = _box(3)
    reference = float((box.upper["b"] - box.lower["b"]).sum())

    def relative(candidate: Box | Zonotope) -> float:
        assert isinstance(candidate, Box)
        return float((candidate.upper["b"] - candidate.lower["b"]).sum()) / reference

    def certify(candidate: Box | Zonotope) -> list[TaskCertificate]:
        seen.append(relative(candidate))
        return [_cert(relative(candidate) <= threshold + 1e-6)]

    scales = (1.0, 0.7937, 0.63, 0.5, 0.3969)
    return FixedSequence(theta0, scales, certify, relative, searches=3), box, theta0


@pytest.mark.parametrize("threshold", [5.0, 1.5, 1.0, 0.7, 0.45, 0.2])
def test_fixed_sequence_stops_at_the_first_miss_and_keeps_the_widest(threshold: float) -> None:
    seen: list[float] = []
    sequence, box, theta0 = _fixed_sequence(threshold, seen)
    for search, grow in enumerate((1.0, 1.5, 1.2)):  # three searches: wider, then narrower
        sequence.offer(box.scaled(theta0, grow), search, (0.9 - 0.01 * search,))
        if sequence.stopped:
            break
    result = sequence.result()
    # candidates were certified narrowest first, each wider than every one accepted before
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    # the sequence ends at the first miss, or after every candidate of every search
    assert [r.holds for r in result.tried] == [True] * (len(seen) - sequence.stopped) + [
        False
    ] * sequence.stopped
    if threshold < 0.3969 - 1e-6:  # even the first candidate misses: written, failing
        assert not result.chosen.holds and result.chosen is result.tried[0]
    else:
        assert result.chosen.holds
        assert seen[len(result.tried) - 1 - sequence.stopped] == pytest.approx(
            max(r for r in seen if r <= threshold + 1e-6)
        )
    # the third search (scaled 1.2) is no wider than the second's widest candidate, so after
    # a second search accepted at full scale it has nothing wider to offer
    if any(r.search == 1 and r.scale == 1.0 and r.holds for r in result.tried):
        assert all(r.search < 2 for r in result.tried)


def test_fixed_sequence_controls_false_acceptance_by_simulation() -> None:
    """Ordered candidates with true rates p_i, each tested at beta in order until the first
    miss: the chance that any accepted candidate has p_i < τ stays under beta, although no
    test was made at beta / m (beta = 0.2 to see misses at all)."""
    rng = np.random.default_rng(1)
    n, beta, tau, draws = 200, 0.2, 0.85, 3000
    p = np.array([0.95, 0.92, 0.89, 0.86, 0.84, 0.83, 0.80])  # narrower boxes certify more
    false = 0
    for _ in range(draws):
        for pi in p:
            k = rng.binomial(n, pi)
            if clopper_pearson_lower(int(k), n, beta) < tau:
                break
            false += pi < tau
            if pi < tau:
                break
    assert false / draws <= beta


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
    assert ladder["procedure"] == "fixed-sequence" and ladder["searches"] == 2
    task = doc["tasks"][0]
    assert task["beta"] == 0.001  # fixed-sequence testing: every candidate at the full beta
    tried = ladder["tried"]
    widths = [r["mean_width"] for r in tried]
    assert widths == sorted(widths)  # narrowest first, each wider than those accepted
    assert all(r["holds"] for r in tried[:-1])  # it stops at the first miss
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
