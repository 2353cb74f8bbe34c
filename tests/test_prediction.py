"""summarize_run / plot_run on synthetic records with known answers."""

from __future__ import annotations

import math

import pytest

from lipverify import LipverifyError
from lipverify.prediction import plot_run, summarize_run
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


def test_overflowing_mean_or_std_is_refused_not_counted_in_band(tmp_path):
    # |K - inf| <= inf is True: an overflowed prediction used to put 100% of the steps in the band
    _write_run(tmp_path / "mean", psi=(1e4, 0.0))  # psi_bar = 5e3 per step: exp overflows at t = 1
    _write_run(tmp_path / "std", phi=(1e3, 0.0))  # phi_bar^2 = 2.5e5: only the std overflows
    for run in ("mean", "std"):
        with pytest.raises(LipverifyError, match=r"prediction overflows at step 1 .*observed ln K_t = .*lr"):
            summarize_run(tmp_path / run)
        with pytest.raises(LipverifyError, match="prediction overflows at step 1"):
            plot_run(tmp_path / run, tmp_path / run / "f.png")


def test_overflowing_full_data_prediction_is_refused(tmp_path):
    rows = _write_run(tmp_path)
    for r in rows[:-1]:
        for n in LAYERS:
            r[f"{n}.mu_full"] = 1e4
    StepLog(tmp_path / "steps.csv", step_columns(LAYERS), rows).close()
    with pytest.raises(LipverifyError, match="prediction overflows at step 1"):
        summarize_run(tmp_path)


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
