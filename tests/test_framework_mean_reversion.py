"""Mean-reversion framework test (lipverify.framework.mean_reversion) on synthetic seed panels with
known structure, and a smoke run of the CLI on a tiny sweep.

Synthetic model (per seed, one row of the panel): ``x_{t+1} = x_t + D_t + kick_t`` with the drift
``D_t = -kappa (x_t - m_t) + (m_{t+1} - m_t)`` (an OU process around a common trend m_t) and
``kick_t = sigma xi_t``. kappa = 0 is the random walk Theorem 17 describes (ratio 1, slope 0, no
kick-drift correlation). Fixed seeds; every assertion is an interval statement at a stated level.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from lipverify._validation import LipverifyError
from lipverify.framework.mean_reversion import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    SeedPanel,
    analyse_panel,
    compare_lr,
    linear_response_rows,
    material_slope,
    ou_lag_correlation,
    ou_ratio,
    panel_from_records,
)

KAPPA, SIGMA, T = 0.1, 0.05, 60


def ou_panel(kappa, seeds, steps=T, sigma=SIGMA, lr=0.05, seed=0, stationary=False, leak=0.0):
    """OU / random-walk panel. ``stationary``: x_0 drawn from the stationary law (for the lag
    correlations). ``leak``: the drift also sees this fraction of the same step's kick (a broken
    kick definition: the lag-0 control must catch it)."""
    rng = np.random.default_rng(seed)
    trend = 0.02 * np.arange(steps + 1)
    x = np.zeros((seeds, steps + 1))
    if stationary and kappa > 0:
        x[:, 0] = sigma / np.sqrt(1 - (1 - kappa) ** 2) * rng.standard_normal(seeds)
    kick = sigma * rng.standard_normal((seeds, steps))
    drift = np.zeros((seeds, steps))
    for t in range(steps):
        drift[:, t] = -kappa * (x[:, t] - trend[t]) + (trend[t + 1] - trend[t]) + leak * kick[:, t]
        x[:, t + 1] = x[:, t] + drift[:, t] + kick[:, t]
    return SeedPanel(x, np.full((seeds, steps), sigma**2), drift, kick, lr)


def _inside(value, ci):
    return ci[0] <= value <= ci[1]


# --------------------------------------------------------------------------- (a), (b): OU vs random walk
def test_ou_slope_is_minus_kappa_and_ratio_below_one():
    res = analyse_panel(ou_panel(KAPPA, 256), confidence=0.99, resamples=400)
    assert _inside(-KAPPA, res.slope["ci"])
    assert not _inside(0.0, res.slope["ci"])  # wrong variant: the random walk's slope
    assert res.verdict == FAIL and "mean reversion" in res.message
    last = res.ratio[-1]
    assert last["step"] == T
    # OU theory from x_0 = 0: std / sqrt(Phi_T) = sqrt((1 - (1-k)^2T) / ((1 - (1-k)^2) T)) ~ 0.30
    assert _inside(float(ou_ratio(KAPPA, T)), last["ci"]) and last["ci"][1] < 1
    for w in res.slope["windows"]:
        assert _inside(-KAPPA, w["ci"])


def test_random_walk_slope_zero_ratio_one_and_not_reverting():
    """kappa = 0: slope 0, ratio 1; passing random-walk data as reverting (slope -kappa) is rejected.
    1024 seeds make the 99% interval (half-width ~2.6 x 0.75e-3) fit inside the materiality band
    +-3.7e-3 of T = 60 unless the estimate is > 1.5 standard errors off."""
    res = analyse_panel(ou_panel(0.0, 1024, seed=1), lags=(1,), windows=1, confidence=0.99, resamples=400)
    assert _inside(0.0, res.slope["ci"])
    assert not _inside(-KAPPA, res.slope["ci"])
    assert res.verdict == PASS
    assert _inside(1.0, res.ratio[-1]["ci"])
    assert res.slope["material"] == pytest.approx(material_slope(T))
    assert ou_ratio(material_slope(T), T) == pytest.approx(0.9)


def test_too_few_seeds_for_the_band_is_inconclusive():
    # 16 seeds: the interval is wider than the materiality band, neither pass nor fail
    res = analyse_panel(ou_panel(0.0, 16, seed=2), lags=(1,), windows=1, confidence=0.99, resamples=400)
    assert res.verdict == INCONCLUSIVE


# --------------------------------------------------------------------------- (c): lag correlations
def test_lag_correlations_of_the_ou_structure():
    """Stationary OU, D = -kappa x: corr(kick_s, D_{s+k}) = -(1-kappa)^(k-1) sqrt(1-(1-kappa)^2), 0 at
    k = 0. Checked at 99.9% per lag (6 lags: family level > 99%); the no-feedback value 0 is rejected."""
    panel = ou_panel(KAPPA, 512, T + 20, seed=3, stationary=True)
    res = analyse_panel(panel, windows=1, confidence=0.999, resamples=400)
    by_lag = {row["lag"]: row for row in res.lags}
    assert set(by_lag) == {0, 1, 2, 5, 10, 20}
    for k, row in by_lag.items():
        assert _inside(ou_lag_correlation(KAPPA, k), row["ci"]), (k, row)
        if k in (1, 2, 5, 10):
            assert not _inside(0.0, row["ci"]), (k, row)
    # wrong variant: a reversion three times faster predicts other correlations
    assert not _inside(ou_lag_correlation(3 * KAPPA, 1), by_lag[1]["ci"])


def test_lag0_control_catches_a_kick_that_leaks_into_the_drift():
    res = analyse_panel(
        ou_panel(KAPPA, 256, seed=4, leak=-0.5), lags=(0,), windows=1, confidence=0.99, resamples=400
    )
    lag0 = next(row for row in res.lags if row["lag"] == 0)
    assert not _inside(0.0, lag0["ci"])
    assert res.verdict == INCONCLUSIVE and "lag-0 control" in res.message


def test_random_walk_lag_correlations_are_zero():
    res = analyse_panel(ou_panel(0.0, 256, seed=5), lags=(1, 5), confidence=0.99, resamples=400)
    # D has no spread across seeds (it is the common trend): no correlation is defined
    assert all(row["ci"] is None for row in res.lags)
    noisy = ou_panel(0.0, 256, seed=5)
    noisy.drift = noisy.drift + 0.01 * np.random.default_rng(6).standard_normal(noisy.drift.shape)
    res = analyse_panel(noisy, lags=(1, 5), confidence=0.99, resamples=400)
    assert all(_inside(0.0, row["ci"]) for row in res.lags)


# --------------------------------------------------------------------------- (d): lr -> 0
def test_compare_lr_separates_continuous_time_from_discretisation():
    """lr 0.05, kappa 0.1 per step; at lr 0.025 (T doubled, per-step noise variance halved) a
    continuous-time reversion has kappa 0.05 per step (same rate kappa/lr = 2), a discretisation
    effect that is O(lr) per unit time has rate 1 (kappa 0.025 per step)."""
    big = analyse_panel(ou_panel(KAPPA, 256, seed=7), lags=(1,), confidence=0.99, resamples=400)
    cont = ou_panel(KAPPA / 2, 256, 2 * T, SIGMA / np.sqrt(2), lr=0.025, seed=8)
    disc = ou_panel(KAPPA / 4, 256, 2 * T, SIGMA / np.sqrt(2), lr=0.025, seed=8)
    c = compare_lr(big, analyse_panel(cont, lags=(2,), confidence=0.99, resamples=400, seed=1), 0.99)
    d = compare_lr(big, analyse_panel(disc, lags=(2,), confidence=0.99, resamples=400, seed=1), 0.99)
    assert c["outcome"] == "continuous-time" and _inside(1.0, c["rate_ratio_ci"])
    assert d["outcome"] == "discretisation" and _inside(0.5, d["rate_ratio_ci"])
    rw = analyse_panel(ou_panel(0.0, 256, seed=9), lags=(1,), confidence=0.99, resamples=400)
    assert compare_lr(rw, analyse_panel(cont, lags=(2,), resamples=400), 0.99)["outcome"] == "no effect"


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused():
    good = ou_panel(KAPPA, 8, 5)
    with pytest.raises(LipverifyError, match=">= 3 sampling seeds"):
        SeedPanel(good.log_k[:2], good.phi_bar_sq[:2], good.drift[:2], good.kick[:2], 0.05)
    with pytest.raises(LipverifyError, match="shape"):
        SeedPanel(good.log_k, good.phi_bar_sq[:, :3], good.drift, good.kick, 0.05)
    bad = good.log_k.copy()
    bad[1, 3] = np.nan
    with pytest.raises(LipverifyError, match="log_k is not finite at seed row 1, step 3"):
        SeedPanel(bad, good.phi_bar_sq, good.drift, good.kick, 0.05)
    with pytest.raises(LipverifyError, match="lr"):
        SeedPanel(good.log_k, good.phi_bar_sq, good.drift, good.kick, 0.0)
    with pytest.raises(LipverifyError, match="resamples"):
        analyse_panel(good, resamples=10)


def _records(n=3, steps=4, mu_full=True, other=None):
    recs = []
    for i in range(n):
        series = {
            "step": list(range(steps + 1)),
            "log_bound": [0.1 * t + 0.01 * i for t in range(steps + 1)],
            "net_phi_sq": [1e-4] * steps + [float("nan")],
            "net_psi": [0.0] * steps + [float("nan")],
            "fc1.sigma": [2.0] * (steps + 1),
            "fc1.mu": [0.01 * (i + 1)] * steps + [float("nan")],
            "fc1.mu_full": ([0.01] if mu_full else [float("nan")]) * steps + [float("nan")],
        }
        config = {"lr": 0.05, "seed_sampling": i, "batch_size": other if (other and i == 1) else 16}
        recs.append({"name": f"r{i}", "config": config, "series": series})
    return recs


def test_records_to_panel():
    panel = panel_from_records(_records())
    # kick = sum_l (mu_l - mu_full_l) / sigma_l
    assert panel.kick[2, 0] == pytest.approx((0.03 - 0.01) / 2.0)
    assert panel.drift[0, 0] == pytest.approx(0.005)
    with pytest.raises(LipverifyError, match="full_gradient_every = 1"):
        panel_from_records(_records(mu_full=False))
    with pytest.raises(LipverifyError, match="more than seed_sampling"):
        panel_from_records(_records(other=32))
    with pytest.raises(LipverifyError, match="kick must be"):
        panel_from_records(_records(), kick="other")


# --------------------------------------------------------------------------- CLI smoke
def test_cli_smoke_on_a_tiny_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lipverify.cli"]
    proc = subprocess.run(
        [*cmd, "sweep", "experiments/framework_mean_reversion.toml", "--smoke", "--out", str(sweep)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = tmp_path / "mr"
    proc = subprocess.run(
        [*cmd, "framework", "mean-reversion", str(sweep), "--resamples", "100", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 1, 3), proc.stderr
    saved = json.loads((out / "results.json").read_text())
    assert {"pass": 0, "fail": 1, "inconclusive": 3}[saved["verdict"]] == proc.returncode
    assert saved["settings"]["seeds"] == 4 and saved["settings"]["steps"] == 6
    assert len(saved["ratio"]) == 6 and (out / "mean_reversion.png").is_file()
    assert "corr(kick_s, D_s+1" in proc.stdout
    # the error paths in-process (no second interpreter start)
    from lipverify.cli import main

    assert main(["framework", "mean-reversion", str(sweep), "--small-lr", str(sweep), "--out", str(out)]) == 2
    assert "--small-lr sweep has lr" in capsys.readouterr().err
    assert main(["framework", "mean-reversion", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


class _Predictions:
    """Duck-typed linear-response result: Theorem 17 exact for a random walk (sigma sqrt t), an
    'adjoint' evaluated at even steps only (NaN elsewhere), for the given lr and steps."""

    PREDICTIONS = ("theorem17", "adjoint")

    def __init__(self, lr, steps):
        self.settings = {"lr": lr, "steps": steps}
        t = np.arange(steps + 1, dtype=float)
        every_other = np.where(t % 2 == 0, 2 * SIGMA * np.sqrt(t), np.nan)
        self._std = {"theorem17": SIGMA * np.sqrt(t), "adjoint": every_other}

    def prediction(self, name):
        return self._std[name]


def test_linear_response_predictions_beside_the_empirical_spread():
    """A random walk's spread is sigma sqrt(t): Theorem 17's ratio is 1 within the chi-square
    spread of 512 seeds at every step; a prediction 2x too large reads 2; steps where a prediction
    was not evaluated leave it out; predictions for another lr or horizon are refused."""
    n = 512
    result = analyse_panel(ou_panel(0.0, n, seed=3), resamples=200)
    rows = linear_response_rows(result, _Predictions(0.05, T))
    assert [r["step"] for r in rows] == list(range(1, T + 1))
    for r in rows:
        assert abs(r["theorem17_ratio"] - 1) < 4 / math.sqrt(2 * (n - 1))  # 4 sd of the sample std's ratio
        assert ("adjoint_ratio" in r) == (r["step"] % 2 == 0)
        if r["step"] % 2 == 0:
            assert abs(r["adjoint_ratio"] - 2) < 8 / math.sqrt(2 * (n - 1))
    with pytest.raises(LipverifyError, match=r"predictions are for lr = 0\.1"):
        linear_response_rows(result, _Predictions(0.1, T))
