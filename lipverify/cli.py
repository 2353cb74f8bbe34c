"""Command-line entry point ``lipverify``: one sub-command per module, imported on use."""

from __future__ import annotations

import argparse
import importlib
import sys

from lipverify._validation import LipverifyError

#: sub-command -> module exposing ``add_arguments(parser)``, ``run(args) -> int`` and ``HELP``.
COMMANDS = {
    "verify": "lipverify.commands.verify",
    "simulate": "lipverify.commands.simulate",
    "train": "lipverify.commands.train",
    "report": "lipverify.commands.report",
    "sweep": "lipverify.commands.sweep",
}


def build_parser() -> argparse.ArgumentParser:
    from lipverify import __version__

    parser = argparse.ArgumentParser(prog="lipverify", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lipverify {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LipverifyError as exc:
        print(f"lipverify {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
