"""The claims table's row type, verdict helpers and number formatting."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lipverify._validation import LipverifyError

PAPER = "paper"
FRAMEWORK = "framework"


@dataclass
class ClaimResult:
    """One row of the claims table.

    ``kind`` is ``"paper"`` (the row tests a sentence of the paper, quoted in ``paper_quote``) or
    ``"framework"`` (ours: a stronger test of the theory than the paper states; ``paper_quote`` then
    quotes the derivation step it rests on). ``verdict``: ``"pass"``, ``"fail"`` (the data refute the
    statement under the rule) or ``"inconclusive"`` (the data lack the power to decide, or the rule's
    precondition does not hold).
    """

    id: str
    title: str
    paper: str
    prediction: str
    measured: str
    rule: str
    verdict: str  # "pass" | "fail" | "inconclusive"
    numbers: dict = field(default_factory=dict)
    figure: str | None = None
    paper_quote: str = ""
    kind: str = PAPER

    def __post_init__(self) -> None:
        if self.kind not in (PAPER, FRAMEWORK):
            raise LipverifyError(f"claim {self.id}: kind must be 'paper' or 'framework', got {self.kind!r}")
        if self.verdict not in ("pass", "fail", "inconclusive"):
            raise LipverifyError(f"claim {self.id}: unknown verdict {self.verdict!r}")

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def as_dict(self) -> dict:
        return asdict(self)


def verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def three_way(passes: bool, fails: bool) -> str:
    """``pass`` when the interval lies on the statement's side, ``fail`` when it lies on the other
    side, else ``inconclusive`` (the interval straddles the threshold)."""
    if passes and fails:
        raise LipverifyError("a rule both passed and failed: its pass and fail regions overlap")
    return "pass" if passes else "fail" if fails else "inconclusive"


def inconclusive(
    id_: str, title: str, paper: str, prediction: str, rule: str, why: str, quote: str = "", kind: str = PAPER
) -> ClaimResult:
    return ClaimResult(
        id_,
        title,
        paper,
        prediction,
        f"not evaluated: {why}",
        rule,
        "inconclusive",
        paper_quote=quote,
        kind=kind,
    )


def check_options(name: str, options: Mapping[str, Any], allowed: Sequence[str]) -> None:
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise LipverifyError(f"claim {name}: unknown option(s) {bad}; allowed: {list(allowed)}")


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_p(p: float) -> str:
    """A p-value for the table (values below 1e-6 are shown as a bound)."""
    return "< 1e-6" if p < 1e-6 else f"= {p:.2g}"
