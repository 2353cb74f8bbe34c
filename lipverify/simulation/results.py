"""Shared result types of the Monte Carlo validations (:class:`Row`, :class:`ValidationResult`),
the progress bar and the order-of-convergence rows.

Each validation is a function returning a :class:`ValidationResult`: a table of :class:`Row` s
(quantity, prediction, Monte Carlo estimate, acceptance interval), including *wrong-variant*
rows that must be rejected, plus series for the figures. The tests, the ``monte_carlo`` checks
(:mod:`lipverify.checks.simulation`) and ``lipverify simulate`` all call these functions.

Acceptance rule of a row: ``|estimate - predicted| <= z * stderr + bias``, with z the normal
quantile of :data:`lipverify.montecarlo.DEFAULT_LEVEL` (3.89) and ``bias`` a bound on the
deterministic (step-size) bias stated per row; the normalised error is
``|estimate - predicted| / (z * stderr + bias)`` (<= 1 passes). A wrong-variant row passes the
validation when it is *rejected* (normalised error > 1). Fixed seeds throughout; float64.

Verdict (:meth:`ValidationResult.verdict`), three-way: **pass** (every correct row within its
interval and every wrong variant rejected), **fail** (a correct row outside its interval, or a
wrong variant not rejected although the check had the power to reject it) and **inconclusive**
(a wrong variant not rejected because the intervals are too wide to tell it from the correct
prediction: :func:`paths_needed` says about how many paths would do).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from lipverify._validation import LipverifyError
from lipverify.montecarlo import Estimate, log_log_slope, z_for_level

Z = z_for_level()

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclass
class Row:
    """One compared quantity. ``allowance = z * stderr + bias``; ``wrong``: a wrong variant
    (must be rejected); ``diagnostic``: reported only, not part of the verdict."""

    quantity: str
    predicted: float
    estimate: float
    stderr: float
    bias: float = 0.0
    wrong: bool = False
    diagnostic: bool = False
    note: str = ""
    z: float = Z
    one_sided: bool = False  # only estimate < predicted - allowance counts as a miss
    paths: int = 0  # Monte Carlo samples behind ``stderr`` (0: not a path count)

    @property
    def allowance(self) -> float:
        return self.z * self.stderr + abs(self.bias)

    @property
    def error(self) -> float:
        """``|estimate - predicted| / allowance`` (<= 1: within the interval)."""
        diff = abs(self.estimate - self.predicted)
        if self.one_sided:
            diff = max(self.predicted - self.estimate, 0.0)
        if self.allowance == 0:
            return 0.0 if diff == 0 else math.inf
        return diff / self.allowance if math.isfinite(diff) else math.inf

    @property
    def within(self) -> bool:
        return self.error <= 1.0

    @property
    def ok(self) -> bool:
        """Correct rows must be within, wrong rows outside; diagnostics always ok."""
        if self.diagnostic:
            return True
        return (not self.within) if self.wrong else self.within

    @property
    def interval(self) -> tuple[float, float]:
        return self.estimate - self.allowance, self.estimate + self.allowance


def step_bias(chain_value: Callable[[int], float], steps: int) -> float:
    """Bound on the step-size bias ``|v(h) - v(0)|`` of a scheme's exact value ``v(h)`` (e.g. the
    Euler chain's mean ``K0 prod (1 + a_k h)``), computed from the chain alone, never from the
    closed form under test (a bias taken as ``v(h) - closed form`` would absorb any error in
    that formula).

    ``chain_value(n)``: the chain's exact value after ``n`` steps of ``h = T / n``. With
    ``v(h) = v0 + c h + e h^2 + O(h^3)`` and ``v1, v2, v3`` at ``n, n/2, n/4`` steps,
    ``d1 = v1 - v2 = -c h - 3 e h^2`` and ``d2 = v2 - v3 = -2 c h - 12 e h^2``, so
    ``d1 - d2/2 = 3 e h^2`` and ``v1 - v0 = -d1 - (2/3)(d1 - d2/2)``. Returned:
    ``|d1| + |d1 - d2/2|`` (the spare third covers the O(h^3) rest). ``steps`` must be a
    multiple of 4.
    """
    if steps < 4 or steps % 4:
        raise LipverifyError(
            f"steps must be a positive multiple of 4 (the step-size bias bound compares the "
            f"chain at steps, steps/2 and steps/4), got {steps}"
        )
    return nested_step_bias(chain_value(steps), chain_value(steps // 2), chain_value(steps // 4))


def nested_step_bias(v1: float, v2: float, v3: float) -> float:
    """``|d1| + |d1 - d2/2|`` with ``d1 = v1 - v2``, ``d2 = v2 - v3``: the step-size bias bound of
    :func:`step_bias` from a value at steps h, 2h and 4h (exact chain values, or Monte Carlo means on
    nested grids). ``v3 = v2`` drops the O(h^2) part when only two levels exist."""
    d1, d2 = v1 - v2, v2 - v3
    return abs(d1) + abs(d1 - d2 / 2)


def separation(correct: Row, wrong: Row) -> float:
    """Distance between the correct and the wrong prediction, measured in the wrong row's frame:
    ``d = |(est_w - pred_w) - (est_c - pred_c)|``; ``= |pred_c - pred_w|`` when both rows
    compare the same estimate, ``|est_w - est_c|`` when both predict the same value of two
    different estimates (e.g. SGD minus the correct SDE vs SGD minus the wrong SDE)."""
    return abs((wrong.estimate - wrong.predicted) - (correct.estimate - correct.predicted))


def has_power(correct: Row, wrong: Row) -> bool:
    """True when the wrong variant *must* be rejected if the correct row holds:
    ``d > A_c + A_w`` (then ``|est_w - pred_w| >= d - |est_c - pred_c| >= d - A_c > A_w``)."""
    return separation(correct, wrong) > correct.allowance + wrong.allowance


def paths_needed(correct: Row, wrong: Row) -> float:
    """About how many paths the pair (correct, wrong) needs for :func:`has_power`.

    With ``n`` paths each allowance is ``A = z se + |bias|``, ``se = s / sqrt(n)``; at ``n'``
    paths ``se' = se sqrt(n / n')`` (the bias, a step-size bound, does not shrink). Power needs
    ``z (se_c + se_w) sqrt(n / n') + |b_c| + |b_w| < d``, i.e.

        ``n' > n (z (se_c + se_w) / (d - |b_c| - |b_w|))^2``

    (halving the interval's random part costs 4x the paths). Returns ``inf`` when ``d <= |b_c| +
    |b_w|`` (no path count suffices: smaller steps are needed, or the predictions coincide) and
    ``nan`` when the rows do not say how many paths they used (``paths == 0``). ``n`` is the
    wrong row's ``paths`` (both rows of a pair come from the same simulation or the same count).
    """
    room = separation(correct, wrong) - abs(correct.bias) - abs(wrong.bias)
    if room <= 0:
        return math.inf
    n = wrong.paths or correct.paths
    if n <= 0:
        return math.nan
    spread = correct.z * correct.stderr + wrong.z * wrong.stderr
    return math.ceil(n * (spread / room) ** 2)


@dataclass
class ValidationResult:
    """Rows of one validation, figure series and extra numbers (``info``)."""

    case: str
    rows: list[Row]
    series: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0

    def partner(self, wrong: Row) -> Row | None:
        """The correct (non-diagnostic) row of the same quantity as the wrong row ``wrong``."""
        for r in self.rows:
            if r.quantity == wrong.quantity and not r.wrong and not r.diagnostic:
                return r
        return None

    def row_verdict(self, row: Row) -> tuple[str, str]:
        """``(pass | fail | inconclusive, reason)`` of one row (diagnostics: pass, ``info``).

        A wrong row that is not rejected fails when its correct partner row had the power to
        reject it (:func:`has_power`) or it has no partner; otherwise it is inconclusive, with the
        path estimate of :func:`paths_needed` as the reason."""
        if row.diagnostic:
            return PASS, "info"
        if not row.wrong:
            return (PASS, "pass") if row.within else (FAIL, "FAIL")
        if not row.within:
            return PASS, "rejected (ok)"
        correct = self.partner(row)
        if correct is None or has_power(correct, row):
            return FAIL, "NOT REJECTED (fail)"
        n = paths_needed(correct, row)
        if math.isinf(n):
            why = (
                "predictions coincide"
                if separation(correct, row) == 0
                else "step-size bias >= separation: needs smaller steps"
            )
        elif math.isnan(n):
            why = "interval too wide: needs more samples"
        else:
            why = f"needs about {int(n)} paths"
        return INCONCLUSIVE, f"inconclusive: {why}"

    @property
    def verdict(self) -> str:
        """``fail`` if any row fails, else ``inconclusive`` if any row is, else ``pass``."""
        verdicts = {self.row_verdict(r)[0] for r in self.rows}
        return FAIL if FAIL in verdicts else INCONCLUSIVE if INCONCLUSIVE in verdicts else PASS

    @property
    def inconclusive_reason(self) -> str:
        """The inconclusive rows' reasons (``quantity: reason``), ``""`` if none."""
        out = []
        for r in self.rows:
            verdict, reason = self.row_verdict(r)
            if verdict == INCONCLUSIVE:
                out.append(f"{r.quantity} [{r.note}]: {reason.removeprefix('inconclusive: ')}")
        return "; ".join(out)

    @property
    def paths_estimate(self) -> float:
        """Largest :func:`paths_needed` over the inconclusive rows (``nan`` if none is finite)."""
        needs = []
        for r in self.rows:
            correct = self.partner(r) if r.wrong else None
            if correct is not None and self.row_verdict(r)[0] == INCONCLUSIVE:
                needs.append(paths_needed(correct, r))
        finite = [n for n in needs if math.isfinite(n)]
        return max(finite) if finite else math.nan

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    def select(self, prefix: str) -> list[Row]:
        return [r for r in self.rows if r.quantity.startswith(prefix)]

    def comparison(self, prefix: str = ""):
        """A :class:`lipverify.verification.Comparison` over the rows whose quantity starts with
        ``prefix``: max normalised error of the correct rows vs tolerance 1, min over wrong rows."""
        from lipverify.verification import Comparison

        rows = [r for r in self.rows if r.quantity.startswith(prefix) and not r.diagnostic]
        good = [r for r in rows if not r.wrong]
        bad = [r for r in rows if r.wrong]
        if not good or not bad:
            raise LipverifyError(f"{self.case}: no correct/wrong rows match {prefix!r}")
        details = "; ".join(
            f"{r.quantity}: pred {r.predicted:.5g} est {r.estimate:.5g} ± {r.allowance:.3g}" for r in rows
        )
        sub = ValidationResult(self.case, rows)
        return Comparison(
            max_error=max(r.error for r in good),
            tolerance=1.0,
            wrong_variant=", ".join(sorted({r.note or r.quantity for r in bad})),
            wrong_error=min(r.error for r in bad),
            details=details,
            inconclusive=sub.inconclusive_reason if sub.verdict == INCONCLUSIVE else "",
        )

    def table(self) -> str:
        head = f"{'quantity':<46} {'predicted':>12} {'Monte Carlo':>12} {'interval':>27}  verdict"
        lines = [f"== {self.case} ({self.seconds:.1f} s) ==", head, "-" * len(head)]
        for r in self.rows:
            lo, hi = r.interval
            verdict = self.row_verdict(r)[1]
            tag = " [wrong]" if r.wrong else ""
            lines.append(
                f"{(r.quantity + tag)[:46]:<46} {r.predicted:>12.6g} {r.estimate:>12.6g} "
                f"[{lo:>12.6g}, {hi:>12.6g}]  {verdict}"
            )
        overall = self.verdict.upper()
        if overall == "INCONCLUSIVE":
            n = self.paths_estimate
            need = f"needs about {int(n)} paths" if math.isfinite(n) else "see the rows"
            overall += f": the intervals are too wide to reject a wrong variant ({need}); not a failure"
        lines.append(f"overall: {overall}")
        return "\n".join(lines)


def _progress(total: int, quiet: bool, desc: str):
    """A tqdm bar (disabled when quiet or stderr is not a TTY)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet or not sys.stderr.isatty(), leave=False)


# ---------------------------------------------------------------------------------------------
# Order-of-convergence fits


def _order_row(
    name: str, hs: list[float], errs: list[Estimate], declared: float, wrong: float | None
) -> list[Row]:
    """Fit ``log err ~ p log h``; stderr = correlation-free MC bound of the slope (see
    :func:`lipverify.montecarlo.log_log_slope`); bias allowance = |slope on the finer half -
    slope on the coarser half| (pre-asymptotic curvature of the error expansion, measured)."""
    vals = [abs(e.value) for e in errs]
    rel = [e.stderr / abs(e.value) for e in errs]
    slope, se = log_log_slope(hs, vals, rel)
    k = len(hs) // 2
    s_coarse, _ = log_log_slope(hs[: k + 1], vals[: k + 1], rel[: k + 1])
    s_fine, _ = log_log_slope(hs[k:], vals[k:], rel[k:])
    bias = abs(s_fine - s_coarse)
    n = errs[0].n
    rows = [Row(name, declared, slope, se, bias, note=f"declared {declared}", paths=n)]
    if wrong is not None:
        rows.append(Row(name, wrong, slope, se, bias, wrong=True, note=f"order {wrong} claimed", paths=n))
    return rows
