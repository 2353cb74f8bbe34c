"""The Itô-lemma engine and Theorems 14-16 (derivations.ito)."""

import pytest
import sympy as sp

from derivations import ito
from lipverify import LipverifyError


def test_engine_on_known_case():
    x, y, a1, a2, b = sp.symbols("x y a1 a2 b")
    res = ito.ito(x * y, [x, y], [a1, a2], sp.Matrix([[b], [b]]))
    assert sp.expand(res.drift - (y * a1 + x * a2 + b**2)) == 0
    assert sp.expand(res.diffusion[0, 0] - b * (x + y)) == 0


def test_theorem14_general_and_wrong_variant():
    assert ito.theorem14_general().error == 0.0
    assert ito.theorem14_general(second_order=False).error > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_theorem14_sigma1_2x2(seed):
    assert ito.theorem14_sigma1_2x2(seed).error < 1e-40
    assert ito.theorem14_sigma1_2x2(seed, second_order=False).error > 1e-4


def test_theorem15_and_16():
    assert ito.theorem15().error == 0.0
    assert ito.theorem15(second_order=False).error > 1e-3
    exp_form, prod_form = ito.theorem16()
    assert exp_form.error == 0.0 and prod_form.error == 0.0
    assert ito.theorem16(second_order=False)[0].error > 1e-3


def test_log_drift_combination():
    expr, (mu, psi, phi_sq) = ito.log_drift_combination()
    assert sp.expand(expr - (mu + psi - phi_sq / 2)) == 0


@pytest.mark.parametrize(
    "make_f",
    [
        lambda x, y: sp.Abs(x),
        lambda x, y: sp.Max(x, y),
        lambda x, y: sp.sign(x) * y,
        lambda x, y: sp.Heaviside(x),
        lambda x, y: sp.Piecewise((x, x > 0), (0, True)),
    ],
)
def test_non_smooth_expression_refused(make_f):
    x, y = sp.symbols("x y")
    with pytest.raises(LipverifyError, match="not twice continuously differentiable"):
        ito.ito(make_f(x, y), [x, y], [1, 1], sp.eye(2))


def test_dimension_mismatch_refused():
    x, y = sp.symbols("x y")
    with pytest.raises(ito.ItoInputError, match="drift a has 3 entries, state x has 2"):
        ito.ito(x * y, [x, y], [1, 2, 3], sp.eye(2))
    with pytest.raises(ito.ItoInputError, match="diffusion B has 3 rows, state x has 2"):
        ito.ito(x * y, [x, y], [1, 2], sp.eye(3))


def test_non_scalar_expression_refused():
    x, y = sp.symbols("x y")
    with pytest.raises(ito.ItoInputError, match="scalar SymPy expression"):
        ito.ito(sp.Matrix([x, y]), [x, y], [1, 1], sp.eye(2))
