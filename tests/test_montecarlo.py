"""Monte Carlo estimators: intervals, variance standard error, slopes, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from lipverify._validation import LipverifyError
from lipverify.montecarlo import Estimate, log_log_slope, mean, std, variance, z_for_level


def test_z_for_level():
    assert z_for_level(0.95) == pytest.approx(1.959963985, rel=1e-8)
    with pytest.raises(LipverifyError, match="confidence level"):
        z_for_level(1.5)


def test_mean_interval_coverage():
    """400 replications of n = 200 normal samples: the 95% interval covers the truth in a
    fraction within the binomial 4-sigma band 0.95 +- 4 sqrt(0.95 0.05 / 400) (+- 0.044)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 200, generator=g, dtype=torch.float64) * 2.0 + 1.0
    cover = sum(mean(row).contains(1.0, level=0.95) for row in x) / 400
    assert abs(cover - 0.95) <= 4 * math.sqrt(0.95 * 0.05 / 400)


def test_variance_stderr_matches_the_spread_of_sample_variances():
    """Exponential(1) samples (Var = 1, m4 = 9): the predicted se of s^2 against the empirical
    std over R = 400 replications; the empirical std has relative error ~ sqrt(kurt(s^2)-1)/(2 sqrt R)
    < 0.1, so the ratio must lie in 1 +- 0.3 (3 such errors)."""
    g = torch.Generator().manual_seed(1)
    x = -torch.log(torch.rand(400, 500, generator=g, dtype=torch.float64))
    ests = [variance(row) for row in x]
    predicted = sum(e.stderr for e in ests) / len(ests)
    empirical = float(torch.tensor([e.value for e in ests]).std())
    assert predicted / empirical == pytest.approx(1.0, abs=0.3)
    theory = math.sqrt((9 - 1 * (500 - 3) / (500 - 1)) / 500)
    assert predicted == pytest.approx(theory, rel=0.2)
    assert abs(sum(e.value for e in ests) / 400 - 1.0) < 4 * empirical / 20


def test_std_delta_method():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    s = std(x)
    assert s.contains(3.0)
    assert s.stderr == pytest.approx(3 / math.sqrt(2 * 10000), rel=0.1)


def test_non_finite_samples_are_refused_by_name():
    x = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    with pytest.raises(LipverifyError, match=r"K_T: 2 of 4 samples are non-finite \(first at index 1\)"):
        mean(x, "K_T")
    with pytest.raises(LipverifyError, match="at least 2 samples"):
        variance(torch.tensor([1.0]))


def test_log_log_slope_exact_and_error_bound():
    h = [0.1, 0.05, 0.025, 0.0125]
    slope, se = log_log_slope(h, [3 * t**1.5 for t in h], [0.0] * 4)
    assert slope == pytest.approx(1.5, abs=1e-12) and se == 0.0
    _, se = log_log_slope(h, [3 * t**1.5 for t in h], [0.1] * 4)
    # sum |w_i| * 0.1 with w_i = c_i / sum c_j^2, c = centred log h
    c = torch.log(torch.tensor(h)) - torch.log(torch.tensor(h)).mean()
    assert se == pytest.approx(float((c.abs() / (c * c).sum()).sum() * 0.1))


def test_estimate_z_score_and_difference():
    e = Estimate(1.0, 0.1, 100)
    assert e.z_score(1.3) == pytest.approx(3.0)
    assert e.z_score(1.3, bias=0.2) == pytest.approx(1.0)
    d = e - Estimate(0.5, 0.1, 50)
    assert d.value == pytest.approx(0.5) and d.stderr == pytest.approx(math.sqrt(0.02))


def test_variance_and_std_standard_errors_exactly():
    """x = (0, 1, 2, 3, 9): mean 3, centred (-3, -2, -1, 0, 6), sum c^2 = 50, sum c^4 = 1394.
    s^2 = 50 / 4 = 12.5, m4 = 1394 / 5 = 278.8, Var[s^2] ~ (m4 - s^4 (n-3)/(n-1)) / n
    = (278.8 - 156.25 * 2 / 4) / 5 = 200.675 / 5 = 40.135; se(s) = se(s^2) / (2 s)."""
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 9.0], dtype=torch.float64)
    v = variance(x)
    assert v.n == 5
    assert v.value == pytest.approx(12.5, rel=1e-15)
    assert v.stderr == pytest.approx(math.sqrt(40.135), rel=1e-14)
    s = std(x)
    assert s.value == pytest.approx(math.sqrt(12.5), rel=1e-15)
    assert s.stderr == pytest.approx(math.sqrt(40.135) / (2 * math.sqrt(12.5)), rel=1e-14)
    # n = 3 drops the s^4 term; a constant sample has zero variance and zero standard error
    assert variance(torch.tensor([1.0, 2.0, 6.0])).stderr == pytest.approx(
        math.sqrt((((-2) ** 4 + (-1) ** 4 + 3**4) / 3) / 3), rel=1e-14
    )
    assert variance(torch.tensor([2.0, 2.0, 2.0, 2.0])) == Estimate(0.0, 0.0, 4)
