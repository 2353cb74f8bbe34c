"""A multivariate Itô-lemma engine and Theorems 14, 15, 16 (MATH sections 3-4).

For ``dX = a dt + B dW`` (X ∈ Rᵈ, a ∈ Rᵈ, B ∈ R^{d×k}) and smooth f, Itô's lemma gives
``df = (∇fᵀ a + ½ tr(Bᵀ ∇²f B)) dt + ∇fᵀ B dW``. :func:`ito` returns both parts symbolically.
Applications (each compared with the paper's closed form):

* Theorem 14: f = σ1(vec W), ``a = −η ∇L``, ``B = η Σ^{1/2}`` gives drift ``μ + ψ`` with
  ``μ = −η uᵀ∇L v``, ``ψ = (η²/2) tr(HΣ)`` and diffusion variance ``φ² = η² JᵀΣJ``;
* Theorem 15: f = Σ_l ln σ_l gives ``μ̄ + ψ̄ − ½φ̄²`` and ``φ̄``;
* Theorem 16: f = K0 exp(Y) (and f = Π σ_l) gives ``dK = K(μ̄ + ψ̄) dt + K φ̄ dB̄``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import mpmath
import sympy as sp

from derivations._result import Derivation
from derivations.singular_value import PRECISION_DIGITS, lemma13_closed_form
from lipverify._validation import LipverifyError


class ItoInputError(LipverifyError):
    """The Itô engine cannot handle the expression, or the dimensions of x, a and B disagree."""


#: Functions whose derivatives do not exist everywhere; Itô's lemma needs f ∈ C².
NON_SMOOTH = (
    sp.Abs,
    sp.Max,
    sp.Min,
    sp.sign,
    sp.Heaviside,
    sp.Piecewise,
    sp.floor,
    sp.ceiling,
    sp.DiracDelta,
)


@dataclass(frozen=True)
class ItoResult:
    """``df = drift dt + diffusion dW``; ``diffusion`` is a 1×k row.

    ``diffusion_variance = diffusion diffusionᵀ``."""

    drift: sp.Expr
    diffusion: sp.Matrix

    @property
    def diffusion_variance(self) -> sp.Expr:
        return (self.diffusion * self.diffusion.T)[0, 0]


def ito(
    f: sp.Expr, x: Sequence[sp.Symbol], a: Sequence, B: sp.Matrix, second_order: bool = True
) -> ItoResult:
    """Itô's lemma: drift ``∇fᵀa + ½ tr(Bᵀ ∇²f B)``, diffusion ``∇fᵀ B`` of f(X_t).

    ``second_order=False`` drops the ½ term (the wrong variant). Raises :class:`ItoInputError` for a
    non-smooth f (Abs, Max, Min, sign, Heaviside, Piecewise, floor, ceiling) or mismatched dimensions."""
    if isinstance(f, sp.MatrixBase) or not isinstance(sp.sympify(f), sp.Expr):
        raise ItoInputError(f"f must be a scalar SymPy expression, got {type(f).__name__}")
    f = sp.sympify(f)
    x = list(x)
    if not x or not all(isinstance(s, sp.Symbol) for s in x):
        raise ItoInputError("x must be a non-empty list of SymPy symbols")
    B = sp.Matrix(B)
    a = sp.Matrix(list(a))
    if a.shape[0] != len(x):
        raise ItoInputError(f"dimension mismatch: drift a has {a.shape[0]} entries, state x has {len(x)}")
    if B.rows != len(x):
        raise ItoInputError(f"dimension mismatch: diffusion B has {B.rows} rows, state x has {len(x)}")
    bad = sorted(
        {type(e).__name__ for e in f.atoms(*NON_SMOOTH)} | ({"Piecewise"} if f.has(sp.Piecewise) else set())
    )
    if bad:
        raise ItoInputError(
            f"f is not twice continuously differentiable (contains {', '.join(bad)}); "
            "Itô's lemma needs f ∈ C²"
        )
    grad = sp.Matrix([sp.diff(f, s) for s in x])
    drift = (grad.T * a)[0, 0]
    if second_order:
        hess = sp.hessian(f, x)
        drift += sp.Rational(1, 2) * (B.T * hess * B).trace()
    return ItoResult(drift=drift, diffusion=grad.T * B)


def sigma1_2x2(entries: Sequence[sp.Symbol]) -> sp.Expr:
    """Closed form σ1 of a 2×2 ``[[w11, w12], [w21, w22]]`` (entries column-major).

    ``σ1 = sqrt((T + sqrt(T² − 4δ²))/2)``, T = ‖W‖_F², δ = det W."""
    w11, w21, w12, w22 = entries
    T = w11**2 + w12**2 + w21**2 + w22**2
    delta = w11 * w22 - w12 * w21
    return sp.sqrt((T + sp.sqrt(T**2 - 4 * delta**2)) / 2)


def theorem14_general(d: int = 3, second_order: bool = True) -> Derivation:
    """Theorem 14's structure identically, for an unspecified smooth σ(θ), θ ∈ Rᵈ, symbolic ∇L and Σ^{1/2}.

    Engine drift equals ``−η Jᵀ∇L + (η²/2) tr(HΣ)`` with ``J = ∇σ``, ``H = ∇²σ``, ``Σ = Σ^{1/2}Σ^{1/2}``;
    diffusion variance equals ``η² JᵀΣJ``. Wrong variant: second-order term dropped."""
    theta = sp.symbols(f"theta1:{d + 1}")
    eta = sp.Symbol("eta", positive=True)
    sigma = sp.Function("sigma")(*theta)
    grad_L = sp.Matrix(sp.symbols(f"g1:{d + 1}"))
    S = sp.Matrix(d, d, lambda i, j: sp.Symbol(f"s{min(i, j) + 1}{max(i, j) + 1}"))
    res = ito(sigma, theta, -eta * grad_L, eta * S, second_order=second_order)
    J = sp.Matrix([sp.diff(sigma, t) for t in theta])
    H = sp.hessian(sigma, theta)
    Sigma = S * S
    mu = -eta * (J.T * grad_L)[0, 0]
    psi = eta**2 / 2 * (H * Sigma).trace()
    phi_sq = eta**2 * (J.T * Sigma * J)[0, 0]
    drift_diff = sp.expand(res.drift - (mu + psi))
    var_diff = sp.expand(res.diffusion_variance - phi_sq)
    error = 0.0 if drift_diff == 0 and var_diff == 0 else _generic_value(drift_diff + var_diff, theta)
    return Derivation(
        "Theorem 14",
        "dσ1 = (μ + ψ) dt + φ dB̃",
        res,
        (mu + psi, phi_sq),
        error,
        0.0,
        "identical (symbolic σ, ∇L, Σ^{1/2})",
    )


def _generic_value(expr: sp.Expr, theta) -> float:
    """|expr| at a generic point, with σ replaced by a concrete smooth function."""
    concrete = expr.replace(sp.Function("sigma"), lambda *args: sp.exp(sum(args) / 3) + args[0] ** 2)
    concrete = concrete.doit()
    free = sorted(concrete.free_symbols, key=str)
    rng = random.Random(7)
    point = {s: sp.Rational(rng.randint(1, 9), rng.randint(2, 7)) for s in free}
    return abs(float(concrete.subs(point).evalf(30)))


def theorem14_sigma1_2x2(seed: int = 0, second_order: bool = True) -> Derivation:
    """Theorem 14 for σ1 of a 2×2 W at random rational W, ∇L, Σ^{1/2}, at 60 digits.

    The engine is applied to the closed-form σ1(vec W); ``μ = −η uᵀ∇L v``, ``ψ = (η²/2) tr(HΣ)`` with
    the Lemma 13 closed-form H, ``φ² = η² (v⊗u)ᵀ Σ (v⊗u)`` use mpmath's SVD. Wrong variant: ½ term dropped."""
    rng = random.Random(seed)
    w = sp.symbols("w11 w21 w12 w22")
    eta = sp.Rational(1, 10)
    W = [sp.Rational(rng.randint(-9, 9), rng.randint(1, 4)) for _ in range(4)]
    G = [sp.Rational(rng.randint(-9, 9), rng.randint(1, 4)) for _ in range(4)]
    S = sp.Matrix(4, 4, lambda i, j: 0)
    for i in range(4):
        for j in range(i, 4):
            S[i, j] = S[j, i] = sp.Rational(rng.randint(-5, 5), rng.randint(1, 4))
    res = ito(sigma1_2x2(w), w, [-eta * g for g in G], eta * S, second_order=second_order)
    point = dict(zip(w, W, strict=True))
    with mpmath.workdps(PRECISION_DIGITS):
        drift = mpmath.mpf(str(res.drift.subs(point).evalf(PRECISION_DIGITS + 10)))
        variance = mpmath.mpf(str(res.diffusion_variance.subs(point).evalf(PRECISION_DIGITS + 10)))
        Wm = mpmath.matrix([[_mp(W[0]), _mp(W[2])], [_mp(W[1]), _mp(W[3])]])
        U, Sv, Vt = mpmath.svd_r(Wm, full_matrices=True, compute_uv=True)
        U_cols = [[U[i, k] for i in range(2)] for k in range(2)]
        V_cols = [[Vt[k, j] for j in range(2)] for k in range(2)]
        sigma = [Sv[0], Sv[1]]
        Gm = mpmath.matrix([[_mp(G[0]), _mp(G[2])], [_mp(G[1]), _mp(G[3])]])
        u, v = mpmath.matrix(U_cols[0]), mpmath.matrix(V_cols[0])
        mu = -_mp(eta) * (u.T * Gm * v)[0]
        Sm = mpmath.matrix([[_mp(S[i, j]) for j in range(4)] for i in range(4)])
        Sigma = Sm * Sm
        H = mpmath.matrix(lemma13_closed_form(U_cols, sigma, V_cols))
        psi = _mp(eta) ** 2 / 2 * sum((H * Sigma)[i, i] for i in range(4))
        J = mpmath.matrix([V_cols[0][j] * U_cols[0][i] for j in range(2) for i in range(2)])
        phi_sq = _mp(eta) ** 2 * (J.T * Sigma * J)[0]
        error = max(abs(drift - (mu + psi)), abs(variance - phi_sq))
    return Derivation(
        "Theorem 14",
        "μ = −η uᵀ∇L v, ψ = (η²/2) tr(HΣ), φ² = η² JᵀΣJ",
        (drift, variance),
        (mu + psi, phi_sq),
        float(error),
        1e-40,
        f"{PRECISION_DIGITS}-digit evaluation at a random rational 2x2 (seed {seed})",
    )


def _mp(q) -> mpmath.mpf:
    q = sp.Rational(q)
    return mpmath.mpf(int(q.p)) / int(q.q)


def _layer_symbols(layers: int):
    sig = sp.symbols(f"sigma1:{layers + 1}", positive=True)
    mu = sp.symbols(f"mu1:{layers + 1}", real=True)
    psi = sp.symbols(f"psi1:{layers + 1}", nonnegative=True)
    phi = sp.symbols(f"phi1:{layers + 1}", nonnegative=True)
    return sig, mu, psi, phi


def _identity_error(difference: sp.Expr) -> float:
    difference = sp.simplify(difference)
    if difference == 0:
        return 0.0
    rng = random.Random(3)
    point = {
        s: sp.Rational(rng.randint(1, 9), rng.randint(2, 5)) for s in sorted(difference.free_symbols, key=str)
    }
    return abs(float(difference.subs(point).evalf(30)))


def log_bound_ito(layers: int = 3, second_order: bool = True) -> ItoResult:
    """The engine on ``ln K = Σ_l ln σ_l`` with independent layer noises.

    Each layer follows Theorem 14: ``dσ_l = (μ_l + ψ_l) dt + φ_l dB_l``."""
    sig, mu, psi, phi = _layer_symbols(layers)
    f = sum(sp.log(s) for s in sig)
    return ito(
        f, sig, [m + p for m, p in zip(mu, psi, strict=True)], sp.diag(*phi), second_order=second_order
    )


def theorem15(layers: int = 3, second_order: bool = True) -> Derivation:
    """Theorem 15 identically: ``d ln K = (μ̄ + ψ̄ − ½φ̄²) dt + φ̄ dB̄`` with ``μ̄ = Σ μ_l/σ_l``,
    ``ψ̄ = Σ ψ_l/σ_l``, ``φ̄² = Σ φ_l²/σ_l²``. Wrong variant: ½ term dropped."""
    sig, mu, psi, phi = _layer_symbols(layers)
    res = log_bound_ito(layers, second_order)
    mu_bar = sum(m / s for m, s in zip(mu, sig, strict=True))
    psi_bar = sum(p / s for p, s in zip(psi, sig, strict=True))
    phi_sq_bar = sum(p**2 / s**2 for p, s in zip(phi, sig, strict=True))
    closed = mu_bar + psi_bar - phi_sq_bar / 2
    error = max(_identity_error(res.drift - closed), _identity_error(res.diffusion_variance - phi_sq_bar))
    return Derivation(
        "Theorem 15", "d ln K = (μ̄ + ψ̄ − ½φ̄²) dt + φ̄ dB̄", res, (closed, phi_sq_bar), error, 0.0, "identical"
    )


def log_drift_combination() -> tuple[sp.Expr, tuple[sp.Symbol, ...]]:
    """``μ̄ + ψ̄ − ½φ̄²`` with its coefficients read off the engine's drift of Σ ln σ_l (Theorem 15).

    The coefficient of μ̄ is ``σ_1 ∂drift/∂μ_1``, of ψ̄ ``σ_1 ∂drift/∂ψ_1``, of φ̄² ``σ_1² ∂drift/∂(φ_1²)``;
    each must be layer-independent (asserted)."""
    sig, mu, psi, phi = _layer_symbols(2)
    drift = log_bound_ito(2).drift
    p2 = sp.Symbol("p2")
    coeffs = []
    for ell in range(2):
        c_mu = sp.simplify(sig[ell] * sp.diff(drift, mu[ell]))
        c_psi = sp.simplify(sig[ell] * sp.diff(drift, psi[ell]))
        c_phi = sp.simplify(sig[ell] ** 2 * sp.diff(drift.subs(phi[ell] ** 2, p2), p2))
        coeffs.append((c_mu, c_psi, c_phi))
    if coeffs[0] != coeffs[1] or any(c.free_symbols for c in coeffs[0]):
        raise AssertionError(f"log-drift coefficients depend on the layer: {coeffs}")
    mu_bar, psi_bar, phi_sq_bar = sp.symbols("mu_bar psi_bar phi_sq_bar", real=True)
    c_mu, c_psi, c_phi = coeffs[0]
    return c_mu * mu_bar + c_psi * psi_bar + c_phi * phi_sq_bar, (mu_bar, psi_bar, phi_sq_bar)


def layer_normalisations() -> dict[str, tuple[sp.Expr, tuple[sp.Symbol, ...]]]:
    """Per-layer contributions to μ̄, ψ̄ (``rate · ∂ ln σ/∂σ = rate/σ``) and φ̄² (``(φ ∂ ln σ/∂σ)²``),
    read off the engine applied to ln σ of one layer."""
    sigma, rate, phi = (
        sp.Symbol("sigma", positive=True),
        sp.Symbol("rate", real=True),
        sp.Symbol("phi", nonnegative=True),
    )
    res = ito(sp.log(sigma), [sigma], [rate], sp.Matrix([[phi]]))
    return {
        "normalised_rate": (sp.diff(res.drift, rate) * rate, (rate, sigma)),
        "normalised_diffusion_sq": (res.diffusion_variance, (phi, sigma)),
    }


def theorem16(layers: int = 3, second_order: bool = True) -> tuple[Derivation, Derivation]:
    """Theorem 16 identically, two ways: the engine on ``K = K0 exp(Y)`` with ``dY`` from Theorem 15, and on
    ``K = Π σ_l`` with Theorem 14 layers; both must give ``dK = K(μ̄ + ψ̄) dt + K φ̄ dB̄``. Wrong variant:
    the ½ term dropped in the engine (the exponential form then misses ``½Kφ̄²``)."""
    sig, mu, psi, phi = _layer_symbols(layers)
    K0, Y = sp.Symbol("K0", positive=True), sp.Symbol("Y", real=True)
    mu_bar = sum(m / s for m, s in zip(mu, sig, strict=True))
    psi_bar = sum(p / s for p, s in zip(psi, sig, strict=True))
    phi_sq_bar = sum(p**2 / s**2 for p, s in zip(phi, sig, strict=True))
    exp_form = ito(
        K0 * sp.exp(Y),
        [Y],
        [mu_bar + psi_bar - phi_sq_bar / 2],
        sp.Matrix([[sp.sqrt(phi_sq_bar)]]),
        second_order,
    )
    K_exp = K0 * sp.exp(Y)
    err_exp = max(
        _identity_error(exp_form.drift - K_exp * (mu_bar + psi_bar)),
        _identity_error(exp_form.diffusion_variance - K_exp**2 * phi_sq_bar),
    )
    K_prod = sp.prod(sig)
    prod_form = ito(K_prod, sig, [m + p for m, p in zip(mu, psi, strict=True)], sp.diag(*phi), second_order)
    err_prod = max(
        _identity_error(prod_form.drift - K_prod * (mu_bar + psi_bar)),
        _identity_error(prod_form.diffusion_variance - K_prod**2 * phi_sq_bar),
    )
    statement = "dK = K(μ̄ + ψ̄) dt + K φ̄ dB̄"
    return (
        Derivation(
            "Theorem 16",
            statement,
            exp_form,
            K_exp * (mu_bar + psi_bar),
            err_exp,
            0.0,
            "identical, K = K0 exp(Y)",
        ),
        Derivation(
            "Theorem 16",
            statement,
            prod_form,
            K_prod * (mu_bar + psi_bar),
            err_prod,
            0.0,
            "identical, K = Π σ_l",
        ),
    )
