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
    "framework": "lipverify.commands.framework",
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
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. A sub-command's arguments are parsed with ``parse_intermixed_args``,
    so positionals may follow options (``lipverify train steps=2 --out D train_size=64``); argparse
    cannot parse sub-parsers intermixed, so a first pass only picks the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    # the top-level parser has no options that take a value: the first positional is the command
    rest = argv[argv.index(first.command) + 1 :]
    args = first._parser.parse_intermixed_args(rest)
    args.command = first.command
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LipverifyError as exc:
        print(f"lipverify {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
