"""Registry of verification checks, shared by ``lipverify verify``, the tests and the report.

A check verifies one result of MATH section 8 by one method (``kind``: ``numeric``, ``symbolic``
or ``monte_carlo``) and must be able to fail: it runs the correct implementation *and* a
deliberately wrong variant through the same comparison, and passes only if the correct one is
within tolerance and the wrong one is not.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

#: Results of MATH section 8, in the order they are reported.
RESULTS = (
    "Lemma 12",
    "Lemma 13",
    "tr H / eigenvalues of H",
    "Proposition 5",
    "Proposition 6",
    "Proposition 7",
    "Theorem 14",
    "Theorem 15",
    "Theorem 16",
    "Lemma 19",
    "Theorem 17",
    "Proposition 20",
    "Proposition 21",
)

KINDS = ("numeric", "symbolic", "monte_carlo")

#: Modules whose import registers checks (each calls :func:`register`).
CHECK_MODULES = ("lipverify.checks.numeric", "lipverify.checks.symbolic", "lipverify.checks.simulation")


@dataclass(frozen=True)
class Comparison:
    """What a check function returns: the same comparison applied to the correct code and to a
    deliberately wrong variant. Errors are the max errors in the check's own metric."""

    max_error: float
    tolerance: float
    wrong_variant: str
    wrong_error: float
    details: str = ""
    #: why the wrong variant could not be rejected (interval too wide, e.g. "needs about N
    #: paths"); non-empty only for a Monte Carlo check without the power to reject it.
    inconclusive: str = ""


@dataclass(frozen=True)
class CheckOutcome:
    result: str
    check: str
    kind: str
    statement: str
    max_error: float
    tolerance: float
    wrong_variant: str
    wrong_error: float
    seconds: float
    exhaustive: bool = False
    details: str = ""
    error: str = ""
    inconclusive: str = ""

    @property
    def correct_passes(self) -> bool:
        return not self.error and self.max_error <= self.tolerance

    @property
    def wrong_rejected(self) -> bool:
        return not self.error and self.wrong_error > self.tolerance

    @property
    def passed(self) -> bool:
        return self.correct_passes and self.wrong_rejected

    @property
    def is_inconclusive(self) -> bool:
        """Correct within tolerance, wrong variant not rejected for lack of power (not a failure)."""
        return self.correct_passes and not self.wrong_rejected and bool(self.inconclusive)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            passed=self.passed,
            correct_passes=self.correct_passes,
            wrong_rejected=self.wrong_rejected,
            is_inconclusive=self.is_inconclusive,
        )
        return d


@dataclass(frozen=True)
class Check:
    result: str
    name: str
    kind: str
    statement: str
    func: Callable[[], Comparison]
    exhaustive: bool = False

    def run(self) -> CheckOutcome:
        start = time.perf_counter()
        try:
            c = self.func()
            error = ""
        except Exception as exc:  # a crashing check is a failing check, reported with its reason
            c = Comparison(float("nan"), float("nan"), "", float("nan"))
            error = f"{type(exc).__name__}: {exc}"
        return CheckOutcome(
            result=self.result,
            check=self.name,
            kind=self.kind,
            statement=self.statement,
            max_error=float(c.max_error),
            tolerance=float(c.tolerance),
            wrong_variant=c.wrong_variant,
            wrong_error=float(c.wrong_error),
            seconds=time.perf_counter() - start,
            exhaustive=self.exhaustive,
            details=c.details,
            error=error,
            inconclusive=c.inconclusive,
        )


_REGISTRY: dict[tuple[str, str], Check] = {}


def register(result: str, kind: str, statement: str, name: str | None = None, exhaustive: bool = False):
    """Decorator registering ``func() -> Comparison`` as a check of ``result`` (one of RESULTS)."""
    if result not in RESULTS:
        raise ValueError(f"unknown result {result!r}; expected one of {RESULTS}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")

    def wrap(func: Callable[[], Comparison]) -> Callable[[], Comparison]:
        check_name = name or (func.__doc__ or func.__name__).strip().splitlines()[0]
        key = (kind, func.__module__ + "." + func.__qualname__)
        _REGISTRY[key] = Check(result, check_name, kind, statement, func, exhaustive)
        return func

    return wrap


def load_checks() -> list[Check]:
    """Import every check module (missing optional modules are skipped) and return the checks
    in MATH section 8 order."""
    for module in CHECK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return sorted(_REGISTRY.values(), key=lambda c: (RESULTS.index(c.result), KINDS.index(c.kind), c.name))


def select_checks(kinds: tuple[str, ...] = KINDS, exhaustive: bool = False) -> list[Check]:
    """The registered checks of the given kinds (exhaustive ones only when asked), in report order."""
    return [c for c in load_checks() if c.kind in kinds and (exhaustive or not c.exhaustive)]


def run_checks(
    kinds: tuple[str, ...] = KINDS,
    exhaustive: bool = False,
    progress: Callable[[Check], None] | None = None,
    done: Callable[[Check, CheckOutcome], None] | None = None,
) -> list[CheckOutcome]:
    """Run :func:`select_checks`; ``progress(check)`` is called before each check runs and
    ``done(check, outcome)`` after it (e.g. to drive a progress bar)."""
    outcomes = []
    for check in select_checks(kinds, exhaustive):
        if progress is not None:
            progress(check)
        outcome = check.run()
        if done is not None:
            done(check, outcome)
        outcomes.append(outcome)
    return outcomes
