"""top_hessian_eigenvalue (HVP power iteration) against a dense Hessian on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lipverify import LipverifyError
from lipverify.sharpness import _power, hessian_vector_product, top_hessian_eigenvalue


def _tiny_model(d_in, hidden, classes, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
    ).double()


def _data(n, d_in, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g)


def _dense_hessian(model, x, y):
    """The slow reference: torch.autograd.functional.hessian of the loss in the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            params[n] = theta[i : i + k].reshape(s)
            i += k
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat)


def _gauss_newton(model, x, y):
    """The wrong variant: J^T H_out J only (drops the second derivatives of the network)."""
    params = list(model.parameters())
    out = model(x)
    p = out.softmax(1).detach()
    rows = []
    for i in range(out.shape[0]):
        J = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, c], params, retain_graph=True)])
                for c in range(out.shape[1])
            ]
        )
        H_out = torch.diag(p[i]) - torch.outer(p[i], p[i])
        rows.append(J.T @ H_out @ J)
    return sum(rows) / out.shape[0]


def _agrees(estimate, result_residual, dense):
    """lambda_max of the dense Hessian within the residual bound (Rayleigh quotient of a symmetric
    matrix is within ||H v - rho v|| of an eigenvalue) plus float64 rounding of the products."""
    lam = torch.linalg.eigvalsh(dense)
    scale = float(lam.abs().max())
    return abs(estimate - float(lam[-1])) <= result_residual + 1e-9 * scale


@settings(max_examples=12, deadline=None)
@given(
    d_in=st.integers(1, 4),
    hidden=st.integers(1, 4),
    classes=st.integers(2, 3),
    n=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_power_iteration_matches_the_dense_hessian(d_in, hidden, classes, n, seed):
    model = _tiny_model(d_in, hidden, classes, seed)
    x, y = _data(n, d_in, classes, seed)
    dense = _dense_hessian(model, x, y)
    lam = torch.linalg.eigvalsh(dense)
    scale = float(lam.abs().max())
    mags = lam.abs().sort(descending=True).values
    # power iteration converges like (|lambda_2| / |lambda_1|)^k, the shifted phase like the gap
    # below lambda_max: spectra without both gaps (1e-3 relative) take too long for a test
    assume(scale > 0 and len(lam) > 1)
    assume(float(mags[0] - mags[1]) > 1e-3 * scale and float(lam[-1] - lam[-2]) > 1e-3 * scale)
    res = top_hessian_eigenvalue(
        lambda: F.cross_entropy(model(x), y), list(model.parameters()), max_iterations=20_000, tol=1e-12
    )
    assert res.converged, (res, lam)
    assert _agrees(res.eigenvalue, res.residual, dense), (res.eigenvalue, lam)


def test_gauss_newton_variant_is_rejected():
    # a two-layer tanh net: the network's second derivatives make H differ from J^T H_out J
    model = _tiny_model(3, 4, 3, seed=1)
    x, y = _data(5, 3, 3, seed=1)
    dense = _dense_hessian(model, x, y)
    res = top_hessian_eigenvalue(
        lambda: F.cross_entropy(model(x), y), list(model.parameters()), max_iterations=20_000, tol=1e-12
    )
    assert _agrees(res.eigenvalue, res.residual, dense)
    gn_top = float(torch.linalg.eigvalsh(_gauss_newton(model, x, y))[-1])
    assert not _agrees(gn_top, res.residual, dense), (gn_top, res.eigenvalue)


def _quadratic(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T
    theta = torch.randn(len(eigenvalues), generator=g, dtype=torch.float64, requires_grad=True)
    return A, theta, (lambda: 0.5 * theta @ A @ theta)


def test_negative_dominant_eigenvalue_is_shifted_to_the_largest_algebraic():
    # SGD stability needs the largest *positive* curvature (2); magnitude-dominant is -5
    A, theta, loss = _quadratic([-5.0, 1.0, 2.0])
    res = top_hessian_eigenvalue(loss, [theta], max_iterations=10_000, tol=1e-12)
    assert res.shifted and res.converged
    assert abs(res.eigenvalue - 2.0) <= res.residual + 1e-12
    assert _agrees(res.eigenvalue, res.residual, A)
    # the wrong variant: the magnitude-dominant eigenvalue (one power iteration, no shift)
    v0 = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rho, _, _, resid = _power(hessian_vector_product(loss, [theta]), v0, 10_000, 1e-12)
    assert abs(rho + 5.0) < 1e-9 and not _agrees(rho, resid, A)


def test_positive_dominant_needs_no_shift_and_warm_start_converges_at_once():
    _a, theta, loss = _quadratic([0.5, -1.0, 3.0, 2.0])
    res = top_hessian_eigenvalue(loss, [theta], max_iterations=10_000, tol=1e-12)
    assert not res.shifted and abs(res.eigenvalue - 3.0) < 1e-9
    warm = top_hessian_eigenvalue(loss, [theta], v0=res.vector, max_iterations=10_000, tol=1e-10)
    assert warm.iterations == 1 and abs(warm.eigenvalue - 3.0) < 1e-9


def test_float32_parameters_run_in_float32():
    A, theta, _unused = _quadratic([1.0, 4.0])
    t32 = theta.detach().float().requires_grad_(True)
    res = top_hessian_eigenvalue(lambda: 0.5 * t32 @ A.float() @ t32, [t32], max_iterations=1000, tol=1e-5)
    assert res.vector.dtype == torch.float32 and abs(res.eigenvalue - 4.0) < 1e-4


def test_bad_inputs_are_named():
    _, theta, loss = _quadratic([1.0, 2.0])
    with pytest.raises(LipverifyError, match="v0 has shape"):
        top_hessian_eigenvalue(loss, [theta], v0=torch.ones(3, dtype=torch.float64))
    with pytest.raises(LipverifyError, match="non-zero"):
        top_hessian_eigenvalue(loss, [theta], v0=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(LipverifyError, match="scalar"):
        top_hessian_eigenvalue(lambda: theta * 2, [theta])
    with pytest.raises(LipverifyError, match="not finite"):
        top_hessian_eigenvalue(lambda: 0.5 * (theta * 1e300) @ (theta * 1e300), [theta])
