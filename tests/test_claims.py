"""Claim rules of Section 8 on synthetic run records whose answer is known: each rule passes on data
that follow the prediction and fails on data that refute it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lipverify import LipverifyError
from lipverify.claims import (
    TW1_MEAN,
    adjacent_reversals,
    chi2_std_interval,
    evaluate,
    evaluate_batch_size,
    evaluate_init,
    evaluate_label_drift,
    evaluate_label_noise,
    evaluate_near_convergence,
    evaluate_noise_growth,
    evaluate_noisy_gradient,
    evaluate_spread_magnitude,
    evaluate_trajectories,
    evaluate_trajectory_spread,
    fit_log_slope,
    init_std,
    level_stats,
    mp_edge,
    predicted_path,
    tw_relative_scale,
)

BASE = {
    "model": "mlp",
    "batch_size": 32,
    "lr": 0.05,
    "steps": 100,
    "init": "default",
    "init_scale": 1.0,
    "seed_init": 0,
    "seed_sampling": 0,
    "grad_scale": 1.0,
    "grad_noise": "none",
    "grad_noise_std": 0.0,
    "label_noise": 0.0,
}


def record(name, summary=None, series=None, layers=None, **config):
    return {
        "name": name,
        "config": BASE | config,
        "summary": summary or {},
        "series": series or {},
        "layers": layers or {},
    }


def summary(k0=1.0, kt=1.0, pred_mean=None, pred_std=0.0, cum_mu=0.0, cum_psi=0.0, cum_phi_sq=0.0):
    pred_mean = kt if pred_mean is None else pred_mean
    return {
        "K0": k0,
        "K_T_observed": kt,
        "K_T_predicted_mean": pred_mean,
        "K_T_predicted_std": pred_std,
        "relative_error": (kt - pred_mean) / kt,
        "fraction_in_2std": 1.0,
        "psi_mu_ratio": cum_psi / cum_mu if cum_mu else math.inf,
        "cumulative_mu": cum_mu,
        "cumulative_psi": cum_psi,
        "cumulative_phi_sq": cum_phi_sq,
        "steps": 100,
    }


# --------------------------------------------------------------------------------------------- helpers


def test_statistics_helpers():
    rows = level_stats({1.0: [1.0, 1.2], 2.0: [2.0, 2.2], 3.0: [1.0, 1.1]})
    assert [r["level"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[0]["mean"] == pytest.approx(1.1)
    assert adjacent_reversals(rows, +1) == [
        {
            "from": 2.0,
            "to": 3.0,
            "change": pytest.approx(-1.05),
            "tolerance": pytest.approx(2 * math.hypot(0.1, 0.05)),
        }
    ]
    assert adjacent_reversals(rows[:2], +1) == []
    lo, hi = chi2_std_interval(1.0, 10, 0.05)
    assert lo < 1.0 < hi and lo == pytest.approx(0.6878, abs=1e-3) and hi == pytest.approx(1.8256, abs=1e-3)
    b = np.array([8, 16, 32, 64])
    slope, se = fit_log_slope(b, 3.0 * b**-0.5, [10] * 4)
    assert slope == pytest.approx(-0.5) and se > 0


def test_init_std_and_edge():
    assert init_std("kaiming_normal", 50, 2.0) == pytest.approx(2.0 * math.sqrt(2 / 50))
    assert init_std("default", 48, 1.0) == pytest.approx(1 / 12)
    assert mp_edge(0.5, 16, 64) == pytest.approx(0.5 * 12)
    assert tw_relative_scale(100, 100) == pytest.approx((0.2) ** (1 / 3) / 40)
    with pytest.raises(LipverifyError, match="unknown init"):
        init_std("xavier", 10, 1.0)


# ------------------------------------------------------------------------------------------- 8.2


SHAPES = {"fc1": (64, 100), "fc2": (32, 64), "fc3": (10, 32)}


def init_records(distort: float = 1.0, kt_fn=lambda k0, i: k0**0.8 * 1.5):
    rng = np.random.default_rng(0)
    out = []
    i = 0
    for init in ("kaiming_normal", "default"):
        for scale in (0.5, 1.0, 2.0):
            series, log_k0 = {}, 0.0
            for layer, (m, n) in SHAPES.items():
                s = init_std(init, n, scale)
                if init == "kaiming_normal":
                    W = rng.normal(0, s, (m, n))
                else:  # PyTorch default: uniform(-b, b) with b^2/3 = 1/(3 fan_in)
                    W = scale * rng.uniform(-1 / math.sqrt(n), 1 / math.sqrt(n), (m, n))
                sigma = float(np.linalg.norm(W, 2)) * distort
                series[f"{layer}.sigma"] = [sigma]
                log_k0 += math.log(sigma)
            k0 = math.exp(log_k0)
            out.append(
                record(
                    f"r{i}",
                    summary(k0=k0, kt=kt_fn(k0, i)),
                    series,
                    {k: {"m": m, "n": n} for k, (m, n) in SHAPES.items()},
                    init=init,
                    init_scale=scale,
                )
            )
            i += 1
    return out


def test_init_claims_pass_on_random_matrices():
    a, b = evaluate_init(init_records())
    assert a.verdict == "pass", a.measured
    zs = [row["z_tw"] for row in a.numbers["layers"]]
    assert len(zs) == 18 and abs(np.mean(zs) - TW1_MEAN) < 2.0
    assert b.verdict == "pass" and b.numbers["spearman_rho"] == pytest.approx(1.0)


def test_init_claims_fail_on_wrong_sigma_and_unrelated_kt():
    a, _ = evaluate_init(init_records(distort=1.15))
    assert a.verdict == "fail"
    _, b = evaluate_init(init_records(kt_fn=lambda k0, i: 1.0 / k0))
    assert b.verdict == "fail" and b.numbers["spearman_rho"] < 0


def test_init_needs_layer_shapes():
    recs = init_records()
    recs[0]["layers"] = {}
    with pytest.raises(LipverifyError, match="no shape"):
        evaluate_init(recs)


# ------------------------------------------------------------------------------------------- 8.3


def near_series(seed, ratio=0.1, psi_mode="ratio", mu_floor=1e-3, final_loss=1e-3, phi_sq=1e-8):
    """Synthetic run: mu_bar decays to ``mu_floor``; psi_bar = ``ratio`` |mu_bar| ("ratio"), a constant
    ``ratio`` * 1e-3 ("const": psi/mu rises as mu decays) or 5 mu^2 ("square": psi vanishes faster
    than mu); ln K follows mu + psi - phi^2/2 plus Gaussian diffusion of variance phi^2 per step."""
    rng = np.random.default_rng(seed)
    T = 400
    t = np.arange(T + 1, dtype=float)
    mu = 0.01 * np.exp(-t / 60) + mu_floor + 1e-6 * rng.normal(size=T + 1)
    psi = {
        "ratio": ratio * np.abs(mu),
        "const": np.full(T + 1, ratio * 1e-3) * (1 + 0.01 * rng.random(T + 1)),
        "square": 5 * mu**2,
    }[psi_mode]
    phi = np.full(T + 1, phi_sq)
    log_bound = np.concatenate([[0.0], np.cumsum(mu + psi - phi / 2)[:-1]])
    log_bound += np.concatenate([[0.0], np.cumsum(math.sqrt(phi_sq) * rng.normal(size=T))])
    loss = 2.3 * np.exp(-t / 40) + final_loss
    return {
        "step": t.tolist(),
        "loss": loss.tolist(),
        "log_bound": log_bound.tolist(),
        "net_mu": mu.tolist(),
        "net_psi": psi.tolist(),
        "net_phi_sq": phi.tolist(),
    }


def near(**kw):
    return [record(f"s{s}", series=near_series(s, **kw), seed_sampling=s) for s in range(4)]


def test_near_convergence_pass_when_psi_is_one_order_below_mu():
    a, b, c = evaluate_near_convergence(near(ratio=0.1))
    assert [x.id for x in (a, b, c)] == ["8.3a", "8.3b", "8.3c"]
    assert {x.kind for x in (a, b, c)} == {"paper"}
    assert all("Section 8.3" in x.paper_quote for x in (a, b, c))
    assert a.verdict == "pass", a.measured
    assert b.verdict == "pass", b.measured
    assert b.numbers["log10_ratio_mean"] == pytest.approx(-1.0, abs=0.01)
    assert c.verdict == "pass", c.measured
    assert c.numbers["share_mean"] == pytest.approx(0.1 / 1.1, rel=0.05)


def test_near_convergence_rejects_a_tiny_psi():
    # psi/|mu| = 1e-4: four orders below, not "one order"; its cumulative share is negligible
    _, b, c = evaluate_near_convergence(near(ratio=1e-4))
    assert b.verdict == "fail", b.measured
    assert c.verdict == "fail", c.measured


def test_near_convergence_rejects_psi_of_the_same_order_and_a_stopped_bound():
    _, b, _ = evaluate_near_convergence(near(ratio=1.0))
    assert b.verdict == "fail", b.measured
    a, _, _ = evaluate_near_convergence(near(ratio=0.1, mu_floor=-2e-3))
    assert a.verdict == "fail", a.measured


def test_near_convergence_psi_below_the_diffusion_is_not_a_pass():
    # share 9% but the window's diffusion sd (sqrt(100 * 1e-3) = 0.3) dwarfs the sum of psi (0.01)
    _, _, c = evaluate_near_convergence(near(ratio=0.1, phi_sq=1e-3))
    assert c.verdict != "pass", c.measured


def test_near_convergence_inconclusive_without_convergence_or_seeds():
    recs = near(final_loss=0.5)
    assert {c.verdict for c in evaluate_near_convergence(recs)} == {"inconclusive"}
    assert {c.verdict for c in evaluate_near_convergence(recs[:1])} == {"inconclusive"}
    assert {c.verdict for c in evaluate_noise_growth(recs)} == {"inconclusive"}


def test_framework_noise_growth_pass_and_fail():
    (ok,) = evaluate_noise_growth(near(ratio=1.0, psi_mode="const"))
    assert ok.kind == "framework" and ok.id == "F8.3"
    assert ok.verdict == "pass", ok.measured
    (bad,) = evaluate_noise_growth(near(psi_mode="square", mu_floor=0.0))
    assert bad.verdict == "fail", bad.measured


# ------------------------------------------------------------------------------------------- 8.4


def noisy_records(kt_fn, seeds=3):
    rng = np.random.default_rng(1)
    out = []
    for noise, std in (("none", 0.0), ("gaussian", 0.01), ("uniform", 0.01)):
        for alpha in (0.25, 0.5, 0.75, 1.0):
            for s in range(seeds):
                kt = kt_fn(alpha) + 0.02 * rng.normal()
                out.append(
                    record(
                        f"{noise}{alpha}{s}",
                        summary(k0=1.0, kt=kt, pred_mean=kt_fn(alpha)),
                        grad_scale=alpha,
                        grad_noise=noise,
                        grad_noise_std=std,
                        seed_sampling=s,
                    )
                )
    return out


def test_noisy_gradient_monotone_pass_and_fail():
    (ok,) = evaluate_noisy_gradient(noisy_records(lambda a: 1.0 + 2 * a))
    assert ok.verdict == "pass", ok.measured
    assert set(ok.numbers) >= {"none", "gaussian beta=0.01", "uniform beta=0.01"}
    (bad,) = evaluate_noisy_gradient(noisy_records(lambda a: 3.0 - 2 * a))
    assert bad.verdict == "fail"
    # a reversal beyond the seed spread fails even with a positive overall trend
    (rev,) = evaluate_noisy_gradient(noisy_records(lambda a: {0.25: 1.0, 0.5: 2.0, 0.75: 1.5, 1.0: 3.0}[a]))
    assert rev.verdict == "fail"
    assert rev.numbers["none"]["reversals"] and rev.numbers["none"]["spearman_rho"] > 0


# ------------------------------------------------------------------------------------------- 8.5


def label_records(
    decreasing=True,
    seeds=3,
    mu0=0.02,
    law=lambda p: 1 - p,
    drift_ratio=lambda p: 1 - p,
    full=False,
    noise=0.01,
):
    """Runs sharing theta_0 (K_0 = 2): the step-0 drift mu_p(theta_0) = law(p) mu0 (+ relative noise
    from the corruption draw); the cumulative drift M_p = drift_ratio(p) M_0 along each run's own path.
    ``full``: the step-0 drift is in per-layer ``mu_full`` columns (one layer, sigma 2) and net_mu holds
    a wrong value the rule must not use."""
    rng = np.random.default_rng(2)
    out = []
    for p in (0.0, 0.2, 0.4, 0.6, 0.8):
        for s in range(seeds):
            log_kt = math.log(2.0) + drift_ratio(p) * 1.0 + 0.1 + 0.01 * rng.normal()
            if not decreasing:
                log_kt = math.log(2.0) + p + 0.01 * rng.normal()
            mu_start = law(p) * mu0 * (1 + (noise * rng.normal() if p > 0 else 0.0))
            series = {"net_mu": [999.0 if full else mu_start, 0.0], "fc.sigma": [2.0, 2.0]}
            if full:
                series["fc.mu_full"] = [2.0 * mu_start, math.nan]
            out.append(
                record(
                    f"p{p}s{s}",
                    summary(k0=2.0, kt=math.exp(log_kt), cum_mu=drift_ratio(p) * 1.0, cum_psi=0.1),
                    series=series,
                    label_noise=p,
                    seed_sampling=s,
                )
            )
    return out


def test_label_noise_monotone_pass_and_fail():
    (a,) = evaluate_label_noise(label_records())
    assert a.verdict == "pass" and a.id == "8.5" and a.kind == "paper", a.measured
    (bad,) = evaluate_label_noise(label_records(decreasing=False))
    assert bad.verdict == "fail"


def test_label_drift_at_the_same_weights():
    (ok,) = evaluate_label_drift(label_records())
    assert ok.kind == "framework" and ok.verdict == "pass", ok.measured
    assert [r["mean_ratio"] for r in ok.numbers["levels"]] == pytest.approx([0.8, 0.6, 0.4, 0.2], rel=0.03)
    # the corrupted labels add a drift of their own: mu_p = (1 - p)^2 mu_0 is rejected
    (bad,) = evaluate_label_drift(label_records(law=lambda p: (1 - p) ** 2))
    assert bad.verdict == "fail", bad.measured


def test_label_drift_without_power_is_inconclusive_not_pass():
    """Corruption draws so different that the seeds' interval holds both 1 - p and 1 (no effect):
    the rule cannot tell the law from its wrong variant, so it must not pass (the old rule passed
    because 1 - p was inside; measured on the committed sweep: p = 0.2, [0.06, 1.22])."""
    (wide,) = evaluate_label_drift(label_records(noise=1.5))
    assert wide.verdict == "inconclusive", wide.measured
    # the same spread with the law off by far still fails where 1 - p is outside
    assert evaluate_label_drift(label_records(noise=0.01, law=lambda p: 1.0))[0].verdict == "fail"


def test_label_drift_does_not_compare_with_another_trajectory():
    # runs that satisfy the law at the same weights pass, even though their cumulative drift along
    # their own (different) paths is far from (1 - p) M_0 -- what the old rule compared and failed
    recs = label_records(drift_ratio=lambda p: (1 - p) ** 3)
    (ok,) = evaluate_label_drift(recs)
    assert ok.verdict == "pass", ok.measured
    diag = ok.numbers["cross_trajectory_diagnostic"]
    assert diag[0.8]["mu_ratio"] == pytest.approx(0.2**3)


def test_label_drift_prefers_the_full_data_gradient_and_needs_shared_weights():
    (ok,) = evaluate_label_drift(label_records(full=True))
    assert ok.verdict == "pass" and ok.numbers["source"] == ["full-data"], ok.measured
    recs = label_records()
    recs[4]["summary"]["K0"] = 2.5
    assert evaluate_label_drift(recs)[0].verdict == "inconclusive"
    assert evaluate_label_drift(label_records(seeds=1))[0].verdict == "inconclusive"


# ------------------------------------------------------------------------------------------- 8.6


def batch_records(exponent: float, pred_factor: float = 1.0, seeds=40):
    rng = np.random.default_rng(3)
    out = []
    for b in (8, 16, 32, 64, 128):
        sd = 2.0 * b**exponent
        for s in range(seeds):
            out.append(
                record(
                    f"b{b}s{s}",
                    summary(
                        k0=5.0,
                        kt=10.0 + sd * rng.normal(),
                        pred_mean=10.0,
                        pred_std=pred_factor * 2.0 * b**-0.5,
                    ),
                    batch_size=b,
                    seed_sampling=s,
                )
            )
    return out


def test_batch_size_pass():
    (a,) = evaluate_batch_size(batch_records(-0.5))
    assert a.verdict == "pass" and a.kind == "paper", a.measured
    assert a.numbers["predicted_slope"] == pytest.approx(-0.5)
    (b,) = evaluate_spread_magnitude(batch_records(-0.5))
    assert b.verdict == "pass" and b.kind == "framework", b.measured


def test_batch_size_fail():
    (a,) = evaluate_batch_size(batch_records(-1.0))
    assert a.verdict == "fail", a.measured
    # the paper's row tests only the exponent: a 3x magnitude error fails the framework row alone
    (a,) = evaluate_batch_size(batch_records(-0.5, pred_factor=3.0))
    assert a.verdict == "pass", a.measured
    (b,) = evaluate_spread_magnitude(batch_records(-0.5, pred_factor=3.0))
    assert b.verdict == "fail", b.measured


def test_batch_size_inconclusive_with_single_seed():
    assert {c.verdict for c in evaluate("batch_size", batch_records(-0.5, seeds=1))} == {"inconclusive"}


# ------------------------------------------------------------------------------------------- 8.7


def trajectory_records(noise_factor: float, seeds=30, T=60, phi_sq=4e-4):
    rng = np.random.default_rng(4)
    mu = 2e-3
    out = []
    for s in range(seeds):
        inc = (mu - phi_sq / 2) + noise_factor * math.sqrt(phi_sq) * rng.normal(size=T)
        log_bound = math.log(3.0) + np.concatenate([[0.0], np.cumsum(inc)])
        series = {
            "step": list(range(T + 1)),
            "log_bound": log_bound.tolist(),
            "net_mu": [mu] * (T + 1),
            "net_psi": [0.0] * (T + 1),
            "net_phi_sq": [phi_sq] * (T + 1),
        }
        out.append(record(f"s{s}", series=series, seed_sampling=s))
    return out


def test_predicted_path_matches_theorem_17():
    rec = trajectory_records(1.0, seeds=1, T=10)[0]
    _steps, mean, var = predicted_path(rec)
    assert mean[-1] == pytest.approx(3.0 * math.exp(10 * 2e-3))
    assert var[-1] == pytest.approx(mean[-1] ** 2 * math.expm1(10 * 4e-4))
    # probe_every = 2: each recorded row stands for two steps
    rec2 = {"name": "x", "series": {k: v[::2] for k, v in rec["series"].items()}}
    steps2, mean2, _ = predicted_path(rec2)
    assert steps2[-1] == 10 and mean2[-1] == pytest.approx(mean[-1])
    # probe_every = 2 as training records it: a row per step, terms empty where the probe did not run
    # (read as zero drift and noise they would give exp(5 * 2e-3) and half the variance)
    rec3 = {"name": "y", "series": dict(rec["series"])}
    for key in ("net_mu", "net_psi", "net_phi_sq"):
        rec3["series"][key] = [v if i % 2 == 0 else math.nan for i, v in enumerate(rec["series"][key])]
    _, mean3, var3 = predicted_path(rec3)
    assert mean3[-1] == pytest.approx(mean[-1]) and var3[-1] == pytest.approx(var[-1])
    rec3["series"]["net_mu"] = [math.nan, *rec3["series"]["net_mu"][1:]]
    with pytest.raises(LipverifyError, match="not measured at the first step"):
        predicted_path(rec3)


def test_trajectories_negligible_pass_fail_inconclusive():
    # change of ln K over 60 steps = 0.12; spread sqrt(60 phi^2): 0.005 (negligible) or 0.15 (not)
    (ok,) = evaluate_trajectories(trajectory_records(1.0, phi_sq=4e-7))
    assert ok.verdict == "pass" and ok.kind == "paper", ok.measured
    (bad,) = evaluate_trajectories(trajectory_records(1.0))
    assert bad.verdict == "fail", bad.measured
    # spread at the 10% limit and 3 seeds: the chi-square bounds straddle it
    (unsure,) = evaluate_trajectories(trajectory_records(1.0, seeds=3, phi_sq=2.4e-6))
    assert unsure.verdict == "inconclusive", unsure.measured


def test_framework_trajectory_spread_pass_and_fail():
    (ok,) = evaluate_trajectory_spread(trajectory_records(1.0))
    assert ok.verdict == "pass" and ok.kind == "framework", ok.measured
    assert ok.numbers["median_ratio"] == pytest.approx(1.0, abs=0.3)
    assert [int(r["step"]) for r in ok.numbers["checkpoints"]] == [3, 8, 22, 60]
    assert len(ok.numbers["steps"]) == 60
    (bad,) = evaluate_trajectory_spread(trajectory_records(2.0))
    assert bad.verdict == "fail", bad.measured
    (small,) = evaluate_trajectory_spread(trajectory_records(0.4))
    assert small.verdict == "fail", small.measured


def test_trajectories_refuse_mixed_configs():
    recs = trajectory_records(1.0, seeds=3)
    recs[0]["config"] = recs[0]["config"] | {"lr": 0.5}
    with pytest.raises(LipverifyError, match="differ"):
        evaluate_trajectories(recs)


def test_evaluate_dispatch_and_options():
    recs = trajectory_records(1.0, seeds=5)
    assert evaluate("trajectories", recs, {"checkpoints": 2})[0].numbers["n_seeds"] == 5
    with pytest.raises(LipverifyError, match="unknown option"):
        evaluate("trajectories", recs, {"bogus": 1})
    with pytest.raises(LipverifyError, match="unknown claim"):
        evaluate("nope", recs)


# ------------------------------------------------------------------------------- report mechanics


def _fake_traj_run(config, run_dir):
    """Writes a run whose ln K follows the Theorem 15 SDE with the recorded terms; lr < 0 fails."""
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config["lr"] < 0:
        raise RuntimeError("diverged")
    rng = np.random.default_rng(config["seed_sampling"])
    mu, phi_sq, T = 2e-3, 4e-4, config["steps"]
    log_k = math.log(3.0) + np.concatenate(
        [[0.0], np.cumsum(mu - phi_sq / 2 + math.sqrt(phi_sq) * rng.normal(size=T))]
    )
    lines = ["step,loss,log_bound,net_mu,net_psi,net_phi_sq,net_phi_sq_cross,fc1.sigma"]
    lines += [
        f"{t},{1 / (t + 1)},{log_k[t]},{mu},0.0,{phi_sq},0.0,{math.exp(log_k[t])}" for t in range(T + 1)
    ]
    (run_dir / "steps.csv").write_text("\n".join(lines) + "\n")
    (run_dir / "meta.json").write_text(json.dumps({"config": config, "status": "complete"}))


def _fake_summary(run_dir):
    from lipverify.claims import read_steps_csv

    s = read_steps_csv(run_dir / "steps.csv")
    k = np.exp(s["log_bound"])
    return summary(k0=float(k[0]), kt=float(k[-1]), cum_mu=float(np.sum(s["net_mu"][:-1])))


def test_report_sweep_writes_table_figure_and_lists_failed_runs(tmp_path):
    import json

    from lipverify.claims import collect_results, report_sweep
    from lipverify.sweep import parse_sweep_config, run_sweep

    fields = ["steps", "lr", "seed_sampling", "batch_size"]
    cfg = parse_sweep_config(
        {
            "claim": "trajectories",
            "base": {"steps": 30, "batch_size": 8},
            "grid": {"seed_sampling": list(range(8))},
            "cases": [{"lr": 0.1}],
            "options": {"checkpoints": 3},
        },
        name="traj",
        fields=fields,
    )
    run_sweep(
        cfg, tmp_path / "sw", run_fn=_fake_traj_run, resolve=lambda o: BASE | dict(o), log=lambda m: None
    )
    # one more sweep directory entry that failed: edit sweep.json as a failed run would leave it
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    doc["runs"][0].update(status="failed", error="RuntimeError: diverged")
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(doc))

    assert report_sweep(tmp_path / "sw", summarize=_fake_summary) == 0
    md = (tmp_path / "sw" / "claims.md").read_text()
    assert "| 8.7 |" in md and "RuntimeError: diverged" in md and "trajectories.png" in md
    data = json.loads((tmp_path / "sw" / "claims.json").read_text())
    assert data["claims"][0]["numbers"]["n_seeds"] == 7
    assert [p["name"] for p in data["problems"]] == [doc["runs"][0]["name"]]
    assert (tmp_path / "sw" / "trajectories.png").read_bytes()[:4] == b"\x89PNG"

    dest = collect_results([tmp_path / "sw"], tmp_path / "results", command="pytest")
    assert (dest / "traj" / "trajectories.png").exists()
    combined = (dest / "claims.md").read_text()
    assert "| 8.7 |" in combined and "| F8.7 |" in combined
    # paper rows (with the quoted sentence) and framework rows (ours) in separate sections
    paper, framework = combined.index("## Paper claims"), combined.index("## Framework tests")
    assert paper < combined.index("| 8.7 |") < framework
    assert combined.index("## Framework tests") < combined.index("| F8.7 |")
    assert "the sampling trajectories have a negligible effect" in combined
    assert [c["kind"] for c in data["claims"]] == ["paper", "framework"]
    assert not list(dest.rglob("*.pt"))


def test_report_sweep_refuses_non_sweep_dir(tmp_path):
    from lipverify.claims import report_sweep

    with pytest.raises(LipverifyError, match="not a sweep directory"):
        report_sweep(tmp_path)


def test_combined_report_lists_the_committed_framework_results(tmp_path):
    """collect_results adds one row per `lipverify framework` result found under the destination
    (its own verdict, never recomputed; assumption3's `holds` read as pass/fail), and none when there
    are none."""
    import json

    from lipverify.claims import collect_results
    from lipverify.claims.report import framework_results

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "claims.json").write_text(json.dumps({"name": "s", "claims": [], "figures": []}))
    dest = tmp_path / "results"
    collect_results([sweep], dest)
    assert "Framework tests on models" not in (dest / "claims.md").read_text()
    (dest / "framework_mean_reversion").mkdir()
    (dest / "framework_mean_reversion" / "results.json").write_text(
        json.dumps({"verdict": "fail", "message": "slope -0.1 per step"})
    )
    (dest / "framework_one_step" / "run").mkdir(parents=True)
    (dest / "framework_one_step" / "run" / "assumption3.json").write_text(
        json.dumps({"summary": {"holds": True, "message": "within 10%"}})
    )
    rows = framework_results(dest)
    expected = [("pass", "within 10%"), ("fail", "slope -0.1 per step")]
    assert [(r["verdict"], r["message"]) for r in rows] == expected
    collect_results([sweep], dest)
    text = (dest / "claims.md").read_text()
    assert "| mean-reversion | slope -0.1 per step | **FAIL** |" in text
    assert json.loads((dest / "claims.json").read_text())["framework_tests"] == rows
