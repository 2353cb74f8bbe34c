"""Slow, obviously-correct float64 references for the fast kernels (tests and ``lipverify verify``).

Every function here recomputes a quantity of MATH sections 1-5 the most direct way available,
by a route *independent* of the fast code it is compared with:

* sigma_1 and its derivatives from ``torch.linalg.matrix_norm(W, 2)`` (autograd, or central finite
  differences), or from second-order perturbation theory of the symmetric dilation
  ``[[0, W], [W^T, 0]]`` (a textbook formula that does not use Lemma 13's algebra);
* noise covariances as dense (d, d) matrices from the pairwise/sample-covariance definition, or by
  enumerating every ordered mini-batch of a finite population;
* Theorem 14/15 terms from dense J, H, Sigma_hat and dense cross-layer covariances.

All inputs are converted to float64; shapes follow MATH section 0 (``W``: (m, n), ``vec``
column-major, per-sample gradients (b, m, n)). Nothing here is meant to be fast.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

F64 = torch.float64


def vec(M: torch.Tensor) -> torch.Tensor:
    """Column-major vec: (..., m, n) -> (..., m*n); ``vec(u v^T) = v kron u``."""
    return M.transpose(-1, -2).reshape(*M.shape[:-2], -1)


def unvec(x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Inverse of :func:`vec`: (..., m*n) -> (..., m, n)."""
    return x.reshape(*x.shape[:-1], n, m).transpose(-1, -2)


def operator_norm(W: torch.Tensor) -> torch.Tensor:
    """sigma_1(W) = ||W||_2 via ``torch.linalg.matrix_norm(W, 2)`` in float64 (scalar)."""
    return torch.linalg.matrix_norm(W.to(F64), 2)


# --------------------------------------------------------------------------- Lemma 12 / 13


def jacobian_autograd(W: torch.Tensor) -> torch.Tensor:
    """d sigma_1 / dW by autograd through ``matrix_norm(W, 2)`` in float64, shape (m, n)."""
    W64 = W.detach().to(F64).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(operator_norm(W64), W64)
    return grad


def hessian_autograd(W: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of sigma_1 w.r.t. column-major vec(W) by double autograd, (m*n, m*n) float64.

    torch's SVD backward divides by ``s_i^2 - s_j^2`` for all pairs, so this reference is NaN when
    any two singular values coincide (even below sigma_1); use :func:`hessian_dilation` then."""
    m, n = W.shape
    return torch.autograd.functional.hessian(lambda w: operator_norm(unvec(w, m, n)), vec(W.detach().to(F64)))


def hessian_dilation(W: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of sigma_1 from second-order perturbation theory, (m*n, m*n) float64.

    sigma_1(W) is the top eigenvalue lambda_1 of the dilation ``D(W) = [[0, W], [W^T, 0]]`` with
    eigenvector ``z_1 = (u; v)/sqrt(2)``. Rayleigh-Schroedinger: for D + tB,
    ``lambda_1'' = 2 sum_{k != 1} (z_k^T B z_1)^2 / (lambda_1 - lambda_k)``. With ``z_k = (p_k; q_k)``
    and B = D(E): ``z_k^T B z_1 = <p_k q_1^T + p_1 q_k^T, E>``, so
    ``H = sum_{k != 1} 2/(lambda_1 - lambda_k) vec(G_k) vec(G_k)^T``, ``G_k = p_k q_1^T + p_1 q_k^T``.
    """
    m, n = W.shape
    W64 = W.detach().to(F64)
    D = torch.zeros(m + n, m + n, dtype=F64)
    D[:m, m:] = W64
    D[m:, :m] = W64.T
    lam, Z = torch.linalg.eigh(D)  # ascending
    lam, Z = lam.flip(0), Z.flip(1)
    p, q = Z[:m], Z[m:]
    G = torch.einsum("ik,j->kij", p[:, 1:], q[:, 0]) + torch.einsum("i,jk->kij", p[:, 0], q[:, 1:])
    g = vec(G)  # (m+n-1, d)
    weights = 2.0 / (lam[0] - lam[1:])
    return (g.T * weights) @ g


def hessian_quadratic_form_dense(W: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Same interface as :func:`lipverify.spectral.hessian_quadratic_form`: ``vec(E)^T H vec(E)``
    for E (..., m, n) with the dense dilation Hessian, float64."""
    return quadratic_form_dense(hessian_dilation(W), E)


def hessian_trace_dense(W: torch.Tensor) -> torch.Tensor:
    """Same interface as :func:`lipverify.spectral.hessian_trace`: trace of the dense dilation Hessian."""
    return torch.trace(hessian_dilation(W))


def hessian_eigenvalues_predicted(sigma: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Eigenvalues of H predicted by Lemma 13, sorted ascending, length m*n (float64).

    ``1/(s1 - s_k)`` and ``1/(s1 + s_k)`` for k = 2..r, ``1/s1`` with multiplicity m + n - 2r,
    and 0 for the rest (including the direction v kron u).
    """
    s = sigma.to(F64)
    r = s.numel()
    s1, sk = s[0], s[1:]
    nonzero = torch.cat([1 / (s1 - sk), 1 / (s1 + sk), torch.full((m + n - 2 * r,), 1.0, dtype=F64) / s1])
    zeros = torch.zeros(m * n - nonzero.numel(), dtype=F64)
    return torch.sort(torch.cat([nonzero, zeros])).values


def gradient_finite_difference(W: torch.Tensor, step: float) -> torch.Tensor:
    """Central differences ``(s1(W + h e_ij) - s1(W - h e_ij)) / (2h)`` for every entry, (m, n) float64."""
    W64 = W.detach().to(F64)
    m, n = W64.shape
    out = torch.empty(m, n, dtype=F64)
    for i in range(m):
        for j in range(n):
            E = torch.zeros(m, n, dtype=F64)
            E[i, j] = step
            out[i, j] = (operator_norm(W64 + E) - operator_norm(W64 - E)) / (2 * step)
    return out


def quadratic_form_finite_difference(W: torch.Tensor, E: torch.Tensor, step: float) -> torch.Tensor:
    """Central second difference ``(s1(W + hE) - 2 s1(W) + s1(W - hE)) / h^2`` for E (..., m, n)."""
    W64 = W.detach().to(F64)
    E64 = E.detach().to(F64)
    s0 = operator_norm(W64)
    plus = torch.linalg.matrix_norm(W64 + step * E64, 2)
    minus = torch.linalg.matrix_norm(W64 - step * E64, 2)
    return (plus - 2 * s0 + minus) / step**2


def quadratic_form_dense(H: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """``vec(E)^T H vec(E)`` with a dense H, for E (..., m, n)."""
    e = vec(E.to(F64))
    return torch.einsum("...i,ij,...j->...", e, H.to(F64), e)


def matrix_with_singular_values(
    singular_values: Sequence[float], m: int, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random (m, n) float64 matrix ``U diag(s) V^T`` with the given r = min(m, n) singular values
    (Haar-random orthogonal U, V from QR of Gaussian matrices): the gap is controlled exactly."""
    r = min(m, n)
    s = torch.as_tensor(list(singular_values), dtype=F64)
    if s.numel() != r:
        raise ValueError(f"need r = {r} singular values, got {s.numel()}")
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))
    return U[:, :r] @ torch.diag(s) @ V[:, :r].T


# --------------------------------------------------------------------------- Propositions 5-7


def flat_per_sample(G: torch.Tensor) -> torch.Tensor:
    """(b, m, n) -> (b, m*n) column-major; (b, d) unchanged; float64."""
    G64 = G.detach().to(F64)
    return vec(G64) if G64.ndim == 3 else G64


def noise_covariance_dense(G: torch.Tensor, population_size: int | None = None) -> torch.Tensor:
    """Proposition 5 by its definition: (sample covariance with 1/(b-1)) / b, times (1 - b/N).

    The sample covariance is built from all pairs, ``S = sum_{i,j} (g_i - g_j)(g_i - g_j)^T / (2 b (b-1))``,
    which never forms the batch mean. Returns (d, d) float64.
    """
    g = flat_per_sample(G)
    b = g.shape[0]
    diff = g[:, None, :] - g[None, :, :]  # (b, b, d)
    S = torch.einsum("ijk,ijl->kl", diff, diff) / (2 * b * (b - 1))
    factor = 1.0 if population_size is None else 1.0 - b / population_size
    return S / b * factor


def variance_covariance_split_dense(
    G: torch.Tensor, population_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same interface as :func:`lipverify.noise.variance_covariance_split`: diagonal and off-diagonal
    parts of the dense Sigma_hat."""
    Sigma = noise_covariance_dense(G, population_size)
    variance = torch.diagonal(Sigma).clone()
    return variance, Sigma - torch.diag(variance)


def noise_sqrt_dense(G: torch.Tensor, population_size: int | None = None) -> torch.Tensor:
    """Dense counterpart of ``lipverify.noise.noise_sqrt(G, N).matrix()``: eigh root of dense Sigma_hat."""
    return symmetric_sqrt_dense(noise_covariance_dense(G, population_size))


def covariance_of_batch_mean(population: torch.Tensor, b: int, replacement: bool) -> torch.Tensor:
    """Exact ``Cov[g_bar]`` over the uniform draw of an ordered mini-batch, by enumerating all of them.

    population: (N, d). With replacement all N^b tuples, without all N!/(N-b)! ordered tuples of
    distinct items. Returns (d, d) float64.
    """
    P = population.to(F64)
    N = P.shape[0]
    tuples = itertools.product(range(N), repeat=b) if replacement else itertools.permutations(range(N), b)
    idx = torch.tensor(list(tuples), dtype=torch.long)
    means = P[idx].mean(1)  # (T, d)
    centred = means - means.mean(0)
    return centred.T @ centred / means.shape[0]


def average_over_batches(population: torch.Tensor, b: int, replacement: bool, estimator) -> torch.Tensor:
    """Exact expectation of ``estimator(batch)`` ((b, d) -> tensor) over all ordered mini-batches."""
    P = population.to(F64)
    N = P.shape[0]
    tuples = itertools.product(range(N), repeat=b) if replacement else itertools.permutations(range(N), b)
    total = None
    count = 0
    for t in tuples:
        value = estimator(P[list(t)])
        total = value if total is None else total + value
        count += 1
    return total / count


def symmetric_sqrt_dense(S: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root of a symmetric PSD (d, d) matrix by ``eigh`` (negative rounding
    eigenvalues clamped to zero), float64."""
    S64 = S.to(F64)
    lam, Q = torch.linalg.eigh((S64 + S64.T) / 2)
    return (Q * lam.clamp_min(0).sqrt()) @ Q.T


# --------------------------------------------------------------------------- Theorems 14-17


def layer_terms_dense(
    W: torch.Tensor,
    per_sample_grads: torch.Tensor,
    lr: float,
    mean_grad: torch.Tensor | None = None,
    population_size: int | None = None,
) -> dict[str, float]:
    """Theorem 14 with dense objects: ``mu = -eta J^T vec(grad_L)``, ``phi = eta sqrt(J^T Sigma_hat J)``,
    ``psi = (eta^2/2) tr(H Sigma_hat)``; J from autograd, H from the dilation, Sigma_hat dense."""
    W64 = W.detach().to(F64)
    g = flat_per_sample(per_sample_grads)
    J = vec(jacobian_autograd(W64))
    H = hessian_dilation(W64)
    Sigma = noise_covariance_dense(g, population_size)
    grad = g.mean(0) if mean_grad is None else vec(mean_grad.to(F64))
    return {
        "sigma": float(operator_norm(W64)),
        "mu": float(-lr * J @ grad),
        "phi": float(lr * torch.sqrt(J @ Sigma @ J)),
        "psi": float(0.5 * lr**2 * torch.trace(H @ Sigma)),
    }


def network_terms_dense(
    weights: Sequence[torch.Tensor],
    per_sample_grads: Sequence[torch.Tensor],
    lr: float,
    mean_grads: Sequence[torch.Tensor] | None = None,
    population_size: int | None = None,
) -> dict[str, float]:
    """Theorem 15 on the concatenated parameter theta = (vec W_1, ..., vec W_L), fully dense.

    ``grad ln K = (J_l / sigma_l)_l``, ``Hess ln K = blockdiag(H_l / sigma_l - J_l J_l^T / sigma_l^2)``,
    ``Sigma_hat`` the (D, D) estimator on the concatenated per-sample gradients (all layers share the
    batch). Itô on ln K with block-diagonal noise (Assumption 3): drift
    ``-eta grad_lnK^T grad_L + (eta^2/2) tr(Hess_lnK Sigma_block)``; diffusion squared
    ``eta^2 grad_lnK^T Sigma_block grad_lnK``; the cross-layer part is
    ``eta^2 grad_lnK^T (Sigma_full - Sigma_block) grad_lnK``.
    """
    Ws = [W.detach().to(F64) for W in weights]
    gs = [flat_per_sample(G) for G in per_sample_grads]
    sizes = [g.shape[1] for g in gs]
    g_all = torch.cat(gs, 1)
    Sigma_full = noise_covariance_dense(g_all, population_size)
    Sigma_block = torch.zeros_like(Sigma_full)
    grad_lnK = torch.zeros(sum(sizes), dtype=F64)
    hess_lnK = torch.zeros_like(Sigma_full)
    grad_L = torch.zeros(sum(sizes), dtype=F64)
    start = 0
    for idx, (W, g, d) in enumerate(zip(Ws, gs, sizes, strict=True)):
        sl = slice(start, start + d)
        s = operator_norm(W)
        J = vec(jacobian_autograd(W))
        grad_lnK[sl] = J / s
        hess_lnK[sl, sl] = hessian_dilation(W) / s - torch.outer(J, J) / s**2
        Sigma_block[sl, sl] = Sigma_full[sl, sl]
        grad_L[sl] = g.mean(0) if mean_grads is None else vec(mean_grads[idx].to(F64))
        start += d
    phi_sq = lr**2 * grad_lnK @ Sigma_block @ grad_lnK
    return {
        "log_bound": float(sum(torch.log(operator_norm(W)) for W in Ws)),
        "log_drift": float(-lr * grad_lnK @ grad_L + 0.5 * lr**2 * torch.trace(hess_lnK @ Sigma_block)),
        "phi_sq": float(phi_sq),
        "phi_sq_cross": float(lr**2 * grad_lnK @ (Sigma_full - Sigma_block) @ grad_lnK),
    }


def predict_bound_loop(
    drifts: Sequence[float], phi_sqs: Sequence[float], bound0: float
) -> tuple[list[float], list[float]]:
    """Theorem 17 by an explicit loop with left-point sums (dt = 1 step):
    ``E[K_t] = K_0 exp(sum_{s<t} drift_s)``, ``Var[K_t] = E[K_t]^2 (exp(sum_{s<t} phi_sq_s) - 1)``,
    drift = mu + psi. Returns lists of length T + 1."""
    means, variances = [], []
    acc_drift = acc_phi = 0.0
    for t in range(len(drifts) + 1):
        if t > 0:
            acc_drift += drifts[t - 1]
            acc_phi += phi_sqs[t - 1]
        mean = bound0 * math.exp(acc_drift)
        means.append(mean)
        variances.append(mean * mean * math.expm1(acc_phi))
    return means, variances


def predict_bound_dense(network_series, bound0: float) -> tuple[list[float], list[float]]:
    """Same inputs as :func:`lipverify.dynamics.predict_bound` (a sequence of NetworkTerms and K_0):
    ``(means, variances)`` from :func:`predict_bound_loop`."""
    return predict_bound_loop(
        [t.mu + t.psi for t in network_series], [t.phi_sq for t in network_series], bound0
    )


def lognormal_moments_quadrature(log_mean: float, log_var: float, nodes: int = 80) -> tuple[float, float]:
    """``E[e^X]`` and ``Var[e^X]`` for X ~ N(log_mean, log_var) by Gauss-Hermite quadrature
    (independent of the closed forms of Lemma 19 / Theorem 17)."""
    import numpy as np

    x, w = np.polynomial.hermite.hermgauss(nodes)
    values = np.exp(log_mean + math.sqrt(2 * log_var) * x)
    first = float((w * values).sum() / math.sqrt(math.pi))
    second = float((w * values**2).sum() / math.sqrt(math.pi))
    return first, second - first**2
