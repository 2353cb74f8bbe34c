"""summarize_run / plot_run on synthetic records with known answers."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from lipverify import LipverifyError, prediction
from lipverify.prediction import (
    VERDICT_ALPHA,
    effective_sample_size,
    plot_run,
    prediction_verdict,
    summarize_run,
)
from lipverify.records import StepLog, read_steps, write_json
from lipverify.training import step_columns

LAYERS = ["a", "b"]


def _write_run(
    path,
    T=10,
    mu=(-0.01, 0.002),
    psi=(0.004, 0.001),
    phi=(0.02, 0.01),
    sigma0=(2.0, 0.5),
    observed=None,
    probe_every=1,
):
    """A run with constant per-layer terms; observed sigma follows ``observed(t, layer)``."""
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "meta.json", {"layers": LAYERS, "config": {"model": "mlp", "dataset": "x"}})
    observed = observed or (lambda t, j: sigma0[j] + t * (mu[j] + psi[j]))
    rows = []
    for t in range(T + 1):
        sig = [observed(t, j) for j in range(2)]
        row = {"step": t, "log_bound": sum(math.log(s) for s in sig)}
        for j, n in enumerate(LAYERS):
            row[f"{n}.sigma"] = sig[j]
        if t < T:
            row["loss"] = 1.0
            if t % probe_every == 0:
                row.update(
                    net_mu=sum(mu[j] / sig[j] for j in range(2)),
                    net_psi=sum(psi[j] / sig[j] for j in range(2)),
                    net_phi_sq=sum(phi[j] ** 2 / sig[j] ** 2 for j in range(2)),
                    net_phi_sq_cross=0.0,
                )
                for j, n in enumerate(LAYERS):
                    row.update(
                        {
                            f"{n}.mu": mu[j],
                            f"{n}.psi": psi[j],
                            f"{n}.phi": phi[j],
                            f"{n}.gap": 0.1,
                            f"{n}.degenerate": False,
                            f"{n}.dsigma_observed": 0.0,
                            f"{n}.dsigma_first": 0.0,
                            f"{n}.dsigma_second": 0.0,
                            f"{n}.dropped_drift_term": 1e-6,
                        }
                    )
        rows.append(row)
    StepLog(path / "steps.csv", step_columns(LAYERS), rows).close()
    return rows


def test_summary_matches_theorem_17_by_hand(tmp_path):
    rows = _write_run(tmp_path)
    s = summarize_run(tmp_path)
    T = 10
    net = [(r["net_mu"], r["net_psi"], r["net_phi_sq"]) for r in rows[:T]]
    K0 = math.exp(rows[0]["log_bound"])
    mean = K0 * math.exp(sum(m + p for m, p, _ in net))
    var = mean**2 * math.expm1(sum(f for *_, f in net))
    assert s["steps"] == T
    assert math.isclose(s["K0"], K0, rel_tol=1e-12)
    assert math.isclose(s["K_T_predicted_mean"], mean, rel_tol=1e-12)
    assert math.isclose(s["K_T_predicted_std"], math.sqrt(var), rel_tol=1e-12)
    assert math.isclose(s["K_T_observed"], math.exp(rows[T]["log_bound"]), rel_tol=1e-12)
    assert math.isclose(s["relative_error"], (mean - s["K_T_observed"]) / s["K_T_observed"], rel_tol=1e-12)
    cum_mu, cum_psi = sum(m for m, *_ in net), sum(p for _, p, _ in net)
    assert math.isclose(s["psi_mu_ratio"], cum_psi / abs(cum_mu), rel_tol=1e-12)
    la = s["layers"]["a"]
    assert math.isclose(la["sigma_T_predicted_mean"], 2.0 + T * (-0.01 + 0.004), rel_tol=1e-12)
    assert math.isclose(la["sigma_T_predicted_std"], 0.02 * math.sqrt(T), rel_tol=1e-12)
    assert la["fraction_in_2std"] == 1.0  # observed follows the predicted mean exactly
    assert math.isclose(la["cumulative_dropped_drift_term"], T * 1e-6)


def test_fraction_in_band_counts_excursions(tmp_path):
    # Layer a drifts away from the prediction after step 5 by far more than 2 std.
    def observed(t, j):
        base = (2.0, 0.5)[j] + t * ((-0.01 + 0.004), (0.002 + 0.001))[j]
        return base + (1.0 if (j == 0 and t > 5) else 0.0)

    _write_run(tmp_path, observed=observed)
    s = summarize_run(tmp_path)
    assert s["layers"]["a"]["fraction_in_2std"] == pytest.approx(5 / 10)
    assert s["layers"]["b"]["fraction_in_2std"] == 1.0
    assert s["fraction_in_2std"] < 1.0


def test_unmeasured_steps_reuse_the_last_terms(tmp_path):
    a = summarize_run(_write_run(tmp_path / "every", probe_every=1) and tmp_path / "every")
    b = summarize_run(_write_run(tmp_path / "sparse", probe_every=3) and tmp_path / "sparse")
    # constant per-layer terms but sigma-dependent network terms: close, not equal
    assert a["K_T_predicted_mean"] == pytest.approx(b["K_T_predicted_mean"], rel=1e-3)
    assert a["cumulative_mu"] != b["cumulative_mu"]
    _, rows = read_steps(tmp_path / "sparse" / "steps.csv")
    assert rows[1]["net_mu"] is None


def test_incomplete_run_is_refused(tmp_path):
    rows = _write_run(tmp_path)
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows[:-1]).close()
    with pytest.raises(LipverifyError, match="final row"):
        summarize_run(tmp_path)
    with pytest.raises(LipverifyError, match="missing"):
        summarize_run(tmp_path / "nowhere")


def test_plot_run_writes_a_png(tmp_path):
    _write_run(tmp_path)
    path = plot_run(tmp_path, tmp_path / "fig" / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_full_data_drift_prediction(tmp_path):
    rows = _write_run(tmp_path)
    assert summarize_run(tmp_path)["K_T_predicted_mean_full_mu"] is None
    # mu_full = 3 x the batch drift, recorded every other step (forward-filled in between)
    for r in rows[:-1]:
        if r["step"] % 2 == 0:
            for n, mu in zip(LAYERS, (-0.01, 0.002), strict=True):
                r[f"{n}.mu_full"] = 3 * mu
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows).close()
    s = summarize_run(tmp_path)
    net_full = []
    for t in range(10):
        src = rows[t - t % 2]
        mu_bar = sum(3 * mu / src[f"{n}.sigma"] for n, mu in zip(LAYERS, (-0.01, 0.002), strict=True))
        net_full.append(mu_bar + rows[t]["net_psi"])
    expected = math.exp(rows[0]["log_bound"]) * math.exp(sum(net_full))
    assert math.isclose(s["K_T_predicted_mean_full_mu"], expected, rel_tol=1e-12)
    assert s["K_T_predicted_mean"] != s["K_T_predicted_mean_full_mu"]


def test_overflowing_mean_or_std_is_flagged_not_applicable_not_counted_in_band(tmp_path):
    # |K - inf| <= inf is True: an overflowed prediction used to put 100% of the steps in the band;
    # the observed run is finite, so it is reportable with the prediction flagged (it used to raise)
    _write_run(tmp_path / "mean", psi=(1e4, 0.0))  # psi_bar = 5e3 per step: exp overflows at t = 1
    _write_run(tmp_path / "std", phi=(1e3, 0.0))  # phi_bar^2 = 2.5e5: only the std overflows
    for run in ("mean", "std"):
        s = summarize_run(tmp_path / run)
        assert s["verdict"] == "not applicable", s["verdict_reasons"]
        (reason,) = s["verdict_reasons"]
        assert re.search(
            r"^a: sigma_1 = 2 at step 0, relative term .* the Theorem 17 prediction overflows at step 1 .*the run itself is finite",  # noqa: E501
            reason,
        ), reason
        assert s["fraction_in_2std"] is None and s["relative_error"] is None
        assert s["K_T_predicted_std"] is None and (s["K_T_predicted_mean"] is None) == (run == "mean")
        json.dumps(s, allow_nan=False)  # no inf/NaN reaches summary.json
        plot_run(tmp_path / run, tmp_path / run / "f.png")


def test_overflowing_full_data_prediction_is_flagged(tmp_path):
    rows = _write_run(tmp_path)
    for r in rows[:-1]:
        for n in LAYERS:
            r[f"{n}.mu_full"] = 1e4
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows).close()
    s = summarize_run(tmp_path)
    assert s["verdict_full_mu"]["verdict"] == "not applicable"
    assert "overflows at step 1" in s["verdict_full_mu"]["reasons"][0]
    assert s["K_T_predicted_mean_full_mu"] is None and s["verdict"] != "not applicable"


def test_overflowing_observed_bound_is_refused(tmp_path):
    # ln K = 921 > ln(max float): math.exp used to raise a raw OverflowError
    _write_run(tmp_path, observed=lambda t, j: 1e200 if t == 10 else (2.0, 0.5)[j])
    with pytest.raises(LipverifyError, match=r"observed bound K overflows at step 10 \(ln K = 921"):
        summarize_run(tmp_path)


def test_unfinished_run_error_quotes_meta_status(tmp_path):
    rows = _write_run(tmp_path)
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows[:4]).close()
    error = "LipverifyError: training diverged at step 4: loss is nan"
    meta = {"layers": LAYERS, "status": "failed", "error": error}
    write_json(tmp_path / "meta.json", meta)
    with pytest.raises(LipverifyError, match="resuming") as info:
        summarize_run(tmp_path)
    assert f"status 'failed': {error}" in str(info.value) and "resume it first" not in str(info.value)
    (tmp_path / "steps.csv").unlink()  # failed before its first step (e.g. bad data)
    with pytest.raises(LipverifyError, match=rf"missing per-step record.*status 'failed': {error}"):
        summarize_run(tmp_path)
    write_json(tmp_path / "meta.json", {**meta, "status": "stopped", "error": None})
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows[:4]).close()
    with pytest.raises(
        LipverifyError, match=r"final row; meta.json says status 'stopped'\); resume it first"
    ):
        summarize_run(tmp_path)


def test_every_summary_key_by_hand_on_a_varied_run(tmp_path):
    """Per-step terms that vary, degenerate flags, non-zero cross terms, mu_full on some steps and
    an observed K that leaves the 2-std band at a known step: every key of the summary (network and
    per layer) against plain loops over the same numbers."""
    T = 6
    net_mu = [0.02, -0.01, 0.03, 0.015, 0.01, -0.02]
    net_psi = [0.005, 0.004, 0.006, 0.003, 0.002, 0.001]
    net_phi_sq = [1e-4, 2e-4, 1.5e-4, 1e-4, 3e-4, 2e-4]
    cross = [1e-5, -2e-5, 3e-5, 2e-5, 4e-5, 5e-5]
    lay_mu = {
        "a": [0.01, -0.02, 0.015, 0.005, -0.01, 0.02],
        "b": [-0.004, 0.003, 0.002, -0.001, 0.005, 0.001],
    }
    lay_psi = {
        "a": [0.002, 0.003, 0.001, 0.004, 0.002, 0.005],
        "b": [0.0005, 0.001, 0.0015, 0.002, 0.001, 0.0005],
    }
    lay_phi = {"a": [0.01, 0.02, 0.015, 0.01, 0.03, 0.02], "b": [0.005, 0.004, 0.006, 0.003, 0.002, 0.001]}
    degenerate = {"a": [1, 0, 1, 1, 0, 0], "b": [0, 0, 0, 0, 0, 1]}
    d_obs = {
        "a": [0.011, -0.018, 0.017, 0.01, -0.007, 0.026],
        "b": [-0.003, 0.004, 0.003, 0.001, 0.006, 0.002],
    }
    d_first = {
        "a": [0.012, -0.017, None, 0.009, -0.008, 0.025],
        "b": [-0.0035, 0.004, 0.0035, 0.001, 0.0062, 0.0],
    }
    d_second = {
        "a": [0.0115, -0.0185, 0.016, 0.0095, -0.0075, 0.0255],
        "b": [-0.0031, 0.0041, 0.0031, 0.0, 0.006, 0.0021],
    }
    dropped = {"a": [1e-6, 2e-6, None, 3e-6, 4e-6, 5e-6], "b": [1e-7, 0.0, 2e-7, 3e-7, 4e-7, 5e-7]}
    K0 = 3.0

    def by_hand(mus):  # E[K_t] = K0 exp(sum_{s<t} (mu + psi)), std = E sqrt(expm1(Phi_t))
        mean, std = [K0], [0.0]
        drift = Phi = 0.0
        for s in range(T):
            drift += mus[s] + net_psi[s]
            Phi += net_phi_sq[s]
            mean.append(K0 * math.exp(drift))
            std.append(mean[-1] * math.sqrt(math.expm1(Phi)))
        return mean, std

    mean, std = by_hand(net_mu)  # the batch prediction
    # observed K (in std of the batch prediction): inside for t = 1..3, 2.5 std at t = 4 (outside
    # 2 std, inside 3), far outside at t = 5 and at t = T
    offset = [0.0, 0.0, 0.0, 0.0, 2.5, 10.0, 10.0]
    K_obs = [mean[t] + offset[t] * std[t] for t in range(T + 1)]
    # layer sigma: a follows its predicted mean except at t = 5; b starts at 0.5 and jumps at t = T
    sig = {"a": [2.0], "b": [0.5]}
    lay_mean = {"a": [2.0], "b": [0.5]}
    lay_std = {"a": [0.0], "b": [0.0]}
    for n in LAYERS:
        acc = var = 0.0
        for s in range(T):
            acc += lay_mu[n][s] + lay_psi[n][s]
            var += lay_phi[n][s] ** 2
            lay_mean[n].append(sig[n][0] + acc)
            lay_std[n].append(math.sqrt(var))
    sig["a"] += [lay_mean["a"][t] + (5.0 * lay_std["a"][t] if t == 5 else 0.0) for t in range(1, T + 1)]
    sig["b"] += [lay_mean["b"][t] + (1.0 if t == T else 0.5 * lay_std["b"][t]) for t in range(1, T + 1)]
    # mu_full: equal to the batch drift (through layer a) at t = 0..3, different at t = 4 (carried to 5)
    mu_full = {"a": [net_mu[t] * sig["a"][t] for t in range(4)] + [0.05 * sig["a"][4], None], "b": [0.0] * 4}
    mu_full["b"] += [-0.01 * sig["b"][4], None]
    rows = []
    for t in range(T + 1):
        row = {"step": t, "log_bound": math.log(K_obs[t])}
        for n in LAYERS:
            row[f"{n}.sigma"] = sig[n][t]
        if t < T:
            row.update(loss=0.5 + t, net_mu=net_mu[t], net_psi=net_psi[t], net_phi_sq=net_phi_sq[t])
            row["net_phi_sq_cross"] = cross[t]
            for n in LAYERS:
                row.update(
                    {
                        f"{n}.mu": lay_mu[n][t],
                        f"{n}.psi": lay_psi[n][t],
                        f"{n}.phi": lay_phi[n][t],
                        f"{n}.gap": 0.1,
                        f"{n}.degenerate": bool(degenerate[n][t]),
                        f"{n}.mu_full": mu_full[n][t],
                        f"{n}.dsigma_observed": d_obs[n][t],
                        f"{n}.dsigma_first": d_first[n][t],
                        f"{n}.dsigma_second": d_second[n][t],
                        f"{n}.dropped_drift_term": dropped[n][t],
                    }
                )
        rows.append(row)
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"model": "mlp", "dataset": "x", "lr": 0.1}
    write_json(tmp_path / "meta.json", {"layers": LAYERS, "config": config})
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows).close()
    K_obs = [math.exp(math.log(k)) for k in K_obs]  # what the run records
    # full-data prediction: mu_bar from mu_full / sigma (forward-filled), psi and phi from the batch
    full_mu, last = [], None
    for t in range(T):
        if mu_full["a"][t] is not None:
            last = sum(mu_full[n][t] / sig[n][t] for n in LAYERS)
        full_mu.append(last)
    fmean, fstd = by_hand(full_mu)
    f_in = [abs(K_obs[t] - fmean[t]) / fstd[t] for t in range(1, T + 1)]
    assert 2.2 < f_in[3] < 2.8  # t = 4: between 2 and 3 full-mu std
    assert all(abs(z - 2) > 0.2 and abs(z - 3) > 0.2 for z in f_in)

    s = summarize_run(tmp_path)

    def close(key, got, want):
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15), (key, got, want)

    assert s["steps"] == T
    close("K0", s["K0"], K0)
    close("K_T_observed", s["K_T_observed"], K_obs[T])
    close("K_T_predicted_mean", s["K_T_predicted_mean"], mean[T])
    close("K_T_predicted_std", s["K_T_predicted_std"], std[T])
    close("relative_error", s["relative_error"], (mean[T] - K_obs[T]) / K_obs[T])
    assert s["fraction_in_2std"] == pytest.approx(3 / 6)  # t = 1, 2, 3
    cum_mu, cum_psi, cum_phi = sum(net_mu), sum(net_psi), sum(net_phi_sq)
    close("cumulative_mu", s["cumulative_mu"], cum_mu)
    close("cumulative_psi", s["cumulative_psi"], cum_psi)
    close("cumulative_phi_sq", s["cumulative_phi_sq"], cum_phi)
    close("psi_mu_ratio", s["psi_mu_ratio"], cum_psi / abs(cum_mu))
    close("cumulative_phi_sq_cross", s["cumulative_phi_sq_cross"], sum(cross))
    close("log_bound_change_observed", s["log_bound_change_observed"], math.log(K_obs[T] / K0))
    predicted_change = sum(net_mu[t] + net_psi[t] - net_phi_sq[t] / 2 for t in range(T))
    close("log_bound_change_predicted", s["log_bound_change_predicted"], predicted_change)
    close("K_T_predicted_mean_full_mu", s["K_T_predicted_mean_full_mu"], fmean[T])
    close("K_T_predicted_std_full_mu", s["K_T_predicted_std_full_mu"], fstd[T])
    assert s["fraction_in_2std_full_mu"] == pytest.approx(sum(z <= 2 for z in f_in) / T)
    close("cumulative_mu_full", s["cumulative_mu_full"], sum(full_mu))
    assert s["final_loss"] == 0.5 + (T - 1)
    assert s["config"] == config
    # the expectation-based forecast leads, the batch-mean decomposition follows
    assert list(s)[1:3] == ["forecast", "one_step_decomposition"]
    f, d = s["forecast"], s["one_step_decomposition"]
    assert f["available"] and "full-data" in f["kind"] and "not a forecast" in d["kind"]
    close("forecast mean", f["K_T_predicted_mean"], fmean[T])
    close("forecast std", f["K_T_predicted_std"], fstd[T])
    close("forecast cumulative_mu", f["cumulative_mu"], sum(full_mu))
    assert f["fraction_in_2std"] == s["fraction_in_2std_full_mu"]
    close("decomposition mean", d["K_T_predicted_mean"], mean[T])
    # calibration z-scores of ln K_t against N(m_t, v_t), by hand
    m, v = math.log(K0), 0.0
    z_hand = []
    for t in range(T):
        m += full_mu[t] + net_psi[t] - net_phi_sq[t] / 2
        v += net_phi_sq[t]
        z_hand.append((math.log(K_obs[t + 1]) - m) / math.sqrt(v))
    close("mean z^2", f["calibration"]["mean_z_sq"], sum(z * z for z in z_hand) / T)
    assert set(s) == {
        "steps", "K0", "K_T_observed", "K_T_predicted_mean", "K_T_predicted_std", "relative_error",
        "fraction_in_2std", "psi_mu_ratio", "cumulative_mu", "cumulative_psi", "cumulative_phi_sq",
        "cumulative_phi_sq_cross", "log_bound_change_observed", "log_bound_change_predicted",
        "K_T_predicted_mean_full_mu", "K_T_predicted_std_full_mu", "fraction_in_2std_full_mu",
        "cumulative_mu_full", "final_loss", "layers", "config", "forecast", "one_step_decomposition",
        # verdicts and stability (checked in the verdict tests)
        "z_final", "verdict", "verdict_reasons", "prediction_verdict", "verdict_full_mu", "sharpness_max",
        "lr_sharpness_max", "stability_warning_step", "stability_failed_step", "sharpness_evaluations",
    }  # fmt: skip
    assert set(s["layers"]) == set(LAYERS)
    for n in LAYERS:
        got = s["layers"][n]
        inside = sum(abs(sig[n][t] - lay_mean[n][t]) <= 2 * lay_std[n][t] for t in range(1, T + 1))
        ok = [i for i in range(T) if None not in (d_obs[n][i], d_first[n][i], d_second[n][i])]
        want = {
            "sigma0": sig[n][0],
            "sigma_T_observed": sig[n][T],
            "sigma_T_predicted_mean": lay_mean[n][T],
            "sigma_T_predicted_std": lay_std[n][T],
            "fraction_in_2std": inside / T,
            "cumulative_mu": sum(lay_mu[n]),
            "cumulative_psi": sum(lay_psi[n]),
            "discrete_first_order_error": sum(abs(d_obs[n][i] - d_first[n][i]) for i in ok) / len(ok),
            "discrete_second_order_error": sum(abs(d_obs[n][i] - d_second[n][i]) for i in ok) / len(ok),
            "cumulative_dropped_drift_term": sum(d for d in dropped[n] if d is not None),
            "degenerate_steps": sum(degenerate[n]),
        }
        assert set(got) == set(want)
        for key, value in want.items():
            close(f"{n}.{key}", got[key], value)
    assert s["layers"]["a"]["fraction_in_2std"] == pytest.approx(5 / 6)
    assert s["layers"]["b"]["fraction_in_2std"] == pytest.approx(5 / 6)
    assert s["layers"]["a"]["degenerate_steps"] == 3 and s["layers"]["b"]["degenerate_steps"] == 1


def _false_alarms(n_paths, T, seed):
    """Verdicts "does not hold" on paths drawn from the model itself: K_t = 1 + 0.01 W_t, predicted
    E = 1, std = 0.01 sqrt(t) (a correct Gaussian model; Brownian autocorrelation)."""
    g = torch.Generator().manual_seed(seed)
    steps = 0.01 * torch.randn(n_paths, T, generator=g, dtype=torch.float64)
    paths = torch.cat([torch.ones(n_paths, 1, dtype=torch.float64), 1 + steps.cumsum(1)], 1)
    mean = [1.0] * (T + 1)
    std = [0.01 * math.sqrt(t) for t in range(T + 1)]
    return sum(prediction_verdict(p.tolist(), mean, std)["verdict"] == "does not hold" for p in paths)


def test_verdict_false_alarm_rate_on_a_correct_model_and_the_independent_steps_variant(monkeypatch):
    # the rule's family-wise rate is <= 0.01: on 400 model paths the count is <= 4 + 3 binomial sd (10)
    n, bound = 400, 400 * VERDICT_ALPHA + 3 * math.sqrt(400 * VERDICT_ALPHA)
    assert _false_alarms(n, 300, seed=0) <= bound
    # wrong variant: counting the 300 autocorrelated steps as independent samples over-rejects
    monkeypatch.setattr(prediction, "effective_sample_size", lambda T: T)
    assert _false_alarms(n, 300, seed=0) > bound


def test_verdict_holds_does_not_hold_and_inconclusive_by_construction(tmp_path):
    _write_run(tmp_path / "exact")  # observed sigma follows the predicted drift exactly
    s = summarize_run(tmp_path / "exact")
    assert (
        s["verdict"] == "holds" and s["fraction_in_2std"] == 1.0 and abs(s["z_final"]) < 0.1
    )  # K is exponential, sigma linear: close, not equal
    # observed K jumps 50% above the prediction after step 0: every step outside, |z| huge
    _write_run(tmp_path / "wrong", observed=lambda t, j: (2.0, 0.5)[j] * (1.5 if t else 1.0))
    s = summarize_run(tmp_path / "wrong")
    assert s["verdict"] == "does not hold" and s["fraction_in_2std"] == 0.0
    assert any("std from the predicted" in r for r in s["verdict_reasons"]), s["verdict_reasons"]
    # phi so large that E - 2 std < 0 at T: the band excludes no small K
    _write_run(tmp_path / "wide", phi=(1.5, 0.4), observed=lambda t, j: (2.0, 0.5)[j])
    s = summarize_run(tmp_path / "wide")
    assert s["verdict"] == "inconclusive" and "excludes no small K" in s["verdict_reasons"][0]


def test_negative_layer_mean_and_failed_stability_are_flagged(tmp_path):
    # layer b: 0.5 + t (-0.1 + 0.001) < 0 from t = 6 while its observed sigma stays at 0.5
    rows = _write_run(tmp_path, mu=(-0.01, -0.1), observed=lambda t, j: (2.0 + t * (-0.006), 0.5)[j])
    rows[4].update(sharpness=60.0, lr_sharpness=3.0)
    rows[2].update(sharpness=32.0, lr_sharpness=1.6)
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows).close()
    s = summarize_run(tmp_path)
    flags = s["prediction_verdict"]["flags"]
    assert any(f.startswith("b: predicted E[sigma_1] is negative from step 6") for f in flags), flags
    assert any("stability condition lr * lambda_max < 2 failed at step 4" in f for f in flags), flags
    assert (s["stability_warning_step"], s["stability_failed_step"], s["lr_sharpness_max"]) == (2, 4, 3.0)
    assert s["verdict"] in ("inconclusive", "does not hold")


def test_prediction_verdict_refuses_bad_input_and_flags_non_physical():
    with pytest.raises(LipverifyError, match="same length"):
        prediction_verdict([1.0, 2.0], [1.0], [0.0, 0.1])
    with pytest.raises(LipverifyError, match="positive and finite"):
        prediction_verdict([1.0, math.nan], [1.0, 1.0], [0.0, 0.1])
    v = prediction_verdict([1.0, 1.0], [1.0, -1.0], [0.0, 0.1])
    assert v["verdict"] == "not applicable" and "non-physical at step 1" in v["reasons"][0]
    assert effective_sample_size(1) == 1 and effective_sample_size(15) == 1
    assert effective_sample_size(16) == 2 and effective_sample_size(300) == 3


def _martingale_paths(n_paths, T, seed, scale=1.0):
    """ln K_t - m_t of the model: Gaussian increments with a time-varying variance; the forecast's
    variance is ``scale^2`` times the true one (scale = 1: the right model)."""
    gen = torch.Generator().manual_seed(seed)
    inc_var = torch.linspace(0.2, 3.0, T, dtype=torch.float64) ** 2 * 1e-4
    x = torch.cumsum(torch.randn(n_paths, T, generator=gen, dtype=torch.float64) * inc_var.sqrt(), dim=1)
    v = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(inc_var, 0)]) * scale**2
    obs = torch.cat([torch.zeros(n_paths, 1, dtype=torch.float64), x], dim=1)
    return obs, v


def test_calibration_false_alarms_and_miscalibrated_bands():
    """Under the model the verdict 'calibrated' errs at rate alpha = 1%: 400 paths, limit 12 false
    alarms (P(Bin(400, 0.01) >= 12) ~ 4e-4). A band 1/3 as wide is 'too narrow' and one 10x as
    wide 'too wide' on most paths (measured 82% and 100%; one path is about two degrees of freedom,
    so a band 4x too wide is caught on only ~36%). The wrong variant that treats the T steps as
    independent (Var S = 2/T) raises false alarms on far more than 10% of correct paths: the steps
    are autocorrelated."""
    from scipy.stats import gamma

    from lipverify.prediction import calibration

    T, n = 200, 400
    obs, v = _martingale_paths(n, T, seed=11)
    m = [0.0] * (T + 1)
    right = [calibration(o.tolist(), m, v.tolist()) for o in obs]
    assert sum(r["verdict"] != "calibrated" for r in right) <= 12
    assert all(0.0 <= r["coverage_2std"] <= 1.0 for r in right)
    narrow = [calibration(o.tolist(), m, (v / 9).tolist())["verdict"] for o in obs]
    wide = [calibration(o.tolist(), m, (v * 100).tolist())["verdict"] for o in obs]
    assert narrow.count("too narrow") > 0.7 * n
    assert wide.count("too wide") > 0.9 * n
    naive_var = 2 / T
    lo, hi = (gamma.ppf(q, 1 / naive_var, scale=naive_var) for q in (0.005, 0.995))
    naive = [not lo <= r["mean_z_sq"] <= hi for r in right]
    assert sum(naive) > 0.1 * n


def test_calibration_refuses_a_zero_variance_and_reports_quantiles():
    from lipverify.prediction import calibration

    c = calibration([0.0, 0.1, 0.2], [0.0, 0.0, 0.0], [0.0, 0.0, 0.01])
    assert c["verdict"] == "not applicable" and "step 1" in c["reason"] and c["mean_z_sq"] is None
    c = calibration([0.0, 0.1, -0.1], [0.0, 0.0, 0.0], [0.0, 0.01, 0.04])
    assert [q["level"] for q in c["quantiles"]] == [0.025, 0.16, 0.5, 0.84, 0.975]
    assert c["mean_z_sq"] == pytest.approx((1.0 + 0.25) / 2)
    with pytest.raises(LipverifyError, match="same length"):
        calibration([0.0, 1.0], [0.0], [0.0, 1.0])
