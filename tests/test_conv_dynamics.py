"""Complex Lemma 12/13 kernels and the Theorem 14 terms of the exact circular conv norm
(lipverify.conv_dynamics), each against finite differences or the SymPy derivation, with wrong variants.

Finite-difference tolerances (derived, not tuned). For f(t) = sigma_1(A + t E) with gap
d = sigma_1 - sigma_2 (sigma_2 := 0 for r = 1): sigma_1 is the eigenvalue of the Hermitian dilation
[[0, A], [A^H, 0]] at distance >= d from the rest of its spectrum, so for complex |t| < d / (2 ||E||_2)
it stays holomorphic within d/2 of sigma_1 (resolvent bound, ||t F R(z)|| < 1 on |z - sigma_1| = d/2), and
Cauchy gives |f^(k)(0)| / k! <= (d/2) (2 ||E|| / d)^k. With x = 2 h ||E|| / d the truncation errors are
<= (d / 2h) x^3 / (1 - x^2) (central first difference) and <= (d / h^2) x^4 / (1 - x^2) (second). Each
sigma_1 evaluation carries an absolute error <= c eps sigma_1, c = 8 (m + n) (backward-stable SVD plus
forming A + hE), adding c eps sigma_1 / h and 4 c eps sigma_1 / h^2. The steps balance the two:
x1 = (2 c eps sigma_1 / d)^(1/3), x2 = (4 c eps sigma_1 / d)^(1/4). The tolerance is twice the sum.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipverify import conv_dynamics as cd
from lipverify._validation import LipverifyError
from lipverify.dynamics import layer_terms
from lipverify.spectral import SpectralGapWarning

EPS = float(np.finfo(np.float64).eps)


def random_unitary(k: int, rng: np.random.Generator) -> np.ndarray:
    Z = rng.standard_normal((k, k)) + 1j * rng.standard_normal((k, k))
    Q, R = np.linalg.qr(Z)
    return Q * (np.diag(R) / np.abs(np.diag(R)))


def complex_with_gap(m: int, n: int, rel_gap: float, seed: int) -> torch.Tensor:
    """A = U diag(s) V^H with s_1 = 1, s_2 = 1 - rel_gap, the rest uniform below s_2."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    s = np.sort(rng.uniform(0, 1 - rel_gap, r))[::-1].copy()
    s[0] = 1.0
    if r > 1:
        s[1] = 1 - rel_gap
    U, V = random_unitary(m, rng)[:, :r], random_unitary(n, rng)[:, :r]
    return torch.from_numpy((U * s) @ V.conj().T)


def random_direction(m: int, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed + 1000)
    return torch.from_numpy(rng.standard_normal((m, n)) + 1j * rng.standard_normal((m, n)))


def fd_derivatives(A: torch.Tensor, E: torch.Tensor):
    """Central differences of f(t) = sigma_1(A + t E) with the steps and tolerances of the module doc."""
    m, n = A.shape
    s = torch.linalg.svdvals(A)
    s1 = float(s[0])
    d = float(s[0] - s[1]) if s.numel() > 1 else s1
    norm_e = float(torch.linalg.matrix_norm(E, 2))
    c = 8 * (m + n)

    def f(t):
        return float(torch.linalg.svdvals(A + t * E)[0])

    x1 = (2 * c * EPS * s1 / d) ** (1 / 3)
    h1 = x1 * d / (2 * norm_e)
    first = (f(h1) - f(-h1)) / (2 * h1)
    tol1 = 2 * ((d / (2 * h1)) * x1**3 / (1 - x1**2) + c * EPS * s1 / h1)
    x2 = (4 * c * EPS * s1 / d) ** (1 / 4)
    h2 = x2 * d / (2 * norm_e)
    second = (f(h2) - 2 * f(0.0) + f(-h2)) / h2**2
    tol2 = 2 * ((d / h2**2) * x2**4 / (1 - x2**2) + 4 * c * EPS * s1 / h2**2)
    return first, tol1, second, tol2


def jacobian_value(A, E, variant="complex"):
    J = cd.complex_sigma_jacobian(A)
    if variant == "complex":
        return float((J.conj() * E).sum().real)
    dec = cd.complex_decompose(A)
    if variant == "modulus":
        return float((dec.u.conj() @ E @ dec.v).abs())
    if variant == "unconjugated":
        return float((dec.u @ E @ dec.v).real)
    raise ValueError(variant)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 4),
    rel_gap=st.floats(1e-2, 1.0),
    seed=st.integers(0, 10_000),
)
def test_complex_jacobian_and_hessian_match_finite_differences(m, n, rel_gap, seed):
    A = complex_with_gap(m, n, min(rel_gap, 0.999), seed)
    E = random_direction(m, n, seed)
    first, tol1, second, tol2 = fd_derivatives(A, E)
    assert abs(jacobian_value(A, E) - first) <= tol1
    assert abs(float(cd.complex_hessian_quadratic_form(A, E)) - second) <= tol2


@pytest.mark.parametrize("shape", [(2, 3), (3, 3), (4, 2)])
def test_wrong_complex_variants_rejected_by_finite_differences(shape):
    m, n = shape
    for seed in range(3):
        A = complex_with_gap(m, n, 0.3, seed)
        E = random_direction(m, n, seed)
        first, tol1, second, tol2 = fd_derivatives(A, E)
        assert abs(jacobian_value(A, E) - first) <= tol1
        for variant in ("modulus", "unconjugated"):
            assert abs(jacobian_value(A, E, variant) - first) > tol1, variant
        assert abs(float(cd.complex_hessian_quadratic_form(A, E)) - second) <= tol2
        for variant in ("real_formula", "real_parts"):
            wrong = float(cd.complex_hessian_quadratic_form(A, E, variant=variant))
            assert abs(wrong - second) > tol2, variant


@pytest.mark.parametrize("shape", [(2, 2), (2, 3), (3, 2)])
def test_kernels_match_lambdified_sympy_derivation(shape):
    from derivations import conv_norm as cn

    m, n = shape
    derived = cn.lambdified_derivatives(m, n)
    rng = np.random.default_rng(11)
    for _ in range(5):
        A = rng.standard_normal((m, n)) + 1j * rng.standard_normal((m, n))
        s = np.linalg.svd(A, compute_uv=False)
        assert (s[0] - s[1]) / s[0] > 0.05  # the fixed seed draws well-separated tops
        grad, hess = derived(A)
        e = rng.standard_normal(2 * m * n)
        E = torch.from_numpy(e[: m * n].reshape(m, n) + 1j * e[m * n :].reshape(m, n))
        At = torch.from_numpy(A)
        # float64 evaluation of the implicit formula divides by p_lambda ~ prod of gaps: relative
        # error ~ eps * (sigma_1 / gap)^2 <= 1e-12 here; 1e-9 leaves a margin of 1000
        scale_j = np.abs(grad).sum() * np.abs(e).max()
        scale_h = np.abs(hess).sum() * np.abs(e).max() ** 2
        assert abs(jacobian_value(At, E) - grad @ e) <= 1e-9 * scale_j
        assert abs(float(cd.complex_hessian_quadratic_form(At, E)) - e @ hess @ e) <= 1e-9 * scale_h
        wrong = float(cd.complex_hessian_quadratic_form(At, E, variant="real_formula"))
        assert abs(wrong - e @ hess @ e) > 1e-6 * scale_h


def test_real_matrix_reduces_to_real_lemma_13():
    from lipverify.spectral import hessian_quadratic_form, jacobian

    torch.manual_seed(0)
    W = torch.randn(3, 5, dtype=torch.float64)
    E = torch.randn(4, 3, 5, dtype=torch.float64)
    q_complex = cd.complex_hessian_quadratic_form(W.to(torch.complex128), E.to(torch.complex128))
    torch.testing.assert_close(q_complex, hessian_quadratic_form(W, E), rtol=1e-12, atol=0)
    J = cd.complex_sigma_jacobian(W.to(torch.complex128))
    torch.testing.assert_close(J.real, jacobian(W), rtol=1e-12, atol=1e-14)
    assert float(J.imag.abs().max()) < 1e-14


def test_degenerate_complex_top_refused_and_small_gap_warned():
    A = complex_with_gap(3, 3, 0.0, 1)
    with pytest.raises(LipverifyError, match="equal up to rounding"):
        cd.complex_sigma_jacobian(A)
    A = complex_with_gap(3, 3, 1e-8, 1)
    with pytest.warns(SpectralGapWarning):
        cd.complex_hessian_quadratic_form(A, random_direction(3, 3, 1))
    with pytest.raises(LipverifyError, match="non-finite"):
        cd.complex_sigma_jacobian(torch.full((2, 2), float("nan"), dtype=torch.complex128))


# ---------------------------------------------------------------------------------------------
# The circular conv norm
# ---------------------------------------------------------------------------------------------


def circular_dense_matrix(weight: torch.Tensor, grid) -> torch.Tensor:
    """Dense matrix of the stride-1 circular Conv2d (padding (kh-1)/2, padding_mode="circular")."""
    c_out, c_in, kh, kw = weight.shape
    conv = torch.nn.Conv2d(
        c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2), padding_mode="circular", bias=False
    )
    conv = conv.double()
    with torch.no_grad():
        conv.weight.copy_(weight)
        eye = torch.eye(c_in * grid[0] * grid[1], dtype=torch.float64).reshape(-1, c_in, *grid)
        return conv(eye).reshape(eye.shape[0], -1).T


@pytest.mark.parametrize("grid", [(5, 5), (4, 6)])
def test_circular_norm_equals_dense_operator_norm(grid):
    torch.manual_seed(1)
    W = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    dense = float(torch.linalg.matrix_norm(circular_dense_matrix(W, grid), 2))
    assert abs(cd.circular_conv_norm(W, grid) - dense) <= 1e-12 * dense
    # the wrong grid is a different operator: the check can fail
    wrong = (grid[0] + 1, grid[1])
    assert abs(cd.circular_conv_norm(W, wrong) - dense) > 1e-6 * dense
    f = (1, 2)
    torch.testing.assert_close(cd.frequency_matrix(W, f, grid), torch.fft.fft2(W, s=grid)[:, :, f[0], f[1]])


def generic_kernel(shape, grid, min_relative_frequency_gap=0.1):
    """Deterministic search over seeds for a kernel whose top frequency is not self-conjugate (W_hat_f*
    genuinely complex) and is separated from every other frequency by a relative gap >= the given one."""
    for seed in range(200):
        W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        top = cd.top_frequency(W, grid)
        if not top.self_conjugate and top.relative_frequency_gap >= min_relative_frequency_gap:
            return W, top
    raise AssertionError("no seed gave a separated complex top")


def test_conjugate_pair_moves_identically_and_gradient_matches_fd():
    grid = (5, 5)
    W, top = generic_kernel((2, 3, 3, 3), grid)
    D = torch.randn(W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    assert not top.self_conjugate and top.conjugate_mismatch <= 1e-13 * top.norm
    for t in (1e-3, 0.1, 1.0):  # identically, not only to first order
        sig = [
            float(torch.linalg.svdvals(cd.frequency_matrix(W + t * D, f, grid))[0])
            for f in (top.frequency, top.conjugate)
        ]
        assert abs(sig[0] - sig[1]) <= 1e-13 * sig[0]
    grad = cd.conv_norm_gradient(W, grid)
    dec = cd.complex_decompose(cd.frequency_matrix(W, top.conjugate, grid))
    grad_partner = cd.frequency_adjoint(torch.outer(dec.u, dec.v.conj()), top.conjugate, grid, (3, 3))
    torch.testing.assert_close(grad, grad_partner, rtol=1e-10, atol=1e-12)
    A = cd.frequency_matrix(W, top.frequency, grid)
    E = cd.frequency_matrix(D, top.frequency, grid)
    first, tol1, _, _ = fd_derivatives(A, E)
    assert abs(float((grad * D).sum()) - first) <= tol1
    wrong = float((cd.conv_norm_gradient(W, grid, variant="unconjugated") * D).sum())
    assert abs(wrong - first) > 100 * tol1


def symmetric_tied_kernel():
    """A kernel with W[:, :, k1, k2] = W[:, :, k2, k1] on a square grid: sigma_1 at (f1, f2) equals that
    at (f2, f1), a frequency outside the conjugate pair when f1 != f2 and f1 != -f2. Deterministic
    search over seeds for one whose top is such a frequency."""
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
        W = W + W.transpose(-1, -2)
        top = cd.top_frequency(W, (5, 5))
        f1, f2 = top.frequency
        if f1 != f2 and (f1 + f2) % 5 != 0:
            return W
    raise AssertionError("no seed gave an off-diagonal top")


def test_tie_between_non_conjugate_frequencies_flagged_as_kink():
    W = symmetric_tied_kernel()
    grid = (5, 5)
    G = torch.randn(4, *W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(SpectralGapWarning, match="ties with"):
        out = cd.conv_norm_terms(W, G, 0.01, grid)
    assert out.frequency_flagged and out.terms.degenerate and not out.matrix_flagged
    # a real kink: one-sided derivatives along G[0] differ by O(1), not O(h)
    D, h = G[0], 1e-6
    n0 = cd.circular_conv_norm(W, grid)
    right = (cd.circular_conv_norm(W + h * D, grid) - n0) / h
    left = (n0 - cd.circular_conv_norm(W - h * D, grid)) / h
    assert right - left > 1e-3
    # the generic (untied) kernel is not flagged and its one-sided derivatives agree to O(h)
    Wg = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = cd.conv_norm_terms(Wg, G, 0.01, grid)
    assert not out.terms.degenerate
    n0 = cd.circular_conv_norm(Wg, grid)
    right = (cd.circular_conv_norm(Wg + h * D, grid) - n0) / h
    left = (n0 - cd.circular_conv_norm(Wg - h * D, grid)) / h
    assert abs(right - left) < 1e-3


def one_step_residual_slopes(variant_jac="complex", variant_hess="complex"):
    """Slope of log|residual| against log eta of
    ||conv(W - eta G)|| - [||conv(W)|| - eta Jac.G + eta^2/2 q(W_hat_f*(G))] over eta, eta/4."""
    grid = (6, 6)
    W, top = generic_kernel((2, 3, 3, 3), grid)
    G = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    A = cd.frequency_matrix(W, top.frequency, grid)
    E = cd.frequency_matrix(G, top.frequency, grid)
    d = float(cd.complex_decompose(A).gap)
    # every frequency's sigma_1 moves by at most eta ||W_hat_g(G)||_2 (Weyl)
    spread = float(torch.linalg.matrix_norm(torch.fft.fft2(G, s=grid).permute(2, 3, 0, 1), 2).max())
    jac = float((cd.conv_norm_gradient(W, grid, variant=variant_jac) * G).sum())
    q = float(cd.complex_hessian_quadratic_form(A, E, variant=variant_hess))
    n0 = cd.circular_conv_norm(W, grid)
    # eta ||E|| <= d / 20: well inside the radius d / (2 ||E||) of the Taylor series; eta spread <
    # frequency gap / 2: the top frequency cannot change along the step
    eta0 = min(d / (20 * float(torch.linalg.matrix_norm(E, 2))), top.frequency_gap / (4 * spread))
    res = []
    for eta in (eta0, eta0 / 4):
        res.append(abs(cd.circular_conv_norm(W - eta * G, grid) - (n0 - eta * jac + 0.5 * eta**2 * q)))
    return math.log(res[0] / res[1]) / math.log(4), res


def test_one_step_change_of_exact_norm_is_taylor_to_third_order():
    slope, res = one_step_residual_slopes()
    # the cubic term dominates the quartic one by a factor >= 1 / x with x = 2 eta ||E|| / d = 0.1
    # (Cauchy bound of the module doc), so the slope is 3 up to log(1 + 0.1 * k) / log 4
    assert 2.7 <= slope <= 3.3, (slope, res)
    assert res[1] > 1e3 * EPS  # the residual is far above rounding
    for jac_variant, hess_variant, expected in (
        ("unconjugated", "complex", 1.0),
        ("complex", "real_formula", 2.0),
        ("complex", "real_parts", 2.0),
    ):
        wrong, _ = one_step_residual_slopes(jac_variant, hess_variant)
        assert abs(wrong - expected) < 0.3, (jac_variant, hess_variant, wrong)


def test_theorem14_terms_match_finite_differences_of_the_norm():
    """mu = -lr d||conv||[G_mean], phi^2 = lr^2 scale sum_i (d||conv||[E_i])^2, psi = lr^2/2 scale
    sum_i d^2 sigma_1(W_hat_f*)[E_i], each derivative by central differences (tolerances above)."""
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=gen)
    G = torch.randn(5, 2, 3, 3, 3, dtype=torch.float64, generator=gen)
    grid, lr, b = (5, 5), 0.05, 5
    out = cd.conv_norm_terms(W, G, lr, grid)
    A = cd.frequency_matrix(W, out.top.frequency, grid)
    scale = 1 / (b * (b - 1))
    firsts, seconds, tol_phi, tol_psi = [], [], 0.0, 0.0
    for Gi in G - G.mean(0):
        first, tol1, second, tol2 = fd_derivatives(A, cd.frequency_matrix(Gi, out.top.frequency, grid))
        firsts.append(first)
        seconds.append(second)
        tol_phi += 2 * abs(first) * tol1 + tol1**2
        tol_psi += tol2
    mean_first, mean_tol, _, _ = fd_derivatives(A, cd.frequency_matrix(G.mean(0), out.top.frequency, grid))
    assert abs(out.terms.mu - (-lr * mean_first)) <= lr * mean_tol
    assert abs(out.terms.phi**2 - lr**2 * scale * sum(f * f for f in firsts)) <= lr**2 * scale * tol_phi
    assert abs(out.terms.psi - 0.5 * lr**2 * scale * sum(seconds)) <= 0.5 * lr**2 * scale * tol_psi


def test_self_conjugate_top_mirrors_layer_terms():
    """At f* = (0, 0), W_hat_0 = sum_k W[:, :, k] is real: the terms must be exactly
    lipverify.dynamics.layer_terms of that matrix with the mapped per-sample gradients (same 1/b
    conventions, same centring)."""
    gen = torch.Generator().manual_seed(9)
    W = 1.0 + 0.3 * torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=gen)  # DC dominates
    G = torch.randn(6, 3, 2, 3, 3, dtype=torch.float64, generator=gen)
    grid = (5, 5)
    out = cd.conv_norm_terms(W, G, 0.1, grid, population_size=60)
    assert out.top.frequency == (0, 0) and out.top.self_conjugate
    ref = layer_terms(W.sum((-2, -1)), G.sum((-2, -1)), 0.1, population_size=60)
    for key in ("sigma", "mu", "phi", "psi"):
        assert math.isclose(getattr(out.terms, key), getattr(ref, key), rel_tol=1e-10), key


def test_bad_inputs_are_refused_with_clear_errors():
    W = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    G = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(LipverifyError, match="b >= 2"):
        cd.conv_norm_terms(W, G[:1], 0.1, (5, 5))
    with pytest.raises(LipverifyError, match="shape mismatch"):
        cd.conv_norm_terms(W, G[:, :, :2], 0.1, (5, 5))
    with pytest.raises(LipverifyError, match="larger than the grid"):
        cd.conv_norm_terms(W, G, 0.1, (2, 5))
    with pytest.raises(LipverifyError, match="learning rate"):
        cd.conv_norm_terms(W, G, float("nan"), (5, 5))
    with pytest.raises(LipverifyError, match="grid"):
        cd.conv_norm_terms(W, G, 0.1, (5,))
    with pytest.raises(LipverifyError, match="identically zero"):
        cd.conv_norm_terms(torch.zeros_like(W), G, 0.1, (5, 5))
    with pytest.raises(LipverifyError, match="mean_grad"):
        cd.conv_norm_terms(W, G, 0.1, (5, 5), mean_grad=torch.full_like(W, float("nan")))
    bad = G.clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(LipverifyError, match="non-finite"):
        cd.conv_norm_terms(W, bad, 0.1, (5, 5))


def one_step_monte_carlo(draws: int = 4000, hessian_variant: str = "complex"):
    """SGD steps W - eta g_B (b = 4 draws with replacement from a fixed population of N = 40 per-sample
    gradients) on a tiny conv; returns the observed changes of ||conv|| and the predictions."""
    grid, b, N = (5, 5), 4, 40
    W, top = generic_kernel((2, 3, 3, 3), grid, min_relative_frequency_gap=0.1)
    gen = torch.Generator().manual_seed(21)
    population = 0.5 * torch.randn(1, *W.shape, dtype=torch.float64, generator=gen) + torch.randn(
        N, *W.shape, dtype=torch.float64, generator=gen
    )
    A = cd.frequency_matrix(W, top.frequency, grid)
    d = float(cd.complex_decompose(A).gap)
    spread = float(
        torch.linalg.matrix_norm(torch.fft.fft2(population, s=grid).permute(0, 3, 4, 1, 2), 2).max()
    )
    eta = min(0.01 * d, 0.25 * top.frequency_gap) / spread  # ||W_hat_g(g_B)|| <= spread for every draw
    # Proposition 5 on the whole population estimates C / (N - 1)... with scale 1 / (N (N - 1)); the
    # batch noise of b draws with replacement is Sigma = C / b, C = (1/N) sum (g_i - g)(g_i - g)^T, so
    # psi and phi^2 of Sigma are the population estimate's times (N - 1) / b
    out = cd.conv_norm_terms(W, population, eta, grid)
    factor = (N - 1) / b
    E_mean = cd.frequency_matrix(population.mean(0), top.frequency, grid)
    centred = cd.frequency_matrix(population - population.mean(0), top.frequency, grid)
    q_noise = cd.complex_hessian_quadratic_form(A, centred, variant=hessian_variant)
    psi = 0.5 * eta**2 * float(q_noise.sum()) / (b * N)
    deterministic = (
        0.5 * eta**2 * float(cd.complex_hessian_quadratic_form(A, E_mean, variant=hessian_variant))
    )
    idx = torch.randint(0, N, (draws, b), generator=torch.Generator().manual_seed(22))
    g_B = population[idx].mean(1)  # (draws, c_out, c_in, kh, kw)
    n0 = cd.circular_conv_norm(W, grid)
    norms = torch.linalg.svdvals(torch.fft.fft2(W - eta * g_B, s=grid).permute(0, 3, 4, 1, 2))[..., 0]
    change = norms.flatten(1).max(1).values - n0
    grad = cd.conv_norm_gradient(W, grid)
    linear = -eta * (g_B * grad).sum((1, 2, 3, 4))
    E_B = cd.frequency_matrix(g_B, top.frequency, grid)
    x = 2 * eta * torch.linalg.matrix_norm(E_B, 2) / d
    cubic_bound = float(((d / 2) * x**3 / (1 - x)).mean())  # Cauchy bound of the module doc, per draw
    return dict(
        change=change,
        linear=linear,
        mu=out.terms.mu,
        psi=psi,
        psi_kernel=out.terms.psi * factor,
        phi_sq=out.terms.phi**2 * factor,
        deterministic=deterministic,
        cubic_bound=cubic_bound,
    )


def test_one_step_monte_carlo_mean_and_variance_of_the_exact_norm():
    """E[Delta||conv||] = mu + psi + eta^2/2 q(grad L) + O(eta^3) and Var[Delta||conv||] = phi^2 + O(eta^3)
    over 4000 mini-batches. The mean is tested on the control variate Delta - (linear term), whose
    expectation is exactly Delta's minus mu (E g_B = grad L); tolerance 4 standard errors plus the
    cubic Taylor bound. The variance: 4 standard errors of the sample variance (from the sample's
    fourth moment) plus twice the cubic bound times the change's scale."""
    mc = one_step_monte_carlo()
    draws = mc["change"].numel()
    assert math.isclose(mc["psi_kernel"], mc["psi"], rel_tol=1e-10)  # the kernel's 1/b convention
    residual = mc["change"] - mc["linear"]
    assert abs(float(mc["linear"].mean()) - mc["mu"]) <= 4 * float(mc["linear"].std()) / math.sqrt(draws)
    stderr = float(residual.std()) / math.sqrt(draws)
    predicted = mc["psi"] + mc["deterministic"]
    assert abs(float(residual.mean()) - predicted) <= 4 * stderr + mc["cubic_bound"]
    assert mc["psi"] > 5 * (4 * stderr + mc["cubic_bound"])  # psi itself is resolved
    centred = mc["change"] - mc["change"].mean()
    var, m4 = float((centred**2).mean()), float((centred**4).mean())
    scale = float(mc["change"].abs().max())
    assert abs(var - mc["phi_sq"]) <= 4 * math.sqrt((m4 - var**2) / draws) + 2 * mc["cubic_bound"] * scale
    # wrong variants rejected by the same checks: the real-formula Hessian in psi, a 1/b^2 noise scale
    wrong = one_step_monte_carlo(hessian_variant="real_formula")
    wrong_residual = wrong["change"] - wrong["linear"]
    assert (
        abs(float(wrong_residual.mean()) - (wrong["psi"] + wrong["deterministic"]))
        > 4 * stderr + mc["cubic_bound"]
    )
    assert abs(var - mc["phi_sq"] / 4) > 4 * math.sqrt((m4 - var**2) / draws) + 2 * mc["cubic_bound"] * scale
