"""Validation 2a: Theorem 14 on the matrix SGD-SDE of one least-squares layer, and the shared
machinery of the pathwise studies (nested grids on one Brownian path, Itô sums, mean and
pathwise-residual rows) used by :mod:`lipverify.simulation.two_layer_net`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from lipverify.montecarlo import Estimate, mean
from lipverify.problems import (
    LeastSquares,
    MatrixSGDSDE,
)
from lipverify.sde import brownian_increments, coarsen, integrate
from lipverify.simulation.results import Row, ValidationResult, _order_row, _progress, nested_step_bias


def default_problem(seed: int = 0) -> LeastSquares:
    """m = 3, n = 4, N = 20 least-squares data set (fixed seed)."""
    return LeastSquares.random(3, 4, 20, seed=seed, noise=1.0)


def well_gapped(m: int, n: int, sigmas: Sequence[float], seed: int = 0) -> torch.Tensor:
    """``U diag(sigmas) V^T`` with random orthonormal U, V (fixed seed): an initial weight with a
    comfortable spectral gap (Assumption 11), float64 (m, n)."""
    g = torch.Generator().manual_seed(seed + 1000)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    return U[:, :r] @ torch.diag(torch.tensor(list(sigmas)[:r], dtype=torch.float64)) @ V[:, :r].T


class _ItoSums:
    """Observer accumulating, per path, ``sum (drift terms) h`` and the martingale
    ``sum proj . dB`` at the left point of each step (Itô)."""

    def __init__(self, terms: Callable, h: float, parts: Callable):
        self.terms, self.h, self.parts = terms, h, parts
        self.sums: dict[str, torch.Tensor] = {}
        self.min_rel_gap = math.inf

    def __call__(self, k: int, t: float, x: torch.Tensor, dB: torch.Tensor) -> None:
        q = self.terms(x)
        for key, (rate, noise) in self.parts(q).items():
            inc = rate * self.h if noise is None else (noise * dB).sum(-1)
            self.sums[key] = self.sums.get(key, 0.0) + inc
        gaps = [q] if hasattr(q, "gap") else list(q.layers)
        for lq in gaps:
            self.min_rel_gap = min(self.min_rel_gap, float((lq.gap / lq.sigma).min()))


def _pathwise_study(
    sde,
    x0: torch.Tensor,
    T: float,
    levels: Sequence[int],
    paths: int,
    seed: int,
    observe: Callable,
    finals: Callable,
    parts: Callable,
    device: str,
    quiet: bool = True,
) -> list[dict]:
    """Run ``sde`` on nested grids sharing one Brownian path; per level return the Itô sums and
    the end-point quantities (dicts of (P,) tensors)."""
    fine = max(levels)
    dB = brownian_increments(fine, paths, sde.noise_dim, T / fine, seed=seed, device=device)
    out = []
    bar = _progress(len(levels), quiet, "levels")
    for steps in levels:
        h = T / steps
        acc = _ItoSums(observe, h, parts)
        sol = integrate(sde, x0, h, dB=coarsen(dB, fine // steps), observer=acc, device=device)
        sol.require_finite()
        out.append({"h": h, "sums": acc.sums, "final": finals(sol.final), "min_rel_gap": acc.min_rel_gap})
        bar.update(1)
    bar.close()
    return out


def _mean_rows(
    label: str,
    levels: list[dict],
    start_value: torch.Tensor,
    drift_key: str,
    mart_key: str,
    wrong: dict[str, str],
):
    """Mean check at the finest level: ``E[X_T] - X_0 = E[sum drift h]``.

    Estimator of the difference: ``D = X_T - X_0 - sum drift h - M`` with the control variate
    ``M = sum proj . dB`` (an Itô sum with left-point integrand, so ``E[M] = 0`` exactly); its
    standard error is that of D. Bias allowance for a bias ``c h + O(h^2)``: with
    ``d1 = mean D(h) - mean D(2h)`` (= -c h + O(h^2)) and ``d2 = mean D(2h) - mean D(4h)``,
    ``|d1| + |d1 - d2 / 2|`` (the second term measures the O(h^2) part). The same comparison is
    made for each wrong drift (key -> note).
    """
    fin = levels[-1]
    end = fin["final"] - start_value
    mart = fin["sums"][mart_key]
    D = end - fin["sums"][drift_key] - mart
    Dm = [
        float((lv["final"] - start_value - lv["sums"][drift_key] - lv["sums"][mart_key]).mean())
        for lv in levels
    ]
    bias = nested_step_bias(Dm[-1], Dm[-2], Dm[-3] if len(Dm) > 2 else Dm[-2])
    dEst = mean(D.cpu(), "D")
    est = float((end - mart).mean())
    pred = float(fin["sums"][drift_key].mean())
    rows = [Row(label, pred, est, dEst.stderr, bias, note=f"h = {fin['h']:g}")]
    for key, note in wrong.items():
        Dw = mean((end - mart - fin["sums"][key]).cpu(), "D wrong")
        rows.append(Row(label, float(fin["sums"][key].mean()), est, Dw.stderr, bias, True, note=note))
    return rows


def _pathwise_rows(
    label: str,
    levels: list[dict],
    start_value: torch.Tensor,
    drift_key: str,
    mart_key: str,
    wrong: dict[str, str],
):
    """Pathwise Itô residual ``R_h = X_T - X_0 - sum drift h - sum proj dB`` on nested grids.

    Itô–Taylor: per step the remainder is ``q_H(dW)/2 - psi h + O(h^{3/2})``, a martingale
    difference of size O(h), so ``E[R_h^2] = k h + O(h^2)`` -> 0 (RMS rate 1/2). An omitted drift
    term Psi leaves ``E[R_h^2] -> E[Psi^2] > 0``. Rows:

    * ``E[R^2] at h -> 0``: Richardson extrapolation ``I = 2 ms(h) - ms(2h)`` of the two finest
      levels, predicted 0; stderr bound ``2 se(h) + se(2h)`` (correlation-free); bias allowance =
      ``|I(h) - I(2h)|`` (the O(h^2) curvature, measured from the next pair). Wrong drifts give
      ``I ~ E[Psi^2]`` and must be rejected.
    * rate: the fitted RMS slope, one-sided (>= 1/2 minus its allowance); for a wrong drift it
      is reported as a diagnostic.
    """
    rows, series = [], {}
    for key, note in [(drift_key, None), *wrong.items()]:
        hs, ms, errs = [], [], []
        for lv in levels:
            R = lv["final"] - start_value - lv["sums"][key] - lv["sums"][mart_key]
            m2 = mean((R * R).cpu(), "R^2")
            rms = math.sqrt(m2.value)
            hs.append(lv["h"])
            ms.append(m2)
            errs.append(Estimate(rms, m2.stderr / (2 * rms), m2.n))
        I1 = 2 * ms[-1].value - ms[-2].value
        I2 = 2 * ms[-2].value - ms[-3].value
        se = 2 * ms[-1].stderr + ms[-2].stderr
        rows.append(
            Row(f"{label} E[R^2] at h->0", 0.0, I1, se, abs(I1 - I2), wrong=note is not None, note=note or "")
        )
        r = _order_row(f"{label} RMS rate", hs, errs, 0.5, None)[0]
        r.one_sided = True
        if note is not None:
            r.diagnostic, r.note = True, note
        rows.append(r)
        series[note or "correct"] = {"h": hs, "rms": [e.value for e in errs], "se": [e.stderr for e in errs]}
    return rows, series


def matrix_sde(
    paths: int = 2000,
    levels: Sequence[int] = (10, 20, 40, 80),
    T: float = 10.0,
    lr: float = 0.1,
    batch_size: int = 2,
    seed: int = 0,
    device: str = "cpu",
    quiet: bool = True,
) -> ValidationResult:
    """Validation 2a, Theorem 14 on the matrix SGD-SDE of a least-squares layer (m=3, n=4, N=20).

    Along every path: ``sum (mu + psi) h`` and ``sum J^T eta Sigma^{1/2} dB`` (left point, Itô),
    mu, psi = (eta^2/2) tr(H Sigma) with the exact population Sigma = C/b (problems.layer_quantities).
    Mean: ``E[sigma_T] - sigma_0 = E[sum (mu + psi) h]`` within z se + Richardson O(h) bias.
    Pathwise: RMS of ``sigma_T - sigma_0 - sum (mu+psi) h - sum J^T D dB`` -> 0 at rate 1/2.
    Wrong variant: no psi term (drift mu only).
    """
    start = time.perf_counter()
    pb = default_problem(seed)
    W0 = well_gapped(3, 4, (1.5, 0.8, 0.3), seed)
    sde = MatrixSGDSDE(pb.to(device), lr, batch_size)
    s0 = torch.linalg.svdvals(W0)[0].to(device)

    def parts(q):
        return {
            "mu+psi": (q.mu + q.psi, None),
            "mu": (q.mu, None),
            "psi": (q.psi, None),
            "mart": (None, q.proj),
        }

    lv = _pathwise_study(
        sde,
        W0.reshape(-1),
        T,
        levels,
        paths,
        seed,
        sde.terms,
        lambda xf: torch.linalg.svdvals(sde.matrix(xf))[:, 0],
        parts,
        device,
        quiet,
    )
    rows = _mean_rows("Thm 14 E[sigma_T] - sigma_0", lv, s0, "mu+psi", "mart", {"mu": "no psi term"})
    prow, pser = _pathwise_rows("Thm 14 pathwise", lv, s0, "mu+psi", "mart", {"mu": "no psi term"})
    rows += prow
    fin = lv[-1]
    info = {
        "min_relative_gap": min(level["min_rel_gap"] for level in lv),
        "mean_int_psi": float(fin["sums"]["psi"].mean()),
        "mean_int_mu": float(fin["sums"]["mu"].mean()),
        "std_sigma_T": float(fin["final"].std()),
    }
    return ValidationResult("matrix_sde", rows, {"pathwise": pser}, info, time.perf_counter() - start)
