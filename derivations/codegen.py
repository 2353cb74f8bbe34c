"""Generate ``lipverify/_generated.py`` from the derivations (torch-compatible scalar formulas).

Usage::

    python -m derivations.codegen           # (re)write lipverify/_generated.py
    python -m derivations.codegen --check   # exit 1 if the file on disk differs from a fresh generation

Each generated function records the derivation it comes from and the sha256 of ``sympy.srepr`` of
its source expression, so a hand edit or a stale file is caught by ``--check`` (and by the tests).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import sympy as sp
from sympy.codegen.rewriting import expm1_opt, optimize
from sympy.printing.pycode import PythonCodePrinter

from derivations import ito, moments, singular_value

TARGET = Path(__file__).resolve().parent.parent / "lipverify" / "_generated.py"


class TorchScalarPrinter(PythonCodePrinter):
    """Prints exp/expm1/log/sqrt as ``torch.*``; arithmetic stays plain Python (floats or tensors)."""

    _kf: ClassVar[dict[str, str]] = {
        "exp": "torch.exp",
        "expm1": "torch.expm1",
        "log": "torch.log",
        "sqrt": "torch.sqrt",
    }

    def __init__(self, settings=None):
        super().__init__(settings)
        self.known_functions = dict(self._kf)

    def _print_known(self, expr):
        return f"{self._kf[type(expr).__name__]}({self._print(expr.args[0])})"

    _print_exp = _print_expm1 = _print_log = _print_known

    def _print_Pow(self, expr, rational=False):
        if expr.exp == sp.S.Half:
            return f"torch.sqrt({self._print(expr.base)})"
        return super()._print_Pow(expr, rational=rational)


@dataclass(frozen=True)
class Spec:
    """One generated function: its name, docstring, source (``module.function``) and builder."""

    name: str
    doc: str
    source: str
    build: Callable[[], tuple[sp.Expr, tuple[sp.Symbol, ...]]]


def _trace_pair():
    return singular_value.trace_pair_term_symbolic()


def _trace_null():
    return singular_value.trace_null_term_symbolic()


def _log_drift():
    return ito.log_drift_combination()


def _rate():
    return ito.layer_normalisations()["normalised_rate"]


def _diffusion_sq():
    return ito.layer_normalisations()["normalised_diffusion_sq"]


def _mean():
    mean, _, (K0, D, _) = moments.theorem17_moments()
    return mean, (K0, D)


def _variance():
    return moments.theorem17_variance_from_mean()


def _layer_mean():
    mean, _, (sigma0, D, _) = moments.layer_first_order_moments()
    return mean, (sigma0, D)


def _layer_variance():
    _, var, (_, _, Phi) = moments.layer_first_order_moments()
    return var, (Phi,)


def _rescale():
    return moments.rescale_noise_term()


SPECS = (
    Spec(
        "hessian_trace_pair_term",
        "tr H term of one k = 2..r: 2 σ1 / ((σ1 − σk)(σ1 + σk)) (MATH §2, §7).",
        "derivations.singular_value.trace_pair_term_symbolic",
        _trace_pair,
    ),
    Spec(
        "hessian_trace_null_term",
        "tr H null-space term: (m + n − 2r) / σ1 (MATH §2).",
        "derivations.singular_value.trace_null_term_symbolic",
        _trace_null,
    ),
    Spec(
        "normalised_rate",
        "A layer's contribution to μ̄ or ψ̄: rate / σ (Theorem 15).",
        "derivations.ito.layer_normalisations",
        _rate,
    ),
    Spec(
        "normalised_diffusion_sq",
        "A layer's contribution to φ̄²: (φ / σ)² (Theorem 15).",
        "derivations.ito.layer_normalisations",
        _diffusion_sq,
    ),
    Spec(
        "log_bound_drift",
        "Theorem 15 drift of ln K: μ̄ + ψ̄ − φ̄²/2.",
        "derivations.ito.log_drift_combination",
        _log_drift,
    ),
    Spec(
        "bound_mean",
        "Theorem 17: E[K_t] = K0 exp(D_t), D_t = ∫(μ̄ + ψ̄) ds.",
        "derivations.moments.theorem17_moments",
        _mean,
    ),
    Spec(
        "bound_variance",
        "Theorem 17: Var[K_t] = E[K_t]² (exp(Φ_t) − 1), as expm1.",
        "derivations.moments.theorem17_variance_from_mean",
        _variance,
    ),
    Spec(
        "layer_mean",
        "Theorem 17 per layer (first order): E[σ_t] = σ0 + ∫(μ + ψ) ds.",
        "derivations.moments.layer_first_order_moments",
        _layer_mean,
    ),
    Spec(
        "layer_variance",
        "Theorem 17 per layer (first order): Var[σ_t] = ∫ φ² ds.",
        "derivations.moments.layer_first_order_moments",
        _layer_variance,
    ),
    Spec(
        "rescale_noise_term",
        "Proposition 21: a noise term (ψ, φ²) at batch size b moved to b': value · b / b'.",
        "derivations.moments.rescale_noise_term",
        _rescale,
    ),
)


def expression_hash(expr: sp.Expr) -> str:
    """sha256 of ``sympy.srepr`` of the source expression."""
    return hashlib.sha256(sp.srepr(expr).encode()).hexdigest()


def printable(expr: sp.Expr) -> sp.Expr:
    """Rewrite ``exp(x) − 1`` as ``expm1(x)`` (accuracy for small Φ)."""
    return optimize(expr, [expm1_opt])


def render_function(spec: Spec) -> str:
    expr, args = spec.build()
    printer = TorchScalarPrinter()
    body = printer.doprint(printable(expr))
    params = ", ".join(a.name for a in args)
    return (
        f"def {spec.name}({params}):\n"
        f'    """{spec.doc}\n\n'
        f"    Source: {spec.source}; sha256(srepr) = {expression_hash(expr)}\n"
        f'    """\n'
        f"    return {body}\n"
    )


def generate() -> str:
    """The full text of ``lipverify/_generated.py``."""
    header = (
        '"""GENERATED by `python -m derivations.codegen` -- do not edit; regenerate instead.\n\n'
        "Scalar formulas of arXiv 2506.18588 derived symbolically in the `derivations` package.\n"
        "Functions accept Python floats or torch tensors (torch.* only for exp/expm1/log/sqrt).\n"
        "Sources and sha256 of sympy.srepr of each source expression:\n\n"
    )
    index = "".join(f"  {s.name}: {s.source} {expression_hash(s.build()[0])}\n" for s in SPECS)
    parts = [header + index + '"""\n\nimport torch  # noqa: F401\n']
    parts += [render_function(s) for s in SPECS]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m derivations.codegen", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the generated file is stale or edited"
    )
    parser.add_argument("--output", type=Path, default=TARGET, help="file to write or check")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is out of date with the derivations; run `python -m derivations.codegen`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
