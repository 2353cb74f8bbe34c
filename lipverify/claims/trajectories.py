"""Section 8.7, mini-batch sampling trajectories: with the initialisation fixed, the sampling seed
has a negligible effect on the evolution of the bound. (The size of the spread against Theorem 17 is
a framework test: :mod:`lipverify.claims.framework_trajectory_spread`.)"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from lipverify._validation import LipverifyError
from lipverify.claims.figures import FigureSaver
from lipverify.claims.records import predicted_path, series
from lipverify.claims.result import ClaimResult, fmt, inconclusive, three_way
from lipverify.claims.stats import ALPHA, chi2_std_bounds_one_sided

PAPER = "Section 8.7"
QUOTE = (
    'Section 8.7: "As shown in Figure 4, the sampling trajectories have a negligible effect on the '
    'evolution of Lipschitz continuity."'
)

#: "negligible effect on the evolution": the seed-to-seed spread of ln K_T is at least one order of
#: magnitude below the change of ln K over the run (the "one order" scale the paper uses in 8.3).
NEGLIGIBLE_FRACTION = 0.1


def require_shared_setup(records: Sequence[dict]) -> None:
    """The runs must differ only in seed_sampling (same initialisation and hyper-parameters)."""
    configs = {
        json.dumps({k: v for k, v in r["config"].items() if k != "seed_sampling"}, sort_keys=True)
        for r in records
    }
    if len(configs) > 1:
        raise LipverifyError("trajectories: runs differ in more than seed_sampling")


def trajectory_spread(records: Sequence[dict]) -> dict:
    """Across runs sharing an initialisation, at the recorded steps (float64 arrays): steps,
    empirical std of K_t, predicted std (Theorem 17 variance averaged over the runs), mean observed
    K_t, mean predicted E[K_t], observed K_t per run (runs x steps) and ln K_t per run."""
    paths = [predicted_path(r) for r in records]
    n_steps = min(len(p[0]) for p in paths)
    steps = paths[0][0][:n_steps]
    for p in paths:
        if not np.array_equal(p[0][:n_steps], steps):
            raise LipverifyError("trajectories: runs recorded different steps")
    log_k = np.stack([series(r, "log_bound")[:n_steps] for r in records])
    k_obs = np.exp(log_k)
    var_pred = np.stack([p[2][:n_steps] for p in paths])
    mean_pred = np.stack([p[1][:n_steps] for p in paths])
    return {
        "steps": steps,
        "empirical_std": k_obs.std(axis=0, ddof=1),
        "predicted_std": np.sqrt(var_pred.mean(axis=0)),
        "observed_mean": k_obs.mean(axis=0),
        "predicted_mean": mean_pred.mean(axis=0),
        "observed": k_obs,
        "log_observed": log_k,
    }


def geometric_checkpoints(steps: np.ndarray, checkpoints: int) -> list[int]:
    """Row indices of ``checkpoints`` log-spaced steps T^(j/c), j = 1..c (early steps included, where
    the spread is measured against the smallest change)."""
    t_max = float(steps[-1])
    targets = [t_max ** (j / checkpoints) for j in range(1, checkpoints + 1)]
    return sorted({int(np.argmin(np.abs(steps - max(1.0, round(t))))) for t in targets})


def evaluate_trajectories(
    records: Sequence[dict], checkpoints: int = 4, alpha: float = ALPHA
) -> list[ClaimResult]:
    """8.7: std across sampling seeds of ln K_T against the change ``|mean ln K_T - ln K_0|``.

    Rule: pass if the one-sided (1 - alpha) chi-square upper bound of the std is below
    ``NEGLIGIBLE_FRACTION`` (10%) of the change; fail if the one-sided lower bound is above it; else
    inconclusive (too few seeds to decide). The ratio at ``checkpoints`` log-spaced steps is reported.
    Needs >= 3 runs differing only in seed_sampling.
    """
    pred = "the sampling seed has a negligible effect on the evolution of ln K"
    rule = (
        f"std over seeds of ln K_T: one-sided {1 - alpha:.3g} "
        f"chi-square upper bound < {NEGLIGIBLE_FRACTION:g} "
        f"|mean ln K_T - ln K_0| (one order of magnitude below the change); fail if the lower bound > "
        f"{NEGLIGIBLE_FRACTION:g} |change|"
    )
    require_shared_setup(records)
    if len(records) < 3:
        return [
            inconclusive(
                "8.7", "sampling seed negligible", PAPER, pred, rule, f"{len(records)} runs (< 3)", QUOTE
            )
        ]
    spread = trajectory_spread(records)
    log_k, steps, n = spread["log_observed"], spread["steps"], len(records)
    rows = []
    for i in [*geometric_checkpoints(steps, checkpoints)]:
        s = float(log_k[:, i].std(ddof=1))
        change = float(abs(log_k[:, i].mean() - log_k[:, 0].mean()))
        lo, hi = chi2_std_bounds_one_sided(s, n, alpha)
        rows.append(
            {
                "step": float(steps[i]),
                "std_log_K": s,
                "change_log_K": change,
                "ratio": s / change if change > 0 else math.inf,
                "bounds": [lo, hi],
            }
        )
    final = rows[-1]
    limit = NEGLIGIBLE_FRACTION * final["change_log_K"]
    lo, hi = final["bounds"]
    return [
        ClaimResult(
            "8.7",
            "sampling seed negligible",
            PAPER,
            pred,
            f"{n} seeds; at T = {int(final['step'])}: std of ln "
            f"K_T {fmt(final['std_log_K'])} (one-sided 95% bounds "
            f"{fmt(lo)}..{fmt(hi)}) vs change {fmt(final['change_log_K'])} "
            f"(limit {fmt(limit)}); std/change at steps "
            f"{[int(r['step']) for r in rows]}: {[fmt(r['ratio']) for r in rows]}",
            rule,
            three_way(hi < limit, lo > limit),
            numbers={"checkpoints": rows, "n_seeds": n, "limit": limit, "fraction": NEGLIGIBLE_FRACTION},
            paper_quote=QUOTE,
        )
    ]


def plot_trajectories(records: Sequence[dict], results: Sequence[ClaimResult], save: FigureSaver) -> None:
    """trajectories.png. Left: ln K_t of every seed with the 8.7 limit (+- 10% of the change around the
    mean). Middle: K_t with the mean predicted E[K_t] +- 2 predicted sd. Right: empirical / predicted
    std of K_t per logged step with the F8.7 chi-square intervals."""
    if len(records) < 3:
        return
    spread = trajectory_spread(records)
    plt = save.plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    steps = spread["steps"]
    log_k = spread["log_observed"]
    for row in log_k:
        axes[0].plot(steps, row, color="C0", alpha=0.3, lw=0.8)
    mean_log = log_k.mean(axis=0)
    band = NEGLIGIBLE_FRACTION * np.abs(mean_log - mean_log[0])
    axes[0].fill_between(
        steps, mean_log - band, mean_log + band, color="g", alpha=0.15, label="+- 10% of the change (8.7)"
    )
    axes[0].set(xlabel="step", ylabel="ln K_t", title="8.7 ln K_t across sampling seeds")
    axes[0].legend(fontsize=7)
    for row in spread["observed"]:
        axes[1].plot(steps, row, color="C0", alpha=0.3, lw=0.8)
    m, s = spread["predicted_mean"], spread["predicted_std"]
    axes[1].plot(steps, m, "k-", label="mean predicted E[K_t]")
    axes[1].fill_between(steps, m - 2 * s, m + 2 * s, color="k", alpha=0.15, label="+- 2 predicted std")
    axes[1].set(xlabel="step", ylabel="K_t", title="K_t and Theorem 17")
    axes[1].legend(fontsize=7)
    framework = next((c for c in results if c.id == "F8.7"), None)
    if framework is not None and "steps" in framework.numbers:
        per = framework.numbers["steps"]
        x = [r["step"] for r in per]
        axes[2].plot(x, [r["ratio"] for r in per], "C0-", label="empirical / predicted std")
        axes[2].fill_between(
            x,
            [r["ratio_ci"][0] for r in per],
            [r["ratio_ci"][1] for r in per],
            color="C0",
            alpha=0.2,
            label="95% chi-square interval",
        )
        axes[2].axhline(1.0, color="k", ls="--", lw=1)
        axes[2].set(
            xscale="log", yscale="log", xlabel="step", ylabel="ratio", title="F8.7 spread vs Theorem 17"
        )
        axes[2].legend(fontsize=7)
    save(fig, "trajectories.png")
