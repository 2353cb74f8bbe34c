"""``lipverify report RUN_DIR``: summary numbers, ``summary.json`` and ``figure.png`` of a run
(or, for a sweep directory with ``sweep.json``, the sweep report of :mod:`lipverify.claims`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lipverify._validation import LipverifyError
from lipverify.records import ensure_writable_dir

HELP = "summarise a training run (summary.json, figure.png) or a sweep directory"

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

    from lipverify.prediction import plot_run, summarize_run, verdict_line
    from lipverify.records import write_json

    run_dir = Path(run_dir)
    summary = summarize_run(run_dir)
    write_json(run_dir / "summary.json", summary)
    figure = plot_run(run_dir, run_dir / "figure.png")
    for key in _KEYS:
        value = summary[key]
        print(f"{key:28s} {value:.6g}" if isinstance(value, float) else f"{key:28s} {value}")
    print(f"{'layer':8s} {'sigma0':>10s} {'sigma_T':>10s} {'pred E':>10s} {'pred std':>10s} {'in 2std':>8s}")
    for name, s in summary["layers"].items():
        print(
            f"{name:8s} {s['sigma0']:10.5g} {s['sigma_T_observed']:10.5g} "
            f"{s['sigma_T_predicted_mean']:10.5g} "
            f"{s['sigma_T_predicted_std']:10.3g} {s['fraction_in_2std']:8.2f}"
        )
    line = f"verdict (Theorem 17, batch mu): {verdict_line(summary['prediction_verdict'])}"
    print(line)
    if summary.get("verdict_full_mu") is not None:
        print(f"verdict (Theorem 17, full-data mu): {verdict_line(summary['verdict_full_mu'])}")
    if verdict_to_stderr:
        print(f"lipverify train: {line}", file=sys.stderr)
    print(f"wrote {run_dir / 'summary.json'} and {figure}")
    return 0


def run(args: argparse.Namespace) -> int:
    path = Path(args.run_dir)
    if not path.is_dir():
        raise LipverifyError(f"run directory {path} does not exist")
    ensure_writable_dir(path)  # summary.json and figures are written into it
    if (path / "sweep.json").exists():
        from lipverify.claims import report_sweep

        return report_sweep(path)
    return report_run(path)
