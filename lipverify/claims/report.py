"""Section 8 implications of arXiv 2506.18588 as pass/fail claims on a sweep's runs (issue 6).

``report_sweep(sweep_dir)`` reads a sweep directory (see :mod:`lipverify.sweep`), summarises every
complete run, evaluates the sweep's claim, draws its figures (PNG) and writes ``claims.md`` and
``claims.json``. The evaluation functions are pure functions of run *records*::

    {"name": str, "config": TrainConfig dict, "summary": lipverify.prediction.summarize_run(...),
     "series": {steps.csv column: list of floats}, "layers": {layer: {"m": int, "n": int}}}

Each returns :class:`ClaimResult` objects stating the prediction, the measured numbers with their
uncertainty, the rule and the verdict: ``pass``, ``fail`` (the data refute the prediction under the
rule) or ``inconclusive`` (not enough data to apply the rule). Thresholds come from the stated
uncertainty (Tracy-Widom scale, seed spread, chi-square intervals), never from the outcome.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from lipverify._validation import LipverifyError
from lipverify.sweep import atomic_write_json, atomic_write_text, read_sweep

#: Tracy-Widom (beta = 1) mean and standard deviation (Tracy & Widom 1996; Johnstone 2001).
TW1_MEAN = -1.2065
TW1_STD = 1.2680

#: Significance level of every one-sided / two-sided test below (Bonferroni-split where stated).
ALPHA = 0.05


@dataclass
class ClaimResult:
    """One row of the claims table."""

    id: str
    title: str
    paper: str
    prediction: str
    measured: str
    rule: str
    verdict: str  # "pass" | "fail" | "inconclusive"
    numbers: dict = field(default_factory=dict)
    figure: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def as_dict(self) -> dict:
        return asdict(self)


def _verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def _inconclusive(id_: str, title: str, paper: str, prediction: str, rule: str, why: str) -> ClaimResult:
    return ClaimResult(id_, title, paper, prediction, f"not evaluated: {why}", rule, "inconclusive")


def _check_options(name: str, options: Mapping[str, Any], allowed: Sequence[str]) -> None:
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise LipverifyError(f"claim {name}: unknown option(s) {bad}; allowed: {list(allowed)}")


# --------------------------------------------------------------------------------------------------
# statistics helpers


def spearman(x: Sequence[float], y: Sequence[float], alternative: str) -> tuple[float, float]:
    """Spearman rank correlation and its p-value for ``alternative`` ('greater' or 'less')."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), 1.0
    res = stats.spearmanr(x, y, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def group_by(records: Sequence[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {}
    for r in records:
        out.setdefault(key(r), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: kv[0]))


def level_stats(groups: Mapping[float, Sequence[float]]) -> list[dict]:
    """Per level: mean, sample std and standard error of the mean (SE = 0 for a single value)."""
    rows = []
    for level, values in sorted(groups.items()):
        v = np.asarray(values, dtype=float)
        sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(
            {"level": level, "n": len(v), "mean": float(v.mean()), "std": sd, "se": sd / math.sqrt(len(v))}
        )
    return rows


def adjacent_reversals(rows: Sequence[dict], direction: int, k: float = 2.0) -> list[dict]:
    """Adjacent levels whose means move against ``direction`` (+1 increasing, -1 decreasing) by more
    than ``k`` combined standard errors ``sqrt(se_i^2 + se_j^2)`` (monotone within the seed spread)."""
    bad = []
    for a, b in itertools.pairwise(rows):
        step = direction * (b["mean"] - a["mean"])
        tol = k * math.hypot(a["se"], b["se"])
        if step < -tol:
            bad.append(
                {"from": a["level"], "to": b["level"], "change": b["mean"] - a["mean"], "tolerance": tol}
            )
    return bad


def chi2_std_interval(s: float, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided (1 - alpha) interval for a Gaussian population std from a sample std ``s`` of ``n``
    values: ``[s sqrt((n-1)/chi2_{1-alpha/2}), s sqrt((n-1)/chi2_{alpha/2})]``."""
    df = n - 1
    return (
        s * math.sqrt(df / stats.chi2.ppf(1 - alpha / 2, df)),
        s * math.sqrt(df / stats.chi2.ppf(alpha / 2, df)),
    )


def t_interval(values: Sequence[float], alpha: float = ALPHA) -> tuple[float, float, float]:
    """Mean and two-sided (1 - alpha) Student-t interval of the mean."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    half = float(stats.t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return f"{x:.{digits}g}"


def _fmt_p(p: float) -> str:
    """A p-value for the table (values below 1e-6 are shown as a bound)."""
    return "< 1e-6" if p < 1e-6 else f"= {p:.2g}"


def _series(record: dict, key: str) -> np.ndarray:
    try:
        return np.asarray(record["series"][key], dtype=float)
    except KeyError as exc:
        raise LipverifyError(f"run {record.get('name')}: steps.csv has no column {key!r}") from exc


def _network_terms(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu_bar, psi_bar, phi_bar^2)`` per recorded step, forward-filled over the steps the probe
    skipped (``probe_every > 1`` leaves them empty), as :func:`lipverify.prediction.summarize_run`
    does: the last measured terms stand for the steps until the next measurement. The final row
    (step T, after the last update) has no terms of its own and is filled too; nothing uses it."""
    out = []
    for key in ("net_mu", "net_psi", "net_phi_sq"):
        values = _series(record, key)
        measured = np.isfinite(values)
        if not measured.any() or not measured[0]:
            raise LipverifyError(f"run {record.get('name')}: {key} is not measured at the first step")
        last = np.maximum.accumulate(np.where(measured, np.arange(len(values)), 0))
        out.append(values[last])
    return out[0], out[1], out[2]


def predicted_path(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Theorem 17 along one run's steps.csv: ``(steps, E[K_t], Var[K_t])`` at the recorded steps.

    Row i's terms (forward-filled over steps without the probe, :func:`_network_terms`) describe the
    change from step s_i to s_{i+1} and are weighted by s_{i+1} - s_i;
    ``E[K_t] = K_0 exp(sum (mu + psi))``, ``Var = E^2 (exp(sum phi^2) - 1)``.
    """
    from lipverify.dynamics import NetworkTerms, predict_bound

    steps = _series(record, "step")
    log_bound = _series(record, "log_bound")
    mu, psi, phi_sq = _network_terms(record)
    if len(steps) < 2:
        raise LipverifyError(f"run {record.get('name')}: fewer than two recorded steps")
    dt = np.diff(steps)
    terms = [
        NetworkTerms(
            log_bound=float(log_bound[i]), mu=mu[i] * dt[i], psi=psi[i] * dt[i], phi_sq=phi_sq[i] * dt[i]
        )
        for i in range(len(dt))
    ]
    pred = predict_bound(terms, math.exp(log_bound[0]))
    return steps, pred.mean.numpy(), pred.var.numpy()


# --------------------------------------------------------------------------------------------------
# 8.2 initialisation


def init_std(init: str, fan_in: int, scale: float) -> float:
    """Entry std of a weight at initialisation (MATH section 6): Kaiming normal ``sqrt(2/fan_in)``,
    PyTorch default (uniform, variance ``1/(3 fan_in)``) ``sqrt(1/(3 fan_in))``; times ``init_scale``."""
    if init == "kaiming_normal":
        return scale * math.sqrt(2.0 / fan_in)
    if init == "default":
        return scale * math.sqrt(1.0 / (3.0 * fan_in))
    raise LipverifyError(f"unknown init {init!r}")


def mp_edge(s: float, m: int, n: int) -> float:
    """Section 8.2: ``sigma_1 ~= s (sqrt m + sqrt n)`` (edge of the Marchenko-Pastur law)."""
    return s * (math.sqrt(m) + math.sqrt(n))


def tw_relative_scale(m: int, n: int) -> float:
    """Relative Tracy-Widom scale of sigma_1 around s(sqrt m + sqrt n).

    Johnstone (2001): ``lambda_max = s^2 [(sqrt m + sqrt n)^2
    + (sqrt m + sqrt n)(1/sqrt m + 1/sqrt n)^{1/3} TW1]``,
    so ``sigma_1 / (s (sqrt m + sqrt n)) - 1 ~= (1/sqrt m + 1/sqrt n)^{1/3} / (2 (sqrt m + sqrt n)) TW1``.
    """
    return (1 / math.sqrt(m) + 1 / math.sqrt(n)) ** (1 / 3) / (2 * (math.sqrt(m) + math.sqrt(n)))


def evaluate_init(records: Sequence[dict], k_tw: float = 4.0) -> list[ClaimResult]:
    """8.2: (a) sigma_1 of every layer at step 0 against ``s_l (sqrt m + sqrt n)``; (b) K_T increasing
    in K_0 across init scales.

    Rule (a): the standardised deviation ``z = (sigma_1 / edge - 1) / rho`` (rho: relative
    Tracy-Widom scale) lies within ``TW1 mean +- k_tw TW1 std`` for every layer of every run.
    Rule (b): Spearman correlation of (K_0, K_T) over all runs positive with one-sided p < 0.05.
    """
    paper = "Section 8.2"
    pred_a = "sigma_1(W_l) at init ~= s_l (sqrt m_l + sqrt n_l); K_0 ~= prod_l s_l (sqrt m_l + sqrt n_l)"
    lo, hi = TW1_MEAN - k_tw * TW1_STD, TW1_MEAN + k_tw * TW1_STD
    rule_a = (
        f"every layer's z = (sigma_1/edge - 1)/rho_TW in [{lo:.2f}, {hi:.2f}] "
        f"(Tracy-Widom mean +- {k_tw:g} sd;"
        " rho_TW = (m^-1/2 + n^-1/2)^(1/3) / (2 (sqrt m + sqrt n)))"
    )
    pred_b = "the initial bound carries through training: K_T increases with K_0 across init scales"
    rule_b = f"Spearman rho(K_0, K_T) > 0 with one-sided p < {ALPHA}"
    if not records:
        return [
            _inconclusive("8.2a", "init sigma_1 at the MP edge", paper, pred_a, rule_a, "no complete runs"),
            _inconclusive("8.2b", "K_T follows K_0", paper, pred_b, rule_b, "no complete runs"),
        ]
    layer_rows = []
    run_rows = []
    for r in records:
        cfg = r["config"]
        sigma_keys = [k for k in r["series"] if k.endswith(".sigma")]
        log_k0_pred = 0.0
        for key in sigma_keys:
            layer = key[: -len(".sigma")]
            shape = r.get("layers", {}).get(layer)
            if shape is None:
                raise LipverifyError(f"run {r.get('name')}: no shape recorded for layer {layer}")
            m, n = int(shape["m"]), int(shape["n"])
            s = init_std(cfg["init"], n, float(cfg["init_scale"]))
            edge = mp_edge(s, m, n)
            sigma0 = float(r["series"][key][0])
            z = (sigma0 / edge - 1) / tw_relative_scale(m, n)
            log_k0_pred += math.log(edge)
            layer_rows.append(
                {
                    "run": r["name"],
                    "init": cfg["init"],
                    "init_scale": cfg["init_scale"],
                    "layer": layer,
                    "m": m,
                    "n": n,
                    "sigma0": sigma0,
                    "edge": edge,
                    "ratio": sigma0 / edge,
                    "z_tw": z,
                }
            )
        summ = r["summary"]
        run_rows.append(
            {
                "run": r["name"],
                "init": cfg["init"],
                "init_scale": cfg["init_scale"],
                "K0": summ["K0"],
                "K0_predicted": math.exp(log_k0_pred),
                "K_T": summ["K_T_observed"],
                "K_T_over_K0": summ["K_T_observed"] / summ["K0"],
            }
        )
    zs = np.array([row["z_tw"] for row in layer_rows])
    ratios = np.array([row["ratio"] for row in layer_rows])
    ok_a = bool(len(zs) > 0 and np.all((zs >= lo) & (zs <= hi)))
    worst = layer_rows[int(np.argmax(np.abs(zs - TW1_MEAN)))] if len(zs) else None
    k0_ratio = np.array([row["K0"] / row["K0_predicted"] for row in run_rows])
    a = ClaimResult(
        "8.2a",
        "init sigma_1 at the Marchenko-Pastur edge",
        paper,
        pred_a,
        (
            f"sigma_1/edge over {len(zs)} layer-runs: {_fmt(ratios.min())}..{_fmt(ratios.max())}; z_TW "
            f"{_fmt(zs.min())}..{_fmt(zs.max())} (worst {worst['layer']} {worst['m']}x{worst['n']}, "
            f"{worst['init']} s={worst['init_scale']}); "
            f"K_0/K_0_pred {_fmt(k0_ratio.min())}..{_fmt(k0_ratio.max())}"
        )
        if worst
        else "no layers",
        rule_a,
        _verdict(ok_a),
        numbers={"layers": layer_rows, "z_interval": [lo, hi]},
    )
    k0 = [row["K0"] for row in run_rows]
    kt = [row["K_T"] for row in run_rows]
    if len(run_rows) < 3:
        b = _inconclusive("8.2b", "K_T follows K_0", paper, pred_b, rule_b, f"{len(run_rows)} runs (< 3)")
    else:
        rho, p = spearman(k0, kt, "greater")
        slope = float(np.polyfit(np.log(k0), np.log(kt), 1)[0])
        b = ClaimResult(
            "8.2b",
            "K_T follows K_0",
            paper,
            pred_b,
            f"Spearman rho = {_fmt(rho)} (p {_fmt_p(p)}, {len(run_rows)} runs); log-log slope of K_T on K_0 "
            f"{_fmt(slope)}; K_T/K_0 {_fmt(min(r['K_T_over_K0'] for r in run_rows))}.."
            f"{_fmt(max(r['K_T_over_K0'] for r in run_rows))}",
            rule_b,
            _verdict(bool(rho > 0 and p < ALPHA)),
            numbers={"runs": run_rows, "spearman_rho": rho, "p_value": p, "loglog_slope": slope},
        )
    return [a, b]


# --------------------------------------------------------------------------------------------------
# 8.3 near convergence


def evaluate_near_convergence(
    records: Sequence[dict], window: float = 0.25, loss_threshold: float = 0.05
) -> list[ClaimResult]:
    """8.3 / Proposition 20: near convergence mu_bar -> 0 while psi_bar stays > 0, so E[K_t] grows.

    Windows: the first and the last ``window`` fraction of the recorded steps. Per run
    ``R = sum psi_bar / |sum mu_bar|`` in each window. Rule (a): the mean over runs of
    ``ln(R_late / R_early)`` has a 95% t-interval above 0 (psi gains on mu). Rule (b): the late-window
    increase of ln K (observed) has a 95% t-interval above 0 (the bound keeps growing). Precondition:
    late mean training loss below ``loss_threshold`` (else inconclusive: not near convergence).
    """
    paper = "Section 8.3, Proposition 20"
    pred_a = "late phase: mu_bar -> 0 while psi_bar > 0, so psi_bar / |mu_bar| grows"
    rule_a = "mean over runs of ln(R_late/R_early), R = sum psi_bar/|sum mu_bar|: 95% t-interval > 0"
    pred_b = "E[K_t] keeps growing near convergence (does not settle)"
    rule_b = "late-window increase of ln K (observed): 95% t-interval over runs > 0"
    rows = []
    for r in records:
        steps = _series(r, "step")
        n = len(steps)
        w = max(2, round(window * n))
        if n < 2 * w:
            raise LipverifyError(f"run {r.get('name')}: {n} steps are too few for windows of {w}")
        mu, psi, phi_sq = _network_terms(r)
        loss = _series(r, "loss")
        log_k = _series(r, "log_bound")
        early, late = slice(0, w), slice(n - w, n)
        late_terms = slice(n - w, n - 1)  # the last row (step T) has no update, so no terms
        r_early = psi[early].sum() / max(abs(mu[early].sum()), 1e-300)
        r_late = psi[late_terms].sum() / max(abs(mu[late_terms].sum()), 1e-300)
        rows.append(
            {
                "run": r["name"],
                "loss_early": float(np.nanmean(loss[early])),
                "loss_late": float(np.nanmean(loss[late])),
                "mu_early": float(mu[early].mean()),
                "mu_late": float(mu[late_terms].mean()),
                "psi_early": float(psi[early].mean()),
                "psi_late": float(psi[late_terms].mean()),
                "ratio_early": float(r_early),
                "ratio_late": float(r_late),
                "log_ratio_change": float(math.log(r_late / r_early))
                if r_early > 0 and r_late > 0
                else math.nan,
                "late_log_k_increase": float(log_k[-1] - log_k[n - w]),
                "late_predicted_log_drift": float((mu + psi - 0.5 * phi_sq)[late_terms].sum()),
                "late_diffusion_std": float(math.sqrt(phi_sq[late_terms].sum())),
                "cumulative_mu": float(mu[:-1].sum()),
                "cumulative_psi": float(psi[:-1].sum()),
            }
        )
    if len(rows) < 2:
        why = f"{len(rows)} complete run(s); the t-interval needs >= 2 seeds"
        return [
            _inconclusive("8.3a", "psi overtakes mu", paper, pred_a, rule_a, why),
            _inconclusive("8.3b", "bound keeps growing", paper, pred_b, rule_b, why),
        ]
    loss_late = max(row["loss_late"] for row in rows)
    converged = loss_late < loss_threshold
    numbers = {"runs": rows, "loss_late_max": loss_late, "loss_threshold": loss_threshold}
    out = []
    changes = [row["log_ratio_change"] for row in rows]
    if not converged:
        why = f"late training loss {_fmt(loss_late)} >= {loss_threshold}: not near convergence"
        out.append(_inconclusive("8.3a", "psi overtakes mu", paper, pred_a, rule_a, why))
        out.append(_inconclusive("8.3b", "bound keeps growing", paper, pred_b, rule_b, why))
        for c in out:
            c.numbers = numbers
        return out
    if not all(math.isfinite(c) for c in changes):
        a = _inconclusive("8.3a", "psi overtakes mu", paper, pred_a, rule_a, "psi/mu ratio not positive")
    else:
        mean, lo, hi = t_interval(changes)
        a = ClaimResult(
            "8.3a",
            "psi overtakes mu",
            paper,
            pred_a,
            f"mean mu_bar early {_fmt(np.mean([r['mu_early'] for r in rows]))} -> late "
            f"{_fmt(np.mean([r['mu_late'] for r in rows]))}, psi_bar "
            f"{_fmt(np.mean([r['psi_early'] for r in rows]))} -> "
            f"{_fmt(np.mean([r['psi_late'] for r in rows]))}; "
            f"psi/|mu| early {_fmt(np.mean([r['ratio_early'] for r in rows]))} -> late "
            f"{_fmt(np.mean([r['ratio_late'] for r in rows]))}; ln(late/early) = {_fmt(mean)} "
            f"[95% CI {_fmt(lo)}, {_fmt(hi)}], {len(rows)} runs; late loss <= {_fmt(loss_late)}",
            rule_a,
            _verdict(lo > 0),
            numbers=numbers | {"log_ratio_change_mean": mean, "ci": [lo, hi]},
        )
    out.append(a)
    inc = [row["late_log_k_increase"] for row in rows]
    mean, lo, hi = t_interval(inc)
    out.append(
        ClaimResult(
            "8.3b",
            "bound keeps growing",
            paper,
            pred_b,
            f"late increase of ln K = {_fmt(mean)} [95% CI {_fmt(lo)}, {_fmt(hi)}]; predicted late log-drift "
            f"{_fmt(np.mean([r['late_predicted_log_drift'] for r in rows]))} "
            f"(+- {_fmt(np.mean([r['late_diffusion_std'] for r in rows]))} diffusion sd)",
            rule_b,
            _verdict(lo > 0),
            numbers=numbers | {"late_increase_mean": mean, "ci": [lo, hi]},
        )
    )
    return out


# --------------------------------------------------------------------------------------------------
# 8.4 noisy gradients and 8.5 label noise: monotonicity


def _monotone_claim(
    id_: str,
    title: str,
    paper: str,
    prediction: str,
    groups: Mapping[Any, Mapping[float, list[float]]],
    direction: int,
    level_name: str,
    predicted: Mapping[Any, Mapping[float, list[float]]] | None = None,
) -> ClaimResult:
    """Monotonicity of the final bound in a level (direction +1: increasing), per group."""
    alt = "greater" if direction > 0 else "less"
    rule = (
        f"per group: Spearman rho({level_name}, K_T) {'>' if direction > 0 else '<'} 0 with one-sided "
        f"p < {ALPHA}, and no adjacent pair of levels reversing by more than 2 combined SEs (seed spread)"
    )
    if not groups:
        return _inconclusive(id_, title, paper, prediction, rule, "no complete runs")
    parts = []
    details = {}
    ok_all = True
    for g, levels in groups.items():
        xs = [lv for lv, vals in levels.items() for _ in vals]
        ys = [v for vals in levels.values() for v in vals]
        rows = level_stats(levels)
        if len(rows) < 2 or len(xs) < 3:
            return _inconclusive(
                id_, title, paper, prediction, rule, f"group {g}: fewer than 2 levels / 3 runs"
            )
        rho, p = spearman(xs, ys, alt)
        reversals = adjacent_reversals(rows, direction)
        ok = bool(rho * direction > 0 and p < ALPHA and not reversals)
        ok_all &= ok
        entry = {"spearman_rho": rho, "p_value": p, "levels": rows, "reversals": reversals, "pass": ok}
        text = f"{g}: rho = {_fmt(rho)} (p {_fmt_p(p)}), {len(reversals)} reversal(s)"
        if predicted is not None and g in predicted:
            pl = predicted[g]
            prho, pp = spearman(
                [lv for lv, vals in pl.items() for _ in vals], [v for vals in pl.values() for v in vals], alt
            )
            entry.update(predicted_rho=prho, predicted_p=pp, predicted_levels=level_stats(pl))
            text += f"; predicted E[K_T] rho = {_fmt(prho)}"
        details[str(g)] = entry
        parts.append(text)
    return ClaimResult(
        id_, title, paper, prediction, "; ".join(parts), rule, _verdict(ok_all), numbers=details
    )


def evaluate_noisy_gradient(records: Sequence[dict]) -> list[ClaimResult]:
    """8.4: gradient replaced by ``alpha g + beta xi``: ``mu -> alpha mu``,
    ``psi -> alpha^2 psi + beta^2 (eta^2/2b) tr(H Sigma_xi)``; the bound shrinks as alpha decreases.

    Groups: noise kind and beta; level: alpha (``grad_scale``). Rule: see :func:`_monotone_claim`
    (K_T increasing in alpha in every group); predicted E[K_T] (summarize_run) reported alongside.
    """

    def key(r: dict) -> str:
        c = r["config"]
        return "none" if c["grad_noise"] == "none" else f"{c['grad_noise']} beta={_fmt(c['grad_noise_std'])}"

    obs: dict[str, dict[float, list[float]]] = {}
    pred: dict[str, dict[float, list[float]]] = {}
    rel = []
    for r in records:
        a = float(r["config"]["grad_scale"])
        obs.setdefault(key(r), {}).setdefault(a, []).append(r["summary"]["K_T_observed"])
        pred.setdefault(key(r), {}).setdefault(a, []).append(r["summary"]["K_T_predicted_mean"])
        rel.append(abs(r["summary"]["relative_error"]))
    claim = _monotone_claim(
        "8.4",
        "noisy gradient: bound shrinks as alpha decreases",
        "Section 8.4",
        "K_T (and predicted E[K_T]) increase monotonically with the gradient scale alpha, "
        "for every noise kind",
        obs,
        +1,
        "alpha",
        pred,
    )
    if rel and claim.verdict != "inconclusive":
        claim.measured += f"; |observed - predicted|/observed: median {_fmt(float(np.median(rel)))}"
        claim.numbers["relative_error_median"] = float(np.median(rel))
    return [claim]


def evaluate_label_noise(records: Sequence[dict], alpha: float = ALPHA) -> list[ClaimResult]:
    """8.5: labels corrupted uniformly with probability p: ``mu -> (1 - p) mu``, so
    ``E[K_T] ~= K_0 exp((1 - p) int mu_bar + int psi_bar)`` shrinks monotonically in p.

    (a) monotonicity: K_T decreasing in p (see :func:`_monotone_claim`). (b) the (1 - p) drift scaling:
    per level p, ``ln K_T`` observed against Theorem 15's ``E[ln K_T] = ln K_0 + (1 - p) M_0 + Psi_p -
    Phi_p / 2`` (M_0: mean cumulative mu_bar of the p = 0 runs; Psi_p, Phi_p: the run's own cumulative
    psi_bar and phi_bar^2; ``ln E[K_T]`` of Theorem 16 lacks the ``- Phi/2``); rule: for every p > 0,
    ``|mean difference| <= z_{1 - alpha/(2k)} u_p`` (Bonferroni over the k levels), with
    ``u_p^2 = s_p^2 / n_p + ((1 - p) SE(M_0))^2``: the seed spread s_p of the difference (it already
    holds the diffusion of ln K_T; with one seed, Theorem 15's variance Phi_p stands in for it) and
    the uncertainty of the p = 0 drift.
    """
    paper = "Section 8.5"
    groups = {"all": {}}
    for r in records:
        groups["all"].setdefault(float(r["config"]["label_noise"]), []).append(r["summary"]["K_T_observed"])
    a = _monotone_claim(
        "8.5a",
        "label noise: bound shrinks as p grows",
        paper,
        "K_T decreases monotonically with the corruption probability p",
        groups if records else {},
        -1,
        "p",
    )
    pred_b = "drift scales like (1 - p): E[ln K_T] = ln K_0 + (1 - p) M_0 + Psi_p - Phi_p / 2"
    by_p = group_by(records, lambda r: float(r["config"]["label_noise"]))
    levels = [p for p in by_p if p > 0]
    k = max(len(levels), 1)
    zcrit = float(stats.norm.ppf(1 - alpha / (2 * k)))
    rule_b = (
        f"every p > 0: |mean(ln K_T obs - pred)| <= {zcrit:.2f} u_p (Bonferroni over {k} levels), "
        "u_p^2 = (seed var of the difference)/n + ((1-p) SE(M_0))^2, "
        "pred = ln K_0 + (1-p) M_0 + Psi - Phi/2"
    )
    if 0.0 not in by_p or not levels:
        return [
            a,
            _inconclusive(
                "8.5b", "(1 - p) drift scaling", paper, pred_b, rule_b, "need p = 0 and p > 0 runs"
            ),
        ]
    m0_values = [r["summary"]["cumulative_mu"] for r in by_p[0.0]]
    m0 = float(np.mean(m0_values))
    m0_se = float(np.std(m0_values, ddof=1) / math.sqrt(len(m0_values))) if len(m0_values) > 1 else 0.0
    rows = []
    ok = True
    for p in levels:
        diffs, phis, mu_ratio = [], [], []
        for r in by_p[p]:
            s = r["summary"]
            pred_log = math.log(s["K0"]) + (1 - p) * m0 + s["cumulative_psi"] - 0.5 * s["cumulative_phi_sq"]
            diffs.append(math.log(s["K_T_observed"]) - pred_log)
            phis.append(s["cumulative_phi_sq"])
            mu_ratio.append(s["cumulative_mu"] / m0 if m0 != 0 else math.nan)
        n = len(diffs)
        spread = float(np.var(diffs, ddof=1)) if n > 1 else phis[0]
        u = math.sqrt(spread / n + ((1 - p) * m0_se) ** 2)
        mean = float(np.mean(diffs))
        passed = abs(mean) <= zcrit * u
        ok &= passed
        rows.append(
            {
                "p": p,
                "n": n,
                "mean_log_difference": mean,
                "u": u,
                "z": mean / u if u > 0 else math.inf,
                "mu_ratio_measured": float(np.mean(mu_ratio)),
                "mu_ratio_predicted": 1 - p,
                "pass": passed,
            }
        )
    b = ClaimResult(
        "8.5b",
        "(1 - p) drift scaling",
        paper,
        pred_b,
        "; ".join(
            f"p={_fmt(r['p'])}: ln-diff {_fmt(r['mean_log_difference'])} +- {_fmt(r['u'])} "
            f"(M_p/M_0 {_fmt(r['mu_ratio_measured'])} vs {_fmt(r['mu_ratio_predicted'])})"
            for r in rows
        ),
        rule_b,
        _verdict(ok),
        numbers={"M0": m0, "M0_se": m0_se, "levels": rows, "z_critical": zcrit},
    )
    return [a, b]


# --------------------------------------------------------------------------------------------------
# 8.6 batch size and 8.7 trajectories


def fit_log_slope(b: Sequence[float], s: Sequence[float], n: Sequence[int]) -> tuple[float, float]:
    """Weighted least squares slope of ``ln s`` on ``ln b`` and its standard error.

    For a Gaussian sample std of n values, ``Var[ln s] ~= 1 / (2 (n - 1))`` (chi-square delta method),
    so the weights are ``2 (n - 1)`` and ``SE = (sum w (x - x_w)^2)^(-1/2)``.
    """
    x = np.log(np.asarray(b, dtype=float))
    y = np.log(np.asarray(s, dtype=float))
    w = 2.0 * (np.asarray(n, dtype=float) - 1.0)
    xw = float((w * x).sum() / w.sum())
    sxx = float((w * (x - xw) ** 2).sum())
    slope = float((w * (x - xw) * y).sum() / sxx)
    return slope, 1.0 / math.sqrt(sxx)


def evaluate_batch_size(records: Sequence[dict], alpha: float = ALPHA) -> list[ClaimResult]:
    """8.6 / Proposition 21: ``Var[K_T] = E[K_T]^2 (exp(int c_bar / b) - 1)``, so std(K_T) across
    sampling seeds ~ b^(-1/2).

    (a) exponent: weighted slope of ln std(K_T) on ln b (see :func:`fit_log_slope`); rule: -1/2 inside
    slope +- z_{1-alpha/2} SE. (b) magnitude: for every b, the predicted std (Theorem 17, mean of
    summarize_run's K_T_predicted_std over the seeds) inside the chi-square (1 - alpha/k) interval of the
    empirical std (Bonferroni over the k batch sizes).
    """
    paper = "Section 8.6, Proposition 21"
    pred_a = "std of K_T across sampling seeds falls like b^(-1/2)"
    z = float(stats.norm.ppf(1 - alpha / 2))
    rule_a = f"-0.5 inside fitted exponent +- {z:.2f} SE (weights 2(n-1): chi-square delta method)"
    pred_b = "std(K_T) across seeds = sqrt(Var[K_T]) of Theorem 17 at every b"
    by_b = group_by(records, lambda r: int(r["config"]["batch_size"]))
    k = max(len(by_b), 1)
    rule_b = (
        f"predicted std inside the chi-square {1 - alpha / k:.3g} interval of the empirical std at every b"
    )
    rows = []
    for b, runs in by_b.items():
        kt = np.array([r["summary"]["K_T_observed"] for r in runs])
        if len(kt) < 2:
            continue
        s = float(kt.std(ddof=1))
        pred = float(np.sqrt(np.mean([r["summary"]["K_T_predicted_std"] ** 2 for r in runs])))
        lo, hi = chi2_std_interval(s, len(kt), alpha / k)
        rows.append(
            {
                "batch_size": b,
                "n": len(kt),
                "mean_K_T": float(kt.mean()),
                "std_K_T": s,
                "predicted_std": pred,
                "ratio": s / pred if pred > 0 else math.inf,
                "ci": [lo, hi],
                "pass": lo <= pred <= hi,
            }
        )
    if len(rows) < 2 or any(r["std_K_T"] <= 0 for r in rows):
        why = "need >= 2 batch sizes with >= 2 seeds each and non-zero spread"
        return [
            _inconclusive("8.6a", "std(K_T) ~ b^-1/2", paper, pred_a, rule_a, why),
            _inconclusive("8.6b", "std(K_T) magnitude", paper, pred_b, rule_b, why),
        ]
    bs = [r["batch_size"] for r in rows]
    slope, se = fit_log_slope(bs, [r["std_K_T"] for r in rows], [r["n"] for r in rows])
    pred_slope = float(np.polyfit(np.log(bs), np.log([r["predicted_std"] for r in rows]), 1)[0])
    a = ClaimResult(
        "8.6a",
        "std(K_T) ~ b^-1/2",
        paper,
        pred_a,
        f"fitted exponent {_fmt(slope)} +- {_fmt(se)} (SE) over b = {bs}, {min(r['n'] for r in rows)}+ seeds "
        f"each; exponent of the predicted std {_fmt(pred_slope)}",
        rule_a,
        _verdict(abs(slope + 0.5) <= z * se),
        numbers={
            "slope": slope,
            "se": se,
            "ci": [slope - z * se, slope + z * se],
            "predicted_slope": pred_slope,
            "levels": rows,
        },
    )
    b_claim = ClaimResult(
        "8.6b",
        "std(K_T) magnitude",
        paper,
        pred_b,
        "; ".join(
            f"b={r['batch_size']}: emp/pred {_fmt(r['ratio'])} (CI of emp std {_fmt(r['ci'][0])}.."
            f"{_fmt(r['ci'][1])}, pred {_fmt(r['predicted_std'])})"
            for r in rows
        ),
        rule_b,
        _verdict(all(r["pass"] for r in rows)),
        numbers={"levels": rows},
    )
    return [a, b_claim]


def trajectory_spread(records: Sequence[dict]) -> dict:
    """Across runs sharing an initialisation: steps, empirical std of K_t, predicted std (Theorem 17
    variance averaged over the runs), mean observed K_t and mean predicted E[K_t]."""
    paths = [predicted_path(r) for r in records]
    n_steps = min(len(p[0]) for p in paths)
    steps = paths[0][0][:n_steps]
    for p in paths:
        if not np.array_equal(p[0][:n_steps], steps):
            raise LipverifyError("trajectories: runs recorded different steps")
    k_obs = np.stack([np.exp(_series(r, "log_bound")[:n_steps]) for r in records])
    var_pred = np.stack([p[2][:n_steps] for p in paths])
    mean_pred = np.stack([p[1][:n_steps] for p in paths])
    return {
        "steps": steps,
        "empirical_std": k_obs.std(axis=0, ddof=1),
        "predicted_std": np.sqrt(var_pred.mean(axis=0)),
        "observed_mean": k_obs.mean(axis=0),
        "predicted_mean": mean_pred.mean(axis=0),
        "observed": k_obs,
    }


def evaluate_trajectories(
    records: Sequence[dict], checkpoints: int = 4, alpha: float = ALPHA
) -> list[ClaimResult]:
    """8.7: same initialisation, different mini-batch seeds: std of K_t across seeds equals
    ``sqrt(Var[K_t])``, ``Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1)`` (Theorem 17).

    Rule: at ``checkpoints`` evenly spaced steps (the last is T), the predicted std lies inside the
    chi-square (1 - alpha/checkpoints) interval of the empirical std across the n seeds.
    """
    paper = "Section 8.7, Theorem 17"
    pred = "spread of K_t across sampling seeds = sqrt(Var[K_t]) (Theorem 17) along the run"
    rule = (
        f"predicted std inside the chi-square {1 - alpha / checkpoints:.3g} interval of the empirical std "
        f"at {checkpoints} evenly spaced steps (Bonferroni)"
    )
    configs = {
        json.dumps({k: v for k, v in r["config"].items() if k != "seed_sampling"}, sort_keys=True)
        for r in records
    }
    if len(configs) > 1:
        raise LipverifyError("trajectories: runs differ in more than seed_sampling")
    if len(records) < 3:
        return [_inconclusive("8.7", "trajectory spread", paper, pred, rule, f"{len(records)} runs (< 3)")]
    spread = trajectory_spread(records)
    steps = spread["steps"]
    n = len(records)
    idx = sorted({round(j * (len(steps) - 1) / checkpoints) for j in range(1, checkpoints + 1)})
    rows = []
    for i in idx:
        s, p = float(spread["empirical_std"][i]), float(spread["predicted_std"][i])
        lo, hi = chi2_std_interval(s, n, alpha / checkpoints)
        rows.append(
            {
                "step": float(steps[i]),
                "empirical_std": s,
                "predicted_std": p,
                "ratio": s / p if p > 0 else math.inf,
                "ci": [lo, hi],
                "pass": lo <= p <= hi,
            }
        )
    ratio_all = spread["empirical_std"][1:] / np.maximum(spread["predicted_std"][1:], 1e-300)
    return [
        ClaimResult(
            "8.7",
            "trajectory spread",
            paper,
            pred,
            f"{n} seeds; emp/pred std at steps {[int(r['step']) for r in rows]}: "
            f"{[_fmt(r['ratio']) for r in rows]}; "
            f"median ratio over all steps {_fmt(float(np.median(ratio_all)))}",
            rule,
            _verdict(all(r["pass"] for r in rows)),
            numbers={"checkpoints": rows, "median_ratio": float(np.median(ratio_all)), "n_seeds": n},
        )
    ]


EVALUATORS: dict[str, Callable[..., list[ClaimResult]]] = {
    "init": evaluate_init,
    "near_convergence": evaluate_near_convergence,
    "noisy_gradient": evaluate_noisy_gradient,
    "label_noise": evaluate_label_noise,
    "batch_size": evaluate_batch_size,
    "trajectories": evaluate_trajectories,
}


def evaluate(
    claim: str, records: Sequence[dict], options: Mapping[str, Any] | None = None
) -> list[ClaimResult]:
    """Evaluate ``claim`` on the records with the sweep's ``[options]``."""
    import inspect

    if claim not in EVALUATORS:
        raise LipverifyError(f"unknown claim {claim!r}; known: {list(EVALUATORS)}")
    fn = EVALUATORS[claim]
    options = dict(options or {})
    _check_options(claim, options, [p for p in inspect.signature(fn).parameters if p != "records"])
    return fn(records, **options)


# --------------------------------------------------------------------------------------------------
# figures


def _plot(claim: str, records: Sequence[dict], results: Sequence[ClaimResult], out_dir: Path) -> list[str]:
    """Draw the claim's figures into ``out_dir``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        tmp = out_dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out_dir / name)
        files.append(name)

    if not records:
        return files
    if claim == "init":
        layers = results[0].numbers.get("layers", [])
        runs = results[1].numbers.get("runs", []) if len(results) > 1 else []
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for init, marker in (("kaiming_normal", "o"), ("default", "s")):
            pts = [row for row in layers if row["init"] == init]
            if pts:
                axes[0].loglog(
                    [p["edge"] for p in pts], [p["sigma0"] for p in pts], marker, label=init, alpha=0.7
                )
            rs = [row for row in runs if row["init"] == init]
            if rs:
                rs = sorted(rs, key=lambda row: row["init_scale"])
                axes[1].loglog(
                    [row["init_scale"] for row in rs],
                    [row["K0"] for row in rs],
                    marker + "-",
                    label=f"{init} K_0",
                )
                axes[1].loglog(
                    [row["init_scale"] for row in rs], [row["K0_predicted"] for row in rs], "k:", alpha=0.6
                )
                axes[1].loglog(
                    [row["init_scale"] for row in rs],
                    [row["K_T"] for row in rs],
                    marker + "--",
                    label=f"{init} K_T",
                )
                axes[2].loglog([row["K0"] for row in rs], [row["K_T"] for row in rs], marker, label=init)
        if layers:
            lim = [min(p["edge"] for p in layers), max(p["edge"] for p in layers)]
            axes[0].loglog(lim, lim, "k--", lw=1, label="s(sqrt m + sqrt n)")
        axes[0].set(
            xlabel="predicted s(sqrt m + sqrt n)", ylabel="measured sigma_1 at init", title="8.2 layers"
        )
        axes[1].set(xlabel="init scale", ylabel="bound", title="K_0 (dotted: predicted), K_T")
        axes[2].set(xlabel="K_0", ylabel="K_T", title="K_T against K_0")
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "init.png")
    elif claim == "near_convergence":
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for r in records:
            steps = _series(r, "step")
            mu, psi, _ = _network_terms(r)
            first = r is records[0]
            (line,) = axes[0].plot(steps, np.cumsum(psi), label="cumulative psi_bar" if first else None)
            axes[0].plot(
                steps,
                np.cumsum(mu),
                "--",
                color=line.get_color(),
                label="cumulative mu_bar" if first else None,
            )
            w = max(1, len(steps) // 20)
            kernel = np.ones(w) / w
            ratio = np.convolve(psi, kernel, "valid") / np.maximum(
                np.abs(np.convolve(mu, kernel, "valid")), 1e-300
            )
            axes[1].semilogy(steps[w - 1 :], ratio, color=line.get_color())
            _, mean, _var = predicted_path(r)
            axes[2].plot(steps, _series(r, "log_bound"), color=line.get_color())
            axes[2].plot(steps, np.log(mean), ":", color=line.get_color())
            ax2 = axes[2].twinx() if r is records[0] else None
            if ax2 is not None:
                ax2.semilogy(steps, _series(r, "loss"), color="grey", alpha=0.4)
                ax2.set_ylabel("training loss (grey)")
        axes[0].set_yscale("symlog", linthresh=1e-6)
        axes[0].set(
            xlabel="step",
            ylabel="cumulative (symlog)",
            title="8.3 cumulative psi_bar (solid), mu_bar (dashed)",
        )
        axes[1].set(xlabel="step", ylabel="psi_bar / |mu_bar| (moving window)", title="psi/mu ratio")
        axes[2].set(xlabel="step", ylabel="ln K", title="ln K observed (solid), ln E[K] predicted (dotted)")
        axes[0].legend(fontsize=6)
        save(fig, "near_convergence.png")
    elif claim in ("noisy_gradient", "label_noise"):
        res = results[0]
        level_name = "alpha (grad_scale)" if claim == "noisy_gradient" else "p (label_noise)"
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for g, entry in res.numbers.items():
            if not isinstance(entry, dict) or "levels" not in entry:
                continue
            rows = entry["levels"]
            x = [row["level"] for row in rows]
            ax.errorbar(
                x,
                [row["mean"] for row in rows],
                yerr=[2 * row["se"] for row in rows],
                marker="o",
                capsize=3,
                label=f"{g} observed",
            )
            if "predicted_levels" in entry:
                pr = entry["predicted_levels"]
                ax.plot(
                    [row["level"] for row in pr],
                    [row["mean"] for row in pr],
                    "x--",
                    label=f"{g} predicted E[K_T]",
                )
        if claim == "label_noise" and len(results) > 1 and "levels" in results[1].numbers:
            by_p = group_by(records, lambda r: float(r["config"]["label_noise"]))
            m0 = results[1].numbers["M0"]
            xs = sorted(by_p)
            pred = [
                np.mean(
                    [
                        r["summary"]["K0"] * math.exp((1 - p) * m0 + r["summary"]["cumulative_psi"])
                        for r in by_p[p]
                    ]
                )
                for p in xs
            ]
            ax.plot(xs, pred, "k:", label="K_0 exp((1-p) M_0 + Psi_p)")
        ax.set(xlabel=level_name, ylabel="final bound K_T (mean +- 2 SE)", title=f"{res.id} {res.title}")
        ax.legend(fontsize=7)
        save(fig, f"{claim}.png")
    elif claim == "batch_size":
        rows = results[0].numbers.get("levels", [])
        if rows:
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
            bs = np.array([r["batch_size"] for r in rows], dtype=float)
            emp = np.array([r["std_K_T"] for r in rows])
            lo = np.array([r["ci"][0] for r in rows])
            hi = np.array([r["ci"][1] for r in rows])
            ax.errorbar(
                bs, emp, yerr=[emp - lo, hi - emp], marker="o", capsize=3, label="empirical std (chi2 CI)"
            )
            ax.plot(bs, [r["predicted_std"] for r in rows], "x--", label="predicted sqrt(Var[K_T])")
            slope = results[0].numbers["slope"]
            ref = emp[0] * (bs / bs[0]) ** -0.5
            ax.plot(bs, ref, "k:", label="b^-1/2 reference")
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="batch size b",
                ylabel="std of K_T across seeds",
                title=f"8.6 fitted exponent {slope:.2f}",
            )
            ax.legend(fontsize=7)
            save(fig, "batch_size.png")
    elif claim == "trajectories" and len(records) >= 3:
        spread = trajectory_spread(records)
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        steps = spread["steps"]
        for row in spread["observed"]:
            axes[0].plot(steps, row, color="C0", alpha=0.3, lw=0.8)
        m, s = spread["predicted_mean"], spread["predicted_std"]
        axes[0].plot(steps, m, "k-", label="mean predicted E[K_t]")
        axes[0].fill_between(steps, m - 2 * s, m + 2 * s, color="k", alpha=0.15, label="+- 2 predicted std")
        axes[0].set(xlabel="step", ylabel="K_t", title="8.7 K_t across sampling seeds")
        axes[0].legend(fontsize=7)
        axes[1].plot(steps[1:], spread["empirical_std"][1:], label="empirical std across seeds")
        axes[1].plot(steps[1:], s[1:], "--", label="predicted sqrt(Var[K_t])")
        for row in results[0].numbers.get("checkpoints", []):
            axes[1].plot([row["step"]] * 2, row["ci"], "k-", lw=2)
        axes[1].set(xlabel="step", ylabel="std of K_t", title="spread (bars: chi-square CIs)", yscale="log")
        axes[1].legend(fontsize=7)
        save(fig, "trajectories.png")
    return files


# --------------------------------------------------------------------------------------------------
# reading a sweep and writing the report


def read_steps_csv(path: Path) -> dict[str, list[float]]:
    """steps.csv -> column -> list of floats (booleans as 0/1, empty cells as NaN)."""
    cols: dict[str, list[float]] = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                cols.setdefault(k, []).append(_to_float(v))
    if not cols:
        raise LipverifyError(f"{path} has no rows")
    return cols


def _to_float(v: str | None) -> float:
    if v is None or v == "":
        return math.nan
    low = v.strip().lower()
    if low in ("true", "false"):
        return 1.0 if low == "true" else 0.0
    try:
        return float(v)
    except ValueError:
        return math.nan


def layer_shapes(run_dir: Path, meta: Mapping[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """Matrix-view shapes (m, n) of the probed layers: from meta.json when it records them, else from
    the weights in checkpoint.pt (``<layer>.weight``, conv weights reshaped to (out, in*kh*kw))."""
    meta = meta or {}
    for key in ("layers", "layer_shapes"):
        value = meta.get(key)
        if isinstance(value, Mapping):
            out = {}
            for name, shape in value.items():
                if isinstance(shape, Mapping) and "m" in shape:
                    out[name] = {"m": int(shape["m"]), "n": int(shape["n"])}
                elif isinstance(shape, list | tuple) and len(shape) >= 2:
                    out[name] = {"m": int(shape[0]), "n": int(math.prod(shape[1:]))}
            if out:
                return out
    ckpt = Path(run_dir) / "checkpoint.pt"
    if not ckpt.exists():
        return {}
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for key in ("model", "model_state", "model_state_dict", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    out = {}
    for name, tensor in state.items():
        if name.endswith(".weight") and hasattr(tensor, "ndim") and tensor.ndim >= 2:
            out[name[: -len(".weight")]] = {"m": int(tensor.shape[0]), "n": int(math.prod(tensor.shape[1:]))}
    return out


def load_records(
    sweep_dir: str | Path, summarize: Callable[[Path], dict] | None = None
) -> tuple[dict, list, list]:
    """(sweep.json, records of complete runs, problem runs [{name, status, error}])."""
    sweep_dir = Path(sweep_dir)
    doc = read_sweep(sweep_dir)
    if summarize is None:
        from lipverify.prediction import summarize_run as summarize
    records, problems = [], []
    for run in doc["runs"]:
        run_dir = sweep_dir / run["dir"]
        if run.get("status") != "complete":
            problems.append({"name": run["name"], "status": run.get("status"), "error": run.get("error")})
            continue
        try:
            meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
            record = {
                "name": run["name"],
                "params": run.get("params", {}),
                "config": run["config"],
                "summary": summarize(run_dir),
                "series": read_steps_csv(run_dir / "steps.csv"),
                "layers": layer_shapes(run_dir, meta),
            }
        except Exception as exc:  # an unreadable run is reported, the others are evaluated
            problems.append(
                {"name": run["name"], "status": "unreadable", "error": f"{type(exc).__name__}: {exc}"}
            )
            continue
        records.append(record)
    return doc, records, problems


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    doc: dict,
    results: Sequence[ClaimResult],
    problems: Sequence[dict],
    n_records: int,
    figures: Sequence[str],
) -> str:
    sweep = doc["sweep"]
    lines = [
        f"# Claims: sweep `{doc.get('name', 'sweep')}` ({sweep['claim']})",
        "",
        f"{sweep.get('description', '')}".strip(),
        "",
        f"lipverify {doc.get('lipverify_version')}, sweep schema {doc.get('schema_version')}"
        f"{', SMOKE (shrunk) run' if doc.get('smoke') else ''}; runs: {len(doc['runs'])}, "
        f"evaluated: {n_records}, failed or incomplete: {len(problems)}.",
        "",
        "| id | claim | prediction | measured | rule | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in results:
        lines.append(
            f"| {c.id} | {_md_escape(c.title)} ({c.paper}) | {_md_escape(c.prediction)} "
            f"| {_md_escape(c.measured)} "
            f"| {_md_escape(c.rule)} | **{c.verdict.upper()}** |"
        )
    if problems:
        lines += ["", "## Runs not evaluated", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {p['name']} | {p['status']} | {_md_escape(p.get('error') or '')} |" for p in problems]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def report_sweep(sweep_dir: str | Path, summarize: Callable[[Path], dict] | None = None) -> int:
    """Evaluate a sweep directory's claim; write figures, ``claims.md`` and ``claims.json`` into it.

    Returns 0 when the report was written (a failing claim is a result, not an error).
    """
    sweep_dir = Path(sweep_dir)
    doc, records, problems = load_records(sweep_dir, summarize)
    claim = doc["sweep"]["claim"]
    results = evaluate(claim, records, doc["sweep"].get("options", {}))
    figures = _plot(claim, records, results, sweep_dir)
    for c in results:
        c.figure = figures[0] if figures else None
    atomic_write_text(sweep_dir / "claims.md", render_markdown(doc, results, problems, len(records), figures))
    atomic_write_json(
        sweep_dir / "claims.json",
        {
            "name": doc.get("name"),
            "claim": claim,
            "smoke": doc.get("smoke", False),
            "lipverify_version": doc.get("lipverify_version"),
            "claims": [c.as_dict() for c in results],
            "runs": [{"name": r["name"], "params": r["params"], "summary": r["summary"]} for r in records],
            "problems": list(problems),
            "figures": list(figures),
        },
    )
    print(render_markdown(doc, results, problems, len(records), []))
    return 0


def collect_results(sweep_dirs: Sequence[str | Path], dest: str | Path, command: str = "") -> Path:
    """Copy each sweep's claims.md/json and figures into ``dest/<sweep name>/`` and write one combined
    ``dest/claims.md`` (all claims of the suite) and ``dest/claims.json``. No run data or checkpoints."""
    import shutil

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows, combined = [], []
    for sd in sweep_dirs:
        sd = Path(sd)
        data = json.loads((sd / "claims.json").read_text())
        target = dest / (data.get("name") or sd.name)
        target.mkdir(parents=True, exist_ok=True)
        for f in ["claims.md", "claims.json", "sweep.json", *data.get("figures", [])]:
            if (sd / f).exists():
                tmp = target / f".{f}.tmp"
                shutil.copyfile(sd / f, tmp)
                tmp.replace(target / f)  # atomic: a reader never sees a half-copied file
        combined.append({k: v for k, v in data.items() if k != "runs"})  # run summaries stay per sweep
        for c in data["claims"]:
            rows.append(
                f"| {c['id']} | {_md_escape(c['title'])} | {_md_escape(c['measured'])} "
                f"| {_md_escape(c['rule'])} "
                f"| **{c['verdict'].upper()}** | [{target.name}]({target.name}/claims.md) |"
            )
    text = "\n".join(
        [
            "# Section 8 claims: measured verdicts",
            "",
            f"Produced by: `{command}`" if command else "",
            "",
            "| id | claim | measured | rule | verdict | details |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    atomic_write_text(dest / "claims.md", text + "\n")
    atomic_write_json(dest / "claims.json", {"sweeps": combined})
    return dest
