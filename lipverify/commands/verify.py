"""``lipverify verify``: run the registered checks of MATH section 8 and report them.

Prints one row per check, grouped by result (result, kind, check, max error, tolerance, wrong
variant and its error, pass/FAIL), then a per-result summary with one column per kind
(``pass``, ``FAIL``, ``inconclusive`` or ``—`` when no check of that kind exists). Exit status 1
if any check fails, 3 if none fails but a Monte Carlo check is inconclusive (its interval too wide
to reject the wrong variant), 0 if all pass.

Progress: a tqdm bar on stderr (one tick per check, the running check's name as postfix), shown
when stderr is a terminal; ``--progress`` forces it, ``--no-progress`` hides it. stdout carries only
the table or the ``--json`` object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path

from lipverify._validation import LipverifyError
from lipverify.records import atomic_write_text, ensure_writable_dir
from lipverify.verification import KINDS, RESULTS, CheckOutcome, load_checks, run_checks, select_checks

HELP = (
    "run the numeric / symbolic / Monte Carlo checks of every result and print a table "
    "(exit 0: all pass, 1: a check fails, 3: none fails but one is inconclusive)"
)

NO_CHECK = "—"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print a JSON object (outcomes + summary) instead"
    )
    parser.add_argument(
        "--kind",
        default=",".join(KINDS),
        help=f"comma-separated kinds to run (default: all of {','.join(KINDS)})",
    )
    parser.add_argument("--exhaustive", action="store_true", help="also run checks registered as exhaustive")
    parser.add_argument("--report", metavar="FILE.md", help="write a Markdown report (atomically)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only when stderr is a terminal)",
    )


def parse_kinds(text: str) -> tuple[str, ...]:
    """``"numeric,symbolic"`` -> ("numeric", "symbolic"); unknown kinds are an argparse error."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {unknown or [text]}; choose from {', '.join(KINDS)}"
        )
    return kinds


def summarize(outcomes: list[CheckOutcome]) -> dict[str, dict[str, str]]:
    """result -> kind -> ``pass`` (all checks of that kind pass), ``FAIL`` (one fails),
    ``inconclusive`` (none fails, one is inconclusive) or ``—`` (none)."""
    summary: dict[str, dict[str, str]] = {}
    for result in RESULTS:
        row = {}
        for kind in KINDS:
            selected = [o for o in outcomes if o.result == result and o.kind == kind]
            row[kind] = NO_CHECK if not selected else _overall(selected)
        summary[result] = row
    return summary


def _overall(outcomes: list[CheckOutcome]) -> str:
    """``pass``, ``FAIL`` or ``inconclusive`` (no failure, some check inconclusive)."""
    if all(o.passed for o in outcomes):
        return "pass"
    return "inconclusive" if all(o.passed or o.is_inconclusive for o in outcomes) else "FAIL"


def _number(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3g}"


def _status(o: CheckOutcome) -> str:
    if o.error:
        return "FAIL (crashed)"
    if o.passed:
        return "pass"
    if o.is_inconclusive:
        return f"inconclusive ({o.inconclusive})"
    return "FAIL (wrong variant accepted)" if o.correct_passes else "FAIL"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def format_text(outcomes: list[CheckOutcome], summary: dict[str, dict[str, str]]) -> str:
    headers = ["result", "kind", "check", "max error", "tolerance", "wrong variant", "wrong error", "status"]
    rows = []
    for o in outcomes:
        rows.append(
            [
                o.result,
                o.kind,
                o.check,
                _number(o.max_error),
                _number(o.tolerance),
                o.wrong_variant,
                _number(o.wrong_error),
                _status(o),
            ]
        )
    parts = [_table(headers, rows)]
    crashed = [o for o in outcomes if o.error]
    if crashed:
        parts.append("\n".join(f"crashed: {o.result} / {o.check}: {o.error}" for o in crashed))
    summary_rows = [[result, *(summary[result][k] for k in KINDS)] for result in RESULTS]
    parts.append("summary\n" + _table(["result", *KINDS], summary_rows))
    failed = sum(not o.passed for o in outcomes)
    seconds = sum(o.seconds for o in outcomes)
    parts.append(f"{len(outcomes) - failed}/{len(outcomes)} checks passed in {seconds:.1f} s")
    return "\n\n".join(parts)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def as_json(outcomes: list[CheckOutcome], summary: dict[str, dict[str, str]]) -> str:
    records = [{k: _jsonable(v) for k, v in o.as_dict().items()} for o in outcomes]
    payload = {
        "passed": all(o.passed for o in outcomes),
        "verdict": _overall(outcomes),
        "outcomes": records,
        "summary": summary,
    }
    return json.dumps(payload, indent=2, ensure_ascii=False)


def _methods() -> dict[tuple[str, str, str], str]:
    """(result, kind, check name) -> the check function's docstring (how it was checked)."""
    return {(c.result, c.kind, c.name): inspect.getdoc(c.func) or "" for c in load_checks()}


def format_markdown(
    outcomes: list[CheckOutcome], summary: dict[str, dict[str, str]], kinds: tuple[str, ...]
) -> str:
    methods = _methods()
    lines = [
        "# lipverify verification report",
        "",
        f"Kinds run: {', '.join(kinds)}. A check passes only if the implementation is within tolerance "
        "**and** a deliberately wrong variant, put through the same comparison, is outside it.",
        "",
        "## Summary",
        "",
        "| result | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    lines += [f"| {r} | " + " | ".join(summary[r][k] for k in KINDS) + " |" for r in RESULTS]
    for result in RESULTS:
        selected = [o for o in outcomes if o.result == result]
        if not selected:
            continue
        lines += ["", f"## {result}", ""]
        for statement in dict.fromkeys(o.statement for o in selected):
            lines.append(f"- Statement: `{statement}`")
        for o in selected:
            lines += [
                "",
                f"### {o.check} ({o.kind}) — {_status(o)}",
                "",
                "- How it was checked: "
                + " ".join((methods.get((o.result, o.kind, o.check)) or o.check).split())
                + (f" ({o.details})" if o.details else ""),
                f"- Max error {_number(o.max_error)} against tolerance {_number(o.tolerance)}",
                f"- Wrong variant: {o.wrong_variant or '(none)'} — error {_number(o.wrong_error)} "
                + ("(rejected)" if o.wrong_rejected else "(NOT rejected)"),
                f"- Time: {o.seconds:.2f} s",
            ]
            if o.error:
                lines.append(f"- Crashed: `{o.error}`")
    failed = sum(not o.passed for o in outcomes)
    lines += ["", f"**{len(outcomes) - failed}/{len(outcomes)} checks passed.**", ""]
    return "\n".join(lines)


def _run_with_progress(kinds: tuple[str, ...], exhaustive: bool, progress: bool | None) -> list[CheckOutcome]:
    """run_checks with a tqdm bar on stderr; ``progress=None``: tqdm's rule (off unless a TTY)."""
    from tqdm import tqdm

    total = len(select_checks(kinds, exhaustive))
    disable = None if progress is None else not progress
    with tqdm(total=total, desc="verify", unit="check", file=sys.stderr, disable=disable) as bar:
        return run_checks(
            kinds=kinds,
            exhaustive=exhaustive,
            progress=lambda check: bar.set_postfix_str(f"{check.result}: {check.name}"),
            done=lambda check, outcome: bar.update(1),
        )


def run(args: argparse.Namespace) -> int:
    try:
        kinds = parse_kinds(args.kind)
    except argparse.ArgumentTypeError as exc:
        print(f"lipverify verify: error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        report = Path(args.report)
        if report.is_dir():
            raise LipverifyError(f"cannot write the report to {report}: it is a directory")
        ensure_writable_dir(report.parent)  # before the checks run (30-110 s)
    outcomes = _run_with_progress(kinds, args.exhaustive, args.progress)
    summary = summarize(outcomes)
    if args.json:
        print(as_json(outcomes, summary))
    else:
        print(format_text(outcomes, summary))
    if args.report:
        atomic_write_text(args.report, format_markdown(outcomes, summary, kinds))
        if not args.json:
            print(f"report written to {args.report}")
    return {"pass": 0, "inconclusive": 3}.get(_overall(outcomes), 1)
