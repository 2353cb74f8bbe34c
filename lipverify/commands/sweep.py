"""``lipverify sweep CONFIG``: run a Section 8 parameter sweep (logic in :mod:`lipverify.sweep`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = (
    "run a parameter sweep for a Section 8 claim (grid of training runs, in parallel, resumable); "
    "then `lipverify report DIR` writes its figures and claims table"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep config TOML ([base], [grid], [[cases]], claim = ...)")
    parser.add_argument(
        "--out", default=None, help="sweep directory (default: runs/sweeps/<config name>[-smoke])"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="parallel runs (processes of the local pool, or the CPUs of a local Ray instance), default 1",
    )
    parser.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: this machine's process pool (default); ray: one Ray task per run "
        '(pip install "lipverify[ray]"); --out must then be on storage every node sees',
    )
    parser.add_argument(
        "--address",
        default=None,
        help="--backend ray: join the running Ray cluster at this address (e.g. HEAD_IP:6379) "
        "instead of starting a local instance with --jobs CPUs",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="--backend ray: retries of a run whose worker died (each resumes from its checkpoint); "
        "default 2",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="shrink every run (few steps, tiny subsets) for a quick check"
    )
    parser.add_argument(
        "--report", action="store_true", help="write the claims report into the sweep directory afterwards"
    )


def run(args: argparse.Namespace) -> int:
    from lipverify.records import ensure_writable_dir
    from lipverify.sweep import load_sweep_config, run_sweep

    config = load_sweep_config(args.config)
    out = args.out or str(Path("runs") / "sweeps" / (config.name + ("-smoke" if args.smoke else "")))
    ensure_writable_dir(out)
    try:
        result = run_sweep(
            config,
            out,
            jobs=args.jobs,
            smoke=args.smoke,
            backend=args.backend,
            address=args.address,
            max_retries=args.max_retries,
            progress=args.backend == "ray" and sys.stderr.isatty(),
        )
    except KeyboardInterrupt:
        print(
            f"lipverify sweep: interrupted; rerun the same command to resume the unfinished runs in {out}",
            file=sys.stderr,
        )
        return 130
    failed, elsewhere = result.failed, result.running_elsewhere
    complete = [r for r in result.runs if r["status"] == "complete"]
    print(f"sweep {config.name}: {len(complete)}/{len(result.runs)} runs complete -> {out}")
    for record in failed:
        print(f"  FAILED {record['name']}: {record['error']}")
    for record in elsewhere:
        print(f"  RUNNING ELSEWHERE {record['name']}: {record['error']}")
    if elsewhere:
        print(f"  {len(elsewhere)} run(s) held by another process: rerun this command once it has finished")
    if args.report:
        if elsewhere:
            print(f"  claims report not written: runs still running elsewhere; later: lipverify report {out}")
        else:
            from lipverify.claims import report_sweep

            report_sweep(out)
    return 1 if failed else 0
