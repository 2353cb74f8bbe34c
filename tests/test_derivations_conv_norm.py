"""Complex Lemmas 12/13 derived and checked in derivations.conv_norm, each with its wrong variants."""

import pytest

from derivations import conv_norm as cn

WRONG = [("modulus", "real_formula"), ("unconjugated", "real_parts")]


def test_symbolic_row_identical_and_wrong_variants_differ():
    jac, hess = cn.symbolic_row(2)
    assert jac.error == 0.0 and hess.error == 0.0
    for jv, hv in WRONG:
        wrong_jac, wrong_hess = cn.symbolic_row(2, jv, hv)
        assert wrong_jac.error > 1e-3 and wrong_hess.error > 1e-3


@pytest.mark.parametrize("shape", [(2, 2), (2, 3), (3, 2)])
def test_high_precision_implicit_differentiation(shape):
    jac, hess = cn.high_precision(*shape, seed=1)
    assert jac.agrees and hess.agrees, (jac.error, hess.error)
    for jv, hv in WRONG:
        wrong_jac, wrong_hess = cn.high_precision(*shape, seed=1, jac_variant=jv, hess_variant=hv)
        assert wrong_jac.error > 1e-3 and wrong_hess.error > 1e-3


@pytest.mark.parametrize("shape", [(2, 3), (3, 2)])
def test_real_case_reduces_to_lemma_12_13(shape):
    jac, hess = cn.real_case(*shape, seed=4)
    assert jac.agrees and hess.agrees, (jac.error, hess.error)
    wrong_jac, wrong_hess = cn.real_case(*shape, seed=4, wrong_reference=True)
    assert wrong_jac.error > 1e-3 and wrong_hess.error > 1e-3


def test_real_embedding_doubles_the_top():
    assert cn.real_embedding(2, 3, seed=5).agrees
    # an embedding with a simple top (sigma_2(embedding) = sigma_2(A)) is rejected
    assert cn.real_embedding(2, 3, seed=5, assume_doubled=False).error > 1e-3
