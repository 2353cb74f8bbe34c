"""Label noise against its model (framework test beyond the paper; lipverify issue 13).

Section 8.5 of the paper derives ``mu -> (1 - p) mu`` for labels replaced uniformly at random with
probability p from an assumption it quotes from the literature (the corrupted part of the loss has
zero expected gradient), hence ``E[K_t] ~ K_0 exp((1 - p) int mu_bar + int psi_bar)`` (MATH.md §6).
For cross-entropy that assumption is not exact: the expected loss under corruption is
``(1 - p) L_clean + p L_uniform`` with ``L_uniform = (1/C) sum_c CE(f(x), c)``, whose gradient pushes
the predictions toward uniform and vanishes only where they are uniform (near initialisation).
This module measures how far the model holds, in two ways.

1. **At the same weights** (``drift_ratio``): a run trained with corrupted labels and
   ``full_gradient_clean = true`` records at every full-gradient step t both network drifts
   ``mu_bar = sum_l mu_l / sigma_l`` from the full-data gradient, with the corrupted labels
   (``net_mu_full``) and with the clean labels (``net_mu_full_clean``), at its own weights theta_t.
   Per run, ``R = sum_t mu_bar_p(theta_t) / sum_t mu_bar_0(theta_t)`` (the ratio of the cumulative
   drifts, which is what enters ln K; per-step ratios are reported but a step whose clean drift is
   near 0 makes them meaningless). Weight decay's ``-eta lambda`` per layer is removed first (the law
   is about the loss gradient). Per p: the Student-t interval (level ``1 - alpha/k``, Bonferroni
   over the k levels) of the mean R over the seeds against the band
   ``(1 - p)(1 -/+ tolerance)``.

2. **Along trajectories** (``trajectory``): growth ``G = ln K_T - ln K_0`` of
   - LN: label-noise runs (p, ``grad_scale = 1``);
   - GS: clean-label runs with ``grad_scale = 1 - p``: the model realised exactly. The optimiser
     steps with ``eta (1 - p) g_B`` (:mod:`lipverify.training` scales ``p.grad`` before
     ``optimizer.step()``, as Section 8.4's alpha), so the drift is exactly ``(1 - p) mu`` at every
     weight, while the noise terms scale as ``psi ~ (1 - p)^2`` and ``phi ~ (1 - p)``;
   - C@(1-p)T: the clean run (p = 0, ``grad_scale = 1``) read at step ``(1 - p)T`` (linear
     interpolation between logged steps when not an integer). It has the same ``eta x steps`` as GS;
   compared in pairs that share the seed_sampling (the same mini-batch indices) and theta_0:
   - ``LN vs GS`` tests the model along training: does corrupting labels act as a gradient scale?
   - ``GS vs C@(1-p)T`` tests time rescaling, not label noise: with lr x steps fixed, the drift
     integral is the same in SDE time ``t = eta k``, but GS has ``(1 - p)`` times the per-unit-time
     diffusion and psi of C, and a (1 - p) smaller step (less discretisation). It passes when
     growth is drift-dominated and the gradient-flow limit holds; it says nothing about labels.
   - ``LN vs C@(1-p)T``: the practical shortcut "a label-noise run at T looks like the clean run at
     (1 - p)T"; it passes only when both of the above hold (or their errors cancel).
   Per p and comparison: paired differences ``d_s = G_X - G_Y``, Student-t interval (Bonferroni over
   the levels), against the band ``|d| <= tolerance x |mean G_C(T)|`` (the clean run's growth sets
   the scale: the model's predictions for levels p and p' differ by ``|p - p'| |G_C|``, so with
   tolerance 0.1 an error inside the band is under half the gap of a 0.2-spaced grid).

Verdicts (each level, then each section): pass when the interval lies inside the band, fail when it
lies entirely outside, inconclusive otherwise or with fewer than 2 seeds. A section fails if a level
fails, passes if all pass. The overall verdict is over the two sections that test the label-noise
model (``drift_ratio`` and ``LN vs GS``); ``GS vs C`` and ``LN vs C`` are reported with their own
verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from lipverify._validation import LipverifyError

#: default relative tolerance (see the module docstring for the reason)
TOLERANCE = 0.10
ALPHA = 0.05
#: per-step ratios skip steps whose clean drift is below this share of the run's largest |clean drift|
SMALL_DRIFT_SHARE = 0.05
COMPARISONS = (
    ("LN vs GS", "ln", "gs", "label noise against the model realised exactly (grad_scale = 1 - p)"),
    ("GS vs C@(1-p)T", "gs", "clean_at", "time rescaling (same lr x steps); not a test of label noise"),
    ("LN vs C@(1-p)T", "ln", "clean_at", "label-noise run at T against the clean run at (1 - p)T"),
)
MODEL_SECTIONS = ("drift_ratio", "LN vs GS")


def _p(record: dict) -> float:
    return float(record["config"].get("label_noise", 0.0))


def _alpha_scale(record: dict) -> float:
    return float(record["config"].get("grad_scale", 1.0))


def _col(record: dict, key: str) -> np.ndarray:
    try:
        return np.asarray(record["series"][key], dtype=float)
    except KeyError as exc:
        raise LipverifyError(f"run {record.get('name')}: steps.csv has no column {key!r}") from exc


def band_verdict(ci: tuple[float, float] | None, lo: float, hi: float) -> str:
    """pass: the interval inside [lo, hi]; fail: disjoint from it; inconclusive otherwise (or no interval)."""
    if ci is None:
        return "inconclusive"
    if lo <= ci[0] and ci[1] <= hi:
        return "pass"
    if ci[1] < lo or ci[0] > hi:
        return "fail"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """fail if any fails, pass if all pass (and there is one), else inconclusive."""
    if "fail" in verdicts:
        return "fail"
    if verdicts and all(v == "pass" for v in verdicts):
        return "pass"
    return "inconclusive"


def _interval(values: Sequence[float], level: float) -> tuple[float, tuple[float, float] | None]:
    mean = float(np.mean(values))
    n = len(values)
    if n < 2:
        return mean, None
    half = float(stats.t.ppf(1 - (1 - level) / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, (mean - half, mean + half)


def run_drift_ratio(record: dict) -> dict[str, Any]:
    """Along one run with both full-data drifts recorded: the cumulative ratio
    ``R = sum_t mu_bar_p(theta_t) / sum_t mu_bar_0(theta_t)`` over the steps where both are finite,
    with weight decay's ``-eta lambda`` per layer removed from each; early/late halves; per-step
    ratio quantiles over steps whose ``|mu_bar_0|`` is at least ``SMALL_DRIFT_SHARE`` of its largest.
    A :class:`LipverifyError` when the columns are missing (``full_gradient_clean`` was off) or no
    step has both drifts; ``R`` is None when the clean drifts sum to (numerically) zero."""
    name = record.get("name")
    corrupted, clean = _col(record, "net_mu_full"), _col(record, "net_mu_full_clean")
    steps = _col(record, "step")
    c = record["config"]
    layers = sum(1 for k in record["series"] if k.endswith(".mu_full_clean"))
    wd_part = -float(c.get("lr", 0.0)) * float(c.get("weight_decay", 0.0)) * layers
    ok = np.isfinite(corrupted) & np.isfinite(clean)
    if not ok.any():
        raise LipverifyError(
            f"run {name}: no step with both net_mu_full and net_mu_full_clean "
            "(train with full_gradient_clean = true)"
        )
    corrupted, clean, steps = corrupted[ok] - wd_part, clean[ok] - wd_part, steps[ok]

    def ratio(a: np.ndarray, b: np.ndarray) -> float | None:
        den = float(b.sum())
        # a sum of clean drifts that cancels to rounding level carries no ratio
        if abs(den) <= 1e3 * np.finfo(float).eps * float(np.abs(b).sum()) or den == 0:
            return None
        return float(a.sum()) / den

    half = len(clean) // 2
    big = np.abs(clean) >= SMALL_DRIFT_SHARE * float(np.abs(clean).max())
    per_step = corrupted[big] / clean[big] if big.any() else np.array([])
    return {
        "name": name,
        "p": _p(record),
        "seed_sampling": c.get("seed_sampling"),
        "steps": len(clean),
        "cumulative_corrupted": float(corrupted.sum()),
        "cumulative_clean": float(clean.sum()),
        "ratio": ratio(corrupted, clean),
        "ratio_first_step": float(corrupted[0] / clean[0]) if clean[0] != 0 else None,
        "ratio_early": ratio(corrupted[:half], clean[:half]) if half else None,
        "ratio_late": ratio(corrupted[half:], clean[half:]),
        "late_from_step": int(steps[half]),
        "per_step_quantiles": (
            [float(q) for q in np.quantile(per_step, [0.1, 0.5, 0.9])] if per_step.size else None
        ),
        "per_step_used": int(per_step.size),
    }


def drift_ratio_section(
    records: Sequence[dict], tolerance: float = TOLERANCE, alpha: float = ALPHA
) -> dict[str, Any]:
    """Section 1 on the runs with p > 0 that recorded both drifts (see the module docstring)."""
    runs = [run_drift_ratio(r) for r in records if _p(r) > 0 and "net_mu_full_clean" in r["series"]]
    levels = sorted({r["p"] for r in runs})
    k = max(len(levels), 1)
    rows = []
    for p in levels:
        ratios = [r["ratio"] for r in runs if r["p"] == p and r["ratio"] is not None]
        lo, hi = (1 - p) * (1 - tolerance), (1 - p) * (1 + tolerance)
        row: dict[str, Any] = {"p": p, "predicted": 1 - p, "band": [lo, hi], "n": len(ratios)}
        if not ratios:
            row.update(mean=None, ci=None, verdict="inconclusive", reason="no run with a usable ratio")
        else:
            mean, ci = _interval(ratios, 1 - alpha / k)
            v = band_verdict(ci, lo, hi)
            row.update(
                mean=mean,
                ci=list(ci) if ci else None,
                ratios=ratios,
                mean_early=_mean([r["ratio_early"] for r in runs if r["p"] == p]),
                mean_late=_mean([r["ratio_late"] for r in runs if r["p"] == p]),
                mean_first_step=_mean([r["ratio_first_step"] for r in runs if r["p"] == p]),
                verdict=v,
                reason=_reason(v, ci, lo, hi, len(ratios)),
            )
        rows.append(row)
    verdict = combine([r["verdict"] for r in rows])
    if not rows:
        reason = "no label-noise run (p > 0) recorded both drifts (train with full_gradient_clean = true)"
    else:
        reason = "; ".join(f"p={r['p']:g}: {r['reason']}" for r in rows)
    return {
        "rule": (
            f"per p: the t-interval (level {1 - alpha / k:.3g}, Bonferroni over {k}) of the mean over "
            "seeds of R = sum mu_bar_p / sum mu_bar_0 at the same weights inside "
            f"(1 - p)(1 -/+ {tolerance:g})"
        ),
        "levels": rows,
        "runs": runs,
        "verdict": verdict,
        "reason": reason,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _reason(v: str, ci, lo: float, hi: float, n: int) -> str:
    if ci is None:
        return f"inconclusive: {n} seed(s), an interval needs >= 2"
    where = {"pass": "inside", "fail": "outside", "inconclusive": "overlaps the edge of"}[v]
    return f"{v}: CI [{ci[0]:.4g}, {ci[1]:.4g}] {where} band [{lo:.4g}, {hi:.4g}]"


def growth_at(record: dict, step: float) -> float:
    """``ln K`` at ``step`` minus ``ln K_0`` from the run's log_bound column, linearly interpolated
    between logged steps; a :class:`LipverifyError` when ``step`` is outside the logged range."""
    steps, logk = _col(record, "step"), _col(record, "log_bound")
    ok = np.isfinite(steps) & np.isfinite(logk)
    steps, logk = steps[ok], logk[ok]
    if not len(steps) or step < steps[0] or step > steps[-1]:
        raise LipverifyError(f"run {record.get('name')}: step {step:g} is outside the logged ln K steps")
    return float(np.interp(step, steps, logk) - logk[0])


def trajectory_section(
    records: Sequence[dict], tolerance: float = TOLERANCE, alpha: float = ALPHA
) -> dict[str, Any]:
    """Section 2 (see the module docstring): the runs are classified by (label_noise, grad_scale);
    any other combination is ignored. Levels p come from the label-noise runs and from
    ``1 - grad_scale`` of the scaled runs."""
    clean, ln, gs = {}, {}, {}
    for r in records:
        p, a = _p(r), _alpha_scale(r)
        seed = r["config"].get("seed_sampling")
        if p == 0 and a == 1:
            clean[seed] = r
        elif p > 0 and a == 1:
            ln.setdefault(round(p, 12), {})[seed] = r
        elif p == 0 and a < 1:
            gs.setdefault(round(1 - a, 12), {})[seed] = r
    out: dict[str, Any] = {"comparisons": {}, "clean_growth": None}
    if not clean:
        for name, *_ in COMPARISONS:
            out["comparisons"][name] = {"levels": [], "verdict": "inconclusive", "reason": "no clean run"}
        return out
    steps_t = {float(r["config"]["steps"]) for r in records}
    if len(steps_t) != 1:
        raise LipverifyError(
            f"the runs differ in the number of steps {sorted(steps_t)}: growths not comparable"
        )
    (big_t,) = steps_t
    g_clean = float(np.mean([growth_at(r, big_t) for r in clean.values()]))
    out["clean_growth"] = g_clean
    out["steps"] = big_t
    levels = sorted(set(ln) | set(gs))
    k = max(len(levels), 1)
    for name, x_key, y_key, what in COMPARISONS:
        rows = []
        for p in levels:
            sources = {"ln": ln.get(p, {}), "gs": gs.get(p, {}), "clean_at": clean}
            read_at = {"ln": big_t, "gs": big_t, "clean_at": (1 - p) * big_t}
            seeds = sorted(set(sources[x_key]) & set(sources[y_key]), key=str)
            gx = [growth_at(sources[x_key][s], read_at[x_key]) for s in seeds]
            gy = [growth_at(sources[y_key][s], read_at[y_key]) for s in seeds]
            diffs = [a - b for a, b in zip(gx, gy, strict=True)]
            band = tolerance * abs(g_clean)
            row: dict[str, Any] = {"p": p, "n": len(seeds), "band": [-band, band]}
            if not seeds:
                row.update(verdict="inconclusive", reason="no paired runs", ci=None)
            else:
                mean, ci = _interval(diffs, 1 - alpha / k)
                v = band_verdict(ci, -band, band)
                row.update(
                    growth_x=float(np.mean(gx)),
                    growth_y=float(np.mean(gy)),
                    mean_difference=mean,
                    ci=list(ci) if ci else None,
                    verdict=v,
                    reason=_reason(v, ci, -band, band, len(seeds)),
                )
            rows.append(row)
        verdict = combine([r["verdict"] for r in rows])
        out["comparisons"][name] = {
            "what": what,
            "rule": (
                f"per p: the t-interval (level {1 - alpha / k:.3g}) of the mean paired difference of "
                f"ln K growth inside +/- {tolerance:g} x |clean growth over T|"
            ),
            "levels": rows,
            "verdict": verdict,
            "reason": "; ".join(f"p={r['p']:g}: {r['reason']}" for r in rows) or "no levels",
        }
    return out


def label_noise_model_records(
    records: Sequence[dict], tolerance: float = TOLERANCE, alpha: float = ALPHA
) -> dict[str, Any]:
    """Both sections on run records (dicts with ``name``, ``config`` and ``series``: steps.csv column
    -> list of floats, as :func:`lipverify.claims.records.load_records` returns). Runs must share
    theta_0 (one seed_init). Returns a JSON-ready dict: ``drift_ratio``, ``trajectory``,
    ``verdict`` (over :data:`MODEL_SECTIONS`), ``settings``."""
    if not 0 < tolerance < 1:
        raise LipverifyError(f"tolerance must be in (0, 1), got {tolerance}")
    if not 0 < alpha < 1:
        raise LipverifyError(f"alpha must be in (0, 1), got {alpha}")
    if not records:
        raise LipverifyError("no complete runs to evaluate")
    inits = {r["config"].get("seed_init") for r in records}
    if len(inits) > 1:
        raise LipverifyError(f"the runs do not share theta_0: seed_init values {sorted(inits, key=str)}")
    drift = drift_ratio_section(records, tolerance, alpha)
    traj = trajectory_section(records, tolerance, alpha)
    model = [drift["verdict"], traj["comparisons"]["LN vs GS"]["verdict"]]
    return {
        "verdict": combine(model),
        "drift_ratio": drift,
        "trajectory": traj,
        "settings": {"tolerance": tolerance, "alpha": alpha, "runs": len(records)},
    }


def label_noise_model(
    sweep_dir: str | Path, tolerance: float = TOLERANCE, alpha: float = ALPHA
) -> dict[str, Any]:
    """:func:`label_noise_model_records` on the complete runs of a ``lipverify sweep`` directory
    (e.g. experiments/framework_label_noise_model.toml); runs that are not complete are listed
    under ``problems``."""
    from lipverify.claims.records import load_records

    _, records, problems = load_records(sweep_dir, summarize=lambda run_dir: {})
    result = label_noise_model_records(records, tolerance, alpha)
    result["sweep_dir"] = str(sweep_dir)
    result["problems"] = problems
    return result
