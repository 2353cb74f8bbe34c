"""Results table of the Fig. 2 validation: one row per run directory under RUNS (summary.json).

python experiments/fig2/table.py runs/fig2 --out experiments/results/fig2/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ("plain", "batch_norm", "dropout", "weight_decay", "mixup", "autoaugment", "label_smoothing", "fgsm")


def _pct(x):
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _cov(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def row(name: str, s: dict) -> str:
    f, d = s["forecast"], s["one_step_decomposition"]
    cal = f.get("calibration") or {}
    cross = s.get("cumulative_phi_sq_cross")
    share = cross / s["cumulative_phi_sq"] if cross is not None and s["cumulative_phi_sq"] > 0 else None
    zsq = cal.get("mean_z_sq")
    lo_hi = cal.get("mean_z_sq_interval")
    cal_text = "n/a" if zsq is None else f"{cal['verdict']} ({zsq:.3g} in [{lo_hi[0]:.2g}, {lo_hi[1]:.2g}]?)"
    return (
        f"| {name} | {s['K_T_observed']:.4g} | "
        + (f"{f['K_T_predicted_mean']:.4g} ± {f['K_T_predicted_std']:.2g}" if f.get("available") else "n/a")
        + f" | {_pct(f.get('relative_error'))} | {_cov(f.get('fraction_in_2std'))} | "
        f"{_cov(cal.get('coverage_1std'))} | {cal_text} | {f.get('verdict', 'n/a')} | "
        f"{_pct(d['relative_error'])} | {_cov(d['fraction_in_2std'])} | {d['calibration']['verdict']} | "
        f"{s['psi_mu_ratio']:.3g} | {'n/a' if share is None else f'{share:.3g}'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dirs = {p.parent.name: p.parent for p in args.runs.glob("*/summary.json")}
    names = [n for n in ORDER if n in dirs] + sorted(n for n in dirs if n not in ORDER)
    lines = [
        "Expectation-based forecast (mu from the full-data gradient) first; then the one-step-ahead",
        "decomposition (mu from the batch mean: not a forecast). Coverage is the fraction of steps inside",
        "E ± 2 std (expected 95.4% if the model is right; ±1 std: 68.3%). Calibration: mean z² of ln K_t",
        "against its 99% interval under the model (autocorrelation included). Cross-layer share:",
        "Σφ²_cross / Σφ̄² (what Assumption 3 drops against what it keeps).",
        "",
        "| config | K_T observed | forecast E[K_T] ± std | forecast error | in ±2 std | in ±1 std | "
        "calibration (mean z²) | forecast verdict | decomposition error | decomposition in ±2 std | "
        "decomposition calibration | Σψ̄/\\|Σμ̄\\| | cross-layer share |",
        "|---" * 13 + "|",
    ]
    for n in names:
        lines.append(row(n, json.loads((dirs[n] / "summary.json").read_text())))
    missing = [n for n in ORDER if n not in dirs]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)} (autoaugment needs torchvision)."]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
