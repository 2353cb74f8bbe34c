"""Conv operator norms (lipverify.conv), network bounds (lipverify.lipschitz) against dense matrices.

Tolerances: the certified bounds carry the relative margin ROUNDING_MARGIN (1e-10); the dense
reference's SVD is backward stable, relative error about n * eps (< 1e-12 for n <= 2000), so
``lower <= exact <= upper`` holds with no further slack and the exact circular case agrees to
``2 * ROUNDING_MARGIN`` relatively.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from derivations import conv_operator as dco
from lipverify._validation import LipverifyError
from lipverify.conv import (
    ROUNDING_MARGIN,
    apply_adjoint,
    conv_dense_matrix,
    conv_operator_norm,
    conv_spec,
    frequency_response,
    reshaped_sigma1,
    transfer_matrices,
)
from lipverify.lipschitz import (
    empirical_lower_bound,
    layer_sequence,
    network_upper_bound,
)
from lipverify.models import build_model

EXACT_TOL = 2 * ROUNDING_MARGIN


def _norm(a: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a, ord=2))


def _conv(c_in, c_out, k, stride, padding, dilation, mode="zeros", seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)


conv_cases = st.tuples(
    st.integers(1, 3),  # c_in
    st.integers(1, 3),  # c_out
    st.integers(1, 3),  # kernel
    st.integers(1, 2),  # stride
    st.integers(0, 2),  # padding
    st.integers(1, 2),  # dilation
    st.integers(3, 8),  # H
    st.integers(3, 8),  # W
    st.integers(0, 10_000),  # seed
)


@settings(max_examples=40, deadline=None)
@given(conv_cases)
def test_bounds_bracket_the_dense_operator_norm(case):
    c_in, c_out, k, s, p, d, H, W, seed = case
    if min(H, W) + 2 * p < d * (k - 1) + 1:
        return  # output would be empty: refused (tested below)
    conv = _conv(c_in, c_out, k, s, p, d, seed=seed)
    dense = conv_dense_matrix(conv, (c_in, H, W))
    # the dense reference is the module itself (bias-free) applied to a random input
    x = torch.randn(1, c_in, H, W, dtype=torch.float64)
    y = nn.functional.conv2d(x, conv.weight.double(), stride=s, padding=p, dilation=d)
    assert torch.allclose(dense @ x.flatten(), y.flatten(), atol=1e-12)
    exact = _norm(dense)
    b = conv_operator_norm(conv, (c_in, H, W), generator=torch.Generator().manual_seed(seed))
    assert b.lower <= exact <= b.upper
    # the adjoint used by the power iteration is the transpose of the dense matrix
    spec = conv_spec(conv, (c_in, H, W))
    yv = torch.randn(1, *spec.output_shape, dtype=torch.float64)
    assert torch.allclose(apply_adjoint(spec, yv).flatten(), dense.T @ yv.flatten(), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.sampled_from([1, 3]),
    st.integers(1, 2),
    st.integers(1, 2),
    st.integers(2, 4),
    st.integers(0, 10_000),
)
def test_upper_bound_is_exact_for_circular_padding(c_in, c_out, k, s, d, half, seed):
    n = 2 * half * s  # the stride divides the grid, and the grid holds the dilated kernel
    p = d * (k - 1) // 2  # L = H: the operator is the whole (strided) circular conv
    conv = _conv(c_in, c_out, k, s, p, d, "circular", seed)
    exact = _norm(conv_dense_matrix(conv, (c_in, n, n)))
    b = conv_operator_norm(conv, (c_in, n, n), generator=torch.Generator().manual_seed(seed))
    assert b.exact
    assert abs(b.upper - exact) <= EXACT_TOL * exact
    assert b.lower <= exact


def test_wrong_upper_bounds_are_rejected():
    """The reshaped sigma_1, a bound that ignores the dilation and one that ignores the stride each
    fail the same dense checks the real bound passes (the issue's setting: stride 2, padding 1)."""
    reshaped_below = 0
    for seed in range(10):
        conv = _conv(4, 8, 3, 2, 1, 1, seed=seed)
        exact = _norm(conv_dense_matrix(conv, (4, 8, 8)))
        assert conv_operator_norm(conv, (4, 8, 8)).upper >= exact
        reshaped_below += reshaped_sigma1(conv.weight) < exact
    assert reshaped_below > 0  # reshaped sigma_1 is not an upper bound
    # ignoring the dilation: the undilated kernel's circular norm misses the exact dilated norm
    conv = _conv(2, 3, 3, 1, 2, 2, "circular", seed=1)
    exact = _norm(conv_dense_matrix(conv, (2, 8, 8)))
    undilated = float(torch.linalg.matrix_norm(transfer_matrices(conv.weight, (8, 8)), ord=2).max())
    assert abs(undilated - exact) > 100 * EXACT_TOL * exact
    # ignoring the stride: the stride-1 circular norm is not the strided operator's norm
    conv = _conv(2, 3, 3, 2, 1, 1, "circular", seed=2)
    exact = _norm(conv_dense_matrix(conv, (2, 8, 8)))
    stride1 = float(torch.linalg.matrix_norm(transfer_matrices(conv.weight, (8, 8)), ord=2).max())
    assert abs(stride1 - exact) > 100 * EXACT_TOL * exact
    assert abs(conv_operator_norm(conv, (2, 8, 8)).upper - exact) <= EXACT_TOL * exact


@pytest.mark.parametrize("conj", [True, False], ids=["plus-sign", "wrong-sign"])
def test_transfer_matrices_act_on_fourier_modes(conj):
    """``C (v e_f) = (T_f v) e_f`` against the dense circular matrix; the convolution sign
    (``fft2`` without conjugation) is rejected for a non-symmetric kernel."""
    torch.manual_seed(3)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    n1, n2 = 5, 6
    dense = conv_dense_matrix(weight, (2, n1, n2), padding=1, padding_mode="circular").to(torch.complex128)
    t = transfer_matrices(weight, (n1, n2))
    if not conj:
        t = t.conj()
    g1, g2 = torch.meshgrid(
        torch.arange(n1, dtype=torch.float64), torch.arange(n2, dtype=torch.float64), indexing="ij"
    )
    worst = 0.0
    for f1 in range(n1):
        for f2 in range(n2):
            mode = torch.exp(2j * math.pi * (f1 * g1 / n1 + f2 * g2 / n2))
            v = torch.randn(2, dtype=torch.complex128)
            # circular padding 1 shifts the grid by one pixel: the mode picks up e^{-2 pi i f.1/N}
            shift = complex(
                torch.exp(torch.tensor(-2j * math.pi * (f1 / n1 + f2 / n2), dtype=torch.complex128))
            )
            lhs = dense @ (v[:, None, None] * mode).flatten()
            rhs = (shift * (t[f1, f2] @ v))[:, None, None] * mode
            worst = max(worst, float((lhs - rhs.flatten()).abs().max()))
    if conj:
        assert worst < 1e-12
    else:
        assert worst > 1e-3


def test_frequency_response_against_dense_circular_matrix():
    torch.manual_seed(4)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    fr = frequency_response(weight, (8, 8))
    exact = _norm(conv_dense_matrix(weight, (3, 8, 8), padding=1, padding_mode="circular"))
    assert abs(fr.norm - exact) <= EXACT_TOL * exact
    assert max(v for v in fr.radial_profile if v is not None) == pytest.approx(fr.norm, rel=1e-15)
    assert fr.radial_profile[0] == pytest.approx(_norm(weight.sum((2, 3))), rel=1e-12)  # f = 0: sum of taps


@pytest.mark.parametrize("grid", [(4, 5), (6, 6)])
def test_derivation_singular_values_and_wrong_normalisation(grid):
    ok = dco.singular_values_numeric(3, 2, grid)
    assert ok.agrees
    assert not dco.singular_values_numeric(3, 2, grid, wrong="ortho").agrees


@pytest.mark.parametrize("shape", [(3, 1, 1), (4, 1, 1), (3, 2, 2), (4, 2, 1)])
def test_derivation_block_diagonal_symbolic(shape):
    assert dco.block_diagonal_symbolic(*shape).error == 0.0
    assert not dco.block_diagonal_symbolic(*shape, wrong=True).agrees


def test_refusals():
    with pytest.raises(LipverifyError, match="reflect"):
        conv_operator_norm(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 5, 5))
    with pytest.raises(LipverifyError, match="grouped"):
        conv_operator_norm(nn.Conv2d(2, 2, 3, groups=2), (2, 5, 5))
    with pytest.raises(LipverifyError, match="smaller than the dilated kernel"):
        conv_operator_norm(nn.Conv2d(1, 1, 3, dilation=2), (1, 4, 4))
    with pytest.raises(LipverifyError, match="rows of the circular conv repeat"):
        conv_operator_norm(nn.Conv2d(1, 1, 1, padding=2, padding_mode="circular"), (1, 3, 3))


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-2, 2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        bn,
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )


def test_network_upper_bound_dominates_empirical_lower_bound():
    model = _small_cnn()
    nb = network_upper_bound(model, (1, 8, 8))
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    emp = empirical_lower_bound(model, x, generator=torch.Generator().manual_seed(0))
    assert 0 < emp.secant_at_samples <= emp.secant <= nb.upper
    assert emp.jacobian <= nb.upper
    # the product of per-map factors
    assert nb.upper == pytest.approx(math.prod(lb.factor for lb in nb.layers.values()), rel=1e-15)


def test_K_is_not_an_upper_bound_but_the_certified_one_is():
    """A one-conv network whose reshaped sigma_1 (K = 3, an all-ones 3x3 kernel) is far below its
    Lipschitz constant (about 9 on a 16x16 input): the empirical lower bound exceeds K (so K fails
    the same check the certified bound passes)."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = nn.Sequential(conv, nn.Flatten())
    nb = network_upper_bound(model, (1, 16, 16))
    emp = empirical_lower_bound(model, torch.rand(4, 1, 16, 16), iterations=50)
    assert nb.K == pytest.approx(3.0, rel=1e-12)
    assert emp.secant > nb.K * 2
    assert emp.secant <= nb.upper


def test_overlapping_max_pool_is_not_one_lipschitz_and_is_bounded_honestly():
    pool = nn.MaxPool2d(2, stride=1)  # every window of a 3x3 input holds the centre pixel
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = 1.0
    ratio = float((pool(x) - pool(torch.zeros_like(x))).norm() / x.norm())
    assert ratio == pytest.approx(2.0)  # > 1: a 1-Lipschitz claim would be wrong
    nb = network_upper_bound(nn.Sequential(pool), (1, 3, 3))
    assert nb.upper >= ratio and nb.layers["0"].factor == pytest.approx(2.0)


def test_refused_layers_and_batch_statistics():
    with pytest.raises(LipverifyError, match="Softmax"):
        network_upper_bound(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), (3,))
    bn_model = build_model("convnet", batch_norm=True, seed=0)
    with pytest.raises(LipverifyError, match="batch's own statistics"):
        network_upper_bound(bn_model, (3, 32, 32))
    with pytest.raises(LipverifyError, match="no layer order"):
        layer_sequence(nn.ModuleList([nn.Linear(2, 2)]))


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_layer_sequence_reproduces_the_model(name):
    model = build_model(name, seed=0)
    shape = (784,) if name == "mlp" else (3, 32, 32)
    nb = network_upper_bound(model, shape)  # raises if the sequence differs from the forward
    sig = {n: lb.reshaped for n, lb in nb.layers.items() if lb.reshaped is not None}
    # K as the framework computes it: sigma_1 of each weight's matrix view
    from lipverify.probe import DynamicsProbe

    probe_sig = DynamicsProbe(model, population_size=1000).sigmas()
    assert sig.keys() == probe_sig.keys()
    for n in sig:
        assert sig[n] == pytest.approx(probe_sig[n], rel=1e-5)  # float32 weights, float64 SVD
    assert nb.upper >= nb.K if name == "mlp" else nb.upper > nb.K


def test_tap_sum_equals_fft_of_the_embedded_kernel():
    """The tap sum of transfer_matrices against conj(fft2) of the kernel placed on the grid (with
    aliasing taps when the dilated kernel is wider than the grid)."""
    from lipverify.conv import _embedded_kernel

    torch.manual_seed(5)
    weight = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    for grid, dilation in (((6, 7), (1, 1)), ((5, 4), (2, 3)), ((3, 3), (2, 2))):
        fft = torch.fft.fft2(_embedded_kernel(weight, grid, dilation)).conj().permute(2, 3, 0, 1)
        assert torch.allclose(transfer_matrices(weight, grid, dilation), fft, atol=1e-12)


def test_bench_conv_runs_and_reports_the_ratio():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_conv.py"
    cmd = [sys.executable, str(script), "--repeats", "1", "--batch-size", "4", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["fft_upper"]["median_s"] > 0 and r["plain_step"]["median_s"] > 0
    assert r["ratio_median"] == pytest.approx(r["fft_upper"]["median_s"] / r["plain_step"]["median_s"])
    assert r["conv_inputs"] == {"conv1": [3, 32, 32], "conv2": [32, 16, 16], "conv3": [64, 8, 8]}
