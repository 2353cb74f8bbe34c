"""Section 8.2, initialisation: sigma_1 of every layer at step 0 against s (sqrt m + sqrt n) (edge of
the Marchenko-Pastur law, Tracy-Widom fluctuations), and K_T against K_0 across init scales."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lipverify._validation import LipverifyError
from lipverify.claims.figures import FigureSaver
from lipverify.claims.result import ClaimResult, fmt, fmt_p, inconclusive, verdict
from lipverify.claims.stats import ALPHA, TW1_MEAN, TW1_STD, spearman

QUOTE_EDGE = (
    'Section 8.2: "According to the Tracy-Widom limiting distribution (Tracy and Widom, 1994; Tao, 2012), '
    "the largest singular value limit is [s(sqrt m + sqrt n); formula lost in the text], if [m, n] is "
    'sufficiently large."'
)
QUOTE_CARRY = (
    'Section 8.2: "According to Theorem 17, the network initialization affects both the expectation '
    'and uncertainty of Lipschitz continuity in the evolution."'
)


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
    Tracy-Widom scale) lies within ``TW1 mean +- k_tw TW1 std`` for every layer of every run
    (4 sd: a Tracy-Widom draw falls outside with probability below 1e-3, so 24 layer-draws rarely do).
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
            inconclusive(
                "8.2a", "init sigma_1 at the MP edge", paper, pred_a, rule_a, "no complete runs", QUOTE_EDGE
            ),
            inconclusive("8.2b", "K_T follows K_0", paper, pred_b, rule_b, "no complete runs", QUOTE_CARRY),
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
            f"sigma_1/edge over {len(zs)} layer-runs: {fmt(ratios.min())}..{fmt(ratios.max())}; z_TW "
            f"{fmt(zs.min())}..{fmt(zs.max())} (worst {worst['layer']} {worst['m']}x{worst['n']}, "
            f"{worst['init']} s={worst['init_scale']}); "
            f"K_0/K_0_pred {fmt(k0_ratio.min())}..{fmt(k0_ratio.max())}"
        )
        if worst
        else "no layers",
        rule_a,
        verdict(ok_a),
        numbers={"layers": layer_rows, "z_interval": [lo, hi]},
        paper_quote=QUOTE_EDGE,
    )
    k0 = [row["K0"] for row in run_rows]
    kt = [row["K_T"] for row in run_rows]
    if len(run_rows) < 3:
        b = inconclusive(
            "8.2b", "K_T follows K_0", paper, pred_b, rule_b, f"{len(run_rows)} runs (< 3)", QUOTE_CARRY
        )
    else:
        rho, p = spearman(k0, kt, "greater")
        slope = float(np.polyfit(np.log(k0), np.log(kt), 1)[0])
        b = ClaimResult(
            "8.2b",
            "K_T follows K_0",
            paper,
            pred_b,
            f"Spearman rho = {fmt(rho)} (p {fmt_p(p)}, {len(run_rows)} runs); log-log slope of K_T on K_0 "
            f"{fmt(slope)}; K_T/K_0 {fmt(min(r['K_T_over_K0'] for r in run_rows))}.."
            f"{fmt(max(r['K_T_over_K0'] for r in run_rows))}",
            rule_b,
            verdict(bool(rho > 0 and p < ALPHA)),
            numbers={"runs": run_rows, "spearman_rho": rho, "p_value": p, "loglog_slope": slope},
            paper_quote=QUOTE_CARRY,
        )
    return [a, b]


def plot_init(records: Sequence[dict], results: Sequence[ClaimResult], save: FigureSaver) -> None:
    """init.png: measured sigma_1 against the edge per layer; K_0 (measured, predicted) and K_T
    against the init scale; K_T against K_0."""
    plt = save.plt
    layers = results[0].numbers.get("layers", [])
    runs = results[1].numbers.get("runs", []) if len(results) > 1 else []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for init, marker in (("kaiming_normal", "o"), ("default", "s")):
        pts = [row for row in layers if row["init"] == init]
        if pts:
            axes[0].loglog(
                [p["edge"] for p in pts], [p["sigma0"] for p in pts], marker, label=init, alpha=0.7
            )
        rs = sorted((row for row in runs if row["init"] == init), key=lambda row: row["init_scale"])
        if rs:
            scales = [row["init_scale"] for row in rs]
            axes[1].loglog(scales, [row["K0"] for row in rs], marker + "-", label=f"{init} K_0")
            axes[1].loglog(scales, [row["K0_predicted"] for row in rs], "k:", alpha=0.6)
            axes[1].loglog(scales, [row["K_T"] for row in rs], marker + "--", label=f"{init} K_T")
            axes[2].loglog([row["K0"] for row in rs], [row["K_T"] for row in rs], marker, label=init)
    if layers:
        lim = [min(p["edge"] for p in layers), max(p["edge"] for p in layers)]
        axes[0].loglog(lim, lim, "k--", lw=1, label="s(sqrt m + sqrt n)")
    axes[0].set(xlabel="predicted s(sqrt m + sqrt n)", ylabel="measured sigma_1 at init", title="8.2 layers")
    axes[1].set(xlabel="init scale", ylabel="bound", title="K_0 (dotted: predicted), K_T")
    axes[2].set(xlabel="K_0", ylabel="K_T", title="K_T against K_0")
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, "init.png")
