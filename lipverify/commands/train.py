"""``lipverify train``: one SGD run with the dynamics probe, then its summary and figure."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "train a model with the dynamics probe (records, summary, figure); key=value overrides the config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML file (keys at top level or under [train]); default: MLP on MNIST-5k"
    )
    parser.add_argument("--out", help="output directory (default: runs/<config name or timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100")


def run(args: argparse.Namespace) -> int:
    from lipverify.commands.report import report_run
    from lipverify.training import load_config, train

    config = load_config(args.config, args.overrides)
    if args.out:
        out = Path(args.out)
    elif args.config:
        out = Path("runs") / Path(args.config).stem
    else:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    train(config, out, progress=not args.no_progress)
    return report_run(out, verdict_to_stderr=True)
