"""One-step discrete truth kernels of :meth:`lipverify.probe.DynamicsProbe.after_step` (MATH section 3):
an update's projections on W_t's top singular pair, and whether the update is too large for the
second-order expansion to hold (``|Delta W|_2 >= gap / 2``), decided on the host or on the device."""

from __future__ import annotations

import math

import torch

from lipverify import _linalg
from lipverify.probe.resolvent import ResolventSpectrum
from lipverify.spectral import SpectralDecomposition


def _top_pair_projections(
    dec: SpectralDecomposition | ResolventSpectrum, M: torch.Tensor, buffer: torch.Tensor | None = None
):
    """``(M^T u, M v)`` of an (m, n) matrix ``M`` (any layout that reshapes to it) in the dtype of ``dec``;
    ``buffer`` (m, n) in that dtype: where the cast of M goes (else a new tensor)."""
    M = M.reshape(dec.shape)
    if M.dtype != dec.u.dtype:
        M = M.to(dec.u.dtype) if buffer is None else buffer.copy_(M)
    return M.T @ dec.u, M @ dec.v


def update_exceeds_gap(dW: torch.Tensor, gap: float, power_steps: int = 8) -> bool:
    """``|dW|_2 >= gap / 2`` for an update dW (m, n) and the gap ``sigma_1 - sigma_2`` of W_t.

    Decided without the spectral norm where possible: ``|dW|_F < gap / 2`` gives False (the Frobenius
    norm bounds the spectral norm from above); ``|dW x| >= gap / 2`` for a unit x from a few power
    steps on ``dW^T dW`` gives True (a lower bound). Otherwise ``(gap / 2)^2 I - D``, D the smaller
    Gram matrix of dW (k, k), is positive definite iff ``|dW|_2 < gap / 2``: one Gram product and one
    Cholesky factorisation (:mod:`lipverify._linalg`; on one CPU thread scipy's ``syrk``/``potrf``)
    decide, as on the device route (:func:`_exceeds_gap_on_device`), at a fraction of a full SVD's
    cost. At the boundary (``|dW|_2 = gap / 2`` to rounding) either answer may come out. Nothing
    certifies the update as small for a gap that is not positive (or NaN) or a dW with inf or NaN
    entries: True.
    """
    half = 0.5 * gap
    if not half > 0:  # a zero, negative or NaN gap: nothing certifies the update as small
        return True
    frobenius = float(torch.linalg.matrix_norm(dW))
    if frobenius < half:
        return False
    if not math.isfinite(frobenius):  # inf or NaN in dW: not certified small (the device route agrees)
        return True
    x = dW[torch.argmax(torch.linalg.vector_norm(dW, dim=1))]  # largest row: dW x != 0
    for _ in range(power_steps):
        x = x / torch.linalg.vector_norm(x)
        dWx = dW @ x
        if float(torch.linalg.vector_norm(dWx)) >= half:
            return True
        x = dW.T @ dWx
    return _linalg.shifted_cholesky(_linalg.gram(dW), half * half) is None


def _exceeds_gap_on_device(dW: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """:func:`update_exceeds_gap` without a host read: ``|dW|_2 >= gap / 2`` iff
    ``(gap / 2)^2 I - D`` is not positive definite, D the smaller Gram matrix of dW (k, k); decided
    by the ``info`` of its Cholesky factorisation, kept on the device (0-d bool). At the boundary
    (``|dW|_2 = gap / 2`` to rounding) either answer may come out, as on the host route. ``gap``: a
    spectrum's ``sigma_1 - sigma_2`` (>= 0; NaN and a dW with inf or NaN entries give True)."""
    m, n = dW.shape
    D = dW @ dW.mT if m <= n else dW.mT @ dW
    half = 0.5 * gap
    eye = torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    _, info = torch.linalg.cholesky_ex((half * half) * eye - D)
    return info != 0
