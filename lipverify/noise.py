"""Mini-batch gradient noise: Propositions 5 (unbiased estimator), 6 (split), 7 (low-rank root).

Per-sample gradients ``G`` have shape (b, m, n) (matrices, vectorised column-major) or (b, d)
(already vectorised). ``G_hat`` below is the centred (b, d) matrix ``g_i - g_bar`` (the transpose of
MATH's d x b matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipverify._validation import (
    SUPPORTED_DTYPES,
    LipverifyError,
    all_finite,
    check_batch_size,
    check_population,
    compute_dtype,
)

#: Largest d for which a dense (d, d) covariance is materialised.
MAX_DENSE_COVARIANCE_DIM = 8192


def _flat(G: torch.Tensor, name: str = "G") -> torch.Tensor:
    """(b, m, n) or (b, d) -> (b, d), column-major vec; validates b, dtype and finiteness."""
    if not isinstance(G, torch.Tensor):
        raise LipverifyError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dtype not in SUPPORTED_DTYPES:
        raise LipverifyError(f"{name} has unsupported dtype {G.dtype}")
    if G.ndim == 3:
        G = G.transpose(-1, -2).reshape(G.shape[0], -1)
    elif G.ndim != 2:
        raise LipverifyError(f"{name} must have shape (b, m, n) or (b, d), got {tuple(G.shape)}")
    check_batch_size(G.shape[0])
    if not all_finite(G):
        raise LipverifyError(f"{name} contains non-finite entries (inf or NaN)")
    return G


def centred(G: torch.Tensor) -> torch.Tensor:
    """``G_hat``: per-sample gradients minus their batch mean, shape (b, d). Centred before any
    projection to avoid float32 cancellation (MATH section 7)."""
    Gf = _flat(G)
    return Gf - Gf.mean(0, keepdim=True)


def _finite_result(result: torch.Tensor, what: str, Gc: torch.Tensor) -> torch.Tensor:
    """``result``, or a :class:`LipverifyError` when products of the gradients overflow their dtype
    (e.g. float16 entries above 256 squared past 65504): never an inf/NaN returned silently."""
    if not all_finite(result):
        raise LipverifyError(
            f"{what} overflows {Gc.dtype} (largest centred gradient entry {float(Gc.abs().max()):.3g}); "
            "pass the gradients in float32/float64 or rescale them"
        )
    return result


def estimator_scale(b: int, population_size: int | None = None) -> float:
    """The factor ``(1 - b/N) / (b (b - 1))`` multiplying ``G_hat^T G_hat`` in Proposition 5."""
    check_batch_size(b)
    return check_population(b, population_size) / (b * (b - 1))


def _check_dense(d: int) -> None:
    if d > MAX_DENSE_COVARIANCE_DIM:
        raise LipverifyError(
            f"dense covariance of dimension d = {d} exceeds the limit {MAX_DENSE_COVARIANCE_DIM}; "
            "use noise_sqrt(G) or the projections in lipverify.dynamics"
        )


def batch_noise_covariance(G: torch.Tensor, population_size: int | None = None) -> torch.Tensor:
    """Proposition 5: ``Sigma_hat = G_hat^T G_hat / (b (b - 1))``, shape (d, d).

    Unbiased for ``Sigma = Cov[g_bar] = C / b`` under sampling with replacement; with
    ``population_size = N`` (sampling without replacement) multiplied by ``(1 - b/N)``.
    """
    Gc = centred(G)
    _check_dense(Gc.shape[1])
    return _finite_result(Gc.T @ Gc * estimator_scale(Gc.shape[0], population_size), "Sigma_hat", Gc)


def variance_covariance_split(
    G: torch.Tensor, population_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposition 6: ``(variance, covariance)`` with ``variance = diag(Sigma_hat)`` (d,) computed as
    ``(G_hat * G_hat)^T 1_b / (b (b - 1))`` in O(b d), and ``covariance = Sigma_hat - Diag(variance)``
    (d, d, zero diagonal, not PSD in general)."""
    Gc = centred(G)
    scale = estimator_scale(Gc.shape[0], population_size)
    variance = _finite_result((Gc * Gc).sum(0) * scale, "the variance part", Gc)
    _check_dense(Gc.shape[1])
    covariance = _finite_result(Gc.T @ Gc * scale, "the covariance part", Gc)
    covariance.diagonal().zero_()
    return variance, covariance


@dataclass(frozen=True)
class NoiseSqrt:
    """Proposition 7: ``Sigma_hat^{1/2} = G_hat^T Q Lambda^{+1/2} Q^T G_hat * sqrt(scale)``.

    ``G_hat G_hat^T = Q Lambda Q^T`` is the (b, b) Gram matrix (same non-zero spectrum as the d x d
    product); only eigenvalues above a relative cut-off are inverted, so rank <= b - 1 is handled.
    Applying the root costs O(d b); nothing of size d x d is formed unless :meth:`matrix` is called.
    """

    centred_grads: torch.Tensor  # (b, d)
    core: torch.Tensor  # (b, b): Q_+ Lambda_+^{-1/2} Q_+^T
    scale: float  # (1 - b/N) / (b (b - 1))
    rank: int

    @property
    def dim(self) -> int:
        return self.centred_grads.shape[1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``Sigma_hat^{1/2} x`` for x of shape (..., d)."""
        if x.shape[-1] != self.dim:
            raise LipverifyError(
                f"shape mismatch: vector of length {x.shape[-1]}, noise dimension d = {self.dim}"
            )
        Gc = self.centred_grads
        return ((x.to(Gc.dtype) @ Gc.T) @ self.core) @ Gc * math.sqrt(self.scale)

    def matrix(self) -> torch.Tensor:
        """The dense symmetric root, shape (d, d); small d only."""
        _check_dense(self.dim)
        Gc = self.centred_grads
        return Gc.T @ self.core @ Gc * math.sqrt(self.scale)

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` draws with the law of ``Sigma_hat^{1/2} xi``, xi ~ N(0, I_d), as
        ``G_hat^T zeta sqrt(scale)``, zeta ~ N(0, I_b): cheaper, same law, not the symmetric root."""
        Gc = self.centred_grads
        zeta = torch.randn(num, Gc.shape[0], dtype=Gc.dtype, device=Gc.device, generator=generator)
        return zeta @ Gc * math.sqrt(self.scale)


def noise_sqrt(G: torch.Tensor, population_size: int | None = None, rtol: float | None = None) -> NoiseSqrt:
    """Proposition 7 low-rank symmetric square root of ``Sigma_hat`` (see :class:`NoiseSqrt`).

    ``rtol`` is the relative eigenvalue cut-off (default ``10 b eps`` of the dtype). Half precisions
    are computed in float32 (no half-precision eigh on CPU; the root's tensors are float32).
    Gradients whose Gram matrix overflows the dtype raise :class:`LipverifyError`; all-zero
    gradients give rank 0."""
    Gf = _flat(G)
    Gc = centred(Gf.to(compute_dtype(Gf.dtype)))  # no half-precision eigh on CPU
    b = Gc.shape[0]
    gram = _finite_result(Gc @ Gc.T, "the Gram matrix G_hat G_hat^T", Gc)
    lam, Q = torch.linalg.eigh(gram)
    if rtol is None:
        rtol = b * torch.finfo(Gc.dtype).eps * 10
    keep = lam > rtol * lam.abs().max().clamp_min(torch.finfo(Gc.dtype).tiny)
    Qk = Q[:, keep]
    core = (Qk * lam[keep].rsqrt()) @ Qk.T
    return NoiseSqrt(
        centred_grads=Gc, core=core, scale=estimator_scale(b, population_size), rank=int(keep.sum())
    )
