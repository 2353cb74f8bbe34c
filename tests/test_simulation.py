"""The Monte Carlo validations (lipverify.simulation), their checks and ``lipverify simulate``.

Every validation must pass with its fixed seed AND reject its wrong variant(s); each row's
tolerance is z * (MC standard error) + a derived step-size bias bound (see the docstrings).
"""

from __future__ import annotations

import pytest

from lipverify import LipverifyError
from lipverify import simulation as sim
from lipverify.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def _assert_validation(result: sim.ValidationResult, prefixes: list[str]) -> None:
    assert result.passed, result.table()
    for prefix in prefixes:
        rows = [r for r in result.select(prefix) if not r.diagnostic]
        assert any(not r.wrong for r in rows), prefix
        assert any(r.wrong for r in rows), f"{prefix}: no wrong variant"
        for r in rows:
            assert r.within != r.wrong, (r.quantity, r.note, r.estimate, r.predicted, r.allowance)
        c = result.comparison(prefix)
        assert c.max_error <= c.tolerance < c.wrong_error


@pytest.fixture(scope="module")
def matrix():
    return sim.matrix_sde()


@pytest.fixture(scope="module")
def twolayer():
    return sim.two_layer()


def test_lognormal_moments():
    rows, series = sim.lognormal_moments()
    _assert_validation(sim.ValidationResult("lognormal", rows, series), ["Thm 17", "Thm 15", "Lemma 19"])


def test_ou():
    _assert_validation(sim.ou(), ["OU E", "OU Var"])


def test_matrix_sde_mean_and_pathwise(matrix):
    _assert_validation(matrix, ["Thm 14 E", "Thm 14 pathwise E[R^2]"])
    rate = next(r for r in matrix.rows if r.quantity == "Thm 14 pathwise RMS rate" and not r.wrong)
    assert rate.ok
    assert matrix.info["mean_int_psi"] > 0  # psi >= 0 (Theorem 14)


def test_two_layer_ln_k_and_k(twolayer):
    _assert_validation(twolayer, ["Thm 15 E", "Thm 16 E"])
    assert twolayer.info["mean_int_phi_sq"] > 0


def test_discrete_sgd_refuses_an_sde_step_that_does_not_divide_the_horizon():
    # round(10 / 0.3) = 33 SDE steps cover 9.9, not the 10 SGD steps they are compared with
    with pytest.raises(LipverifyError, match="does not divide the 10 SGD steps"):
        sim.discrete_sgd(lrs=(0.2,), sde_dt=0.3, seeds=10, paths=10, quiet=True)


def test_discrete_sgd_gap_shrinks_with_eta():
    r = sim.discrete_sgd(seeds=10000, paths=2000)
    _assert_validation(r, ["relative gap std"])
    assert all(row.ok for row in r.rows)


def test_batch_size_exponent():
    r = sim.batch_size_scaling()
    _assert_validation(r, ["Prop 21 exponent of std"])
    assert r.info["wrong_slope"] < -0.9


def test_torchsde_agreement():
    pytest.importorskip("torchsde")
    r = sim.torchsde_comparison(paths=500, steps=50)
    _assert_validation(r, ["lognormal: max", "matrix_sde: max"])
    assert r.info["lognormal"]["speed_ratio"] > 0


def test_checks_are_registered_for_every_required_result():
    from lipverify.verification import load_checks

    checks = [c for c in load_checks() if c.kind == "monte_carlo"]
    results = {c.result for c in checks}
    assert {"Theorem 14", "Theorem 15", "Theorem 16", "Lemma 19", "Theorem 17", "Proposition 21"} <= results
    assert any(c.exhaustive for c in checks) and any(not c.exhaustive for c in checks)
    fast = next(c for c in checks if c.func.__name__ == "proposition21_lognormal")
    outcome = fast.run()
    assert outcome.passed, outcome


def test_cli_writes_table_and_figures(tmp_path, capsys):
    out = tmp_path / "ou"
    assert main(["simulate", "ou", "--paths", "4000", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "OU E[X_T]" in text and "overall: PASS" in text
    assert (out / "ou_band.png").stat().st_size > 0
    assert (out / "results.json").exists()
    out2 = tmp_path / "bs"
    assert (
        main(["simulate", "batch_size", "--paths", "4000", "--out", str(out2), "--no-plot", "--quiet"]) == 0
    )
    assert not list(out2.glob("*.png"))


def test_cli_bad_input(tmp_path, capsys):
    assert main(["simulate", "ou", "--paths", "0", "--out", str(tmp_path)]) == 2
    assert "--paths" in capsys.readouterr().err
    assert main(["simulate", "matrix_sde", "--steps", "10", "--out", str(tmp_path)]) == 2


def test_cli_orders_plot(tmp_path):
    from lipverify.commands.simulate import plot

    rows, s = sim.strong_weak_orders("euler")
    res = sim.ValidationResult("lognormal", rows, {"orders": {"euler": s}})
    paths = plot(res, tmp_path)
    assert [p.name for p in paths] == ["lognormal_orders.png"]


@pytest.mark.slow
def test_precise_matrix_and_two_layer():
    _assert_validation(
        sim.matrix_sde(paths=4000, levels=(10, 20, 40, 80, 160)), ["Thm 14 E", "Thm 14 pathwise E"]
    )
    _assert_validation(sim.two_layer(paths=4000, levels=(20, 40, 80, 160)), ["Thm 15 E", "Thm 16 E"])


@pytest.mark.slow
def test_precise_lognormal_and_orders():
    rows, series = sim.lognormal_moments(200000, 1024)
    _assert_validation(sim.ValidationResult("lognormal", rows, series), ["Thm 17", "Thm 15", "Lemma 19"])
    for scheme in ("euler", "milstein"):
        rows, _ = sim.strong_weak_orders(scheme, strong_paths=8000, weak_paths=200000)
        assert all(r.ok for r in rows), rows


@pytest.mark.slow
def test_precise_discrete_sgd_and_matrix_batch_size():
    _assert_validation(sim.discrete_sgd(lrs=(0.2, 0.1, 0.05, 0.025)), ["relative gap std"])
    _assert_validation(sim.matrix_batch_size_scaling(), ["Prop 21"])
