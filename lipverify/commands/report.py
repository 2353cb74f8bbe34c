"""``lipverify report RUN_DIR``: summary numbers, ``summary.json`` and ``figure.png`` of a run
(or, for a sweep directory with ``sweep.json``, the sweep report of :mod:`lipverify.claims`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lipverify._validation import LipverifyError
from lipverify.records import ensure_writable_dir

HELP = "summarise a training run (summary.json, figure.png) or a sweep directory"

_BLOCK_KEYS = (
    "K_T_predicted_mean",
    "K_T_predicted_std",
    "relative_error",
    "fraction_in_2std",
    "expected_fraction_in_2std",
    "z_final",
)

_KEYS = (
    "steps",
    "K0",
    "K_T_observed",
    "K_T_predicted_mean",
    "K_T_predicted_std",
    "relative_error",
    "fraction_in_2std",
    "cumulative_mu",
    "cumulative_psi",
    "psi_mu_ratio",
    "cumulative_phi_sq",
    "cumulative_phi_sq_cross",
    "K_T_predicted_mean_full_mu",
    "K_T_predicted_std_full_mu",
    "fraction_in_2std_full_mu",
    "log_bound_change_observed",
    "log_bound_change_predicted",
    "final_loss",
    "z_final",
    "lr_sharpness_max",
    "stability_failed_step",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="directory written by `lipverify train` (or a sweep directory)")


def report_run(run_dir: str | Path, verdict_to_stderr: bool = False) -> int:
    """Write summary.json and figure.png, print the summary and the verdict line (``verdict:
    holds|does not hold|inconclusive|not applicable: reasons``; also on stderr for ``train``).
    Returns 0: a run whose prediction fails is a result, not an error."""
    import sys

    from lipverify.prediction import plot_run, summarize_run
    from lipverify.records import write_json

    run_dir = Path(run_dir)
    summary = summarize_run(run_dir)
    write_json(run_dir / "summary.json", summary)
    figure = plot_run(run_dir, run_dir / "figure.png")
    forecast, decomposition = summary["forecast"], summary["one_step_decomposition"]
    print(f"forecast: {forecast['kind']}")
    if forecast["available"]:
        print(f"  {'full_gradient_every':26s} {forecast.get('full_gradient_every')}")
        _print_block(forecast)
    else:
        print(f"  not available: {forecast['reason']}")
    print(f"one-step decomposition: {decomposition['kind']}")
    _print_block(decomposition)
    print("run:")
    for key in _KEYS:
        value = summary[key]
        print(f"  {key:26s} {value:.6g}" if isinstance(value, float) else f"  {key:26s} {value}")
    print(f"{'layer':8s} {'sigma0':>10s} {'sigma_T':>10s} {'pred E':>10s} {'pred std':>10s} {'in 2std':>8s}")
    for name, s in summary["layers"].items():
        print(
            f"{name:8s} {s['sigma0']:10.5g} {s['sigma_T_observed']:10.5g} "
            f"{s['sigma_T_predicted_mean']:10.5g} "
            f"{s['sigma_T_predicted_std']:10.3g} {s['fraction_in_2std']:8.2f}"
        )
    lines = []
    if forecast["available"]:
        lines.append(f"verdict (forecast, full-data mu): {_block_line(forecast)}")
        lines.append(f"calibration (forecast): {_calibration_line(forecast['calibration'])}")
    else:
        lines.append("verdict (forecast, full-data mu): not available (full_gradient_every = 0)")
    lines.append(f"verdict (one-step decomposition, batch mu; not a forecast): {_block_line(decomposition)}")
    lines.append(f"calibration (one-step decomposition): {_calibration_line(decomposition['calibration'])}")
    for line in lines:
        print(line)
    if verdict_to_stderr:
        for line in lines:
            print(f"lipverify train: {line}", file=sys.stderr)
    if (run_dir / "lipschitz.csv").exists():
        _report_lipschitz(run_dir, summary)
    if (run_dir / "conv_norm.csv").exists():
        _report_conv_norm(run_dir, summary)
    print(f"wrote {run_dir / 'summary.json'} and {figure}")
    return 0


def _report_lipschitz(run_dir: Path, summary: dict) -> None:
    """``lipschitz.csv`` (``lipschitz_every > 0``): the ``lipschitz`` block of summary.json, a printed
    table and ``lipschitz.png``."""
    from lipverify.lipschitz import plot_lipschitz, summarize_lipschitz
    from lipverify.records import write_json

    block = summarize_lipschitz(run_dir)
    summary["lipschitz"] = block
    write_json(run_dir / "summary.json", summary)
    print("Lipschitz constant (l2): empirical lower <= true <= certified upper; K beside them")
    print(f"  {'step':>6s} {'K':>11s} {'upper':>11s} {'lower':>11s} {'upper/K':>8s}")
    for key in ("first", "last"):
        p = block[key]
        print(
            f"  {p['step']:6d} {p['K']:11.5g} {p['upper']:11.5g} {p['lower']:11.5g} {p['upper_over_K']:8.3g}"
        )
    print(f"  {'layer':8s} {'lower':>10s} {'upper':>10s} {'reshaped':>10s}  (last record)")
    for name, d in block["layers"].items():
        print(f"  {name:8s} {d['last_lower']:10.5g} {d['last_upper']:10.5g} {d['last_reshaped']:10.5g}")
    print(f"wrote {plot_lipschitz(run_dir, run_dir / 'lipschitz.png')}")


def _report_conv_norm(run_dir: Path, summary: dict) -> None:
    """``conv_norm.csv`` (``conv_norm_every > 0``): the ``conv_norm_dynamics`` block of summary.json
    (:func:`lipverify.conv_dynamics.conv_norm_prediction` without its series), a printed table and
    ``conv_norm.png``."""
    from lipverify.conv_dynamics import conv_norm_prediction, plot_conv_norm
    from lipverify.records import read_steps, write_json

    _, rows = read_steps(run_dir / "conv_norm.csv")
    pred = conv_norm_prediction(rows)
    summary["conv_norm_dynamics"] = {
        n: {k: v for k, v in p.items() if k != "series"} for n, p in pred.items()
    }
    write_json(run_dir / "summary.json", summary)
    print(
        "conv norm dynamics: Theorem 14 for max_f sigma_1(W_hat_f) (circular model), "
        "terms held between records"
    )
    print(
        f"  {'layer':8s} {'norm0':>9s} {'normT':>9s} {'obs dln':>9s} {'pred dln':>9s} {'pred std':>9s} "
        f"{'z_T':>7s} {'in 2std':>7s} {'flagged':>7s} {'ties':>5s}  drift"
    )
    for name, p in pred.items():
        z = f"{p['z_T']:7.2f}" if p["z_T"] is not None else f"{'-':>7s}"
        cov = f"{p['coverage_2std']:7.2f}" if p["coverage_2std"] is not None else f"{'-':>7s}"
        print(
            f"  {name:8s} {p['norm_0']:9.5g} {p['norm_T']:9.5g} {p['observed_log_change']:+9.4f} "
            f"{p['predicted_log_change']:+9.4f} {p['predicted_log_std']:9.3g} {z} {cov} "
            f"{p['flagged_steps']:7d} {p['near_tie_steps']:5d}  {p['drift']}; {p['calibration']}"
        )
    print(f"wrote {plot_conv_norm(rows, run_dir / 'conv_norm.png')}")


def _print_block(block: dict) -> None:
    for key in _BLOCK_KEYS:
        value = block[key]
        print(f"  {key:26s} {value:.6g}" if isinstance(value, float) else f"  {key:26s} {value}")
    cal = block["calibration"]
    if cal["quantiles"]:
        print(f"  {'z-scores of ln K_t':26s} " + "  ".join(f"q{q['level']:g}" for q in cal["quantiles"]))
        print(f"  {'  N(0, 1)':26s} " + "  ".join(f"{q['normal']:+.2f}" for q in cal["quantiles"]))
        print(f"  {'  observed':26s} " + "  ".join(f"{q['observed']:+.2f}" for q in cal["quantiles"]))


def _block_line(block: dict) -> str:
    return f"{block['verdict']}: " + "; ".join(block["verdict_reasons"])


def _calibration_line(cal: dict) -> str:
    return f"{cal['verdict']}: {cal['reason']}"


def run(args: argparse.Namespace) -> int:
    path = Path(args.run_dir)
    if not path.is_dir():
        raise LipverifyError(f"run directory {path} does not exist")
    ensure_writable_dir(path)  # summary.json and figures are written into it
    if (path / "sweep.json").exists():
        from lipverify.claims import report_sweep

        return report_sweep(path)
    return report_run(path)
