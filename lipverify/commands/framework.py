"""``lipverify framework``: framework tests beyond the paper.

``lipverify framework one-step [--config FILE] [key=value ...] --at-step K --batches N [--out DIR]
[--seed S]``: the one-step check of Theorems 14/15 at W_K (:func:`lipverify.framework.one_step_check`).
``lipverify framework assumption3 RUN_DIR``: the cross-layer term against phi_bar^2 along a recorded
run (:func:`lipverify.framework.cross_layer_along_run`).
``lipverify framework label-noise SWEEP_DIR [--out DIR] [--tolerance PERCENT]``: label noise against
its (1 - p) model, at the same weights and along trajectories (:func:`lipverify.framework.label_noise_model`).
``lipverify framework mean-reversion SWEEP_DIR [--small-lr SWEEP_DIR2]``: mean reversion of ln K across
sampling seeds (:func:`lipverify.framework.mean_reversion`); writes ``results.json`` and
``mean_reversion.png`` into ``--out`` (default ``SWEEP_DIR/mean_reversion``).
``lipverify framework linear-response [--config FILE] [key=value ...] [--seeds-dir SWEEP_DIR] [--out DIR]
[--reference realised|mean] [--adjoint-steps 1,2,5|none] [--predictions FILE]``: Theorem 17, reduced
and adjoint linear-response predictions of std ln K_t (:mod:`lipverify.framework.linear_response`),
compared with the spread of ln K_t across the runs of a ``lipverify sweep`` directory.

All print a table and write their JSON atomically (one-step: ``--out/results.json``, default
``runs/framework_one_step``; assumption3: ``--out``, default ``RUN_DIR/assumption3.json``;
label-noise: ``--out/results.json``, default ``SWEEP_DIR/label_noise_model/results.json``;
linear-response: ``--out/results.json``, default ``runs/framework_linear_response``; without
``--seeds-dir`` it is inconclusive, exit 3).
Exit status: 0 pass, 1 fail, 3 inconclusive (2: bad input).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lipverify._validation import LipverifyError

HELP = (
    "framework tests beyond the paper: 'one-step' (Theorems 14/15 at fixed weights), 'assumption3 RUN_DIR', "
    "'label-noise SWEEP_DIR' (the (1 - p) model of Section 8.5), "
    "'mean-reversion SWEEP_DIR [--small-lr SWEEP_DIR2]' "
    "or 'linear-response' (the spread of ln K_t with feedback)"
)
EXIT = {"pass": 0, "fail": 1, "inconclusive": 3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # one positional list instead of sub-parsers: the CLI parses intermixed (see lipverify.cli)
    parser.add_argument(
        "test",
        choices=["one-step", "assumption3", "label-noise", "mean-reversion", "linear-response"],
        help="which framework test",
    )
    parser.add_argument(
        "rest",
        nargs="*",
        metavar="ARG",
        help="one-step, linear-response: key=value config overrides; assumption3: RUN_DIR; "
        "label-noise, mean-reversion: SWEEP_DIR",
    )
    parser.add_argument(
        "--config", help="one-step, linear-response: TOML training config (default: MLP on MNIST-5k)"
    )
    parser.add_argument(
        "--at-step", type=int, default=0, help="one-step: check at W_K, after K training steps"
    )
    parser.add_argument("--batches", type=int, default=500, help="one-step: mini-batches drawn at W_K")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="one-step: seed of the check's batches and bootstrap; mean-reversion: bootstrap seed",
    )
    parser.add_argument("--confidence", type=float, default=0.99, help="bootstrap interval level")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="tolerance in percent (assumption3, label-noise: default 10; linear-response: default 15)",
    )
    parser.add_argument(
        "--small-lr", help="mean-reversion: a second sweep at a smaller lr (lr T fixed), for the lr -> 0 row"
    )
    parser.add_argument(
        "--kick",
        choices=["batch-full", "residual"],
        default="batch-full",
        help="mean-reversion: noise kick = batch-vs-full drift (default) or dln K - full drift",
    )
    parser.add_argument("--seeds-dir", help="linear-response: a lipverify sweep directory of sampling seeds")
    parser.add_argument(
        "--linear-response",
        help="mean-reversion: a linear-response results.json of the same setup, printed beside the spread",
    )
    parser.add_argument(
        "--reference",
        default="realised",
        choices=["realised", "mean"],
        help="linear-response: reference path",
    )
    parser.add_argument(
        "--adjoint-steps",
        help="linear-response: comma-separated steps for the full-parameter adjoint, or 'none' "
        "(default: every step up to 10, else 10 log-spaced steps)",
    )
    parser.add_argument(
        "--predictions", help="linear-response: reuse the predictions of a results.json instead of computing"
    )
    parser.add_argument(
        "--out",
        help="output directory (one-step, label-noise, mean-reversion, linear-response) or JSON file "
        "(assumption3)",
    )


def _fmt(x) -> str:
    return "" if x is None else f"{x:+.4e}"


def _one_step(args: argparse.Namespace) -> int:
    from lipverify.framework import one_step_check
    from lipverify.records import write_json
    from lipverify.training import load_config

    if args.resamples < 100:
        raise LipverifyError(f"--resamples must be >= 100, got {args.resamples}")
    config = load_config(args.config, args.rest)
    out = Path(args.out or "runs/framework_one_step")
    result = one_step_check(
        config, args.at_step, args.batches, args.seed, confidence=args.confidence, resamples=args.resamples
    )
    cols = ("predicted", "observed", "CI(observed)", "obs/pred")
    print(f"{'quantity':58s} {cols[0]:>12s} {cols[1]:>12s} {cols[2]:>27s} {cols[3]:>8s}  verdict")
    for r in result.rows:
        ratio = f"{r.ratio:8.3f}" if r.ratio is not None else " " * 8
        ci = f"[{_fmt(r.ci[0])}, {_fmt(r.ci[1])}]"
        pred, obs = _fmt(r.predicted), _fmt(r.observed)
        print(f"{r.quantity:58s} {pred:>12s} {obs:>12s} {ci:>27s} {ratio}  {r.verdict or '-'}")
    for name, sp in result.split.items():
        if name != "net":
            print(
                f"{name}: mean dln sigma = {sp['observed']:+.3e} = first {sp['first']:+.3e} + curvature "
                f"{sp['curvature']:+.3e} + log {sp['log_correction']:+.3e} "
                f"+ remainder {sp['remainder']:+.3e}; "
                f"dropped term {sp['dropped']:+.3e}; update >= gap/2 in "
                f"{100 * result.layers[name]['update_exceeds_gap_fraction']:.0f}% of batches"
            )
    net = result.split["net"]
    print(f"cross-layer term / phi_bar^2 = {net['cross_over_phi_bar_sq']:+.3f}")
    s = result.settings
    print(
        f"k = {s['at_step']}, B = {s['batches']}, b = {s['batch_size']}, N = {s['population_size']}, "
        f"{100 * s['confidence']:g}% bootstrap ({s['resamples']} resamples); "
        f"train {s['train_seconds']:.1f} s, check {s['wall_seconds']:.1f} s; verdict: {result.verdict}"
    )
    write_json(out / "results.json", result.as_dict())
    print(f"wrote {out / 'results.json'}")
    return EXIT[result.verdict]


def _assumption3(args: argparse.Namespace) -> int:
    from lipverify.framework import cross_layer_along_run
    from lipverify.records import write_json

    if len(args.rest) != 1:
        raise LipverifyError(f"assumption3 takes exactly one RUN_DIR, got {len(args.rest)} argument(s)")
    run_dir = Path(args.rest[0])
    result = cross_layer_along_run(run_dir, 10.0 if args.tolerance is None else args.tolerance)
    s = result["summary"]
    print(f"{'quantity':40s} {'value':>12s}")
    for key in (
        "cumulative_phi_bar_sq",
        "cumulative_cross",
        "ratio",
        "share",
        "late_ratio",
        "max_step_ratio",
    ):
        print(f"{key:40s} {_fmt(s[key]):>12s}")
    print(s["message"])
    out = Path(args.out) if args.out else run_dir / "assumption3.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0 if s["holds"] else 1


def _label_noise(args: argparse.Namespace) -> int:
    import math

    from lipverify.framework import label_noise_model
    from lipverify.records import write_json

    if len(args.rest) != 1:
        raise LipverifyError(f"label-noise takes exactly one SWEEP_DIR, got {len(args.rest)} argument(s)")
    tolerance = 10.0 if args.tolerance is None else args.tolerance
    if not (math.isfinite(tolerance) and 0 < tolerance < 100):
        raise LipverifyError(f"--tolerance must be a percentage in (0, 100), got {tolerance}")
    sweep_dir = Path(args.rest[0])
    out = Path(args.out) if args.out else sweep_dir / "label_noise_model"
    result = label_noise_model(sweep_dir, tolerance=tolerance / 100)

    def num(x) -> str:
        return "" if x is None else f"{x:.4g}"

    def ci(c) -> str:
        return "" if c is None else f"[{c[0]:+.4g}, {c[1]:+.4g}]"

    d = result["drift_ratio"]
    print(
        "1. at the same weights: R = sum_t mu_bar_p(theta_t) / sum_t mu_bar_0(theta_t) "
        "along each label-noise run"
    )
    head = ("p", "1-p", "seeds", "mean R", "CI", "R first step", "R early", "R late", "verdict")
    print(
        f"{head[0]:>5s} {head[1]:>5s} {head[2]:>5s} {head[3]:>8s} {head[4]:>22s} {head[5]:>12s} "
        f"{head[6]:>8s} {head[7]:>8s}  {head[8]}"
    )
    for r in d["levels"]:
        print(
            f"{r['p']:5.2g} {r['predicted']:5.2g} {r['n']:5d} {num(r.get('mean')):>8s} "
            f"{ci(r.get('ci')):>22s} {num(r.get('mean_first_step')):>12s} "
            f"{num(r.get('mean_early')):>8s} {num(r.get('mean_late')):>8s}  {r['verdict']}"
        )
    print(f"   rule: {d['rule']}; verdict: {d['verdict']}")
    t = result["trajectory"]
    print(
        "2. along trajectories: growth G = ln K_T - ln K_0 "
        f"(clean run over T: {num(t.get('clean_growth'))}); paired differences by seed"
    )
    print(
        f"{'comparison':16s} {'p':>5s} {'seeds':>5s} {'G_x':>9s} {'G_y':>9s} {'mean diff':>10s} "
        f"{'CI':>22s} {'band':>9s}  verdict"
    )
    for name, comp in t["comparisons"].items():
        for r in comp["levels"]:
            print(
                f"{name:16s} {r['p']:5.2g} {r['n']:5d} {num(r.get('growth_x')):>9s} "
                f"{num(r.get('growth_y')):>9s} {num(r.get('mean_difference')):>10s} "
                f"{ci(r.get('ci')):>22s} {'+/-' + num(r['band'][1]):>9s}  {r['verdict']}"
            )
        print(f"   {name}: {comp.get('what', '')}; verdict: {comp['verdict']}")
    if result["problems"]:
        print(f"runs not evaluated: {', '.join(p['name'] for p in result['problems'])}")
    print(f"verdict (drift ratio and LN vs GS, the label-noise model): {result['verdict']}")
    write_json(out / "results.json", result)
    print(f"wrote {out / 'results.json'}")
    return EXIT[result["verdict"]]


def _print_mean_reversion(result) -> None:
    s = result.settings
    print(f"== {s['name'] or 'sweep'}: {s['seeds']} seeds, T = {s['steps']}, lr = {s['lr']:g}")
    print(
        f"{'step':>5s} {'lr t':>6s} {'std ln K':>11s} {'sqrt Phi':>11s} {'ratio':>7s} {'CI':>17s} "
        f"{'ratio+cross':>11s}"
    )
    t_max = s["steps"]
    shown = sorted({1, 2, 3, 5, 10, 20, t_max // 2, t_max} & set(range(1, t_max + 1)))
    for r in result.ratio:
        if r["step"] in shown:
            cross = f"{r['ratio_cross']:11.3f}" if r["ratio_cross"] is not None else " " * 11
            ratio = f"{r['ratio']:7.3f}" if r["ratio"] is not None else " " * 7
            ci = f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] is not None else ""
            print(
                f"{r['step']:5d} {r['lr_time']:6.3f} {r['std']:11.4e} {math.sqrt(r['phi']):11.4e} "
                f"{ratio} {ci:>17s} {cross}"
            )
    sl = result.slope
    print(
        f"slope of centred dln K on centred ln K: {sl['beta']:+.4e} [{sl['ci'][0]:+.4e}, {sl['ci'][1]:+.4e}] "
        f"per step, {sl['rate']:+.3f} per unit lr t; material |beta| > {sl['material']:.3e}"
    )
    for w in sl["windows"]:
        print(f"  steps {w['from']:3d}-{w['to']:3d}: {w['beta']:+.4e} [{w['ci'][0]:+.4e}, {w['ci'][1]:+.4e}]")
    for lag in result.lags:
        ci = f"[{lag['ci'][0]:+.3f}, {lag['ci'][1]:+.3f}]" if lag["ci"] is not None else "(no pairs)"
        ou = f"  OU at the slope: {lag['ou_equivalent']:+.3f}" if lag["ou_equivalent"] is not None else ""
        print(f"corr(kick_s, D_s+{lag['lag']:<3d}) = {lag['correlation']:+.3f} {ci}{ou}")
    print(f"verdict: {result.verdict}: {result.message}")


def _mean_reversion(args: argparse.Namespace) -> int:
    from lipverify.framework import mean_reversion
    from lipverify.framework.mean_reversion import linear_response_rows, plot_mean_reversion
    from lipverify.records import ensure_writable_dir, read_json, write_json

    if len(args.rest) != 1:
        raise LipverifyError(f"mean-reversion takes exactly one SWEEP_DIR, got {len(args.rest)} argument(s)")
    if args.resamples < 100:
        raise LipverifyError(f"--resamples must be >= 100, got {args.resamples}")
    sweep_dir = Path(args.rest[0])
    out = Path(args.out) if args.out else sweep_dir / "mean_reversion"
    ensure_writable_dir(out)
    result = mean_reversion(
        sweep_dir,
        args.small_lr,
        confidence=args.confidence,
        resamples=args.resamples,
        seed=args.seed,
        kick=args.kick,
    )
    _print_mean_reversion(result)
    if result.small_lr is not None:
        _print_mean_reversion(result.small_lr)
        c = result.comparison
        print(
            f"lr -> 0 (lr {c['lr'][0]:g} -> {c['lr'][1]:g}, lr T fixed): reversion rate beta/lr "
            f"{c['rate'][0]:+.3f} -> {c['rate'][1]:+.3f}, ratio {c['rate_ratio']:.3f} "
            f"[{c['rate_ratio_ci'][0]:.3f}, {c['rate_ratio_ci'][1]:.3f}] (continuous-time 1, discretisation "
            f"{c['discretisation_ratio']:g}, threshold {c['threshold']:g}): {c['outcome']}"
        )
    if args.linear_response:
        from lipverify.framework.linear_response import LinearResponseResult

        predictions = LinearResponseResult.from_dict(read_json(args.linear_response))
        result.linear_response = linear_response_rows(result, predictions)
        names = predictions.PREDICTIONS
        print("std ln K_t: linear-response predictions / empirical std (" + args.linear_response + ")")
        print(f"{'step':>5s} {'empirical':>10s} " + " ".join(f"{n:>14s}" for n in names))
        for r in result.linear_response:
            if r["step"] in {1, 2, 3, 5, 10, 20, 30, 45, 60} or r["step"] == result.settings["steps"]:
                ratios = [r.get(n + "_ratio") for n in names]
                cells = [f"{x:14.3f}" if x is not None else " " * 14 for x in ratios]
                print(f"{r['step']:5d} {r['std']:10.4e} " + " ".join(cells))
    write_json(out / "results.json", result.as_dict())
    plot_mean_reversion(result, out / "mean_reversion.png")
    print(f"wrote {out / 'results.json'} and {out / 'mean_reversion.png'}")
    return EXIT[result.verdict]


def _adjoint_steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if text.strip() == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise LipverifyError(
            f"--adjoint-steps must be comma-separated integers or 'none', got {text!r}"
        ) from exc


def _linear_response(args: argparse.Namespace) -> int:
    from lipverify.framework.linear_response import (
        LinearResponseResult,
        compare_with_seeds,
        linear_response,
        seeds_log_k,
    )
    from lipverify.records import ensure_writable_dir, read_json, write_json
    from lipverify.training import TrainConfig, load_config

    tolerance = 15.0 if args.tolerance is None else args.tolerance
    if not (0 < tolerance < 100):
        raise LipverifyError(f"--tolerance must be in (0, 100) percent, got {tolerance}")
    out = ensure_writable_dir(Path(args.out or "runs/framework_linear_response"))
    if args.predictions:
        result = LinearResponseResult.from_dict(read_json(args.predictions))
        config = TrainConfig(**result.settings["config"])
    else:
        config = load_config(args.config, args.rest)
        result = linear_response(config, args.reference, _adjoint_steps(args.adjoint_steps))
    if args.seeds_dir:
        steps, log_k = seeds_log_k(args.seeds_dir, config)
        result.comparison = compare_with_seeds(result, steps, log_k, tolerance / 100)
    names = result.PREDICTIONS
    head = f"{'t':>4s} {'ln K (ref)':>11s} " + " ".join(f"{n:>14s}" for n in names)
    if result.comparison:
        head += f" {'empirical':>10s} {'95% chi2 interval':>21s}"
    print("std of ln K_t: predictions" + (" and the spread across seeds" if result.comparison else ""))
    print(head)
    rows = {r["step"]: r for r in result.comparison["rows"]} if result.comparison else {}
    for t in range(1, len(result.steps)):
        line = f"{t:4d} {result.log_k[t]:+11.5f} " + " ".join(
            f"{result.prediction(n)[t]:14.4e}" for n in names
        )
        if t in rows:
            r = rows[t]
            line += f" {r['empirical_std']:10.4e} [{r['empirical_ci'][0]:.3e}, {r['empirical_ci'][1]:.3e}]"
        print(line)
    if result.flagged_steps:
        print(
            f"WARNING: relative spectral gap below 1e-2 at steps {result.flagged_steps}: the linearisation "
            "of ln sigma_1 is unreliable there"
        )
    costs = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.costs.items())
    print(f"cost: {costs}")
    verdict = "inconclusive"
    if result.comparison:
        verdict = result.comparison["verdict"]
        print(result.comparison["message"])
        print(
            f"VERDICT ({tolerance:g}% goal): {verdict.upper()}"
            + (
                f", met by {', '.join(result.comparison['goal_met_by'])}"
                if result.comparison["goal_met_by"]
                else ""
            )
        )
    else:
        print("no --seeds-dir: predictions only, nothing compared (inconclusive)")
    write_json(out / "results.json", result.as_dict())
    print(f"wrote {out / 'results.json'}")
    return EXIT[verdict]


def run(args: argparse.Namespace) -> int:
    if args.test == "one-step":
        return _one_step(args)
    if args.test == "label-noise":
        return _label_noise(args)
    if args.test == "mean-reversion":
        return _mean_reversion(args)
    if args.test == "linear-response":
        return _linear_response(args)
    return _assumption3(args)
