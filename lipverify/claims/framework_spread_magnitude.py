"""Framework test (ours, beyond the paper's text): the magnitude of the spread of K_T across
sampling seeds against Theorem 17's sqrt(Var[K_T]) at every batch size. The paper's 8.6 sentence
states agreement with Proposition 21's b^(-1/2) law (row 8.6), not this magnitude."""

from __future__ import annotations

from collections.abc import Sequence

from lipverify.claims.batch_size import batch_rows
from lipverify.claims.result import FRAMEWORK, ClaimResult, fmt, inconclusive, verdict
from lipverify.claims.stats import ALPHA

QUOTE = (
    "Theorem 17 (Section 5 of MATH.md): Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1); Proposition 21 "
    "specialises it to Phi_T = int c_bar ds / b"
)


def evaluate_spread_magnitude(records: Sequence[dict], alpha: float = ALPHA) -> list[ClaimResult]:
    """F8.6 (ours): for every b, the predicted std (Theorem 17, root mean square of the seeds'
    K_T_predicted_std) inside the two-sided chi-square (1 - alpha/k) interval of the empirical std
    of K_T across the seeds (Bonferroni over the k batch sizes; Gaussian K_T)."""
    title = "std(K_T) magnitude = Theorem 17 (ours)"
    paper = "framework (Theorem 17)"
    pred = "std(K_T) across seeds = sqrt(Var[K_T]) of Theorem 17 at every b"
    rows = batch_rows(records, alpha)
    k = max(len(rows), 1)
    rule = f"predicted std inside the chi-square {1 - alpha / k:.3g} interval of the empirical std at every b"
    if not rows:
        return [
            inconclusive("F8.6", title, paper, pred, rule, "no batch size with >= 2 seeds", QUOTE, FRAMEWORK)
        ]
    return [
        ClaimResult(
            "F8.6",
            title,
            paper,
            pred,
            "; ".join(
                f"b={r['batch_size']}: emp/pred {fmt(r['ratio'])} (CI "
                f"of emp std {fmt(r['ci'][0])}..{fmt(r['ci'][1])}, "
                f"pred {fmt(r['predicted_std'])})"
                for r in rows
            ),
            rule,
            verdict(all(r["pass"] for r in rows)),
            numbers={"levels": rows},
            paper_quote=QUOTE,
            kind=FRAMEWORK,
        )
    ]
