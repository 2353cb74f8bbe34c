"""``lipverify train``: one SGD run with the dynamics probe, then its summary and figure."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

HELP = "train a model with the dynamics probe (records, summary, figure); key=value overrides the config"

#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML file (keys at top level or under [train]); default: MLP on MNIST-5k"
    )
    parser.add_argument("--out", help="output directory (default: runs/<config name or timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100")


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command line that resumes this run: the same config and overrides, and ``--out``."""
    words = ["lipverify", "train"]
    if args.config:
        words += ["--config", str(args.config)]
    words += [*args.overrides, "--out", str(out)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from lipverify.commands.report import report_run
    from lipverify.records import ensure_writable_dir
    from lipverify.training import load_config, train

    config = load_config(args.config, args.overrides)
    if args.out:
        out = Path(args.out)
    elif args.config:
        out = Path("runs") / Path(args.config).stem
    else:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    ensure_writable_dir(out)
    try:
        train(config, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        try:
            meta = json.loads((out / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        step = meta.get("interrupted_at_step")
        where = f"at step {step}" if step is not None else "before the first step"
        print(
            f"lipverify train: interrupted {where}; resume with: {resume_command(args, out)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return report_run(out, verdict_to_stderr=True)
