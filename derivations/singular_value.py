"""Lemmas 12 and 13 (MATH section 2) by implicit differentiation of the characteristic polynomial.

``p(λ, W) = det(λ I − WᵀW)`` vanishes at ``λ = σ1²``. With σ1 simple (Assumption 11) the implicit
function theorem gives, for entries (column-major) ``w_i, w_j`` of W,

* ``λ_i = −p_i / p_λ``,
* ``λ_ij = −(p_ij + p_iλ λ_j + p_jλ λ_i + p_λλ λ_i λ_j) / p_λ``,

and ``σ1 = sqrt(λ)``: ``σ_i = λ_i / (2σ1)``, ``σ_ij = λ_ij / (2σ1) − λ_i λ_j / (4σ1³)``.
Nothing here uses a singular vector, so comparing with the paper's closed forms is a real test:

* Lemma 12: ``∂σ1/∂vec W = v ⊗ u``;
* Lemma 13: ``H = Σ_{k=2..r} [σ1 (x_k x_kᵀ + y_k y_kᵀ) + σk (x_k y_kᵀ + y_k x_kᵀ)] / ((σ1 − σk)(σ1 + σk))
  + (1/σ1)(Σ_{k>r} x_k x_kᵀ + Σ_{j>r} y_j y_jᵀ)`` with ``x_k = v_k ⊗ u``, ``y_k = v ⊗ u_k``;
* eigenvalues of H: ``1/(σ1 − σk)``, ``1/(σ1 + σk)`` (k = 2..r), ``1/σ1`` (multiplicity m + n − 2r),
  0 otherwise; ``tr H = Σ_{k=2..r} 2σ1/((σ1 − σk)(σ1 + σk)) + (m + n − 2r)/σ1``.

Three evaluation regimes:

1. identically, for a symbolic 2×2 ``W = Rot(τ1) diag(s1, s2) Rot(τ2)ᵀ`` (rational parametrisation of
   the rotations, s2 signed: every 2×2 with ``s1 > |s2|`` up to a measure-zero set), in the field
   ``Q(τ1, τ2, s1, s2)``;
2. exactly, for rational matrices with rational SVD (Cayley-transform orthogonal factors);
3. at 60 significant digits (mpmath), for random rational matrices whose σ1 is an algebraic number
   (the root of p is isolated and refined by ``CRootOf``; the closed form uses mpmath's SVD).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import lru_cache

import mpmath
import sympy as sp
from sympy.polys.domains import QQ
from sympy.polys.fields import field
from sympy.polys.matrices import DomainMatrix

from derivations._result import Derivation

#: Working precision (decimal digits) of the high-precision regime and the tolerance it certifies.
PRECISION_DIGITS = 60
HIGH_PRECISION_TOLERANCE = 1e-40

# ---------------------------------------------------------------------------------------------
# Closed forms (Lemma 12, Lemma 13, eigenvalues, trace), for any number type (Rational, mpf, field)
# ---------------------------------------------------------------------------------------------


def _kron_vec(right: Sequence, left: Sequence) -> list:
    """``vec(left rightᵀ) = right ⊗ left`` (column-major), as a flat list."""
    return [r * left_i for r in right for left_i in left]


def lemma12_closed_form(U_cols: Sequence[Sequence], V_cols: Sequence[Sequence], right_index: int = 0) -> list:
    """Lemma 12: ``∂σ1/∂vec W = v ⊗ u``. ``right_index = 1`` gives the wrong variant ``v_2 ⊗ u``."""
    return _kron_vec(V_cols[right_index], U_cols[0])


def lemma13_closed_form(
    U_cols: Sequence[Sequence], sigma: Sequence, V_cols: Sequence[Sequence], drop_cross_term: bool = False
) -> list[list]:
    """Lemma 13 Hessian as a d×d nested list from full bases (m columns of U, n columns of V).

    ``drop_cross_term=True`` is the wrong variant that omits ``σk (x_k y_kᵀ + y_k x_kᵀ)``."""
    m, n, r = len(U_cols), len(V_cols), len(sigma)
    s1 = sigma[0]
    u, v = U_cols[0], V_cols[0]
    d = m * n
    zero = s1 - s1
    H = [[zero for _ in range(d)] for _ in range(d)]

    def add(a: Sequence, b: Sequence, weight) -> None:
        for i in range(d):
            for j in range(d):
                H[i][j] += weight * a[i] * b[j]

    for k in range(1, r):
        sk = sigma[k]
        xk, yk = _kron_vec(V_cols[k], u), _kron_vec(v, U_cols[k])
        denom = (s1 - sk) * (s1 + sk)
        add(xk, xk, s1 / denom)
        add(yk, yk, s1 / denom)
        if not drop_cross_term:
            add(xk, yk, sk / denom)
            add(yk, xk, sk / denom)
    for k in range(r, n):
        xk = _kron_vec(V_cols[k], u)
        add(xk, xk, 1 / s1)
    for j in range(r, m):
        yj = _kron_vec(v, U_cols[j])
        add(yj, yj, 1 / s1)
    return H


def hessian_eigenvalues_closed_form(sigma: Sequence, m: int, n: int, wrong: bool = False) -> list:
    """Predicted spectrum of H (all m·n eigenvalues): ``1/(σ1 ∓ σk)``, ``1/σ1`` ×(m+n−2r), zeros.

    ``wrong=True`` predicts ``1/(σ1² − σk²)`` twice instead (the wrong variant)."""
    s1, r = sigma[0], len(sigma)
    values = []
    for sk in sigma[1:]:
        if wrong:
            values += [1 / ((s1 - sk) * (s1 + sk))] * 2
        else:
            values += [1 / (s1 - sk), 1 / (s1 + sk)]
    values += [1 / s1] * (m + n - 2 * r)
    values += [s1 - s1] * (m * n - len(values))
    return values


def trace_pair_term(sigma1, sigmak, wrong: bool = False):
    """Per-k term of tr H: ``2σ1 / ((σ1 − σk)(σ1 + σk))``; wrong variant ``2σ1 / (σ1² + σk²)``."""
    if wrong:
        return 2 * sigma1 / (sigma1**2 + sigmak**2)
    return 2 * sigma1 / ((sigma1 - sigmak) * (sigma1 + sigmak))


def trace_null_term(sigma1, m, n, r):
    """Null-space part of tr H: ``(m + n − 2r) / σ1``."""
    return (m + n - 2 * r) / sigma1


def trace_closed_form(sigma: Sequence, m: int, n: int, wrong: bool = False):
    """``tr H = Σ_{k=2..r} 2σ1/((σ1 − σk)(σ1 + σk)) + (m + n − 2r)/σ1`` (MATH section 2)."""
    s1 = sigma[0]
    return sum((trace_pair_term(s1, sk, wrong) for sk in sigma[1:]), s1 - s1) + trace_null_term(
        s1, m, n, len(sigma)
    )


def trace_pair_term_symbolic() -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    """Symbolic per-k tr H term, factored as ``(σ1 − σk)(σ1 + σk)`` (MATH section 7), for codegen.

    Obtained from the Lemma 13 eigenvalues ``1/(σ1 − σk) + 1/(σ1 + σk)`` combined over a common
    denominator and factored."""
    s1, sk = sp.symbols("sigma1 sigmak", positive=True)
    term = sp.factor(sp.together(1 / (s1 - sk) + 1 / (s1 + sk)))
    return term, (s1, sk)


def trace_null_term_symbolic() -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    """Symbolic null-space term ``(m + n − 2r)/σ1``: (m − r) + (n − r) eigenvalues ``1/σ1``."""
    s1 = sp.Symbol("sigma1", positive=True)
    m, n, r = sp.symbols("m n r", integer=True, nonnegative=True)
    return ((m - r) + (n - r)) * (1 / s1), (s1, m, n, r)


# ---------------------------------------------------------------------------------------------
# Implicit differentiation
# ---------------------------------------------------------------------------------------------


def characteristic_polynomial(m: int, n: int) -> tuple[sp.Expr, sp.Symbol, list[sp.Symbol]]:
    """``p(λ, W) = det(λ I − WᵀW)`` for a symbolic m×n W; returns (p, λ, column-major entries)."""
    lam = sp.Symbol("lam")
    entries = [sp.Symbol(f"w{i + 1}{j + 1}") for j in range(n) for i in range(m)]
    W = sp.Matrix(m, n, lambda i, j: entries[i + m * j])
    p = sp.expand((lam * sp.eye(n) - W.T * W).det(method="berkowitz"))
    return p, lam, entries


def _second_order_from_partials(p_i, p_j, p_ij, p_il, p_jl, p_l, p_ll, sigma):
    """Implicit-function formulas: returns (σ_i, σ_j, σ_ij) from partials of p at (σ1², W)."""
    lam_i, lam_j = -p_i / p_l, -p_j / p_l
    lam_ij = -(p_ij + p_il * lam_j + p_jl * lam_i + p_ll * lam_i * lam_j) / p_l
    return lam_i / (2 * sigma), lam_j / (2 * sigma), lam_ij / (2 * sigma) - lam_i * lam_j / (4 * sigma**3)


def implicit_derivatives_symbolic_2x2():
    """Derived gradient (4,) and Hessian (4×4) of σ1 for the symbolic 2×2 ``Rot(τ1) diag(s1,s2) Rot(τ2)ᵀ``.

    The partials of ``p`` are taken with respect to generic symbols ``w_ij`` and ``λ``, then evaluated
    in the field ``Q(τ1, τ2, s1, s2)`` at ``w = W(τ, s)``, ``λ = s1²``. Returns
    ``(gradient, hessian, (U_cols, (s1, s2), V_cols))``."""
    K, tau1, tau2, s1, s2 = _field()
    U, V = _rotation(tau1), _rotation(tau2)
    W = [[sum(U[i][k] * [s1, s2][k] * V[j][k] for k in range(2)) for j in range(2)] for i in range(2)]
    p, lam, entries = characteristic_polynomial(2, 2)
    values = dict(zip(entries, [W[0][0], W[1][0], W[0][1], W[1][1]], strict=True))
    values[lam] = s1**2
    gens = [lam, *entries]

    def at_point(expr: sp.Expr):
        total = K(0)
        for monomial, coeff in sp.Poly(expr, *gens).terms():
            term = K(coeff)
            for g, k in zip(gens, monomial, strict=True):
                if k:
                    term *= values[g] ** k
            total += term
        return total

    p_l, p_ll = at_point(sp.diff(p, lam)), at_point(sp.diff(p, lam, 2))
    p_w = [at_point(sp.diff(p, w)) for w in entries]
    p_wl = [at_point(sp.diff(p, w, lam)) for w in entries]
    d = len(entries)
    grad = [-p_w[i] / p_l / (2 * s1) for i in range(d)]
    hess = [[None] * d for _ in range(d)]
    for i in range(d):
        for j in range(i, d):
            p_ij = at_point(sp.diff(p, entries[i], entries[j]))
            _, _, h = _second_order_from_partials(p_w[i], p_w[j], p_ij, p_wl[i], p_wl[j], p_l, p_ll, s1)
            hess[i][j] = hess[j][i] = h
    U_cols = [[U[0][k], U[1][k]] for k in range(2)]
    V_cols = [[V[0][k], V[1][k]] for k in range(2)]
    return grad, hess, (U_cols, (s1, s2), V_cols)


@lru_cache(maxsize=1)
def _field():
    K, tau1, tau2, s1, s2 = field("tau1,tau2,s1,s2", QQ)
    return K, tau1, tau2, s1, s2


def _rotation(tau):
    """Rational parametrisation of a rotation: cos = (1 − τ²)/(1 + τ²), sin = 2τ/(1 + τ²)."""
    c = (1 - tau**2) / (1 + tau**2)
    s = 2 * tau / (1 + tau**2)
    return [[c, -s], [s, c]]


#: Generic point at which a non-identical field difference is measured.
_SAMPLE_2x2 = {
    "tau1": sp.Rational(1, 3),
    "tau2": sp.Rational(-2, 5),
    "s1": sp.Integer(3),
    "s2": sp.Integer(1),
}


def _field_error(differences: Sequence) -> float:
    """0.0 if every field element is identically zero, else max |difference| at a generic point."""
    nonzero = [d for d in differences if d != 0]
    if not nonzero:
        return 0.0
    subs = {sp.Symbol(k): v for k, v in _SAMPLE_2x2.items()}
    return max(abs(float(d.as_expr().subs(subs))) for d in nonzero)


def implicit_derivatives_at(W: sp.Matrix, sigma1, to_number: Callable) -> tuple[list, list[list]]:
    """Derived gradient (d,) and Hessian (d×d) of σ1 at a concrete rational W (m×n).

    For each pair of entries (i, j) the characteristic polynomial of ``(W + t1 E_i + t2 E_j)ᵀ(...)``
    is computed exactly over ``Q[t1, t2]``; its t-partials at 0 are the entry partials of p. They are
    evaluated at ``λ = σ1²`` in the number type of ``to_number`` (``sp.Rational`` or ``mpmath.mpf``);
    ``sigma1`` must already be of that type."""
    m, n = W.shape
    d = m * n
    ring, t1, t2 = sp.ring("t1,t2", QQ)
    domain = ring.to_domain()
    lam1 = sigma1**2

    def charpoly(perturbed: list[list]) -> list:
        gram = [
            [sum(perturbed[k][a] * perturbed[k][b] for k in range(m)) for b in range(n)] for a in range(n)
        ]
        return DomainMatrix(gram, (n, n), domain).charpoly()

    def base() -> list[list]:
        return [[ring(QQ(*map(int, sp.fraction(W[i, j])))) for j in range(n)] for i in range(m)]

    def poly_value(coeffs: Sequence, derivative: int = 0):
        """Σ_k c_k λ^(n−k) (or its λ-derivative) at λ1; coefficients already numbers."""
        total = to_number(QQ(0))
        for k, c in enumerate(coeffs):
            power = n - k
            if power < derivative:
                continue
            factor = 1
            for f in range(derivative):
                factor *= power - f
            total += c * factor * lam1 ** (power - derivative)
        return total

    unperturbed = charpoly(base())
    const = [to_number(c.coeff(1)) for c in unperturbed]
    p_l, p_ll = poly_value(const, 1), poly_value(const, 2)
    p_w, p_wl, p_ww = [None] * d, [None] * d, {}
    for i in range(d):
        Y = base()
        Y[i % m][i // m] += t1
        cp = charpoly(Y)
        first = [to_number(c.coeff(t1)) for c in cp]
        second = [2 * to_number(c.coeff(t1**2)) for c in cp]
        p_w[i], p_wl[i], p_ww[i, i] = poly_value(first), poly_value(first, 1), poly_value(second)
    for i in range(d):
        for j in range(i + 1, d):
            Y = base()
            Y[i % m][i // m] += t1
            Y[j % m][j // m] += t2
            p_ww[i, j] = poly_value([to_number(c.coeff(t1 * t2)) for c in charpoly(Y)])
    grad = [p_w[i] / (-p_l) / (2 * sigma1) for i in range(d)]
    hess = [[None] * d for _ in range(d)]
    for i in range(d):
        for j in range(i, d):
            _, _, h = _second_order_from_partials(
                p_w[i], p_w[j], p_ww[i, j], p_wl[i], p_wl[j], p_l, p_ll, sigma1
            )
            hess[i][j] = hess[j][i] = h
    return grad, hess


# ---------------------------------------------------------------------------------------------
# Test matrices
# ---------------------------------------------------------------------------------------------


def cayley_orthogonal(k: int, rng: random.Random) -> sp.Matrix:
    """Rational orthogonal k×k matrix ``(I − A)(I + A)⁻¹`` from a random rational skew-symmetric A."""
    A = sp.zeros(k, k)
    for i in range(k):
        for j in range(i + 1, k):
            A[i, j] = sp.Rational(rng.randint(-4, 4), rng.randint(1, 3))
            A[j, i] = -A[i, j]
    return (sp.eye(k) - A) * (sp.eye(k) + A).inv()


def rational_svd_matrix(m: int, n: int, seed: int) -> tuple[sp.Matrix, sp.Matrix, list, sp.Matrix]:
    """Random rational m×n ``W = U diag(σ) Vᵀ`` with rational orthogonal U, V and distinct σ > 0."""
    rng = random.Random(seed)
    r = min(m, n)
    values = sorted(rng.sample(range(1, 6 * r + 4), r), reverse=True)
    sigma = [sp.Rational(x, 2) for x in values]
    U, V = cayley_orthogonal(m, rng), cayley_orthogonal(n, rng)
    W = U[:, :r] * sp.diag(*sigma) * V[:, :r].T
    return W, U, sigma, V


def random_rational_matrix(m: int, n: int, seed: int) -> sp.Matrix:
    """Random rational m×n matrix (generic: irrational singular values)."""
    rng = random.Random(seed)
    return sp.Matrix(m, n, lambda i, j: sp.Rational(rng.randint(-9, 9), rng.randint(1, 4)))


def _columns(M) -> list[list]:
    return [[M[i, j] for i in range(M.rows)] for j in range(M.cols)]


def _rational(q) -> sp.Rational:
    return sp.Rational(int(q.numerator), int(q.denominator))


# ---------------------------------------------------------------------------------------------
# Derivations
# ---------------------------------------------------------------------------------------------


def lemma12_symbolic_2x2(wrong: bool = False) -> Derivation:
    """Lemma 12 identically for a symbolic 2×2: implicit ``∂σ1/∂vec W`` equals ``v ⊗ u``.

    Wrong variant: ``v_2 ⊗ u`` (the wrong singular vector)."""
    grad, _, (U_cols, _, V_cols) = implicit_derivatives_symbolic_2x2()
    closed = lemma12_closed_form(U_cols, V_cols, right_index=1 if wrong else 0)
    error = _field_error([g - c for g, c in zip(grad, closed, strict=True)])
    return Derivation(
        "Lemma 12", "∂σ1/∂vec W = v ⊗ u", grad, closed, error, 0.0, "identical in Q(τ1,τ2,s1,s2)"
    )


def lemma13_symbolic_2x2(wrong: bool = False) -> Derivation:
    """Lemma 13 identically for a symbolic 2×2: implicit Hessian equals the closed form.

    Wrong variant: the σk cross term dropped."""
    _, hess, (U_cols, sigma, V_cols) = implicit_derivatives_symbolic_2x2()
    closed = lemma13_closed_form(U_cols, sigma, V_cols, drop_cross_term=wrong)
    error = _field_error(
        [h - c for hr, cr in zip(hess, closed, strict=True) for h, c in zip(hr, cr, strict=True)]
    )
    return Derivation("Lemma 13", "∂²σ1/∂vec W² = H", hess, closed, error, 0.0, "identical in Q(τ1,τ2,s1,s2)")


def trace_symbolic_2x2(wrong: bool = False) -> Derivation:
    """tr H identically for a symbolic 2×2: ``tr(implicit Hessian) = 2σ1/((σ1 − σ2)(σ1 + σ2))``.

    Wrong variant: denominator ``σ1² + σ2²``."""
    _, hess, (_, sigma, _) = implicit_derivatives_symbolic_2x2()
    trace = sum(hess[i][i] for i in range(4))
    closed = trace_closed_form(list(sigma), 2, 2, wrong=wrong)
    return Derivation(
        "tr H / eigenvalues of H",
        "tr H formula",
        trace,
        closed,
        _field_error([trace - closed]),
        0.0,
        "identical in Q(τ1,τ2,s1,s2)",
    )


def lemma12_13_exact(m: int, n: int, seed: int = 0, wrong: bool = False) -> tuple[Derivation, Derivation]:
    """Lemmas 12 and 13 exactly (in Q) for a rational m×n matrix with rational SVD.

    Wrong variants: ``v_2 ⊗ u`` for Lemma 12; the dropped cross term for Lemma 13."""
    W, U, sigma, V = rational_svd_matrix(m, n, seed)
    grad, hess = implicit_derivatives_at(W, sigma[0], _rational)
    J = lemma12_closed_form(_columns(U), _columns(V), right_index=1 if wrong and n > 1 else 0)
    H = lemma13_closed_form(_columns(U), sigma, _columns(V), drop_cross_term=wrong)
    err_j = max(abs(float(g - c)) for g, c in zip(grad, J, strict=True))
    err_h = max(
        abs(float(h - c)) for hr, cr in zip(hess, H, strict=True) for h, c in zip(hr, cr, strict=True)
    )
    method = f"exact rational arithmetic, {m}x{n} matrix with rational SVD (seed {seed})"
    return (
        Derivation("Lemma 12", "∂σ1/∂vec W = v ⊗ u", grad, J, err_j, 0.0, method),
        Derivation("Lemma 13", "∂²σ1/∂vec W² = H", hess, H, err_h, 0.0, method),
    )


def hessian_spectrum_exact(
    m: int, n: int, seed: int = 0, wrong: bool = False
) -> tuple[Derivation, Derivation]:
    """Eigenvalues and trace of the implicit Hessian, exactly, for a rational matrix with rational SVD.

    The characteristic polynomial of H (computed exactly) must equal ``Π (x − e)`` over the predicted
    eigenvalues e; ``tr H`` must equal the closed form. Wrong variants: eigenvalues ``1/(σ1² − σk²)``
    and the trace denominator ``σ1² + σk²``."""
    W, _, sigma, _ = rational_svd_matrix(m, n, seed)
    _, hess = implicit_derivatives_at(W, sigma[0], _rational)
    d = m * n
    predicted = hessian_eigenvalues_closed_form(sigma, m, n, wrong=wrong)
    x = sp.Symbol("x")
    charpoly = sp.Matrix(hess).charpoly(x).as_expr()
    expected = sp.expand(sp.prod([x - e for e in predicted]))
    if sp.expand(charpoly - expected) == 0:
        eig_error = 0.0
    else:
        with mpmath.workdps(30):
            hm = mpmath.matrix([[_mp_number(QQ(*map(int, sp.fraction(h)))) for h in row] for row in hess])
            actual = sorted(float(e) for e in mpmath.eigsy(hm, eigvals_only=True))
        eig_error = max(
            abs(a - float(p)) for a, p in zip(actual, sorted(float(e) for e in predicted), strict=True)
        )
    trace = sum(hess[i][i] for i in range(d))
    closed_trace = trace_closed_form(sigma, m, n, wrong=wrong)
    method = f"exact rational arithmetic, {m}x{n} (seed {seed})"
    return (
        Derivation("tr H / eigenvalues of H", "spectrum of H", charpoly, expected, eig_error, 0.0, method),
        Derivation(
            "tr H / eigenvalues of H",
            "tr H formula",
            trace,
            closed_trace,
            abs(float(trace - closed_trace)),
            0.0,
            method,
        ),
    )


def _mp_number(q) -> mpmath.mpf:
    return mpmath.mpf(int(q.numerator)) / int(q.denominator)


def lemma12_13_high_precision(
    m: int, n: int, seed: int = 0, wrong: bool = False
) -> tuple[Derivation, Derivation, Derivation]:
    """Lemmas 12, 13 and the spectrum of H at a generic random rational W (σ1 algebraic), 60 digits.

    σ1² is the largest root of ``p(λ, W)``, isolated exactly by ``CRootOf`` and refined to 60+
    digits; the implicit derivatives are evaluated there. The closed forms use mpmath's SVD at the
    same precision. Returns (Lemma 12, Lemma 13, eigenvalues) derivations; wrong variants as in
    :func:`lemma12_13_exact`, plus the ``1/(σ1² − σk²)`` spectrum."""
    W = random_rational_matrix(m, n, seed)
    with mpmath.workdps(PRECISION_DIGITS):
        lam = sp.Symbol("lam")
        p = sp.Poly((W.T * W).charpoly(lam).as_expr(), lam)
        root = max(p.real_roots(), key=lambda z: z.evalf(20))
        sigma1 = mpmath.sqrt(mpmath.mpf(str(root.evalf(PRECISION_DIGITS + 10))))
        grad, hess = implicit_derivatives_at(W, sigma1, _mp_number)
        Wm = mpmath.matrix(
            [[_mp_number(QQ(*map(int, sp.fraction(W[i, j])))) for j in range(n)] for i in range(m)]
        )
        U, S, Vt = mpmath.svd_r(Wm, full_matrices=True, compute_uv=True)
        sigma = [S[k] for k in range(min(m, n))]
        U_cols = [[U[i, k] for i in range(m)] for k in range(m)]
        V_cols = [[Vt[k, j] for j in range(n)] for k in range(n)]
        J = lemma12_closed_form(U_cols, V_cols, right_index=1 if wrong and n > 1 else 0)
        H = lemma13_closed_form(U_cols, sigma, V_cols, drop_cross_term=wrong)
        err_j = max(abs(g - c) for g, c in zip(grad, J, strict=True))
        err_h = max(abs(h - c) for hr, cr in zip(hess, H, strict=True) for h, c in zip(hr, cr, strict=True))
        eig = sorted(mpmath.eigsy(mpmath.matrix(hess), eigvals_only=True))
        predicted = sorted(hessian_eigenvalues_closed_form(sigma, m, n, wrong=wrong))
        err_e = max(abs(a - b) for a, b in zip(eig, predicted, strict=True))
    method = (
        f"{PRECISION_DIGITS}-digit mpmath at a random rational {m}x{n} (seed {seed}); σ1² isolated by CRootOf"
    )
    tol = HIGH_PRECISION_TOLERANCE
    return (
        Derivation("Lemma 12", "∂σ1/∂vec W = v ⊗ u", grad, J, float(err_j), tol, method),
        Derivation("Lemma 13", "∂²σ1/∂vec W² = H", hess, H, float(err_h), tol, method),
        Derivation("tr H / eigenvalues of H", "spectrum of H", eig, predicted, float(err_e), tol, method),
    )


def lemma12_algebraic(m: int, n: int, seed: int = 0, wrong: bool = False) -> Derivation:
    """Lemma 12 exactly in the number field ``Q(σ1)`` at a generic random rational W (σ1 irrational).

    The implicit gradient is a rational function of a symbol s standing for σ1; the closed form
    ``u vᵀ = W c cᵀ / (s cᵀc)`` uses a column c of ``adj(s² I − WᵀW)`` (which spans v's line when s² is
    a simple eigenvalue). Each entry of the difference has a numerator that must vanish at σ1: it is
    reduced modulo the minimal polynomial of σ1 (the factor of ``p(s², W)`` over Q that vanishes at
    σ1), so a zero remainder is an exact proof (error 0.0; 1.0 if any remainder is non-zero).
    Wrong variant: ``v_2 ⊗ u``, measured at 60 digits (v_2 lies outside Q(σ1))."""
    W = random_rational_matrix(m, n, seed)
    s = sp.Symbol("s", positive=True)
    grad, _ = implicit_derivatives_at(W, s, _rational)
    gram = W.T * W
    q = sp.Poly((gram.charpoly(sp.Symbol("lam")).as_expr()).subs(sp.Symbol("lam"), s**2), s)
    with mpmath.workdps(PRECISION_DIGITS):
        high = lemma12_13_high_precision(m, n, seed, wrong=True)[0]
        sigma1 = max(
            abs(x) for x in mpmath.polyroots([float(c) for c in q.all_coeffs()], maxsteps=200, extraprec=200)
        )
    minimal = min(
        (f for f, _ in sp.factor_list(q.as_expr(), s)[1]), key=lambda f: abs(complex(f.subs(s, sigma1)))
    )
    adj = (s**2 * sp.eye(n) - gram).adjugate()
    column = max(range(n), key=lambda j: float(sum(e.subs(s, sigma1) ** 2 for e in adj[:, j])))
    c = adj[:, column]
    closed = W * c * c.T / (s * (c.T * c)[0, 0])
    residues = []
    for j in range(n):
        for i in range(m):
            numerator, _ = sp.fraction(sp.together(grad[i + m * j] - closed[i, j]))
            residues.append(sp.rem(sp.Poly(sp.expand(numerator), s), sp.Poly(minimal, s)))
    # A non-zero remainder means the exact proof failed: reported as error 1.0 (far above tolerance 0).
    error = 0.0 if all(r.is_zero for r in residues) else 1.0
    if wrong:  # v_2 is not in Q(σ1): the wrong variant is measured at 60 digits
        error = high.error
    return Derivation(
        "Lemma 12",
        "∂σ1/∂vec W = v ⊗ u",
        grad,
        closed,
        error,
        0.0,
        f"exact in Q(σ1), random rational {m}x{n} (seed {seed}); "
        f"minimal polynomial degree {sp.degree(minimal, s)}",
    )


def lemma13_resolvent_algebraic(m: int, n: int, seed: int = 0, wrong: bool = False) -> Derivation:
    """Lemma 13 exactly in the number field ``Q(σ1)`` (SymPy ``AlgebraicField``) at a generic rational W.

    Compares the implicit Hessian with MATH §2's resolvent form of Lemma 13 (no σk, k ≥ 2, needed):
    ``vec(E)ᵀ H vec(E) = σ1 (y⊥ᵀ R_V y⊥ + x⊥ᵀ R_U x⊥) + 2 y⊥ᵀ R_V Wᵀ x⊥`` with ``y = Eᵀu``, ``x = E v``,
    ``R_V = (σ1² I − WᵀW + σ1² v vᵀ)⁻¹`` on v's complement (likewise R_U). Every quantity, including
    ``v vᵀ = c cᵀ / (cᵀc)`` from a column c of ``adj(σ1² I − WᵀW)``, lies in Q(σ1), so equality is exact.
    Wrong variant: the cross term ``2 y⊥ᵀ R_V Wᵀ x⊥`` dropped."""
    W = random_rational_matrix(m, n, seed)
    s, lam = sp.Symbol("s", positive=True), sp.Symbol("lam")
    q = sp.Poly((W.T * W).charpoly(lam).as_expr().subs(lam, s**2), s)
    roots = [r for f, _ in sp.factor_list(q.as_expr(), s)[1] for r in sp.Poly(f, s).real_roots()]
    sigma1 = max(roots, key=lambda r: r.evalf(30))
    K = QQ.algebraic_field(sigma1)
    S = K.from_sympy(sigma1)

    def matrix(rows, shape):
        return DomainMatrix(rows, shape, K)

    def scaled(M, a):
        return matrix([[e * a for e in row] for row in M.to_list()], M.shape)

    Wd = matrix([[K.convert(QQ(*map(int, sp.fraction(e)))) for e in row] for row in W.tolist()], (m, n))
    I_n, I_m = DomainMatrix.eye(n, K), DomainMatrix.eye(m, K)
    s2 = S * S
    adj = (scaled(I_n, s2) - Wd.transpose() * Wd).adjugate()
    col = max(
        range(n), key=lambda j: sum(abs(float(K.to_sympy(adj[i, j].element).evalf(20))) for i in range(n))
    )
    c = adj[:, col]
    u = scaled(Wd * c, K.one / S)  # unnormalised: |u|² = |c|² = cᵀc
    ctc = (c.transpose() * c)[0, 0].element
    P_v, P_u = scaled(c * c.transpose(), K.one / ctc), scaled(u * u.transpose(), K.one / ctc)
    R_V = (scaled(I_n, s2) - Wd.transpose() * Wd + scaled(P_v, s2)).inv()
    R_U = (scaled(I_m, s2) - Wd * Wd.transpose() + scaled(P_u, s2)).inv()
    d = m * n
    M_y = [[K.zero] * d for _ in range(n)]  # y = Eᵀu as a linear map of vec(E)
    M_x = [[K.zero] * d for _ in range(m)]  # x = E v
    for i in range(m):
        for j in range(n):
            M_y[j][i + m * j] = u[i, 0].element
            M_x[i][i + m * j] = c[j, 0].element
    Y = (I_n - P_v) * matrix(M_y, (n, d))
    X = (I_m - P_u) * matrix(M_x, (m, d))
    H = scaled(Y.transpose() * R_V * Y + X.transpose() * R_U * X, S)
    if not wrong:
        H = H + Y.transpose() * R_V * Wd.transpose() * X + X.transpose() * Wd * R_V * Y
    H = scaled(H, K.one / ctc).to_list()  # undo the two unnormalised vectors
    _, hess = implicit_derivatives_at(W, S, K.convert)
    differences = [hess[i][j] - H[i][j] for i in range(d) for j in range(d)]
    error = max((abs(float(K.to_sympy(x).evalf(30))) for x in differences if x != K.zero), default=0.0)
    return Derivation(
        "Lemma 13",
        "∂²σ1/∂vec W² = H (resolvent form)",
        hess,
        H,
        error,
        0.0,
        f"exact in Q(σ1) (AlgebraicField, degree {K.ext.minpoly.degree()}), "
        f"random rational {m}x{n} (seed {seed})",
    )
