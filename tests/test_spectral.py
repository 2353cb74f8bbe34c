"""Lemmas 12-13, tr H and the eigenvalues of H: fast kernels against float64 references.

Shapes (m < n, m > n, m = n, 1 x n, m x 1) and singular values (hence the gap) are drawn by
Hypothesis; matrices are built as ``U diag(s) V^T`` so the gap is exact. Every tolerance comes
from the error model documented in :mod:`lipverify.checks.numeric` (finite-difference truncation
from Cauchy bounds on the derivatives of sigma_1, rounding from a backward-stable SVD).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lipverify import _reference as ref
from lipverify._validation import DegenerateSpectrumError
from lipverify.checks.numeric import (
    dense_hessian_tolerance,
    derivative_bound,
    gradient_step_and_tolerance,
    hessian_step_and_tolerance,
    sigma_evaluation_error,
)
from lipverify.spectral import (
    SpectralDecomposition,
    SpectralGapWarning,
    decompose,
    gap_tolerance_for,
    hessian,
    hessian_quadratic_form,
    hessian_trace,
    hessian_trace_from_spectrum,
    jacobian,
    quadratic_form_from_projections,
    separation_tolerance,
    spectral_gap,
    top_singular,
)

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


@st.composite
def matrices(draw, max_dim: int = 6, min_relative_gap: float = 0.02):
    """(W float64 (m, n), singular values list, gap) with exact singular values.

    sigma_1 in [0.5, 5]; relative gap sigma_1 - sigma_2 in [min_relative_gap, 0.9] sigma_1 (log-uniform);
    the remaining singular values uniform in [0, sigma_2], sometimes exactly 0 (rank-deficient).
    """
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    r = min(m, n)
    sigma1 = draw(st.floats(0.5, 5.0))
    log_gap = draw(st.floats(math.log(min_relative_gap), math.log(0.9)))
    sigma2 = sigma1 * (1 - math.exp(log_gap))
    rest = [draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))) * sigma2 for _ in range(max(r - 2, 0))]
    values = [sigma1] + ([sigma2] if r >= 2 else []) + sorted(rest, reverse=True)
    seed = draw(st.integers(0, 2**31 - 1))
    W = ref.matrix_with_singular_values(values, m, n, torch.Generator().manual_seed(seed))
    gap = sigma1 - (values[1] if r >= 2 else 0.0)
    return W, values, gap


def distinct(values: list[float]) -> bool:
    """torch's SVD backward divides by s_i^2 - s_j^2 for every pair and by s_i for the complement of
    a non-square thin SVD: the autograd reference is only usable (finite) for distinct, non-zero
    singular values; the dilation reference has no such restriction."""
    separated = all(abs(a - b) > 1e-6 * values[0] for i, a in enumerate(values) for b in values[i + 1 :])
    return separated and min(values) > 1e-6 * values[0]


def directions(W: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` Gaussian directions with ||E||_F = 1, float64, shape (count, m, n)."""
    E = torch.randn(count, *W.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return E / torch.linalg.matrix_norm(E)[:, None, None]


# --------------------------------------------------------------------------- Lemma 12


@given(matrices())
def test_top_singular_vectors_and_gap(case):
    W, values, gap = case
    sigma, u, v = top_singular(W)
    e_sigma = sigma_evaluation_error(*W.shape, values[0])
    assert abs(float(sigma) - values[0]) <= e_sigma
    assert torch.allclose(W @ v, sigma * u, rtol=0, atol=4 * e_sigma)
    assert abs(float(spectral_gap(W)) - gap) <= 2 * e_sigma


@given(matrices())
def test_jacobian_matches_central_differences(case):
    W, values, gap = case
    m, n = W.shape
    h, tol = gradient_step_and_tolerance(m, n, values[0], gap)
    fd = ref.gradient_finite_difference(W, h)
    assert float((jacobian(W) - fd).abs().max()) <= tol


@given(matrices())
def test_jacobian_matches_autograd(case):
    W, values, gap = case
    tol = 2 * derivative_bound(2, 1.0, gap) * sigma_evaluation_error(*W.shape, values[0])
    assume(distinct(values))
    assert float((jacobian(W) - ref.jacobian_autograd(W)).abs().max()) <= tol


# --------------------------------------------------------------------------- Lemma 13


@pytest.mark.parametrize("method", ["svd", "resolvent"])
@given(case=matrices(), seed=st.integers(0, 10_000))
def test_quadratic_form_matches_second_differences(method, case, seed):
    W, values, gap = case
    m, n = W.shape
    E = directions(W, 3, seed)
    s = float(torch.linalg.matrix_norm(E, 2).max())
    h, tol = hessian_step_and_tolerance(m, n, values[0], gap, s, 1.0)
    fd = ref.quadratic_form_finite_difference(W, E, h)
    assert float((hessian_quadratic_form(W, E, method=method) - fd).abs().max()) <= tol


@given(case=matrices(min_relative_gap=1e-3), seed=st.integers(0, 10_000))
def test_quadratic_form_methods_agree_with_dense_references(case, seed):
    """svd, resolvent, dense ``hessian``, autograd Hessian and the dilation Hessian agree to
    ``2 sup|f'''| eps_sigma ||E||_F^2`` (two perturbed computations); gaps down to 1e-3 sigma_1."""
    W, values, gap = case
    m, n = W.shape
    E = directions(W, 4, seed)
    tol = dense_hessian_tolerance(m, n, values[0], gap)
    q_dense = ref.hessian_quadratic_form_dense(W, E)
    candidates = [
        hessian_quadratic_form(W, E, method="svd"),
        hessian_quadratic_form(W, E, method="resolvent"),
        ref.quadratic_form_dense(hessian(W), E),
    ]
    if distinct(values):
        candidates.append(ref.quadratic_form_dense(ref.hessian_autograd(W), E))
    for q in candidates:
        assert float((q - q_dense).abs().max()) <= tol


@given(matrices())
def test_dense_hessian_matches_references(case):
    W, values, gap = case
    m, n = W.shape
    tol = dense_hessian_tolerance(m, n, values[0], gap)
    H = hessian(W)
    if distinct(values):
        assert torch.linalg.matrix_norm(H - ref.hessian_autograd(W), 2) <= tol
    assert torch.linalg.matrix_norm(H - ref.hessian_dilation(W), 2) <= tol
    assert torch.equal(H, H.T) or torch.linalg.matrix_norm(H - H.T, 2) <= tol


@given(matrices())
def test_hessian_eigenvalues_and_null_direction(case):
    """eig H = {1/(s1 - s_k), 1/(s1 + s_k)}, 1/s1 (m + n - 2r times), 0 otherwise; H (v kron u) = 0."""
    W, values, gap = case
    m, n = W.shape
    tol = dense_hessian_tolerance(m, n, values[0], gap)
    H = hessian(W)
    predicted = ref.hessian_eigenvalues_predicted(torch.tensor(values, dtype=F64), m, n)
    assert float((torch.linalg.eigvalsh(H) - predicted).abs().max()) <= tol
    _, u, v = top_singular(W)
    assert float((H @ torch.kron(v, u)).abs().max()) <= tol


@given(matrices())
def test_hessian_trace_matches_dense_trace(case):
    W, values, gap = case
    m, n = W.shape
    tol = m * n * dense_hessian_tolerance(m, n, values[0], gap)
    trace = float(hessian_trace(W))
    assert abs(trace - float(ref.hessian_trace_dense(W))) <= tol
    if distinct(values):
        assert abs(trace - float(torch.trace(ref.hessian_autograd(W)))) <= tol


def test_one_by_one_matrix():
    """1 x 1: sigma_1 = |w|, J = sign(w), H = 0 (no k >= 2, m + n - 2r = 0)."""
    W = torch.tensor([[-2.5]], dtype=F64)
    assert float(top_singular(W)[0]) == 2.5
    assert float(jacobian(W)) == -1.0
    assert float(hessian_trace(W)) == 0.0
    assert float(hessian_quadratic_form(W, torch.ones(1, 1, dtype=F64))) == 0.0


def test_batched_directions_keep_leading_shape():
    W = ref.matrix_with_singular_values([3.0, 2.0, 1.0], 3, 5, torch.Generator().manual_seed(0))
    E = torch.randn(2, 4, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    for method in ("svd", "resolvent"):
        q = hessian_quadratic_form(W, E, method=method)
        assert q.shape == (2, 4)
        assert torch.allclose(q[1, 2], hessian_quadratic_form(W, E[1, 2], method=method), rtol=1e-12)


# --------------------------------------------------------------------------- gaps and degeneracy


def _near_degenerate(relative_gap: float, m: int = 4, n: int = 5) -> torch.Tensor:
    return ref.matrix_with_singular_values(
        [2.0, 2.0 * (1 - relative_gap), 1.0, 0.5][: min(m, n)], m, n, torch.Generator().manual_seed(3)
    )


def test_small_gap_warns_and_stays_finite():
    """Relative gap 1e-9 (below DEFAULT_GAP_TOLERANCE = 1e-6): SpectralGapWarning, finite values."""
    W = _near_degenerate(1e-9)
    E = directions(W, 2, 0)
    for call in (
        lambda: hessian_quadratic_form(W, E, method="svd"),
        lambda: hessian_quadratic_form(W, E, method="resolvent"),
        lambda: hessian_trace(W),
        lambda: hessian(W),
        lambda: jacobian(W),
    ):
        with pytest.warns(SpectralGapWarning, match="relative spectral gap"):
            out = call()
        assert bool(torch.isfinite(out).all())
    assert 0 < float(spectral_gap(W)) < 1e-7
    assert float(decompose(W).relative_gap) < 1e-6


def test_comfortable_gap_does_not_warn():
    W = _near_degenerate(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralGapWarning)
        hessian_quadratic_form(W, directions(W, 2, 0))
        hessian_trace(W)
        jacobian(W)


def test_equal_top_singular_values_raise():
    """sigma_1 = sigma_2 exactly: Assumption 11 fails, a clear error instead of inf."""
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64))
    for call in (
        lambda: hessian_quadratic_form(W, torch.ones(3, 3, dtype=F64)),
        lambda: hessian_trace(W),
        lambda: hessian(W),
        lambda: jacobian(W),
        # the decomposition's own methods and the spectrum-level helpers too (they returned inf)
        lambda: decompose(W).hessian_trace(),
        lambda: decompose(W).quadratic_form(torch.ones(3, dtype=F64), torch.ones(3, dtype=F64)),
        lambda: hessian_trace_from_spectrum(torch.tensor([2.0, 2.0, 1.0], dtype=F64), 3, 3),
    ):
        with pytest.raises(DegenerateSpectrumError, match=r"not differentiable|Assumption 11"):
            call()


def test_equal_top_singular_values_raise_whichever_way_they_round():
    """sigma_1 = sigma_2 exactly, but rotated: the computed values tie or differ by a few ulps
    depending on the kernel (0 to several ulps), so sigma_1 > sigma_2 decided
    degeneracy by a coin flip. Decided against separation_tolerance (8 sqrt(r) eps) instead: every rotation
    raises; a gap 8x that tolerance (far above any rounding) only warns."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        Q = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=gen))[0]
        W = Q @ torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64)) @ Q.T
        with pytest.raises(DegenerateSpectrumError, match="Assumption 11"):
            hessian_trace(W)
    # a computed spectrum one ulp apart, and a batch with one such entry
    one_ulp = torch.tensor([2.0, 2.0 - 4.440892098500626e-16, 1.0], dtype=F64)
    with pytest.raises(DegenerateSpectrumError, match="Assumption 11"):
        hessian_trace_from_spectrum(one_ulp, 3, 3)
    tol = separation_tolerance(3, F64)
    assert tol == pytest.approx(8 * math.sqrt(3) * torch.finfo(F64).eps, rel=1e-12)
    separated = torch.tensor([2.0, 2.0 * (1 - 8 * tol), 1.0], dtype=F64)
    assert math.isfinite(float(hessian_trace_from_spectrum(separated, 3, 3)))
    with pytest.warns(SpectralGapWarning):
        hessian_trace(torch.diag(separated))


def test_batched_projections_raise_when_any_decomposition_is_degenerate():
    """A batch of decompositions (one per path) where only the middle one has sigma_1 = sigma_2:
    the batched quadratic form must refuse the whole batch, not only an all-degenerate one."""
    gen = torch.Generator().manual_seed(5)
    P, m, n, N = 3, 3, 4, 2
    U = torch.linalg.qr(torch.randn(P, m, m, dtype=F64, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(P, n, n, dtype=F64, generator=gen))[0][..., :m]
    sigma = torch.tensor([[2.0, 1.0, 0.5], [2.0, 2.0, 0.5], [3.0, 1.5, 1.0]], dtype=F64)
    y = torch.randn(P, N, n, dtype=F64, generator=gen)
    x = torch.randn(P, N, m, dtype=F64, generator=gen)
    good = SpectralDecomposition(U=U[[0, 2]], sigma=sigma[[0, 2]], V=V[[0, 2]])
    assert quadratic_form_from_projections(good, y[[0, 2]], x[[0, 2]]).shape == (2, N)
    with pytest.raises(DegenerateSpectrumError, match="Assumption 11"):
        quadratic_form_from_projections(SpectralDecomposition(U=U, sigma=sigma, V=V), y, x)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_gap_warning_threshold_is_the_documented_tolerance(dtype):
    """SpectralGapWarning exactly when the relative gap is below gap_tolerance_for(dtype)
    (1e-6 in float64, sqrt(eps32) = 3.5e-4 in float32): gaps at 0.5x and 0.95x warn, 1.05x and 2x
    do not (the computed relative gap is exact to ~(m + n) eps sigma_1 / 2, far inside 5%)."""
    tol = gap_tolerance_for(dtype)
    for factor in (0.5, 0.95, 1.05, 2.0):
        W = _near_degenerate(factor * tol).to(dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hessian_trace(W)
            jacobian(W)
        gap_warnings = [w for w in caught if issubclass(w.category, SpectralGapWarning)]
        if factor < 1:
            assert len(gap_warnings) == 2, (factor, float(decompose(W).relative_gap))
            assert "relative spectral gap" in str(gap_warnings[0].message)
        else:
            assert not gap_warnings, (factor, float(decompose(W).relative_gap))


# --------------------------------------------------------------------------- precisions


@given(matrices(max_dim=6, min_relative_gap=0.05), st.integers(0, 10_000))
def test_float32_matches_float64_within_derived_tolerance(case, seed):
    """float32 kernels are exact for W + dW with ||dW|| <= eps_32 := (m + n + 1) eps32 sigma_1
    (backward-stable SVD plus the rounding of W to float32); hence |dJ| <= sup|f''| eps_32,
    |dq| <= sup|f'''| eps_32 ||E||_F^2 + (r + 4) eps32 ||E||_F^2 / gap (arithmetic of the sum),
    |d tr H| <= d sup|f'''| eps_32 + (r + 2) eps32 tr H."""
    W, values, gap = case
    m, n = W.shape
    r = min(m, n)
    e32 = (m + n + 1) * EPS32 * values[0]
    E = directions(W, 3, seed)
    W32, E32 = W.float(), E.float()
    j_tol = derivative_bound(2, 1.0, gap) * e32 + EPS32
    assert float((jacobian(W32).double() - jacobian(W)).abs().max()) <= j_tol
    q_tol = derivative_bound(3, 1.0, gap) * e32 + (r + 4) * EPS32 / gap
    for method in ("svd", "resolvent"):
        q32 = hessian_quadratic_form(W32, E32, method=method)
        assert q32.dtype == torch.float32
        assert float((q32.double() - hessian_quadratic_form(W, E, method=method)).abs().max()) <= q_tol
    trace64 = float(hessian_trace(W))
    t_tol = m * n * derivative_bound(3, 1.0, gap) * e32 + (r + 2) * EPS32 * trace64
    assert abs(float(hessian_trace(W32)) - trace64) <= t_tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_does_not_crash(dtype):
    W = ref.matrix_with_singular_values([2.0, 1.0, 0.5], 3, 4, torch.Generator().manual_seed(1)).to(dtype)
    E = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2)).to(dtype)
    sigma, u, v = top_singular(W)
    assert sigma.dtype == u.dtype == v.dtype == dtype
    outputs = [
        sigma,
        jacobian(W),
        spectral_gap(W),
        hessian_quadratic_form(W, E, method="svd"),
        hessian_quadratic_form(W, E, method="resolvent"),
        hessian_trace(W),
        hessian(W),
    ]
    for out in outputs:
        assert out.dtype == dtype
        assert bool(torch.isfinite(out).all())
    # half inputs are decomposed in float32: sigma_1 is right to half precision
    assert abs(float(sigma) - 2.0) <= 2.0 * 4 * torch.finfo(dtype).eps
