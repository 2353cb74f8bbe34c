"""Theorem 16/17 predictions along a recorded run, against what the run observed.

The per-step series of ``steps.csv`` (written by :func:`lipverify.training.train`) is fed to
:func:`lipverify.dynamics.predict_bound`: ``E[K_t] = K_0 exp(sum_{s<t} (mu_bar_s + psi_bar_s))``,
``Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1)``, ``Phi_t = sum_{s<t} phi_bar_s^2``, and per layer
``E[sigma_t] = sigma_0 + sum_{s<t} (mu_s + psi_s)``, ``Var[sigma_t] = sum_{s<t} phi_s^2``. Steps
without a measurement (``probe_every > 1``) reuse the last measured terms (piecewise constant).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from lipverify._validation import LipverifyError
from lipverify.dynamics import BoundOverflowWarning, LayerTerms, NetworkTerms, predict_bound
from lipverify.records import read_json, read_steps

#: P(|Z| <= 2) for Z ~ N(0, 1): the coverage of the E +/- 2 std band under a correct Gaussian model
EXPECTED_COVERAGE = math.erf(2 / math.sqrt(2))
#: family-wise false-alarm rate of the verdict; each of its two tests (coverage, final z) gets half
VERDICT_ALPHA = 0.01
#: a Brownian path's positions scaled by their std at times t and r t correlate like r^(-1/2):
#: samples 16x apart in time (correlation 1/4) are counted as independent
DECORRELATION_RATIO = 16
#: lr * lambda_max at which ``train`` warns: the SGD stability limit is 2; sharpness is sampled every
#: ``sharpness_every`` steps and the power iteration's Rayleigh quotient under-estimates lambda_max
STABILITY_WARNING = 1.5
STABILITY_LIMIT = 2.0


def effective_sample_size(steps: int) -> int:
    """Conservative number of independent checks in a path of ``steps`` logged steps:
    ``1 + floor(log(steps) / log(16))`` (one per factor :data:`DECORRELATION_RATIO` in time). The
    standardised deviation ``(K_t - E_t) / std_t`` of a diffusion is strongly autocorrelated: for
    Brownian motion its correlation between t and r t is ``r^(-1/2)``, so the fraction of steps in
    the band does not concentrate as T grows, and T steps are worth about log T samples."""
    if steps < 1:
        raise LipverifyError(f"steps must be >= 1, got {steps}")
    return 1 + math.floor(math.log(steps) / math.log(DECORRELATION_RATIO) + 1e-12)


def prediction_verdict(
    observed,
    mean,
    std,
    *,
    flags=(),
    name: str = "Theorem 17",
) -> dict:
    """Whether a predicted mean/std series of K explains an observed series (all of length T + 1,
    t = 0..T, sequences or 1-D tensors of floats).

    Rule (family-wise false-alarm rate :data:`VERDICT_ALPHA` = 0.01 by Bonferroni, 0.005 per test):

    * non-finite predicted mean or std at any step, a negative std or a non-positive mean:
      ``"not applicable"`` (flagged, nothing is tested against an infinite band);
    * coverage ``c`` = fraction of t = 1..T with ``|K_t - E_t| <= 2 std_t``, expected
      :data:`EXPECTED_COVERAGE` (~0.954). Steps are autocorrelated, so the misses are counted on
      ``n = effective_sample_size(T)`` samples: ``m = (1 - c) n`` misses, one-sided binomial
      p-value ``P(Bin(n, 1 - 0.954) >= m)`` (its continuous extension, the regularised incomplete
      beta ``I_q(m, n - m + 1)``); rejected below 0.005;
    * final ``z = (K_T - E_T) / std_T``, two-sided p-value ``erfc(|z| / sqrt 2)``; rejected below
      0.005 (``|z| > 2.81``). ``std_T = 0`` with ``K_T != E_T`` is ``|z| = inf``;
    * either test rejects: ``"does not hold"``; else any entry of ``flags`` (e.g. negative layer
      means, the stability condition failing), or a band that reaches K <= 0 at T (the prediction
      excludes no small K): ``"inconclusive"``; else ``"holds"``.

    Returns a dict: ``verdict``, ``reasons`` (list of str), ``flags``, ``coverage``,
    ``expected_coverage``, ``effective_samples``, ``coverage_p_value``, ``z_final``,
    ``z_p_value``, ``relative_error`` ((E_T - K_T) / K_T), ``relative_std`` (std_T / K_T). Numbers
    that cannot be computed are None, never inf or NaN.
    """
    from scipy.special import betainc

    obs = [float(v) for v in observed]
    m_ = [float(v) for v in mean]
    s_ = [float(v) for v in std]
    if not (len(obs) == len(m_) == len(s_)) or len(obs) < 2:
        raise LipverifyError(
            f"observed, mean and std must have the same length >= 2, got {len(obs)}, {len(m_)}, {len(s_)}"
        )
    if not all(math.isfinite(k) and k > 0 for k in obs):
        raise LipverifyError("observed K must be positive and finite at every step")
    T = len(obs) - 1
    flags = list(flags)
    out = {
        "verdict": None,
        "reasons": [],
        "flags": flags,
        "coverage": None,
        "expected_coverage": EXPECTED_COVERAGE,
        "effective_samples": effective_sample_size(T),
        "coverage_p_value": None,
        "z_final": None,
        "z_p_value": None,
        "relative_error": None,
        "relative_std": None,
    }
    bad = [t for t in range(T + 1) if not (math.isfinite(m_[t]) and math.isfinite(s_[t]))]
    if bad:
        t = bad[0]
        flags.append(
            f"the {name} prediction is not finite from step {t} (E = {m_[t]:.3g}, std = {s_[t]:.3g})"
        )
    neg = [t for t in range(T + 1) if m_[t] <= 0 or s_[t] < 0]
    if neg and not bad:
        t = neg[0]
        flags.append(
            f"the {name} prediction is non-physical at step {t} (E = {m_[t]:.3g}, std = {s_[t]:.3g})"
        )
    if bad or neg:
        out["verdict"] = "not applicable"
        out["reasons"] = list(flags)
        return out
    n = out["effective_samples"]
    coverage = sum(abs(obs[t] - m_[t]) <= 2 * s_[t] for t in range(1, T + 1)) / T
    misses = (1 - coverage) * n
    p_cov = float(betainc(misses, n - misses + 1, 1 - EXPECTED_COVERAGE)) if misses > 0 else 1.0
    dev = obs[T] - m_[T]
    z = dev / s_[T] if s_[T] > 0 else (0.0 if dev == 0 else math.copysign(math.inf, dev))
    p_z = math.erfc(abs(z) / math.sqrt(2))
    out.update(
        coverage=coverage,
        coverage_p_value=p_cov,
        z_final=z if math.isfinite(z) else None,
        z_p_value=p_z,
        relative_error=(m_[T] - obs[T]) / obs[T],
        relative_std=s_[T] / obs[T],
    )
    per_test = VERDICT_ALPHA / 2
    reasons = []
    if p_cov < per_test:
        reasons.append(
            f"{coverage:.0%} of the steps inside E +/- 2 std, expected {EXPECTED_COVERAGE:.1%} "
            f"(p = {p_cov:.2g} on {n} effective samples of {T} autocorrelated steps)"
        )
    if p_z < per_test:
        reasons.append(
            f"K_T = {obs[T]:.4g} is {'inf' if not math.isfinite(z) else f'{z:+.3g}'} std from the predicted "
            f"{m_[T]:.4g} (std {s_[T]:.3g}; p = {p_z:.2g})"
        )
    if reasons:
        out["verdict"], out["reasons"] = "does not hold", reasons + flags
    elif flags:
        out["verdict"], out["reasons"] = "inconclusive", list(flags)
    elif m_[T] - 2 * s_[T] <= 0:
        out["verdict"] = "inconclusive"
        out["reasons"] = [
            f"the band E +/- 2 std at T reaches K <= 0 (std/E = {s_[T] / m_[T]:.3g}): it excludes no small K"
        ]
    else:
        out["verdict"] = "holds"
        out["reasons"] = [
            f"{coverage:.0%} of the steps inside E +/- 2 std (expected {EXPECTED_COVERAGE:.1%}; p = {p_cov:.2g}), "  # noqa: E501
            f"final z = {z:+.3g} (p = {p_z:.2g})"
        ]
    return out


#: coverage of +/- 1 and +/- 2 std under N(0, 1)
NORMAL_COVERAGE = {1: math.erf(1 / math.sqrt(2)), 2: EXPECTED_COVERAGE}
#: quantile levels of the calibration table (z-scores of ln K_t against N(0, 1))
CALIBRATION_LEVELS = (0.025, 0.16, 0.5, 0.84, 0.975)


def log_bound_forecast(log_k0: float, net_series) -> tuple[list[float], list[float]]:
    """Theorem 17's law of ln K_t as the Gaussian ``N(m_t, v_t)`` for t = 0..T:
    ``m_t = ln K_0 + sum_{s<t} (mu_bar_s + psi_bar_s - phi_bar_s^2 / 2)`` (Theorem 15's drift of
    ln K) and ``v_t = Phi_t = sum_{s<t} phi_bar_s^2``. Computed in log space, so it cannot overflow.
    ``net_series``: T :class:`NetworkTerms`. Returns two lists of T + 1 floats."""
    m, v = [float(log_k0)], [0.0]
    for t in net_series:
        m.append(m[-1] + t.mu + t.psi - 0.5 * t.phi_sq)
        v.append(v[-1] + t.phi_sq)
    return m, v


def calibration(log_observed, log_mean, log_var, *, alpha: float = VERDICT_ALPHA) -> dict:
    """Calibration of a forecast ``ln K_t ~ N(m_t, v_t)`` against one observed path, t = 1..T
    (sequences of T + 1 floats; t = 0 is the start and is not scored).

    z-scores ``z_t = (ln K_t - m_t) / sqrt(v_t)`` are N(0, 1) at every t if the model is right, but
    they are not independent: ``ln K_t - m_t`` is a martingale with Gaussian increments of variance
    ``v_{t+1} - v_t``, so ``Cov(z_s, z_t) = sqrt(v_s / v_t)`` and ``Cov(z_s^2, z_t^2) = 2 v_s / v_t``
    (s <= t). The verdict uses ``S = mean_t z_t^2`` with its exact first two moments under the
    model, ``E S = 1`` and ``Var S = (2 / T^2) sum_{s,t} min(v_s, v_t) / max(v_s, v_t)`` (about 1
    for a Brownian path, i.e. about two degrees of freedom however long the run: one path is one
    sample), moment-matched by a Gamma law (exact for T = 1, where S is chi^2_1):

    * ``S`` above its ``1 - alpha/2`` quantile: ``"too narrow"`` (the path strays further than the
      band allows); below its ``alpha/2`` quantile: ``"too wide"``; else ``"calibrated"``;
    * ``v_t <= 0`` or a non-finite value at some t >= 1: ``"not applicable"``.

    Also reported: the mean z with its model std ``sqrt((1/T^2) sum_{s,t} sqrt(min/max))`` (a
    bias), the fractions of t inside +/- 1 and +/- 2 std against 68.3% and 95.4%, and the empirical
    quantiles of z at :data:`CALIBRATION_LEVELS` against the normal ones. Returns a dict; numbers
    that cannot be computed are None.
    """
    import numpy as np
    from scipy.stats import gamma, norm

    obs, m, v = (np.asarray(list(a), dtype=np.float64) for a in (log_observed, log_mean, log_var))
    if not (len(obs) == len(m) == len(v)) or len(obs) < 2:
        raise LipverifyError(
            f"log_observed, log_mean and log_var must have the same length >= 2, got "
            f"{len(obs)}, {len(m)}, {len(v)}"
        )
    T = len(obs) - 1
    out = {
        "verdict": None,
        "reason": None,
        "steps": T,
        "mean_z_sq": None,
        "mean_z_sq_interval": None,
        "mean_z": None,
        "mean_z_std": None,
        "coverage_1std": None,
        "coverage_2std": None,
        "expected_coverage_1std": NORMAL_COVERAGE[1],
        "expected_coverage_2std": NORMAL_COVERAGE[2],
        "quantiles": None,
    }
    o, mm, vv = obs[1:], m[1:], v[1:]
    if not (np.isfinite(o).all() and np.isfinite(mm).all() and np.isfinite(vv).all()) or (vv <= 0).any():
        bad = int(np.argmax(~(np.isfinite(o) & np.isfinite(mm) & np.isfinite(vv)) | (vv <= 0))) + 1
        out["verdict"] = "not applicable"
        out["reason"] = (
            f"the forecast of ln K has no positive finite variance at step {bad} "
            f"(v = {v[bad]:.3g}): no z-score"
        )
        return out
    z = (o - mm) / np.sqrt(vv)
    ratio = np.minimum.outer(vv, vv) / np.maximum.outer(vv, vv)
    var_s = 2.0 * float(ratio.sum()) / T**2
    std_mean_z = math.sqrt(float(np.sqrt(ratio).sum())) / T
    s = float(np.mean(z**2))
    shape, scale = 1.0 / var_s, var_s
    lo, hi = (float(gamma.ppf(q, shape, scale=scale)) for q in (alpha / 2, 1 - alpha / 2))
    mean_z = float(z.mean())
    out.update(
        mean_z_sq=s,
        mean_z_sq_interval=[lo, hi],
        mean_z=mean_z,
        mean_z_std=std_mean_z,
        coverage_1std=float(np.mean(np.abs(z) <= 1)),
        coverage_2std=float(np.mean(np.abs(z) <= 2)),
        quantiles=[
            {"level": q, "normal": float(norm.ppf(q)), "observed": float(np.quantile(z, q))}
            for q in CALIBRATION_LEVELS
        ],
    )
    where = (
        f"mean z^2 = {s:.3g}, {1 - alpha:.0%} interval under the model [{lo:.3g}, {hi:.3g}]; "
        f"mean z = {mean_z:+.3g} (model std {std_mean_z:.3g}); "
        f"{out['coverage_1std']:.0%} / {out['coverage_2std']:.0%} of steps inside +/- 1 / 2 std "
        f"(expected {NORMAL_COVERAGE[1]:.1%} / {NORMAL_COVERAGE[2]:.1%})"
    )
    if s > hi:
        out["verdict"] = "too narrow"
    elif s < lo:
        out["verdict"] = "too wide"
    else:
        out["verdict"] = "calibrated"
    out["reason"] = where
    return out


def z_scores(log_observed, log_mean, log_var) -> list[float | None]:
    """``(ln K_t - m_t) / sqrt(v_t)`` for t = 1..T (None where ``v_t <= 0`` or not finite)."""
    out = []
    for o, m, v in list(zip(log_observed, log_mean, log_var, strict=True))[1:]:
        z = (o - m) / math.sqrt(v) if v > 0 and math.isfinite(v) else math.nan
        out.append(z if math.isfinite(z) else None)
    return out


def verdict_line(verdict: dict) -> str:
    """One line: ``holds``/``does not hold``/... with the reasons joined by ``; ``."""
    return f"{verdict['verdict']}: " + "; ".join(verdict["reasons"])


def _status_note(meta: dict) -> str:
    """``; meta.json says status 'failed': <error>`` for a failed (or other unfinished) run."""
    status = meta.get("status")
    if status in (None, "complete"):
        return ""
    error = meta.get("error")
    return f"; meta.json says status {status!r}" + (f": {error}" if error else "")


def _series(run_dir: Path):
    """The recorded series of a finished run. An unfinished one (no steps.csv, or no final row) is a
    :class:`LipverifyError` that quotes meta.json's ``status`` and ``error``: resuming helps only a
    stopped or killed run, not a failed one."""
    meta = read_json(run_dir / "meta.json")
    note = _status_note(meta)
    # a stopped or killed run resumes; a failed one repeats its failure
    hint = "resume it first"
    if meta.get("status") == "failed":
        hint = "fix the cause (a diverged run needs a smaller lr) before resuming"
    try:
        _, rows = read_steps(run_dir / "steps.csv")
    except LipverifyError as exc:
        if not note:
            raise
        raise LipverifyError(f"{run_dir} has no completed run ({exc}{note})") from exc
    layers = meta.get("layers")
    if not layers:
        raise LipverifyError(f"{run_dir / 'meta.json'} lists no layers; is this a lipverify train run?{note}")
    train_rows = [r for r in rows if r.get("loss") is not None]
    if not train_rows or rows[-1].get("loss") is not None:
        raise LipverifyError(f"{run_dir} has no completed run (steps.csv lacks the final row{note}); {hint}")
    if train_rows[0].get("net_mu") is None:
        raise LipverifyError(f"{run_dir}: the first step carries no probe measurement")
    net, per_layer = [], []
    last_net = last_layers = None
    for r in train_rows:
        if r.get("net_mu") is not None:
            last_net = NetworkTerms(
                log_bound=r["log_bound"],
                mu=r["net_mu"],
                psi=r["net_psi"],
                phi_sq=r["net_phi_sq"],
                phi_sq_cross=r.get("net_phi_sq_cross"),
            )
            last_layers = {
                n: LayerTerms(
                    sigma=r[f"{n}.sigma"],
                    mu=r[f"{n}.mu"],
                    phi=r[f"{n}.phi"],
                    psi=r[f"{n}.psi"],
                    gap=r[f"{n}.gap"],
                    degenerate=bool(r[f"{n}.degenerate"]),
                )
                for n in layers
            }
        net.append(last_net)
        per_layer.append(last_layers)
    return meta, layers, rows, train_rows, net, per_layer


def _full_mu_series(layers, train_rows, net):
    """Network terms with mu_bar from the full-data drift ``mu_full`` (forward-filled), or None."""
    if not any(r.get(f"{layers[0]}.mu_full") is not None for r in train_rows):
        return None
    out, last = [], None
    for r, t in zip(train_rows, net, strict=True):
        if r.get(f"{layers[0]}.mu_full") is not None:
            last = sum(r[f"{n}.mu_full"] / r[f"{n}.sigma"] for n in layers)
        if last is None:
            return None  # mu_full must be measured at the first step
        out.append(NetworkTerms(t.log_bound, last, t.psi, t.phi_sq, t.phi_sq_cross))
    return out


def _observed_bound(run_dir: Path, meta: dict, rows, T: int) -> list[float]:
    """``K_t = exp(log_bound_t)`` for t = 0..T; a non-finite one (inf/NaN ln K, or exp overflow) is
    a :class:`LipverifyError` naming the step."""
    out = []
    for t, r in enumerate(rows[: T + 1]):
        log_k = r.get("log_bound")
        try:
            K = math.exp(log_k) if log_k is not None else math.nan
        except OverflowError:
            K = math.inf
        if not math.isfinite(K):
            raise LipverifyError(
                f"{run_dir}: the observed bound K overflows at step {t} (ln K = {log_k}): the run "
                f"diverged; train again with a smaller lr (lr = {_lr(meta)})"
            )
        out.append(K)
    return out


def _overflow_flag(meta: dict, rows, layers, per_layer, mean: torch.Tensor, std: torch.Tensor) -> str | None:
    """None when the predicted ``mean`` and ``std`` of K are finite at every step; else what
    happened: the first step t where they are not, and the layer whose relative term
    (``|mu|/sigma``, ``psi/sigma`` or ``phi^2/sigma^2``, per step) is the largest before t, with its
    sigma_1 there. exp(sum of these) is what overflows: a tiny sigma_1 or a huge lr makes them
    huge while the recorded run stays finite."""
    bad = ~(torch.isfinite(mean) & torch.isfinite(std))
    if not bool(bad.any()):
        return None
    t = int(bad.nonzero()[0, 0])
    worst = None
    for s, terms in enumerate(per_layer[: max(t, 1)]):
        for name in layers:
            x = terms[name]
            for label, value in (
                ("|mu|/sigma", abs(x.mu) / x.sigma),
                ("psi/sigma", x.psi / x.sigma),
                ("phi^2/sigma^2", x.phi**2 / x.sigma**2),
            ):
                if worst is None or value > worst[0]:
                    worst = (value, name, x.sigma, s, label)
    value, name, sigma, s, label = worst
    return (
        f"{name}: sigma_1 = {sigma:.2g} at step {s}, relative term {label} = {value:.2g} per step: the "
        f"Theorem 17 prediction overflows at step {t} (E[K_t] = {float(mean[t]):.3g}, std = "
        f"{float(std[t]):.3g}; observed ln K_t = {rows[t]['log_bound']:.6g}, lr = {_lr(meta)}); "
        "the run itself is finite"
    )


def _lr(meta: dict) -> object:
    return (meta.get("config") or {}).get("lr")


def _checked_prediction(run_dir: Path, meta: dict, rows, T: int, net, per_layer=None):
    """Observed K_0..K_T (checked finite at every step) and the Theorem 17 prediction (which may
    overflow: see :func:`_overflow_flag`)."""
    K_obs = _observed_bound(run_dir, meta, rows, T)
    with warnings.catch_warnings():  # the overflow becomes the verdict's flag, with the run's context
        warnings.simplefilter("ignore", BoundOverflowWarning)
        return K_obs, predict_bound(net, K_obs[0], per_layer)


def check_prediction(run_dir: str | Path) -> None:
    """Raise :class:`LipverifyError` when :func:`summarize_run` would: an unfinished run, or an
    observed K that is not finite at some step (a diverged run). A prediction that overflows is
    not an error: the summary flags it "not applicable". :func:`lipverify.training.train` calls it
    so that a diverged run is not "complete"."""
    run_dir = Path(run_dir)
    meta, _, rows, train_rows, net, per_layer = _series(run_dir)
    _checked_prediction(run_dir, meta, rows, len(train_rows), net, per_layer)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _stability(meta: dict, train_rows) -> dict:
    """Sharpness records: the largest ``lr * lambda_max`` and the first steps where it reached
    :data:`STABILITY_WARNING` and :data:`STABILITY_LIMIT` (None when not recorded)."""
    measured = [
        (int(r["step"]), r["sharpness"], r["lr_sharpness"])
        for r in train_rows
        if r.get("sharpness") is not None
    ]
    out = {"sharpness_max": None, "lr_sharpness_max": None, "stability_warning_step": None}
    out.update(stability_failed_step=None, sharpness_evaluations=len(measured))
    if not measured:
        return out
    out["sharpness_max"] = max(m[1] for m in measured)
    out["lr_sharpness_max"] = max(m[2] for m in measured)
    out["stability_warning_step"] = next((m[0] for m in measured if m[2] >= STABILITY_WARNING), None)
    out["stability_failed_step"] = next((m[0] for m in measured if m[2] >= STABILITY_LIMIT), None)
    return out


def _layer_flags(layers, pred, T: int) -> list[str]:
    """Negative predicted per-layer sigma_1 means (sigma_1 >= 0 always), first step per layer."""
    flags = []
    for j, name in enumerate(layers):
        col = pred.layer_mean[:, j]
        neg = (col < 0).nonzero()
        if len(neg):
            t = int(neg[0, 0])
            flags.append(
                f"{name}: predicted E[sigma_1] is negative from step {t} ({float(col[t]):.3g}; "
                f"{float(col[T]):.3g} at T): non-physical"
            )
    return flags


FORECAST_KIND = (
    "expectation-based forecast: Theorem 17 with mu from the full-data gradient (held between passes), "
    "psi and phi from the batch noise"
)
DECOMPOSITION_KIND = (
    "one-step-ahead decomposition of the realised path: mu from each step's batch mean, which "
    "already contains that step's noise (not a forecast; its band counts the noise twice)"
)


def _forecast_block(kind: str, log_obs, series, mean, std, verdict: dict) -> dict:
    """One prediction of K along the run: its Theorem 17 numbers at T, its
    :func:`prediction_verdict` and the :func:`calibration` of ln K_t's z-scores."""
    T = len(series)
    log_mean, log_var = log_bound_forecast(log_obs[0], series)
    cal = calibration(log_obs, log_mean, log_var)
    overall, reasons = verdict["verdict"], list(verdict["reasons"])
    if cal["verdict"] in ("too narrow", "too wide") and overall != "not applicable":
        # a band that is too narrow or too wide for the path is a failed prediction of Var[K_t]
        overall = "does not hold"
        kept = reasons if verdict["verdict"] != "holds" else []
        reasons = [f"calibration {cal['verdict']}: {cal['reason']}", *kept]
    return {
        "kind": kind,
        "available": True,
        "K_T_predicted_mean": _finite_or_none(mean[T]),
        "K_T_predicted_std": _finite_or_none(std[T]),
        "relative_error": verdict["relative_error"],
        "fraction_in_2std": verdict["coverage"],
        "expected_fraction_in_2std": EXPECTED_COVERAGE,
        "z_final": verdict["z_final"],
        "verdict": overall,
        "verdict_reasons": reasons,
        "band_verdict": verdict["verdict"],
        "calibration": cal,
        "cumulative_mu": sum(t.mu for t in series),
    }


def summarize_run(run_dir: str | Path) -> dict:
    """Summary numbers of a finished run (T = number of steps).

    * ``forecast`` (read this first): the expectation-based forecast, Theorem 17 with mu_bar from
      the full-data gradient (``mu_full``, held between the passes every ``full_gradient_every``
      steps) and psi, phi from the batch noise: ``kind``, ``available``, ``K_T_predicted_mean``/
      ``_std``, ``relative_error``, ``fraction_in_2std`` against ``expected_fraction_in_2std``
      (95.4%), ``z_final``, ``verdict``, ``verdict_reasons``, ``calibration`` (:func:`calibration`:
      "calibrated" / "too wide" / "too narrow" from the z-scores of ln K_t), ``full_gradient_every``.
      ``available`` is False (with ``reason``) when no full-data gradient was recorded.
    * ``one_step_decomposition``: the same with mu_bar from each step's batch mean, which contains
      the step's realised noise: a decomposition of the realised path, not a forecast. The flat
      keys below (``K_T_predicted_mean``, ``fraction_in_2std``, ``verdict``, ...) are this variant,
      kept for compatibility.

    * ``K0``, ``K_T_observed``: ``exp(log_bound)`` at steps 0 and T.
    * ``K_T_predicted_mean``, ``K_T_predicted_std``: Theorem 17 at T.
    * ``relative_error``: ``(K_T_predicted_mean - K_T_observed) / K_T_observed`` (signed).
    * ``fraction_in_2std``: fraction of t = 1..T with ``|K_t - E[K_t]| <= 2 std[K_t]``.
    * ``cumulative_mu``, ``cumulative_psi``, ``cumulative_phi_sq``: ``sum_{t<T}`` of the network terms
      ``mu_bar``, ``psi_bar``, ``phi_bar^2``; ``psi_mu_ratio = cumulative_psi / |cumulative_mu|``
      (inf when cumulative_mu = 0): how much of the drift of ln K is noise-driven.
    * ``log_bound_change_observed`` and ``log_bound_change_predicted`` (``sum (mu_bar + psi_bar -
      phi_bar^2 / 2)``, Theorem 15), ``cumulative_phi_sq_cross`` (what Assumption 3 drops).
    * ``K_T_predicted_mean_full_mu``, ``K_T_predicted_std_full_mu``, ``fraction_in_2std_full_mu``,
      ``cumulative_mu_full``: the same with mu_bar from the full-data gradient (``mu_full``,
      forward-filled between measurements; None when not recorded). The batch-mean mu carries the
      realised noise of each step, so its prediction follows the realised path; the full-data
      mu is the Theorem 14 drift proper.
    * ``layers``: per layer sigma_0, observed sigma_T, predicted mean/std, fraction in 2 std, and the
      discrete truth: mean ``|observed - first|`` / ``|observed - second|`` order errors and
      ``sum dropped_drift_term`` against ``sum psi``.

    * ``verdict`` ("holds" / "does not hold" / "inconclusive" / "not applicable"),
      ``verdict_reasons``, ``z_final`` and the full :func:`prediction_verdict` dict as
      ``prediction_verdict`` (``verdict_full_mu`` for the full-data forecast). Flags: a prediction
      that overflows (which layer's relative term, its sigma_1 and step), negative predicted layer
      means, degenerate gaps, the stability condition failing.
    * ``sharpness_max``, ``lr_sharpness_max``, ``stability_warning_step`` (first step with
      ``lr * lambda_max >= 1.5``), ``stability_failed_step`` (``>= 2``), ``sharpness_evaluations``.

    An observed K that is inf or NaN at some step (a diverged run) raises :class:`LipverifyError`
    naming the step. A predicted mean or std that overflows is reported as None with the verdict
    "not applicable": no step is counted inside an infinite band and no inf is reported as a number.
    """
    run_dir = Path(run_dir)
    meta, layers, rows, train_rows, net, per_layer = _series(run_dir)
    T = len(train_rows)
    K_obs, pred = _checked_prediction(run_dir, meta, rows, T, net, per_layer)
    mean, std = pred.mean.tolist(), pred.std.tolist()
    overflow = _overflow_flag(meta, rows, layers, per_layer, pred.mean, pred.std)
    stability = _stability(meta, train_rows)
    flags = _layer_flags(layers, pred, T)
    if stability["stability_failed_step"] is not None:
        flags.append(
            f"the SDE approximation's stability condition lr * lambda_max < 2 failed at step "
            f"{stability['stability_failed_step']} (max lr * lambda_max = {stability['lr_sharpness_max']:.3g})"  # noqa: E501
        )
    degenerate = {n: sum(bool(r.get(f"{n}.degenerate")) for r in train_rows) for n in layers}
    for n, count in degenerate.items():
        if count:
            flags.append(
                f"{n}: sigma_1 - sigma_2 below the gap tolerance at {count} of {T} steps (psi loses accuracy)"
            )
    verdict = prediction_verdict(K_obs, mean, std, flags=[] if overflow else flags)
    if overflow:  # what overflowed and why, instead of the generic "not finite from step t"
        verdict["reasons"] = [overflow]
        verdict["flags"] = [overflow, *flags]
    cum_mu = sum(t.mu for t in net)
    cum_psi = sum(t.psi for t in net)
    cum_phi = sum(t.phi_sq for t in net)
    cross = [t.phi_sq_cross for t in net if t.phi_sq_cross is not None]
    full_series = _full_mu_series(layers, train_rows, net)
    full = {"K_T_predicted_mean_full_mu": None, "K_T_predicted_std_full_mu": None}
    full.update(fraction_in_2std_full_mu=None, cumulative_mu_full=None, verdict_full_mu=None)
    if full_series is not None:
        _, pf = _checked_prediction(run_dir, meta, rows, T, full_series)
        fm, fs = pf.mean.tolist(), pf.std.tolist()
        full_overflow = _overflow_flag(meta, rows, layers, per_layer, pf.mean, pf.std)
        full_flags = [] if full_overflow else list(flags)
        vf = prediction_verdict(K_obs, fm, fs, flags=full_flags, name="full-data mu")
        if full_overflow:
            vf["reasons"] = vf["flags"] = [full_overflow]
        full.update(
            K_T_predicted_mean_full_mu=_finite_or_none(fm[T]),
            K_T_predicted_std_full_mu=_finite_or_none(fs[T]),
            fraction_in_2std_full_mu=vf["coverage"],
            cumulative_mu_full=sum(t.mu for t in full_series),
            verdict_full_mu=vf,
        )
    log_obs = [math.log(k) for k in K_obs]
    decomposition = _forecast_block(DECOMPOSITION_KIND, log_obs, net, mean, std, verdict)
    if full_series is not None:
        forecast = _forecast_block(FORECAST_KIND, log_obs, full_series, fm, fs, vf)
        forecast["full_gradient_every"] = meta.get("full_gradient_every") or (meta.get("config") or {}).get(
            "full_gradient_every"
        )
    else:
        forecast = {
            "kind": FORECAST_KIND,
            "available": False,
            "reason": "no full-data gradient recorded (full_gradient_every = 0); only the one-step-ahead "
            "decomposition below is available",
        }
    layer_summary = {}
    for j, name in enumerate(layers):
        sig = [r[f"{name}.sigma"] for r in rows[: T + 1]]
        lm, ls = pred.layer_mean[:, j].tolist(), pred.layer_var[:, j].sqrt().tolist()
        obs = [r.get(f"{name}.dsigma_observed") for r in train_rows]
        first = [r.get(f"{name}.dsigma_first") for r in train_rows]
        second = [r.get(f"{name}.dsigma_second") for r in train_rows]
        dropped = [r.get(f"{name}.dropped_drift_term") for r in train_rows]
        ok = [i for i in range(T) if obs[i] is not None and first[i] is not None and second[i] is not None]
        layer_summary[name] = {
            "sigma0": sig[0],
            "sigma_T_observed": sig[T],
            "sigma_T_predicted_mean": lm[T],
            "sigma_T_predicted_std": ls[T],
            "fraction_in_2std": sum(abs(sig[t] - lm[t]) <= 2 * ls[t] for t in range(1, T + 1)) / T,
            "cumulative_mu": sum(s[name].mu for s in per_layer),
            "cumulative_psi": sum(s[name].psi for s in per_layer),
            "discrete_first_order_error": (sum(abs(obs[i] - first[i]) for i in ok) / len(ok)) if ok else None,
            "discrete_second_order_error": (sum(abs(obs[i] - second[i]) for i in ok) / len(ok))
            if ok
            else None,
            "cumulative_dropped_drift_term": sum(d for d in dropped if d is not None),
            "degenerate_steps": int(sum(bool(r.get(f"{name}.degenerate")) for r in train_rows)),
        }
    return {
        "steps": T,
        "forecast": forecast,
        "one_step_decomposition": decomposition,
        "K0": K_obs[0],
        "K_T_observed": K_obs[T],
        "K_T_predicted_mean": _finite_or_none(mean[T]),
        "K_T_predicted_std": _finite_or_none(std[T]),
        "relative_error": verdict["relative_error"],
        "fraction_in_2std": verdict["coverage"],
        "z_final": verdict["z_final"],
        "verdict": verdict["verdict"],
        "verdict_reasons": verdict["reasons"],
        "prediction_verdict": verdict,
        **stability,
        "psi_mu_ratio": cum_psi / abs(cum_mu) if cum_mu != 0 else math.inf,
        "cumulative_mu": cum_mu,
        "cumulative_psi": cum_psi,
        "cumulative_phi_sq": cum_phi,
        "cumulative_phi_sq_cross": sum(cross) if cross else None,
        "log_bound_change_observed": math.log(K_obs[T]) - math.log(K_obs[0]),
        "log_bound_change_predicted": sum(t.mu + t.psi - 0.5 * t.phi_sq for t in net),
        **full,
        "final_loss": train_rows[-1]["loss"],
        "layers": layer_summary,
        "config": meta.get("config"),
    }


def plot_run(run_dir: str | Path, path: str | Path) -> Path:
    """Figure in the style of the paper's Figure 2: top row, observed sigma_1 of every layer and
    the network bound K against the predicted mean with an E +/- 2 std band; bottom row, the
    network terms mu_bar, psi_bar, phi_bar^2 and the per-layer mu, psi, phi over time. Refuses a
    diverged run (non-finite observation) like :func:`summarize_run`; an overflowed prediction is not drawn."""  # noqa: E501
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    meta, layers, rows, train_rows, net, per_layer = _series(run_dir)
    T = len(train_rows)
    K_obs, pred = _checked_prediction(run_dir, meta, rows, T, net, per_layer)
    full_series = _full_mu_series(layers, train_rows, net)
    forecast = _checked_prediction(run_dir, meta, rows, T, full_series)[1] if full_series else None
    steps = list(range(T + 1))
    ncol = max(len(layers) + 1, 5)

    def finite(x):  # an overflowed prediction is left out of the figure, not drawn as inf
        x = x.numpy().copy()
        x[~np.isfinite(x)] = np.nan
        return x

    fig, axes = plt.subplots(2, ncol, figsize=(3.2 * ncol, 6.4), squeeze=False)
    for j, name in enumerate([*layers, "K"]):
        ax = axes[0, j]
        if name == "K":
            obs, mean, std = K_obs, pred.mean, pred.std
            ax.set_title("network bound K")
            if forecast is not None:
                fm, fs = finite(forecast.mean), finite(forecast.std)
                ax.fill_between(steps, fm - 2 * fs, fm + 2 * fs, color="C2", alpha=0.3)
                ax.plot(steps, fm, color="C2", lw=1.4, label="forecast E ± 2 std (full-data mu)")
        else:
            obs = [r[f"{name}.sigma"] for r in rows[: T + 1]]
            mean, std = pred.layer_mean[:, j], pred.layer_var[:, j].sqrt()
            ax.set_title(f"{name}: sigma_1")
        mean, std = finite(mean), finite(std)
        gone = np.isnan(mean) | np.isnan(std)
        mean[gone], std[gone] = np.nan, np.nan
        label = "one-step-ahead decomposition\nof the realised path (batch mu)"
        ax.fill_between(steps, mean - 2 * std, mean + 2 * std, color="C1", alpha=0.25)
        ax.plot(steps, mean, color="C1", lw=1.0, ls="--", label=f"{label}, E ± 2 std")
        ax.plot(steps, obs, color="C0", lw=1.0, label="observed")
        ax.set_xlabel("step")
        if name == "K" and len(layers) + 1 < ncol:  # the spare panel holds the legend
            axes[0, len(layers) + 1].legend(*ax.get_legend_handles_labels(), loc="center", fontsize=7)
        elif j == 0 or name == "K":
            ax.legend(fontsize=6)
    for ax in axes[0, len(layers) + 1 :]:
        ax.axis("off")
    t_axis = list(range(T))
    ax = axes[1, 0]
    ax.plot(t_axis, [t.mu for t in net], label="mu_bar")
    ax.plot(t_axis, [t.psi for t in net], label="psi_bar")
    ax.plot(t_axis, [0.5 * t.phi_sq for t in net], label="phi_bar^2 / 2")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("network terms (per step)")
    ax.legend(fontsize=7)
    for ax, key, title in zip(
        axes[1, 1:4], ("mu", "psi", "phi"), ("mu (drift)", "psi (curvature)", "phi (diffusion)"), strict=True
    ):
        for name in layers:
            ax.plot(t_axis, [getattr(s[name], key) for s in per_layer], lw=0.8, label=name)
        if key != "mu":
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"layers: {title}")
        ax.legend(fontsize=7)
    ax = axes[1, 4]
    log_obs = [math.log(k) for k in K_obs]
    qq = [("C2", "forecast", full_series), ("C1", "one-step decomposition", net)]
    for color, label, series in qq:
        if series is None:
            continue
        z = sorted(v for v in z_scores(log_obs, *log_bound_forecast(log_obs[0], series)) if v is not None)
        if z:
            from scipy.stats import norm

            theory = norm.ppf((np.arange(1, len(z) + 1) - 0.5) / len(z))
            ax.plot(theory, z, ".", ms=2, color=color, label=label)
    ax.plot([-3, 3], [-3, 3], color="k", lw=0.6, label="N(0, 1)")
    ax.set_title("calibration: z of ln K_t (QQ)")
    ax.set_xlabel("N(0, 1) quantile")
    ax.legend(fontsize=6)
    for ax in axes[1, 5:]:
        ax.axis("off")
    for ax in axes[1, :4]:
        ax.set_xlabel("step")
    cfg = meta.get("config", {})
    fig.suptitle(
        f"{cfg.get('model')} on {cfg.get('dataset')}: b={cfg.get('batch_size')}, lr={cfg.get('lr')}, "
        f"T={T} (arXiv 2506.18588, Thm 17)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
