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
    #: device route only: 0-d bool tensor, the convergence verdict (None: decided on the host)
    ok: torch.Tensor | None = field(default=None, repr=False)

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
    slightly above lambda_1 (a successful factorisation certifies ``s > lambda_1``), with Rayleigh-Ritz
    on G each iteration. The margin ``s - theta_1`` is twice the Kato-Temple estimate
    ``r^2 / (theta_1 - theta_2)`` of ``lambda_1 - theta_1`` (at most 2r, at least ``64 eps theta_1``):
    the top vector converges by about ``margin / (lambda_1 - lambda_5)`` per iteration, ~1e-5 for a
    warm start (four iterations per step on the MLP). If that factorisation fails, the safe margins
    ``max(2 r, 1e-2 (theta_1 - theta_2)) 4^j`` (j = 0..7) follow, the shifts used before (~3e-3 per
    iteration, six iterations). It stops when the residual
    ``r_1 = |G z_1 - theta_1 z_1|`` is at the rounding floor ``4 eps theta_1`` (the residual of G's exact
    top vector, computed in floating point, is itself 2-3 eps theta_1), or below
    ``16 sqrt(k) eps theta_1`` and no longer decreasing (stagnation at the floor); the eigenvector error
    is then ``r_1 / (lambda_1 - lambda_2)``, as for a full ``eigh`` of the same G.
    ``sigma_1 = |W^T u|`` (or ``|W v|``), the other vector by ``W^T u / sigma_1``. Then the deflated
    ``A`` of :class:`ResolventSpectrum` is factorised.

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
        if r <= 4 * eps * lam1 or (r <= tol1_rel * lam1 and r > 0.25 * prev):
            return Z[:, 0], Z, lam1, it
        prev = r
        if chol is None:
            for margin in _shift_margins(r, lam1, lam1 - float(theta[1]), eps):
                chol = _linalg.shifted_cholesky(G, lam1 + margin)
                if chol is not None:
                    break
            if chol is None:
                return None, Z, lam1, it
        Z, _ = torch.linalg.qr(_linalg.cholesky_solve(chol, Z))
    return None, Z, lam1, it


def _shift_margins(r: float, theta1: float, spread: float, eps: float) -> list[float]:
    """Margins ``s - theta_1`` phase 1 tries in turn for its shift s above lambda_1 (the first whose
    ``s I - G`` has a Cholesky factor is used), from the top Ritz value theta_1, its residual r and
    ``spread = theta_1 - theta_2``.

    First twice the Kato-Temple estimate ``r^2 / (theta_1 - lambda_2)`` of ``lambda_1 - theta_1`` (with
    theta_2 for lambda_2; at most 2r, at least ``64 eps theta_1``): close to lambda_1, so a warm start
    converges fast. It fails for a poor warm start (theta_1 not near lambda_1, or theta_2 far below
    lambda_2); then the safe margins ``max(2 r, 1e-2 spread, 64 eps theta_1) 4^j``, j = 0..7, follow
    (the residual bounds the distance to the nearest eigenvalue)."""
    floor = 64 * eps * theta1
    first = max(min(2 * r, 2 * r * r / spread) if spread > 0 else 2 * r, floor)
    safe = max(2 * r, 1e-2 * spread, floor)
    return [first] + [safe * 4**j for j in range(8) if safe * 4**j > first]  # no shift tried twice


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


#: Device route (:func:`resolvent_spectrum_device`): squarings of the inverse in phase 1 (top pair)
#: and phase 2 (sigma_2): 2^s inverse-iteration steps in s matrix products each.
DEVICE_TOP_SQUARINGS = 6
DEVICE_SECOND_SQUARINGS = 6


def _rayleigh_ritz_2(Q: torch.Tensor, GQ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on a 2-column orthonormal block without ``eigh`` (which checks its LAPACK info on
    the host): the 2x2 ``T = Q^T G Q = [[a, b], [b, c]]`` is diagonalised by the Jacobi rotation of
    angle ``phi = atan2(2b, a - c) / 2`` (backward stable). Returns the rotated block and ``G`` times
    it, the larger Ritz value's vector first."""
    t = (Q.mT @ GQ).reshape(4)  # a, b, b', c
    phi = 0.5 * torch.atan2(t[1] + t[2], t[0] - t[3])
    cs, sn = torch.cos(phi), torch.sin(phi)
    R = torch.stack([cs, -sn, sn, cs]).reshape(2, 2)
    return Q @ R, GQ @ R


def _inverse_solve(L: torch.Tensor, LT: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^{-1} B`` by two triangular solves (no LAPACK info, so no host check on any device)."""
    return torch.linalg.solve_triangular(LT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


def _inverse_power(L: torch.Tensor, eye: torch.Tensor, squarings: int) -> torch.Tensor:
    """``(L L^T)^{-2^s}`` up to a positive factor, for a lower Cholesky factor ``L`` (k, k): the
    inverse ``P = L^{-T} L^{-1}`` (one triangular solve with the identity ``eye``, no LAPACK info),
    divided by its Frobenius norm (so its eigenvalues are at most 1 and the largest at least
    ``1/sqrt(k)``), squared ``s`` times, renormalised every third squaring (the largest eigenvalue
    then stays above ``k^-4`` in between: no underflow in float32). Applied to a block it is 2^s steps
    of inverse iteration in s + 1 dense products (few launches, no host branch)."""
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    P = Linv.mT @ Linv
    for i in range(squarings):
        if i % 3 == 0:
            P = P / torch.linalg.matrix_norm(P)
        P = P @ P
    return P


def resolvent_spectrum_device(
    W: torch.Tensor,
    dtype: torch.dtype,
    basis: torch.Tensor,
    top_squarings: int | None = None,
    second_squarings: int | None = None,
) -> ResolventSpectrum:
    """:func:`resolvent_spectrum` without a host synchronisation (the device route; CUDA's route, and
    CPU's under ``route="device"``): torch operations only, fixed iteration counts, no data-dependent
    branch, and the convergence verdict kept on the device in :attr:`ResolventSpectrum.ok` (0-d
    bool), to be read with the step's packed results.

    ``W`` (m, n); ``basis`` (k, p), p >= 1 (three columns used): warm vectors of the smaller Gram
    matrix G (k, k), k = min(m, n) (k = 1: sigma_2 := 0). Phase 1: the shift
    ``s = theta_1 + max(2 r, 1e-2 |theta_1 - theta_2|, 64 eps theta_1)`` from the Rayleigh quotients
    ``theta`` and residual r of the first two warm vectors is above lambda_1 when the Cholesky
    factorisation of ``s I - G`` succeeds; ``2^top_squarings`` steps of inverse iteration
    (:func:`_inverse_power`) take the first warm vector to z_1 at the rate
    ``((s - lambda_1) / (s - lambda_2))^(2^top_squarings)``. Phase 2: the same with the deflated
    ``A = s1^2 I - G + s1^2 w w^T`` (also the factor of the resolvent form) on a 2-column block in the
    complement of w, then a 2x2 Rayleigh-Ritz (:func:`_rayleigh_ritz_2`): the second vector converges
    like ``((lambda_1 - lambda_2) / (lambda_1 - lambda_4))^(2^second_squarings)``.

    ``ok`` is True iff both factorisations succeeded (``info == 0``), the residuals meet the host
    route's bounds (``r_1 <= 16 sqrt(k) eps theta_1``, ``r_2 <= 1e-8 theta_1 sqrt(eps / eps_64)``),
    ``s1^2 - lambda_2 > 2 separation_tolerance(k) s1^2`` and everything is finite. A spectrum with
    ``ok`` False must not be used (the probe flags its step and restarts the layer cold).
    """
    top_squarings = DEVICE_TOP_SQUARINGS if top_squarings is None else top_squarings
    second_squarings = DEVICE_SECOND_SQUARINGS if second_squarings is None else second_squarings
    Wc = W.to(dtype)
    if Wc.data_ptr() == W.data_ptr():
        Wc = Wc.clone()  # the spectrum keeps W_t; the optimiser updates the parameter in place
    m, n = Wc.shape
    G = Wc @ Wc.mT if m <= n else Wc.mT @ Wc
    k = G.shape[0]
    eps = torch.finfo(dtype).eps
    eye = torch.eye(k, dtype=dtype, device=G.device)
    basis = basis.to(dtype)
    # phase 1: a shift above lambda_1 from the warm vectors' Rayleigh quotients and residual
    Z, _ = torch.linalg.qr(basis[:, :2])
    GZ = G @ Z
    theta = (Z * GZ).sum(0)
    r = torch.linalg.vector_norm(GZ[:, 0] - theta[0] * Z[:, 0])
    spread = (theta[0] - theta[-1]).abs()  # 0 for k = 1
    margin = torch.maximum(torch.maximum(2 * r, 1e-2 * spread), 64 * eps * theta[0].abs())
    L1, info1 = torch.linalg.cholesky_ex((theta[0] + margin) * eye - G)
    z1 = _inverse_power(L1, eye, top_squarings) @ Z[:, :1]
    # one backward-stable step with the factor itself: the explicit inverse's rounding is not left in z_1
    z1 = _inverse_solve(L1, L1.mT, z1)[:, 0]
    z1 = z1 / torch.linalg.vector_norm(z1)
    Gz1 = G @ z1
    lam1 = z1 @ Gz1
    r1 = torch.linalg.vector_norm(Gz1 - lam1 * z1)
    u, v, s1, w = _top_pair_device(Wc, z1)
    s1sq = s1 * s1
    # phase 2: the deflated A (also the factor the resolvent form needs) on the complement of w
    L, info2 = torch.linalg.cholesky_ex(s1sq * eye - G + s1sq * torch.outer(w, w))
    q = min(2, k - 1, basis.shape[1] - 1)  # the complement of w holds k - 1 columns
    if q >= 1:
        X = basis[:, 1 : 1 + q]
        X = X - torch.outer(w, w @ X)
        X = _inverse_power(L, eye, second_squarings) @ X
        X, _ = torch.linalg.qr(X - torch.outer(w, w @ X))
        X = _inverse_solve(L, L.mT, X)  # one backward-stable step with the factor (as in phase 1)
        X, _ = torch.linalg.qr(X - torch.outer(w, w @ X))
        GX = G @ X
        if q == 2:
            X, GX = _rayleigh_ritz_2(X, GX)
        lam2 = X[:, 0] @ GX[:, 0]
        r2 = torch.linalg.vector_norm(GX[:, 0] - lam2 * X[:, 0])
    else:  # k = 1: no second singular value
        X = basis[:, :0]
        lam2 = r2 = torch.zeros((), dtype=dtype, device=G.device)
    tol2 = 1e-8 * math.sqrt(eps / torch.finfo(torch.float64).eps)
    ok = (
        (info1 == 0)
        & (info2 == 0)
        & (r1 <= 16 * math.sqrt(k) * eps * lam1)
        & (r2 <= tol2 * lam1)
        & (s1sq - lam2 > 2 * separation_tolerance(k, dtype) * s1sq)
        & torch.isfinite(lam2)
        & torch.isfinite(s1)
    )
    s2 = lam2.clamp(min=0).sqrt()
    basis_next = torch.cat([w.unsqueeze(1), X], 1).contiguous()
    return ResolventSpectrum(W=Wc, u=u, v=v, s1=s1, s2=s2, factor=L, basis=basis_next, ok=ok)


def _top_pair_device(Wc: torch.Tensor, z1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_top_pair` with the sign read by ``gather`` (indexing with a 0-d tensor reads it on the
    host)."""
    tall = Wc.shape[0] > Wc.shape[1]
    other = Wc @ z1 if tall else Wc.mT @ z1
    s1 = torch.linalg.vector_norm(other)
    other = other / s1
    u, v = (other, z1) if tall else (z1, other)
    sign = torch.sign(v.gather(0, torch.argmax(v.abs()).reshape(1)))
    u, v = u * sign, v * sign
    return u, v, s1, (v if tall else u)
