"""Framework test (ours, beyond the paper's text): the spread of K_t across sampling seeds against
Theorem 17's sqrt(Var[K_t]) along the run. The paper's 8.7 sentence says only that the spread is
negligible (row 8.7)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lipverify.claims.result import FRAMEWORK, ClaimResult, fmt, inconclusive, verdict
from lipverify.claims.stats import ALPHA, chi2_std_interval
from lipverify.claims.trajectories import geometric_checkpoints, require_shared_setup, trajectory_spread

QUOTE = (
    'Section 8.7: "According to Proposition 21, if the batch size is sufficiently large, the effect from '
    "various mini-batch sampling trajectory can be neglected since: [Var[K_t] of Theorem 17 -> 0; formula "
    'lost in the text]"'
)


def evaluate_trajectory_spread(
    records: Sequence[dict], checkpoints: int = 4, alpha: float = ALPHA
) -> list[ClaimResult]:
    """F8.7 (ours): ``std_seeds(K_t) = sqrt(Var[K_t])``, ``Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1)``.

    Rule: at ``checkpoints`` log-spaced steps T^(j/c) (early steps included: the old evenly spaced
    checkpoints skipped the steps 3-10 where the spread is largest against the prediction), the
    predicted std lies inside the two-sided chi-square (1 - alpha/c) interval of the empirical std
    across the n seeds (Bonferroni). ``numbers["steps"]``: the ratio with its 95% chi-square interval
    at every logged step.
    """
    title = "trajectory spread = Theorem 17 (ours)"
    paper = "framework (Theorem 17)"
    pred = "spread of K_t across sampling seeds = sqrt(Var[K_t]) (Theorem 17) along the run"
    rule = (
        f"predicted std inside the chi-square {1 - alpha / checkpoints:.3g} interval of the empirical std at "
        f"{checkpoints} log-spaced steps T^(j/{checkpoints}) (Bonferroni)"
    )
    require_shared_setup(records)
    if len(records) < 3:
        return [
            inconclusive("F8.7", title, paper, pred, rule, f"{len(records)} runs (< 3)", QUOTE, FRAMEWORK)
        ]
    spread = trajectory_spread(records)
    steps, n = spread["steps"], len(records)
    per_step = []
    for i in range(1, len(steps)):
        s, p = float(spread["empirical_std"][i]), float(spread["predicted_std"][i])
        if p <= 0:
            continue
        lo, hi = chi2_std_interval(s, n, alpha)
        per_step.append({"step": float(steps[i]), "ratio": s / p, "ratio_ci": [lo / p, hi / p]})
    rows = []
    for i in geometric_checkpoints(steps, checkpoints):
        s, p = float(spread["empirical_std"][i]), float(spread["predicted_std"][i])
        lo, hi = chi2_std_interval(s, n, alpha / checkpoints)
        rows.append(
            {
                "step": float(steps[i]),
                "empirical_std": s,
                "predicted_std": p,
                "ratio": s / p if p > 0 else float("inf"),
                "ci": [lo, hi],
                "pass": lo <= p <= hi,
            }
        )
    ratios = np.array([r["ratio"] for r in per_step])
    early = [r["ratio"] for r in per_step if 3 <= r["step"] <= 10]
    return [
        ClaimResult(
            "F8.7",
            title,
            paper,
            pred,
            f"{n} seeds; emp/pred std at steps {[int(r['step']) for r in rows]}: "
            + ", ".join(
                f"{fmt(r['ratio'])} [{fmt(r['ci'][0] / r['predicted_std'])}, "
                f"{fmt(r['ci'][1] / r['predicted_std'])}]"
                for r in rows
            )
            + (f"; steps 3-10: {fmt(min(early))}..{fmt(max(early))}" if early else "")
            + f"; all steps: {fmt(float(ratios.min()))}..{fmt(float(ratios.max()))}, "
            f"median {fmt(float(np.median(ratios)))}",
            rule,
            verdict(all(r["pass"] for r in rows)),
            numbers={
                "checkpoints": rows,
                "steps": per_step,
                "median_ratio": float(np.median(ratios)),
                "n_seeds": n,
            },
            paper_quote=QUOTE,
            kind=FRAMEWORK,
        )
    ]
