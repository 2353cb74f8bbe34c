"""Label noise against its (1 - p) model (lipverify.framework.label_noise_model) and the training
option ``full_gradient_clean`` that records the clean-label drift at the run's own weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipverify._validation import LipverifyError
from lipverify.data import to_model_input
from lipverify.framework import label_noise_model_records
from lipverify.framework.label_noise_model import band_verdict, growth_at, run_drift_ratio
from lipverify.sweep import load_sweep_config, resolve_train_config
from lipverify.training import TrainConfig, _Run, step_columns

ROOT = Path(__file__).resolve().parents[1]


def _config(**kw) -> TrainConfig:
    base = dict(
        train_size=120,
        batch_size=8,
        steps=3,
        lr=0.05,
        dtype="float64",
        sharpness_every=0,
        full_gradient_every=1,
        full_gradient_clean=True,
    )
    base.update(kw)
    return TrainConfig(**base).validate()


def _independent_drifts(run: _Run, labels: torch.Tensor, lr: float, alpha: float) -> dict[str, float]:
    """mu_l = -eta alpha u^T grad_L v from a plain full-batch autograd gradient and torch's SVD."""
    x = to_model_input(run.images, "mlp", torch.float64)
    weights = {name: dict(run.model.named_modules())[name].weight for name in run.probe.layer_names}
    loss = F.cross_entropy(run.model(x), labels)
    grads = torch.autograd.grad(loss, list(weights.values()))
    out = {}
    for (name, w), g in zip(weights.items(), grads, strict=True):
        u, s, vh = torch.linalg.svd(w.detach())
        out[name] = (-lr * alpha * float(u[:, 0] @ g @ vh[0]), float(s[0]))
    return out


@pytest.mark.parametrize("step", [0, 2])
def test_recorded_drifts_match_an_independent_computation(step):
    lr, alpha = 0.05, 0.7
    run = _Run(_config(label_noise=0.5, grad_scale=alpha))
    assert not torch.equal(run.labels, run.clean_labels)  # p = 0.5 corrupts some of 120 labels
    for _ in range(step):
        run.train_step()
    expected = {
        "corrupted": _independent_drifts(run, run.labels, lr, alpha),
        "clean": _independent_drifts(run, run.clean_labels, lr, alpha),
    }
    row = run.train_step()  # the drifts are recorded at the weights before this step's update
    for name, (mu, sigma) in expected["corrupted"].items():
        assert row[f"{name}.mu_full"] == pytest.approx(mu, rel=1e-8, abs=1e-14)
        assert row[f"{name}.sigma"] == pytest.approx(sigma, rel=1e-10)
    for name, (mu, _) in expected["clean"].items():
        assert row[f"{name}.mu_full_clean"] == pytest.approx(mu, rel=1e-8, abs=1e-14)
    net = {k: sum(mu / s for mu, s in v.values()) for k, v in expected.items()}
    assert row["net_mu_full"] == pytest.approx(net["corrupted"], rel=1e-8)
    assert row["net_mu_full_clean"] == pytest.approx(net["clean"], rel=1e-8)
    # the two label sets give different drifts: a recording that used one set twice fails above
    assert abs(net["corrupted"] - net["clean"]) > 1e-3 * abs(net["clean"])


def test_clean_drift_equals_the_drift_without_label_noise_exactly():
    run = _Run(_config(label_noise=0.0))
    rows = [run.train_step() for _ in range(3)]
    for row in rows:
        assert row["net_mu_full"] == row["net_mu_full_clean"]
        for name in run.probe.layer_names:
            assert row[f"{name}.mu_full"] == row[f"{name}.mu_full_clean"]


def test_clean_drift_needs_the_full_gradient_probe_and_adds_columns():
    with pytest.raises(LipverifyError, match="full_gradient_clean needs full_gradient_every > 0"):
        TrainConfig(full_gradient_clean=True, full_gradient_every=0).validate()
    TrainConfig(full_gradient_clean=True).validate()  # the automatic period (None) is > 0
    plain, extra = step_columns(["a"]), step_columns(["a"], clean_drift=True)
    assert extra[: len(plain)] == plain
    assert extra[len(plain) :] == ["net_mu_full", "net_mu_full_clean", "a.mu_full_clean"]


# --------------------------------------------------------------------------- rules on synthetic records
def _record(p: float, seed: int, clean_drift, law, *, grad_scale=1.0, log_bound=None, steps=10) -> dict:
    clean = np.asarray(clean_drift, dtype=float)
    series = {
        "step": list(range(len(clean))),
        "net_mu_full_clean": list(clean),
        "net_mu_full": list(law(p) * clean),
        "fc1.mu_full_clean": list(clean),
        "log_bound": list(log_bound) if log_bound is not None else [0.0] * len(clean),
    }
    config = dict(label_noise=p, grad_scale=grad_scale, seed_sampling=seed, seed_init=0, lr=0.05, steps=steps)
    return {"name": f"p{p}-a{grad_scale}-s{seed}", "config": config, "series": series}


def _drift_records(law, levels=(0.2, 0.4, 0.6), seeds=3):
    rng = np.random.default_rng(0)
    out = []
    for p in levels:
        for s in range(seeds):
            clean = 0.01 + 0.002 * rng.standard_normal(10)
            # seed-to-seed scatter of 1% around the law: the interval is narrow enough to decide
            factor = 1 + 0.01 * rng.standard_normal()
            out.append(_record(p, s, clean, lambda q, f=factor: law(q) * f))
    return out


def test_drift_ratio_rule_passes_the_law_and_fails_its_square():
    good = label_noise_model_records(_drift_records(lambda p: 1 - p))["drift_ratio"]
    assert good["verdict"] == "pass"
    assert [r["verdict"] for r in good["levels"]] == ["pass"] * 3
    assert [r["mean"] for r in good["levels"]] == pytest.approx([0.8, 0.6, 0.4], rel=0.03)
    bad = label_noise_model_records(_drift_records(lambda p: (1 - p) ** 2))["drift_ratio"]
    assert bad["verdict"] == "fail"
    assert [r["verdict"] for r in bad["levels"]] == ["fail"] * 3


def test_drift_ratio_is_inconclusive_with_one_seed_or_without_clean_drift():
    one = label_noise_model_records(_drift_records(lambda p: 1 - p, seeds=1))["drift_ratio"]
    assert one["verdict"] == "inconclusive" and "needs >= 2" in one["levels"][0]["reason"]
    rec = _drift_records(lambda p: 1 - p)
    for r in rec:
        del r["series"]["net_mu_full_clean"]
    none = label_noise_model_records(rec)["drift_ratio"]
    assert none["verdict"] == "inconclusive" and "full_gradient_clean" in none["reason"]


def test_run_drift_ratio_is_the_ratio_of_sums_and_removes_weight_decay():
    rec = _record(0.5, 0, [0.02, -0.01, 0.03], lambda p: 1 - p)
    rec["series"]["net_mu_full"] = [0.01, 0.0, 0.02]
    assert run_drift_ratio(rec)["ratio"] == pytest.approx(0.03 / 0.04)
    # weight decay adds -lr * lambda per layer to both drifts; the law is about the loss gradient
    rec["config"]["weight_decay"] = 0.1
    wd = -0.05 * 0.1
    rec["series"]["net_mu_full"] = [v + wd for v in (0.01, 0.0, 0.02)]
    rec["series"]["net_mu_full_clean"] = [v + wd for v in (0.02, -0.01, 0.03)]
    assert run_drift_ratio(rec)["ratio"] == pytest.approx(0.03 / 0.04)
    rec["series"]["step"] = [0, 1]
    rec["series"]["net_mu_full_clean"] = [0.01 + wd, -0.01 + wd]
    rec["series"]["net_mu_full"] = [0.01 + wd, 0.01 + wd]
    assert run_drift_ratio(rec)["ratio"] is None  # the clean drifts cancel: no ratio


def _trajectory_records(ln_growth, noise=0.002, T=10, seeds=3):
    """Clean runs grow ln K linearly at rate 0.1/step; GS runs at (1 - p) x that; LN runs end at
    ``ln_growth(p)``; per-seed scatter ``noise``."""
    rng = np.random.default_rng(1)
    recs = []
    t = np.arange(T + 1)
    for s in range(seeds):
        recs.append(
            _record(0.0, s, np.ones(T + 1), lambda p: 1.0, log_bound=0.1 * t + noise * rng.standard_normal())
        )
        for p in (0.2, 0.4):
            gs = 0.1 * (1 - p) * t + noise * rng.standard_normal()
            recs.append(_record(0.0, s, np.ones(T + 1), lambda q: 1.0, grad_scale=1 - p, log_bound=gs))
            ln = ln_growth(p) * t / T + noise * rng.standard_normal() * t / T
            recs.append(_record(p, s, np.ones(T + 1), lambda q, p=p: 1 - p, log_bound=ln))
    return recs


def test_trajectory_rule_passes_the_model_and_fails_a_wrong_growth():
    good = label_noise_model_records(_trajectory_records(lambda p: (1 - p) * 1.0))
    comps = good["trajectory"]["comparisons"]
    assert good["trajectory"]["clean_growth"] == pytest.approx(1.0, abs=0.01)
    for name in ("LN vs GS", "GS vs C@(1-p)T", "LN vs C@(1-p)T"):
        assert comps[name]["verdict"] == "pass", comps[name]["reason"]
    assert good["verdict"] == "pass"
    # a label-noise run that grows like (1 - p)^2 of the clean one: LN vs GS and LN vs C fail
    bad = label_noise_model_records(_trajectory_records(lambda p: (1 - p) ** 2 * 1.0))
    comps = bad["trajectory"]["comparisons"]
    assert comps["LN vs GS"]["verdict"] == "fail" and comps["LN vs C@(1-p)T"]["verdict"] == "fail"
    assert comps["GS vs C@(1-p)T"]["verdict"] == "pass"
    assert bad["verdict"] == "fail"
    noisy = label_noise_model_records(_trajectory_records(lambda p: 1 - p, noise=0.5))
    assert noisy["trajectory"]["comparisons"]["LN vs GS"]["verdict"] == "inconclusive"


def test_growth_at_interpolates_and_refuses_outside_steps():
    rec = _record(0.0, 0, np.ones(3), lambda p: 1.0, log_bound=[1.0, 1.5, 3.0])
    assert growth_at(rec, 1.5) == pytest.approx(1.25)
    with pytest.raises(LipverifyError, match="outside the logged"):
        growth_at(rec, 2.5)
    assert band_verdict((0.1, 0.2), 0.0, 1.0) == "pass"
    assert band_verdict((1.1, 1.2), 0.0, 1.0) == "fail"
    assert band_verdict((0.9, 1.2), 0.0, 1.0) == "inconclusive"
    assert band_verdict(None, 0.0, 1.0) == "inconclusive"


def test_records_must_share_theta0_and_settings_are_checked():
    recs = _drift_records(lambda p: 1 - p)
    with pytest.raises(LipverifyError, match="tolerance"):
        label_noise_model_records(recs, tolerance=0.0)
    recs[0]["config"]["seed_init"] = 7
    with pytest.raises(LipverifyError, match="do not share theta_0"):
        label_noise_model_records(recs)
    with pytest.raises(LipverifyError, match="no complete runs"):
        label_noise_model_records([])


# --------------------------------------------------------------------------- experiment config and CLI
def test_experiment_config_expands_to_the_three_families():
    cfg = load_sweep_config(ROOT / "experiments" / "framework_label_noise_model.toml")
    runs = cfg.expand()
    configs = [resolve_train_config(r.overrides) for r in runs]
    kinds = {(c["label_noise"], c["grad_scale"]) for c in configs}
    assert kinds == {(0.0, 1.0), (0.2, 1.0), (0.4, 1.0), (0.6, 1.0), (0.0, 0.8), (0.0, 0.6), (0.0, 0.4)}
    assert all(c["full_gradient_clean"] and c["full_gradient_every"] == 1 for c in configs)
    # the clean run is read at (1 - p) T: integer steps for every level
    assert all(float((1 - p) * c["steps"]).is_integer() for c in configs for p in (0.2, 0.4, 0.6))
    smoke = [resolve_train_config(r.overrides) for r in cfg.expand(smoke=True)]
    assert all(c["full_gradient_clean"] for c in smoke)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lipverify.cli", *args], capture_output=True, text=True)


def test_cli_label_noise_smoke(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(
        'claim = "label_noise"\n[base]\ntrain_size = 48\nbatch_size = 8\nsteps = 4\nlr = 0.05\n'
        "sharpness_every = 0\nfull_gradient_every = 1\nfull_gradient_clean = true\ncheckpoint_every = 4\n"
        "[grid]\nseed_sampling = [0, 1]\n"
        "[[cases]]\nlabel_noise = 0.0\n[[cases]]\nlabel_noise = 0.5\n"
        "[[cases]]\nlabel_noise = 0.0\ngrad_scale = 0.5\n"
    )
    proc = _cli("sweep", str(toml), "--out", str(tmp_path / "sw"), "--jobs", "1")
    assert proc.returncode == 0, proc.stderr
    proc = _cli("framework", "label-noise", str(tmp_path / "sw"), "--out", str(tmp_path / "res"))
    assert proc.returncode in (0, 1, 3), proc.stderr
    assert "at the same weights" in proc.stdout and "LN vs GS" in proc.stdout
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    assert saved["verdict"] in ("pass", "fail", "inconclusive")
    assert {"pass": 0, "fail": 1, "inconclusive": 3}[saved["verdict"]] == proc.returncode
    (level,) = saved["drift_ratio"]["levels"]
    assert level["p"] == 0.5 and level["n"] == 2 and all(math.isfinite(r) for r in level["ratios"])
    assert saved["trajectory"]["comparisons"]["LN vs GS"]["levels"][0]["n"] == 2
    # bad input: exit 2 with the problem named
    proc = _cli("framework", "label-noise", str(tmp_path))
    assert proc.returncode == 2 and "not a sweep directory" in proc.stderr
    proc = _cli("framework", "label-noise", str(tmp_path / "sw"), "--tolerance", "0")
    assert proc.returncode == 2 and "--tolerance" in proc.stderr
