"""Complex Lemmas 12 and 13: derivatives of σ1 of a complex matrix A(W), linear in a real W.

Why: under the circular model a Conv2d's operator norm is ``max_f σ1(Ŵ_f)`` and ``W ↦ Ŵ_f`` is a
real-linear map into complex ``c_out × c_in`` matrices (lipverify.conv_dynamics). For a complex A
(m × n) with simple σ1 > σ2 and top pair ``A v = σ1 u``, and a complex direction E:

* (a) complex Lemma 12: ``dσ1 = Re(uᴴ E v)``;
* (b) complex Lemma 13, with ``a_k = uᴴ E v_k``, ``c_k = u_kᴴ E v`` (so ``a_1 = c_1 = uᴴ E v``):

  ``d²σ1[E, E] = Σ_{k=2..r} [σ1 (|a_k|² + |c_k|²) + 2 σk Re(a_k c_k)] / (σ1² − σk²)
               + (Σ_{k>r} |a_k|² + Σ_{j>r} |c_j|²) / σ1 + Im(a_1)² / σ1``.

Derivation (done directly in complex form): σ1 is the top eigenvalue of the Hermitian dilation
``B = [[0, A], [Aᴴ, 0]]`` with eigenvector ``w = (u; v)/√2``; the other eigenpairs are
``±σk`` with ``(u_k; ±v_k)/√2`` (k ≤ r, including ``−σ1`` with ``(u; −v)/√2``) and 0 with
``(u_j; 0)``, ``(0; v_k)`` (j, k > r). Rayleigh–Schrödinger for the Hermitian perturbation
``F = [[0, E], [Eᴴ, 0]]``: ``λ' = wᴴ F w = Re(uᴴ E v)`` and ``λ'' = 2 Σ_{w'} |w'ᴴ F w|² / (σ1 − λ_{w'})``.
With ``w'ᴴ F w = (c_k ± conj(a_k))/2`` the pair k ≥ 2 gives the first sum (|c ± ā|² = |a|² + |c|² ±
2 Re(a c)); the zero eigenvalues give the null-space terms; the partner ``−σ1`` (distance 2σ1) gives
``|c_1 − conj(a_1)|²/(4σ1) = Im(a_1)²/σ1``: the complex correction, absent for real A and E (then
this is MATH's Lemma 13). Phase invariance: ``(u_k, v_k) → e^{iθ}(u_k, v_k)`` leaves a_k c_k, |a_k|,
|c_k| and Im(a_1) unchanged.

Checks here (the test file runs them and their wrong variants):

1. identically in SymPy for a symbolic 1 × n complex row (σ1 = ‖a‖: the null-space and Im terms);
2. at 60 digits for random rational complex m × n (2×2, 2×3, 3×2): implicit differentiation of
   ``p(λ) = det(λ I − M)``, M the smaller Gram matrix (A Aᴴ or Aᴴ A; its characteristic polynomial has
   real coefficients), with respect to the 2mn real parameters ``(Re A, Im A)``; nothing there uses
   a singular vector;
3. the real case: for real A and real E the closed form equals MATH's Lemma 12/13
   (derivations.singular_value's closed forms);
4. the real 2m × 2n embedding ``[[Re A, −Im A], [Im A, Re A]]`` has the singular values of A, each
   twice: it confirms σ1 but its top is degenerate (σ1 = σ2 there), so real Lemma 13 cannot be applied
   to it; that is why (b) is derived in complex form.

Wrong variants: Jacobian ``|uᴴ E v|`` (dropping the real part) and ``Re(uᵀ E v)`` (u not conjugated);
Hessian without the ``Im(a_1)²/σ1`` term (real Lemma 13 read with moduli) and on real parts only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import mpmath
import numpy as np
import sympy as sp

from derivations import singular_value as sv
from derivations._result import Derivation

PRECISION_DIGITS = 60
HIGH_PRECISION_TOLERANCE = 1e-40

JACOBIAN_VARIANTS = ("complex", "modulus", "unconjugated")
HESSIAN_VARIANTS = ("complex", "real_formula", "real_parts")

# ---------------------------------------------------------------------------------------------
# Closed forms for any number type with conjugate/re/im (SymPy expressions, mpmath mpc)
# ---------------------------------------------------------------------------------------------


def _ops(kind: str):
    if kind == "sympy":
        return sp.conjugate, sp.re, sp.im, sp.sqrt
    return mpmath.conj, mpmath.re, mpmath.im, mpmath.sqrt


def jacobian_closed_form(
    u: Sequence, v: Sequence, E: Sequence[Sequence], variant: str = "complex", kind: str = "mp"
):
    """Complex Lemma 12 ``Re(uᴴ E v)``; ``variant`` ``"modulus"`` gives ``|uᴴ E v|``, ``"unconjugated"``
    ``Re(uᵀ E v)`` (both wrong)."""
    conj, re, im, sqrt = _ops(kind)
    m, n = len(u), len(v)
    left = [conj(u[i]) if variant != "unconjugated" else u[i] for i in range(m)]
    z = sum(left[i] * E[i][j] * v[j] for i in range(m) for j in range(n))
    if variant == "modulus":
        return sqrt(re(z) ** 2 + im(z) ** 2)
    return re(z)


def hessian_form_closed_form(
    U_cols: Sequence[Sequence],
    sigma: Sequence,
    V_cols: Sequence[Sequence],
    E: Sequence[Sequence],
    variant: str = "complex",
    kind: str = "mp",
):
    """Complex Lemma 13 ``d²σ1[E, E]`` from thin bases (r = min(m, n) columns of U and V; the null-space
    parts are residual norms ``‖uᴴE‖² − Σ_{k≤r}|a_k|²`` and ``‖Ev‖² − Σ_{k≤r}|c_k|²``).

    ``variant="real_formula"`` drops ``Im(a_1)²/σ1``; ``"real_parts"`` uses Re a_k, Re c_k and the real
    parts of the residuals (both wrong)."""
    conj, re, im, _ = _ops(kind)
    r = len(sigma)
    m, n = len(U_cols[0]), len(V_cols[0])
    u, v = U_cols[0], V_cols[0]
    left = [sum(conj(u[i]) * E[i][j] for i in range(m)) for j in range(n)]  # uᴴE
    right = [sum(E[i][j] * v[j] for j in range(n)) for i in range(m)]  # E v
    a = [sum(left[j] * V_cols[k][j] for j in range(n)) for k in range(r)]
    c = [sum(conj(U_cols[k][i]) * right[i] for i in range(m)) for k in range(r)]
    res_left = [left[j] - sum(a[k] * conj(V_cols[k][j]) for k in range(r)) for j in range(n)]
    res_right = [right[i] - sum(c[k] * U_cols[k][i] for k in range(r)) for i in range(m)]

    def sq(z):
        return re(z) ** 2 if variant == "real_parts" else re(z) ** 2 + im(z) ** 2

    def cross(x, y):
        return re(x) * re(y) if variant == "real_parts" else re(x * y)

    s1 = sigma[0]
    total = 0
    for k in range(1, r):
        sk = sigma[k]
        total += (s1 * (sq(a[k]) + sq(c[k])) + 2 * sk * cross(a[k], c[k])) / ((s1 - sk) * (s1 + sk))
    null = sum(sq(z) for z in res_left) + sum(sq(z) for z in res_right)
    if variant == "complex":
        null += im(a[0]) ** 2
    elif variant not in ("real_formula", "real_parts"):
        raise ValueError(f"unknown variant {variant!r}")
    return total + null / s1


# ---------------------------------------------------------------------------------------------
# Real parametrisation: p = (Re A row-major, Im A row-major), 2mn parameters
# ---------------------------------------------------------------------------------------------


def basis_direction(m: int, n: int, index: int, one=1, imag_unit=sp.I) -> list[list]:
    """The complex direction ``∂A/∂p_index``: ``e_ij`` for ``p = Re A_ij``, ``i e_ij`` for ``Im A_ij``."""
    E = [[0 * one for _ in range(n)] for _ in range(m)]
    i, j = divmod(index % (m * n), n)
    E[i][j] = one if index < m * n else imag_unit * one
    return E


def closed_form_derivatives(
    U_cols, sigma, V_cols, m: int, n: int, jac_variant="complex", hess_variant="complex"
):
    """Gradient (2mn,) and Hessian (2mn × 2mn) in the real parameters from the closed forms
    (Hessian entries by polarisation ``(q(E_p + E_q) − q(E_p − E_q)) / 4``), in mpmath."""
    d = 2 * m * n
    one, I = mpmath.mpf(1), mpmath.mpc(0, 1)
    dirs = [basis_direction(m, n, p, one, I) for p in range(d)]
    u, v = U_cols[0], V_cols[0]
    grad = [jacobian_closed_form(u, v, E, jac_variant) for E in dirs]

    def q(E):
        return hessian_form_closed_form(U_cols, sigma, V_cols, E, hess_variant)

    hess = [[mpmath.mpf(0)] * d for _ in range(d)]
    for p in range(d):
        for s in range(p, d):
            plus = [[dirs[p][i][j] + dirs[s][i][j] for j in range(n)] for i in range(m)]
            minus = [[dirs[p][i][j] - dirs[s][i][j] for j in range(n)] for i in range(m)]
            hess[p][s] = hess[s][p] = (q(plus) - q(minus)) / 4
    return grad, hess


def characteristic_polynomial(m: int, n: int):
    """``p(λ, x, y) = det(λ I − M)``, M = A Aᴴ (m ≤ n) or Aᴴ A, A = X + iY in 2mn real symbols; a real
    polynomial (M Hermitian). Returns (p, λ, params) with params in the order of :func:`basis_direction`."""
    xs = sp.symbols(f"x0:{m * n}", real=True)
    ys = sp.symbols(f"y0:{m * n}", real=True)
    lam = sp.Symbol("lam", real=True)
    A = sp.Matrix(m, n, [xs[k] + sp.I * ys[k] for k in range(m * n)])
    M = A * A.H if m <= n else A.H * A
    p = sp.expand((lam * sp.eye(M.shape[0]) - M).det(method="berkowitz"))
    p = sp.expand(sp.re(p))  # the imaginary part is identically 0 (checked in implicit_derivatives)
    return p, lam, list(xs) + list(ys)


def implicit_derivatives_function(m: int, n: int, module: str = "mpmath") -> Callable:
    """Lambdified implicit derivatives of σ1 in the 2mn real parameters: returns ``f(params, σ1)`` →
    ``(grad list, hess nested list)``. ``λ_i = −p_i / p_λ``, ``λ_ij = −(p_ij + p_iλ λ_j + p_jλ λ_i +
    p_λλ λ_i λ_j) / p_λ``, ``σ_i = λ_i / (2σ1)``, ``σ_ij = λ_ij / (2σ1) − λ_i λ_j / (4σ1³)``.
    ``module="numpy"`` gives a float64 version for the tests of the torch kernels."""
    p, lam, params = characteristic_polynomial(m, n)
    d = len(params)
    p_l, p_ll = sp.diff(p, lam), sp.diff(p, lam, 2)
    p_i = [sp.diff(p, w) for w in params]
    p_il = [sp.diff(e, lam) for e in p_i]
    p_ij = [[sp.diff(p_i[i], params[j]) for j in range(d)] for i in range(d)]
    f = sp.lambdify([params, lam], [p_l, p_ll, p_i, p_il, p_ij], modules=module)

    def derivatives(values, sigma1):
        L, LL, Pi, Pil, Pij = f(list(values), sigma1**2)
        lam_i = [-Pi[i] / L for i in range(d)]
        grad = [lam_i[i] / (2 * sigma1) for i in range(d)]
        hess = [[None] * d for _ in range(d)]
        for i in range(d):
            for j in range(d):
                lam_ij = -(Pij[i][j] + Pil[i] * lam_i[j] + Pil[j] * lam_i[i] + LL * lam_i[i] * lam_i[j]) / L
                hess[i][j] = lam_ij / (2 * sigma1) - lam_i[i] * lam_i[j] / (4 * sigma1**3)
        return grad, hess

    return derivatives


# ---------------------------------------------------------------------------------------------
# 1. Identically, 1 × n
# ---------------------------------------------------------------------------------------------


def symbolic_row(
    n: int = 2, jac_variant: str = "complex", hess_variant: str = "complex"
) -> tuple[Derivation, Derivation]:
    """σ1 of a symbolic complex row a (1 × n) is ``‖a‖``; its exact gradient and Hessian in (Re a, Im a)
    against the closed forms with ``u = (3 + 4i)/5`` (a non-trivial phase), ``v = u conj(a)ᵀ/‖a‖``.
    Error 0.0 when the difference simplifies to 0 identically; else its size at a rational point."""
    xs = sp.symbols(f"x0:{n}", real=True)
    ys = sp.symbols(f"y0:{n}", real=True)
    params = list(xs) + list(ys)
    a = [xs[k] + sp.I * ys[k] for k in range(n)]
    norm_sq = sum(x**2 + y**2 for x, y in zip(xs, ys, strict=True))
    s1 = sp.sqrt(norm_sq)
    S = sp.Symbol("S", positive=True)  # stands for σ1 = sqrt(norm_sq); reduced modulo S² − norm_sq below
    grad = [sp.diff(s1, w).subs(norm_sq, S**2) for w in params]
    hess = sp.hessian(s1, params).subs(norm_sq, S**2)
    u = sp.Rational(3, 5) + sp.Rational(4, 5) * sp.I
    v = [u * sp.conjugate(a[k]) / S for k in range(n)]
    # the closed form's null part is a residual norm (r = 1): no orthonormal completion of v needed
    dirs = [basis_direction(1, n, p) for p in range(2 * n)]
    J = [jacobian_closed_form([u], v, E, jac_variant, kind="sympy") for E in dirs]
    e = sp.symbols(f"e0:{2 * n}", real=True)
    E = [[e[k] + sp.I * e[n + k] for k in range(n)]]
    q = hessian_form_closed_form([[u]], [S], [v], E, hess_variant, kind="sympy")
    q_derived = sum(hess[i, j] * e[i] * e[j] for i in range(2 * n) for j in range(2 * n))
    rng = random.Random(7)
    point = {w: sp.Rational(rng.randint(1, 9), 7) for w in params}
    point.update({ek: sp.Rational(k + 2, 5) for k, ek in enumerate(e)})
    point[S] = sp.sqrt(norm_sq.subs(point))

    def error(diff_exprs) -> float:
        worst = 0.0
        for x in diff_exprs:
            x = sp.expand_complex(x)
            if x.has(sp.Abs):  # the "modulus" variant is not polynomial: measure it at the point
                worst = max(worst, abs(float(sp.N(x.subs(point), 30))))
                continue
            num = sp.numer(sp.together(sp.expand(x)))
            residue = sp.rem(sp.Poly(sp.expand(num), S), sp.Poly(S**2 - norm_sq, S)).as_expr()
            residue = sp.expand(residue)
            if residue != 0:
                worst = max(worst, abs(float(sp.N(x.subs(point), 30))))
        return worst

    err_j = error([g - c for g, c in zip(grad, J, strict=True)])
    err_h = error([q_derived - q])
    method = f"SymPy, identically in (Re a, Im a) of a symbolic 1x{n} row, u = (3+4i)/5"
    return (
        Derivation(
            "complex Lemma 12", "dσ1 = Re(uᴴ E v)", grad, J, err_j, 0.0, method, f"variant {jac_variant}"
        ),
        Derivation(
            "complex Lemma 13",
            "d²σ1[E,E] closed form",
            q_derived,
            q,
            err_h,
            0.0,
            method,
            f"variant {hess_variant}",
        ),
    )


# ---------------------------------------------------------------------------------------------
# 2. 60 digits at random rational complex matrices
# ---------------------------------------------------------------------------------------------


def random_complex_rational(m: int, n: int, seed: int) -> list[list[sp.Rational]]:
    """Parameters (Re row-major, Im row-major) of a random rational complex m × n matrix."""
    rng = random.Random(seed)
    return [sp.Rational(rng.randint(-9, 9), rng.randint(1, 5)) for _ in range(2 * m * n)]


def _mp_svd(values, m: int, n: int):
    A = mpmath.matrix(m, n)
    for i in range(m):
        for j in range(n):
            k = i * n + j
            A[i, j] = mpmath.mpc(sv._mp_number(values[k]), sv._mp_number(values[m * n + k]))
    U, S, Vh = mpmath.svd_c(A, full_matrices=False, compute_uv=True)
    r = min(m, n)
    U_cols = [[U[i, k] for i in range(m)] for k in range(r)]
    V_cols = [[mpmath.conj(Vh[k, j]) for j in range(n)] for k in range(r)]
    return A, U_cols, [S[k] for k in range(r)], V_cols


def high_precision(
    m: int, n: int, seed: int = 0, jac_variant: str = "complex", hess_variant: str = "complex"
) -> tuple[Derivation, Derivation]:
    """Complex Lemma 12/13 at a random rational complex m × n, 60 digits: implicit derivatives of the
    characteristic polynomial (no singular vectors) against the closed forms (mpmath's complex SVD)."""
    values = random_complex_rational(m, n, seed)
    derivatives = implicit_derivatives_function(m, n)
    with mpmath.workdps(PRECISION_DIGITS):
        _, U_cols, sigma, V_cols = _mp_svd(values, m, n)
        mp_values = [sv._mp_number(v) for v in values]
        grad, hess = derivatives(mp_values, sigma[0])
        J, H = closed_form_derivatives(U_cols, sigma, V_cols, m, n, jac_variant, hess_variant)
        err_j = max(abs(g - c) for g, c in zip(grad, J, strict=True))
        err_h = max(abs(h - c) for hr, cr in zip(hess, H, strict=True) for h, c in zip(hr, cr, strict=True))
    method = (
        f"{PRECISION_DIGITS}-digit implicit differentiation of det(λI − M) at a random rational complex "
        f"{m}x{n} (seed {seed})"
    )
    tol = HIGH_PRECISION_TOLERANCE
    return (
        Derivation("complex Lemma 12", "dσ1 = Re(uᴴ E v)", grad, J, float(err_j), tol, method, jac_variant),
        Derivation("complex Lemma 13", "d²σ1[E,E]", hess, H, float(err_h), tol, method, hess_variant),
    )


# ---------------------------------------------------------------------------------------------
# 3. Real case, 4. real embedding
# ---------------------------------------------------------------------------------------------


def real_case(m: int, n: int, seed: int = 0, wrong_reference: bool = False) -> tuple[Derivation, Derivation]:
    """For real A and real directions the complex closed forms against MATH's Lemma 12 (``v ⊗ u``) and
    Lemma 13 (derivations.singular_value.lemma13_closed_form), 60 digits, over all real directions
    ``e_p + e_s``. ``wrong_reference=True`` compares with Lemma 13 without its cross term and with
    ``v_2 ⊗ u`` (singular_value's wrong variants) to show the comparison can fail."""
    W = sv.random_rational_matrix(m, n, seed)
    with mpmath.workdps(PRECISION_DIGITS):
        Wm = mpmath.matrix([[sv._mp_number(sp.Rational(W[i, j])) for j in range(n)] for i in range(m)])
        U, S, Vt = mpmath.svd_r(Wm, full_matrices=True, compute_uv=True)
        r = min(m, n)
        U_full = [[U[i, k] for i in range(m)] for k in range(m)]
        V_full = [[Vt[k, j] for j in range(n)] for k in range(n)]
        sigma = [S[k] for k in range(r)]
        J_real = sv.lemma12_closed_form(U_full, V_full, right_index=int(wrong_reference))  # column-major vec
        H_real = sv.lemma13_closed_form(U_full, sigma, V_full, drop_cross_term=wrong_reference)
        d = m * n
        errs_j, errs_h = [], []
        for p in range(d):
            j, i = divmod(p, m)  # column-major index of W[i, j]
            E = [[mpmath.mpf(int(a == i and b == j)) for b in range(n)] for a in range(m)]
            errs_j.append(abs(jacobian_closed_form(U_full[0], V_full[0], E) - J_real[p]))
        for p in range(d):
            for s in range(p, d):
                jp, ip = divmod(p, m)
                js, is_ = divmod(s, m)
                E = [
                    [mpmath.mpf(int(a == ip and b == jp) + int(a == is_ and b == js)) for b in range(n)]
                    for a in range(m)
                ]
                q = hessian_form_closed_form(U_full[:r], sigma, V_full[:r], E)
                errs_h.append(abs(q - (H_real[p][p] + H_real[s][s] + 2 * H_real[p][s])))
    method = (
        f"{PRECISION_DIGITS}-digit mpmath at a random rational real {m}x{n} (seed {seed}), all E = e_p + e_s"
    )
    tol = HIGH_PRECISION_TOLERANCE
    return (
        Derivation(
            "complex Lemma 12, real case", "Re(uᴴ E v) = uᵀ E v", None, None, float(max(errs_j)), tol, method
        ),
        Derivation(
            "complex Lemma 13, real case", "= real Lemma 13", None, None, float(max(errs_h)), tol, method
        ),
    )


def real_embedding(m: int, n: int, seed: int = 0, assume_doubled: bool = True) -> Derivation:
    """σ of ``[[Re A, −Im A], [Im A, Re A]]`` (2m × 2n) are those of A, each twice: compares the
    embedding's top two with σ1(A), σ1(A). ``assume_doubled=False`` (wrong: an embedding with a simple
    top) compares them with σ1(A), σ2(A). Also shows the embedding violates Assumption 11."""
    values = random_complex_rational(m, n, seed)
    with mpmath.workdps(PRECISION_DIGITS):
        A, _, sigma, _ = _mp_svd(values, m, n)
        R = mpmath.matrix(2 * m, 2 * n)
        for i in range(m):
            for j in range(n):
                x, y = mpmath.re(A[i, j]), mpmath.im(A[i, j])
                R[i, j], R[i, n + j], R[m + i, j], R[m + i, n + j] = x, -y, y, x
        S = mpmath.svd_r(R, compute_uv=False)
        emb = sorted([S[k] for k in range(2 * min(m, n))], reverse=True)
        expected = [sigma[0], sigma[0]] if assume_doubled else [sigma[0], sigma[1]]
        err = max(abs(emb[0] - expected[0]), abs(emb[1] - expected[1]))
    return Derivation(
        "real embedding",
        "σ(embedding) = σ(A) twice: top doubled",
        [emb[0], emb[1]],
        expected,
        float(err),
        HIGH_PRECISION_TOLERANCE,
        f"{PRECISION_DIGITS}-digit mpmath SVD of the 2m x 2n real embedding, random rational complex {m}x{n}",
        "the embedding's σ1 = σ2: real Lemma 13 divides by σ1² − σ2² = 0 there, so it checks σ1 only",
    )


def lambdified_derivatives(m: int, n: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """float64 gradient (2mn,) and Hessian (2mn, 2mn) in (Re A, Im A) row-major from the lambdified
    implicit derivation; σ1 from numpy's SVD. For the tests of lipverify.conv_dynamics."""
    derivatives = implicit_derivatives_function(m, n, module="numpy")

    def at(A: np.ndarray):
        A = np.asarray(A, dtype=np.complex128)
        sigma1 = float(np.linalg.svd(A, compute_uv=False)[0])
        grad, hess = derivatives(np.concatenate([A.real.ravel(), A.imag.ravel()]).tolist(), sigma1)
        return np.array(grad, dtype=float), np.array(hess, dtype=float)

    return at
