"""Degenerate and near-degenerate spectra through the public API (lipverify issue 12).

Policy under test (``lipverify.spectral.check_gap``): relative gap g = (s1 - s2) / s1
* g <= rounding_gap_tolerance(m, n, dtype) = 4 eps (sqrt(m) + sqrt(n)): DegenerateSpectrumError from
  every function that needs u, v (top_singular, jacobian, hessian*, layer_terms);
* g < gap_tolerance_for(dtype) = max(1e-6, sqrt(eps)): values plus SpectralGapWarning
  (layer_terms: degenerate=True and a warning naming psi and 1/g);
* predict_bound never returns inf/NaN unflagged: BoundOverflowWarning + overflow_step, or raises.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lipverify as lv
from lipverify import _reference as ref
from lipverify.dynamics import BoundOverflowWarning
from lipverify.spectral import decompose, gap_tolerance_for, rounding_gap_tolerance

F64 = torch.float64
VECTOR_FUNCTIONS = {
    "top_singular": lv.top_singular,
    "jacobian": lv.jacobian,
    "hessian": lv.hessian,
    "hessian_trace": lv.hessian_trace,
    "hqf_svd": lambda W: lv.hessian_quadratic_form(W, torch.ones_like(W), method="svd"),
    "hqf_resolvent": lambda W: lv.hessian_quadratic_form(W, torch.ones_like(W), method="resolvent"),
}


def _orthogonal_rows(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """(m, n), m <= n, orthonormal rows from a QR: every singular value is 1 up to rounding."""
    Q, _ = torch.linalg.qr(torch.randn(n, m, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return Q.T.contiguous()


def _grads(m: int, n: int, b: int = 6, seed: int = 1, dtype=F64) -> torch.Tensor:
    return torch.randn(b, m, n, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _with_gap(relative_gap: float, m: int = 3, n: int = 4, seed: int = 3) -> torch.Tensor:
    rest = [0.5, 0.25, 0.1][: min(m, n) - 2]
    s = [1.0, 1.0 - relative_gap, *rest]
    return ref.matrix_with_singular_values(s, m, n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- sigma_1 = sigma_2


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_top_singular_refuses_equal_top_singular_values(dtype):
    """diag(2, 2, 1): any unit vector of span(e1, e2) is a top singular vector; the old code returned
    one of them without a word."""
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=dtype))
    with pytest.raises(lv.DegenerateSpectrumError, match=r"sigma_1 = 2 and sigma_2 = 2 .*relative gap 0 "):
        lv.top_singular(W)
    assert float(lv.spectral_gap(W)) == 0.0  # the measurement of the gap itself still answers


@pytest.mark.parametrize("shape", [(8, 8), (8, 12)])
def test_orthogonal_weight_is_refused_by_every_function_that_needs_u_v(shape):
    """All sigma = 1 up to rounding (the issue's case: psi = 7e12 flagged degenerate, no warning,
    then predict_bound = inf): refused with the computed gap and the threshold named."""
    m, n = shape
    W = _orthogonal_rows(m, n)
    rel = float(decompose(W).relative_gap)
    tau = rounding_gap_tolerance(m, n, F64)
    assert rel <= tau  # the premise: a rounding-level gap (measured 0 to 1 eps here, tau = 23-25 eps)
    for call in VECTOR_FUNCTIONS.values():
        with pytest.raises(lv.DegenerateSpectrumError, match=r"equal up to rounding \(relative gap"):
            call(W)
    with pytest.raises(
        lv.DegenerateSpectrumError, match=r"equal up to rounding.*psi \(Theorem 14\) is undefined"
    ):
        lv.layer_terms(W, _grads(m, n), 0.1, name="fc1")


def test_rounding_threshold_is_between_rounding_and_resolvable_gaps():
    """On a 64 x 576 matrix (tau = 4 eps (8 + 24) = 128 eps): a true gap of tau / 4 raises (computed
    gap <= tau/4 + 1.6 eps (sqrt m + sqrt n), the largest rounding error measured, = 0.65 tau), a true gap
    of 4 tau returns with a warning (computed >= 3.6 tau). Rejects an exact-equality test (the old
    one: tau/4 returned) and a threshold linear in max(m, n) (2 max(m, n) eps = 1152 eps > 4 tau
    would refuse a resolvable gap)."""
    m, n = 64, 576
    tau = 128 * torch.finfo(F64).eps  # the documented formula, not the function under test
    assert rounding_gap_tolerance(m, n, F64) == pytest.approx(tau, rel=1e-12, abs=0)
    spectrum = torch.linspace(0.9, 0.1, min(m, n) - 2, dtype=F64).tolist()
    gen = torch.Generator().manual_seed(11)
    below = ref.matrix_with_singular_values([1.0, 1.0 - tau / 4, *spectrum], m, n, gen)
    above = ref.matrix_with_singular_values([1.0, 1.0 - 4 * tau, *spectrum], m, n, gen)
    with pytest.raises(lv.DegenerateSpectrumError):
        lv.top_singular(below)
    with pytest.warns(lv.SpectralGapWarning, match=r"u, v carry errors up to eps/gap"):
        sigma, u, v = lv.top_singular(above)
    torch.testing.assert_close(above @ v, sigma * u, rtol=0, atol=1e-12)


def test_rounding_tolerance_stays_below_the_flag_threshold():
    """The refusal band never swallows the warning band, whatever the size (capped for float32
    above sqrt(m) + sqrt(n) = 724)."""
    for dtype in (F64, torch.float32):
        for m, n in ((2, 2), (512, 4608), (4096, 1 << 20)):
            assert 0 < rounding_gap_tolerance(m, n, dtype) <= gap_tolerance_for(dtype)
    assert rounding_gap_tolerance(512, 4608, torch.float32) < gap_tolerance_for(torch.float32) / 5


# --------------------------------------------------------------------------- small, resolvable gaps


def test_layer_terms_small_gap_warns_naming_psi_and_amplification():
    """g = 1e-9 (resolvable in float64, below 1e-6): the terms come back flagged, with a warning that
    names the layer, the gap, psi and 1/g. The old code returned them silently."""
    W = _with_gap(1e-9)
    with pytest.warns(
        lv.SpectralGapWarning, match=r"fc1: relative spectral gap 1e-09 .*psi = .* 1/gap = 1e\+09"
    ):
        terms = lv.layer_terms(W, _grads(3, 4), 0.1, name="fc1")
    assert terms.degenerate and math.isfinite(terms.psi)


def test_well_gapped_inputs_are_quiet():
    W = _with_gap(0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lv.top_singular(W)
        terms = lv.layer_terms(W, _grads(3, 4), 0.1)
        pred = lv.predict_bound([lv.network_terms([terms])] * 5, 1.0, [[terms]] * 5)
    assert pred.finite and pred.overflow_step is None and pred.overflow is None


# --------------------------------------------------------------------------- predict_bound overflow


def _degenerate_series(steps: int = 4):
    """fc1 with relative gap 1e-12 (resolvable, flagged): psi ~ 1/g overflows exp from step 1."""
    with pytest.warns(lv.SpectralGapWarning):
        bad = lv.layer_terms(_with_gap(1e-12), _grads(3, 4), 0.1, name="fc1")
    good = lv.layer_terms(_with_gap(0.3, seed=4), _grads(3, 4, seed=2), 0.1)
    layers = {"fc1": bad, "fc2": good}
    net = lv.network_terms(layers)
    assert net.psi > 800 and net.degenerate_layers == (("fc1", bad.relative_gap),)
    return [net] * steps, [layers] * steps


def test_predict_bound_overflow_names_step_term_and_degenerate_layer():
    nets, layers = _degenerate_series()
    pattern = (
        r"step 1: E\[K_t\] .* overflows .*largest term psi_bar = .* at step 0; "
        r".*fc1 at step 0 \(relative gap 1e-12"
    )
    with pytest.warns(BoundOverflowWarning, match=pattern):
        pred = lv.predict_bound(nets, 1.0, layers)
    assert pred.overflow_step == 1 and not pred.finite and math.isfinite(float(pred.mean[0]))
    with pytest.raises(lv.LipverifyError, match=pattern):
        lv.predict_bound(nets, 1.0, layers, on_overflow="raise")
    # without the layer series the network terms still name the layer
    with pytest.warns(BoundOverflowWarning, match=r"fc1 at step 0 \(relative gap 1e-12"):
        lv.predict_bound(nets, 1.0)
    with pytest.raises(lv.LipverifyError, match="on_overflow"):
        lv.predict_bound(nets, 1.0, on_overflow="ignore")


def test_predict_bound_overflow_without_degenerate_layer_blames_the_terms():
    """A large but well-gapped psi (a diverging run) and a variance-only overflow: the message must
    not invent a degenerate layer and must name the right sum."""
    big_drift = lv.dynamics.NetworkTerms(log_bound=0.0, mu=0.0, psi=1e3, phi_sq=0.0)
    with pytest.warns(
        BoundOverflowWarning, match=r"step 1: E\[K_t\].*psi_bar = 1e\+03 at step 0; no layer is flagged"
    ):
        lv.predict_bound([big_drift] * 3, 1.0)
    big_noise = lv.dynamics.NetworkTerms(log_bound=0.0, mu=0.0, psi=0.0, phi_sq=800.0)
    with pytest.warns(BoundOverflowWarning, match=r"step 1: Var\[K_t\].*phi_sq_bar = 800 at step 0"):
        pred = lv.predict_bound([big_noise] * 3, 1.0)
    assert pred.overflow_step == 1 and bool(torch.isfinite(pred.mean).all())


# --------------------------------------------------------------------------- other silent infs


def test_network_terms_refuses_bad_layers_by_name():
    ok = lv.LayerTerms(sigma=1.0, mu=0.0, phi=0.1, psi=0.0, gap=0.5)
    dead = lv.LayerTerms(sigma=0.0, mu=0.0, phi=0.1, psi=0.0, gap=0.0)
    inf_psi = lv.LayerTerms(sigma=1.0, mu=0.0, phi=0.1, psi=math.inf, gap=0.5)
    with pytest.raises(lv.LipverifyError, match=r"conv2: sigma_1 = 0.0 must be positive"):
        lv.network_terms({"fc1": ok, "conv2": dead})
    with pytest.raises(lv.LipverifyError, match=r"layer 1: psi = inf is not finite"):
        lv.network_terms([ok, inf_psi])
    tiny = lv.LayerTerms(sigma=1e-300, mu=0.0, phi=0.1, psi=1e300, gap=1e-301)
    with pytest.raises(lv.LipverifyError, match=r"network .* overflows float64; largest layer fc9"):
        lv.network_terms({"fc9": tiny})


def test_outputs_that_overflow_the_dtype_raise():
    """sigma_1 = 2.4e5 of a float16 W overflows float16 (max 65504); a W of size 1e-200 makes
    s1^2 - s2^2 underflow to 0 (Hessian terms 1/0); float16 gradients of size 300 overflow their
    products (float32 ones of size 3e19 in noise_sqrt). The old code returned inf for each."""
    with pytest.raises(lv.LipverifyError, match=r"sigma_1 is not finite in torch.float16"):
        lv.top_singular(torch.full((4, 4), 60000.0, dtype=torch.float16))
    tiny = 1e-200 * torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=F64))
    for call in (lv.hessian, lv.hessian_trace):
        with pytest.raises(lv.LipverifyError, match=r"not finite in torch.float64"):
            call(tiny)
    G = torch.full((4, 3, 3), 300.0, dtype=torch.float16)
    G[0] = -300.0
    for call in (lv.batch_noise_covariance, lv.variance_covariance_split):
        with pytest.raises(lv.LipverifyError, match=r"overflows torch.float16"):
            call(G)
    assert _finite(lv.noise_sqrt(G).matrix())  # computed in float32: 300^2 fits
    with pytest.raises(lv.LipverifyError, match=r"Gram matrix .* overflows torch.float32"):
        lv.noise_sqrt(G.float() * 1e17)  # (4.5e19)^2 > 3.4e38


def test_noise_sqrt_accepts_half_precision():
    """Half gradients go through float32 (the old code hit NotImplementedError from eigh)."""
    G = _grads(3, 4, b=5).to(torch.bfloat16)
    root = lv.noise_sqrt(G)
    assert root.rank == 4 and root.core.dtype == torch.float32
    cov = lv.batch_noise_covariance(G.float())
    torch.testing.assert_close(root.matrix() @ root.matrix(), cov, rtol=0, atol=1e-5 * float(cov.abs().max()))


# --------------------------------------------------------------------------- every public function


def _finite(out) -> bool:
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all())
    if isinstance(out, tuple | list):
        return all(_finite(o) for o in out)
    if isinstance(out, float):
        return math.isfinite(out)
    raise TypeError(type(out))


@given(
    m=st.integers(2, 5),
    n=st.integers(2, 5),
    log_scale=st.floats(-3, 3),
    gap=st.one_of(st.just(0.0), st.floats(-17, -1).map(lambda e: 10.0**e)),
    dtype=st.sampled_from([F64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_public_api_never_returns_silent_inf_on_near_degenerate_spectra(m, n, log_scale, gap, dtype, seed):
    """W = U diag(s, s(1 - g), ...) V^T, g in {0} U [1e-17, 1e-1]: each public function returns
    finite values or raises a LipverifyError; when the computed relative gap is below the flag
    threshold the caller hears it (DegenerateSpectrumError or SpectralGapWarning / degenerate=True);
    above the rounding threshold nothing is refused; predict_bound flags any inf/NaN it returns."""
    s = 10.0**log_scale
    r = min(m, n)
    rest = [s * (1 - gap) * 0.8**k for k in range(1, r - 1)]
    W = ref.matrix_with_singular_values([s, s * (1 - gap), *rest], m, n, torch.Generator().manual_seed(seed))
    W = W.to(dtype)
    rel = float(decompose(W).relative_gap)
    flagged = rel < gap_tolerance_for(dtype)
    refusable = rel <= rounding_gap_tolerance(m, n, dtype)
    G = _grads(m, n, b=4, seed=seed + 1, dtype=dtype)

    def outcome(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = call()
            except lv.DegenerateSpectrumError:
                assert refusable, f"refused a resolvable gap {rel:.3g}"
                return None, True
            except lv.LipverifyError:
                return None, False
        warned = any(issubclass(w.category, lv.SpectralGapWarning) for w in caught)
        return out, warned

    for name, call in {**VECTOR_FUNCTIONS, "spectral_gap": lambda W: lv.spectral_gap(W)}.items():
        out, heard = outcome(lambda: call(W))  # noqa: B023
        if out is not None:
            assert _finite(out), name
        if flagged and name != "spectral_gap":
            assert heard, f"{name}: relative gap {rel:.3g} below the flag threshold, silent"
    terms, heard = outcome(lambda: lv.layer_terms(W, G, 0.05, name="fc1"))
    if terms is None:
        return
    assert _finite((terms.sigma, terms.mu, terms.phi, terms.psi, terms.gap))
    assert terms.degenerate == flagged and heard == flagged
    net = lv.network_terms({"fc1": terms})
    assert _finite((net.mu, net.psi, net.phi_sq, net.log_bound)) and net.degenerate == flagged
    rescaled = lv.rescale_batch_size([net], 4, 8)[0]
    assert _finite((rescaled.mu, rescaled.psi, rescaled.phi_sq))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = lv.predict_bound([net] * 3, float(terms.sigma), [{"fc1": terms}] * 3)
    returned_finite = _finite((pred.mean, pred.var, pred.layer_mean, pred.layer_var))
    overflow_warned = any(issubclass(w.category, BoundOverflowWarning) for w in caught)
    assert returned_finite == pred.finite == (not overflow_warned)
    for call in (lv.batch_noise_covariance, lv.variance_covariance_split):
        assert _finite(call(G * W))
    assert _finite(lv.noise_sqrt(G * W).matrix())
