"""Validation 1: the lognormal bound ``dK = K a dt + K b dB`` (Theorems 15/17, Lemma 19) and the
measured strong/weak orders of every scheme (MATH §3–§5)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from lipverify._validation import LipverifyError
from lipverify.montecarlo import Estimate, mean, variance
from lipverify.problems import (
    LognormalBound,
)
from lipverify.sde import SCHEMES, brownian_increments, coarsen, get_scheme, integrate
from lipverify.simulation.results import Row, ValidationResult, _order_row, step_bias

# 1. lognormal bound: Theorem 17, Lemma 19, Theorem 15 moments; strong/weak orders


def lognormal_moments(
    paths: int = 20000, steps: int = 256, T: float = 1.0, seed: int = 0, device: str = "cpu"
):
    """Theorem 17 / Lemma 19 / Theorem 15 on ``dK = K a dt + K b dB`` (:meth:`LognormalBound.example`).

    Euler–Maruyama with ``steps`` steps; rows compare MC ``E[K_T]``, ``Var[K_T]``, ``E[ln K_T]``
    and ``E[exp(int b dB)]`` (Lemma 19 MGF at s = 1, ``int b dB`` as ``sum b(t_k) dB_k``) with
    the closed forms. The step-size bias allowance (:func:`~lipverify.simulation.results.step_bias`)
    is a Richardson bound from the Euler chain's own exact values at ``steps``, ``steps/2`` and
    ``steps/4`` steps, never from the closed form under test: its mean and variance
    (:meth:`LognormalBound.euler_moments`), its log-mean by Gauss–Hermite quadrature of
    ``E ln(1 + a_k h + b_k dB)`` per step, and ``exp(sum b_k^2 h / 2)`` for the MGF.
    Wrong variants: mean and log-mean without the Itô correction, variance to first order in Phi
    (``E^2 Phi``), MGF without the Itô term (``= 1``). ``steps``: a multiple of 4.
    """
    import numpy as np

    p = LognormalBound.example()
    h = T / steps
    dB = brownian_increments(steps, paths, 1, h, seed=seed, device=device)
    sol = integrate(p, torch.tensor([p.k0]), h, dB=dB, record_every=max(steps // 64, 1), device=device)
    K = sol.require_finite().final.flatten().cpu()
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()

    def chain_log_mean(n: int) -> float:
        hn, out = T / n, math.log(p.k0)
        for k in range(n):
            arg = 1 + p.a(k * hn) * hn + p.b(k * hn) * math.sqrt(hn) * nodes
            out += float((weights * np.log(np.maximum(arg, 1e-300))).sum())
        return out

    def chain_mgf(n: int) -> float:
        hn = T / n
        return math.exp(sum(p.b(k * hn) ** 2 * hn for k in range(n)) / 2)

    bias_m = step_bias(lambda n: p.euler_moments(T / n, n)[0], steps)
    bias_v = step_bias(lambda n: p.euler_moments(T / n, n)[1], steps)
    bias_l = step_bias(chain_log_mean, steps)
    bias_x = step_bias(chain_mgf, steps)
    bvals = torch.tensor([p.b(k * h) for k in range(steps)], dtype=torch.float64)
    X = torch.einsum("k,kp->p", bvals.to(dB), dB[..., 0]).cpu()
    Phi = p.int_b2(T)
    E, V, L = p.mean(T), p.variance(T), p.log_mean(T)
    mK, vK, mL, mgf = (
        mean(K, "K_T"),
        variance(K, "K_T"),
        mean(torch.log(K), "ln K_T"),
        mean(torch.exp(X), "exp(X_T)"),
    )
    n = paths
    rows = [
        Row("Thm 17 E[K_T]", E, mK.value, mK.stderr, bias_m, paths=n),
        Row(
            "Thm 17 E[K_T]",
            p.k0 * math.exp(p.int_a(T) - Phi / 2),
            mK.value,
            mK.stderr,
            bias_m,
            True,
            note="no Itô correction: K0 exp(int(a - b^2/2))",
            paths=n,
        ),
        Row("Thm 17 Var[K_T]", V, vK.value, vK.stderr, bias_v, paths=n),
        Row(
            "Thm 17 Var[K_T]",
            E * E * Phi,
            vK.value,
            vK.stderr,
            bias_v,
            True,
            note="first order: E^2 Phi",
            paths=n,
        ),
        Row("Thm 15 E[ln K_T]", L, mL.value, mL.stderr, bias_l, paths=n),
        Row(
            "Thm 15 E[ln K_T]",
            math.log(p.k0) + p.int_a(T),
            mL.value,
            mL.stderr,
            bias_l,
            True,
            note="no Itô correction: ln K0 + int a",
            paths=n,
        ),
        Row("Lemma 19 E[exp(X_T)]", math.exp(Phi / 2), mgf.value, mgf.stderr, bias_x, paths=n),
        Row(
            "Lemma 19 E[exp(X_T)]",
            1.0,
            mgf.value,
            mgf.stderr,
            bias_x,
            True,
            note="no Itô correction: E[e^X] = 1",
            paths=n,
        ),
    ]
    states = sol.states[..., 0].cpu()
    times = sol.times
    series = {
        "times": times.tolist(),
        "mc_mean": states.mean(1).tolist(),
        "mc_std": states.std(1).tolist(),
        "pred_mean": [p.mean(float(t)) for t in times],
        "pred_std": [math.sqrt(p.variance(float(t))) for t in times],
        "sample_paths": states[:, :20].T.tolist(),
    }
    return rows, series


def strong_weak_orders(
    scheme: str = "euler",
    strong_paths: int = 2000,
    strong_levels: Sequence[int] = (32, 64, 128, 256, 512),
    fine_steps: int = 4096,
    weak_paths: int = 50000,
    weak_levels: Sequence[int] = (2, 4, 8, 16, 32),
    T: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[list[Row], dict]:
    """Measured strong and weak orders of ``scheme`` on the lognormal bound.

    Strong: ``E|K_h(T) - K(T)|`` on nested grids sharing one Brownian path of ``fine_steps``
    steps; K(T) the exact solution on that path (its own error O(h_fine), far below the levels').
    Weak: ``E[K_h(T)] - E[K(T)]`` estimated with the control variate ``Y_h = K0 exp(A - Q/2 +
    sum b(mid_k) dB_k)`` on the level's grid (``E[Y_h]`` known exactly), i.e.
    ``mean(K_h - Y_h) + E[Y_h] - K0 e^A``: unbiased, with variance O(h) instead of O(1).
    The fitted slopes are compared with the scheme's declared ``strong_order``/``weak_order``.
    """
    sch = get_scheme(scheme)
    p = LognormalBound.example()
    x0 = torch.tensor([p.k0])
    hf = T / fine_steps
    dB = brownian_increments(fine_steps, strong_paths, 1, hf, seed=seed, device=device)
    ref = p.exact(dB, hf)
    hs, serr = [], []
    for steps in strong_levels:
        if fine_steps % steps:
            raise LipverifyError(f"level {steps} does not divide fine_steps {fine_steps}")
        sol = integrate(p, x0, T / steps, dB=coarsen(dB, fine_steps // steps), scheme=sch, device=device)
        hs.append(T / steps)
        serr.append(mean((sol.require_finite().final - ref).abs().cpu(), "strong error"))
    top = max(weak_levels)
    dBw = brownian_increments(top, weak_paths, 1, T / top, seed=seed + 1, device=device)
    whs, werr = [], []
    for steps in weak_levels:
        h = T / steps
        inc = coarsen(dBw, top // steps)
        sol = integrate(p, x0, h, dB=inc, scheme=sch, device=device)
        Y = p.exact(inc, h)
        q_mid = sum(p.b((k + 0.5) * h) ** 2 * h for k in range(steps))
        EY = p.k0 * math.exp(p.int_a(T) - p.int_b2(T) / 2 + q_mid / 2)
        d = mean((sol.require_finite().final - Y).cpu(), "weak error")
        whs.append(h)
        werr.append(Estimate(d.value + EY - p.mean(T), d.stderr, d.n))
    wrong_strong = 1.0 if sch.strong_order < 1 else 0.5
    rows = _order_row(f"strong order ({sch.name})", hs, serr, sch.strong_order, wrong_strong)
    rows += _order_row(f"weak order ({sch.name})", whs, werr, sch.weak_order, 0.5)
    series = {
        "strong_h": hs,
        "strong_err": [e.value for e in serr],
        "strong_se": [e.stderr for e in serr],
        "weak_h": whs,
        "weak_err": [abs(e.value) for e in werr],
        "weak_se": [e.stderr for e in werr],
    }
    return rows, series


def lognormal(
    paths: int = 20000,
    steps: int = 256,
    seed: int = 0,
    device: str = "cpu",
    schemes: Sequence[str] | None = None,
    strong_paths: int = 2000,
    weak_paths: int = 50000,
) -> ValidationResult:
    """Validation 1: moments (Theorems 15/17, Lemma 19) and the orders of every scheme."""
    start = time.perf_counter()
    rows, series = lognormal_moments(paths, steps, seed=seed, device=device)
    orders = {}
    for name in schemes or list(SCHEMES):
        r, s = strong_weak_orders(
            name, strong_paths=strong_paths, weak_paths=weak_paths, seed=seed, device=device
        )
        rows += r
        orders[name] = s
    series["orders"] = orders
    return ValidationResult("lognormal", rows, series, seconds=time.perf_counter() - start)
