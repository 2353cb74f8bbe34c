"""Monte Carlo estimators with confidence intervals (normal approximation, float64).

* mean: ``x_bar``, standard error ``s / sqrt(n)``;
* variance: unbiased ``s^2``, standard error from the asymptotic variance of the sample variance,
  ``Var[s^2] ~ (m4 - s^4 (n - 3) / (n - 1)) / n`` with m4 the 4th central moment (estimated);
* standard deviation: ``s``, delta method ``se(s) = se(s^2) / (2 s)``.

An :class:`Estimate` carries the value and its standard error; ``interval(z)`` is the normal
interval and ``z_score(pred, bias)`` the distance to a prediction in standard errors after
allowing a known deterministic bias bound (e.g. the O(dt) bias of a scheme).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from lipverify._validation import LipverifyError

#: Default two-sided confidence level of the intervals and the z used by the checks.
DEFAULT_LEVEL = 0.9999


def z_for_level(level: float = DEFAULT_LEVEL) -> float:
    """Two-sided normal quantile: z with P(|N(0,1)| <= z) = level (3.89 for 0.9999)."""
    if not 0 < level < 1:
        raise LipverifyError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate ``value`` with standard error ``stderr`` from ``n`` samples."""

    value: float
    stderr: float
    n: int

    def interval(self, level: float = DEFAULT_LEVEL, bias: float = 0.0) -> tuple[float, float]:
        """``value -/+ (z stderr + bias)``."""
        half = z_for_level(level) * self.stderr + abs(bias)
        return self.value - half, self.value + half

    def z_score(self, predicted: float, bias: float = 0.0) -> float:
        """``max(|value - predicted| - |bias|, 0) / stderr`` (inf if stderr is 0 and they differ)."""
        excess = max(abs(self.value - predicted) - abs(bias), 0.0)
        if self.stderr == 0:
            return 0.0 if excess == 0 else math.inf
        return excess / self.stderr

    def contains(self, predicted: float, level: float = DEFAULT_LEVEL, bias: float = 0.0) -> bool:
        lo, hi = self.interval(level, bias)
        return lo <= predicted <= hi

    def __sub__(self, other: Estimate) -> Estimate:
        """Difference of two *independent* estimates (standard errors add in quadrature)."""
        return Estimate(self.value - other.value, math.hypot(self.stderr, other.stderr), min(self.n, other.n))


def _samples(x: torch.Tensor | list | tuple, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64).flatten()
    if t.numel() < 2:
        raise LipverifyError(f"{name}: need at least 2 samples, got {t.numel()}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise LipverifyError(
            f"{name}: {int(bad.sum())} of {t.numel()} samples are non-finite (first at index {first}); "
            "drop diverged paths (Solution.finite_final) instead of averaging NaN"
        )
    return t


def mean(samples: torch.Tensor, name: str = "samples") -> Estimate:
    """Sample mean with standard error ``s / sqrt(n)``."""
    x = _samples(samples, name)
    n = x.numel()
    return Estimate(float(x.mean()), float(x.std(correction=1)) / math.sqrt(n), n)


def variance(samples: torch.Tensor, name: str = "samples") -> Estimate:
    """Unbiased sample variance; standard error ``sqrt((m4 - s^4 (n-3)/(n-1)) / n)``."""
    x = _samples(samples, name)
    n = x.numel()
    c = x - x.mean()
    s2 = float((c * c).sum()) / (n - 1)
    m4 = float((c**4).mean())
    var_s2 = max(m4 - s2 * s2 * (n - 3) / (n - 1), 0.0) / n
    return Estimate(s2, math.sqrt(var_s2), n)


def std(samples: torch.Tensor, name: str = "samples") -> Estimate:
    """Sample standard deviation with the delta-method error ``se(s^2) / (2 s)``."""
    v = variance(samples, name)
    s = math.sqrt(v.value)
    return Estimate(s, v.stderr / (2 * s) if s > 0 else math.inf, v.n)


def log_log_slope(
    x: list[float] | torch.Tensor, y: list[float] | torch.Tensor, rel_err: list[float] | torch.Tensor
) -> tuple[float, float]:
    """Least-squares slope of ``log y`` on ``log x`` and a bound on its standard error.

    The slope is ``sum_i w_i log y_i`` with ``w_i = (log x_i - mean) / sum_j (log x_j - mean)^2``;
    each ``log y_i`` has standard error ``rel_err_i`` (= se(y_i) / y_i, delta method). Because the
    y_i may be correlated (nested step sizes share one Brownian path), the returned error is the
    correlation-free bound ``sum_i |w_i| rel_err_i`` (triangle inequality for standard deviations).
    """
    lx = torch.log(torch.as_tensor(x, dtype=torch.float64))
    ly = torch.as_tensor(y, dtype=torch.float64)
    if bool((ly <= 0).any()):
        raise LipverifyError("log_log_slope needs positive values")
    ly = torch.log(ly)
    re = torch.as_tensor(rel_err, dtype=torch.float64)
    c = lx - lx.mean()
    w = c / (c * c).sum()
    return float((w * ly).sum()), float((w.abs() * re).sum())
