"""``lipverify simulate CASE``: Monte Carlo SDE validations with a table and figures."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from lipverify._validation import LipverifyError

HELP = (
    "Monte Carlo SDE simulations against closed forms (Theorems 14-17, Lemma 19, Prop. 21), "
    "real SGD and torchsde; prints a table and writes figures. Exit status: 0 pass, 1 fail "
    "(a correct prediction rejected, or a wrong variant accepted although the check could "
    "reject it), 2 bad input (device, --out, options), 3 inconclusive (too few paths to reject "
    "a wrong variant; the table says about how many are needed)"
)

#: exit status per verdict of :meth:`lipverify.simulation.ValidationResult.verdict`.
EXIT_CODES = {"pass": 0, "fail": 1, "inconclusive": 3}

CASE_NAMES = ("lognormal", "ou", "matrix_sde", "two_layer", "discrete_sgd", "batch_size", "torchsde")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("case", choices=CASE_NAMES, help="which validation to run")
    parser.add_argument("--paths", type=int, default=None, help="Monte Carlo paths (case default if omitted)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="time steps of the finest grid (lognormal, ou, batch_size, torchsde)",
    )
    parser.add_argument("--dt", type=float, default=None, help="SDE step in SGD steps (discrete_sgd)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (fixed: results are reproducible)")
    parser.add_argument(
        "--out", default=None, help="output folder for figures and results.json (default ./simulate-<case>/)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def _kwargs(func, args: argparse.Namespace) -> dict:
    params = inspect.signature(func).parameters
    kw = {"seed": args.seed, "device": args.device}
    if args.paths is not None:
        if args.paths < 2:
            raise LipverifyError(f"--paths must be at least 2, got {args.paths}")
        kw["paths"] = args.paths
        if "seeds" in params:
            kw["seeds"] = max(args.paths, 2)
    if args.steps is not None:
        if args.steps < 1:
            raise LipverifyError(f"--steps must be positive, got {args.steps}")
        if "steps" not in params:
            raise LipverifyError(f"case does not take --steps (it uses nested levels); got {args.steps}")
        kw["steps"] = args.steps
    if args.dt is not None:
        if not args.dt > 0:
            raise LipverifyError(f"--dt must be positive, got {args.dt}")
        if "sde_dt" not in params:
            raise LipverifyError("--dt applies to discrete_sgd only")
        kw["sde_dt"] = args.dt
    if "quiet" in params:
        kw["quiet"] = args.quiet
    return {k: v for k, v in kw.items() if k in params}


def check_device(name: str) -> None:
    """A clear :class:`LipverifyError` for a device torch cannot parse or this machine lacks."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise LipverifyError(f"--device {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LipverifyError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LipverifyError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LipverifyError(f"--device {name}: MPS is not available on this machine; use --device cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from lipverify import simulation as sim
    from lipverify.records import atomic_write_text, ensure_writable_dir

    check_device(args.device)
    func = sim.CASES[args.case]
    kwargs = _kwargs(func, args)
    out = Path(args.out or f"./simulate-{args.case}")
    ensure_writable_dir(out)  # before minutes of simulation, not after
    if args.threads is not None:
        torch.set_num_threads(max(args.threads, 1))
    result = func(**kwargs)
    print(result.table())
    if result.info:
        print("info: " + json.dumps(result.info, default=float, indent=None))
    verdict = result.verdict
    rows = []
    for r in result.rows:
        row_verdict, reason = result.row_verdict(r)
        rows.append(
            {**r.__dict__, "error": r.error, "ok": r.ok, "interval": r.interval, "verdict": row_verdict}
            | {"reason": reason}
        )
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {
                "case": result.case,
                "passed": result.passed,
                "verdict": verdict,
                "inconclusive": result.inconclusive_reason,
                "seconds": result.seconds,
                "rows": rows,
                "info": result.info,
            },
            default=float,
            indent=1,
        ),
    )
    if not args.no_plot:
        for path in plot(result, out):
            print(f"wrote {path}")
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return EXIT_CODES[verdict]


#: y-axis label of the ``<case>_band.png`` figure.
BAND_YLABEL = {"lognormal": "K_t (Lipschitz bound)", "ou": "X_t"}

#: reference slope -> (matplotlib line style, legend label) in ``lognormal_orders.png``.
REFERENCE_SLOPES = {0.5: ("--", "reference slope 1/2"), 1.0: (":", "reference slope 1")}


def _readable_log_ticks(ax, dts: list[float]) -> None:
    """Log axes spanning about one decade: x ticks at the grid's step sizes labelled ``1/n``,
    y minor ticks at 2 and 5 per decade labelled (small font), no unlabelled clutter."""
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.FixedLocator(dts))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"1/{round(1 / d)}" for d in dts]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0,)))
    ax.yaxis.set_minor_locator(ticker.LogLocator(base=10, subs=(2.0, 5.0)))
    short = ticker.FuncFormatter(lambda v, _: f"{v:.0e}".replace("e-0", "e-"))
    ax.yaxis.set_major_formatter(short)
    ax.yaxis.set_minor_formatter(short)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(True, which="both", alpha=0.25)


def plot(result, out: Path) -> list[Path]:
    """PNG figures of a :class:`lipverify.simulation.ValidationResult` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.series
    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "mc_mean" in s:
        fig, ax = plt.subplots(figsize=(6, 4))
        t = s["times"]
        for path in s.get("sample_paths", []):
            ax.plot(t, path, color="0.8", lw=0.6)
        m, sd = s["mc_mean"], s["mc_std"]
        ax.fill_between(
            t,
            [a - b for a, b in zip(m, sd, strict=True)],
            [a + b for a, b in zip(m, sd, strict=True)],
            alpha=0.3,
            label="Monte Carlo mean ± std",
        )
        ax.plot(t, m, label="Monte Carlo mean")
        pm, ps = s["pred_mean"], s["pred_std"]
        ax.plot(t, pm, "k--", label="closed form mean")
        ax.plot(t, [a + b for a, b in zip(pm, ps, strict=True)], "k:", label="closed form ± std")
        ax.plot(t, [a - b for a, b in zip(pm, ps, strict=True)], "k:")
        ax.set_xlabel("t")
        ax.set_ylabel(BAND_YLABEL.get(result.case, "state"))
        ax.set_title(f"{result.case}: mean ± std band")
        ax.legend(fontsize=8)
        save(fig, f"{result.case}_band.png")
    if "orders" in s:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, o in s["orders"].items():
            axes[0].errorbar(o["strong_h"], o["strong_err"], yerr=o["strong_se"], marker="o", label=name)
            axes[1].errorbar(o["weak_h"], o["weak_err"], yerr=o["weak_se"], marker="o", label=name)
        for ax, title, ylabel, refs in (
            (axes[0], "strong error", "E|K_h(T) - K(T)|", (0.5, 1.0)),
            (axes[1], "weak error", "|E K_h(T) - E K(T)|", (1.0,)),
        ):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("dt")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            lines = ax.get_lines()
            if lines:
                x = list(lines[0].get_xdata())
                y0 = float(lines[0].get_ydata()[0])
                for p in refs:
                    style, label = REFERENCE_SLOPES[p]
                    ax.plot(x, [y0 * (xx / x[0]) ** p for xx in x], style, color="k", lw=1.2, label=label)
                _readable_log_ticks(ax, x)
            ax.legend(fontsize=8)
        save(fig, f"{result.case}_orders.png")
    if "pathwise" in s:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("pathwise", "pathwise_K"):
            for name, d in s.get(key, {}).items():
                ax.errorbar(d["h"], d["rms"], yerr=d["se"], marker="o", label=f"{key}: {name}")
        x = s["pathwise"]["correct"]["h"]
        y = s["pathwise"]["correct"]["rms"]
        ax.plot(x, [y[0] * (xx / x[0]) ** 0.5 for xx in x], "k:", label="slope 1/2")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dt (SGD steps)")
        ax.set_ylabel("RMS Itô residual")
        ax.set_title(f"{result.case}: pathwise residual")
        ax.legend(fontsize=7)
        save(fig, f"{result.case}_pathwise.png")
    if "lr" in s:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, stat in zip(axes, ("mean", "std"), strict=True):
            d = s[stat]
            ax.errorbar(
                s["lr"], [abs(g) for g in d["gap"]], yerr=d["gap_se"], marker="o", label="|SGD - SDE|"
            )
            ax.plot(s["lr"], d["band"], "k:", label="O(eta) band")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("eta (eta T fixed)")
            ax.set_ylabel(
                "|E_SGD[sigma_T] - E_SDE[sigma_T]|"
                if stat == "mean"
                else "|std_SGD - std_SDE| / std_SDE (sigma_T)"
            )
            ax.set_title("gap of E[sigma_T]" if stat == "mean" else "relative gap of std sigma_T")
            ax.legend(fontsize=8)
        save(fig, f"{result.case}_gap.png")
    if "b" in s:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(s["b"], s["std"], yerr=s["se"], marker="o", label="Monte Carlo std (Sigma = C/b)")
        if "exact" in s:
            ax.plot(s["b"], s["exact"], "k--", label="Theorem 17 std")
        ax.plot(s["b"], s["wrong_std"], "x:", label="wrong: Sigma = C/b^2")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size b")
        ax.set_ylabel("std across paths")
        ax.set_title("Proposition 21: std across paths")
        ax.legend(fontsize=8)
        save(fig, f"{result.case}_batch.png")
    return written
