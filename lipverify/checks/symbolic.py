"""Symbolic checks (SymPy / exact / 60-digit): one or more per result of MATH section 8.

Each check runs a derivation from the ``derivations`` package and its deliberately wrong variant;
``max_error`` is the derivation's error (0 for identically or exactly equal), ``wrong_error`` the same
measure for the wrong variant.
"""

from __future__ import annotations

import functools

from derivations import ito, moments, noise, singular_value
from lipverify.verification import Comparison, register

KIND = "symbolic"


def _compare(correct, wrong, wrong_variant: str) -> Comparison:
    return Comparison(
        max_error=correct.error,
        tolerance=correct.tolerance,
        wrong_variant=wrong_variant,
        wrong_error=wrong.error,
        details=correct.method,
    )


def _worst(pairs, wrong_variant: str) -> Comparison:
    """Combine several (correct, wrong) derivations: worst correct error, smallest wrong error."""
    correct = max((c for c, _ in pairs), key=lambda d: d.error)
    wrong = min((w for _, w in pairs), key=lambda d: d.error)
    details = "; ".join(sorted({c.method for c, _ in pairs}))
    return Comparison(correct.error, correct.tolerance, wrong_variant, wrong.error, details)


SHAPES = ((2, 3), (3, 2), (3, 3), (3, 4), (4, 3))


@register("Lemma 12", KIND, "∂σ1/∂vec W = v ⊗ u, identically for a symbolic 2×2")
def lemma12_symbolic_2x2() -> Comparison:
    """Lemma 12: implicit derivative of det(λI − WᵀW) = v ⊗ u, symbolic 2×2"""
    return _compare(
        singular_value.lemma12_symbolic_2x2(),
        singular_value.lemma12_symbolic_2x2(wrong=True),
        "v_2 ⊗ u (wrong singular vector)",
    )


@functools.cache
def _rational_results() -> list[tuple[tuple, tuple]]:
    """(correct, wrong) exact and 60-digit derivations per shape; each holds (Lemma 12, Lemma 13),
    so the two checks share one computation."""
    exact = [
        (singular_value.lemma12_13_exact(*s), singular_value.lemma12_13_exact(*s, wrong=True)) for s in SHAPES
    ]
    high = [
        (
            singular_value.lemma12_13_high_precision(*s),
            singular_value.lemma12_13_high_precision(*s, wrong=True),
        )
        for s in SHAPES
    ]
    return exact + high


def _rational_pairs(index: int) -> list[tuple]:
    """(correct, wrong) pairs for Lemma 12 (index 0) or Lemma 13 (index 1)."""
    return [(good[index], bad[index]) for good, bad in _rational_results()]


@register(
    "Lemma 12",
    KIND,
    "∂σ1/∂vec W = v ⊗ u, exact (rational SVD) and 60-digit (generic rational), up to 3×4 and 4×3",
)
def lemma12_rational() -> Comparison:
    """Lemma 12: exact and 60-digit comparison at rational matrices up to 3×4 / 4×3"""
    return _worst(_rational_pairs(0), "v_2 ⊗ u (wrong singular vector)")


@register(
    "Lemma 12", KIND, "∂σ1/∂vec W = v ⊗ u exactly in Q(σ1) at generic rational matrices up to 3×4 and 4×3"
)
def lemma12_algebraic() -> Comparison:
    """Lemma 12: exact in the number field Q(σ1), remainder modulo the minimal polynomial"""
    pairs = [
        (singular_value.lemma12_algebraic(*s), singular_value.lemma12_algebraic(*s, wrong=True))
        for s in SHAPES
    ]
    return _worst(pairs, "v_2 ⊗ u (wrong singular vector)")


@register("Lemma 13", KIND, "∂²σ1/∂vec W² = H (Lemma 13), identically for a symbolic 2×2")
def lemma13_symbolic_2x2() -> Comparison:
    """Lemma 13: implicit second derivative = closed-form H, symbolic 2×2"""
    return _compare(
        singular_value.lemma13_symbolic_2x2(),
        singular_value.lemma13_symbolic_2x2(wrong=True),
        "σk cross term dropped",
    )


@register("Lemma 13", KIND, "∂²σ1/∂vec W² = H, exact and 60-digit at rational matrices up to 3×4 and 4×3")
def lemma13_rational() -> Comparison:
    """Lemma 13: exact and 60-digit comparison at rational matrices up to 3×4 / 4×3"""
    return _worst(_rational_pairs(1), "σk cross term dropped")


@register("Lemma 13", KIND, "Lemma 13 (resolvent form) exactly in Q(σ1) at generic rational 2×3, 3×2, 3×3")
def lemma13_algebraic() -> Comparison:
    """Lemma 13: exact in the number field Q(σ1) against the resolvent form, small shapes"""
    pairs = [
        (
            singular_value.lemma13_resolvent_algebraic(*s),
            singular_value.lemma13_resolvent_algebraic(*s, wrong=True),
        )
        for s in ((2, 3), (3, 2), (3, 3))
    ]
    return _worst(pairs, "cross term 2 y⊥ᵀ R_V Wᵀ x⊥ dropped")


@register(
    "Lemma 13",
    KIND,
    "Lemma 13 (resolvent form) exactly in Q(σ1) at generic rational 3×4, 4×3",
    exhaustive=True,
)
def lemma13_algebraic_large() -> Comparison:
    """Lemma 13: exact in the number field Q(σ1) against the resolvent form, 3×4 and 4×3"""
    pairs = [
        (
            singular_value.lemma13_resolvent_algebraic(*s),
            singular_value.lemma13_resolvent_algebraic(*s, wrong=True),
        )
        for s in ((3, 4), (4, 3))
    ]
    return _worst(pairs, "cross term 2 y⊥ᵀ R_V Wᵀ x⊥ dropped")


@register(
    "tr H / eigenvalues of H",
    KIND,
    "tr H = Σ 2σ1/((σ1−σk)(σ1+σk)) + (m+n−2r)/σ1, identically for a symbolic 2×2",
)
def trace_symbolic_2x2() -> Comparison:
    """tr H: trace of the implicit Hessian, symbolic 2×2"""
    return _compare(
        singular_value.trace_symbolic_2x2(),
        singular_value.trace_symbolic_2x2(wrong=True),
        "denominator σ1² + σk²",
    )


@register(
    "tr H / eigenvalues of H",
    KIND,
    "spectrum of H = {1/(σ1∓σk), 1/σ1 ×(m+n−2r), 0} and tr H, exact up to 3×4/4×3",
)
def hessian_spectrum_exact() -> Comparison:
    """Eigenvalues (exact characteristic polynomial) and trace of the implicit Hessian"""
    pairs = []
    for s in SHAPES:
        correct, wrong = (
            singular_value.hessian_spectrum_exact(*s),
            singular_value.hessian_spectrum_exact(*s, wrong=True),
        )
        pairs += list(zip(correct, wrong, strict=True))
    return _worst(pairs, "eigenvalues 1/(σ1² − σk²), trace denominator σ1² + σk²")


@register("tr H / eigenvalues of H", KIND, "spectrum of H at generic rational matrices, 60 digits")
def hessian_spectrum_high_precision() -> Comparison:
    """Eigenvalues of the implicit Hessian at generic rational matrices (60 digits)"""
    pairs = [
        (
            singular_value.lemma12_13_high_precision(*s)[2],
            singular_value.lemma12_13_high_precision(*s, wrong=True)[2],
        )
        for s in SHAPES
    ]
    return _worst(pairs, "eigenvalues 1/(σ1² − σk²)")


@register(
    "Proposition 5", KIND, "E[Σ̂] = Cov[ḡ] over all ordered samples (b = 2, 3; with and without replacement)"
)
def proposition5_all_samples() -> Comparison:
    """Proposition 5: exact expectation over every ordered sample of a symbolic population"""
    pairs = [
        (noise.proposition5(N, b, rep), noise.proposition5(N, b, rep, wrong=True))
        for N, b, rep in ((3, 2, True), (3, 3, True), (4, 2, False), (4, 3, False))
    ]
    return _worst(pairs, "biased ĜĜᵀ/b² (with replacement); no (1 − b/N) factor (without)")


@register("Proposition 6", KIND, "diag Σ̂ = (Ĝ⊙Ĝ)1/(b(b−1)) identically; off-diagonal part not PSD")
def proposition6_split() -> Comparison:
    """Proposition 6: variance vector identity (symbolic b = 3)"""
    (diag, not_psd), (wrong_diag, _) = noise.proposition6(), noise.proposition6(wrong=True)
    c = _compare(diag, wrong_diag, "squares of the uncentred G")
    return Comparison(
        max(c.max_error, not_psd.error),
        c.tolerance,
        c.wrong_variant,
        c.wrong_error,
        f"{c.details}; off-diagonal min eigenvalue {not_psd.derived:.3g}",
    )


@register(
    "Proposition 7",
    KIND,
    "Σ̂^{1/2} = ĜQΛ^{+1/2}QᵀĜᵀ/sqrt(b(b−1)) is symmetric and squares to Σ̂ (symbolic b = 2)",
)
def proposition7_symbolic() -> Comparison:
    """Proposition 7: low-rank root squares to Σ̂, symbolic b = 2"""
    return _compare(
        noise.proposition7(2), noise.proposition7(2, wrong=True), "scale 1/(b(b−1)) instead of its root"
    )


@register("Proposition 7", KIND, "low-rank root squares to Σ̂, exact radicals, b = 3", exhaustive=True)
def proposition7_b3() -> Comparison:
    """Proposition 7: low-rank root squares to Σ̂, b = 3 at a rational sample (exact radicals)"""
    return _compare(
        noise.proposition7(3, seed=1),
        noise.proposition7(3, seed=1, wrong=True),
        "scale 1/(b(b−1)) instead of its root",
    )


@register(
    "Theorem 14",
    KIND,
    "Itô engine on σ(θ): drift −ηJᵀ∇L + (η²/2)tr(HΣ), diffusion variance η²JᵀΣJ (symbolic)",
)
def theorem14_general() -> Comparison:
    """Theorem 14: Itô engine on an unspecified smooth σ(θ), θ ∈ R³"""
    return _compare(
        ito.theorem14_general(), ito.theorem14_general(second_order=False), "½ tr(BᵀHB) Itô term dropped"
    )


@register(
    "Theorem 14",
    KIND,
    "Itô engine on σ1 of a 2×2: μ + ψ and φ² against Lemmas 12-13 closed forms (60 digits)",
)
def theorem14_sigma1() -> Comparison:
    """Theorem 14: Itô engine on the closed-form σ1 of a 2×2 at random rational points"""
    pairs = [
        (ito.theorem14_sigma1_2x2(seed), ito.theorem14_sigma1_2x2(seed, second_order=False))
        for seed in range(3)
    ]
    return _worst(pairs, "½ tr(BᵀHB) Itô term dropped")


@register("Theorem 15", KIND, "Itô engine on Σ ln σ_l: d ln K = (μ̄ + ψ̄ − ½φ̄²) dt + φ̄ dB̄ identically")
def theorem15_log_bound() -> Comparison:
    """Theorem 15: Itô engine on ln K = Σ_l ln σ_l (3 layers)"""
    return _compare(ito.theorem15(), ito.theorem15(second_order=False), "½ Itô term dropped")


@register("Theorem 16", KIND, "Itô engine on K0 exp(Y) and on Π σ_l: dK = K(μ̄ + ψ̄) dt + Kφ̄ dB̄ identically")
def theorem16_bound() -> Comparison:
    """Theorem 16: Itô engine on K = K0 exp(Y) and K = Π σ_l"""
    exp_form, prod_form = ito.theorem16()
    wrong_exp, _ = ito.theorem16(second_order=False)
    return Comparison(
        max(exp_form.error, prod_form.error),
        0.0,
        "½ Itô term dropped (exponential form)",
        wrong_exp.error,
        "identical; K0 exp(Y) and Π σ_l agree",
    )


@register("Lemma 19", KIND, "MGF of Σ φ_i ΔB_i = exp(z² Σφ_i²Δ/2) (sympy.stats) and Riemann sum → ∫φ²")
def lemma19_mgf() -> Comparison:
    """Lemma 19: MGF of a Wiener integral with time-dependent φ"""
    pairs = [
        (moments.lemma19_piecewise(), moments.lemma19_piecewise(wrong=True)),
        (moments.lemma19_riemann_limit(), moments.lemma19_riemann_limit(wrong=True)),
    ]
    return _worst(pairs, "(∫φ)²/t in place of ∫φ²")


@register("Theorem 17", KIND, "E[K_t] = K0 e^{D}, Var[K_t] = E[K_t]²(e^Φ − 1) via sympy.stats")
def theorem17_moments() -> Comparison:
    """Theorem 17: mean and variance of K_t from the Lemma 19 MGF"""
    return _worst(
        list(zip(moments.theorem17(), moments.theorem17(wrong=True), strict=True)),
        "−Φ/2 Itô correction dropped",
    )


@register("Proposition 20", KIND, "tr(HΣ) = ‖AᵀC‖² ≥ 0 for H, Σ ⪰ 0; E[K_t] grows at rate ψ̄ when μ̄ = 0")
def proposition20_sign() -> Comparison:
    """Proposition 20: ψ ≥ 0 (sum of squares) and growth of E[K_t] near convergence"""
    pairs = [
        (moments.proposition20(2), moments.proposition20(2, wrong=True)),
        (moments.proposition20(3), moments.proposition20(3, wrong=True)),
        (moments.proposition20_growth(), moments.proposition20_growth(wrong=True)),
    ]
    return _worst(pairs, "indefinite H; Itô-free mean")


@register("Proposition 21", KIND, "Var[K_t]/E[K_t]² = c/b + O(b⁻²); std ∝ b^{-1/2} (series in 1/b)")
def proposition21_series() -> Comparison:
    """Proposition 21: series of Var[K_t] in 1/b"""
    return _worst(
        list(zip(moments.proposition21(), moments.proposition21(wrong=True), strict=True)), "biased Σ = C/b²"
    )
