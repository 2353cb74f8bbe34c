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
from lipverify.simulation.results import Row, ValidationResult


def ou(
    paths: int = 20000, steps: int = 200, T: float = 2.0, seed: int = 0, device: str = "cpu"
) -> ValidationResult:
    """Ornstein–Uhlenbeck: MC mean and variance at T against the exact ones, bias = exact moments
    of the Euler chain minus the closed form. Wrong variant: variance without the drift's
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
    em_m, em_v = p.euler_moments(h, steps)
    mX, vX = mean(X, "X_T"), variance(X, "X_T")
    rows = [
        Row("OU E[X_T]", p.mean(T), mX.value, mX.stderr, em_m - p.mean(T)),
        Row("OU E[X_T]", p.x0, mX.value, mX.stderr, em_m - p.mean(T), True, note="no drift"),
        Row("OU Var[X_T]", p.variance(T), vX.value, vX.stderr, em_v - p.variance(T)),
        Row(
            "OU Var[X_T]",
            p.s**2 * T,
            vX.value,
            vX.stderr,
            em_v - p.variance(T),
            True,
            note="Brownian variance s^2 T",
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
