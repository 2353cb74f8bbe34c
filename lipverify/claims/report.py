"""The claims report of a sweep directory (``claims.md``, ``claims.json``, figures) and the combined
table of a suite of sweeps."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from lipverify.claims.dispatch import PLOTTERS, evaluate
from lipverify.claims.figures import FigureSaver
from lipverify.claims.records import load_records
from lipverify.claims.result import FRAMEWORK, PAPER, ClaimResult
from lipverify.sweep import atomic_write_json, atomic_write_text

KIND_HEADINGS = {
    PAPER: "Paper claims (each row quotes the sentence it tests)",
    FRAMEWORK: "Framework tests (ours: beyond what the paper states)",
}


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    doc: dict,
    results: Sequence[ClaimResult],
    problems: Sequence[dict],
    n_records: int,
    figures: Sequence[str],
) -> str:
    """One sweep's claims table, paper rows and framework rows in separate sections."""
    sweep = doc["sweep"]
    lines = [
        f"# Claims: sweep `{doc.get('name', 'sweep')}` ({sweep['claim']})",
        "",
        f"{sweep.get('description', '')}".strip(),
        "",
        f"lipverify {doc.get('lipverify_version')}, sweep schema {doc.get('schema_version')}"
        f"{', SMOKE (shrunk) run' if doc.get('smoke') else ''}; runs: {len(doc['runs'])}, "
        f"evaluated: {n_records}, failed or incomplete: {len(problems)}.",
    ]
    for kind, heading in KIND_HEADINGS.items():
        rows = [c for c in results if c.kind == kind]
        if not rows:
            continue
        lines += [
            "",
            f"## {heading}",
            "",
            "| id | claim | quoted sentence | prediction | measured | rule | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c.id} | {_md_escape(c.title)} ({c.paper}) | "
            f"{_md_escape(c.paper_quote)} | {_md_escape(c.prediction)} "
            f"| {_md_escape(c.measured)} | {_md_escape(c.rule)} | **{c.verdict.upper()}** |"
            for c in rows
        ]
    if problems:
        lines += ["", "## Runs not evaluated", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {p['name']} | {p['status']} | {_md_escape(p.get('error') or '')} |" for p in problems]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def report_sweep(sweep_dir: str | Path, summarize: Callable[[Path], dict] | None = None) -> int:
    """Evaluate a sweep directory's claim; write figures, ``claims.md`` and ``claims.json`` into it.

    Returns 0 when the report was written (a failing claim is a result, not an error).
    """
    sweep_dir = Path(sweep_dir)
    doc, records, problems = load_records(sweep_dir, summarize)
    claim = doc["sweep"]["claim"]
    results = evaluate(claim, records, doc["sweep"].get("options", {}))
    figures: list[str] = []
    if records:
        saver = FigureSaver(sweep_dir)
        PLOTTERS[claim](records, results, saver)
        figures = saver.files
    for c in results:
        c.figure = figures[0] if figures else None
    atomic_write_text(sweep_dir / "claims.md", render_markdown(doc, results, problems, len(records), figures))
    atomic_write_json(
        sweep_dir / "claims.json",
        {
            "name": doc.get("name"),
            "claim": claim,
            "smoke": doc.get("smoke", False),
            "lipverify_version": doc.get("lipverify_version"),
            "claims": [c.as_dict() for c in results],
            "runs": [{"name": r["name"], "params": r["params"], "summary": r["summary"]} for r in records],
            "problems": list(problems),
            "figures": list(figures),
        },
    )
    print(render_markdown(doc, results, problems, len(records), []))
    return 0


def collect_results(sweep_dirs: Sequence[str | Path], dest: str | Path, command: str = "") -> Path:
    """Copy each sweep's claims.md/json and figures into ``dest/<sweep name>/`` and write one combined
    ``dest/claims.md`` (all claims of the suite; paper claims, then framework tests) and
    ``dest/claims.json``. No run data or checkpoints."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {PAPER: [], FRAMEWORK: []}
    combined = []
    for sd in sweep_dirs:
        sd = Path(sd)
        data = json.loads((sd / "claims.json").read_text())
        target = dest / (data.get("name") or sd.name)
        target.mkdir(parents=True, exist_ok=True)
        for f in ["claims.md", "claims.json", "sweep.json", *data.get("figures", [])]:
            if (sd / f).exists():
                tmp = target / f".{f}.tmp"
                shutil.copyfile(sd / f, tmp)
                tmp.replace(target / f)  # atomic: a reader never sees a half-copied file
        combined.append({k: v for k, v in data.items() if k != "runs"})  # run summaries stay per sweep
        for c in data["claims"]:
            rows[c.get("kind", PAPER)].append(
                f"| {c['id']} | {_md_escape(c['title'])} | {_md_escape(c.get('paper_quote', ''))} "
                f"| {_md_escape(c['measured'])} | {_md_escape(c['rule'])} "
                f"| **{c['verdict'].upper()}** | [{target.name}]({target.name}/claims.md) |"
            )
    lines = ["# Section 8 claims: measured verdicts", ""]
    if command:
        lines += [f"Produced by: `{command}`", ""]
    for kind, heading in KIND_HEADINGS.items():
        if rows[kind]:
            lines += [
                f"## {heading}",
                "",
                "| id | claim | quoted sentence | measured | rule | verdict | details |",
                "|---|---|---|---|---|---|---|",
                *rows[kind],
                "",
            ]
    atomic_write_text(dest / "claims.md", "\n".join(lines).rstrip("\n") + "\n")
    atomic_write_json(dest / "claims.json", {"sweeps": combined})
    return dest
