"""Assumption 3 along a run: the cross-layer noise term against phi_bar^2 (framework test beyond the paper).

Theorem 15 assumes independent layer noises (Assumption 3), so the per-step diffusion of ln K is
``phi_bar^2 = sum_l phi_l^2 / sigma_l^2``. The full per-step variance is ``phi_bar^2 + cross``,
``cross = eta^2 sum_{l != l'} J_l^T Sigma_{ll'} J_l' / (sigma_l sigma_l')``, which the probe records
as ``net_phi_sq_cross`` in ``steps.csv`` (column ``net_phi_sq`` holds phi_bar^2). This module reads
both and reports, per probed step and cumulatively (sums over the probed steps, i.e. the Theorem 17
variance ``Phi_t = int phi_bar^2 ds`` with and without the cross terms):

- ``ratio = cross / phi_bar^2`` (0 under Assumption 3; can be negative: anti-correlated layers);
- ``share = cross / (phi_bar^2 + cross)``, the cross terms' share of the total variance of ln K.

Summary: Assumption 3 "holds within X%" where ``X = 100 |sum cross| / sum phi_bar^2`` over the run;
``holds`` is ``X <= tolerance_percent``. The same over the second half of the probed steps is
reported because the issue found the correlation grows late in training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lipverify._validation import LipverifyError
from lipverify.records import read_steps


def cross_layer_along_run(run_dir: str | Path, tolerance_percent: float = 10.0) -> dict[str, Any]:
    """Cross-layer term vs phi_bar^2 along the run in ``run_dir`` (its ``steps.csv``).

    Returns a dict: ``steps`` (list of {step, phi_bar_sq, cross, ratio, share, cumulative_phi_bar_sq,
    cumulative_cross, cumulative_ratio}), ``summary`` (total and late-half ratios, ``percent``,
    ``holds``, ``message``). Rows without the probe's terms (the final row, unprobed steps) are
    skipped. A missing column, no probed step, a non-finite value or a non-positive phi_bar^2 is a
    :class:`LipverifyError`.
    """
    if not (tolerance_percent >= 0 and math.isfinite(tolerance_percent)):
        raise LipverifyError(f"tolerance_percent must be a finite number >= 0, got {tolerance_percent}")
    path = Path(run_dir) / "steps.csv"
    columns, rows = read_steps(path)
    missing = [c for c in ("step", "net_phi_sq", "net_phi_sq_cross") if c not in columns]
    if missing:
        raise LipverifyError(f"{path} has no column(s) {', '.join(missing)}: not a lipverify probe record")
    steps, cum_phi, cum_cross = [], 0.0, 0.0
    for r in rows:
        phi_sq, cross = r["net_phi_sq"], r["net_phi_sq_cross"]
        if phi_sq is None or cross is None:
            continue
        if not (math.isfinite(phi_sq) and math.isfinite(cross)):
            raise LipverifyError(f"{path}: non-finite net_phi_sq / net_phi_sq_cross at step {r['step']:.0f}")
        if phi_sq <= 0:
            raise LipverifyError(f"{path}: net_phi_sq must be > 0, got {phi_sq} at step {r['step']:.0f}")
        cum_phi += phi_sq
        cum_cross += cross
        steps.append(
            {
                "step": int(r["step"]),
                "phi_bar_sq": phi_sq,
                "cross": cross,
                "ratio": cross / phi_sq,
                "share": cross / (phi_sq + cross) if phi_sq + cross != 0 else math.nan,
                "cumulative_phi_bar_sq": cum_phi,
                "cumulative_cross": cum_cross,
                "cumulative_ratio": cum_cross / cum_phi,
            }
        )
    if not steps:
        raise LipverifyError(f"{path} has no probed step (empty net_phi_sq / net_phi_sq_cross)")
    late = steps[len(steps) // 2 :]
    late_phi = sum(s["phi_bar_sq"] for s in late)
    late_cross = sum(s["cross"] for s in late)
    percent = 100 * abs(cum_cross) / cum_phi
    holds = percent <= tolerance_percent
    message = (
        f"Assumption 3 {'holds' if holds else 'does not hold'} within {tolerance_percent:g}% over the run: "
        f"the cross-layer term is {100 * cum_cross / cum_phi:+.1f}% of phi_bar^2 "
        f"({100 * late_cross / late_phi:+.1f}% over the second half)"
    )
    summary = {
        "probed_steps": len(steps),
        "cumulative_phi_bar_sq": cum_phi,
        "cumulative_cross": cum_cross,
        "ratio": cum_cross / cum_phi,
        "share": cum_cross / (cum_phi + cum_cross) if cum_phi + cum_cross != 0 else math.nan,
        "late_ratio": late_cross / late_phi,
        "late_from_step": late[0]["step"],
        "max_step_ratio": max(s["ratio"] for s in steps),
        "percent": percent,
        "tolerance_percent": tolerance_percent,
        "holds": holds,
        "message": message,
    }
    return {"run_dir": str(run_dir), "steps": steps, "summary": summary}
