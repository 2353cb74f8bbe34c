"""The probe's scipy kernels (lipverify/_linalg.py) against the torch operations they replace."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipverify import _linalg


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _both_routes(fn):
    """``fn()`` through scipy (torch on one thread) and through torch (the reference route)."""
    with _threads(1):
        fast = fn()
    with _threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(_linalg, "_scipy", lambda t: None)
        ref = fn()
    return fast, ref


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 30),
    n=st.integers(2, 30),
    p=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_torch(m, n, p, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
    k = min(m, n)
    Z = torch.randn(k, p, generator=g, dtype=torch.float64).to(dtype)
    w = torch.nn.functional.normalize(torch.randn(k, generator=g, dtype=torch.float64), dim=0).to(dtype)
    eps = torch.finfo(dtype).eps
    scale = float(torch.linalg.matrix_norm(W.double(), 2)) ** 2  # |G|_2

    def run():
        G = _linalg.gram(W)
        Gs = torch.tril(G) + torch.tril(G, -1).T  # the lower triangle carries G
        shift = 1.5 * scale
        L = _linalg.shifted_cholesky(G, shift, w, 0.25 * scale)
        return (
            Gs,
            _linalg.sym_matmul(G, Z),
            torch.tril(L),
            _linalg.cholesky_solve(L, Z),
            _linalg.solve_lower(L, Z),
            _linalg.shifted_cholesky(G, 0.5 * scale),  # below lambda_max: not positive definite
        )

    fast, ref = _both_routes(run)
    assert fast[5] is None and ref[5] is None
    # backward-stable kernels: errors ~ (inner dimension) eps |G|; the solves against the condition
    # number of 1.5 |G| I - G + ..., at most ~3 |G| / (0.5 |G|) = 6
    tol = 50 * max(m, n) * eps
    for a, b in zip(fast[:5], ref[:5], strict=True):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert float((a - b).abs().max()) <= tol * max(scale, 1.0) * max(1.0, float(b.abs().max()))
    expected = W @ W.T if m <= n else W.T @ W
    assert torch.allclose(fast[0], expected, rtol=0, atol=tol * scale)


def test_single_threaded_blas_limits_and_restores():
    from threadpoolctl import threadpool_info

    def openblas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"]

    before = openblas_threads()
    with _linalg.single_threaded_blas():
        assert set(openblas_threads()) <= {1}
        with _linalg.single_threaded_blas():  # re-entrant
            assert set(openblas_threads()) <= {1}
        assert set(openblas_threads()) <= {1}
    assert openblas_threads() == before


def test_scipy_route_only_on_one_cpu_thread():
    x = torch.zeros(3, 3)
    with _threads(1):
        assert _linalg._scipy(x) == "s" and _linalg._scipy(x.double()) == "d"
        assert _linalg._scipy(x.half()) is None
    with _threads(2):
        assert _linalg._scipy(x) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solves_read_the_lower_triangle_only(dtype):
    # shifted_cholesky leaves LAPACK workspace in the upper triangle (clean=0): a solve that read it
    # would turn these NaNs into NaN results
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 60, generator=g, dtype=torch.float64).to(dtype)
    Z = torch.randn(40, 3, generator=g, dtype=torch.float64).to(dtype)
    with _threads(1):
        G = _linalg.gram(W)
        L = _linalg.shifted_cholesky(G, 2 * float(torch.linalg.matrix_norm(W.double(), 2)) ** 2)
        clean = torch.tril(L)
        poisoned = clean + torch.triu(torch.full_like(L, float("nan")), 1)
        for solve in (_linalg.solve_lower, _linalg.cholesky_solve):
            got, want = solve(poisoned, Z), solve(clean, Z)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=0, atol=0)
