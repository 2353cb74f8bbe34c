"""Validation 3: real mini-batch SGD against the SGD-SDE at fixed eta T (gap O(eta))."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from lipverify._validation import LipverifyError
from lipverify.montecarlo import mean, std
from lipverify.problems import (
    LeastSquares,
    MatrixSGDSDE,
    TwoLayerSGDSDE,
)
from lipverify.sde import integrate, make_generator
from lipverify.simulation.matrix_layer import default_problem, well_gapped
from lipverify.simulation.results import Row, ValidationResult, Z, _progress


def sgd_runs(
    problem: LeastSquares,
    W0: torch.Tensor,
    lr: float,
    batch_size: int,
    steps: int,
    seeds: int,
    seed: int = 0,
    device: str = "cpu",
) -> torch.Tensor:
    """Mini-batch SGD with replacement, ``W <- W - lr (1/b) sum_{i in B} G_i``, for ``seeds``
    independent sampling seeds at once (same W0). Returns the final weights (seeds, m, n)."""
    gen = make_generator(seed, device)
    X, Y = problem.X.to(device), problem.Y.to(device)
    W = W0.to(device).expand(seeds, -1, -1).clone()
    N = X.shape[0]
    for _ in range(steps):
        idx = torch.randint(N, (seeds, batch_size), generator=gen, device=device)
        Xb, Yb = X[idx], Y[idx]
        r = torch.einsum("smn,sbn->sbm", W, Xb) - Yb
        W = W - lr * torch.einsum("sbm,sbn->smn", r, Xb) / batch_size
        if not bool(torch.isfinite(W).all()):
            raise LipverifyError(f"SGD diverged (non-finite weights) with lr = {lr}")
    return W


def sgd_runs_two_layer(
    problem: LeastSquares,
    W1: torch.Tensor,
    W2: torch.Tensor,
    lr: float,
    batch_size: int,
    steps: int,
    seeds: int,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch SGD with replacement on ``|W2 W1 x - y|^2 / 2`` for ``seeds`` sampling seeds.
    Returns the final (W1, W2), shapes (seeds, h, n) and (seeds, m, h)."""
    gen = make_generator(seed, device)
    X, Y = problem.X.to(device), problem.Y.to(device)
    A = W1.to(device).expand(seeds, -1, -1).clone()
    B = W2.to(device).expand(seeds, -1, -1).clone()
    N = X.shape[0]
    for _ in range(steps):
        idx = torch.randint(N, (seeds, batch_size), generator=gen, device=device)
        Xb, Yb = X[idx], Y[idx]
        hid = torch.einsum("shn,sbn->sbh", A, Xb)
        r = torch.einsum("smh,sbh->sbm", B, hid) - Yb
        back = torch.einsum("smh,sbm->sbh", B, r)
        gA = torch.einsum("sbh,sbn->shn", back, Xb) / batch_size
        gB = torch.einsum("sbm,sbh->smh", r, hid) / batch_size
        A, B = A - lr * gA, B - lr * gB
        if not bool(torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise LipverifyError(f"two-layer SGD diverged (non-finite weights) with lr = {lr}")
    return A, B


def _sigma1(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W)[:, 0]


def _gap_rows(name: str, data: list[dict], lrs: list[float]) -> tuple[list[Row], dict]:
    """Rows of the SGD-vs-SDE gaps (see :func:`discrete_sgd`) for one statistic ``name``."""
    rows, series = [], {}
    for stat in ("mean", "std"):
        gaps = [d["sgd_" + stat] - d["sde_" + stat] for d in data]
        wrong = data[-1]["sgd_" + stat] - data[-1]["wrong_" + stat]
        norm = [d["sde_" + stat].value if stat == "std" else 1.0 for d in data]
        C = (abs(gaps[0].value) + Z * gaps[0].stderr) / norm[0] / lrs[0]
        series[stat] = {
            "sgd": [d["sgd_" + stat].value for d in data],
            "sde": [d["sde_" + stat].value for d in data],
            "gap": [g.value / nm for g, nm in zip(gaps, norm, strict=True)],
            "gap_se": [g.stderr / nm for g, nm in zip(gaps, norm, strict=True)],
            "wrong_gap": wrong.value / norm[-1],
            "band": [C * lr for lr in lrs],
        }
        label = f"relative gap std {name}" if stat == "std" else f"gap E[{name}]"
        for i, lr in enumerate(lrs):
            g, nm = gaps[i], norm[i]
            rows.append(
                Row(
                    f"{label} eta={lr:g}",
                    0.0,
                    g.value / nm,
                    g.stderr / nm,
                    C * lr,
                    diagnostic=(i == 0),
                    note="calibrates C" if i == 0 else "",
                )
            )
        # The biased noise changes the std at leading order (sqrt(b)) but the mean only at O(eta),
        # like the discretisation itself: the mean row of the wrong variant is a diagnostic.
        nm = norm[-1]
        rows.append(
            Row(
                f"{label} eta={lrs[-1]:g}",
                0.0,
                wrong.value / nm,
                wrong.stderr / nm,
                C * lrs[-1],
                True,
                diagnostic=stat == "mean",
                note="biased noise C/b^2",
            )
        )
    return rows, series


def discrete_sgd(
    lrs: Sequence[float] = (0.2, 0.1, 0.05),
    tau: float = 2.0,
    batch_size: int = 2,
    seeds: int = 20000,
    paths: int = 4000,
    sde_dt: float = 0.25,
    seed: int = 0,
    device: str = "cpu",
    quiet: bool = True,
    network: bool = True,
    network_batch_size: int = 8,
) -> ValidationResult:
    """Validation 3: real mini-batch SGD against the SGD-SDE at fixed eta T = tau.

    sigma_1(W_T) of the least-squares layer after T = tau / eta real SGD steps (``seeds`` sampling
    seeds at once, with replacement, batch b, same W0) against the SGD-SDE (Euler–Maruyama, dt =
    ``sde_dt`` steps, ``paths`` paths, exact Sigma = C/b). With ``network``, the same for
    ``K_T = sigma(W1_T) sigma(W2_T)`` of the two-layer linear net (batch ``network_batch_size``;
    smaller batches make some Euler paths of that SDE blow up).

    Measured: the gaps of the mean and of the std (relative to the SDE std) per eta, with their MC
    errors. The continuous–discrete error is expected O(eta) at fixed eta T (SGD is a weak
    order-1 approximation of this SDE in the time tau = eta t; Li, Tai & E 2017). Pass rule: with
    the O(eta) band ``C eta``, ``C = (|gap(eta_max)| + z se(eta_max)) / eta_max`` calibrated at the
    largest eta (that row is a diagnostic), every smaller eta's gap lies within ``C eta + z se``.
    Wrong variant: the SDE with the biased noise ``Sigma = C / b^2`` (its std gap must be rejected).
    """
    start = time.perf_counter()
    pb = default_problem(seed)
    W0 = well_gapped(3, 4, (1.5, 0.8, 0.3), seed)
    W1 = well_gapped(3, 4, (0.7, 0.35, 0.15), seed)
    W2 = well_gapped(3, 3, (0.6, 0.3, 0.1), seed + 1)
    lrs = sorted(lrs, reverse=True)
    layer, net = [], []
    bar = _progress(len(lrs), quiet, "learning rates")
    for lr in lrs:
        steps = round(tau / lr)
        n_steps = round(steps / sde_dt)
        if not math.isclose(n_steps * sde_dt, steps, rel_tol=1e-9):
            # the SDE would cover another time span than the SGD steps it is compared with
            raise LipverifyError(f"sde_dt = {sde_dt} does not divide the {steps} SGD steps of lr = {lr}")
        s_sgd = _sigma1(sgd_runs(pb, W0, lr, batch_size, steps, seeds, seed, device)).cpu()
        res = {"lr": lr, "steps": steps, "sgd_mean": mean(s_sgd), "sgd_std": std(s_sgd)}
        variants = [("sde", None)] + ([("wrong", 1.0 / (pb.size * batch_size**2))] if lr == lrs[-1] else [])
        for tag, scale in variants:
            sde = MatrixSGDSDE(pb.to(device), lr, batch_size, noise_scale=scale)
            sol = integrate(
                sde, W0.reshape(-1), sde_dt, steps=n_steps, paths=paths, seed=seed + 7, device=device
            )
            s = _sigma1(sde.matrix(sol.require_finite().final)).cpu()
            res[tag + "_mean"], res[tag + "_std"] = mean(s), std(s)
        layer.append(res)
        if network:
            b2 = network_batch_size
            A, B = sgd_runs_two_layer(pb, W1, W2, lr, b2, steps, seeds, seed, device)
            K_sgd = (_sigma1(A) * _sigma1(B)).cpu()
            res = {"lr": lr, "steps": steps, "sgd_mean": mean(K_sgd), "sgd_std": std(K_sgd)}
            variants = [("sde", None)] + ([("wrong", 1.0 / (pb.size * b2**2))] if lr == lrs[-1] else [])
            for tag, scale in variants:
                sde = TwoLayerSGDSDE(pb.to(device), 3, lr, b2, noise_scale=scale)
                x0 = sde.join(W1.unsqueeze(0), W2.unsqueeze(0))[0]
                sol = integrate(sde, x0, sde_dt, steps=n_steps, paths=paths, seed=seed + 8, device=device)
                a, b = sde.split(sol.require_finite().final)
                K = (_sigma1(a) * _sigma1(b)).cpu()
                res[tag + "_mean"], res[tag + "_std"] = mean(K), std(K)
            net.append(res)
        bar.update(1)
    bar.close()
    rows, series = _gap_rows("sigma_T", layer, lrs)
    series = {"lr": lrs, **series}
    if network:
        nrows, nseries = _gap_rows("K_T", net, lrs)
        rows += nrows
        series["network"] = nseries
    info = {
        f"{tag} eta={d['lr']:g}": {
            "steps": d["steps"],
            "sgd_mean": d["sgd_mean"].value,
            "sde_mean": d["sde_mean"].value,
            "sgd_std": d["sgd_std"].value,
            "sde_std": d["sde_std"].value,
        }
        for tag, dd in (("sigma_T", layer), ("K_T", net))
        for d in dd
    }
    return ValidationResult("discrete_sgd", rows, series, info, time.perf_counter() - start)
