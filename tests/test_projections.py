"""The per-sample projection kernel (:mod:`lipverify.probe.projections`, MATH section 2):
``y_i = G_i^T u`` and ``x_i = G_i v`` of a Conv2d's per-sample gradients by the three contractions,
against the slow reference that forms every ``G_i`` from explicit patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lipverify import LipverifyError
from lipverify.probe import DynamicsProbe, projections
from lipverify.probe.projections import CONV_METHODS, contract, shifted_conv_projections

EPS = torch.finfo(torch.float64).eps


def _per_sample_gradients(conv: nn.Conv2d, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``G_i = sum_p delta_{i,p} a_{i,p}^T`` (b, m, C kh kw) from ``F.unfold``'s patches."""
    patches = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (b, C K, P)
    return delta.flatten(2) @ patches.transpose(1, 2)


def _check(y, x, conv, a, delta, u, v):
    """y, x against the explicit ``G_i^T u``, ``G_i v``, to float64 rounding: each entry is a sum of
    at most ``N = P (m + C kh kw)`` products, so ``|error| <= 2 gamma_N`` times the same sums of
    absolute values (the standard bound for a sum of products, both ways of summing)."""
    G = _per_sample_gradients(conv, a, delta)
    Gabs = _per_sample_gradients(conv, a.abs(), delta.abs())
    n_terms = delta[0, 0].numel() * (G.shape[1] + G.shape[2])
    gamma = n_terms * EPS / (1 - n_terms * EPS)
    y_ref, y_bound = G.transpose(1, 2) @ u, 2 * gamma * (Gabs.transpose(1, 2) @ u.abs())
    x_ref, x_bound = G @ v, 2 * gamma * (Gabs @ v.abs())
    assert y.shape == y_ref.shape and x.shape == x_ref.shape
    assert bool(((y - y_ref).abs() <= y_bound + 1e-300).all()), "y_i = G_i^T u off"
    assert bool(((x - x_ref).abs() <= x_bound + 1e-300).all()), "x_i = G_i v off"


geometries = st.fixed_dictionaries(
    {
        "b": st.integers(1, 4),
        "C": st.integers(1, 3),
        "m": st.integers(1, 4),
        "H": st.integers(3, 9),
        "W": st.integers(3, 9),
        "kh": st.integers(1, 3),
        "kw": st.integers(1, 3),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "seed": st.integers(0, 2**16),
    }
)


def _case(g):
    """A Conv2d of geometry g with random a, delta, u, v (float64), or None if the output is empty."""
    conv = nn.Conv2d(
        g["C"], g["m"], (g["kh"], g["kw"]), g["stride"], g["padding"], g["dilation"], dtype=torch.float64
    )
    gen = torch.Generator().manual_seed(g["seed"])
    a = torch.randn(g["b"], g["C"], g["H"], g["W"], dtype=torch.float64, generator=gen)
    try:
        out_shape = conv(a).shape
    except RuntimeError:  # kernel larger than the padded input
        return None
    delta = torch.randn(out_shape, dtype=torch.float64, generator=gen)
    u = torch.randn(g["m"], dtype=torch.float64, generator=gen)
    v = torch.randn(g["C"] * g["kh"] * g["kw"], dtype=torch.float64, generator=gen)
    return conv, a, delta, u, v


@settings(max_examples=60, deadline=None)
@given(g=geometries, method=st.sampled_from(CONV_METHODS), chunk_bytes=st.sampled_from([1, 2000, 8 << 20]))
def test_conv_projections_match_explicit_per_sample_gradients(g, method, chunk_bytes):
    """All three methods, in one chunk of samples, one sample per chunk, or chunks in between."""
    case = _case(g)
    assume(case is not None)
    conv, a, delta, u, v = case
    y, x, wy = contract(conv, "conv", a, delta, u, v, conv_method=method, conv_chunk_bytes=chunk_bytes)
    assert wy is None
    _check(y, x, *case)


@settings(max_examples=60, deadline=None)
@given(g=geometries, pad_input=st.booleans())
def test_shifted_projections_read_the_padding_either_way(g, pad_input):
    """The shifted kernel with the input zero-padded explicitly and with the padding read as an
    appended zero (the default picks whichever copies less) against the explicit gradients."""
    case = _case(g)
    assume(case is not None)
    conv, a, delta, u, v = case
    t = torch.einsum("m,bmp->bp", u, delta.flatten(2))
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    y, s = shifted_conv_projections(a, t, v, *geometry, pad_input=pad_input)
    _check(y, torch.bmm(delta.flatten(2), s.unsqueeze(-1))[..., 0], *case)


def test_the_input_is_padded_explicitly_only_where_that_copies_less():
    """ConvNet's layers: conv1 (3 channels at 32x32, 3x3, padding 1) pads its input (3 * 34^2 < 9 *
    32^2 values per sample); conv2 (32 channels at 16x16) reads an appended zero (32 * 18^2 > 9 * 16^2);
    without padding nothing is copied."""
    assert projections._pads_input(3, 9, (32, 32), (1, 1))
    assert not projections._pads_input(32, 9, (16, 16), (1, 1))
    assert not projections._pads_input(1, 9, (16, 16), (0, 0))


def _accepts_right_rejects_wrong(monkeypatch, case, wrong_indices, pad_input, match):
    """The shifted kernel with the right index tensors passes :func:`_check`; with ``wrong_indices``
    in place of :func:`projections._shift_indices` the same check fails with ``match``."""
    conv, a, delta, u, v = case
    t = torch.einsum("m,bmp->bp", u, delta.flatten(2))
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    for indices, ok in ((projections._shift_indices.__wrapped__, True), (wrong_indices, False)):
        monkeypatch.setattr(projections, "_shift_indices", indices)
        y, s = shifted_conv_projections(a, t, v, *geometry, pad_input=pad_input)
        x = torch.bmm(delta.flatten(2), s.unsqueeze(-1))[..., 0]
        if ok:
            _check(y, x, *case)
        else:
            with pytest.raises(AssertionError, match=match):
                _check(y, x, *case)


def test_the_check_rejects_padding_read_as_input(monkeypatch):
    """Wrong variant: reads of the padding that take the input's first entry instead of a zero; the
    same check rejects them (and passes the right reads), on the route that reads the padding as an
    appended zero."""
    case = _case(
        dict(b=2, C=2, m=3, H=5, W=6, kh=3, kw=3, stride=(1, 2), padding=(1, 2), dilation=(1, 1), seed=2)
    )
    right = projections._shift_indices.__wrapped__

    def padding_as_input(*args):
        L, taps, reads = right(*args)
        return L, taps, torch.where(reads == taps.numel(), 0, reads)  # K L: the appended zero

    _accepts_right_rejects_wrong(monkeypatch, case, padding_as_input, False, "x_i = G_i v off")


@pytest.mark.parametrize("pad_input", [True, False])
def test_the_check_rejects_a_shift_that_ignores_dilation(monkeypatch, pad_input):
    """Wrong variant: tap offsets built without the dilation (``off(k) = i W' + j``) read the wrong
    patch entries of a dilated conv; the same check rejects it (and passes the right offsets), with
    the padding copied into the input and read as an appended zero."""
    case = _case(
        dict(b=2, C=2, m=3, H=7, W=6, kh=3, kw=2, stride=(1, 1), padding=(2, 1), dilation=(2, 2), seed=1)
    )
    right = projections._shift_indices.__wrapped__

    def undilated(input_size, output_size, kernel_size, stride, padding, dilation, device):
        return right(input_size, output_size, kernel_size, stride, padding, (1, 1), device)

    _accepts_right_rejects_wrong(monkeypatch, case, undilated, pad_input, "G_i")


def test_shift_indices_refuse_an_output_that_does_not_fit():
    unit = (1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        projections._shift_indices.__wrapped__((4, 4), (5, 4), unit, unit, (0, 0), unit, torch.device("cpu"))


def test_the_default_conv_method_is_shifted_and_unknown_methods_are_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    assert DynamicsProbe(model).conv_method == CONV_METHODS[0] == "shifted"
    with pytest.raises(LipverifyError, match="must be one of shifted, conv, unfold, got 'im2col'"):
        DynamicsProbe(model, conv_method="im2col")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("channels", [3, 8])  # shifted: the padding copied (3) or read as a zero (8)
def test_conv_projections_on_cuda_match_and_do_not_synchronise(method, channels):
    """On CUDA the same check against explicit per-sample gradients; after the first call (which
    builds the shifted route's index tensors) a call makes no host synchronisation."""
    case = _case(
        dict(
            b=3, C=channels, m=4, H=9, W=8, kh=3, kw=3, stride=(2, 1), padding=(1, 1), dilation=(1, 2), seed=3
        )
    )
    assert projections._pads_input(channels, 9, (9, 8), (1, 1)) == (channels == 3)
    conv, *tensors = case
    cuda = [t.cuda() for t in tensors]
    contract(conv, "conv", *cuda, conv_method=method)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, x, _ = contract(conv, "conv", *cuda, conv_method=method)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(y.cpu(), x.cpu(), *case)
