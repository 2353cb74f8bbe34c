"""Section 8.3, unbounded growth near convergence (Proposition 20), as the paper states it:
the bound keeps growing, |psi_bar| is about one order of magnitude below |mu_bar|, and the
cumulative psi_bar is still a non-negligible part of the late growth of ln K."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lipverify._validation import LipverifyError
from lipverify.claims.figures import FigureSaver
from lipverify.claims.records import network_terms, predicted_path, series
from lipverify.claims.result import ClaimResult, fmt, inconclusive, three_way
from lipverify.claims.stats import ALPHA, t_interval

PAPER = "Section 8.3, Proposition 20"
QUOTE_GROWTH = (
    'Section 8.3 (i): "The gradual increase driven by [psi_bar] persists throughout the training, '
    'with no observable indication of stopping"'
)
QUOTE_NOISE = (
    'Section 8.3 (ii): "Although the magnitude of [psi_bar] is typically one order smaller than that '
    "of [mu_bar] in our experiments, its cumulative effect on the growth of Lipschitz continuity "
    'near-convergence is non-negligible and persists throughout training."'
)

#: "about one order smaller": log10(|psi|/|mu|) rounds to -1 on [-1.5, -0.5]; "about" and
#: "typically" widen the lower end by half an order. Above -0.5 the two are of the same order.
LOG10_RATIO_BAND = (-2.0, -0.5)

#: "non-negligible": the paper's own "one order smaller" makes psi about 1/11 = 9% of the drift
#: mu + psi; half of that, 5%, is the smallest share still consistent with the paper's statement.
SHARE_MIN = 0.05


def window_rows(records: Sequence[dict], window: float) -> list[dict]:
    """Per run, the near-convergence window = the last ``window`` fraction of the recorded steps
    (w = max(2, round(window n)) rows; the term rows exclude the final row, which has no update).

    Keys: loss_late (mean training loss), median_abs_ratio (median over the window's steps of
    |psi_bar_t| / |mu_bar_t|), late_log_k_increase (observed ln K at T minus at the window start),
    late_cumulative_psi / late_cumulative_mu (sums over the window), late_diffusion_std
    (sqrt of the window's sum of phi_bar^2), psi_share (late_cumulative_psi / late_log_k_increase),
    ratio_first_half / ratio_second_half (sum psi / |sum mu| over the window's two halves).
    """
    rows = []
    for r in records:
        steps = series(r, "step")
        n = len(steps)
        w = max(2, round(window * n))
        if n < 2 * w:
            raise LipverifyError(f"run {r.get('name')}: {n} steps are too few for windows of {w}")
        mu, psi, phi_sq = network_terms(r)
        loss = series(r, "loss")
        log_k = series(r, "log_bound")
        late_terms = slice(n - w, n - 1)
        mu_w, psi_w = mu[late_terms], psi[late_terms]
        with np.errstate(divide="ignore"):
            step_ratio = np.abs(psi_w) / np.abs(mu_w)
        half = len(mu_w) // 2
        growth = float(log_k[-1] - log_k[n - w])
        cum_psi = float(psi_w.sum())

        def ratio(a: np.ndarray, b: np.ndarray) -> float:
            return float(a.sum() / abs(b.sum())) if b.sum() != 0 else math.inf

        rows.append(
            {
                "run": r["name"],
                "window_rows": w,
                "loss_early": float(np.nanmean(loss[:w])),
                "loss_late": float(np.nanmean(loss[n - w :])),
                "mu_late": float(mu_w.mean()),
                "psi_late": float(psi_w.mean()),
                "median_abs_ratio": float(np.median(step_ratio)),
                "late_log_k_increase": growth,
                "late_cumulative_psi": cum_psi,
                "late_cumulative_mu": float(mu_w.sum()),
                "late_predicted_log_drift": float((mu_w + psi_w - 0.5 * phi_sq[late_terms]).sum()),
                "late_diffusion_std": float(math.sqrt(phi_sq[late_terms].sum())),
                "psi_share": cum_psi / growth if growth > 0 else math.nan,
                "ratio_first_half": ratio(psi_w[:half], mu_w[:half]) if half else math.nan,
                "ratio_second_half": ratio(psi_w[half:], mu_w[half:]) if half else math.nan,
                "cumulative_mu": float(mu[:-1].sum()),
                "cumulative_psi": float(psi[:-1].sum()),
            }
        )
    return rows


def evaluate_near_convergence(
    records: Sequence[dict], window: float = 0.25, loss_threshold: float = 0.05
) -> list[ClaimResult]:
    """8.3 on the near-convergence window (:func:`window_rows`), 95% Student-t intervals over runs:

    * 8.3a growth persists: late increase of ln K; pass if the interval is above 0, fail if below.
    * 8.3b |psi| about one order below |mu|: per run log10 of the window's median |psi_t|/|mu_t|;
      pass if the interval of the mean lies inside ``LOG10_RATIO_BAND`` = [-2, -0.5], fail if it lies
      outside it, else inconclusive.
    * 8.3c cumulative psi non-negligible: share = window sum of psi_bar / window increase of ln K;
      pass if the interval's lower end >= ``SHARE_MIN`` (5%) and in every run the sum of psi_bar
      exceeds the window's diffusion sd sqrt(sum phi_bar^2) (it stands out of the sampling noise of
      ln K); fail if the upper end < 5% or no run's sum exceeds the diffusion sd.

    Precondition: every run's mean training loss over the window is below ``loss_threshold`` (else
    all rows are inconclusive: not near convergence); >= 2 runs.
    """
    pred_a = "ln K keeps growing on the near-convergence window (no steady state)"
    rule_a = "late-window increase of ln K (observed): 95% t-interval over runs > 0 (fail: < 0)"
    lo_b, hi_b = LOG10_RATIO_BAND
    pred_b = "|psi_bar| about one order of magnitude smaller than |mu_bar| near convergence"
    rule_b = (
        f"log10 of the window's median |psi_bar_t|/|mu_bar_t|: 95% t-interval over runs inside [{lo_b:g}, "
        f"{hi_b:g}] (one order, rounded, is [-1.5, -0.5]; lower end widened by half an order for 'about'); "
        "fail if the interval lies outside"
    )
    pred_c = "the cumulative psi_bar is a non-negligible share of the late growth of ln K"
    rule_c = (
        f"share = window sum psi_bar / window increase of ln K: 95% t-interval lower end >= {SHARE_MIN:g} "
        "(half the ~9% that 'one order smaller' implies) and window sum psi_bar > window diffusion sd "
        f"sqrt(sum phi_bar^2) in every run; fail if the upper end < {SHARE_MIN:g} or no run's sum "
        "exceeds its diffusion sd"
    )
    heads = [
        ("8.3a", "bound keeps growing", pred_a, rule_a, QUOTE_GROWTH),
        ("8.3b", "|psi| one order below |mu|", pred_b, rule_b, QUOTE_NOISE),
        ("8.3c", "cumulative psi non-negligible", pred_c, rule_c, QUOTE_NOISE),
    ]

    def all_inconclusive(why: str, numbers: dict) -> list[ClaimResult]:
        out = [inconclusive(i, t, PAPER, p, ru, why, q) for i, t, p, ru, q in heads]
        for c in out:
            c.numbers = numbers
        return out

    rows = window_rows(records, window)
    if len(rows) < 2:
        return all_inconclusive(
            f"{len(rows)} complete run(s); the t-interval needs >= 2 seeds", {"runs": rows}
        )
    loss_late = max(row["loss_late"] for row in rows)
    numbers = {"runs": rows, "loss_late_max": loss_late, "loss_threshold": loss_threshold, "window": window}
    if not loss_late < loss_threshold:
        return all_inconclusive(
            f"late training loss {fmt(loss_late)} >= {loss_threshold}: not near convergence", numbers
        )
    near = f"{len(rows)} runs, window = last {window:g} of the steps, late loss <= {fmt(loss_late)}"
    out = []

    inc = [row["late_log_k_increase"] for row in rows]
    mean, lo, hi = t_interval(inc, ALPHA)
    out.append(
        ClaimResult(
            "8.3a",
            "bound keeps growing",
            PAPER,
            pred_a,
            f"late increase of ln K = {fmt(mean)} [95% CI "
            f"{fmt(lo)}, {fmt(hi)}]; predicted late E[ln K] drift "
            f"{fmt(np.mean([r['late_predicted_log_drift'] for r in rows]))} "
            f"(+- {fmt(np.mean([r['late_diffusion_std'] for r in rows]))} diffusion sd); {near}",
            rule_a,
            three_way(lo > 0, hi < 0),
            numbers=numbers | {"late_increase_mean": mean, "ci": [lo, hi]},
            paper_quote=QUOTE_GROWTH,
        )
    )

    med = np.array([row["median_abs_ratio"] for row in rows])
    if not np.all((med > 0) & np.isfinite(med)):
        out.append(
            inconclusive("8.3b", heads[1][1], PAPER, pred_b, rule_b, "psi_bar or mu_bar is 0", QUOTE_NOISE)
        )
    else:
        logs = np.log10(med)
        mean, lo, hi = t_interval(logs, ALPHA)
        out.append(
            ClaimResult(
                "8.3b",
                "|psi| one order below |mu|",
                PAPER,
                pred_b,
                "median |psi_bar|/|mu_bar| per run "
                f"{', '.join(fmt(m) for m in med)}; mean log10 = {fmt(mean)} "
                f"[95% CI {fmt(lo)}, {fmt(hi)}] (mean mu_bar {fmt(np.mean([r['mu_late'] for r in rows]))}, "
                f"psi_bar {fmt(np.mean([r['psi_late'] for r in rows]))} per step); {near}",
                rule_b,
                three_way(lo >= lo_b and hi <= hi_b, hi < lo_b or lo > hi_b),
                numbers=numbers | {"log10_ratio_mean": mean, "ci": [lo, hi], "band": list(LOG10_RATIO_BAND)},
                paper_quote=QUOTE_NOISE,
            )
        )

    shares = np.array([row["psi_share"] for row in rows])
    above_noise = [row["late_cumulative_psi"] > row["late_diffusion_std"] for row in rows]
    if not np.all(np.isfinite(shares)):
        out.append(
            inconclusive(
                "8.3c",
                heads[2][1],
                PAPER,
                pred_c,
                rule_c,
                "ln K did not grow in some run (8.3a)",
                QUOTE_NOISE,
            )
        )
    else:
        mean, lo, hi = t_interval(shares, ALPHA)
        out.append(
            ClaimResult(
                "8.3c",
                "cumulative psi non-negligible",
                PAPER,
                pred_c,
                f"window sum psi_bar / increase of ln K = {fmt(mean)} [95% CI {fmt(lo)}, {fmt(hi)}]; "
                "window sum psi_bar "
                f"{fmt(np.mean([r['late_cumulative_psi'] for r in rows]))} vs diffusion sd "
                f"{fmt(np.mean([r['late_diffusion_std'] for r in rows]))} (above it in {sum(above_noise)}/"
                f"{len(rows)} runs); {near}",
                rule_c,
                three_way(lo >= SHARE_MIN and all(above_noise), hi < SHARE_MIN or not any(above_noise)),
                numbers=numbers | {"share_mean": mean, "ci": [lo, hi], "share_min": SHARE_MIN},
                paper_quote=QUOTE_NOISE,
            )
        )
    return out


def plot_near_convergence(records: Sequence[dict], results: Sequence[ClaimResult], save: FigureSaver) -> None:
    """near_convergence.png: cumulative psi_bar and mu_bar; the moving-window |psi|/|mu| ratio with the
    8.3b band; ln K observed against ln E[K] predicted, with the training loss."""
    plt = save.plt
    window = results[0].numbers.get("window", 0.25) if results else 0.25
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in records:
        steps = series(r, "step")
        mu, psi, _ = network_terms(r)
        first = r is records[0]
        (line,) = axes[0].plot(steps, np.cumsum(psi), label="cumulative psi_bar" if first else None)
        axes[0].plot(
            steps, np.cumsum(mu), "--", color=line.get_color(), label="cumulative mu_bar" if first else None
        )
        w = max(1, len(steps) // 20)
        kernel = np.ones(w) / w
        ratio = np.abs(np.convolve(psi, kernel, "valid")) / np.maximum(
            np.abs(np.convolve(mu, kernel, "valid")), 1e-300
        )
        axes[1].semilogy(steps[w - 1 :], ratio, color=line.get_color())
        _, mean, _var = predicted_path(r)
        axes[2].plot(steps, series(r, "log_bound"), color=line.get_color())
        axes[2].plot(steps, np.log(mean), ":", color=line.get_color())
        if first:
            ax2 = axes[2].twinx()
            ax2.semilogy(steps, series(r, "loss"), color="grey", alpha=0.4)
            ax2.set_ylabel("training loss (grey)")
            start = steps[len(steps) - max(2, round(window * len(steps)))]
            for ax in axes:
                ax.axvspan(start, steps[-1], color="y", alpha=0.1)
    axes[1].axhspan(
        10 ** LOG10_RATIO_BAND[0], 10 ** LOG10_RATIO_BAND[1], color="g", alpha=0.1, label="8.3b band"
    )
    axes[0].set_yscale("symlog", linthresh=1e-6)
    axes[0].set(
        xlabel="step", ylabel="cumulative (symlog)", title="8.3 cumulative psi_bar (solid), mu_bar (dashed)"
    )
    axes[1].set(
        xlabel="step", ylabel="|psi_bar| / |mu_bar| (moving window)", title="psi/mu ratio (yellow: window)"
    )
    axes[1].legend(fontsize=6)
    axes[2].set(xlabel="step", ylabel="ln K", title="ln K observed (solid), ln E[K] predicted (dotted)")
    axes[0].legend(fontsize=6)
    save(fig, "near_convergence.png")
