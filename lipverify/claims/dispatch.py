"""Which rules and figure belong to each sweep claim, and :func:`evaluate`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lipverify._validation import LipverifyError
from lipverify.claims.batch_size import evaluate_batch_size, plot_batch_size
from lipverify.claims.framework_label_drift import evaluate_label_drift
from lipverify.claims.framework_noise_growth import evaluate_noise_growth
from lipverify.claims.framework_spread_magnitude import evaluate_spread_magnitude
from lipverify.claims.framework_trajectory_spread import evaluate_trajectory_spread
from lipverify.claims.init import evaluate_init, plot_init
from lipverify.claims.label_noise import evaluate_label_noise, plot_label_noise
from lipverify.claims.near_convergence import evaluate_near_convergence, plot_near_convergence
from lipverify.claims.noisy_gradient import evaluate_noisy_gradient, plot_noisy_gradient
from lipverify.claims.result import ClaimResult, check_options
from lipverify.claims.trajectories import evaluate_trajectories, plot_trajectories

#: sweep claim -> the paper's rule(s), then the framework tests (ours) on the same records.
RULES: dict[str, tuple[Callable[..., list[ClaimResult]], ...]] = {
    "init": (evaluate_init,),
    "near_convergence": (evaluate_near_convergence, evaluate_noise_growth),
    "noisy_gradient": (evaluate_noisy_gradient,),
    "label_noise": (evaluate_label_noise, evaluate_label_drift),
    "batch_size": (evaluate_batch_size, evaluate_spread_magnitude),
    "trajectories": (evaluate_trajectories, evaluate_trajectory_spread),
}

#: the paper-claim evaluator of each sweep claim (kept for callers of the single-evaluator API).
EVALUATORS: dict[str, Callable[..., list[ClaimResult]]] = {claim: fns[0] for claim, fns in RULES.items()}

PLOTTERS: dict[str, Callable[..., None]] = {
    "init": plot_init,
    "near_convergence": plot_near_convergence,
    "noisy_gradient": plot_noisy_gradient,
    "label_noise": plot_label_noise,
    "batch_size": plot_batch_size,
    "trajectories": plot_trajectories,
}


def _parameters(fn: Callable) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "records"]


def evaluate(
    claim: str, records: Sequence[dict], options: Mapping[str, Any] | None = None
) -> list[ClaimResult]:
    """Evaluate ``claim`` on the records with the sweep's ``[options]``: the paper rows first, then
    the framework rows; each rule receives the options its signature names."""
    if claim not in RULES:
        raise LipverifyError(f"unknown claim {claim!r}; known: {list(RULES)}")
    options = dict(options or {})
    allowed = sorted({p for fn in RULES[claim] for p in _parameters(fn)})
    check_options(claim, options, allowed)
    out: list[ClaimResult] = []
    for fn in RULES[claim]:
        params = _parameters(fn)
        out += fn(records, **{k: v for k, v in options.items() if k in params})
    return out
