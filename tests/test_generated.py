"""lipverify/_generated.py is in sync with the derivations and evaluates like exact arithmetic."""

import random

import pytest
import sympy as sp
import torch

from derivations import codegen
from lipverify import _generated
from lipverify.verification import load_checks


def test_generated_file_is_up_to_date(tmp_path):
    assert codegen.TARGET.read_text() == codegen.generate()
    assert codegen.main(["--check"]) == 0
    stale = tmp_path / "_generated.py"
    stale.write_text(codegen.TARGET.read_text().replace("2*sigma1", "3*sigma1"))
    assert codegen.main(["--check", "--output", str(stale)]) == 1


def test_regeneration_is_deterministic():
    assert codegen.generate() == codegen.generate()


def test_headers_name_source_and_hash():
    text = codegen.TARGET.read_text()
    for spec in codegen.SPECS:
        expr, _ = spec.build()
        assert f"Source: {spec.source}; sha256(srepr) = {codegen.expression_hash(expr)}" in text


@pytest.mark.parametrize("spec", codegen.SPECS, ids=lambda s: s.name)
def test_generated_matches_exact_evaluation(spec):
    expr, args = spec.build()
    func = getattr(_generated, spec.name)
    rng = random.Random(sum(map(ord, spec.name)))
    for _ in range(5):
        point = {}
        for a in args:
            if a.name in ("m", "n", "r"):
                point[a] = sp.Integer(rng.randint(1, 5))
            else:
                point[a] = sp.Rational(rng.randint(1, 400), rng.randint(100, 300))
        if "sigmak" in point:
            point[sp.Symbol("sigmak", positive=True)] = point[args[0]] * sp.Rational(rng.randint(1, 90), 100)
        exact = expr.subs(point).evalf(40)
        values = [torch.tensor(float(point[a]), dtype=torch.float64) for a in args]
        got = func(*values)
        assert float(got) == pytest.approx(float(exact), rel=1e-13, abs=1e-300)


def test_trace_pair_term_keeps_factored_form():
    assert "(sigma1 - sigmak)*(sigma1 + sigmak)" in codegen.TARGET.read_text()


def test_core_uses_generated_trace():
    from lipverify.spectral import hessian, hessian_trace

    W = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert float(hessian_trace(W)) == pytest.approx(float(torch.trace(hessian(W))), rel=1e-10)


def test_symbolic_checks_pass():
    checks = [c for c in load_checks() if c.kind == "symbolic" and not c.exhaustive]
    assert {c.result for c in checks} >= {
        "Lemma 12",
        "Lemma 13",
        "tr H / eigenvalues of H",
        "Proposition 5",
        "Proposition 6",
        "Proposition 7",
        "Theorem 14",
        "Theorem 15",
        "Theorem 16",
        "Lemma 19",
        "Theorem 17",
        "Proposition 20",
        "Proposition 21",
    }
    for check in checks:
        outcome = check.run()
        assert outcome.passed, (check.name, outcome)
