"""Every registered numeric check passes (and rejects its wrong variant); ``lipverify verify`` end to end."""

from __future__ import annotations

import json
from functools import cache

import pytest

from lipverify import verification
from lipverify.cli import main
from lipverify.verification import RESULTS, Comparison, load_checks

NUMERIC_CHECKS = [c for c in load_checks() if c.kind == "numeric"]


@cache
def outcome_of(check_id: str):
    check = next(c for c in NUMERIC_CHECKS if f"{c.result}: {c.name}" == check_id)
    return check.run()


def test_every_numeric_result_has_a_check():
    covered = {c.result for c in NUMERIC_CHECKS}
    expected = {
        "Lemma 12",
        "Lemma 13",
        "tr H / eigenvalues of H",
        "Proposition 5",
        "Proposition 6",
        "Proposition 7",
        "Theorem 14",
        "Theorem 15",
        "Theorem 17",
        "Proposition 21",
    }
    assert expected <= covered


@pytest.mark.parametrize("check_id", [f"{c.result}: {c.name}" for c in NUMERIC_CHECKS])
def test_registered_numeric_check_passes_and_rejects_wrong_variant(check_id):
    outcome = outcome_of(check_id)
    assert outcome.error == ""
    assert outcome.max_error <= outcome.tolerance, outcome
    assert outcome.wrong_variant
    assert outcome.wrong_error > outcome.tolerance, outcome
    assert outcome.passed


@pytest.fixture
def fake_registry(monkeypatch):
    """Replace the registry by a fresh one (real check modules are imported first, so importing
    them again registers nothing into the fake)."""
    load_checks()
    registry: dict = {}
    monkeypatch.setattr(verification, "_REGISTRY", registry)
    return registry


def _register_fake(result, kind, max_error, wrong_error, exhaustive=False, name=None):
    def fake() -> Comparison:
        return Comparison(max_error, 1.0, "a wrong variant", wrong_error, "fake")

    fake.__qualname__ = name or f"fake_{result}_{kind}_{max_error}_{wrong_error}_{exhaustive}"
    verification.register(
        result, kind, f"statement of {result}", name=fake.__qualname__, exhaustive=exhaustive
    )(fake)


def test_cli_numeric_end_to_end_with_report(tmp_path, capsys):
    report = tmp_path / "sub" / "report.md"
    rc = main(["verify", "--kind", "numeric", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0
    for header in (
        "result",
        "kind",
        "check",
        "max error",
        "tolerance",
        "wrong variant",
        "wrong error",
        "status",
    ):
        assert header in out
    assert "summary" in out and "numeric" in out and "symbolic" in out and "monte_carlo" in out
    assert "FAIL" not in out
    assert f"{len(NUMERIC_CHECKS)}/{len(NUMERIC_CHECKS)} checks passed" in out
    text = report.read_text()
    assert text.startswith("# lipverify verification report")
    for result in {c.result for c in NUMERIC_CHECKS}:
        assert f"## {result}" in text
    assert "Statement:" in text and "How it was checked:" in text and "(rejected)" in text
    assert not list(report.parent.glob(".*.tmp")), "temporary file left behind"


def test_cli_json_and_summary_columns(fake_registry, capsys):
    _register_fake("Lemma 12", "numeric", 0.5, 2.0)
    _register_fake("Lemma 12", "symbolic", 0.0, 3.0)
    _register_fake("Proposition 5", "numeric", 0.1, 5.0)
    _register_fake("Proposition 5", "numeric", 2.0, 5.0)  # fails: error above tolerance
    rc = main(["verify", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert payload["passed"] is False
    assert len(payload["outcomes"]) == 4
    summary = payload["summary"]
    assert list(summary) == list(RESULTS)
    assert summary["Lemma 12"] == {"numeric": "pass", "symbolic": "pass", "monte_carlo": "—"}
    assert summary["Proposition 5"]["numeric"] == "FAIL"
    assert summary["Theorem 16"] == {"numeric": "—", "symbolic": "—", "monte_carlo": "—"}
    record = payload["outcomes"][0]
    for key in (
        "result",
        "kind",
        "check",
        "max_error",
        "tolerance",
        "wrong_variant",
        "wrong_error",
        "passed",
    ):
        assert key in record


def test_cli_fails_when_wrong_variant_is_accepted(fake_registry, capsys):
    _register_fake("Lemma 13", "numeric", 0.1, 0.5)  # wrong variant inside tolerance
    assert main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "FAIL (wrong variant accepted)" in out


def test_cli_crashing_check_fails_with_reason(fake_registry, capsys):
    def boom() -> Comparison:
        raise RuntimeError("kaboom")

    verification.register("Theorem 14", "numeric", "s", name="crashes")(boom)
    assert main(["verify", "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    (record,) = payload["outcomes"]
    assert "kaboom" in record["error"]
    assert record["max_error"] is None  # NaN is not valid JSON


def test_cli_kind_filter_and_exhaustive(fake_registry, capsys):
    _register_fake("Lemma 12", "numeric", 0.1, 2.0)
    _register_fake("Lemma 12", "symbolic", 0.1, 2.0)
    _register_fake("Theorem 17", "monte_carlo", 0.1, 2.0, exhaustive=True)
    assert main(["verify", "--json", "--kind", "symbolic"]) == 0
    kinds = {o["kind"] for o in json.loads(capsys.readouterr().out)["outcomes"]}
    assert kinds == {"symbolic"}
    assert main(["verify", "--json", "--kind", "numeric,monte_carlo"]) == 0
    assert len(json.loads(capsys.readouterr().out)["outcomes"]) == 1  # exhaustive one skipped
    assert main(["verify", "--json", "--kind", "monte_carlo", "--exhaustive"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["outcomes"]
    assert record["exhaustive"] is True


def test_cli_rejects_unknown_kind(capsys):
    assert main(["verify", "--kind", "numeric,telepathy"]) == 2
    assert "telepathy" in capsys.readouterr().err


def test_report_written_atomically_over_existing_file(fake_registry, tmp_path, capsys):
    _register_fake("Proposition 7", "numeric", 0.1, 2.0)
    report = tmp_path / "r.md"
    report.write_text("old content")
    assert main(["verify", "--report", str(report)]) == 0
    text = report.read_text()
    assert "old content" not in text
    assert "## Proposition 7" in text and "statement of Proposition 7" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"]


def test_cli_progress_goes_to_stderr_and_json_stays_clean(fake_registry, capsys):
    """--progress: a tqdm bar on stderr ticking per check with the check's name; stdout is the JSON
    alone. Without the flag (stderr not a TTY under capsys) and with --no-progress: no bar."""
    _register_fake("Lemma 12", "numeric", 0.5, 2.0, name="first fake check")
    _register_fake("Lemma 13", "numeric", 0.5, 2.0, name="second fake check")
    assert main(["verify", "--json", "--progress"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["outcomes"]) == 2
    assert "2/2" in captured.err and "Lemma 13: second fake check" in captured.err
    for flags in ([], ["--no-progress"]):
        assert main(["verify", "--json", *flags]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        assert len(json.loads(captured.out)["outcomes"]) == 2


def test_report_below_a_file_is_refused_before_any_check(fake_registry, tmp_path, capsys):
    ran = []

    def counting() -> Comparison:
        ran.append(1)
        return Comparison(0.0, 1.0, "a wrong variant", 2.0)

    verification.register("Lemma 12", "numeric", "statement", name="counting")(counting)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["verify", "--report", str(blocker / "r.md")]) == 2
    err = capsys.readouterr().err
    assert ran == [] and err.count("\n") == 1 and f"cannot write to {blocker}" in err
