"""Ornstein–Uhlenbeck validation: Euler–Maruyama moments against the closed forms."""

from __future__ import annotations

import math
import time

import torch

from lipverify.montecarlo import mean, variance
from lipverify.problems import (
    OrnsteinUhlenbeck,
)
from lipverify.sde import integrate
from lipverify.simulation.results import Row, ValidationResult, step_bias


def ou(
    paths: int = 20000, steps: int = 200, T: float = 2.0, seed: int = 0, device: str = "cpu"
) -> ValidationResult:
    """Ornstein–Uhlenbeck: MC mean and variance at T against the exact ones; bias allowance =
    :func:`~lipverify.simulation.results.step_bias` of the Euler chain's exact moments at
    ``steps``, ``steps/2``, ``steps/4`` (independent of the closed forms under test; ``steps`` a
    multiple of 4). Wrong variants: no drift (mean ``x0``) and the variance without the drift's
    mean reversion (``s^2 T``, the Brownian variance)."""
    start = time.perf_counter()
    p = OrnsteinUhlenbeck()
    h = T / steps
    sol = integrate(
        p,
        torch.tensor([p.x0]),
        h,
        steps=steps,
        paths=paths,
        seed=seed,
        record_every=max(steps // 50, 1),
        device=device,
    )
    X = sol.require_finite().final.flatten().cpu()
    bias_m = step_bias(lambda n: p.euler_moments(T / n, n)[0], steps)
    bias_v = step_bias(lambda n: p.euler_moments(T / n, n)[1], steps)
    mX, vX = mean(X, "X_T"), variance(X, "X_T")
    rows = [
        Row("OU E[X_T]", p.mean(T), mX.value, mX.stderr, bias_m, paths=paths),
        Row("OU E[X_T]", p.x0, mX.value, mX.stderr, bias_m, True, note="no drift", paths=paths),
        Row("OU Var[X_T]", p.variance(T), vX.value, vX.stderr, bias_v, paths=paths),
        Row(
            "OU Var[X_T]",
            p.s**2 * T,
            vX.value,
            vX.stderr,
            bias_v,
            True,
            note="Brownian variance s^2 T",
            paths=paths,
        ),
    ]
    states = sol.states[..., 0].cpu()
    series = {
        "times": sol.times.tolist(),
        "mc_mean": states.mean(1).tolist(),
        "mc_std": states.std(1).tolist(),
        "pred_mean": [p.mean(float(t)) for t in sol.times],
        "pred_std": [math.sqrt(p.variance(float(t))) for t in sol.times],
        "sample_paths": states[:, :20].T.tolist(),
    }
    return ValidationResult("ou", rows, series, seconds=time.perf_counter() - start)
