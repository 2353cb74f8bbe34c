"""Propositions 5-7: the noise estimator, its split and its low-rank root against dense references.

Rounding tolerances follow :mod:`lipverify.checks.numeric`: a sum of b products of d-vectors is
exact up to ``c (b + d) eps`` relative to the largest entry; the square root is 1/2-Hoelder, so a
relative perturbation ``e`` of Sigma_hat moves the root by ``sqrt(e)`` relative.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chi2, norm

from lipverify import _reference as ref
from lipverify.checks.numeric import (
    biased_covariance,
    check_unbiased_monte_carlo,
    ghat_style_root,
    root_defect,
    small_population,
)
from lipverify.noise import (
    batch_noise_covariance,
    centred,
    estimator_scale,
    noise_sqrt,
    variance_covariance_split,
)

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


@st.composite
def per_sample_gradients(draw, max_b: int = 10, max_d: int = 12):
    """(b, d) float64 gradients with a common offset (so centring matters) and optional low rank."""
    b = draw(st.integers(2, max_b))
    d = draw(st.integers(1, max_d))
    rank = draw(st.integers(1, d))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    G = torch.randn(b, rank, dtype=F64, generator=gen) @ torch.randn(rank, d, dtype=F64, generator=gen)
    return G + 3.0 * torch.randn(d, dtype=F64, generator=gen)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


# --------------------------------------------------------------------------- Proposition 5


@given(per_sample_gradients(), st.one_of(st.none(), st.integers(10, 100)))
def test_covariance_matches_dense_definition(G, population_size):
    b, d = G.shape
    Sigma = batch_noise_covariance(G, population_size)
    ref_Sigma = ref.noise_covariance_dense(G, population_size)
    # offset 3 vs spread 1: centring cancels ~ (offset/spread)^2 = 9 digits-worth relative to the entries
    assert rel_err(Sigma, ref_Sigma) <= 4 * (b + d) * EPS64 * 10
    assert torch.equal(Sigma, Sigma.T) or rel_err(Sigma, Sigma.T) <= 4 * b * EPS64


def test_matrix_and_vector_layouts_agree():
    """(b, m, n) matrices are vectorised column-major: same Sigma_hat as the (b, m*n) input."""
    G = torch.randn(5, 3, 4, dtype=F64)
    flat = ref.vec(G)
    # not bitwise: the two layouts may reach the BLAS with different strides/alignment (MKL's results
    # depend on both); a row-major vectorisation permutes Sigma_hat (error O(1))
    b = G.shape[0]
    assert rel_err(batch_noise_covariance(G), batch_noise_covariance(flat)) <= 4 * b * EPS64
    assert rel_err(centred(G), centred(flat)) <= 2 * b * EPS64


@pytest.mark.parametrize(("b", "replacement"), [(2, True), (3, True), (2, False), (3, False), (4, False)])
def test_unbiased_over_all_ordered_batches(b, replacement):
    """Exact enumeration: E[Sigma_hat] = Cov[g_bar] (with replacement: all N^b tuples; without:
    all ordered b-tuples of distinct items with the (1 - b/N) factor); the 1/b^2 variant is off by
    a factor (b - 1)/b, far outside the summation tolerance."""
    N, d = 5, 3
    population = small_population(N, d, seed=b + 10 * replacement)
    pop_size = None if replacement else N
    exact = ref.covariance_of_batch_mean(population, b, replacement)
    tuples = list(
        itertools.product(range(N), repeat=b) if replacement else itertools.permutations(range(N), b)
    )
    estimates = torch.stack([batch_noise_covariance(population[list(t)], pop_size) for t in tuples])
    biased = torch.stack([biased_covariance(population[list(t)], pop_size) for t in tuples])
    tol = 4 * (len(tuples) + b + d) * EPS64 * float(estimates.abs().max()) / float(exact.abs().max())
    assert rel_err(estimates.mean(0), exact) <= tol
    assert rel_err(biased.mean(0), exact) > tol
    assert rel_err(biased.mean(0), exact * (b - 1) / b) <= tol


def test_monte_carlo_unbiased_fast_subset():
    """The registered Monte Carlo check (K = 20000 batches, Bonferroni z at alpha = 1e-4)."""
    c = check_unbiased_monte_carlo()
    assert c.max_error <= c.tolerance < c.wrong_error


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_monte_carlo_unbiased_large(seed):
    """Larger Monte Carlo (K = 200000, d = 6, b = 4, with replacement): the sum over entries of z^2
    is chi-square with d(d+1)/2 degrees of freedom (asymptotically, entries correlated -> use the
    conservative max-|z| Bonferroni bound at alpha = 1e-4 instead)."""
    N, d, b, K = 100, 6, 4, 200_000
    population = small_population(N, d, seed=50 + seed)
    C = torch.cov(population.T, correction=0)
    gen = torch.Generator().manual_seed(seed)
    batches = population[torch.randint(N, (K, b), generator=gen)]
    Gc = batches - batches.mean(1, keepdim=True)
    iu = torch.triu_indices(d, d)
    draws = torch.einsum("kbi,kbj->kij", Gc, Gc)[:, iu[0], iu[1]] / (b * (b - 1))
    z = (draws.mean(0) - (C / b)[iu[0], iu[1]]) / (draws.std(0) / math.sqrt(K))
    bound = norm.ppf(1 - 1e-4 / (2 * iu.shape[1]))
    assert float(z.abs().max()) <= bound
    z_wrong = (draws.mean(0) * (b - 1) / b - (C / b)[iu[0], iu[1]]) / (draws.std(0) / math.sqrt(K))
    assert float(z_wrong.abs().max()) > bound


def test_estimator_scale_values():
    assert estimator_scale(2) == 0.5
    assert estimator_scale(4, population_size=8) == pytest.approx((1 - 4 / 8) / 12, rel=1e-15)
    assert estimator_scale(5, population_size=5) == 0.0


# --------------------------------------------------------------------------- Proposition 6


@given(per_sample_gradients(), st.one_of(st.none(), st.integers(12, 60)))
def test_variance_covariance_split(G, population_size):
    b, d = G.shape
    variance_ref, off = ref.variance_covariance_split_dense(G, population_size)
    variance, covariance = variance_covariance_split(G, population_size)
    tol = 40 * (b + d) * EPS64
    assert rel_err(variance, variance_ref) <= tol
    assert float(torch.diagonal(covariance).abs().max()) == 0.0
    assert float((covariance - off).abs().max()) <= tol * float(variance_ref.abs().max())
    assert bool((variance >= 0).all())


def test_variance_covariance_split_without_replacement_by_hand():
    """b = 3 of N = 4: scale (1 - 3/4) / (3 * 2) = 1/24. Centred columns (-1, 0, 1) and (-2, 1, 1):
    variance (2, 6) / 24, covariance 3 / 24 off the diagonal; the dense reference agrees."""
    G = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 3.0]], dtype=F64) + 5.0
    variance, covariance = variance_covariance_split(G, population_size=4)
    assert torch.allclose(variance, torch.tensor([2.0, 6.0], dtype=F64) / 24, rtol=1e-14, atol=0)
    expected = torch.tensor([[0.0, 3.0], [3.0, 0.0]], dtype=F64) / 24
    assert torch.allclose(covariance, expected, rtol=1e-14, atol=1e-16)
    variance_ref, off = ref.variance_covariance_split_dense(G, population_size=4)
    assert torch.allclose(variance, variance_ref, rtol=1e-13, atol=0)
    assert torch.allclose(covariance, off, rtol=1e-13, atol=1e-16)


def test_covariance_part_is_not_psd_in_general():
    G = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    _, covariance = variance_covariance_split(G)
    assert float(torch.linalg.eigvalsh(covariance).min()) < 0


# --------------------------------------------------------------------------- Proposition 7


@given(per_sample_gradients(), st.one_of(st.none(), st.integers(12, 60)))
def test_noise_sqrt_symmetric_psd_and_squares(G, population_size):
    b, d = G.shape
    Sigma = ref.noise_covariance_dense(G, population_size)
    root = noise_sqrt(G, population_size)
    R = root.matrix()
    # offset 3 before centring: the Gram matrix carries ~10x rounding relative to the centred data
    assert root_defect(R, Sigma) <= 200 * b * d * EPS64
    assert root.rank <= min(b - 1, d)
    # genuine singular values of the centred data are O(1), rounding ones O(eps): any cut-off in
    # between (noise_sqrt: sqrt(10 b eps) relative on singular values) finds the same rank
    assert root.rank == int(torch.linalg.matrix_rank(centred(G), rtol=1e-6))
    dense_root = ref.noise_sqrt_dense(G, population_size)
    scale = float(torch.linalg.matrix_norm(dense_root))
    assert float(torch.linalg.matrix_norm(R - dense_root)) <= math.sqrt(200 * b * d * EPS64) * scale


@given(per_sample_gradients(max_b=8, max_d=10), st.integers(0, 1000))
def test_noise_sqrt_apply_matches_matrix(G, seed):
    root = noise_sqrt(G)
    x = torch.randn(3, G.shape[1], dtype=F64, generator=torch.Generator().manual_seed(seed))
    expected = x @ root.matrix().T
    assert float((root.apply(x) - expected).abs().max()) <= 40 * G.shape[0] * EPS64 * max(
        float(expected.abs().max()), float(root.matrix().abs().max()) * float(x.abs().max())
    )


def test_noise_sqrt_when_d_smaller_than_b():
    """d = 2 < b = 7: rank 2 root, still squares to Sigma_hat (no inverse of a zero eigenvalue)."""
    G = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    root = noise_sqrt(G)
    assert root.rank == 2
    assert root_defect(root.matrix(), ref.noise_covariance_dense(G)) <= 200 * 7 * 2 * EPS64


def test_noise_sqrt_keeps_a_small_genuine_singular_value():
    """Centred data with singular values (1, 0.3, 1e-2): the 1e-2 direction (1e-4 relative on the
    Gram eigenvalues) is genuine, far above rounding, so the root keeps full rank 3 and squares
    back to Sigma_hat, that direction included."""
    gen = torch.Generator().manual_seed(11)
    b, d = 6, 5
    A = torch.randn(b, d, dtype=F64, generator=gen)
    A = A - A.mean(0, keepdim=True)
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    sv = torch.tensor([1.0, 0.3, 1e-2], dtype=F64)
    Gc = (U[:, :3] * sv) @ Vh[:3]
    G = Gc + 3.0 * torch.randn(d, dtype=F64, generator=gen)  # common offset, removed by centring
    for population_size in (None, 20):
        root = noise_sqrt(G, population_size)
        assert root.rank == 3
        Sigma = ref.noise_covariance_dense(G, population_size)
        R = root.matrix()
        assert root_defect(R, Sigma) <= 200 * b * d * EPS64
        # the small direction on its own: v^T R^2 v = scale * 1e-4 (relative 1e-4 of the top one)
        v = Vh[2]
        scale = estimator_scale(b, population_size)
        assert float(v @ R @ R @ v) == pytest.approx(scale * 1e-4, rel=1e-8)


def test_ghat_style_root_is_rejected():
    """The G_hat zeta factor gives R R^T = Sigma_hat but is neither symmetric nor a square root."""
    G = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(5))
    Sigma = ref.noise_covariance_dense(G)
    R = ghat_style_root(G)
    assert torch.allclose(R @ R.T, Sigma, rtol=1e-12, atol=1e-14)
    assert root_defect(R, Sigma) > 0.1


def test_noise_sqrt_sample_has_covariance_sigma_hat():
    """sample(): E[x x^T] = Sigma_hat. Entrywise z-scores of the sample second moment over
    K = 40000 draws, Bonferroni bound at family-wise alpha = 1e-4; plus a chi-square check on
    the trace (sum of K independent quadratic forms)."""
    G = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    root = noise_sqrt(G)
    Sigma = ref.noise_covariance_dense(G)
    K = 40_000
    x = root.sample(K, generator=torch.Generator().manual_seed(7))
    d = x.shape[1]
    iu = torch.triu_indices(d, d)
    products = (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]
    z = (products.mean(0) - Sigma[iu[0], iu[1]]) / (products.std(0) / math.sqrt(K))
    assert float(z.abs().max()) <= norm.ppf(1 - 1e-4 / (2 * iu.shape[1]))
    # x = G_hat^T zeta sqrt(scale): x^T Sigma_hat^+ x ~ chi2(rank); the sum over K draws ~ chi2(K rank)
    quad = torch.einsum("ki,ij,kj->k", x, torch.linalg.pinv(Sigma, hermitian=True), x).sum()
    dof = K * root.rank
    assert chi2.ppf(1e-4 / 2, dof) <= float(quad) <= chi2.ppf(1 - 1e-4 / 2, dof)


@given(per_sample_gradients())
def test_float32_covariance_matches_float64(G):
    """float32 Sigma_hat: rounding the inputs and the batch mean moves each centred entry by
    <= (b + 2) eps32 max|g|; each entry of Sigma_hat = scale sum_i g_hat_ik g_hat_il then moves by
    <= scale b [2 (b + 2) eps32 max|g| max|g_hat| + b eps32 max|g_hat|^2] (products and sum)."""
    b, _ = G.shape
    eps32 = torch.finfo(torch.float32).eps
    Sigma32 = batch_noise_covariance(G.float())
    assert Sigma32.dtype == torch.float32
    Sigma64 = batch_noise_covariance(G)
    g_max = float(G.abs().max())
    ghat_max = float(centred(G).abs().max())
    scale = 1 / (b * (b - 1))
    tol = scale * b * (2 * (b + 2) * eps32 * g_max * ghat_max + b * eps32 * ghat_max**2)
    assert float((Sigma32.double() - Sigma64).abs().max()) <= tol
    root32 = noise_sqrt(G.float())
    assert bool(torch.isfinite(root32.matrix()).all())
