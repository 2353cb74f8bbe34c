"""SymPy derivations that establish the formulas of MATH sections 2-5 (arXiv 2506.18588).

Modules: :mod:`derivations.singular_value` (Lemmas 12, 13, tr H), :mod:`derivations.conv_norm`
(complex Lemmas 12, 13 for sigma_1 of a conv layer's transfer matrix, issue 16), :mod:`derivations.ito`
(Itô-lemma engine, Theorems 14-16), :mod:`derivations.moments` (Lemma 19, Theorem 17,
Propositions 20, 21), :mod:`derivations.noise` (Propositions 5-7), :mod:`derivations.conv_operator`
(the DFT block-diagonalises a circular conv: the basis of :mod:`lipverify.conv`) and
:mod:`derivations.codegen`
(``python -m derivations.codegen`` writes ``lipverify/_generated.py`` from these derivations).
Every derivation returns a :class:`Derivation`: the derived object, the closed form it is
compared with, and the error of that comparison.
"""

from derivations._result import Derivation

__all__ = ["Derivation"]
