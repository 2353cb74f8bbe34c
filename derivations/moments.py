"""Lemma 19, Theorem 17, Propositions 20 and 21 (MATH section 5) with sympy.stats and series.

* Lemma 19: ``X_t = ∫_0^t φ(s) dB_s ~ N(0, Φ_t)``, ``Φ_t = ∫_0^t φ² ds``, ``E[e^{zX_t}] = exp(z²Φ_t/2)``.
  Derived for time-dependent φ: with φ piecewise constant on n cells, X is a sum of independent
  normals ``φ_i ΔB_i`` (sympy.stats gives the MGF of each); the product is ``exp(z² Σ φ_i² Δ/2)``, and
  the Riemann sum tends to ``Φ_t`` (shown by symbolic summation and a limit for a polynomial φ).
* Theorem 17: with ``ln K_t = ln K0 + D_t − Φ_t/2 + X_t`` (Theorem 16), ``D_t = ∫(μ̄ + ψ̄)``,
  the MGF at z = 1, 2 gives ``E[K_t] = K0 e^{D_t}``, ``Var[K_t] = E[K_t]² (e^{Φ_t} − 1)``.
* Proposition 20: ``tr(HΣ) = ‖Aᵀ C‖_F² ≥ 0`` for ``H = AAᵀ``, ``Σ = CCᵀ`` (sum of squares), hence ψ ≥ 0.
* Proposition 21: ``Σ = C/b`` makes ``Φ = c/b``, and ``Var[K_t] = E[K_t]² c/b + O(b⁻²)``.
"""

from __future__ import annotations

import random
from functools import lru_cache

import sympy as sp
from sympy.stats import E as expectation
from sympy.stats import Normal

from derivations._result import Derivation

z = sp.Symbol("z", real=True)
t, s = sp.symbols("t s", positive=True)


@lru_cache(maxsize=4)
def normal_mgf(variance: sp.Expr) -> sp.Expr:
    """``E[e^{zX}]`` for ``X ~ N(0, variance)`` by sympy.stats (direct integration of the density)."""
    X = Normal("X", 0, sp.sqrt(variance))
    return sp.simplify(expectation(sp.exp(z * X)))


def lemma19_piecewise(cells: int = 3, wrong: bool = False) -> Derivation:
    """MGF of ``Σ_i φ_i ΔB_i`` (independent ΔB_i ~ N(0, Δ)) equals ``exp(z² Σ φ_i² Δ / 2)``.

    Wrong variant: ``exp(z² (Σ φ_i Δ)² / (2 t))``-style use of ``(∫φ)²`` in place of ``∫φ²``."""
    phi = sp.symbols(f"phi1:{cells + 1}", positive=True)
    delta = sp.Symbol("Delta", positive=True)
    base = normal_mgf(sp.Symbol("v", positive=True))
    mgf = sp.prod([base.subs({z: z * p}).subs(sp.Symbol("v", positive=True), delta) for p in phi])
    Phi = sum(p**2 for p in phi) * delta
    if wrong:
        Phi = sum(p for p in phi) ** 2 * delta / cells
    closed = sp.exp(z**2 * Phi / 2)
    return Derivation(
        "Lemma 19",
        "E[exp(z X)] = exp(z² Φ/2)",
        mgf,
        closed,
        _error(sp.log(mgf) - sp.log(closed)),
        0.0,
        "identical",
    )


def lemma19_riemann_limit(wrong: bool = False) -> Derivation:
    """For ``φ(s) = c0 + c1 s``: ``lim_{n→∞} Σ_{i<n} φ(i t/n)² t/n = ∫_0^t φ² ds`` (symbolic sum and limit).

    Wrong variant: the limit compared with ``(∫_0^t φ ds)²/t``."""
    c0, c1 = sp.symbols("c0 c1", positive=True)
    n, i = sp.symbols("n i", positive=True, integer=True)
    phi = c0 + c1 * s
    riemann = sp.summation(sp.expand(phi.subs(s, i * t / n) ** 2 * t / n), (i, 0, n - 1))
    limit = sp.limit(riemann, n, sp.oo)
    Phi = sp.integrate(phi**2, (s, 0, t)) if not wrong else sp.integrate(phi, (s, 0, t)) ** 2 / t
    return Derivation(
        "Lemma 19", "Φ_t = ∫_0^t φ² ds", limit, Phi, _error(limit - Phi), 0.0, "identical (sum + limit)"
    )


def _error(difference: sp.Expr) -> float:
    difference = sp.simplify(difference)
    if difference == 0:
        return 0.0
    rng = random.Random(11)
    point = {
        sym: sp.Rational(rng.randint(1, 9), rng.randint(2, 5))
        for sym in sorted(difference.free_symbols, key=str)
    }
    return abs(float(difference.subs(point).evalf(30)))


def theorem17_moments(wrong: bool = False) -> tuple[sp.Expr, sp.Expr, tuple[sp.Symbol, ...]]:
    """``E[K_t]`` and ``Var[K_t]`` from Theorem 16's solution and the Lemma 19 MGF (at z = 1, 2).

    Returns ``(mean, variance, (K0, D, Phi))``. ``wrong=True`` drops the −Φ/2 Itô correction from
    the exponent of K_t (the wrong variant)."""
    K0, D, Phi = sp.symbols("bound0 cumulative_drift cumulative_phi_sq", positive=True)
    mgf = normal_mgf(Phi)
    shift = D if wrong else D - Phi / 2
    mean = sp.simplify(K0 * sp.exp(shift) * mgf.subs(z, 1))
    second = sp.simplify(K0**2 * sp.exp(2 * shift) * mgf.subs(z, 2))
    variance = sp.simplify(second - mean**2)
    return mean, variance, (K0, D, Phi)


def theorem17(wrong: bool = False) -> tuple[Derivation, Derivation]:
    """Theorem 17: ``E[K_t] = K0 e^{D}`` and ``Var[K_t] = E[K_t]² (e^{Φ} − 1)``; wrong variant: no −Φ/2."""
    mean, variance, (K0, D, Phi) = theorem17_moments(wrong)
    closed_mean = K0 * sp.exp(D)
    closed_var = closed_mean**2 * (sp.exp(Phi) - 1)
    return (
        Derivation(
            "Theorem 17",
            "E[K_t] = K0 exp(∫(μ̄+ψ̄))",
            mean,
            closed_mean,
            _error(mean - closed_mean),
            0.0,
            "identical (sympy.stats)",
        ),
        Derivation(
            "Theorem 17",
            "Var[K_t] = E[K_t]² (exp(Φ_t) − 1)",
            variance,
            closed_var,
            _error(variance - closed_var),
            0.0,
            "identical (sympy.stats)",
        ),
    )


def theorem17_variance_from_mean() -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    """``Var[K_t]`` rewritten in terms of ``mean = E[K_t]`` and Φ (for codegen): ``mean² (e^Φ − 1)``."""
    _, variance, (K0, D, Phi) = theorem17_moments()
    mean = sp.Symbol("mean", positive=True)
    rewritten = sp.simplify(variance.subs(K0, mean * sp.exp(-D)))
    if rewritten.has(D) or rewritten.has(K0):
        raise AssertionError(f"variance does not reduce to a function of the mean: {rewritten}")
    return sp.factor(rewritten), (mean, Phi)


def layer_first_order_moments() -> tuple[sp.Expr, sp.Expr, tuple[sp.Symbol, ...]]:
    """Per layer, first order: ``σ_t = σ0 + D + X`` with ``X ~ N(0, Φ)`` gives ``E = σ0 + D``, ``Var = Φ``."""
    sigma0, D, Phi = sp.symbols("sigma0 cumulative_drift cumulative_phi_sq", positive=True)
    X = Normal("X", 0, sp.sqrt(Phi))
    from sympy.stats import variance as var

    sigma_t = sigma0 + D + X
    return sp.simplify(expectation(sigma_t)), sp.simplify(var(sigma_t)), (sigma0, D, Phi)


def proposition20(size: int = 2, wrong: bool = False) -> Derivation:
    """ψ ≥ 0: ``tr(HΣ) − ‖AᵀC‖_F² ≡ 0`` for symbolic ``H = AAᵀ``, ``Σ = CCᵀ`` (a sum of squares).

    ``error`` is the negativity ``max(0, −min tr(HΣ))`` over PSD Σ samples plus the residual of the
    identity. Wrong variant: an indefinite ``H = diag(1, −1, …)``, for which some PSD Σ gives tr(HΣ) < 0."""
    A = sp.Matrix(size, size, lambda i, j: sp.Symbol(f"a{i}{j}", real=True))
    C = sp.Matrix(size, size, lambda i, j: sp.Symbol(f"c{i}{j}", real=True))
    H = A * A.T if not wrong else sp.diag(1, *([-1] * (size - 1)))
    Sigma = C * C.T
    trace = sp.expand((H * Sigma).trace())
    sum_of_squares = sp.expand(sum(e**2 for e in (A.T * C)))
    residual = 0.0 if sp.expand(trace - sum_of_squares) == 0 else None
    rng = random.Random(5)
    worst = 0.0
    for _ in range(20):
        point = {
            sym: sp.Rational(rng.randint(-5, 5), rng.randint(1, 3))
            for sym in sorted(trace.free_symbols, key=str)
        }
        worst = max(worst, -float(trace.subs(point)))
    error = worst if residual == 0.0 else max(worst, 1.0)
    return Derivation(
        "Proposition 20",
        "ψ = (η²/2) tr(HΣ) ≥ 0 for H, Σ ⪰ 0",
        trace,
        sum_of_squares,
        error,
        0.0,
        "identity tr(AAᵀCCᵀ) = ‖AᵀC‖_F² + 20 rational PSD samples",
    )


def proposition20_growth(wrong: bool = False) -> Derivation:
    """Near convergence μ̄ → 0, ψ̄ = p/b > 0: ``d/dt E[K_t] = E[K_t] p/b > 0`` (E[K_t] keeps growing).

    Wrong variant: the Itô-free mean ``K0 exp(D − Φ/2)``, growth rate ``p/b − c/(2b)`` (can be < 0)."""
    K0, p, c, b = sp.symbols("K0 p c b", positive=True)
    mean, _, (K0s, D, Phi) = theorem17_moments(wrong=False)
    mean_t = mean.subs({K0s: K0, D: p * t / b, Phi: c * t / b})
    if wrong:
        mean_t = K0 * sp.exp(p * t / b - c * t / (2 * b))
    rate = sp.simplify(sp.diff(mean_t, t) / mean_t)
    # The growth rate must equal p/b (> 0 for every positive c); measure how far below p/b it can go.
    return Derivation(
        "Proposition 20",
        "E[K_t] grows at rate ψ̄ = p/b > 0 when μ̄ = 0",
        rate,
        p / b,
        _error(rate - p / b),
        0.0,
        "identical",
    )


def proposition21(wrong: bool = False) -> tuple[Derivation, Derivation]:
    """Proposition 21: with ``Φ = c/b``, ``Var[K_t]/E[K_t]² = c/b + O(b⁻²)`` (series at b = ∞), so the
    std of K_t falls like ``b^{-1/2}``; ``ψ(b') = ψ(b) b/b'``. Wrong variant: the biased ``Σ = C/b²``."""
    c, b = sp.symbols("c b", positive=True)
    _, variance, (K0, D, Phi) = theorem17_moments()
    mean = K0 * sp.exp(D)
    ratio = sp.simplify(variance / mean**2).subs(Phi, c / b**2 if wrong else c / b)
    leading = sp.series(ratio, b, sp.oo, n=2).removeO()
    exponent = sp.limit(sp.log(sp.sqrt(ratio)) / sp.log(b), b, sp.oo)
    lead_closed, exp_closed = c / b, sp.Rational(-1, 2)
    return (
        Derivation(
            "Proposition 21",
            "Var[K_t]/E[K_t]² = c/b + O(b⁻²)",
            leading,
            lead_closed,
            _error(leading - lead_closed),
            0.0,
            "series in 1/b",
        ),
        Derivation(
            "Proposition 21",
            "std[K_t] ∝ b^{-1/2}",
            exponent,
            exp_closed,
            abs(float(exponent - exp_closed)),
            0.0,
            "limit",
        ),
    )


def rescale_noise_term() -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    """A noise term measured at batch size b moved to b' (Proposition 21): ``value · b / b'``.

    Derived by solving ``value = p/b`` for p and substituting b' (``Σ = C/b``)."""
    value, b, b_new, p = sp.symbols("value batch_size new_batch_size p", positive=True)
    (p_solved,) = sp.solve(sp.Eq(value, p / b), p)
    return sp.simplify((p / b_new).subs(p, p_solved)), (value, b, b_new)
