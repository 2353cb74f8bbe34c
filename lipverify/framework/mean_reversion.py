"""Mean reversion of ln K across sampling seeds (a framework test beyond the paper; issue 13).

Theorem 17 treats ``mu_bar, psi_bar, phi_bar`` as fixed functions of time, so a noise kick to ln K
stays in the state for ever: across sampling seeds from one initialisation, ``Var ln K_t = Phi_t``
with ``Phi_t = sum_{s<t} phi_bar_s^2`` (Lemma 19, one unit of SDE time per step). If the drift
depends on the state, a kick that raises ln K is pushed back later (mean reversion) and the spread
is smaller. On a panel of n seeds x T steps this module measures:

(a) ``ratio_t = std_seeds(ln K_t) / sqrt(Phi_t)`` at every step (``Phi_t``: the per-run sums
    averaged over seeds), with the two-sided chi-square interval of the std (Gaussian spread; Phi_t
    taken as known). Theorem 17: 1. Reported also against ``Phi_t`` with the cross-layer terms
    (``phi_bar^2 + cross``, what Assumption 3 drops) when the runs record them.
(b) the regression slope ``beta`` of the seed-centred increment ``Delta ln K_t - mean_seeds`` on
    the seed-centred ``ln K_t - mean_seeds``, pooled over t and per window of steps. For the OU
    model ``x_{t+1} = x_t - kappa (x_t - m_t) + sigma xi_t`` the centred increment is
    ``-kappa x~_t + noise`` independent of ``x~_t``, so ``beta = -kappa``; Theorem 17 (no feedback):
    ``beta = 0``; negative = mean reversion, positive = amplification.
(c) ``corr(kick_s, D_{s+k})`` at lags k (default 0, 1, 2, 5, 10, 20), both seed-centred and
    standardised per time step before pooling over s (so the correlation is the average per-step
    one, not dominated by late steps where the spread is larger). Lag 0 is a negative control: the
    batch of step s is drawn independently of theta_s, so it must be 0.
(d) with a second sweep at a smaller lr (lr T fixed), the reversion rate per unit of SDE time
    ``beta / lr`` of both and their ratio (see :func:`compare_lr`).

Definitions on a real run (steps.csv of ``lipverify train`` with ``full_gradient_every = 1``):

- ``D_t = mu_bar_full(theta_t) = sum_l mu_full_l / sigma_l``: the full-data (expected) gradient
  drift of ln K at the run's own state, the part of Theorem 15's drift that feedback acts on
  (``psi_bar - phi_bar^2 / 2`` is O(eta^2) and only estimated from the step's own batch).
- ``kick_s = sum_l (mu_l - mu_full_l) / sigma_l = -eta sum_l u_l^T (G_bar_s - grad L) v_l / sigma_l``:
  the batch-vs-full drift difference, i.e. the realised first-order noise increment ``phi_bar dB``
  of Theorem 15. Chosen over ``Delta ln K_s - drift_s`` because its conditional mean given theta_s
  is exactly 0 (the batch mean is unbiased, also without replacement) and it carries neither the
  second-order curvature term nor the error of the one-batch psi estimate; the residual definition
  is available as ``kick="residual"`` for comparison.

Uncertainty: every interval of (b), (c), (d) is a percentile bootstrap over seeds (whole
trajectories resampled, the centring recomputed), which respects the dependence within a seed.

Verdict (the framework's no-feedback assumption, on the pooled slope): the slope is *material* when
the OU model with that reversion lowers the std of ln K at the last step T by more than
``MATERIAL_STD_CHANGE`` (10%) against the random walk: ``beta_m > 0`` solves
``ou_ratio(beta_m, T) = 0.9`` (about ``0.2 / T``; used symmetrically for amplification).
Pass: the slope's interval lies inside ``[-beta_m, beta_m]``; fail: it lies entirely outside
(below: mean reversion, above: amplification); otherwise inconclusive. If the lag-0 control's
interval excludes 0 the kick definition is broken on these data and the verdict is inconclusive.

Arrays are float64 numpy: ``log_k`` (n, T+1), every per-step series (n, T); row t of a per-step
series describes the step from t to t+1.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize

from lipverify._validation import LipverifyError
from lipverify.claims.stats import chi2_std_interval

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
#: the std change at the last step (OU model against the random walk) that counts as material
MATERIAL_STD_CHANGE = 0.10
#: lags of (c); 0 is the negative control
DEFAULT_LAGS = (0, 1, 2, 5, 10, 20)
#: (d): a continuous-time effect keeps beta / lr (ratio 1 between the sweeps at lr T fixed); an
#: effect of the discretisation, O(lr) per unit of SDE time, halves with lr (ratio 0.5 at lr/2).
#: The decision threshold is the midpoint of the two hypotheses on the scale of lr_small/lr_big.
CONTINUOUS_RATIO = 1.0


@dataclass
class SeedPanel:
    """Per-seed series of one sweep: ``log_k`` (n, T+1) ln K_t; ``phi_bar_sq`` (n, T) the recorded
    Theorem 15 diffusion per step; ``drift`` (n, T) ``D_t``; ``kick`` (n, T); ``cross`` (n, T) the
    cross-layer term or None; ``lr``: eta; ``name``: a label. Seeds differ only in their sampling."""

    log_k: np.ndarray
    phi_bar_sq: np.ndarray
    drift: np.ndarray
    kick: np.ndarray
    lr: float
    cross: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.log_k = np.asarray(self.log_k, dtype=float)
        if self.log_k.ndim != 2:
            raise LipverifyError(f"log_k must be (seeds, T+1), got shape {self.log_k.shape}")
        n, t1 = self.log_k.shape
        if n < 3:
            raise LipverifyError(f"mean reversion needs >= 3 sampling seeds, got {n}")
        if t1 < 3:
            raise LipverifyError(f"mean reversion needs >= 2 steps, got {t1 - 1}")
        for key in ("phi_bar_sq", "drift", "kick", "cross"):
            value = getattr(self, key)
            if value is None:
                continue
            value = np.asarray(value, dtype=float)
            if value.shape != (n, t1 - 1):
                raise LipverifyError(f"{key} must have shape {(n, t1 - 1)}, got {value.shape}")
            setattr(self, key, value)
        for key in ("log_k", "phi_bar_sq", "drift", "kick", "cross"):
            value = getattr(self, key)
            if value is not None and not np.isfinite(value).all():
                seed, step = np.argwhere(~np.isfinite(value))[0]
                raise LipverifyError(f"{key} is not finite at seed row {seed}, step {step}")
        if (self.phi_bar_sq < 0).any():
            raise LipverifyError("phi_bar_sq must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LipverifyError(f"lr must be a finite number > 0, got {self.lr}")

    @property
    def seeds(self) -> int:
        return self.log_k.shape[0]

    @property
    def steps(self) -> int:
        return self.log_k.shape[1] - 1

    def take(self, idx: np.ndarray) -> SeedPanel:
        """The panel of the seed rows ``idx`` (a bootstrap resample), unchecked."""
        new = object.__new__(SeedPanel)
        new.log_k, new.phi_bar_sq = self.log_k[idx], self.phi_bar_sq[idx]
        new.drift, new.kick = self.drift[idx], self.kick[idx]
        new.cross = None if self.cross is None else self.cross[idx]
        new.lr, new.name = self.lr, self.name
        return new


# -- reading sweeps -------------------------------------------------------------------------------


def panel_from_records(records: Sequence[dict], kick: str = "batch-full", name: str = "") -> SeedPanel:
    """A :class:`SeedPanel` from run records (``{"name", "config", "series": {steps.csv column:
    list}}``, as :func:`lipverify.claims.records.load_records` gives). ``kick``: ``"batch-full"``
    (default, see the module docstring) or ``"residual"`` (``Delta ln K_s - (D_s + psi_bar_s -
    phi_bar_s^2 / 2)``). The runs must differ only in ``seed_sampling``, record the same steps and
    have ``mu_full`` at every step (``full_gradient_every = 1``)."""
    if kick not in ("batch-full", "residual"):
        raise LipverifyError(f"kick must be 'batch-full' or 'residual', got {kick!r}")
    if not records:
        raise LipverifyError("mean reversion: no complete runs")
    configs = {
        json.dumps({k: v for k, v in r["config"].items() if k != "seed_sampling"}, sort_keys=True)
        for r in records
    }
    if len(configs) > 1:
        raise LipverifyError("mean reversion: the runs differ in more than seed_sampling")
    lr = float(records[0]["config"]["lr"])
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("log_k", "phi", "drift", "kick", "cross")}
    steps_ref = None
    for r in records:
        s = r["series"]

        def col(key: str, rec: dict = r, ser: dict = s) -> np.ndarray:
            if key not in ser:
                raise LipverifyError(f"run {rec.get('name')}: steps.csv has no column {key!r}")
            return np.asarray(ser[key], dtype=float)

        steps = col("step")
        if steps_ref is None:
            steps_ref = steps
        elif not np.array_equal(steps, steps_ref):
            raise LipverifyError(f"run {r.get('name')}: recorded other steps than {records[0].get('name')}")
        if not np.array_equal(steps, np.arange(len(steps))):
            raise LipverifyError(
                f"run {r.get('name')}: steps.csv must hold every step 0..T (probe_every = 1)"
            )
        t = len(steps) - 1
        layers = sorted({k[: -len(".mu_full")] for k in s if k.endswith(".mu_full")})
        if not layers:
            raise LipverifyError(f"run {r.get('name')}: no <layer>.mu_full column")
        log_k = col("log_bound")
        phi = col("net_phi_sq")[:t]
        mu_bar = np.zeros(t)
        mu_full_bar = np.zeros(t)
        for layer in layers:
            sigma = col(f"{layer}.sigma")[:t]
            mu_full = col(f"{layer}.mu_full")[:t]
            if not np.isfinite(mu_full).all():
                bad = int(np.argmin(np.isfinite(mu_full)))
                raise LipverifyError(
                    f"run {r.get('name')}: {layer}.mu_full is missing at step {bad}: record the full-data "
                    "drift at every step (full_gradient_every = 1)"
                )
            mu_bar += col(f"{layer}.mu")[:t] / sigma
            mu_full_bar += mu_full / sigma
        if kick == "batch-full":
            k_s = mu_bar - mu_full_bar
        else:
            k_s = np.diff(log_k) - (mu_full_bar + col("net_psi")[:t] - phi / 2)
        arrays["log_k"].append(log_k)
        arrays["phi"].append(phi)
        arrays["drift"].append(mu_full_bar)
        arrays["kick"].append(k_s)
        arrays["cross"].append(col("net_phi_sq_cross")[:t] if "net_phi_sq_cross" in s else None)
    cross = None if any(c is None for c in arrays["cross"]) else np.stack(arrays["cross"])
    return SeedPanel(
        np.stack(arrays["log_k"]),
        np.stack(arrays["phi"]),
        np.stack(arrays["drift"]),
        np.stack(arrays["kick"]),
        lr,
        cross,
        name,
    )


def read_sweep_records(sweep_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(records of the complete runs of a ``lipverify sweep`` directory, problems [{name, status}]).
    Reads only ``sweep.json`` and each run's ``steps.csv`` (no per-run summary)."""
    from lipverify.claims.records import read_steps_csv
    from lipverify.sweep import read_sweep

    sweep_dir = Path(sweep_dir)
    doc = read_sweep(sweep_dir)
    records, problems = [], []
    for run in doc["runs"]:
        path = sweep_dir / run["dir"] / "steps.csv"
        if run.get("status") != "complete" or not path.exists():
            problems.append({"name": run["name"], "status": run.get("status")})
            continue
        records.append({"name": run["name"], "config": run["config"], "series": read_steps_csv(path)})
    return records, problems


def load_panel(source: str | Path | Sequence[dict] | SeedPanel, kick: str = "batch-full") -> SeedPanel:
    """A panel from a sweep directory, a list of run records or a panel (returned as is)."""
    if isinstance(source, SeedPanel):
        return source
    if isinstance(source, str | Path):
        records, problems = read_sweep_records(source)
        if not records:
            raise LipverifyError(f"{source}: no complete run ({len(problems)} incomplete)")
        return panel_from_records(records, kick, name=str(source))
    return panel_from_records(list(source), kick)


# -- statistics -----------------------------------------------------------------------------------


def ou_ratio(kappa: float, t: int | np.ndarray) -> np.ndarray:
    """std/sqrt(Phi_t) of the OU model ``x_{t+1} = (1 - kappa) x_t + sigma xi`` from ``x_0 = 0``:
    ``sqrt((1 - (1-kappa)^(2t)) / ((1 - (1-kappa)^2) t))`` (1 at kappa = 0: the random walk)."""
    t = np.asarray(t, dtype=float)
    if kappa == 0:
        return np.ones_like(t)
    a = (1.0 - kappa) ** 2
    return np.sqrt((1.0 - a**t) / ((1.0 - a) * t))


def ou_lag_correlation(kappa: float, lag: int) -> float:
    """corr(kick_s, D_{s+k}) of the stationary OU model with ``D_t = -kappa x_t``:
    ``-(1 - kappa)^(k-1) sqrt(1 - (1-kappa)^2)`` for k >= 1, 0 at k = 0."""
    if lag == 0:
        return 0.0
    return -((1.0 - kappa) ** (lag - 1)) * math.sqrt(1.0 - (1.0 - kappa) ** 2)


def material_slope(steps: int) -> float:
    """``beta_m > 0``: the slope whose OU model changes the std at step T by MATERIAL_STD_CHANGE
    (``ou_ratio(beta_m, T) = 1 - MATERIAL_STD_CHANGE``)."""
    return float(optimize.brentq(lambda k: ou_ratio(k, steps) - (1 - MATERIAL_STD_CHANGE), 1e-12, 1.0))


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def _slope(panel: SeedPanel, lo: int, hi: int) -> float:
    """Pooled OLS slope of centred Delta ln K_t on centred ln K_t, t in [lo, hi)."""
    x = _centred(panel.log_k[:, lo:hi])
    y = _centred(np.diff(panel.log_k, axis=1)[:, lo:hi])
    sxx = float((x * x).sum())
    return float((x * y).sum() / sxx) if sxx > 0 else math.nan


def _standardised(x: np.ndarray) -> np.ndarray:
    """Seed-centred and divided by the across-seed std per column; columns with no spread -> 0."""
    c = _centred(x)
    sd = c.std(axis=0, keepdims=True)
    return np.divide(c, sd, out=np.zeros_like(c), where=sd > 0)


def _lag_correlation(panel: SeedPanel, lag: int) -> float:
    """Pooled correlation of standardised kick_s and D_{s+lag}, over s + lag < T."""
    t = panel.steps
    if lag >= t:
        return math.nan
    a = _standardised(panel.kick[:, : t - lag])
    b = _standardised(panel.drift[:, lag:])
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


def _bootstrap(panel: SeedPanel, fn, resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = panel.seeds
    return np.array([fn(panel.take(rng.integers(0, n, n))) for _ in range(resamples)])


def _interval(values: np.ndarray, confidence: float) -> list[float]:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return [math.nan, math.nan]
    q = (1 - confidence) / 2
    return [float(np.quantile(v, q)), float(np.quantile(v, 1 - q))]


# -- result ---------------------------------------------------------------------------------------


@dataclass
class MeanReversionResult:
    """Result of :func:`mean_reversion`.

    ``ratio``: per step t = 1..T {step, lr_time (= lr t), std, phi (Phi_t), ratio, ci, and with the
    cross-layer terms phi_cross, ratio_cross, ci_cross}; ``slope``: {beta, ci, rate (beta / lr),
    rate_ci, material (beta_m), implied_ratio_T (OU), windows: [{from, to, beta, ci}]}; ``lags``:
    [{lag, correlation, ci, ou_equivalent (the stationary OU value at the pooled slope)}];
    ``verdict`` pass/fail/inconclusive and ``message``; ``settings``; ``small_lr``: the same for the
    second sweep; ``comparison``: :func:`compare_lr`'s row.
    """

    ratio: list[dict]
    slope: dict
    lags: list[dict]
    verdict: str
    message: str
    settings: dict
    small_lr: MeanReversionResult | None = None
    comparison: dict | None = None
    linear_response: list[dict] | None = None
    bootstrap_rates: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "message": self.message,
            "settings": self.settings,
            "ratio": self.ratio,
            "slope": self.slope,
            "lags": self.lags,
            "comparison": self.comparison,
            "small_lr": None if self.small_lr is None else self.small_lr.as_dict(),
            "linear_response": self.linear_response,
        }


def analyse_panel(
    panel: SeedPanel,
    lags: Sequence[int] = DEFAULT_LAGS,
    windows: int = 4,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> MeanReversionResult:
    """(a), (b), (c) and the verdict on one panel (see the module docstring)."""
    if not (0 < confidence < 1):
        raise LipverifyError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 100:
        raise LipverifyError(f"resamples must be >= 100, got {resamples}")
    if windows < 1:
        raise LipverifyError(f"windows must be >= 1, got {windows}")
    if any(int(k) != k or k < 0 for k in lags):
        raise LipverifyError(f"lags must be integers >= 0, got {list(lags)}")
    rng = np.random.default_rng(seed)
    n, t_max, alpha = panel.seeds, panel.steps, 1 - confidence
    chi_lo, chi_hi = chi2_std_interval(1.0, n, alpha)  # the std's interval per unit sample std
    # (a)
    phi_t = np.cumsum(panel.phi_bar_sq, axis=1).mean(axis=0)
    phi_cross_t = None
    if panel.cross is not None:
        phi_cross_t = np.cumsum(panel.phi_bar_sq + panel.cross, axis=1).mean(axis=0)
    std = panel.log_k.std(axis=0, ddof=1)
    ratio = []
    for t in range(1, t_max + 1):
        row: dict[str, Any] = {"step": t, "lr_time": panel.lr * t, "std": float(std[t])}
        for suffix, phi in (("", phi_t), ("_cross", phi_cross_t)):
            p = None if phi is None else float(phi[t - 1])
            ok = p is not None and p > 0
            row["phi" + suffix] = p
            row["ratio" + suffix] = std[t] / math.sqrt(p) if ok else None
            row["ci" + suffix] = (
                [std[t] * chi_lo / math.sqrt(p), std[t] * chi_hi / math.sqrt(p)] if ok else None
            )
        ratio.append(row)
    # (b)
    beta = _slope(panel, 0, t_max)
    boot = _bootstrap(panel, lambda p: _slope(p, 0, t_max), resamples, rng)
    ci = _interval(boot, confidence)
    edges = np.linspace(0, t_max, windows + 1).round().astype(int)
    window_rows = []
    for lo, hi in itertools.pairwise(edges):
        if hi <= lo:
            continue
        wb = _bootstrap(panel, lambda p, a=lo, b=hi: _slope(p, a, b), resamples, rng)
        window_rows.append(
            {"from": int(lo), "to": int(hi), "beta": _slope(panel, lo, hi), "ci": _interval(wb, confidence)}
        )
    beta_m = material_slope(t_max)
    implied = float(ou_ratio(-beta, t_max)) if math.isfinite(beta) and beta < 1 else math.nan
    slope = {
        "beta": beta,
        "ci": ci,
        "rate": beta / panel.lr,
        "rate_ci": [c / panel.lr for c in ci],
        "material": beta_m,
        "implied_ratio_T": implied,
        "windows": window_rows,
    }
    # (c)
    lag_rows = []
    for k in lags:
        k = int(k)
        r = _lag_correlation(panel, k)
        ci_k = _interval(_bootstrap(panel, lambda p, k=k: _lag_correlation(p, k), resamples, rng), confidence)
        ou = ou_lag_correlation(-beta, k) if math.isfinite(beta) and -1 < beta < 0 else None
        lag_rows.append(
            {"lag": k, "correlation": r, "ci": ci_k if math.isfinite(r) else None, "ou_equivalent": ou}
        )
    # verdict
    control = next((row for row in lag_rows if row["lag"] == 0), None)
    control_broken = bool(
        control is not None and control["ci"] is not None and not (control["ci"][0] <= 0 <= control["ci"][1])
    )
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        verdict, why = INCONCLUSIVE, "the slope's bootstrap interval is undefined"
    elif control_broken:
        verdict, why = INCONCLUSIVE, "the lag-0 control correlation is not 0: the kick definition fails here"
    elif -beta_m <= lo and hi <= beta_m:
        verdict, why = PASS, "no material feedback: Theorem 17's fixed-terms assumption holds"
    elif hi < -beta_m:
        verdict, why = FAIL, "mean reversion: a kick to ln K is pushed back by the later drift"
    elif lo > beta_m:
        verdict, why = FAIL, "amplification: a kick to ln K is reinforced by the later drift"
    else:
        verdict, why = INCONCLUSIVE, "the slope's interval straddles the materiality bound"
    message = (
        f"slope beta = {beta:+.4g} [{lo:+.4g}, {hi:+.4g}] per step (material |beta| > {beta_m:.3g}: "
        f"std change > {100 * MATERIAL_STD_CHANGE:g}% at T = {t_max}); OU-implied std ratio at T "
        f"{implied:.3f}; std/sqrt(Phi) at T {ratio[-1]['ratio']:.3f}; {why}"
    )
    settings = {
        "name": panel.name,
        "seeds": n,
        "steps": t_max,
        "lr": panel.lr,
        "confidence": confidence,
        "resamples": resamples,
        "bootstrap_seed": seed,
        "windows": windows,
        "material_std_change": MATERIAL_STD_CHANGE,
    }
    result = MeanReversionResult(ratio, slope, lag_rows, verdict, message, settings)
    result.bootstrap_rates = boot / panel.lr
    return result


def compare_lr(big: MeanReversionResult, small: MeanReversionResult, confidence: float = 0.95) -> dict:
    """(d): is the reversion a continuous-time effect or one of the discretisation?

    ``rate = beta / lr`` is the reversion per unit of SDE time (lr t). A continuous-time effect keeps
    it as lr -> 0 (``q = rate_small / rate_big = 1``); an O(lr) discretisation effect scales it by
    ``lr_small / lr_big`` (q = 0.5 at half the lr). With the midpoint ``q_mid`` of the two:
    "continuous-time" if the bootstrap interval of q (independent resamples of both sweeps) lies
    above q_mid, "discretisation" if it lies below, else "undetermined"; "no effect" when the
    larger lr's rate interval contains 0 (nothing to attribute).
    """
    q_disc = small.settings["lr"] / big.settings["lr"]
    q_mid = (CONTINUOUS_RATIO + q_disc) / 2
    rb, rs = big.slope["rate"], small.slope["rate"]
    m = min(len(big.bootstrap_rates), len(small.bootstrap_rates))
    qs = small.bootstrap_rates[:m] / big.bootstrap_rates[:m]
    q_ci = _interval(qs, confidence)
    lo_b, hi_b = big.slope["rate_ci"]
    if not (math.isfinite(lo_b) and math.isfinite(hi_b)) or lo_b <= 0 <= hi_b:
        outcome = "no effect"
    elif q_ci[0] > q_mid:
        outcome = "continuous-time"
    elif q_ci[1] < q_mid:
        outcome = "discretisation"
    else:
        outcome = "undetermined"
    last_b, last_s = big.ratio[-1], small.ratio[-1]
    return {
        "lr": [big.settings["lr"], small.settings["lr"]],
        "steps": [big.settings["steps"], small.settings["steps"]],
        "rate": [rb, rs],
        "rate_ci": [big.slope["rate_ci"], small.slope["rate_ci"]],
        "rate_ratio": rs / rb if rb != 0 else math.nan,
        "rate_ratio_ci": q_ci,
        "discretisation_ratio": q_disc,
        "threshold": q_mid,
        "final_ratio": [last_b["ratio"], last_s["ratio"]],
        "final_ratio_ci": [last_b["ci"], last_s["ci"]],
        "outcome": outcome,
    }


def mean_reversion(
    source: str | Path | Sequence[dict] | SeedPanel,
    small_lr: str | Path | Sequence[dict] | SeedPanel | None = None,
    lags: Sequence[int] = DEFAULT_LAGS,
    windows: int = 4,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    kick: str = "batch-full",
) -> MeanReversionResult:
    """Mean-reversion test on a many-seed sweep (``source``: sweep directory, run records or a
    :class:`SeedPanel`), optionally with a second sweep at a smaller lr (lr T fixed) for (d).

    The smaller-lr sweep's lags are scaled by ``lr / lr_small`` (same SDE-time lag). The overall
    verdict is the first sweep's (see the module docstring); the comparison row is reported beside it.
    """
    panel = load_panel(source, kick)
    result = analyse_panel(panel, lags, windows, confidence, resamples, seed)
    if small_lr is not None:
        small_panel = load_panel(small_lr, kick)
        if small_panel.lr >= panel.lr:
            raise LipverifyError(
                f"--small-lr sweep has lr {small_panel.lr} >= the first sweep's lr {panel.lr}"
            )
        scale = panel.lr / small_panel.lr
        small_lags = sorted({round(k * scale) for k in lags})
        result.small_lr = analyse_panel(small_panel, small_lags, windows, confidence, resamples, seed + 1)
        result.comparison = compare_lr(result, result.small_lr, confidence)
    return result


def plot_mean_reversion(result: MeanReversionResult, path: str | Path) -> None:
    """Three panels, x axis lr t (SDE time) so the two sweeps line up: std(ln K_t)/sqrt(Phi_t) with
    its chi-square band (and with the cross-layer terms, dashed); the window slopes per unit of lr t
    with their intervals; corr(kick_s, D_{s+k}) against the lag in lr t. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    parts = [result] + ([result.small_lr] if result.small_lr is not None else [])
    for res, colour in zip(parts, ("C0", "C1"), strict=False):
        lr, label = res.settings["lr"], f"lr {res.settings['lr']:g}, {res.settings['seeds']} seeds"
        rows = [r for r in res.ratio if r["ratio"] is not None]
        x = [r["lr_time"] for r in rows]
        axes[0].plot(x, [r["ratio"] for r in rows], color=colour, label=label)
        axes[0].fill_between(
            x, [r["ci"][0] for r in rows], [r["ci"][1] for r in rows], color=colour, alpha=0.2
        )
        cross = [r for r in rows if r["ratio_cross"] is not None]
        if cross:
            axes[0].plot(
                [r["lr_time"] for r in cross],
                [r["ratio_cross"] for r in cross],
                color=colour,
                ls="--",
                label=label + " (with cross-layer terms)",
            )
        for w in res.slope["windows"]:
            mid = lr * (w["from"] + w["to"]) / 2
            axes[1].errorbar(
                mid,
                w["beta"] / lr,
                yerr=[[(w["beta"] - w["ci"][0]) / lr], [(w["ci"][1] - w["beta"]) / lr]],
                color=colour,
                marker="o",
                capsize=3,
            )
        axes[1].axhline(res.slope["rate"], color=colour, ls=":", label=f"{label}: pooled")
        lags = [g for g in res.lags if g["ci"] is not None]
        axes[2].errorbar(
            [lr * g["lag"] for g in lags],
            [g["correlation"] for g in lags],
            yerr=[
                [g["correlation"] - g["ci"][0] for g in lags],
                [g["ci"][1] - g["correlation"] for g in lags],
            ],
            color=colour,
            marker="o",
            capsize=3,
            label=label,
        )
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set(xlabel="lr t", ylabel="std(ln K_t) / sqrt(Phi_t)", title="spread against Theorem 17")
    axes[1].axhline(0.0, color="k", lw=0.8)
    axes[1].set(
        xlabel="lr t (window centre)", ylabel="slope / lr", title="reversion rate (negative: reverting)"
    )
    axes[2].axhline(0.0, color="k", lw=0.8)
    axes[2].set(xlabel="lag (lr t)", ylabel="corr(kick_s, D_s+k)", title="kick vs later full-data drift")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def linear_response_rows(result: MeanReversionResult, predictions: Any) -> list[dict]:
    """The spread predictions of :mod:`lipverify.framework.linear_response` beside this test's
    empirical std of ln K_t: per step t where the empirical std is known, ``{step, std, <name>,
    <name>_ratio}`` for every name in ``predictions.PREDICTIONS`` (Theorem 17's sqrt(Phi_t), the
    no-feedback sum with cross terms, the reduced and the adjoint linear response; ratio =
    prediction / empirical std; a prediction not evaluated at t, NaN, is left out).

    ``predictions``: a :class:`~lipverify.framework.linear_response.LinearResponseResult` of the
    same setup (its lr and number of steps must equal this sweep's: the predictions are per step).
    """
    lr, steps = predictions.settings.get("lr"), predictions.settings.get("steps")
    if lr != result.settings["lr"] or steps != result.settings["steps"]:
        raise LipverifyError(
            f"the linear-response predictions are for lr = {lr}, {steps} steps; this sweep has lr = "
            f"{result.settings['lr']}, {result.settings['steps']} steps"
        )
    rows = []
    for r in result.ratio:
        t, std = r["step"], r["std"]
        row: dict[str, Any] = {"step": t, "std": std}
        for name in predictions.PREDICTIONS:
            value = float(predictions.prediction(name)[t])
            if math.isfinite(value):
                row[name] = value
                row[f"{name}_ratio"] = value / std if std > 0 else None
        rows.append(row)
    return rows
