"""Section 8.6, batch size (Proposition 21): the spread of K_T across sampling seeds falls like
b^(-1/2). (Its magnitude against Theorem 17 is a framework test:
:mod:`lipverify.claims.framework_spread_magnitude`.)"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from lipverify.claims.figures import FigureSaver
from lipverify.claims.result import ClaimResult, fmt, inconclusive, verdict
from lipverify.claims.stats import ALPHA, chi2_std_interval, fit_log_slope, group_by

PAPER = "Section 8.6, Proposition 21"
QUOTE = (
    'Section 8.6: "As shown in Figure 5, the observed effect of batch size aligns closely with the '
    'theoretical prediction in Proposition 21."'
)


def batch_rows(records: Sequence[dict], alpha: float = ALPHA) -> list[dict]:
    """Per batch size with >= 2 seeds: mean and sample std of K_T across seeds, the predicted std
    ``sqrt(mean Var[K_T])`` (Theorem 17, summarize_run's K_T_predicted_std) and the chi-square
    (1 - alpha/k) interval of the std (Bonferroni over the k batch sizes)."""
    by_b = group_by(records, lambda r: int(r["config"]["batch_size"]))
    k = max(len(by_b), 1)
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
    return rows


def evaluate_batch_size(records: Sequence[dict], alpha: float = ALPHA) -> list[ClaimResult]:
    """8.6 / Proposition 21: ``Var[K_T] = E[K_T]^2 (exp(int c_bar / b) - 1)``, so std(K_T) across
    sampling seeds ~ b^(-1/2) (the "theoretical prediction in Proposition 21" the paper's sentence
    refers to).

    Rule: weighted slope of ln std(K_T) on ln b (:func:`lipverify.claims.stats.fit_log_slope`);
    pass if -1/2 lies inside slope +- z_{1-alpha/2} SE.
    """
    pred = "std of K_T across sampling seeds falls like b^(-1/2)"
    z = float(stats.norm.ppf(1 - alpha / 2))
    rule = f"-0.5 inside fitted exponent +- {z:.2f} SE (weights 2(n-1): chi-square delta method)"
    rows = batch_rows(records, alpha)
    if len(rows) < 2 or any(r["std_K_T"] <= 0 for r in rows):
        why = "need >= 2 batch sizes with >= 2 seeds each and non-zero spread"
        return [inconclusive("8.6", "std(K_T) ~ b^-1/2", PAPER, pred, rule, why, QUOTE)]
    bs = [r["batch_size"] for r in rows]
    slope, se = fit_log_slope(bs, [r["std_K_T"] for r in rows], [r["n"] for r in rows])
    pred_slope = float(np.polyfit(np.log(bs), np.log([r["predicted_std"] for r in rows]), 1)[0])
    return [
        ClaimResult(
            "8.6",
            "std(K_T) ~ b^-1/2",
            PAPER,
            pred,
            f"fitted exponent {fmt(slope)} +- {fmt(se)} (SE), 95% "
            f"CI [{fmt(slope - z * se)}, {fmt(slope + z * se)}] "
            f"over b = {bs}, {min(r['n'] for r in rows)}+ seeds "
            f"each; exponent of the predicted std {fmt(pred_slope)}",
            rule,
            verdict(abs(slope + 0.5) <= z * se),
            numbers={
                "slope": slope,
                "se": se,
                "ci": [slope - z * se, slope + z * se],
                "predicted_slope": pred_slope,
                "levels": rows,
            },
            paper_quote=QUOTE,
        )
    ]


def plot_batch_size(records: Sequence[dict], results: Sequence[ClaimResult], save: FigureSaver) -> None:
    """batch_size.png: std of K_T across seeds (chi-square intervals) against b, the predicted
    sqrt(Var[K_T]) (framework F8.6) and a b^(-1/2) reference through the first point (8.6)."""
    rows = results[0].numbers.get("levels", [])
    if not rows:
        return
    fig, ax = save.plt.subplots(figsize=(6.5, 4.5))
    bs = np.array([r["batch_size"] for r in rows], dtype=float)
    emp = np.array([r["std_K_T"] for r in rows])
    lo = np.array([r["ci"][0] for r in rows])
    hi = np.array([r["ci"][1] for r in rows])
    ax.errorbar(bs, emp, yerr=[emp - lo, hi - emp], marker="o", capsize=3, label="empirical std (chi2 CI)")
    ax.plot(bs, [r["predicted_std"] for r in rows], "x--", label="predicted sqrt(Var[K_T]) (F8.6)")
    ax.plot(bs, emp[0] * (bs / bs[0]) ** -0.5, "k:", label="b^-1/2 reference (8.6)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size b",
        ylabel="std of K_T across seeds",
        title=f"8.6 fitted exponent {results[0].numbers['slope']:.2f}",
    )
    ax.legend(fontsize=7)
    save(fig, "batch_size.png")
