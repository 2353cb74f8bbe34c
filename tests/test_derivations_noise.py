"""Propositions 5, 6, 7 over all ordered samples of a symbolic population (derivations.noise)."""

import pytest

from derivations import noise


@pytest.mark.parametrize("size,b,replacement", [(3, 2, True), (3, 3, True), (4, 2, False), (4, 3, False)])
def test_proposition5(size, b, replacement):
    assert noise.proposition5(size, b, replacement).error == 0.0
    assert noise.proposition5(size, b, replacement, wrong=True).error > 1e-3


def test_proposition6():
    diag, not_psd = noise.proposition6()
    assert diag.error == 0.0 and not_psd.derived < 0
    assert noise.proposition6(wrong=True)[0].error > 1e-3


def test_proposition7_symbolic_b2():
    assert noise.proposition7(2).error == 0.0
    assert noise.proposition7(2, wrong=True).error > 1e-3


@pytest.mark.slow
def test_proposition7_b3_exact():
    assert noise.proposition7(3, seed=1).error == 0.0
    assert noise.proposition7(3, seed=1, wrong=True).error > 1e-3
