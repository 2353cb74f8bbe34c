"""Framework test (ours, beyond the paper's text): Proposition 20's mechanism near convergence.

Proposition 20: with a negative log-likelihood loss, near convergence mu_bar -> 0 while
psi_bar -> (eta^2 / 2b) tr(H F) > 0, so psi_bar / |mu_bar| rises as training converges. The paper
observes only that |psi| is about one order below |mu| (8.3b); this row tests the trend itself.
Corrected rule (it used to compare the first quarter of the run, far from convergence, with the last):
both halves of the near-convergence window, where the proposition's premise holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lipverify.claims.near_convergence import window_rows
from lipverify.claims.result import FRAMEWORK, ClaimResult, fmt, inconclusive, three_way
from lipverify.claims.stats import ALPHA, t_interval

QUOTE = (
    'Section 8.3, Proposition 20: "This result demonstrates that the Lipschitz continuity bound '
    'monotonically increases as optimization progresses." (mu_bar -> 0, psi_bar -> (eta^2/2b) tr(H F) > 0)'
)


def evaluate_noise_growth(
    records: Sequence[dict], window: float = 0.25, loss_threshold: float = 0.05
) -> list[ClaimResult]:
    """F8.3 (ours): per run ``R_h = sum psi_bar / |sum mu_bar|`` over the first and the second half of
    the near-convergence window (:func:`lipverify.claims.near_convergence.window_rows`); the mean over
    runs of ``ln(R_second / R_first)`` has a 95% t-interval above 0 (pass), below 0 (fail), else
    inconclusive. Precondition as 8.3: late loss below ``loss_threshold``, >= 2 runs."""
    title = "psi/|mu| rises near convergence (ours)"
    paper = "framework (Proposition 20)"
    pred = "within the near-convergence window psi_bar / |mu_bar| rises (mu_bar -> 0, psi_bar stays > 0)"
    rule = (
        "mean over runs of ln(R_2nd half / R_1st half) of the near-convergence window, R = sum psi_bar / "
        "|sum mu_bar|: 95% t-interval > 0 (fail: < 0)"
    )

    def skip(why: str) -> list[ClaimResult]:
        return [inconclusive("F8.3", title, paper, pred, rule, why, QUOTE, FRAMEWORK)]

    rows = window_rows(records, window)
    if len(rows) < 2:
        return skip(f"{len(rows)} complete run(s); the t-interval needs >= 2 seeds")
    loss_late = max(row["loss_late"] for row in rows)
    if not loss_late < loss_threshold:
        return skip(f"late training loss {fmt(loss_late)} >= {loss_threshold}: not near convergence")
    r1 = np.array([row["ratio_first_half"] for row in rows])
    r2 = np.array([row["ratio_second_half"] for row in rows])
    if not np.all((r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)):
        return skip("psi/|mu| not positive and finite in both halves of every run")
    changes = np.log(r2 / r1)
    mean, lo, hi = t_interval(changes, ALPHA)
    return [
        ClaimResult(
            "F8.3",
            title,
            paper,
            pred,
            f"psi/|mu| first half {fmt(float(np.mean(r1)))} -> second half {fmt(float(np.mean(r2)))}; "
            f"ln(second/first) = {fmt(mean)} [95% CI {fmt(lo)}, {fmt(hi)}], {len(rows)} runs "
            f"(factor {fmt(math.exp(mean))} per half-window)",
            rule,
            three_way(lo > 0, hi < 0),
            numbers={
                "log_ratio_change_mean": mean,
                "ci": [lo, hi],
                "first": r1.tolist(),
                "second": r2.tolist(),
            },
            paper_quote=QUOTE,
            kind=FRAMEWORK,
        )
    ]
