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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lipverify._validation import LipverifyError
from lipverify.montecarlo import Estimate, log_log_slope, z_for_level

Z = z_for_level()


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


@dataclass
class ValidationResult:
    """Rows of one validation, figure series and extra numbers (``info``)."""

    case: str
    rows: list[Row]
    series: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

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
        return Comparison(
            max_error=max(r.error for r in good),
            tolerance=1.0,
            wrong_variant=", ".join(sorted({r.note or r.quantity for r in bad})),
            wrong_error=min(r.error for r in bad),
            details=details,
        )

    def table(self) -> str:
        head = f"{'quantity':<46} {'predicted':>12} {'Monte Carlo':>12} {'interval':>27}  verdict"
        lines = [f"== {self.case} ({self.seconds:.1f} s) ==", head, "-" * len(head)]
        for r in self.rows:
            lo, hi = r.interval
            if r.diagnostic:
                verdict = "info"
            elif r.wrong:
                verdict = "rejected (ok)" if r.ok else "NOT REJECTED (fail)"
            else:
                verdict = "pass" if r.ok else "FAIL"
            tag = " [wrong]" if r.wrong else ""
            lines.append(
                f"{(r.quantity + tag)[:46]:<46} {r.predicted:>12.6g} {r.estimate:>12.6g} "
                f"[{lo:>12.6g}, {hi:>12.6g}]  {verdict}"
            )
        lines.append(f"overall: {'PASS' if self.passed else 'FAIL'}")
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
    rows = [Row(name, declared, slope, se, bias, note=f"declared {declared}")]
    if wrong is not None:
        rows.append(Row(name, wrong, slope, se, bias, wrong=True, note=f"order {wrong} claimed"))
    return rows
