"""The device route's batched spectra (:func:`lipverify.probe.resolvent.resolvent_spectra_device`,
issue 15: one padded batch per step for all layers instead of ~150 operations per layer) against the
one-layer device spectrum :func:`resolvent_spectrum_device` (its slow, obviously-correct reference
with the same algorithm) and the full SVD, on random groups of shapes and gaps (Hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_probe import _warm_basis, _with_gap  # tests/ is on sys.path (pytest's prepend import mode)

import lipverify.probe.resolvent as resolvent
from lipverify.probe.resolvent import (
    DEVICE_BATCH_MAX_WASTE,
    DeviceBatchPlan,
    device_batch_groups,
    resolvent_spectra_device,
    resolvent_spectrum_device,
)
from lipverify.spectral import decompose


def _scaled_with_gap(m, n, rel_gap, seed):
    """:func:`test_probe._with_gap` times a scale in [0.5, 2] (sigma_1 = scale)."""
    g = torch.Generator().manual_seed(seed + 7)
    return (0.5 + 1.5 * float(torch.rand((), generator=g, dtype=torch.float64))) * _with_gap(
        m, n, rel_gap, seed
    )


layer = st.tuples(
    st.integers(3, 40), st.integers(3, 40), st.sampled_from([0.3, 1e-2, 1e-3]), st.integers(0, 10**6)
)


def _compare(Ws, bases, specs):
    """Each batched spectrum against the one-layer device spectrum: sigma_1 and the singular vectors
    to rounding over the gap, sigma_2 to the Rayleigh-Ritz error, the Lemma 13 quadratic form and
    tr H to eps / rel_gap (MATH section 7), the verdict equal. Returns the worst relative q error."""
    worst = 0.0
    for i, (W, basis, got) in enumerate(zip(Ws, bases, specs, strict=True)):
        ref = resolvent_spectrum_device(W, torch.float64, basis)
        assert bool(got.ok) == bool(ref.ok), i
        rel_gap = float(ref.gap / ref.s1)
        assert got.shape == tuple(W.shape) and got.u.shape == ref.u.shape and got.v.shape == ref.v.shape
        assert math.isclose(float(got.s1), float(ref.s1), rel_tol=1e-13)
        assert math.isclose(float(got.gap), float(ref.gap), rel_tol=1e-8)
        tol = 1e-12 / rel_gap
        assert torch.allclose(got.u, ref.u, atol=tol) and torch.allclose(got.v, ref.v, atol=tol)
        assert torch.equal(got.W, W)  # the spectrum's snapshot of W_t holds W's values
        E = torch.randn(4, *W.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        q, q_ref = got.quadratic_form(got.u @ E, E @ got.v), ref.quadratic_form(ref.u @ E, E @ ref.v)
        worst = max(worst, float(((q - q_ref) / q_ref).abs().max()) * rel_gap)
        assert math.isclose(float(got.hessian_trace()), float(ref.hessian_trace()), rel_tol=1e-11 / rel_gap)
    return worst


@settings(max_examples=25, deadline=None)
@given(st.lists(layer, min_size=1, max_size=4))
def test_batched_spectra_equal_the_one_layer_spectra(layers):
    Ws = [_scaled_with_gap(m, n, gap, seed) for m, n, gap, seed in layers]
    # a previous step's basis: W moved by much less than the gap (as in training at a stable lr)
    bases = [
        _warm_basis(W, seed + 1, noise=1e-2 * gap) for W, (_, _, gap, seed) in zip(Ws, layers, strict=True)
    ]
    specs = resolvent_spectra_device(Ws, torch.float64, bases)
    assert all(bool(s.ok) for s in specs)
    assert _compare(Ws, bases, specs) <= 1e-11
    # and against the full SVD: sigma_1, sigma_2
    for W, s in zip(Ws, specs, strict=True):
        full = decompose(W)
        assert math.isclose(float(s.s1), float(full.sigma[0]), rel_tol=1e-13)
        assert math.isclose(float(s.s2), float(full.sigma[1]), rel_tol=1e-8)


def test_padding_that_is_not_zero_is_rejected(monkeypatch):
    # the wrong variant: padding with small values instead of zeros couples the layers' blocks
    # to the padding (the padded Gram matrix is no longer diag(G, 0)): the same comparison fails
    shapes = [(30, 40), (12, 25), (20, 8)]
    Ws = [_with_gap(m, n, 1e-2, seed) for seed, (m, n) in enumerate(shapes)]
    bases = [_warm_basis(W, 9) for W in Ws]
    assert _compare(Ws, bases, resolvent_spectra_device(Ws, torch.float64, bases)) <= 1e-11
    real = resolvent._pad_stack

    def noisy(mats, rows, cols, dtype):
        out = real(mats, rows, cols, dtype)
        fill = 1e-3 * torch.rand(out.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        for i, M in enumerate(mats):
            fill[i, : M.shape[0], : M.shape[1]] = 0
        return out + fill

    monkeypatch.setattr(resolvent, "_pad_stack", noisy)
    with pytest.raises(AssertionError):
        _compare(Ws, bases, resolvent_spectra_device(Ws, torch.float64, bases))


def test_batched_verdict_is_per_layer():
    # sigma_1 = sigma_2 in one layer: its verdict is False, its neighbours' stay True
    good = _with_gap(30, 40, 0.1, 1)
    U, _ = torch.linalg.qr(
        torch.randn(12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    )
    V, _ = torch.linalg.qr(
        torch.randn(20, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    )
    tied = U @ torch.diag(torch.tensor([1.0, 1.0, *[0.5] * 10], dtype=torch.float64)) @ V.T
    Ws = [good, tied, _with_gap(9, 16, 0.2, 4)]
    bases = [_warm_basis(W, 5) for W in Ws]
    ok = [bool(s.ok) for s in resolvent_spectra_device(Ws, torch.float64, bases)]
    assert ok == [True, False, True]


def test_batch_groups_are_a_function_of_the_shapes():
    mlp = [(512, 784), (256, 512), (10, 256)]
    convnet = [(32, 27), (64, 288), (128, 576), (256, 2048), (10, 256)]
    assert device_batch_groups(mlp) == [[0, 1, 2]]
    assert device_batch_groups(convnet) == [[0, 1, 2, 3, 4]]
    # a tiny layer is not padded to a huge one's size: the waste bound splits them
    groups = device_batch_groups([(4000, 4000), (8, 8)])
    assert groups == [[0], [1]]
    for shapes in (mlp, convnet):
        for g in device_batch_groups(shapes):
            K = max(min(shapes[i]) for i in g)
            N = max(max(shapes[i]) for i in g)
            own = sum(min(shapes[i]) ** 2 * max(shapes[i]) + min(shapes[i]) ** 3 for i in g)
            assert len(g) * (K * K * N + K**3) <= DEVICE_BATCH_MAX_WASTE * own


def test_plan_refuses_small_layers():
    W = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="k >= 3"):
        resolvent_spectra_device([W], torch.float64, [torch.eye(2, 3, dtype=torch.float64)])
    plan = DeviceBatchPlan.build([(5, 7), (9, 4)], torch.float64, torch.device("cpu"))
    assert (plan.K, plan.N) == (5, 9) and plan.tall.flatten().tolist() == [False, True]
