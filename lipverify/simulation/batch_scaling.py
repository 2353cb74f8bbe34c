"""Proposition 21: the std of K_T across paths scales as b^{-1/2} (lognormal bound, matrix SDE)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from lipverify.montecarlo import log_log_slope, std
from lipverify.problems import (
    LognormalBound,
    MatrixSGDSDE,
)
from lipverify.sde import brownian_increments, integrate
from lipverify.simulation.matrix_layer import default_problem, well_gapped
from lipverify.simulation.results import Row, ValidationResult, _order_row


def batch_size_scaling(
    batches: Sequence[int] = (2, 4, 8, 16, 32, 64),
    paths: int = 20000,
    steps: int = 128,
    T: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> ValidationResult:
    """Proposition 21 on the lognormal bound with ``phi_bar^2 = c / b`` (``b(t)/sqrt(batch)``):
    fit the exponent of ``std(K_T)`` against b (log-log, MC slope error by the delta method).

    Prediction: the local exponent of the exact ``std = E sqrt(exp(Q/b) - 1)`` over the same b
    grid (-> -1/2 as b grows); bias allowance = difference between that and the exponent of the
    Euler chain's exact std (the scheme's bias). The leading-order -1/2 is reported as well.
    Wrong variant: biased noise ``Sigma = C / b^2`` (simulated: exponent -> -1).
    """
    start = time.perf_counter()
    h = T / steps
    dB = brownian_increments(steps, paths, 1, h, seed=seed, device=device)
    out = {}
    for tag, power in (("correct", 1.0), ("wrong", 2.0)):
        ests = []
        for b in batches:
            p = LognormalBound.example(batch_size=b**power)
            sol = integrate(p, torch.tensor([p.k0]), h, dB=dB, device=device)
            ests.append(std(sol.require_finite().final.flatten().cpu(), "K_T"))
        slope, se = log_log_slope(list(batches), [e.value for e in ests], [e.stderr / e.value for e in ests])
        out[tag] = (slope, se, ests)
    exact = [math.sqrt(LognormalBound.example(batch_size=b).variance(T)) for b in batches]
    euler = [math.sqrt(LognormalBound.example(batch_size=b).euler_moments(h, steps)[1]) for b in batches]
    pred, _ = log_log_slope(list(batches), exact, [0.0] * len(batches))
    pred_em, _ = log_log_slope(list(batches), euler, [0.0] * len(batches))
    slope, se, ests = out["correct"]
    wslope, wse, wests = out["wrong"]
    rows = [
        Row("Prop 21 exponent of std(K_T) in b", pred, slope, se, abs(pred_em - pred)),
        Row(
            "Prop 21 exponent (leading order)", -0.5, slope, se, abs(pred + 0.5), note="diag", diagnostic=True
        ),
        Row(
            "Prop 21 exponent of std(K_T) in b",
            pred,
            wslope,
            wse,
            abs(pred_em - pred),
            True,
            note="noise C/b^2",
        ),
    ]
    series = {
        "b": list(batches),
        "std": [e.value for e in ests],
        "se": [e.stderr for e in ests],
        "exact": exact,
        "wrong_std": [e.value for e in wests],
    }
    return ValidationResult("batch_size", rows, series, {"wrong_slope": wslope}, time.perf_counter() - start)


def matrix_batch_size_scaling(
    batches: Sequence[int] = (8, 16, 32, 64, 128),
    paths: int = 4000,
    T: float = 10.0,
    dt: float = 0.25,
    lr: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
) -> ValidationResult:
    """Proposition 21 on the matrix SGD-SDE: std of sigma_1(W_T) across paths against b (Sigma =
    C/b). First-order prediction -1/2; the O(1/b) correction is bounded by the difference between
    the slopes over the smaller and larger half of the b grid (measured local exponents on this
    problem: -0.38, -0.40, -0.45, -0.48 from b = 8 to 128, so b starts at 8). Wrong variant:
    Sigma = C/b^2."""
    start = time.perf_counter()
    pb = default_problem(seed)
    W0 = well_gapped(3, 4, (1.5, 0.8, 0.3), seed)
    steps = round(T / dt)
    dB = brownian_increments(steps, paths, pb.size, dt, seed=seed, device=device)
    out = {}
    for tag, power in (("correct", 1), ("wrong", 2)):
        ests = []
        for b in batches:
            sde = MatrixSGDSDE(pb, lr, b, noise_scale=1.0 / (pb.size * b**power))
            sol = integrate(sde, W0.reshape(-1), dt, dB=dB, device=device)
            ests.append(std(torch.linalg.svdvals(sde.matrix(sol.require_finite().final))[:, 0].cpu()))
        out[tag] = ests
    ests = out["correct"]
    rows = _order_row(
        "Prop 21 matrix exponent of std(sigma_T) in b", [float(b) for b in batches], ests, -0.5, None
    )
    w = _order_row(
        "Prop 21 matrix exponent of std(sigma_T) in b", [float(b) for b in batches], out["wrong"], -0.5, None
    )
    w[0].wrong, w[0].note = True, "noise C/b^2"
    w[0].bias = rows[0].bias
    rows += w
    series = {
        "b": list(batches),
        "std": [e.value for e in ests],
        "se": [e.stderr for e in ests],
        "wrong_std": [e.value for e in out["wrong"]],
    }
    return ValidationResult("batch_size_matrix", rows, series, seconds=time.perf_counter() - start)
