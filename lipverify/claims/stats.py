"""Statistics shared by the claim rules: rank correlation, per-level means, chi-square intervals of a
standard deviation, Student-t intervals, the weighted log-log slope, and the monotonicity rule of
Sections 8.4 and 8.5. All inputs are float sequences (converted to float64 numpy arrays)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from lipverify.claims.result import PAPER, ClaimResult, fmt, fmt_p, inconclusive, verdict

#: Tracy-Widom (beta = 1) mean and standard deviation (Tracy & Widom 1996; Johnstone 2001).
TW1_MEAN = -1.2065
TW1_STD = 1.2680

#: Significance level of every one-sided / two-sided test (Bonferroni-split where stated).
ALPHA = 0.05


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


def chi2_std_bounds_one_sided(s: float, n: int, alpha: float) -> tuple[float, float]:
    """One-sided (1 - alpha) lower and upper confidence bounds of a Gaussian population std from a
    sample std ``s`` of ``n`` values: ``s sqrt((n-1)/chi2_{1-alpha})`` and ``s sqrt((n-1)/chi2_alpha)``."""
    df = n - 1
    return s * math.sqrt(df / stats.chi2.ppf(1 - alpha, df)), s * math.sqrt(df / stats.chi2.ppf(alpha, df))


def t_interval(values: Sequence[float], alpha: float = ALPHA) -> tuple[float, float, float]:
    """Mean and two-sided (1 - alpha) Student-t interval of the mean (needs >= 2 values)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    half = float(stats.t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


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


def monotone_claim(
    id_: str,
    title: str,
    paper: str,
    prediction: str,
    groups: Mapping[Any, Mapping[float, list[float]]],
    direction: int,
    level_name: str,
    predicted: Mapping[Any, Mapping[float, list[float]]] | None = None,
    quote: str = "",
) -> ClaimResult:
    """Monotonicity of the final bound in a level (direction +1: increasing), per group.

    Rule: per group, Spearman rho(level, K_T) of the right sign with one-sided p < ALPHA, and no
    adjacent pair of levels reversing by more than 2 combined standard errors of the seed means.
    """
    alt = "greater" if direction > 0 else "less"
    rule = (
        f"per group: Spearman rho({level_name}, K_T) {'>' if direction > 0 else '<'} 0 with one-sided "
        f"p < {ALPHA}, and no adjacent pair of levels reversing by more than 2 combined SEs (seed spread)"
    )
    if not groups:
        return inconclusive(id_, title, paper, prediction, rule, "no complete runs", quote)
    parts = []
    details = {}
    ok_all = True
    for g, levels in groups.items():
        xs = [lv for lv, vals in levels.items() for _ in vals]
        ys = [v for vals in levels.values() for v in vals]
        rows = level_stats(levels)
        if len(rows) < 2 or len(xs) < 3:
            return inconclusive(
                id_, title, paper, prediction, rule, f"group {g}: fewer than 2 levels / 3 runs", quote
            )
        rho, p = spearman(xs, ys, alt)
        reversals = adjacent_reversals(rows, direction)
        ok = bool(rho * direction > 0 and p < ALPHA and not reversals)
        ok_all &= ok
        entry = {"spearman_rho": rho, "p_value": p, "levels": rows, "reversals": reversals, "pass": ok}
        text = f"{g}: rho = {fmt(rho)} (p {fmt_p(p)}), {len(reversals)} reversal(s)"
        if predicted is not None and g in predicted:
            pl = predicted[g]
            prho, pp = spearman(
                [lv for lv, vals in pl.items() for _ in vals], [v for vals in pl.values() for v in vals], alt
            )
            entry.update(predicted_rho=prho, predicted_p=pp, predicted_levels=level_stats(pl))
            text += f"; predicted E[K_T] rho = {fmt(prho)}"
        details[str(g)] = entry
        parts.append(text)
    return ClaimResult(
        id_,
        title,
        paper,
        prediction,
        "; ".join(parts),
        rule,
        verdict(ok_all),
        numbers=details,
        paper_quote=quote,
        kind=PAPER,
    )
