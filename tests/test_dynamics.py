"""Theorems 14-17 and Proposition 21: layer/network terms, predictions and batch-size rescaling.

``layer_terms`` is compared with a dense reference that builds J (autograd), H (dilation) and
Sigma_hat (pairwise definition) in float64 at rtol 1e-10 (MATH section 3; the rounding bound of
a computation with condition sigma_1/gap <= 50 over b + m + n <= 30 terms is ~1e-12).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lipverify import _reference as ref
from lipverify._validation import DegenerateSpectrumError, LipverifyError
from lipverify.checks.numeric import derivative_bound
from lipverify.dynamics import (
    LayerTerms,
    NetworkTerms,
    layer_terms,
    network_terms,
    predict_bound,
    rescale_batch_size,
)
from lipverify.spectral import SpectralGapWarning

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
RTOL = 1e-10


@st.composite
def layers(draw, max_dim: int = 6, max_b: int = 8):
    """(W, per-sample grads (b, m, n), mean_grad) in float64 with relative gap in [0.02, 0.9]."""
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    b = draw(st.integers(2, max_b))
    r = min(m, n)
    sigma1 = draw(st.floats(0.5, 4.0))
    sigma2 = sigma1 * (1 - draw(st.floats(0.02, 0.9)))
    values = [sigma1] + ([sigma2] if r >= 2 else []) + [sigma2 * (r - k) / r for k in range(2, r)]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    W = ref.matrix_with_singular_values(values, m, n, gen)
    G = torch.randn(b, m, n, dtype=F64, generator=gen) + torch.randn(m, n, dtype=F64, generator=gen)
    mean_grad = torch.randn(m, n, dtype=F64, generator=gen)
    return W, G, mean_grad


def assert_terms_close(terms: LayerTerms, dense: dict[str, float], rtol: float = RTOL) -> None:
    for key in ("sigma", "mu", "phi", "psi"):
        got, want = getattr(terms, key), dense[key]
        assert abs(got - want) <= rtol * abs(want) + 1e-300, (key, got, want)


# --------------------------------------------------------------------------- Theorem 14


@given(layers(), st.floats(1e-3, 1.0), st.booleans(), st.one_of(st.none(), st.integers(20, 200)))
def test_layer_terms_match_dense_reference(layer, lr, given_drift, population_size):
    W, G, mean_grad = layer
    kwargs = {"population_size": population_size, "mean_grad": mean_grad if given_drift else None}
    terms = layer_terms(W, G, lr, **kwargs)
    assert_terms_close(terms, ref.layer_terms_dense(W, G, lr, **kwargs))
    assert terms.psi >= 0 and terms.phi >= 0
    assert not terms.degenerate
    assert terms.gap == pytest.approx(
        float(torch.linalg.svdvals(W)[0] - (torch.linalg.svdvals(W)[1:2].sum()))
    )


def test_layer_terms_accept_vectorised_gradients():
    W, G, _ = _fixed_layer()
    a, b = layer_terms(W, G, 0.1), layer_terms(W, ref.vec(G), 0.1)
    for key in ("sigma", "mu", "phi", "psi", "gap"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-13)


def test_noise_projections_square_to_phi():
    W, G, _ = _fixed_layer()
    terms = layer_terms(W, G, 0.3)
    assert float((terms.noise_projections**2).sum()) == pytest.approx(terms.phi**2, rel=1e-12)


def _fixed_layer(m: int = 4, n: int = 5, b: int = 6, relative_gap: float = 0.2):
    gen = torch.Generator().manual_seed(11)
    values = [2.0, 2.0 * (1 - relative_gap), 0.7, 0.3][: min(m, n)]
    W = ref.matrix_with_singular_values(values, m, n, gen)
    G = torch.randn(b, m, n, dtype=F64, generator=gen)
    return W, G, torch.randn(m, n, dtype=F64, generator=gen)


def test_small_gap_is_flagged_not_silent():
    """Relative gap 1e-9 < tolerance: the record carries the gap and degenerate=True, values finite,
    and the caller is warned (psi is amplified like 1/gap)."""
    W, G, _ = _fixed_layer(relative_gap=1e-9)
    with pytest.warns(SpectralGapWarning, match="psi = .* amplified like 1/gap"):
        terms = layer_terms(W, G, 0.1)
    assert terms.degenerate
    assert 0 < terms.gap < 1e-7
    assert terms.relative_gap < 1e-6
    assert all(math.isfinite(v) for v in (terms.mu, terms.phi, terms.psi))
    assert terms.as_dict()["degenerate"] is True


def test_gap_tolerance_is_configurable():
    W, G, _ = _fixed_layer(relative_gap=1e-3)
    assert not layer_terms(W, G, 0.1).degenerate
    assert layer_terms(W, G, 0.1, gap_tolerance=1e-2).degenerate


def test_equal_top_singular_values_raise():
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64))
    with pytest.raises(DegenerateSpectrumError, match="psi"):
        layer_terms(W, torch.randn(3, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)), 0.1)


def test_float32_layer_terms_match_float64():
    """float32 decomposition is exact for ||dW|| <= eps_32 = (m + n + 1) eps32 sigma_1; mu moves by
    sup|f''| eps_32 |grad_L|_F (Jacobian), phi by the same relative to |proj|, psi by
    sup|f'''| eps_32 sum_i |E_i|_F^2 scale (quadratic form), plus (b + m + n) eps32 relative
    arithmetic."""
    W, G, mean_grad = _fixed_layer()
    m, n = W.shape
    b = G.shape[0]
    lr = 0.5
    sigma1, gap = 2.0, 0.4
    e32 = (m + n + 1) * EPS32 * sigma1
    t64 = layer_terms(W, G, lr, mean_grad=mean_grad)
    t32 = layer_terms(W.float(), G.float(), lr, mean_grad=mean_grad.float())
    E = G - G.mean(0)
    scale = 1 / (b * (b - 1))
    arith = (b + m + n) * EPS32
    mu_tol = lr * derivative_bound(2, 1.0, gap) * e32 * float(torch.linalg.matrix_norm(mean_grad))
    assert abs(t32.mu - t64.mu) <= mu_tol + arith * abs(t64.mu)
    phi_tol = lr * derivative_bound(2, 1.0, gap) * e32 * math.sqrt(scale * float((E**2).sum()))
    assert abs(t32.phi - t64.phi) <= phi_tol + arith * t64.phi
    psi_tol = 0.5 * lr**2 * scale * derivative_bound(3, 1.0, gap) * e32 * float((E**2).sum())
    assert abs(t32.psi - t64.psi) <= psi_tol + arith * t64.psi
    assert abs(t32.sigma - t64.sigma) <= e32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_terms_do_not_crash(dtype):
    W, G, mean_grad = _fixed_layer()
    terms = layer_terms(W.to(dtype), G.to(dtype), 0.1, mean_grad=mean_grad.to(dtype))
    assert all(math.isfinite(v) for v in (terms.sigma, terms.mu, terms.phi, terms.psi))
    assert terms.sigma == pytest.approx(2.0, rel=8 * torch.finfo(dtype).eps)


# --------------------------------------------------------------------------- Theorem 15


@st.composite
def networks(draw):
    """1-3 layers with per-layer sigma_1 in [0.3, 5] whose per-sample gradients share a latent
    factor (non-zero cross-layer terms)."""
    count = draw(st.integers(1, 3))
    b = draw(st.integers(2, 7))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    latent = torch.randn(b, 2, dtype=F64, generator=gen)
    weights, grads = [], []
    for _ in range(count):
        m, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        # sigma_1 differs between layers, so normalising by the wrong layer's sigma_1 is visible
        sigma1 = draw(st.floats(0.3, 5.0))
        values = [sigma1] + [sigma1 * 0.7 ** (k + 1) for k in range(min(m, n) - 1)]
        weights.append(ref.matrix_with_singular_values(values, m, n, gen))
        flat = latent @ torch.randn(2, m * n, dtype=F64, generator=gen)
        grads.append(ref.unvec(flat + 0.2 * torch.randn(b, m * n, dtype=F64, generator=gen), m, n))
    return weights, grads


@given(networks(), st.floats(1e-3, 0.5))
def test_network_terms_match_dense_ito(network, lr):
    """log K, log drift (mu + psi - phi^2/2) and phi_sq against Itô on dense ln K; phi_sq_cross
    against the dense cross-layer covariance (absolute tolerance relative to phi_sq: the cross term
    can cancel to ~0)."""
    weights, grads = network
    layer_list = [layer_terms(W, G, lr) for W, G in zip(weights, grads, strict=True)]
    fast = network_terms(layer_list)
    dense = ref.network_terms_dense(weights, grads, lr)
    assert fast.log_bound == pytest.approx(dense["log_bound"], rel=RTOL, abs=1e-14)
    assert fast.log_drift == pytest.approx(dense["log_drift"], rel=RTOL)
    assert fast.phi_sq == pytest.approx(dense["phi_sq"], rel=RTOL)
    assert abs(fast.phi_sq_cross - dense["phi_sq_cross"]) <= RTOL * (fast.phi_sq + abs(dense["phi_sq_cross"]))
    if len(weights) == 1:
        assert fast.phi_sq_cross == pytest.approx(0.0, abs=1e-14 * fast.phi_sq)


def test_network_terms_from_mapping_and_without_projections():
    W, G, _ = _fixed_layer()
    t = layer_terms(W, G, 0.1)
    by_name = network_terms({"a": t, "b": t})
    assert by_name.mu == pytest.approx(2 * t.mu / t.sigma)
    assert by_name.psi == pytest.approx(2 * t.psi / t.sigma)
    assert by_name.phi_sq == pytest.approx(2 * t.phi**2 / t.sigma**2)
    bare = LayerTerms(sigma=2.0, mu=0.1, phi=0.2, psi=0.05, gap=0.5)
    assert network_terms([bare]).phi_sq_cross is None
    assert network_terms([bare, LayerTerms(2.0, 0.0, 0.0, 0.0, 1e-9, degenerate=True)]).degenerate
    with pytest.raises(LipverifyError, match="at least one layer"):
        network_terms([])


# --------------------------------------------------------------------------- Theorems 16-17


@st.composite
def series(draw):
    T = draw(st.integers(1, 30))
    mu = draw(st.lists(st.floats(-0.05, 0.05), min_size=T, max_size=T))
    psi = draw(st.lists(st.floats(0.0, 0.02), min_size=T, max_size=T))
    phi_sq = draw(st.lists(st.floats(0.0, 0.05), min_size=T, max_size=T))
    return [NetworkTerms(0.0, a, p, f) for a, p, f in zip(mu, psi, phi_sq, strict=True)]


@given(series(), st.floats(0.1, 10.0))
def test_predict_bound_left_point_sums(network_series, bound0):
    """E[K_t] = K_0 exp(sum_{s<t}(mu + psi)), Var = E^2 expm1(sum_{s<t} phi^2): relative error
    <= 4 T eps (T accumulated sums, one exp)."""
    T = len(network_series)
    pred = predict_bound(network_series, bound0)
    means, variances = ref.predict_bound_dense(network_series, bound0)
    tol = 4 * (T + 1) * torch.finfo(F64).eps
    assert pred.mean.shape == pred.var.shape == (T + 1,)
    assert float(pred.mean[0]) == bound0 and float(pred.var[0]) == 0.0
    for t in range(T + 1):
        assert float(pred.mean[t]) == pytest.approx(means[t], rel=tol)
        assert float(pred.var[t]) == pytest.approx(variances[t], rel=tol, abs=1e-300)
    assert torch.equal(pred.std, pred.var.sqrt())


def test_predict_bound_per_layer_series():
    gen = torch.Generator().manual_seed(3)
    steps = []
    for _ in range(4):
        values = torch.rand(2, 3, generator=gen, dtype=F64).tolist()
        steps.append(
            [LayerTerms(sigma=1.0 + a, mu=b - 0.5, phi=c, psi=0.1 * c, gap=0.1) for a, b, c in values]
        )
    net = [network_terms(step) for step in steps]
    pred = predict_bound(net, 1.0, layer_series=steps)
    assert pred.layer_mean.shape == pred.layer_var.shape == (5, 2)
    for layer in range(2):
        sigma0 = steps[0][layer].sigma
        for t in range(5):
            drift = sum(steps[s][layer].mu + steps[s][layer].psi for s in range(t))
            var = sum(steps[s][layer].phi ** 2 for s in range(t))
            assert float(pred.layer_mean[t, layer]) == pytest.approx(sigma0 + drift, rel=1e-14)
            assert float(pred.layer_var[t, layer]) == pytest.approx(var, rel=1e-14, abs=1e-300)
    with pytest.raises(LipverifyError, match="steps"):
        predict_bound(net, 1.0, layer_series=steps[:2])


def test_predict_bound_rejects_bad_input():
    with pytest.raises(LipverifyError, match="non-empty"):
        predict_bound([], 1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LipverifyError, match="bound0"):
            predict_bound([NetworkTerms(0.0, 0.0, 0.0, 0.0)], bad)
    # non-finite terms and a negative variance, named by step (they gave NaN/inf or Var < 0)
    ok = NetworkTerms(0.0, 0.01, 0.0, 1e-4)
    for bad, message in (
        (NetworkTerms(0.0, float("nan"), 0.0, 1e-4), "step 1 are not finite"),
        (NetworkTerms(0.0, 0.01, float("inf"), 1e-4), "step 1 are not finite"),
        (NetworkTerms(0.0, 0.01, 0.0, -0.4), "phi_sq at step 1 is negative"),
    ):
        with pytest.raises(LipverifyError, match=message):
            predict_bound([ok, bad, ok], 1.0)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_layer_terms_refuse_a_bad_learning_rate(lr):
    # a negative lr gave a negative diffusion intensity phi
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, dtype=F64, generator=gen)
    with pytest.raises(LipverifyError, match="learning rate"):
        layer_terms(W, torch.randn(5, 3, 4, dtype=F64, generator=gen), lr)


# --------------------------------------------------------------------------- Proposition 21


@given(series(), st.integers(2, 64), st.integers(2, 64))
def test_rescale_batch_size(network_series, b, b_new):
    out = rescale_batch_size(network_series, b, b_new)
    assert len(out) == len(network_series)
    for old, new in zip(network_series, out, strict=True):
        assert new.mu == old.mu and new.log_bound == old.log_bound
        assert new.psi == pytest.approx(old.psi * b / b_new, rel=1e-15, abs=1e-300)
        assert new.phi_sq == pytest.approx(old.phi_sq * b / b_new, rel=1e-15, abs=1e-300)
    # round trip
    back = rescale_batch_size(out, b_new, b)
    for old, new in zip(network_series, back, strict=True):
        assert new.psi == pytest.approx(old.psi, rel=1e-14, abs=1e-300)


def test_rescale_variance_falls_like_one_over_b():
    """Var[K_t] = E^2 (exp(Phi/b) - 1): b Var -> E^2 Phi as b grows (first order in 1/b)."""
    base = [NetworkTerms(0.0, 0.01, 0.002, 0.03, phi_sq_cross=0.004)] * 20
    Phi = 20 * 0.03
    for b_new in (64, 256, 1024):
        scaled = rescale_batch_size(base, 1 * 2, b_new)
        assert scaled[0].phi_sq_cross == pytest.approx(0.004 * 2 / b_new)
        pred = predict_bound(scaled, 1.0)
        mean = float(pred.mean[-1])
        first_order = mean**2 * Phi * 2 / b_new
        # exp(x) - 1 - x <= x^2 for x <= 1: relative deviation <= x = 2 Phi / b_new
        assert abs(float(pred.var[-1]) - first_order) <= first_order * (2 * Phi / b_new)


def test_rescale_rejects_small_batches():
    with pytest.raises(LipverifyError, match="batch sizes"):
        rescale_batch_size([NetworkTerms(0.0, 0.0, 0.0, 0.0)], 1, 8)


def test_default_gap_flag_depends_on_the_compute_dtype():
    """Relative gap 1e-4: Hessian terms carry ~eps/gap relative error, 1e-3 in float32 (flagged,
    above sqrt(eps32) = 3.5e-4) but 2e-12 in float64 (not flagged)."""
    from lipverify.spectral import gap_tolerance_for

    assert gap_tolerance_for(torch.float64) == 1e-6
    assert gap_tolerance_for(torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    g = torch.Generator().manual_seed(3)
    Q1, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
    S = torch.zeros(4, 5, dtype=torch.float64)
    S[range(4), range(4)] = torch.tensor([1.0, 1.0 - 1e-4, 0.5, 0.2], dtype=torch.float64)
    W = Q1 @ S @ Q2.T
    G = torch.randn(6, 4, 5, dtype=torch.float64, generator=g)
    assert not layer_terms(W, G, 0.1).degenerate
    assert layer_terms(W.float(), G.float(), 0.1).degenerate


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_degenerate_flag_uses_the_relative_gap(scale):
    """The flag compares gap / sigma_1 (scale-free) with the tolerance: scaling W and the per-sample
    gradients by 1e-4 or 1e4 changes neither the flag nor the relative gap. Relative gaps at 0.5x
    and 2x the float64 tolerance (1e-6) give True and False; their absolute gaps (1e-6 and 4e-6 at
    sigma_1 = 2) cross the tolerance in the wrong direction once scaled."""
    from lipverify.spectral import gap_tolerance_for

    tol = gap_tolerance_for(F64)
    for factor, flagged in ((0.5, True), (2.0, False)):
        W, G, _ = _fixed_layer(relative_gap=factor * tol)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base = layer_terms(W, G, 0.1)
            terms = layer_terms(scale * W, scale * G, 0.1)
        assert sum(issubclass(w.category, SpectralGapWarning) for w in caught) == (2 if flagged else 0)
        assert base.degenerate is flagged
        assert terms.degenerate is flagged, (factor, scale, terms.gap, terms.sigma)
        # gap / sigma_1 is computed to ~eps sigma_1 / gap ~ 1e-10 relative
        assert terms.relative_gap == pytest.approx(factor * tol, rel=1e-6)
        assert terms.relative_gap == pytest.approx(base.relative_gap, rel=1e-8)
        assert terms.sigma == pytest.approx(2.0 * scale, rel=1e-12)
