"""Numeric cross-checks of MATH section 8 (kind ``numeric``), one or more per result.

Every check runs the fast kernel *and* a deliberately wrong variant through the same comparison
against a slow float64 reference from :mod:`lipverify._reference`; it passes only if the kernel is
within tolerance and the wrong variant is not. Tolerances are derived, never tuned:

Finite differences of sigma_1 (Lemmas 12, 13)
---------------------------------------------
Let ``f(t) = sigma_1(W + t E)``, ``s = ||E||_2``, ``delta = sigma_1 - sigma_2`` (``sigma_2 := 0`` for
r = 1). sigma_1 is the top eigenvalue of the dilation ``[[0, W], [W^T, 0]]``, whose distance to the
rest of the dilation spectrum (``sigma_k``, ``-sigma_k``, 0) is exactly delta. For complex
``|t| < R = delta / (2 s)`` the eigenvalue stays isolated and analytic (Kato), and
``|f(t) - sigma_1| <= |t| s`` (Bauer-Fike, the dilation is normal). Cauchy's estimate on a circle
of radius R/2 around any ``|t0| <= R/4`` gives

    ``sup |f^(k)| <= k! (3 delta / 8) (4 s / delta)^k``,  so ``|f'''| <= 144 s^3 / delta^2``,
    ``|f''''| <= 2304 s^4 / delta^3``  (for step h <= R/4 = delta / (8 s)).

Truncation: central first difference ``h^2/6 |f'''| <= 24 h^2 s^3 / delta^2``; central second
difference ``h^2/12 |f''''| <= 192 h^2 s^4 / delta^3``.
Rounding: a backward-stable SVD returns sigma_1 of ``W + dW`` with ``||dW|| <= p(m, n) eps ||W||``
(Weyl: same bound on the value); we take ``p(m, n) = m + n`` (LAPACK's "modestly growing
function"), so each evaluation carries ``eps_sigma = (m + n) eps sigma_1``. The first difference
adds ``eps_sigma / h``, the second ``4 eps_sigma / h^2``. The kernel itself is exact for a
perturbed ``W + dW``; by the same Cauchy bound (Banach: on a Hilbert space, here matrices with
the Frobenius norm, a symmetric multilinear form has the norm of its diagonal), the Jacobian
moves by ``<= sup|f''| eps_sigma = 12 eps_sigma / delta`` and the quadratic form by
``<= sup|f'''| eps_sigma ||E||_F^2 = 144 eps_sigma ||E||_F^2 / delta^2``. The step minimises
truncation + rounding: ``h1 = (eps_sigma delta^2 / (48 s^3))^(1/3)``,
``h2 = (eps_sigma delta^3 / (48 s^4))^(1/4)``, capped at delta / (8 s). Errors therefore grow like
``eps^(2/3) / delta^(2/3)`` (gradient) and ``sqrt(eps / delta^3)`` (Hessian form) as the gap closes.

Dense / exact comparisons
-------------------------
Two computations of H, each exact for data perturbed by eps_sigma, differ in 2-norm by
``<= 2 * 144 eps_sigma / delta^2`` (both sides as above); eigenvalues by the same (Weyl), and
traces by d times it. Sums of T terms with the estimator of
Proposition 5 are exact up to ``c (T + b + d) eps`` relative to the largest term (standard
summation bound, c = 4 for the products and the two sides compared).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.stats import norm

from lipverify import _reference as ref
from lipverify.dynamics import (
    LayerTerms,
    NetworkTerms,
    layer_terms,
    network_terms,
    predict_bound,
    rescale_batch_size,
)
from lipverify.noise import batch_noise_covariance, noise_sqrt, variance_covariance_split
from lipverify.spectral import (
    decompose,
    hessian,
    hessian_quadratic_form,
    hessian_trace,
    jacobian,
    quadratic_form_from_projections,
)
from lipverify.verification import Comparison, register

F64 = torch.float64
EPS64 = torch.finfo(F64).eps

#: Shapes every spectral check covers: m < n, m > n, m = n, 1 x n, m x 1.
SPECTRAL_SHAPES = ((4, 7), (7, 4), (5, 5), (1, 6), (6, 1))
#: Leading singular value and gap of the test matrices (gap controlled exactly).
SIGMA1 = 3.0
GAP = 0.05


# --------------------------------------------------------------------------- tolerance model


def sigma_evaluation_error(m: int, n: int, sigma1: float, eps: float = EPS64) -> float:
    """``eps_sigma = (m + n) eps sigma_1``: error of one computed sigma_1 (backward-stable SVD + Weyl)."""
    return (m + n) * eps * sigma1


def derivative_bound(order: int, direction_norm: float, gap: float) -> float:
    """``sup_{|t| <= gap/(8 s)} |d^k/dt^k sigma_1(W + tE)| <= k! (3 gap/8) (4 s/gap)^k`` (Cauchy)."""
    return math.factorial(order) * 0.375 * gap * (4 * direction_norm / gap) ** order


def gradient_step_and_tolerance(m: int, n: int, sigma1: float, gap: float) -> tuple[float, float]:
    """Step h and error bound for central differences of sigma_1 along unit entries e_ij (s = 1).

    ``|fd - J_ij| <= (h^2/6) sup|f'''| + eps_sigma/h + sup|f''| eps_sigma`` (module docstring).
    """
    e_sigma = sigma_evaluation_error(m, n, sigma1)
    s = 1.0
    h = min((e_sigma * gap**2 / (48 * s**3)) ** (1 / 3), gap / (8 * s))
    tol = h**2 / 6 * derivative_bound(3, s, gap) + e_sigma / h + derivative_bound(2, 1.0, gap) * e_sigma
    return h, tol


def hessian_step_and_tolerance(
    m: int, n: int, sigma1: float, gap: float, direction_norm: float, frobenius_norm: float
) -> tuple[float, float]:
    """Step h and error bound for the central second difference of sigma_1 along E.

    ``|fd - q_H(E)| <= (h^2/12) sup|f''''| + 4 eps_sigma/h^2 + sup|f'''| eps_sigma ||E||_F^2``.
    """
    e_sigma = sigma_evaluation_error(m, n, sigma1)
    s = direction_norm
    h = min((e_sigma * gap**3 / (48 * s**4)) ** 0.25, gap / (8 * s))
    tol = (
        h**2 / 12 * derivative_bound(4, s, gap)
        + 4 * e_sigma / h**2
        + derivative_bound(3, 1.0, gap) * e_sigma * frobenius_norm**2
    )
    return h, tol


def dense_hessian_tolerance(m: int, n: int, sigma1: float, gap: float, eps: float = EPS64) -> float:
    """2-norm/eigenvalue bound between two Hessians from perturbed data: ``2 sup|f'''| eps_sigma``."""
    return 2 * derivative_bound(3, 1.0, gap) * sigma_evaluation_error(m, n, sigma1, eps)


# --------------------------------------------------------------------------- test data


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spectrum(m: int, n: int, sigma1: float = SIGMA1, gap: float = GAP) -> list[float]:
    """r = min(m, n) singular values: sigma_1, sigma_1 - gap, then evenly down to (sigma_1 - gap)/4."""
    r = min(m, n)
    if r == 1:
        return [sigma1]
    rest = np.linspace(sigma1 - gap, (sigma1 - gap) / 4, r - 1)
    return [sigma1, *rest.tolist()]


def controlled_matrix(m: int, n: int, seed: int, sigma1: float = SIGMA1, gap: float = GAP) -> torch.Tensor:
    """(m, n) float64 matrix with singular values :func:`spectrum` (exact gap)."""
    return ref.matrix_with_singular_values(spectrum(m, n, sigma1, gap), m, n, _generator(seed))


def unit_directions(m: int, n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` Gaussian directions (count, m, n) normalised to ||E||_F = 1 (so ||E||_2 <= 1)."""
    E = torch.randn(count, m, n, dtype=F64, generator=_generator(seed))
    return E / torch.linalg.matrix_norm(E)[:, None, None]


def _gap_of(m: int, n: int, gap: float, sigma1: float = SIGMA1) -> float:
    return sigma1 if min(m, n) == 1 else gap


# --------------------------------------------------------------------------- wrong variants


def jacobian_wrong_left_vector(W: torch.Tensor) -> torch.Tensor:
    """WRONG Lemma 12: ``u_2 v_1^T`` (second left singular vector); for r = 1 the full-SVD u_2."""
    U, _, Vh = torch.linalg.svd(W.to(F64), full_matrices=True)
    if U.shape[1] < 2:
        return torch.zeros_like(W, dtype=F64)
    return torch.outer(U[:, 1], Vh[0])


def quadratic_form_without_cross_term(W: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """WRONG Lemma 13: the ``2 s_k a_k c_k`` cross term dropped."""
    dec = decompose(W)
    y = torch.einsum("...ij,i->...j", E, dec.u)
    x = torch.einsum("...ij,j->...i", E, dec.v)
    full = quadratic_form_from_projections(dec, y, x)
    a, c = y @ dec.V, x @ dec.U
    s1, sk = dec.sigma[0], dec.sigma[1:]
    cross = (2 * sk * a[..., 1:] * c[..., 1:] / ((s1 - sk) * (s1 + sk))).sum(-1)
    return full - cross


def quadratic_form_resolvent_undeflated(W: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """WRONG resolvent form: projections y = E^T u, x = E v used without removing their v / u parts."""
    dec = decompose(W)
    W64 = W.to(F64)
    m, n = W64.shape
    u, v, s1 = dec.u, dec.v, dec.sigma1
    y = torch.einsum("...ij,i->...j", E, u)
    x = torch.einsum("...ij,j->...i", E, v)
    A_V = s1**2 * torch.eye(n, dtype=F64) - W64.T @ W64 + s1**2 * torch.outer(v, v)
    A_U = s1**2 * torch.eye(m, dtype=F64) - W64 @ W64.T + s1**2 * torch.outer(u, u)
    Ry = torch.linalg.solve(A_V, y.T).T
    Rx = torch.linalg.solve(A_U, x.T).T
    return s1 * ((y * Ry).sum(-1) + (x * Rx).sum(-1)) + 2 * (Ry * (x @ W64)).sum(-1)


def hessian_without_null_space(W: torch.Tensor) -> torch.Tensor:
    """WRONG Lemma 13 as a matrix: the ``(1/s1)(sum_{k>r} x_k x_k^T + sum_{j>r} y_j y_j^T)`` term dropped."""
    m, n = W.shape
    U, S, Vh = torch.linalg.svd(W.to(F64), full_matrices=True)
    V = Vh.T
    H = hessian(W.to(F64))
    r = S.numel()
    for k in range(r, n):
        xk = ref.vec(torch.outer(U[:, 0], V[:, k]))
        H = H - torch.outer(xk, xk) / S[0]
    for j in range(r, m):
        yj = ref.vec(torch.outer(U[:, j], V[:, 0]))
        H = H - torch.outer(yj, yj) / S[0]
    return H


def hessian_without_cross_term(W: torch.Tensor) -> torch.Tensor:
    """WRONG Lemma 13 as a matrix: ``s_k (x_k y_k^T + y_k x_k^T)`` dropped (eigenvalues then
    ``s1/(s1^2 - s_k^2)`` twice instead of ``1/(s1 - s_k)``, ``1/(s1 + s_k)``)."""
    U, S, Vh = torch.linalg.svd(W.to(F64), full_matrices=True)
    V = Vh.T
    H = hessian(W.to(F64))
    for k in range(1, S.numel()):
        xk = ref.vec(torch.outer(U[:, 0], V[:, k]))
        yk = ref.vec(torch.outer(U[:, k], V[:, 0]))
        sym = torch.outer(xk, yk) + torch.outer(yk, xk)
        H = H - S[k] * sym / ((S[0] - S[k]) * (S[0] + S[k]))
    return H


def hessian_trace_half(W: torch.Tensor) -> torch.Tensor:
    """WRONG tr H: ``sum_k s1/(s1^2 - s_k^2)`` (only one of x_k, y_k counted) + (m + n - 2r)/s1."""
    S = torch.linalg.svdvals(W.to(F64))
    m, n = W.shape
    s1, sk = S[0], S[1:]
    return (s1 / ((s1 - sk) * (s1 + sk))).sum() + (m + n - 2 * S.numel()) / s1


# --------------------------------------------------------------------------- Lemma 12


@register(
    "Lemma 12",
    "numeric",
    "d sigma_1 / d vec(W) = v kron u, i.e. d sigma_1 = u^T dW v",
    name="jacobian vs central finite differences (5 shapes, gap 0.05)",
)
def check_jacobian_finite_differences() -> Comparison:
    """Every entry of ``jacobian(W)`` against central differences of ``matrix_norm(W, 2)`` along e_ij
    (float64, step h1). Tolerance ``24 h^2/delta^2 + eps_sigma/h + 12 eps_sigma/delta`` (truncation,
    rounding of the two evaluations, kernel rounding), largest over the shapes."""
    err = wrong = 0.0
    tol = 0.0
    for idx, (m, n) in enumerate(SPECTRAL_SHAPES):
        W = controlled_matrix(m, n, seed=100 + idx)
        h, case_tol = gradient_step_and_tolerance(m, n, SIGMA1, _gap_of(m, n, GAP))
        fd = ref.gradient_finite_difference(W, h)
        err = max(err, float((jacobian(W) - fd).abs().max()))
        wrong = max(wrong, float((jacobian_wrong_left_vector(W) - fd).abs().max()))
        tol = max(tol, case_tol)
    return Comparison(err, tol, "u_2 v^T (second left singular vector)", wrong, f"shapes {SPECTRAL_SHAPES}")


# --------------------------------------------------------------------------- Lemma 13


def _quadratic_form_vs_fd(method: str, wrong_fn, directions: int = 6) -> tuple[float, float, float]:
    err = wrong = tol = 0.0
    for idx, (m, n) in enumerate(SPECTRAL_SHAPES):
        W = controlled_matrix(m, n, seed=200 + idx)
        E = unit_directions(m, n, directions, seed=300 + idx)
        s = float(torch.linalg.matrix_norm(E, 2).max())
        h, case_tol = hessian_step_and_tolerance(m, n, SIGMA1, _gap_of(m, n, GAP), s, 1.0)
        fd = ref.quadratic_form_finite_difference(W, E, h)
        err = max(err, float((hessian_quadratic_form(W, E, method=method) - fd).abs().max()))
        wrong = max(wrong, float((wrong_fn(W, E) - fd).abs().max()))
        tol = max(tol, case_tol)
    return err, tol, wrong


@register(
    "Lemma 13",
    "numeric",
    "vec(E)^T H vec(E) = sum_k [s1 (a_k^2 + c_k^2) + 2 s_k a_k c_k]/(s1^2 - s_k^2) + null-space terms / s1",
    name="quadratic form (svd) vs central second differences",
)
def check_quadratic_form_svd() -> Comparison:
    """``hessian_quadratic_form(method='svd')`` on 6 unit directions per shape against central
    second differences of ``matrix_norm`` (step h2). Tolerance
    ``192 h^2 s^4/delta^3 + 4 eps_sigma/h^2 + 144 eps_sigma ||E||_F^2/delta^2``."""
    err, tol, wrong = _quadratic_form_vs_fd("svd", quadratic_form_without_cross_term)
    return Comparison(
        err, tol, "cross term 2 s_k a_k c_k dropped", wrong, f"shapes {SPECTRAL_SHAPES}, 6 dirs each"
    )


@register(
    "Lemma 13",
    "numeric",
    "vec(E)^T H vec(E) = s1 (y_perp^T R_V y_perp + x_perp^T R_U x_perp) + 2 y_perp^T R_V W^T x_perp",
    name="quadratic form (resolvent) vs central second differences",
)
def check_quadratic_form_resolvent() -> Comparison:
    """``hessian_quadratic_form(method='resolvent')`` against central second differences, same
    directions, step and tolerance as the svd check."""
    err, tol, wrong = _quadratic_form_vs_fd("resolvent", quadratic_form_resolvent_undeflated)
    return Comparison(err, tol, "projections not deflated (y, x for y_perp, x_perp)", wrong)


@register(
    "Lemma 13",
    "numeric",
    "H = sum_k [s1 (x_k x_k^T + y_k y_k^T) + s_k (x_k y_k^T + y_k x_k^T)]/(s1^2 - s_k^2)"
    " + (1/s1)(null-space)",
    name="dense hessian vs autograd Hessian of matrix_norm(W, 2)",
)
def check_dense_hessian() -> Comparison:
    """Entries of ``hessian(W)`` against double autograd through ``torch.linalg.matrix_norm``;
    tolerance ``2 * 144 eps_sigma / delta^2`` (both Hessians exact for perturbed data)."""
    err = wrong = tol = 0.0
    for idx, (m, n) in enumerate(SPECTRAL_SHAPES):
        W = controlled_matrix(m, n, seed=400 + idx)
        H_ref = ref.hessian_autograd(W)
        err = max(err, float((hessian(W) - H_ref).abs().max()))
        wrong = max(wrong, float((hessian_without_null_space(W) - H_ref).abs().max()))
        tol = max(tol, dense_hessian_tolerance(m, n, SIGMA1, _gap_of(m, n, GAP)))
    return Comparison(err, tol, "null-space 1/s1 term dropped", wrong)


# --------------------------------------------------------------------------- tr H, eigenvalues


@register(
    "tr H / eigenvalues of H",
    "numeric",
    "eig H = {1/(s1-s_k), 1/(s1+s_k)}_{k=2..r} + {1/s1} x (m+n-2r) + {0} x rest",
    name="eigenvalues of dense hessian vs predicted multiset",
)
def check_hessian_eigenvalues() -> Comparison:
    """Sorted ``eigvalsh(hessian(W))`` against the Lemma 13 multiset from the singular values;
    tolerance ``2 * 144 eps_sigma / delta^2`` (Weyl)."""
    err = wrong = tol = 0.0
    for idx, (m, n) in enumerate(SPECTRAL_SHAPES):
        W = controlled_matrix(m, n, seed=500 + idx)
        predicted = ref.hessian_eigenvalues_predicted(torch.linalg.svdvals(W), m, n)
        err = max(err, float((torch.linalg.eigvalsh(hessian(W)) - predicted).abs().max()))
        wrong_eigs = torch.linalg.eigvalsh(hessian_without_cross_term(W))
        wrong = max(wrong, float((wrong_eigs - predicted).abs().max()))
        tol = max(tol, dense_hessian_tolerance(m, n, SIGMA1, _gap_of(m, n, GAP)))
    return Comparison(err, tol, "cross term s_k (x_k y_k^T + y_k x_k^T) dropped", wrong)


@register(
    "tr H / eigenvalues of H",
    "numeric",
    "tr H = sum_{k=2..r} 2 s1/(s1^2 - s_k^2) + (m + n - 2r)/s1",
    name="hessian_trace vs trace of autograd Hessian",
)
def check_hessian_trace() -> Comparison:
    """``hessian_trace(W)`` against ``trace(hessian_autograd(W))``; tolerance d times the entry bound."""
    err = wrong = tol = 0.0
    for idx, (m, n) in enumerate(SPECTRAL_SHAPES):
        W = controlled_matrix(m, n, seed=600 + idx)
        trace_ref = float(torch.trace(ref.hessian_autograd(W)))
        err = max(err, abs(float(hessian_trace(W)) - trace_ref))
        wrong = max(wrong, abs(float(hessian_trace_half(W)) - trace_ref))
        tol = max(tol, m * n * dense_hessian_tolerance(m, n, SIGMA1, _gap_of(m, n, GAP)))
    return Comparison(err, tol, "factor 2 dropped: sum s1/(s1^2 - s_k^2)", wrong)


# --------------------------------------------------------------------------- Proposition 5


def biased_covariance(G: torch.Tensor, population_size: int | None = None) -> torch.Tensor:
    """WRONG Proposition 5: ``G_hat^T G_hat / b^2`` (the biased plug-in covariance of g_bar)."""
    b = G.shape[0]
    return batch_noise_covariance(G, population_size) * (b - 1) / b


def small_population(N: int, d: int, seed: int) -> torch.Tensor:
    """(N, d) float64 Gaussian population with a non-zero mean and correlated coordinates."""
    gen = _generator(seed)
    mix = torch.randn(d, d, dtype=F64, generator=gen)
    return torch.randn(N, d, dtype=F64, generator=gen) @ mix + 1.0


@register(
    "Proposition 5",
    "numeric",
    "E[G_hat G_hat^T / (b(b-1))] = Cov[g_bar]; times (1 - b/N) without replacement",
    name="exact average over all ordered mini-batches (N=5, b=2,3, with/without replacement)",
)
def check_unbiased_exact() -> Comparison:
    """Average of ``batch_noise_covariance`` over all T = N^b (or N!/(N-b)!) ordered batches against
    the enumerated covariance of the batch mean; relative Frobenius error. Tolerance
    ``4 (T + b + d) eps max_t ||Sigma_hat_t|| / ||Sigma||``: summing T terms of size at most
    max_t ||Sigma_hat_t||, each itself a sum of b products of d-vectors, both sides compared."""
    N, d = 5, 3
    population = small_population(N, d, seed=700)
    err = wrong = tol = 0.0
    for b in (2, 3):
        for replacement in (True, False):
            pop_size = None if replacement else N
            exact = ref.covariance_of_batch_mean(population, b, replacement)
            tuples = list(
                itertools.product(range(N), repeat=b) if replacement else itertools.permutations(range(N), b)
            )
            estimates = torch.stack([batch_noise_covariance(population[list(t)], pop_size) for t in tuples])
            mean = estimates.mean(0)
            wrong_estimates = [biased_covariance(population[list(t)], pop_size) for t in tuples]
            mean_wrong = torch.stack(wrong_estimates).mean(0)
            largest = float(torch.linalg.matrix_norm(estimates).max())
            scale = float(torch.linalg.matrix_norm(exact))
            err = max(err, float(torch.linalg.matrix_norm(mean - exact)) / scale)
            wrong = max(wrong, float(torch.linalg.matrix_norm(mean_wrong - exact)) / scale)
            # largest is the mean norm; the max term is at most tuples * mean norm, bound generously
            tol = max(tol, 4 * (len(tuples) + b + d) * EPS64 * largest / scale)
    return Comparison(err, tol, "biased 1/b^2 estimator", wrong, "relative Frobenius error")


@register(
    "Proposition 5",
    "numeric",
    "E[Sigma_hat] = Sigma = C / b (Monte Carlo, 20000 batches, Bonferroni 99.99% intervals)",
    name="Monte Carlo over mini-batches of a fixed population (N=64, d=5, b=6)",
)
def check_unbiased_monte_carlo() -> Comparison:
    """Mean of ``batch_noise_covariance`` over K random batches (fixed seed) against the exact
    ``Sigma`` (with replacement ``C/b``, C the population covariance with 1/N; without
    ``(N-b)/(N-1) C/b``). Error: largest |z| = |mean - Sigma| / standard error over the
    d(d+1)/2 entries and both samplings; tolerance: two-sided Bonferroni z for family-wise alpha
    = 1e-4 over those 2 d(d+1)/2 entries (normal approximation of the mean of K i.i.d. draws)."""
    N, d, b, K = 64, 5, 6, 20000
    population = small_population(N, d, seed=800)
    C = torch.cov(population.T, correction=0)
    gen = _generator(801)
    iu = torch.triu_indices(d, d)
    worst = worst_wrong = 0.0
    for replacement in (True, False):
        if replacement:
            idx = torch.randint(N, (K, b), generator=gen)
            exact = C / b
            pop_size = None
        else:
            idx = torch.rand(K, N, generator=gen, dtype=F64).argsort(1)[:, :b]
            exact = C / b * (N - b) / (N - 1)
            pop_size = N
        batches = population[idx]  # (K, b, d)
        centred = batches - batches.mean(1, keepdim=True)
        scale = (1 - b / N if pop_size else 1.0) / (b * (b - 1))
        # the fast code on a few batches must agree with the vectorised estimator used for speed
        for k in range(3):
            same = batch_noise_covariance(batches[k], pop_size)
            assert torch.allclose(same, centred[k].T @ centred[k] * scale, rtol=1e-12, atol=0)
        draws = torch.einsum("kbi,kbj->kij", centred, centred)[:, iu[0], iu[1]] * scale  # (K, entries)
        mean = draws.mean(0)
        se = draws.std(0) / math.sqrt(K)
        target = exact[iu[0], iu[1]]
        worst = max(worst, float(((mean - target).abs() / se).max()))
        wrong_draws = draws * (b - 1) / b
        wrong_se = wrong_draws.std(0) / math.sqrt(K)
        worst_wrong = max(worst_wrong, float(((wrong_draws.mean(0) - target).abs() / wrong_se).max()))
    entries = 2 * iu.shape[1]
    z = float(norm.ppf(1 - 1e-4 / (2 * entries)))
    return Comparison(
        worst, z, "biased 1/b^2 estimator", worst_wrong, f"max |z| over {entries} entries, K={K}"
    )


# --------------------------------------------------------------------------- Proposition 6


def uncentred_variance(G: torch.Tensor) -> torch.Tensor:
    """WRONG Proposition 6: ``sum_i g_i^2 / (b(b-1))`` without centring."""
    g = ref.flat_per_sample(G)
    b = g.shape[0]
    return (g * g).sum(0) / (b * (b - 1))


@register(
    "Proposition 6",
    "numeric",
    "diag(Sigma_hat) = (G_hat . G_hat) 1_b / (b(b-1)); covariance = Sigma_hat - Diag(diag Sigma_hat)",
    name="variance/covariance split vs dense Sigma_hat",
)
def check_variance_split() -> Comparison:
    """Both parts against the pairwise-difference dense Sigma_hat; error relative to max |Sigma_hat|,
    tolerance ``4 (b + d) eps`` (each entry a sum of b products, two sides)."""
    err = wrong = tol = 0.0
    for idx, (b, m, n) in enumerate(((2, 3, 4), (7, 4, 3), (16, 2, 5))):
        G = torch.randn(b, m, n, dtype=F64, generator=_generator(900 + idx)) + 0.5
        dense = ref.noise_covariance_dense(G)
        variance, covariance = variance_covariance_split(G)
        scale = float(dense.abs().max())
        off = dense - torch.diag(torch.diagonal(dense))
        e = max(float((variance - torch.diagonal(dense)).abs().max()), float((covariance - off).abs().max()))
        err = max(err, e / scale)
        wrong = max(wrong, float((uncentred_variance(G) - torch.diagonal(dense)).abs().max()) / scale)
        tol = max(tol, 4 * (b + m * n) * EPS64)
    return Comparison(err, tol, "variance without centring", wrong)


# --------------------------------------------------------------------------- Proposition 7


def _noise_cases():
    """(b, d, rank-deficient?) cases: d > b, d < b, and a population with rank < b - 1."""
    gen = _generator(1000)
    yield torch.randn(6, 10, dtype=F64, generator=gen)  # d > b, rank b - 1
    yield torch.randn(9, 4, dtype=F64, generator=gen)  # d < b, rank d
    low = torch.randn(8, 2, dtype=F64, generator=gen) @ torch.randn(2, 7, dtype=F64, generator=gen)
    yield low  # rank 2 < b - 1


def ghat_style_root(G: torch.Tensor) -> torch.Tensor:
    """WRONG Proposition 7: the (d, d) matrix ``sqrt(scale) [G_hat^T | 0]`` (the ``G_hat zeta`` factor
    padded or truncated to square): R R^T = Sigma_hat when d >= b, but R is not symmetric and
    R^2 != Sigma_hat."""
    g = ref.flat_per_sample(G)
    b, d = g.shape
    Gc = (g - g.mean(0)).T / math.sqrt(b * (b - 1))  # (d, b)
    R = torch.zeros(d, d, dtype=F64)
    k = min(b, d)
    R[:, :k] = Gc[:, :k]
    return R


def root_defect(R: torch.Tensor, Sigma: torch.Tensor) -> float:
    """max of ``||R^2 - Sigma||_F / ||Sigma||_F``, ``||R - R^T||_F / ||R||_F`` and
    ``max(0, -lambda_min(sym R)) / ||R||_2``: zero exactly for the symmetric PSD root."""
    Rn = float(torch.linalg.matrix_norm(R))
    square = float(torch.linalg.matrix_norm(R @ R - Sigma)) / float(torch.linalg.matrix_norm(Sigma))
    asym = float(torch.linalg.matrix_norm(R - R.T)) / Rn
    lam_min = float(torch.linalg.eigvalsh((R + R.T) / 2).min())
    return max(square, asym, max(0.0, -lam_min) / float(torch.linalg.matrix_norm(R, 2)))


@register(
    "Proposition 7",
    "numeric",
    "Sigma_hat^{1/2} = G_hat Q Lambda^{+1/2} Q^T G_hat^T / sqrt(b(b-1)) is symmetric PSD"
    " and squares to Sigma_hat",
    name="noise_sqrt: symmetric PSD, squares to Sigma_hat (d > b, d < b, rank < b-1)",
)
def check_noise_sqrt_squares() -> Comparison:
    """:func:`root_defect` of ``noise_sqrt(G).matrix()``. Tolerance: the Gram eigen-decomposition is
    backward stable with ``c b eps`` (c = 10), and dropped eigenvalues are below ``10 b eps lambda_max``
    (the cut-off), so R^2 differs from Sigma_hat by ``<= 20 b eps`` relative; symmetry and PSD-ness
    hold to the same order. We add a factor d for the (d, d) products."""
    err = wrong = tol = 0.0
    for G in _noise_cases():
        b, d = G.shape
        Sigma = ref.noise_covariance_dense(G)
        err = max(err, root_defect(noise_sqrt(G).matrix(), Sigma))
        wrong = max(wrong, root_defect(ghat_style_root(G), Sigma))
        tol = max(tol, 20 * b * d * EPS64)
    return Comparison(err, tol, "non-symmetric G_hat-style root [G_hat | 0]", wrong)


@register(
    "Proposition 7",
    "numeric",
    "low-rank root equals the dense eigh root; apply(x) = root @ x in O(d b)",
    name="noise_sqrt vs dense eigh square root, and apply()",
)
def check_noise_sqrt_dense() -> Comparison:
    """Relative Frobenius distance to ``symmetric_sqrt_dense(Sigma_hat)`` and of ``apply`` to
    ``matrix() @ x``. Tolerance: the square root is 1/2-Hoelder, ``||A^(1/2) - B^(1/2)|| <=
    ||A - B||^(1/2)``, so a relative perturbation ``20 b d eps`` of Sigma_hat moves the root by
    ``sqrt(20 b d eps)`` relative (rank-deficient directions are where this is attained)."""
    err = wrong = tol = 0.0
    gen = _generator(1100)
    for G in _noise_cases():
        b, d = G.shape
        root_ref = ref.symmetric_sqrt_dense(ref.noise_covariance_dense(G))
        ns = noise_sqrt(G)
        scale = float(torch.linalg.matrix_norm(root_ref))
        x = torch.randn(5, d, dtype=F64, generator=gen)
        apply_err = float((ns.apply(x) - x @ ns.matrix().T).abs().max()) / scale
        err = max(err, float(torch.linalg.matrix_norm(ns.matrix() - root_ref)) / scale, apply_err)
        wrong = max(wrong, float(torch.linalg.matrix_norm(ghat_style_root(G) - root_ref)) / scale)
        tol = max(tol, math.sqrt(20 * b * d * EPS64))
    return Comparison(err, tol, "non-symmetric G_hat-style root [G_hat | 0]", wrong)


# --------------------------------------------------------------------------- Theorem 14

#: Spec rtol for Theorem 14/15 against dense references (MATH section 3; rounding bound is below it).
DENSE_RTOL = 1e-10


def _layer_case(m: int, n: int, b: int, seed: int, gap: float = 0.3):
    gen = _generator(seed)
    W = ref.matrix_with_singular_values(spectrum(m, n, 2.0, gap), m, n, gen)
    G = torch.randn(b, m, n, dtype=F64, generator=gen) * 0.7 + torch.randn(m, n, dtype=F64, generator=gen)
    mean_grad = torch.randn(m, n, dtype=F64, generator=gen)
    return W, G, mean_grad


def _relative_errors(terms: LayerTerms, dense: dict[str, float], psi_factor: float = 1.0) -> float:
    errs = []
    for key in ("sigma", "mu", "phi", "psi"):
        value = getattr(terms, key) * (psi_factor if key == "psi" else 1.0)
        errs.append(abs(value - dense[key]) / max(abs(dense[key]), 1e-300))
    return max(errs)


@register(
    "Theorem 14",
    "numeric",
    "mu = -eta u^T grad_L v, phi = eta sqrt(J^T Sigma_hat J), psi = (eta^2/2) tr(H Sigma_hat)",
    name="layer_terms vs dense J, H, Sigma_hat (rtol 1e-10)",
)
def check_layer_terms_dense() -> Comparison:
    """``layer_terms`` from projections against dense J (autograd), H (dilation), Sigma_hat
    (pairwise), on 5 shapes, (b, m, n) and (b, m*n) inputs, batch-mean and given drift, with and
    without the (1 - b/N) factor. Error: max relative error over sigma, mu, phi, psi."""
    err = wrong = 0.0
    lr = 0.1
    for idx, (m, n) in enumerate(SPECTRAL_SHAPES):
        W, G, mean_grad = _layer_case(m, n, b=5 + idx, seed=1200 + idx)
        for variant in range(3):
            kwargs = {}
            Gin = G
            if variant == 1:
                kwargs = {"mean_grad": mean_grad, "population_size": 40}
            elif variant == 2:
                Gin = ref.vec(G)
            terms = layer_terms(W, Gin, lr, **kwargs)
            dense = ref.layer_terms_dense(W, G, lr, **kwargs)
            err = max(err, _relative_errors(terms, dense))
            wrong = max(wrong, _relative_errors(terms, dense, psi_factor=2.0))
    return Comparison(err, DENSE_RTOL, "psi without the 1/2", wrong)


@register(
    "Theorem 14",
    "numeric",
    "E[sigma_1(W - eta g_bar_B)] - sigma_1(W) = mu + psi + (eta^2/2) q_H(grad_L) + O(eta^3)",
    name="one SGD step averaged over all mini-batches (Ito's second-order term)",
)
def check_one_step_expectation() -> Comparison:
    """Exact average over all N^b = 16 ordered batches (N = 4, b = 2, with replacement) of the true
    change of sigma_1 after one SGD step, against the average of ``mu + psi`` from ``layer_terms``
    (drift from the population gradient; E[psi_hat] = psi by Proposition 5) plus the deterministic
    ``(eta^2/2) q_H(grad_L)``. Remainder: Taylor to second order along ``E = eta g_bar_B``,
    ``|R| <= sup|f'''|/6 <= 24 s^3 / delta^2`` with ``s = max_B ||eta g_bar_B||_2 <= delta/8``, plus
    ``2 eps_sigma`` rounding of the difference. The wrong variant (psi without 1/2) is off by psi."""
    m, n, N, b, lr = 3, 4, 4, 2, 1e-5
    gen = _generator(1300)
    W = ref.matrix_with_singular_values([2.0, 1.2, 0.5], m, n, gen)
    population = torch.randn(N, m, n, dtype=F64, generator=gen) * 2.0
    grad_L = population.mean(0)
    sigma0 = float(ref.operator_norm(W))
    delta = 0.8
    changes, predicted, psis = [], [], []
    s_max = 0.0
    for t in itertools.product(range(N), repeat=b):
        batch = population[list(t)]
        step = lr * batch.mean(0)
        s_max = max(s_max, float(torch.linalg.matrix_norm(step, 2)))
        changes.append(float(ref.operator_norm(W - step)) - sigma0)
        terms = layer_terms(W, batch, lr, mean_grad=grad_L)
        predicted.append(terms.mu + terms.psi)
        psis.append(terms.psi)
    deterministic = 0.5 * lr**2 * float(hessian_quadratic_form(W, grad_L))
    mean_change = float(np.mean(changes))
    mean_pred = float(np.mean(predicted)) + deterministic
    err = abs(mean_change - mean_pred)
    wrong = abs(mean_change - (mean_pred + float(np.mean(psis))))
    assert s_max <= delta / 8, "step too large for the Taylor remainder bound"
    tol = derivative_bound(3, s_max, delta) / 6 + 2 * sigma_evaluation_error(m, n, sigma0)
    return Comparison(err, tol, "psi without the 1/2", wrong, f"psi = {np.mean(psis):.3g}, s = {s_max:.3g}")


# --------------------------------------------------------------------------- Theorem 15


def _network_case(seed: int, b: int = 6):
    """Three layers whose per-sample gradients share a latent factor (cross-layer correlation)."""
    gen = _generator(seed)
    shapes = ((4, 3), (3, 5), (2, 3))
    latent = torch.randn(b, 3, dtype=F64, generator=gen)
    weights, grads, means = [], [], []
    for m, n in shapes:
        weights.append(ref.matrix_with_singular_values(spectrum(m, n, 1.5, 0.4), m, n, gen))
        loading = torch.randn(3, m * n, dtype=F64, generator=gen)
        flat = latent @ loading + 0.3 * torch.randn(b, m * n, dtype=F64, generator=gen)
        grads.append(ref.unvec(flat, m, n))
        means.append(torch.randn(m, n, dtype=F64, generator=gen))
    return weights, grads, means


def _network_fast(weights, grads, lr, means=None) -> NetworkTerms:
    layers = [
        layer_terms(W, G, lr, mean_grad=None if means is None else means[i])
        for i, (W, G) in enumerate(zip(weights, grads, strict=True))
    ]
    return network_terms(layers)


@register(
    "Theorem 15",
    "numeric",
    "d ln K = (mu_bar + psi_bar - phi_bar^2/2) dt + phi_bar dB, phi_bar^2 = sum phi_l^2/sigma_l^2",
    name="network_terms vs Ito on dense ln K (3 layers, rtol 1e-10)",
)
def check_network_terms() -> Comparison:
    """``network_terms`` (log bound, log drift, phi_sq) against Itô's lemma applied to
    ``ln K(theta)`` with dense gradient/Hessian of ln K and block-diagonal Sigma_hat."""
    err = wrong = 0.0
    lr = 0.05
    for seed, use_means in ((1400, False), (1401, True)):
        weights, grads, means = _network_case(seed)
        fast = _network_fast(weights, grads, lr, means if use_means else None)
        dense = ref.network_terms_dense(weights, grads, lr, means if use_means else None)
        rel = lambda a, b: abs(a - b) / abs(b)
        err = max(
            err,
            rel(fast.log_bound, dense["log_bound"]),
            rel(fast.log_drift, dense["log_drift"]),
            rel(fast.phi_sq, dense["phi_sq"]),
        )
        wrong = max(wrong, rel(fast.mu + fast.psi, dense["log_drift"]))
    return Comparison(err, DENSE_RTOL, "Ito correction -phi_bar^2/2 dropped from the log drift", wrong)


@register(
    "Theorem 15",
    "numeric",
    "cross-layer terms dropped by Assumption 3:"
    " eta^2 sum_{l != l'} J_l^T Sigma_ll' J_l' / (sigma_l sigma_l')",
    name="phi_sq_cross vs dense cross-layer covariance",
)
def check_cross_layer_diagnostic() -> Comparison:
    """``NetworkTerms.phi_sq_cross`` against ``eta^2 grad_lnK^T (Sigma_full - Sigma_block) grad_lnK``
    on the concatenated parameters; relative error (cross term made large by a shared latent)."""
    err = wrong = 0.0
    lr = 0.05
    for seed in (1500, 1501):
        weights, grads, _ = _network_case(seed)
        fast = _network_fast(weights, grads, lr)
        dense = ref.network_terms_dense(weights, grads, lr)
        err = max(err, abs(fast.phi_sq_cross - dense["phi_sq_cross"]) / abs(dense["phi_sq_cross"]))
        wrong = max(wrong, abs(0.5 * fast.phi_sq_cross - dense["phi_sq_cross"]) / abs(dense["phi_sq_cross"]))
    return Comparison(err, DENSE_RTOL, "pairs l < l' counted once", wrong)


# --------------------------------------------------------------------------- Theorem 17


def _series(T: int, seed: int) -> list[NetworkTerms]:
    gen = _generator(seed)
    mu = (torch.randn(T, dtype=F64, generator=gen) * 0.02).tolist()
    psi = (torch.rand(T, dtype=F64, generator=gen) * 0.01).tolist()
    phi_sq = (torch.rand(T, dtype=F64, generator=gen) * 0.02).tolist()
    return [
        NetworkTerms(log_bound=0.0, mu=a, psi=p, phi_sq=f) for a, p, f in zip(mu, psi, phi_sq, strict=True)
    ]


@register(
    "Theorem 17",
    "numeric",
    "E[K_t] = K_0 exp(sum_{s<t}(mu+psi)), Var[K_t] = E[K_t]^2 (exp(sum_{s<t} phi^2) - 1) (left-point sums)",
    name="predict_bound vs explicit loop with left-point sums",
)
def check_predict_bound_loop() -> Comparison:
    """``predict_bound`` mean and variance against a Python loop; relative error, tolerance
    ``4 T eps`` (T accumulated sums and an exp)."""
    T, K0 = 50, 2.5
    series = _series(T, 1600)
    pred = predict_bound(series, K0)
    means, variances = ref.predict_bound_loop([t.mu + t.psi for t in series], [t.phi_sq for t in series], K0)
    means_t, vars_t = torch.tensor(means, dtype=F64), torch.tensor(variances, dtype=F64)
    rel = lambda a, b: float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())
    err = max(rel(pred.mean, means_t), rel(pred.var[1:], vars_t[1:]), float(pred.var[0].abs()))
    # wrong: right-point (inclusive) sums K_0 exp(sum_{s<=t}) for t = 0..T-1
    drift = torch.tensor([t.mu + t.psi for t in series], dtype=F64)
    wrong = rel(K0 * torch.exp(torch.cumsum(drift, 0)), means_t[:-1])
    return Comparison(err, 4 * T * EPS64, "right-point sums sum_{s<=t}", wrong)


@register(
    "Theorem 17",
    "numeric",
    "ln K_t ~ N(ln K_0 + sum(mu+psi-phi^2/2), sum phi^2) (Thm 16) => E, Var of Thm 17",
    name="predict_bound vs Gauss-Hermite moments of the Theorem 16 log-normal",
)
def check_predict_bound_quadrature() -> Comparison:
    """At the end of a 50-step series, ``predict_bound``'s mean and variance against 80-node
    Gauss-Hermite quadrature of e^X, X the Theorem 16 Gaussian log (Lemma 19). Quadrature error
    for an entire integrand is far below the rounding of the 80 weighted terms, bounded by
    ``80 * 4 eps`` relative."""
    T, K0 = 50, 1.7
    series = _series(T, 1700)
    pred = predict_bound(series, K0)
    log_mean = math.log(K0) + sum(t.mu + t.psi - 0.5 * t.phi_sq for t in series)
    log_var = sum(t.phi_sq for t in series)
    mean_q, var_q = ref.lognormal_moments_quadrature(log_mean, log_var)
    err = max(abs(float(pred.mean[-1]) - mean_q) / mean_q, abs(float(pred.var[-1]) - var_q) / var_q)
    wrong_var = float(pred.mean[-1]) ** 2 * log_var  # first-order variance, exp dropped
    wrong = abs(wrong_var - var_q) / var_q
    return Comparison(err, 320 * EPS64 * 4, "Var = E^2 Phi (exp(Phi) - 1 linearised)", wrong)


# --------------------------------------------------------------------------- Proposition 21


def _averaged_network_terms(weights, population, b: int, lr: float) -> NetworkTerms:
    """Exact average of network_terms over all N^b ordered batches (with replacement); the drift
    uses the population gradient so mu is the same for every batch."""
    N = population[0].shape[0]
    means = [p.mean(0) for p in population]
    acc = {"mu": 0.0, "psi": 0.0, "phi_sq": 0.0}
    count = 0
    for t in itertools.product(range(N), repeat=b):
        layers = [
            layer_terms(W, P[list(t)], lr, mean_grad=g)
            for W, P, g in zip(weights, population, means, strict=True)
        ]
        nt = network_terms(layers)
        for key in acc:
            acc[key] += getattr(nt, key)
        count += 1
    log_bound = sum(math.log(float(ref.operator_norm(W))) for W in weights)
    return NetworkTerms(log_bound=log_bound, **{k: v / count for k, v in acc.items()})


@register(
    "Proposition 21",
    "numeric",
    "Sigma = C/b => psi_bar, phi_bar^2 scale like 1/b; rescale_batch_size(b -> b') matches measuring at b'",
    name="rescale_batch_size vs exact averages at b=2 and b'=3 (N=4 population)",
)
def check_rescale_batch_size() -> Comparison:
    """Exact averages (over all ordered batches) of psi_bar and phi_bar^2 at b = 2, rescaled to
    b' = 3, against the exact averages at b' = 3, and the resulting Var[K_t]. Tolerance as for
    Proposition 5 exact averages: ``4 (T + b + d) eps`` times a cancellation factor of 10."""
    gen = _generator(1800)
    shapes = ((3, 2), (2, 4))
    weights = [ref.matrix_with_singular_values(spectrum(m, n, 1.5, 0.5), m, n, gen) for m, n in shapes]
    population = [torch.randn(4, m, n, dtype=F64, generator=gen) for m, n in shapes]
    lr = 0.1
    at_b = _averaged_network_terms(weights, population, 2, lr)
    at_b_new = _averaged_network_terms(weights, population, 3, lr)
    (rescaled,) = rescale_batch_size([at_b], 2, 3)
    rel = lambda a, b: abs(a - b) / abs(b)
    err = max(
        rel(rescaled.psi, at_b_new.psi), rel(rescaled.phi_sq, at_b_new.phi_sq), rel(rescaled.mu, at_b_new.mu)
    )
    var_new = predict_bound([at_b_new] * 10, 1.0).var[-1]
    var_rescaled = predict_bound([rescaled] * 10, 1.0).var[-1]
    err = max(err, rel(float(var_rescaled), float(var_new)))
    ratio = math.sqrt(2 / 3)  # wrong: scaled like a standard deviation
    wrong = max(rel(at_b.psi * ratio, at_b_new.psi), rel(at_b.phi_sq * ratio, at_b_new.phi_sq))
    tol = 40 * (64 + 3 + 8) * EPS64
    return Comparison(err, tol, "psi, phi^2 scaled by sqrt(b/b')", wrong)
