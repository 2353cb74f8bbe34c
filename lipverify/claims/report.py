"""The claims report of a sweep directory (``claims.md``, ``claims.json``, figures) and the combined
table of a suite of sweeps."""

from __future__ import annotations

import json
import shutil
from collections import Counter
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
    model_tests = framework_results(dest)
    if model_tests:
        lines += [
            "## Framework tests on models (ours: `lipverify framework`)",
            "",
            "| test | result | verdict | details |",
            "|---|---|---|---|",
            *(
                f"| {t['test']} | {_md_escape(t['message'])} | **{t['verdict'].upper()}** "
                f"| [{t['path']}]({t['path']}) |"
                for t in model_tests
            ),
            "",
        ]
    atomic_write_text(dest / "claims.md", "\n".join(lines).rstrip("\n") + "\n")
    atomic_write_json(dest / "claims.json", {"sweeps": combined, "framework_tests": model_tests})
    return dest


#: ``lipverify framework`` result files under a results directory: (glob, test name)
FRAMEWORK_RESULT_FILES = (
    ("framework_one_step/k*/results.json", "one-step (Theorems 14/15 at fixed weights)"),
    ("framework_one_step/*/assumption3.json", "assumption3 (cross-layer noise along a run)"),
    ("framework_mean_reversion/results.json", "mean-reversion"),
    ("framework_label_noise_model/results.json", "label-noise (the (1 - p) model)"),
    ("framework_linear_response/results.json", "linear-response (the spread with feedback)"),
)


def framework_results(results_dir: str | Path) -> list[dict]:
    """The verdicts of the ``lipverify framework`` results committed under ``results_dir`` (one row
    each: test, path relative to ``results_dir``, verdict, message), for the combined report. The
    verdict is the file's own (assumption3: ``holds`` -> pass / fail); nothing is recomputed."""
    results_dir = Path(results_dir)
    rows = []
    for pattern, test in FRAMEWORK_RESULT_FILES:
        for path in sorted(results_dir.glob(pattern)):
            data = json.loads(path.read_text())
            if "summary" in data and "holds" in data["summary"]:  # assumption3
                verdict = "pass" if data["summary"]["holds"] else "fail"
                message = data["summary"]["message"]
            else:
                verdict = data.get("verdict", "inconclusive")
                message = data.get("message") or _framework_message(data)
            rows.append(
                {
                    "test": test + (f", {path.parent.name}" if "/k*/" in pattern else ""),
                    "path": path.relative_to(results_dir).as_posix(),
                    "verdict": verdict,
                    "message": message,
                }
            )
    return rows


def _framework_message(data: dict) -> str:
    """A one-line result for the framework files without a ``message`` field."""
    if "comparison" in data and isinstance(data["comparison"], dict) and "message" in data["comparison"]:
        return data["comparison"]["message"]
    if "drift_ratio" in data:
        levels = data["drift_ratio"].get("levels", [])
        return "drift ratio at the same weights " + ", ".join(
            f"p={r['p']:g}: {r['mean']:.3g} vs {r['predicted']:.3g}"
            for r in levels
            if r.get("mean") is not None
        )
    if "rows" in data:  # one-step: the checks' verdicts (wrong-variant rows say rejected / not rejected)
        counts = Counter(r["verdict"] for r in data["rows"] if r.get("verdict"))
        return "checks: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    return "see the file"
