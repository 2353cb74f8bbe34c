"""Section 8.4, noisy gradient regularisation: the bound shrinks monotonically as the gradient scale
alpha decreases, with and without injected noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lipverify.claims.figures import FigureSaver
from lipverify.claims.result import ClaimResult, fmt
from lipverify.claims.stats import monotone_claim

QUOTE = (
    'Section 8.4: "As shown in Figure 6, the Lipschitz '
    'constant decreases monotonically as [alpha] decreases."'
)


def _group(r: dict) -> str:
    c = r["config"]
    return "none" if c["grad_noise"] == "none" else f"{c['grad_noise']} beta={fmt(c['grad_noise_std'])}"


def evaluate_noisy_gradient(records: Sequence[dict]) -> list[ClaimResult]:
    """8.4: gradient replaced by ``alpha g + beta xi``: ``mu -> alpha mu``,
    ``psi -> alpha^2 psi + beta^2 (eta^2/2b) tr(H Sigma_xi)``; the bound shrinks as alpha decreases.

    Groups: noise kind and beta; level: alpha (``grad_scale``). Rule: see
    :func:`lipverify.claims.stats.monotone_claim` (K_T increasing in alpha in every group, one-sided
    Spearman p < 0.05, no adjacent reversal beyond 2 combined SEs); predicted E[K_T] reported alongside.
    """
    obs: dict[str, dict[float, list[float]]] = {}
    pred: dict[str, dict[float, list[float]]] = {}
    rel = []
    for r in records:
        a = float(r["config"]["grad_scale"])
        obs.setdefault(_group(r), {}).setdefault(a, []).append(r["summary"]["K_T_observed"])
        pred.setdefault(_group(r), {}).setdefault(a, []).append(r["summary"]["K_T_predicted_mean"])
        rel.append(abs(r["summary"]["relative_error"]))
    claim = monotone_claim(
        "8.4",
        "noisy gradient: bound shrinks as alpha decreases",
        "Section 8.4",
        "K_T (and predicted E[K_T]) increase monotonically "
        "with the gradient scale alpha, for every noise kind",
        obs,
        +1,
        "alpha",
        pred,
        quote=QUOTE,
    )
    if rel and claim.verdict != "inconclusive":
        claim.measured += f"; |observed - predicted|/observed: median {fmt(float(np.median(rel)))}"
        claim.numbers["relative_error_median"] = float(np.median(rel))
    return [claim]


def plot_levels(ax, result: ClaimResult) -> None:
    """Observed K_T per level (mean +- 2 SE) and predicted E[K_T], one line per group."""
    for g, entry in result.numbers.items():
        if not isinstance(entry, dict) or "levels" not in entry:
            continue
        rows = entry["levels"]
        ax.errorbar(
            [row["level"] for row in rows],
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


def plot_noisy_gradient(records: Sequence[dict], results: Sequence[ClaimResult], save: FigureSaver) -> None:
    """noisy_gradient.png: K_T against alpha per noise group."""
    fig, ax = save.plt.subplots(figsize=(6.5, 4.5))
    plot_levels(ax, results[0])
    ax.set(
        xlabel="alpha (grad_scale)",
        ylabel="final bound K_T (mean +- 2 SE)",
        title=f"{results[0].id} {results[0].title}",
    )
    ax.legend(fontsize=7)
    save(fig, "noisy_gradient.png")
