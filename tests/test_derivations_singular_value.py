"""Lemmas 12, 13 and the spectrum of H by implicit differentiation (derivations.singular_value)."""

import pytest

from derivations import singular_value as sv


@pytest.mark.parametrize(
    "derive",
    [sv.lemma12_symbolic_2x2, sv.lemma13_symbolic_2x2, sv.trace_symbolic_2x2],
    ids=lambda f: f.__name__,
)
def test_symbolic_2x2_identical_and_wrong_variant_differs(derive):
    correct, wrong = derive(), derive(wrong=True)
    assert correct.error == 0.0 and correct.agrees
    assert wrong.error > 1e-3 and not wrong.agrees


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (3, 4), (4, 3)])
def test_exact_rational_svd_matrices(shape):
    lemma12, lemma13 = sv.lemma12_13_exact(*shape, seed=1)
    assert lemma12.error == 0.0 and lemma13.error == 0.0
    wrong12, wrong13 = sv.lemma12_13_exact(*shape, seed=1, wrong=True)
    assert wrong12.error > 1e-3 and wrong13.error > 1e-3


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (3, 4), (4, 3)])
def test_high_precision_generic_rational(shape):
    for correct in sv.lemma12_13_high_precision(*shape, seed=2):
        assert correct.error < sv.HIGH_PRECISION_TOLERANCE
    for wrong in sv.lemma12_13_high_precision(*shape, seed=2, wrong=True):
        assert wrong.error > 1e-3


@pytest.mark.parametrize("shape", [(2, 3), (4, 3)])
def test_hessian_spectrum_and_trace_exact(shape):
    spectrum, trace = sv.hessian_spectrum_exact(*shape, seed=3)
    assert spectrum.error == 0.0 and trace.error == 0.0
    wrong_spectrum, wrong_trace = sv.hessian_spectrum_exact(*shape, seed=3, wrong=True)
    assert wrong_spectrum.error > 1e-3 and wrong_trace.error > 1e-3


def test_trace_pair_term_is_factored():
    term, (s1, sk) = sv.trace_pair_term_symbolic()
    assert term == 2 * s1 / ((s1 - sk) * (s1 + sk))


@pytest.mark.parametrize("shape", [(2, 3), (3, 2), (3, 3)])
def test_lemma12_exact_in_number_field(shape):
    correct = sv.lemma12_algebraic(*shape, seed=4)
    assert correct.error == 0.0 and "exact in Q(σ1)" in correct.method
    assert sv.lemma12_algebraic(*shape, seed=4, wrong=True).error > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 4), (4, 3)])
def test_lemma12_exact_in_number_field_large(shape):
    assert sv.lemma12_algebraic(*shape, seed=5).error == 0.0


@pytest.mark.parametrize("shape", [(2, 3), (3, 2)])
def test_lemma13_exact_in_number_field(shape):
    correct = sv.lemma13_resolvent_algebraic(*shape, seed=6)
    assert correct.error == 0.0
    assert sv.lemma13_resolvent_algebraic(*shape, seed=6, wrong=True).error > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 4), (4, 3)])
def test_lemma13_exact_in_number_field_large(shape):
    assert sv.lemma13_resolvent_algebraic(*shape, seed=7).error == 0.0
    assert sv.lemma13_resolvent_algebraic(*shape, seed=7, wrong=True).error > 1e-3
