"""Three-way verdict of the Monte Carlo validations, ``lipverify simulate`` errors and figures.

pass: correct rows within their intervals and every wrong variant rejected; fail: a correct
row rejected (or a wrong variant accepted although the check had the power to reject it);
inconclusive: the intervals are too wide to tell the wrong variant from the correct one.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from lipverify import simulation as sim
from lipverify.cli import main
from lipverify.problems import LognormalBound
from lipverify.simulation.results import FAIL, INCONCLUSIVE, PASS, Row, ValidationResult, paths_needed

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def _moments(paths: int) -> ValidationResult:
    rows, series = sim.lognormal_moments(paths)
    return ValidationResult("lognormal", rows, series)


def test_lognormal_200_paths_is_inconclusive_with_a_path_estimate():
    r = sim.lognormal(paths=200, schemes=("euler",))
    assert r.verdict == INCONCLUSIVE, r.table()
    assert not r.passed
    n = r.paths_estimate
    assert 200 < n < 10**6
    assert f"needs about {int(n)} paths" in r.table()
    assert "overall: INCONCLUSIVE" in r.table()


def test_lognormal_default_paths_pass():
    assert _moments(20000).verdict == PASS


def test_wrong_itô_formula_fails_not_inconclusive(monkeypatch):
    # Theorem 17 without the Itô term (K0 exp(int a - Phi/2)) as the "correct" prediction: the
    # bias allowance must not absorb it (it is built from the Euler chain, not the formula).
    def mean_without_ito(self, t):
        return self.k0 * math.exp(self.int_a(t) - self.int_b2(t) / 2)

    monkeypatch.setattr(LognormalBound, "mean", mean_without_ito)
    r = _moments(20000)
    assert r.verdict == FAIL, r.table()
    mean_row = next(row for row in r.rows if row.quantity == "Thm 17 E[K_T]" and not row.wrong)
    assert r.row_verdict(mean_row)[0] == FAIL


def test_paths_needed_matches_its_derivation():
    # separation 1, biases 0.1 + 0.1, spread z (0.2 + 0.2) at n = 100:
    # n' = 100 (0.4 z / 0.8)^2 = 25 z^2; at n' paths the pair has exactly the power it needs.
    z = 2.0
    good = Row("q", 0.0, 0.0, 0.2, 0.1, z=z, paths=100)
    bad = Row("q", 1.0, 0.0, 0.2, 0.1, wrong=True, z=z, paths=100)
    n = paths_needed(good, bad)
    assert n == math.ceil(100 * (z * 0.4 / 0.8) ** 2)
    shrink = math.sqrt(100 / n)
    good_n = Row("q", 0.0, 0.0, 0.2 * shrink, 0.1, z=z)
    bad_n = Row("q", 1.0, 0.0, 0.2 * shrink, 0.1, wrong=True, z=z)
    assert good_n.allowance + bad_n.allowance <= 1.0 + 1e-12
    # bias >= separation: no path count helps
    assert math.isinf(paths_needed(Row("q", 0.0, 0.0, 0.2, 0.6), Row("q", 1.0, 0.0, 0.2, 0.6, wrong=True)))


def test_wrong_variant_accepted_is_inconclusive_only_without_power():
    # different estimates, same prediction (like SGD - SDE gaps): separation 0.99
    good = Row("gap", 0.0, 0.01, 0.01, z=1.0, paths=1000)
    bad = Row("gap", 0.0, 1.0, 2.0, wrong=True, z=1.0, paths=1000)  # accepted: own interval wide
    r = ValidationResult("x", [good, bad])
    assert r.verdict == INCONCLUSIVE
    assert r.comparison("gap").inconclusive
    assert r.paths_estimate == paths_needed(good, bad) > 1000
    bad.stderr, bad.bias = 0.0, 2.0  # accepted because of its bias bound: no path count helps
    assert r.row_verdict(bad) == (
        INCONCLUSIVE,
        "inconclusive: step-size bias >= separation: needs smaller steps",
    )
    # the same estimate, predictions 1 apart, intervals 0.01: the wrong one is accepted only
    # because the estimate sits on it, i.e. the correct prediction is rejected -> fail
    good = Row("q", 0.0, 0.995, 0.01, z=1.0)
    bad = Row("q", 1.0, 0.995, 0.01, wrong=True, z=1.0)
    r = ValidationResult("x", [good, bad])
    assert r.row_verdict(good)[0] == FAIL and r.row_verdict(bad)[0] == FAIL
    assert r.verdict == FAIL and not r.comparison("q").inconclusive


def test_verify_outcome_and_exit_code_express_inconclusive(monkeypatch, capsys):
    from lipverify.commands import verify
    from lipverify.verification import Check, Comparison

    def inconclusive() -> Comparison:
        return _moments(200).comparison("Thm 17")

    check = Check("Theorem 17", "lognormal at 200 paths", "monte_carlo", "E[K_t]", inconclusive)
    outcome = check.run()
    assert outcome.is_inconclusive and not outcome.passed, outcome
    assert "needs about" in outcome.inconclusive
    assert verify._overall([outcome]) == "inconclusive"
    assert verify._status(outcome).startswith("inconclusive")
    monkeypatch.setattr(verify, "run_checks", lambda **kw: [outcome])
    assert main(["verify", "--kind", "monte_carlo"]) == 3
    assert "inconclusive" in capsys.readouterr().out


def test_cli_exit_code_3_for_inconclusive(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sim.CASES, "lognormal", functools.partial(sim.lognormal, schemes=("euler",)))
    out = tmp_path / "ln"
    assert main(["simulate", "lognormal", "--paths", "200", "--out", str(out), "--no-plot", "--quiet"]) == 3
    assert "overall: INCONCLUSIVE" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["verdict"] == "inconclusive" and "needs about" in data["inconclusive"]


def test_cli_cuda_without_cuda_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "ou"
    assert main(["simulate", "ou", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing computed or written


def test_cli_unwritable_out_is_checked_before_computing(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ran = []
    monkeypatch.setitem(sim.CASES, "ou", lambda **kw: ran.append(kw))
    assert main(["simulate", "ou", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert str(blocker / "sub") in err and "cannot write" in err and len(err.strip().splitlines()) == 1
    assert ran == []  # refused before the simulation ran


def test_figures_have_axis_labels_and_distinct_reference_lines(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lipverify.commands.simulate import plot

    figures = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.setdefault(len(figures), fig))
    rows, series = sim.lognormal_moments(2000, 64)
    s_orders = {
        "strong_h": [1 / 32, 1 / 64, 1 / 128],
        "strong_err": [4e-2, 3e-2, 2e-2],
        "strong_se": [1e-3] * 3,
        "weak_h": [1 / 2, 1 / 4, 1 / 8],
        "weak_err": [4e-2, 2e-2, 1e-2],
        "weak_se": [1e-3] * 3,
    }
    series["orders"] = {"euler": s_orders}
    gap = {"gap": [0.1, 0.05], "gap_se": [0.01, 0.01], "band": [0.1, 0.05]}
    plot(ValidationResult("lognormal", rows, series), tmp_path)
    plot(ValidationResult("discrete_sgd", [], {"lr": [0.2, 0.1], "mean": gap, "std": gap}), tmp_path)
    band, orders, gap_fig = figures[0], figures[1], figures[2]
    for fig in (band, orders, gap_fig):
        for ax in fig.axes:
            assert ax.get_ylabel() and ax.get_xlabel(), ax.get_title()
    strong = orders.axes[0]
    refs = {ln.get_label(): ln.get_linestyle() for ln in strong.get_lines() if "slope" in ln.get_label()}
    assert set(refs) == {"reference slope 1/2", "reference slope 1"}
    assert len(set(refs.values())) == 2
    assert any(t.get_text() for t in strong.yaxis.get_minorticklabels())
    for fig in figures.values():
        real_close(fig)
