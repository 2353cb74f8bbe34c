"""Propositions 5, 6, 7 (MATH section 1) over all ordered samples of a small symbolic population.

A population of N symbolic gradient vectors ``g_1..g_N`` ∈ R² is sampled b times, either with
replacement (all N^b ordered samples equally likely) or without (all N!/(N−b)! ordered samples).
``Σ = Cov[ḡ]`` is computed from its definition (Eq. 2) as the exact average over samples, and

* Proposition 5: ``E[Σ̂] = Σ`` for ``Σ̂ = ĜĜᵀ / (b(b−1))`` (times ``1 − b/N`` without replacement);
* Proposition 6: ``diag Σ̂ = (Ĝ ⊙ Ĝ) 1_b / (b(b−1))``; the off-diagonal part is not PSD in general;
* Proposition 7: ``Σ̂^{1/2} = Ĝ Q Λ^{+1/2} Qᵀ Ĝᵀ / sqrt(b(b−1))`` is symmetric and squares to Σ̂.
"""

from __future__ import annotations

import itertools
import random

import sympy as sp

from derivations._result import Derivation


def population(size: int, dim: int = 2) -> list[sp.Matrix]:
    """N symbolic column vectors ``g_i = (x_i, y_i, ...)``."""
    names = "xyzw"
    return [
        sp.Matrix([sp.Symbol(f"{names[k]}{i}", real=True) for k in range(dim)]) for i in range(1, size + 1)
    ]


def _samples(size: int, b: int, replacement: bool):
    if replacement:
        return list(itertools.product(range(size), repeat=b))
    return list(itertools.permutations(range(size), b))


def centred_matrix(columns: list[sp.Matrix]) -> sp.Matrix:
    """``Ĝ = [g_1 − ḡ, …, g_b − ḡ]`` (d×b)."""
    G = sp.Matrix.hstack(*columns)
    mean = G * sp.ones(G.cols, 1) / G.cols
    return G - mean * sp.ones(1, G.cols)


def estimator(
    columns: list[sp.Matrix], population_size: int | None = None, biased: bool = False
) -> sp.Matrix:
    """Proposition 5 ``Σ̂``; ``biased=True`` is the wrong variant ``ĜĜᵀ / b²``."""
    Gc = centred_matrix(columns)
    b = Gc.cols
    scale = sp.Rational(1, b * b) if biased else sp.Rational(1, b * (b - 1))
    if population_size is not None:
        scale *= 1 - sp.Rational(b, population_size)
    return Gc * Gc.T * scale


def _matrix_error(difference: sp.Matrix) -> float:
    difference = difference.applyfunc(sp.expand)
    if difference.is_zero_matrix:
        return 0.0
    rng = random.Random(2)
    point = {
        s: sp.Rational(rng.randint(-9, 9), rng.randint(1, 4))
        for s in sorted(difference.free_symbols, key=str)
    }
    return max(abs(float(e.subs(point))) for e in difference)


def proposition5(size: int, b: int, replacement: bool = True, wrong: bool = False) -> Derivation:
    """``E[Σ̂] = Cov[ḡ]`` exactly over every ordered sample, and ``Cov[ḡ] = C/b`` with replacement
    (C the population covariance with 1/N). Wrong variant: the biased ``1/b²`` estimator
    (with replacement) or the missing ``1 − b/N`` factor (without)."""
    pop = population(size)
    samples = _samples(size, b, replacement)
    means = [sum((pop[i] for i in sample), sp.zeros(2, 1)) / b for sample in samples]
    grand = sum(means, sp.zeros(2, 1)) / len(samples)
    Sigma = sum(((m - grand) * (m - grand).T for m in means), sp.zeros(2, 2)) / len(samples)
    N = None if replacement else size
    if wrong and not replacement:
        N = None
    expected = sum(
        (estimator([pop[i] for i in sample], N, biased=wrong and replacement) for sample in samples),
        sp.zeros(2, 2),
    ) / len(samples)
    label = "with replacement" if replacement else f"without replacement, N = {size}"
    error = _matrix_error(expected - Sigma)
    if replacement:  # and Σ = C/b, C the population covariance (1/N normalisation)
        pop_mean = sum(pop, sp.zeros(2, 1)) / size
        C = sum(((g - pop_mean) * (g - pop_mean).T for g in pop), sp.zeros(2, 2)) / size
        error = max(error, _matrix_error(Sigma - C / b))
    return Derivation(
        "Proposition 5",
        "E[Σ̂] = Σ (= C/b with replacement)",
        expected,
        Sigma,
        error,
        0.0,
        f"exact average over all {len(samples)} ordered samples, b = {b}, {label}",
    )


def proposition6(b: int = 3, wrong: bool = False) -> tuple[Derivation, Derivation]:
    """``diag Σ̂ = (Ĝ ⊙ Ĝ) 1_b / (b(b−1))`` identically, and the off-diagonal part has a negative
    eigenvalue at a concrete sample (not PSD). Wrong variant: squares of the uncentred G."""
    cols = population(b)
    Sigma_hat = estimator(cols)
    G = sp.Matrix.hstack(*cols) if wrong else centred_matrix(cols)
    diag = G.multiply_elementwise(G) * sp.ones(b, 1) / (b * (b - 1))
    err = _matrix_error(diag - sp.Matrix([Sigma_hat[i, i] for i in range(2)]))
    off = Sigma_hat - sp.diag(*[Sigma_hat[i, i] for i in range(2)])
    rng = random.Random(4)
    point = {s: sp.Integer(rng.randint(-5, 5)) for s in sorted(off.free_symbols, key=str)}
    min_eig = min(float(e) for e in off.subs(point).eigenvals(multiple=True))
    return (
        Derivation(
            "Proposition 6",
            "diag Σ̂ = (Ĝ⊙Ĝ)1/(b(b−1))",
            diag,
            Sigma_hat.diagonal(),
            err,
            0.0,
            f"identical, b = {b}",
        ),
        Derivation(
            "Proposition 6",
            "off-diagonal part not PSD",
            min_eig,
            "< 0",
            max(0.0, min_eig),
            0.0,
            "eigenvalues at a sample",
        ),
    )


def low_rank_root(columns: list[sp.Matrix], wrong: bool = False) -> sp.Matrix:
    """Proposition 7 ``Ĝ Q Λ^{+1/2} Qᵀ Ĝᵀ / sqrt(b(b−1))`` from the exact eigen-decomposition of ĜᵀĜ.

    ``wrong=True`` divides by ``b(b−1)`` instead of its square root."""
    Gc = centred_matrix(columns)
    b = Gc.cols
    core = sp.zeros(b, b)
    for value, _, vectors in (Gc.T * Gc).eigenvects():
        if sp.simplify(value) == 0:
            continue
        basis = sp.GramSchmidt(vectors, orthonormal=True)
        for q in basis:
            core += q * q.T / sp.sqrt(value)
    scale = 1 / sp.Integer(b * (b - 1)) if wrong else 1 / sp.sqrt(b * (b - 1))
    return Gc * core * Gc.T * scale


def proposition7(b: int = 2, seed: int | None = None, wrong: bool = False) -> Derivation:
    """``(Σ̂^{1/2})² = Σ̂`` and symmetry: identically for symbolic b = 2, exactly (radicals) for b = 3
    at a rational sample (``seed``). Wrong variant: scale ``1/(b(b−1))``."""
    cols = population(b)
    if seed is not None:
        rng = random.Random(seed)
        point = {s: sp.Integer(rng.randint(-6, 6)) for c in cols for s in c}
        cols = [c.subs(point) for c in cols]
    root = low_rank_root(cols, wrong)
    target = estimator(cols)
    difference = (root * root - target).applyfunc(lambda e: sp.simplify(sp.radsimp(e)))
    asym = (root - root.T).applyfunc(sp.simplify)
    err = max(_matrix_error(difference), _matrix_error(asym))
    method = f"identical, b = {b}" if seed is None else f"exact radicals, b = {b}, seed {seed}"
    return Derivation("Proposition 7", "(Σ̂^{1/2})² = Σ̂, symmetric", root, target, err, 0.0, method)
