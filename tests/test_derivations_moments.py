"""Lemma 19, Theorem 17, Propositions 20, 21 (derivations.moments)."""

import sympy as sp

from derivations import moments


def test_lemma19():
    assert moments.lemma19_piecewise().error == 0.0
    assert moments.lemma19_piecewise(wrong=True).error > 1e-3
    assert moments.lemma19_riemann_limit().error == 0.0
    assert moments.lemma19_riemann_limit(wrong=True).error > 1e-3


def test_theorem17():
    mean, var = moments.theorem17()
    assert mean.error == 0.0 and var.error == 0.0
    assert all(d.error > 1e-3 for d in moments.theorem17(wrong=True))


def test_variance_in_terms_of_mean():
    expr, (mean, Phi) = moments.theorem17_variance_from_mean()
    assert sp.simplify(expr - mean**2 * (sp.exp(Phi) - 1)) == 0


def test_proposition20():
    assert moments.proposition20(2).error == 0.0
    assert moments.proposition20(2, wrong=True).error > 0
    assert moments.proposition20_growth().error == 0.0
    assert moments.proposition20_growth(wrong=True).error > 1e-3


def test_proposition21():
    assert all(d.error == 0.0 for d in moments.proposition21())
    assert all(d.error > 1e-3 for d in moments.proposition21(wrong=True))
    expr, (value, b, b_new) = moments.rescale_noise_term()
    assert sp.simplify(expr - value * b / b_new) == 0
