"""Problems: closed forms, Euler-chain moments, and the matrix SGD-SDE against the numeric core."""

from __future__ import annotations

import math

import pytest
import torch

from lipverify.dynamics import layer_terms, network_terms
from lipverify.noise import batch_noise_covariance
from lipverify.problems import (
    LeastSquares,
    LognormalBound,
    MatrixSGDSDE,
    OrnsteinUhlenbeck,
    TwoLayerSGDSDE,
)
from lipverify.spectral import SpectralDecomposition, decompose, quadratic_form_from_projections


def test_lognormal_analytic_integrals_match_quadrature():
    p = LognormalBound.example(batch_size=3.0)
    q = LognormalBound(p.a, p.b, 1.0)  # antiderivatives by scipy quad
    for t in (0.0, 0.3, 1.0, 2.7):
        assert p.int_a(t) == pytest.approx(q.int_a(t), abs=1e-11)
        assert p.int_b2(t) == pytest.approx(q.int_b2(t), abs=1e-11)


def test_lognormal_euler_moments_converge_to_theorem17_at_first_order():
    """Euler chain moments -> closed form with error O(h): halving h halves the error (ratio 2 +- 10%)."""
    p = LognormalBound.example()
    errs = []
    for steps in (256, 512, 1024):
        m, v = p.euler_moments(1.0 / steps, steps)
        errs.append((abs(m - p.mean(1.0)), abs(v - p.variance(1.0))))
    for i in range(2):
        assert errs[i][0] / errs[i + 1][0] == pytest.approx(2.0, rel=0.1)
        assert errs[i][1] / errs[i + 1][1] == pytest.approx(2.0, rel=0.1)


def test_lognormal_exact_solution_with_constant_coefficients():
    a, b = 0.2, 0.6
    p = LognormalBound(lambda t: a, lambda t: b, 2.0, int_a=lambda t: a * t, int_b2=lambda t: b * b * t)
    dB = torch.randn(10, 4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    expected = 2.0 * torch.exp((a - b * b / 2) * 0.1 * 10 + b * dB.sum(0))
    torch.testing.assert_close(p.exact(dB, 0.1), expected)
    assert p.variance(1.0) == pytest.approx(p.mean(1.0) ** 2 * math.expm1(b * b))
    assert p.log_mean(1.0) == pytest.approx(math.log(2.0) + a - b * b / 2)


def test_ou_euler_moments_converge():
    p = OrnsteinUhlenbeck()
    m, v = p.euler_moments(1e-5, 200000)
    assert m == pytest.approx(p.mean(2.0), rel=1e-4)
    assert v == pytest.approx(p.variance(2.0), rel=1e-4)


def test_bad_parameters_are_refused():
    from lipverify._validation import LipverifyError

    with pytest.raises(LipverifyError, match="K0"):
        LognormalBound(lambda t: 0.0, lambda t: 1.0, k0=-1.0)
    with pytest.raises(LipverifyError, match="theta"):
        OrnsteinUhlenbeck(theta=0.0)
    with pytest.raises(LipverifyError, match="lr"):
        MatrixSGDSDE(LeastSquares.random(), 0.0, 2)
    # the two-layer SDE had no check (batch_size = 0: ZeroDivisionError; lr <= 0 accepted)
    for lr, b in ((0.1, 0), (0.0, 2), (float("nan"), 2), (0.1, 2.5)):
        with pytest.raises(LipverifyError, match="batch_size >= 1"):
            MatrixSGDSDE(LeastSquares.random(), lr, b)
        with pytest.raises(LipverifyError, match="batch_size >= 1"):
            TwoLayerSGDSDE(LeastSquares.random(), 3, lr, b)


@pytest.fixture
def setting():
    pb = LeastSquares.random(3, 4, 20, seed=0, noise=1.0)
    W = torch.randn(3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return pb, W


def test_least_squares_gradient_matches_autograd(setting):
    pb, W = setting
    Wr = W[0].clone().requires_grad_(True)
    loss = 0.5 * ((pb.X @ Wr.T - pb.Y) ** 2).sum(1).mean()
    loss.backward()
    torch.testing.assert_close(pb.gradient(W[0]), Wr.grad)
    torch.testing.assert_close(pb.per_sample_grads(W[0]).mean(0), Wr.grad)


def test_layer_quantities_match_the_numeric_core(setting):
    """problems.layer_quantities (batched) == dynamics.layer_terms per path.

    The core uses the Proposition 5 scale 1/(N(N-1)) with b = N; the population noise C/b has
    scale 1/(N b), so the core's lr is rescaled by sqrt(N(N-1)/(N b)) for psi and phi."""
    pb, W = setting
    lr, b, N = 0.1, 4, pb.size
    q = MatrixSGDSDE(pb, lr, b).terms(W.reshape(3, -1))
    lr_core = lr * math.sqrt(N * (N - 1) / (N * b))
    for p in range(3):
        core = layer_terms(W[p], pb.per_sample_grads(W[p]), lr_core, mean_grad=pb.gradient(W[p]))
        assert float(q.psi[p]) == pytest.approx(core.psi, rel=1e-12)
        assert float(q.phi_sq[p]) == pytest.approx(core.phi**2, rel=1e-12)
        assert float(q.mu[p]) == pytest.approx(core.mu * lr / lr_core, rel=1e-12)
        assert float(q.sigma[p]) == pytest.approx(core.sigma, rel=1e-12)


def test_batched_quadratic_form_matches_core(setting):
    """One call over a batch of decompositions (one per path) equals per-path calls."""
    _, W = setting
    E = torch.randn(3, 5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    u, v = U[..., 0], Vh[..., 0, :]
    y = torch.einsum("pbij,pi->pbj", E, u)
    x = torch.einsum("pbij,pj->pbi", E, v)
    q = quadratic_form_from_projections(SpectralDecomposition(U=U, sigma=S, V=Vh.transpose(-1, -2)), y, x)
    for p in range(3):
        dec = decompose(W[p])
        yy = torch.einsum("bij,i->bj", E[p], dec.u)
        xx = torch.einsum("bij,j->bi", E[p], dec.v)
        torch.testing.assert_close(q[p], quadratic_form_from_projections(dec, yy, xx))


def test_matrix_sde_diffusion_squares_to_the_population_noise(setting):
    """D D^T = eta^2 C / b, C = (1/N) sum E_i E_i^T (row-major vec here, column-major in the core)."""
    pb, W = setting
    lr, b, N = 0.2, 3, pb.size
    sde = MatrixSGDSDE(pb, lr, b)
    x = W.reshape(3, -1)
    D = sde.diffusion(0.0, x)[0]
    m, n = 3, 4
    perm = torch.arange(m * n).reshape(n, m).T.reshape(-1)  # row-major index -> column-major index
    Sigma_core = batch_noise_covariance(pb.per_sample_grads(W[0]))[perm][:, perm]  # scale 1/(N(N-1))
    torch.testing.assert_close(D @ D.T, lr**2 * Sigma_core * (N * (N - 1)) / (N * b))
    dB = torch.randn(3, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        sde.diffusion_apply(0.0, x, dB), torch.einsum("pdk,pk->pd", sde.diffusion(0.0, x), dB)
    )
    torch.testing.assert_close(sde.drift(0.0, x), -lr * pb.gradient(W).reshape(3, -1))


def test_two_layer_sde_against_autograd_and_core():
    pb = LeastSquares.random(3, 4, 20, seed=0, noise=1.0)
    lr, b, N = 0.1, 4, pb.size
    sde = TwoLayerSGDSDE(pb, 5, lr, b)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, sde.state_dim, dtype=torch.float64, generator=g)
    xx = x[:1].clone().requires_grad_(True)
    W1, W2 = sde.split(xx)
    loss = 0.5 * ((pb.X @ (W2[0] @ W1[0]).T - pb.Y) ** 2).sum(1).mean()
    loss.backward()
    torch.testing.assert_close(sde.drift(0.0, x[:1]), -lr * xx.grad)
    dB = torch.randn(2, N, dtype=torch.float64, generator=g)
    torch.testing.assert_close(
        sde.diffusion_apply(0.0, x, dB), torch.einsum("pdk,pk->pd", sde.diffusion(0.0, x), dB)
    )
    # network terms incl. the cross-layer diagnostic, against dynamics.network_terms
    q = sde.terms(x)
    W1, W2 = sde.split(x)
    lr_core = lr * math.sqrt(N * (N - 1) / (N * b))
    for p in range(2):
        r = pb.X @ (W2[p] @ W1[p]).T - pb.Y
        G1 = (r @ W2[p]).unsqueeze(-1) * pb.X.unsqueeze(-2)
        G2 = r.unsqueeze(-1) * (pb.X @ W1[p].T).unsqueeze(-2)
        t1 = layer_terms(W1[p], G1, lr_core, mean_grad=G1.mean(0))
        t2 = layer_terms(W2[p], G2, lr_core, mean_grad=G2.mean(0))
        net = network_terms([t1, t2])
        assert float(q.psi[p]) == pytest.approx(net.psi, rel=1e-12)
        assert float(q.phi_sq[p]) == pytest.approx(net.phi_sq, rel=1e-12)
        assert float(q.phi_sq_cross[p]) == pytest.approx(net.phi_sq_cross, rel=1e-9, abs=1e-15)
        assert float(q.log_bound[p]) == pytest.approx(net.log_bound, rel=1e-12)
