"""Framework tests beyond the paper: the one-step check (Theorems 14/15 at fixed weights) and
Assumption 3 along a run (lipverify.framework)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipverify._validation import LipverifyError
from lipverify.framework import cross_layer_along_run, one_step_at, one_step_check
from lipverify.records import atomic_write_text, format_rows
from lipverify.training import TrainConfig

N, LR = 240, 0.05


def _tiny(seed: int = 0):
    """6 -> 7 -> 3 tanh network (77 parameters) on synthetic float64 data (N samples)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return model, x, y


def _check(batch_size=4, batches=60, **kw):
    model, x, y = _tiny()
    return model, x, y, one_step_at(model, x, y, F.cross_entropy, LR, batch_size, batches, seed=1, **kw)


def test_one_step_runs_and_leaves_the_model_unchanged():
    model, x, y = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    res = one_step_at(model, x, y, F.cross_entropy, LR, 4, 30, seed=1, resamples=300)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert {r.verdict for r in res.rows if r.kind == "check"} <= {"pass", "fail", "inconclusive"}
    assert {r.verdict for r in res.rows if r.kind == "variant"} <= {"rejected", "not rejected"}
    assert res.verdict in ("pass", "fail", "inconclusive")
    names = ["0", "2"]
    for name in names:
        sp = res.split[name]
        # the split adds up: observed = first + curvature + log_correction + remainder
        total = sp["first"] + sp["curvature"] + sp["log_correction"] + sp["remainder"]
        assert math.isclose(total, sp["observed"], rel_tol=1e-9, abs_tol=1e-15)
        r = res.row(f"{name}: Var(dln sigma)")
        assert r.ci[0] <= r.observed <= r.ci[1]
    net = res.samples["0.observed"] + res.samples["2.observed"]
    assert math.isclose(res.row("net: Var(dln K)").observed, float(net.var(ddof=1)), rel_tol=1e-12)
    json.dumps(res.as_dict())  # serialisable


def test_population_phi_matches_per_sample_gradients():
    """Population phi^2 (the check's 'population' column) against torch.func per-sample gradients:
    phi^2 = eta^2 Var(u^T G_bar v) over a without-replacement b-batch = eta^2 S^2 / b (1 - b/N)."""
    b = 4
    model, x, y, res = _check(batch_size=b, batches=40, resamples=300)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for name in ("0", "2"):
        W = params[f"{name}.weight"]
        U, S, Vh = torch.linalg.svd(W)
        p = torch.einsum("m,imn,n->i", U[:, 0], grads[f"{name}.weight"], Vh[0])
        s2 = float(p.var(unbiased=True))
        expected = LR**2 * s2 / b * (1 - b / N) / float(S[0]) ** 2
        row = res.row(f"{name}: Var(dln sigma)")
        assert math.isclose(row.population, expected, rel_tol=1e-9)
        # wrong variant: with-replacement formula (no (1 - b/N)) is off by b/N = 1.7%, far above 1e-9
        assert not math.isclose(row.population, LR**2 * s2 / b / float(S[0]) ** 2, rel_tol=1e-3)
        # the per-batch estimates average to the population value within Monte Carlo error
        phi_sq = res.samples[f"{name}.phi_sq"] / float(S[0]) ** 2
        se = phi_sq.std(ddof=1) / math.sqrt(len(phi_sq))
        assert abs(phi_sq.mean() - expected) < 4 * se


def test_variance_check_passes_the_framework_and_rejects_wrong_phi():
    """b = 4: the first-order variance matches the mean per-batch phi^2 (Proposition 5), the biased
    1/b^2 estimator (25% low) is rejected, and a phi scaled by 2 fails the same check."""
    _, _, _, res = _check(batch_size=4, batches=400, resamples=1000)
    for name in ("0", "2"):
        row = res.row(f"{name}: Var(u^T dW v / sigma)")
        assert row.difference_ci[0] <= 0 <= row.difference_ci[1], row
        assert res.row(f"{name}: Var(u^T dW v / sigma) [2 phi]").verdict == "rejected"
    assert res.row("0: Var(u^T dW v / sigma) [biased 1/b^2 estimator]").verdict == "rejected"
    assert res.row("0: Var(u^T dW v / sigma)").verdict == "pass"
    _, _, _, wrong = _check(batch_size=4, batches=400, resamples=1000, phi_factor=2.0)
    for name in ("0", "2"):
        assert wrong.row(f"{name}: Var(u^T dW v / sigma)").verdict == "fail"
        assert wrong.row(f"{name}: Var(dln sigma)").verdict == "fail"
    assert wrong.row("net: Var(dln K)").verdict == "fail"
    assert wrong.verdict == "fail"


def test_bad_input_is_refused():
    model, x, y = _tiny()
    with pytest.raises(LipverifyError, match="batch_size"):
        one_step_at(model, x, y, F.cross_entropy, LR, 1, 30)
    with pytest.raises(LipverifyError, match="batches"):
        one_step_at(model, x, y, F.cross_entropy, LR, 4, 3)
    with pytest.raises(LipverifyError, match="dropout"):
        one_step_check(TrainConfig(dropout=0.5, train_size=100), at_step=0, batches=20)


# --------------------------------------------------------------------------- Assumption 3
def _steps_csv(tmp_path, pairs):
    rows = [{"step": i, "net_phi_sq": p, "net_phi_sq_cross": c} for i, (p, c) in enumerate(pairs)]
    rows.append({"step": len(pairs)})  # the final row has no terms
    atomic_write_text(
        tmp_path / "steps.csv", format_rows(["step", "log_bound", "net_phi_sq", "net_phi_sq_cross"], rows)
    )
    return tmp_path


def test_assumption3_known_values(tmp_path):
    res = cross_layer_along_run(_steps_csv(tmp_path, [(1.0, 0.0), (2.0, 0.1), (1.0, 0.1), (4.0, 0.2)]))
    s = res["summary"]
    assert s["probed_steps"] == 4
    assert [r["ratio"] for r in res["steps"]] == pytest.approx([0.0, 0.05, 0.1, 0.05])
    assert res["steps"][2]["cumulative_ratio"] == pytest.approx(0.2 / 4.0)
    assert s["ratio"] == pytest.approx(0.4 / 8.0)
    assert s["share"] == pytest.approx(0.4 / 8.4)
    assert s["late_ratio"] == pytest.approx(0.3 / 5.0)
    assert s["holds"] and "holds within 10%" in s["message"]
    # a large cross term (here 30% of phi_bar^2) does not hold
    bad = cross_layer_along_run(_steps_csv(tmp_path, [(1.0, 0.3), (1.0, 0.3)]))["summary"]
    assert not bad["holds"] and bad["percent"] == pytest.approx(30.0)
    # a negative (anti-correlated) cross term counts by its magnitude
    assert not cross_layer_along_run(_steps_csv(tmp_path, [(1.0, -0.3)]))["summary"]["holds"]


def test_assumption3_bad_records(tmp_path):
    atomic_write_text(tmp_path / "steps.csv", "step,loss\n0,1.0\n")
    with pytest.raises(LipverifyError, match="net_phi_sq"):
        cross_layer_along_run(tmp_path)
    _steps_csv(tmp_path, [])
    with pytest.raises(LipverifyError, match="no probed step"):
        cross_layer_along_run(tmp_path)
    _steps_csv(tmp_path, [(0.0, 0.1)])
    with pytest.raises(LipverifyError, match="> 0"):
        cross_layer_along_run(tmp_path)
    with pytest.raises(LipverifyError, match="missing"):
        cross_layer_along_run(tmp_path / "nowhere")


# --------------------------------------------------------------------------- CLI
def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lipverify.cli", "framework", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_assumption3(tmp_path):
    run = _steps_csv(tmp_path, [(1.0, 0.01), (1.0, 0.02)])
    proc = _cli("assumption3", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "holds within 10%" in proc.stdout
    saved = json.loads((run / "assumption3.json").read_text())
    assert saved["summary"]["ratio"] == pytest.approx(0.015)
    proc = _cli("assumption3", str(run), "--tolerance", "1", "--out", str(tmp_path / "a3.json"))
    assert proc.returncode == 1 and (tmp_path / "a3.json").is_file()
    proc = _cli("assumption3", str(run), str(run))
    assert proc.returncode == 2 and "exactly one RUN_DIR" in proc.stderr


def test_cli_one_step_smoke(tmp_path):
    out = tmp_path / "os"
    proc = _cli(
        "one-step", "train_size=200", "batch_size=8", "--at-step", "2", "--batches", "20",
        "--resamples", "200", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode in (0, 1, 3), proc.stderr
    saved = json.loads((out / "results.json").read_text())
    assert {"fc1", "fc2", "fc3", "net"} <= set(saved["split"])
    assert saved["settings"]["at_step"] == 2 and saved["settings"]["batches"] == 20
    assert {"pass": 0, "fail": 1, "inconclusive": 3}[saved["verdict"]] == proc.returncode
    assert "net: Var(dln K)" in proc.stdout
    proc = _cli("one-step", "dropout=0.5", "--batches", "20", "--out", str(out))
    assert proc.returncode == 2 and "plain SGD only" in proc.stderr


# --------------------------------------------------------------------------- slow: the default MLP
@pytest.mark.slow
def test_mlp_one_step_first_order_variance_matches_phi():
    """Default MLP on MNIST-5k at W_0, 500 batches: the first-order increment's variance matches the
    mean per-batch phi^2 of every layer, and a phi scaled by 2 is rejected."""
    torch.set_num_threads(1)
    res = one_step_check(TrainConfig(), at_step=0, batches=500, seed=0)
    for name in ("fc1", "fc2", "fc3"):
        row = res.row(f"{name}: Var(u^T dW v / sigma)")
        assert row.verdict in ("pass", "inconclusive"), row
        assert res.row(f"{name}: Var(u^T dW v / sigma) [2 phi]").verdict == "rejected"
    assert np.isfinite(res.split["net"]["cross_over_phi_bar_sq"])


def test_verdict_needs_power_not_an_edge_case():
    """_compare on a known sample: a variant outside the interval but closer to the prediction than
    the half-width h leaves the check inconclusive (it passed before the power rule); a variant 2h
    away makes it pass; a prediction 2h off fails."""
    from lipverify.framework.one_step import _Bootstrap, _compare

    x = np.random.default_rng(5).standard_normal(400)
    boot = _Bootstrap(400, 2000, 0.99, seed=1)
    lo, hi = boot.interval(boot.mean(x))
    m, h = float(x.mean()), (hi - lo) / 2

    def verdicts(pred, variant):
        rows = _compare(boot, "q", "mean", x, np.full(400, pred), [("v", np.full(400, variant), True)])
        return rows[0].verdict, rows[1].verdict

    assert verdicts(m - 0.8 * h, m - 1.3 * h) == ("inconclusive", "rejected")
    assert verdicts(m - 0.5 * h, m + 1.5 * h) == ("pass", "rejected")
    assert verdicts(m, m + 0.3 * h) == ("inconclusive", "not rejected")
    assert verdicts(m - 2 * h, m) == ("fail", "not rejected")


def test_framework_tests_refuse_regularised_configs_by_name():
    """One-step check and linear response model plain SGD: a regulariser would make their step not the
    run's step, so each set field is named (label noise only for the linear response)."""
    from lipverify.framework import linear_response, one_step_check
    from lipverify.training import TrainConfig

    with pytest.raises(LipverifyError, match="one-step check supports plain SGD only; unset dropout, mixup"):
        one_step_check(TrainConfig(dropout=0.5, mixup=0.2), 0)
    refused = r"linear-response prediction .*unset label_smoothing, label_noise"
    with pytest.raises(LipverifyError, match=refused):
        linear_response(TrainConfig(label_smoothing=0.1, label_noise=0.2))
    with pytest.raises(LipverifyError, match="one-step check supports plain SGD only; unset amp"):
        one_step_check(TrainConfig(amp="bf16"), 0)
