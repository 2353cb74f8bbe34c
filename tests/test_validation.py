"""Bad input gets a LipverifyError that names the problem (MATH section 7)."""

from __future__ import annotations

import pytest
import torch

from lipverify import LipverifyError
from lipverify.dynamics import layer_terms
from lipverify.noise import batch_noise_covariance, noise_sqrt, variance_covariance_split
from lipverify.spectral import (
    hessian,
    hessian_quadratic_form,
    hessian_trace,
    jacobian,
    spectral_gap,
    top_singular,
)

F64 = torch.float64
W_OK = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
G_OK = torch.randn(4, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))

SPECTRAL_FUNCTIONS = {
    "top_singular": top_singular,
    "spectral_gap": spectral_gap,
    "jacobian": jacobian,
    "hessian": hessian,
    "hessian_trace": hessian_trace,
    "hessian_quadratic_form": lambda W: hessian_quadratic_form(W, torch.ones(2, 3, dtype=F64)),
    "layer_terms": lambda W: layer_terms(W, G_OK, 0.1),
}


@pytest.mark.parametrize("function", SPECTRAL_FUNCTIONS.values(), ids=SPECTRAL_FUNCTIONS.keys())
@pytest.mark.parametrize(
    ("W", "message"),
    [
        (torch.zeros(2, 3, dtype=F64), "identically zero"),
        (torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 0.0]], dtype=F64), "non-finite"),
        (torch.tensor([[1.0, float("inf"), 0.0], [0.0, 1.0, 0.0]], dtype=F64), "non-finite"),
        (torch.ones(2, 3, dtype=torch.int64), "unsupported dtype"),
        (torch.ones(2, 3, dtype=torch.complex128), "unsupported dtype"),
        (torch.ones(2, 3, 1, dtype=F64), "matrix of shape"),
        (torch.ones(0, 3, dtype=F64), "empty"),
    ],
    ids=["zero", "nan", "inf", "int", "complex", "3d", "empty"],
)
def test_bad_weight_is_named(function, W, message):
    with pytest.raises(LipverifyError, match=message):
        function(W)


def test_weight_must_be_a_tensor():
    for function in (top_singular, hessian, jacobian, hessian_trace):
        with pytest.raises(LipverifyError, match=r"must be a torch\.Tensor"):
            function([[1.0, 0.0]])


@pytest.mark.parametrize(
    "call",
    [
        lambda G: batch_noise_covariance(G),
        lambda G: variance_covariance_split(G),
        lambda G: noise_sqrt(G),
        lambda G: layer_terms(W_OK, G.reshape(-1, 2, 3), 0.1),
    ],
    ids=["covariance", "split", "sqrt", "layer_terms"],
)
def test_batch_of_one_is_refused(call):
    with pytest.raises(LipverifyError, match=r"b = 1.*b >= 2"):
        call(torch.randn(1, 6, dtype=F64))


@pytest.mark.parametrize(
    ("G", "message"),
    [
        (torch.randn(4, 3, 2, dtype=F64), r"shape mismatch.*\(3, 2\).*\(2, 3\)"),
        (torch.randn(4, 5, dtype=F64), r"shape mismatch.*5 columns.*m\*n = 6"),
        (torch.randn(4, dtype=F64), "must have shape"),
        (torch.ones(4, 2, 3, dtype=torch.int32), "unsupported dtype"),
        (torch.ones(4, 2, 3, dtype=torch.complex64), "unsupported dtype"),
        (torch.full((4, 2, 3), float("nan"), dtype=F64), "non-finite"),
    ],
    ids=["3d-mismatch", "2d-mismatch", "1d", "int", "complex", "nan"],
)
def test_bad_per_sample_gradients_in_layer_terms(G, message):
    with pytest.raises(LipverifyError, match=message):
        layer_terms(W_OK, G, 0.1)


@pytest.mark.parametrize(
    ("G", "message"),
    [
        (torch.ones(4, 6, dtype=torch.int64), "unsupported dtype"),
        (torch.ones(4, 6, dtype=torch.complex128), "unsupported dtype"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]], dtype=F64), "non-finite"),
        (torch.ones(4, dtype=F64), "must have shape"),
    ],
    ids=["int", "complex", "inf", "1d"],
)
@pytest.mark.parametrize("function", [batch_noise_covariance, variance_covariance_split, noise_sqrt])
def test_bad_gradients_in_noise_functions(function, G, message):
    with pytest.raises(LipverifyError, match=message):
        function(G)


def test_population_smaller_than_batch():
    with pytest.raises(LipverifyError, match="smaller than the batch size"):
        batch_noise_covariance(torch.randn(5, 3, dtype=F64), population_size=4)


def test_dense_covariance_too_large():
    with pytest.raises(LipverifyError, match="exceeds the limit"):
        batch_noise_covariance(torch.randn(2, 10_000, dtype=torch.float32))


def test_noise_sqrt_apply_length_mismatch():
    with pytest.raises(LipverifyError, match="shape mismatch"):
        noise_sqrt(torch.randn(3, 4, dtype=F64)).apply(torch.randn(5, dtype=F64))


def test_mean_grad_mismatch_and_dtype():
    with pytest.raises(LipverifyError, match="mean_grad has shape"):
        layer_terms(W_OK, G_OK, 0.1, mean_grad=torch.ones(3, 2, dtype=F64))
    with pytest.raises(LipverifyError, match="mean_grad has unsupported dtype"):
        layer_terms(W_OK, G_OK, 0.1, mean_grad=torch.ones(2, 3, dtype=torch.complex128))
    with pytest.raises(LipverifyError, match="mu is not finite"):
        layer_terms(W_OK, G_OK, 0.1, mean_grad=torch.full((2, 3), float("nan"), dtype=F64))


@pytest.mark.parametrize(
    ("E", "message"),
    [
        (torch.ones(3, 2, dtype=F64), r"shape mismatch.*\(3, 2\)"),
        (torch.ones(3, dtype=F64), "shape mismatch"),
        (torch.tensor([[1.0, 0.0, float("nan")], [0.0, 0.0, 0.0]], dtype=F64), "non-finite"),
        (torch.ones(2, 3, dtype=torch.complex128), "unsupported dtype"),
    ],
    ids=["transposed", "1d", "nan", "complex"],
)
def test_bad_direction(E, message):
    with pytest.raises(LipverifyError, match=message):
        hessian_quadratic_form(W_OK, E)


def test_unknown_method_and_dense_limit():
    with pytest.raises(LipverifyError, match="unknown method 'eigen'"):
        hessian_quadratic_form(W_OK, torch.ones(2, 3, dtype=F64), method="eigen")
    with pytest.raises(LipverifyError, match="use hessian_quadratic_form instead"):
        hessian(torch.ones(100, 100, dtype=F64))


def test_all_finite_is_exact():
    """The fast float64-sum test never accepts a non-finite tensor and never rejects a finite one
    whose sum overflows."""
    from lipverify._validation import all_finite

    assert all_finite(torch.tensor([1e308, 1e308], dtype=F64))
    assert all_finite(torch.full((3,), 6e4, dtype=torch.float16))
    assert all_finite(torch.tensor([3e38, 3e38], dtype=torch.float32))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")], dtype=F64))
    assert not all_finite(torch.tensor([1e308, float("inf")], dtype=F64))
