"""Section 8.5, uniform label corruption: the bound shrinks monotonically as the corruption
probability p grows. (The (1 - p) drift law behind it is a framework test:
:mod:`lipverify.claims.framework_label_drift`.)"""

from __future__ import annotations

from collections.abc import Sequence

from lipverify.claims.figures import FigureSaver
from lipverify.claims.framework_label_drift import cross_trajectory_log_prediction
from lipverify.claims.result import ClaimResult
from lipverify.claims.stats import group_by, level_stats, monotone_claim

QUOTE = (
    'Section 8.5: "As shown in Figure 7, the Lipschitz constant decreases monotonically as label noise '
    'level increases."'
)


def evaluate_label_noise(records: Sequence[dict]) -> list[ClaimResult]:
    """8.5: labels corrupted uniformly with probability p; K_T decreases monotonically in p.

    Rule: :func:`lipverify.claims.stats.monotone_claim` with direction -1 (one-sided Spearman
    p < 0.05, no adjacent reversal beyond 2 combined SEs of the seed means).
    """
    groups = {"all": {}}
    for r in records:
        groups["all"].setdefault(float(r["config"]["label_noise"]), []).append(r["summary"]["K_T_observed"])
    return [
        monotone_claim(
            "8.5",
            "label noise: bound shrinks as p grows",
            "Section 8.5",
            "K_T decreases monotonically with the corruption probability p",
            groups if records else {},
            -1,
            "p",
            quote=QUOTE,
        )
    ]


def plot_label_noise(records: Sequence[dict], results: Sequence[ClaimResult], save: FigureSaver) -> None:
    """label_noise.png. Left: ln K_T against p (mean +- 2 SE) with the cross-trajectory E[ln K_T]
    diagnostic (ln K_0 + (1 - p) M_0 + Psi - Phi/2, the same numbers as F8.5's diagnostic). Right: the
    F8.5 rule's own comparison, mu_p(theta_0)/mu_0(theta_0) with its interval against 1 - p."""
    import numpy as np

    plt = save.plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_p = group_by(records, lambda r: float(r["config"]["label_noise"]))
    rows = level_stats({p: [np.log(r["summary"]["K_T_observed"]) for r in rs] for p, rs in by_p.items()})
    axes[0].errorbar(
        [r["level"] for r in rows],
        [r["mean"] for r in rows],
        yerr=[2 * r["se"] for r in rows],
        marker="o",
        capsize=3,
        label="observed ln K_T",
    )
    diag = cross_trajectory_log_prediction(records)
    if diag:
        xs = sorted(diag)
        axes[0].plot(
            xs, [diag[p]["predicted_log_K_T"] for p in xs], "k:", label="ln K_0 + (1-p) M_0 + Psi - Phi/2"
        )
    axes[0].set(xlabel="p (label_noise)", ylabel="ln K_T (mean +- 2 SE)", title="8.5 bound against p")
    axes[0].legend(fontsize=7)
    drift = next((c for c in results if c.id == "F8.5"), None)
    levels = drift.numbers.get("levels", []) if drift else []
    for r in levels:
        if r["ci"]:
            axes[1].plot([r["p"]] * 2, r["ci"], "C0-", lw=2)
        axes[1].plot(r["p"], r["mean_ratio"], "C0o")
    if levels:
        ps = np.array([0.0] + [r["p"] for r in levels])
        axes[1].plot(ps, 1 - ps, "k--", label="1 - p (rule F8.5)")
        axes[1].legend(fontsize=7)
    axes[1].set(xlabel="p", ylabel="mu_p(theta_0) / mu_0(theta_0)", title="F8.5 drift at the shared theta_0")
    save(fig, "label_noise.png")
