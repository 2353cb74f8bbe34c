"""The resolvent spectrum algorithm of the dynamics probe (MATH section 2): sigma_1, u, v, sigma_2 and
the Cholesky factor of the deflated ``s1^2 I - W W^T + s1^2 u u^T`` from a warm-started block
iteration on the smaller Gram matrix, and the full Gram-route thin SVD (:func:`fast_decompose`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lipverify import _linalg
from lipverify.spectral import (
    SpectralDecomposition,
    decompose,
    separation_tolerance,
    with_canonical_sign,
)


def fast_decompose(W: torch.Tensor, dtype: torch.dtype, name: str = "W") -> SpectralDecomposition:
    """Thin SVD of ``W`` (m, n) in ``dtype`` via the eigendecomposition of the smaller Gram matrix.

    ``W W^T = U diag(s^2) U^T`` (m <= n) and ``V = W^T U / s`` (or the transpose). 3-5x faster than
    ``torch.linalg.svd`` on CPU; falls back to :func:`lipverify.spectral.decompose` when the smallest
    singular value is below ``1e-4 sigma_1`` (where ``W^T U / s`` loses digits). Same sign
    convention as ``decompose``.
    """
    Wc = W.to(dtype)
    m, n = Wc.shape
    if not bool(torch.isfinite(Wc).all()):
        return decompose(Wc, name)  # raises the named error
    tall = m > n
    gram = Wc.T @ Wc if tall else Wc @ Wc.T
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    if not bool(evals[-1] > (1e-4**2) * evals[0]):
        return decompose(Wc, name)
    s = evals.sqrt()
    other = (Wc @ evecs if tall else Wc.T @ evecs) / s
    U, V = (other, evecs) if tall else (evecs, other)
    return with_canonical_sign(U, s, V)


@dataclass(frozen=True)
class ResolventSpectrum:
    """What the resolvent form of Lemma 13 needs (MATH section 2), without a full decomposition.

    With ``k = min(m, n)`` (the smaller Gram side) and ``w = u`` (m <= n, ``G = W W^T``) or
    ``w = v`` (m > n, ``G = W^T W``): ``L`` (k, k) is the lower Cholesky factor of the deflated
    matrix ``A = s1^2 I_k - G + s1^2 w w^T``. A's eigenvalues are ``s1^2`` (on w) and
    ``s1^2 - s_j^2`` (j = 2..k), so A is SPD iff ``s1 > s2``, and on the complement of w
    ``A^{-1}`` is the pseudo-inverse ``R_U = (s1^2 I - W W^T)^+`` (resp. ``R_V``).

    ``W``: (m, n) snapshot in the compute dtype; ``u`` (m,), ``v`` (n,), ``s1``, ``s2``: 0-d
    tensors, same dtype; ``basis``: (k, p) Ritz vectors of G for the top p eigenvalues (the warm
    start of the next step). Duck-types the parts of :class:`SpectralDecomposition` the probe uses
    (``sigma1``, ``u``, ``v``, ``gap``, ``shape``).
    """

    W: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    factor: torch.Tensor = field(repr=False)
    basis: torch.Tensor = field(repr=False)

    @property
    def L(self) -> torch.Tensor:
        """The lower Cholesky factor (``factor`` holds it in its lower triangle; its upper triangle is
        LAPACK workspace, never read)."""
        return torch.tril(self.factor)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    @property
    def sigma1(self) -> torch.Tensor:
        return self.s1

    @property
    def sigma(self) -> torch.Tensor:
        """``(sigma_1, sigma_2)`` only (the rest of the spectrum is not computed)."""
        return torch.stack([self.s1, self.s2])

    @property
    def gap(self) -> torch.Tensor:
        return self.s1 - self.s2

    @property
    def relative_gap(self) -> torch.Tensor:
        return self.gap / self.s1

    @property
    def tall(self) -> bool:
        return self.W.shape[0] > self.W.shape[1]

    def quadratic_form(
        self, y: torch.Tensor, x: torch.Tensor, weight_times_y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Lemma 13 ``q_H(E)`` from ``y = E^T u`` (..., n) and ``x = E v`` (..., m) -> (...,).

        MATH section 2: ``q = s1 (y_perp^T R_V y_perp + x_perp^T R_U x_perp) + 2 y_perp^T R_V W^T x_perp``
        with ``y_perp = y - (v^T y) v``, ``x_perp = x - (u^T x) u``. For m <= n the push-through
        identity ``R_V y_perp = s1^{-2} (y_perp + W^T A^{-1} W y_perp)`` (``W y_perp`` is orthogonal to u
        since ``u^T W y_perp = s1 v^T y_perp = 0``) and ``W R_V y_perp = A^{-1} W y_perp`` turn it into

        ``q = (|y_perp|^2 + |L^{-1} (W y_perp + s1 x_perp)|^2) / s1``

        (one triangular solve, a sum of squares: no cancellation, q >= 0 as H is PSD). For m > n
        the mirror image ``q = (|x_perp|^2 + |L^{-1} (W^T x_perp + s1 y_perp)|^2) / s1``.

        ``weight_times_y`` (m <= n only): ``W y`` (..., m) when the caller has it (the probe takes it
        from a Linear layer's forward output); then ``W y_perp = W y - s1 (v^T y) u`` costs no product
        with W.
        """
        u, v, s1 = self.u, self.v, self.s1
        yv = y @ v
        yp = y - yv.unsqueeze(-1) * v
        xp = x - (x @ u).unsqueeze(-1) * u
        if self.tall:
            rhs = xp @ self.W + s1 * yp  # (..., n)
            outside = (xp * xp).sum(-1)
        else:
            if weight_times_y is None:
                rhs = yp @ self.W.T + s1 * xp  # (..., m)
            else:
                rhs = weight_times_y - (s1 * yv).unsqueeze(-1) * u + s1 * xp
            outside = (yp * yp).sum(-1)
        k = rhs.shape[-1]
        z = _linalg.solve_lower(self.factor, rhs.reshape(-1, k).T)  # (k, N)
        return (outside + (z * z).sum(0).reshape(rhs.shape[:-1])) / s1

    def hessian_trace(self) -> torch.Tensor:
        """``tr H = s1 (tr R_U + tr R_V) = 2 s1 tr R_k + (m + n - 2k) / s1`` with
        ``tr R_k = tr A^{-1} - 1/s1^2 = |L^{-1}|_F^2 - 1/s1^2`` (MATH section 2, k = min(m, n))."""
        m, n = self.shape
        k = min(m, n)
        eye = torch.eye(k, dtype=self.factor.dtype, device=self.factor.device)
        Linv = _linalg.solve_lower(self.factor, eye)
        tr_r = (Linv * Linv).sum() - 1.0 / (self.s1 * self.s1)
        return 2 * self.s1 * tr_r + (m + n - 2 * k) / self.s1


#: Block size (Ritz vectors carried between steps) and iteration cap of :func:`resolvent_spectrum`.
RESOLVENT_BLOCK = 4
RESOLVENT_MAX_ITER = 25
#: Thick restart of the shift-invert block Krylov subspace at this many blocks.
RESOLVENT_MAX_DIM = 10
#: Smaller sides up to this size take G's full eigendecomposition instead of the iteration
#: (at k <= 64 ``eigh`` costs less than the iteration's fixed per-step work).
RESOLVENT_DIRECT_K = 64


def resolvent_spectrum(
    W: torch.Tensor,
    dtype: torch.dtype,
    basis: torch.Tensor,
    max_iter: int = RESOLVENT_MAX_ITER,
    direct_k: int = RESOLVENT_DIRECT_K,
) -> tuple[ResolventSpectrum | None, int]:
    """sigma_1, u, v, sigma_2 and the deflated Cholesky factor of W (m, n) from a warm start.

    ``basis`` (k, p), k = min(m, n), p >= 2: approximate top eigenvectors of the smaller Gram matrix
    G (e.g. the previous step's :attr:`ResolventSpectrum.basis`). All in ``dtype``. G is formed once
    with ``syrk``; on CPU the dense kernels run through scipy's BLAS/LAPACK (:mod:`lipverify._linalg`).

    ``k <= direct_k``: G's full ``eigh`` gives the top pair and lambda_2 (0 iterations).

    Phase 1 (sigma_1, u, v): block inverse iteration with the Cholesky factor of ``s I - G``, s
    slightly above lambda_1 (a successful factorisation certifies ``s > lambda_1``; the margin is at
    least ``1e-2 (theta_1 - theta_2)``, so the top vector converges by ~1e-2 per iteration), with
    Rayleigh-Ritz on G each iteration. It stops when the residual ``r_1 = |G z_1 - theta_1 z_1|`` is at
    the rounding floor ``2 eps theta_1``, or below ``16 sqrt(k) eps theta_1`` and no longer decreasing
    (stagnation at the floor); the eigenvector error is then ``r_1 / (lambda_1 - lambda_2)``, as for a
    full ``eigh`` of the same G. ``sigma_1 = |W^T u|`` (or ``|W v|``), the other vector by
    ``W^T u / sigma_1``. Then the deflated ``A`` of :class:`ResolventSpectrum` is factorised.

    Phase 2 (sigma_2): block Krylov subspace of ``A^{-1}`` on the complement of u (its largest
    eigenvalue is ``1 / (lambda_1 - lambda_2)``), Rayleigh-Ritz on G, until
    ``r_2 <= 1e-8 theta_1 sqrt(eps / eps_64)``: the Ritz value error is ``<= r_2^2 / sep`` (sep: the
    distance to the rest of the spectrum), i.e. ``sigma_2`` to ~1e-16 relative for separations down
    to ~1e-6 theta_1 in float64.

    Returns ``(spectrum, iterations)``, or ``(None, iterations)`` when the iteration did not
    converge within ``max_iter``, a factorisation failed, or ``s1^2 - lambda_2 <= 2
    separation_tolerance(k) s1^2`` (s1 = s2 to working precision, whichever way the factorisation of
    the then singular deflated A rounded); the caller falls back to the full decomposition, which
    raises :class:`~lipverify.DegenerateSpectrumError` on the same tolerance.
    """
    with _linalg.single_threaded_blas(W.device):  # threadpoolctl only for CPU tensors
        return _resolvent_spectrum(W, dtype, basis, max_iter, direct_k)


def _resolvent_spectrum(
    W: torch.Tensor, dtype: torch.dtype, basis: torch.Tensor, max_iter: int, direct_k: int
) -> tuple[ResolventSpectrum | None, int]:
    Wc = W.to(dtype)
    if Wc.data_ptr() == W.data_ptr():
        Wc = Wc.clone()  # the spectrum keeps W_t; the optimiser updates the parameter in place
    G = _linalg.gram(Wc)  # lower triangle
    k = G.shape[0]
    p = basis.shape[1]
    eps = torch.finfo(dtype).eps
    if k <= direct_k:
        evals, evecs = torch.linalg.eigh(G)  # reads the lower triangle
        evals, evecs = evals.flip(0), evecs.flip(1)
        z1, it = evecs[:, 0], 0
    else:
        z1, Z, lam1, it = _top_eigenvector(G, basis.to(dtype), eps, max_iter)
        if z1 is None:
            return None, it
    top = _top_pair(Wc, z1)
    s1sq = float(top[2]) ** 2
    L = _linalg.shifted_cholesky(G, s1sq, top[3], s1sq)  # the deflated A
    if L is None:
        return None, it
    if k <= direct_k:
        lam2, X = evals[1], evecs[:, 1:p]
    else:
        lam2, X, it2 = _second_eigenvalue(G, L, top[3], Z[:, 1:], lam1, eps, max_iter)
        it += it2
        X = X[:, : p - 1]
    # sigma_1 = sigma_2 to working precision: decided from the spectrum with the same tolerance as
    # the full decomposition (2 x relative gap, on squares), not by whether the Cholesky of the
    # singular deflated A happened to fail (a rounding coin flip of the kernel)
    if lam2 is None or not bool(s1sq - lam2 > 2 * separation_tolerance(k, dtype) * s1sq):
        return None, it
    return _assemble(Wc, top, lam2, L, X), it


def _top_eigenvector(
    G: torch.Tensor, basis: torch.Tensor, eps: float, max_iter: int
) -> tuple[torch.Tensor | None, torch.Tensor, float, int]:
    """Phase 1 of :func:`resolvent_spectrum`: block inverse iteration with ``s I - G`` from ``basis``.
    Returns ``(z_1 or None if not converged, Ritz block (k, p), theta_1, iterations)``."""
    k = G.shape[0]
    tol1_rel = 16 * math.sqrt(k) * eps
    Z, _ = torch.linalg.qr(basis)
    chol = None
    it = 0
    lam1 = math.nan
    prev = math.inf
    for it in range(1, max_iter + 1):
        GZ = _linalg.sym_matmul(G, Z)
        T = Z.T @ GZ
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        theta, S = theta.flip(0), S.flip(1)
        Z, GZ = Z @ S, GZ @ S
        res = torch.linalg.vector_norm(GZ[:, 0] - Z[:, 0] * theta[0])
        lam1 = float(theta[0])
        if not (lam1 > 0 and math.isfinite(float(res))):
            return None, Z, lam1, it
        r = float(res)
        # at the rounding floor, or below the bound and no longer decreasing (stagnation at the floor)
        if r <= 2 * eps * lam1 or (r <= tol1_rel * lam1 and r > 0.25 * prev):
            return Z[:, 0], Z, lam1, it
        prev = r
        if chol is None:
            # shift above lambda_1: the Ritz value is a lower bound, the residual bounds the distance
            margin = max(2 * r, 1e-2 * (lam1 - float(theta[1])), 64 * eps * lam1)
            for _ in range(8):
                chol = _linalg.shifted_cholesky(G, lam1 + margin)
                if chol is not None:
                    break
                margin *= 4
            if chol is None:
                return None, Z, lam1, it
        Z, _ = torch.linalg.qr(_linalg.cholesky_solve(chol, Z))
    return None, Z, lam1, it


def _top_pair(Wc: torch.Tensor, z1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(u, v, sigma_1, w)`` from the top eigenvector ``z1`` of the smaller Gram matrix (w = z1 up to
    the sign convention of :func:`lipverify.spectral.with_canonical_sign`: largest |v_j| positive)."""
    tall = Wc.shape[0] > Wc.shape[1]
    other = Wc @ z1 if tall else Wc.T @ z1  # W v (tall) or W^T u
    s1 = torch.linalg.vector_norm(other)
    other = other / s1
    u, v = (other, z1) if tall else (z1, other)
    sign = torch.sign(v[torch.argmax(v.abs())])
    u, v = u * sign, v * sign
    return u, v, s1, (v if tall else u)


def _second_eigenvalue(
    G: torch.Tensor, L: torch.Tensor, w: torch.Tensor, X: torch.Tensor, lam1: float, eps: float, max_iter: int
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Phase 2 of :func:`resolvent_spectrum`: lambda_2 of G (and its Ritz block) by block Krylov with
    ``A^{-1} = (L L^T)^{-1}`` on the complement of w, Rayleigh-Ritz on G, thick restart at
    RESOLVENT_MAX_DIM blocks. Returns ``(lambda_2 or None, Ritz vectors (k, q), iterations)``."""
    k = G.shape[0]
    tol2 = 1e-8 * math.sqrt(eps / torch.finfo(torch.float64).eps) * lam1
    X = X - torch.outer(w, w @ X)
    Q, _ = torch.linalg.qr(X)
    GQ = _linalg.sym_matmul(G, Q)
    q = Q.shape[1]
    max_dim = min(k - 1, RESOLVENT_MAX_DIM * q)
    it = 0
    while it < max_iter:
        it += 1
        T = Q.T @ GQ
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        theta, S = theta.flip(0)[:q], S.flip(1)[:, :q]
        X = Q @ S
        z2 = X[:, 0]
        res2 = torch.linalg.vector_norm(GQ @ S[:, 0] - theta[0] * z2)
        if float(res2) <= tol2 or Q.shape[1] >= k - 1:
            return theta[0], X, it
        if Q.shape[1] + q > max_dim:
            Q, GQ = X, GQ @ S
        new = _linalg.cholesky_solve(L, X)
        new = new / torch.linalg.vector_norm(new, dim=0)
        for _ in range(2):  # classical Gram-Schmidt against w and Q, twice
            new = new - torch.outer(w, w @ new)
            new = new - Q @ (Q.T @ new)
        # at most k - 1 orthonormal columns fit in the complement of w
        keep = torch.nonzero(torch.linalg.vector_norm(new, dim=0) > 1e-8)[:, 0][: k - 1 - Q.shape[1]]
        if keep.numel() == 0:
            return theta[0], X, it
        new, _ = torch.linalg.qr(new[:, keep])
        new = new - Q @ (Q.T @ new)
        new = new / torch.linalg.vector_norm(new, dim=0)
        Q = torch.cat([Q, new], 1)
        GQ = torch.cat([GQ, _linalg.sym_matmul(G, new)], 1)
    return None, X, it


def _assemble(Wc, top, lam2, L, X) -> ResolventSpectrum:
    u, v, s1, w = top
    s2 = lam2.clamp(min=0).sqrt()
    basis_next = torch.cat([w.unsqueeze(1), X], 1).contiguous()
    return ResolventSpectrum(W=Wc, u=u, v=v, s1=s1, s2=s2, factor=L, basis=basis_next)
