"""The finite-sample certificate: confidence bounds and the certified-sample count."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from verifier.certify import (
    certify_task,
    clopper_pearson_lower,
    hoeffding_lower,
    required_rate,
)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (370, 400), (400, 400), (9_000, 10_000)])
@pytest.mark.parametrize("beta", [1e-3, 0.05])
def test_clopper_pearson_equals_scipy(k: int, n: int, beta: float) -> None:
    expected = 0.0 if k == 0 else stats.beta.ppf(beta, k, n - k + 1)
    assert clopper_pearson_lower(k, n, beta) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if k > 0:
        ci = stats.binomtest(k, n, alternative="greater").proportion_ci(1 - beta, method="exact")
        assert clopper_pearson_lower(k, n, beta) == pytest.approx(ci.low, rel=1e-9)


def test_hoeffding_is_looser_than_clopper_pearson() -> None:
    k, n, beta = 380, 400, 1e-3
    assert hoeffding_lower(k, n, beta) == pytest.approx(k / n - math.sqrt(math.log(1e3) / 800))
    assert hoeffding_lower(k, n, beta) < clopper_pearson_lower(k, n, beta)


def test_required_rate_is_the_smallest_rate_meeting_the_target() -> None:
    rate = required_rate(0.85, 400, 1e-3, "clopper-pearson")
    k = round(rate * 400)
    assert clopper_pearson_lower(k, 400, 1e-3) >= 0.85
    assert clopper_pearson_lower(k - 1, 400, 1e-3) < 0.85


def test_balanced_certificate_uses_a_union_bound_over_classes() -> None:
    y = torch.tensor([0] * 50 + [1] * 150)
    certified = torch.ones(200, dtype=torch.bool)
    certified[:5] = False
    cert = certify_task(
        certified,
        y,
        task="t",
        metric="balanced_accuracy",
        target=0.5,
        beta=0.01,
        bound_kind="clopper-pearson",
        method="ibp",
    )
    expected = (clopper_pearson_lower(45, 50, 0.005) + clopper_pearson_lower(150, 150, 0.005)) / 2
    assert cert.lower_bound == pytest.approx(expected)
    assert cert.holds and cert.k == 195 and cert.n == 200
