"""The structured outcome shared by every derivation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Derivation:
    """A derived object compared with the paper's closed form.

    ``error`` is the comparison's measure: 0.0 when the two are identically (or exactly) equal,
    otherwise the max absolute difference at the evaluation points (``method`` says how they were
    evaluated). ``agrees`` is ``error <= tolerance``.
    """

    result: str
    statement: str
    derived: Any
    closed_form: Any
    error: float
    tolerance: float
    method: str
    details: str = ""

    @property
    def agrees(self) -> bool:
        return self.error <= self.tolerance
