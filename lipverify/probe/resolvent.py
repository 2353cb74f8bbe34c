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
    """Rayleigh-Ritz on a 2-column orthonormal block (..., k, 2) without ``eigh`` (which checks its
    LAPACK info on the host): the 2x2 ``T = Q^T G Q = [[a, b], [b, c]]`` is diagonalised by the Jacobi
    rotation of angle ``phi = atan2(2b, a - c) / 2`` (backward stable). Returns the rotated block and
    ``G`` times it, the larger Ritz value's vector first (batched over leading dimensions)."""
    t = torch.matmul(Q.mT, GQ).reshape(*Q.shape[:-2], 4)  # a, b, b', c
    phi = 0.5 * torch.atan2(t[..., 1] + t[..., 2], t[..., 0] - t[..., 3])
    cs, sn = torch.cos(phi), torch.sin(phi)
    R = torch.stack([cs, -sn, sn, cs], -1).reshape(*Q.shape[:-2], 2, 2)
    mm = torch.bmm if Q.ndim == 3 else torch.mm
    return mm(Q, R), mm(GQ, R)


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
    mm = torch.bmm if L.ndim == 3 else torch.mm  # (a batch: bmm, not matmul's expand/view wrappers)
    P = mm(Linv.mT, Linv)
    for i in range(squarings):
        if i % 3 == 0:
            P = P / torch.linalg.matrix_norm(P, keepdim=True)  # per matrix of a batch (..., k, k)
        P = mm(P, P)
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


#: Layers padded into one batch of :func:`resolvent_spectra_device` (:func:`device_batch_groups`):
#: smaller side at most this, and the batch's padded work at most ``DEVICE_BATCH_MAX_WASTE`` times
#: the work of its layers on their own.
DEVICE_BATCH_MAX_K = 2048
DEVICE_BATCH_MAX_WASTE = 8.0


def _work(k: int, n: int) -> int:
    """Leading flop count of one layer's device spectrum: the Gram product and the dense squarings."""
    return k * k * n + k**3


def device_batch_groups(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Which layers (indices into ``shapes``, (m, n) each) share one batched
    :func:`resolvent_spectra_device` call: a function of the shapes only (CPU under ``route="device"``
    batches exactly as CUDA does). Layers sorted by smaller side k (largest first) join the current
    group while its padded work ``B * work(K, N)`` stays within ``DEVICE_BATCH_MAX_WASTE`` times the sum
    of its layers' own work and K <= ``DEVICE_BATCH_MAX_K``; the rest start new groups. On a GPU the
    probe's small matrices are launch-bound, so one padded launch costs less than one per layer; the
    waste bound keeps a tiny layer from being padded to a huge one's size (memory)."""
    order = sorted(range(len(shapes)), key=lambda i: (-min(shapes[i]), -max(shapes[i]), i))
    groups: list[list[int]] = []
    for i in order:
        k, n = min(shapes[i]), max(shapes[i])
        if groups and k <= DEVICE_BATCH_MAX_K:
            g = groups[-1]
            K = max(min(shapes[j]) for j in g)
            N = max(max(max(shapes[j]) for j in g), n)
            own = sum(_work(min(shapes[j]), max(shapes[j])) for j in g) + _work(k, n)
            if K <= DEVICE_BATCH_MAX_K and (len(g) + 1) * _work(K, N) <= DEVICE_BATCH_MAX_WASTE * own:
                g.append(i)
                continue
        groups.append([i])
    return [sorted(g) for g in groups]


@dataclass(frozen=True)
class DeviceBatchPlan:
    """Fixed per-batch data of :func:`resolvent_spectra_device` (built once per set of shapes, dtype
    and device, so a steady-state step creates no tensor from host data): ``shapes`` (m, n) per layer,
    ``K``/``N`` the padded smaller/larger side, ``rows`` (B, K, 1) 1 on a layer's real rows, 0 on
    padding, and the per-layer convergence bounds ``r1_bound = 16 sqrt(k) eps`` and
    ``separation = 2 separation_tolerance(k)`` (B,), and ``tall`` (B, 1, 1) bool, m > n."""

    shapes: tuple[tuple[int, int], ...]
    K: int
    N: int
    rows: torch.Tensor
    r1_bound: torch.Tensor
    separation: torch.Tensor
    tall: torch.Tensor

    @classmethod
    def build(cls, shapes, dtype: torch.dtype, device: torch.device) -> DeviceBatchPlan:
        shapes = tuple((int(m), int(n)) for m, n in shapes)
        ks = [min(s) for s in shapes]
        K, N = max(ks), max(max(s) for s in shapes)
        rows = torch.zeros(len(shapes), K, 1, dtype=dtype)
        for i, k in enumerate(ks):
            rows[i, :k] = 1
        eps = torch.finfo(dtype).eps
        r1 = torch.tensor([16 * math.sqrt(k) * eps for k in ks], dtype=dtype)
        sep = torch.tensor([2 * separation_tolerance(k, dtype) for k in ks], dtype=dtype)
        tall = torch.tensor([[[m > n]] for m, n in shapes])
        return cls(shapes, K, N, rows.to(device), r1.to(device), sep.to(device), tall.to(device))


def _pad_stack(mats: list[torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, rows, cols) zeros with ``mats[i]`` (r_i, c_i) in the top-left corner of slice i (cast)."""
    out = torch.zeros(len(mats), rows, cols, dtype=dtype, device=mats[0].device)
    for i, M in enumerate(mats):
        out[i, : M.shape[0], : M.shape[1]].copy_(M)
    return out


def resolvent_spectra_device(
    Ws: list[torch.Tensor],
    dtype: torch.dtype,
    bases: list[torch.Tensor],
    plan: DeviceBatchPlan | None = None,
    top_squarings: int | None = None,
    second_squarings: int | None = None,
) -> list[ResolventSpectrum]:
    """:func:`resolvent_spectrum_device` of several layers in one batch: the same algorithm on
    zero-padded matrices, so each step is one launch for all layers instead of one per layer.

    Each ``W`` (m, n) is brought to its wide form ``W_w`` (k, n'), k <= n' (``W`` if m <= n, else
    ``W^T``) and placed in the top-left corner of a (K, N) zero matrix. Its Gram matrix is then
    ``diag(G, 0)``, and every matrix the algorithm factors or inverts (``s I - G``, the deflated ``A``)
    is block diagonal with a multiple of I on the padding: a vector that is zero on the padding stays
    zero there through every product, solve and (Householder) QR, and the padding adds the eigenvalue
    0 below the real block's (sigma_1, sigma_2 of the layer are those of its block). ``ok`` needs the
    per-layer bounds of ``plan`` (k-dependent). Each ``bases[i]`` (k_i, p), p >= 3 (three columns
    used), k_i >= 3. Returns one :class:`ResolventSpectrum` per layer whose ``W``, ``u``, ``v``,
    ``factor`` (the leading (k, k) block of the padded factor, which is the Cholesky factor of the
    layer's own A), ``basis`` and ``ok`` are views into the batch.
    """
    device = Ws[0].device
    if plan is None:
        plan = DeviceBatchPlan.build([tuple(W.shape) for W in Ws], dtype, device)
    if any(min(s) < 3 for s in plan.shapes) or any(b.shape[1] < 3 for b in bases):
        raise ValueError("resolvent_spectra_device needs k >= 3 and three warm vectors per layer")
    Wp = _pad_stack([wide_form(W) for W in Ws], plan.K, plan.N, dtype)
    basis = _pad_stack([b[:, :3] for b in bases], plan.K, 3, dtype)
    return split_spectra(plan, _spectra_core(Wp, basis, plan, top_squarings, second_squarings))


def wide_form(W: torch.Tensor) -> torch.Tensor:
    """``W`` (m, n) as (k, n'), k <= n': itself if m <= n, else ``W^T`` (a view)."""
    return W.mT if W.shape[0] > W.shape[1] else W


def _spectra_core(
    Wp: torch.Tensor,
    basis: torch.Tensor,
    plan: DeviceBatchPlan,
    top_squarings: int | None = None,
    second_squarings: int | None = None,
) -> dict[str, torch.Tensor]:
    """The batched algorithm of :func:`resolvent_spectra_device` on the padded wide forms ``Wp``
    (B, K, N) and warm vectors ``basis`` (B, K, 3): a pure function of tensors (fixed shapes, no
    host read, no tensor made from host data), so it can be captured in a CUDA graph
    (:mod:`lipverify.probe.graphs`). Returns ``W`` (Wp itself), ``w`` (B, K) the small-side and
    ``other`` (B, N) the large-side singular vector, ``s1``, ``s2``, ``ok`` (B,), ``L`` (B, K, K) and
    ``basis`` (B, K, 3)."""
    top_squarings = DEVICE_TOP_SQUARINGS if top_squarings is None else top_squarings
    second_squarings = DEVICE_SECOND_SQUARINGS if second_squarings is None else second_squarings
    dtype, device = Wp.dtype, Wp.device
    rows = plan.rows
    bmm = torch.bmm  # batched products (matmul would wrap each in expand/view operations)
    G = bmm(Wp, Wp.mT)  # (B, K, K): diag(G_l, 0)
    eps = torch.finfo(dtype).eps
    eye = torch.eye(plan.K, dtype=dtype, device=device)
    # phase 1 (as resolvent_spectrum_device, per batch entry); vectors are kept as (B, K, 1) columns
    Z, _ = torch.linalg.qr(basis[..., :2])
    Z = Z * rows  # exactly zero on the padding (Householder keeps zero rows zero; no reliance on it)
    GZ = bmm(G, Z)
    theta = (Z * GZ).sum(-2, keepdim=True)  # (B, 1, 2)
    theta0 = theta[..., :1]  # (B, 1, 1)
    r = torch.linalg.vector_norm(GZ[..., :1] - theta0 * Z[..., :1], dim=-2, keepdim=True)
    spread = (theta0 - theta[..., 1:]).abs()
    margin = torch.maximum(torch.maximum(2 * r, 1e-2 * spread), 64 * eps * theta0.abs())
    L1, info1 = torch.linalg.cholesky_ex((theta0 + margin) * eye - G)
    z1 = bmm(_inverse_power(L1, eye, top_squarings), Z[..., :1])
    z1 = _inverse_solve(L1, L1.mT, z1)  # (B, K, 1)
    z1 = z1 / torch.linalg.vector_norm(z1, dim=-2, keepdim=True)
    Gz1 = bmm(G, z1)
    lam1 = (z1 * Gz1).sum(-2, keepdim=True)  # (B, 1, 1)
    r1 = torch.linalg.vector_norm(Gz1 - lam1 * z1, dim=-2, keepdim=True)
    # top pair: other = W_w^T z1 (the larger side's vector), sign from v's largest |entry|
    other = bmm(Wp.mT, z1)  # (B, N, 1)
    s1 = torch.linalg.vector_norm(other, dim=-2, keepdim=True)  # (B, 1, 1)
    other = other / s1
    sign_small = torch.sign(z1.gather(-2, z1.abs().argmax(-2, keepdim=True)))  # v = z1 (tall)
    sign_large = torch.sign(other.gather(-2, other.abs().argmax(-2, keepdim=True)))  # v = other (wide)
    sign = torch.where(plan.tall, sign_small, sign_large)
    w, other = z1 * sign, other * sign
    # phase 2: the deflated A = s1^2 I - G + s1^2 w w^T (s1^2 I on the padding)
    s1sq = s1 * s1
    L, info2 = torch.linalg.cholesky_ex(s1sq * eye - G + s1sq * bmm(w, w.mT))

    def deflate(X: torch.Tensor) -> torch.Tensor:
        return X - bmm(w, bmm(w.mT, X))

    X = deflate(basis[..., 1:3])
    X = bmm(_inverse_power(L, eye, second_squarings), X)
    X, _ = torch.linalg.qr(deflate(X))
    X = _inverse_solve(L, L.mT, X * rows)
    X, _ = torch.linalg.qr(deflate(X))
    X = X * rows
    X, GX = _rayleigh_ritz_2(X, bmm(G, X))
    lam2 = (X[..., :1] * GX[..., :1]).sum(-2, keepdim=True)
    r2 = torch.linalg.vector_norm(GX[..., :1] - lam2 * X[..., :1], dim=-2, keepdim=True)
    tol2 = 1e-8 * math.sqrt(eps / torch.finfo(torch.float64).eps)
    ok = (
        (info1 == 0)
        & (info2 == 0)
        & (r1.flatten() <= plan.r1_bound * lam1.flatten())
        & (r2.flatten() <= tol2 * lam1.flatten())
        & ((s1sq - lam2).flatten() > plan.separation * s1sq.flatten())
        & torch.isfinite(lam2.flatten())
        & torch.isfinite(s1.flatten())
    )
    s1, s2 = s1.flatten(), lam2.flatten().clamp(min=0).sqrt()
    w, other = w[..., 0], other[..., 0]
    basis_next = torch.cat([w[..., None], X], -1)  # (B, K, 3)
    return {"W": Wp, "w": w, "other": other, "s1": s1, "s2": s2, "ok": ok, "L": L, "basis": basis_next}


def split_spectra(plan: DeviceBatchPlan, out: dict[str, torch.Tensor]) -> list[ResolventSpectrum]:
    """One :class:`ResolventSpectrum` per layer from :func:`_spectra_core`'s batch (views into it):
    ``W`` the layer's corner of the padded matrix (transposed back for a tall layer), ``u``/``v`` the
    small- and large-side vectors in the layer's orientation, ``factor`` the leading (k, k) block of
    the padded factor (the Cholesky factor of the layer's own A: the padding is a separate block)."""
    parts = {key: t.unbind(0) for key, t in out.items()}  # one operation per output, not per layer
    specs = []
    for i, (m, n) in enumerate(plan.shapes):
        k, n_large, tall = min(m, n), max(m, n), m > n
        Ww = _corner(parts["W"][i], k, n_large)
        small, large = _corner(parts["w"][i], k), _corner(parts["other"][i], n_large)
        specs.append(
            ResolventSpectrum(
                W=Ww.mT if tall else Ww,
                u=large if tall else small,
                v=small if tall else large,
                s1=parts["s1"][i],
                s2=parts["s2"][i],
                factor=_corner(parts["L"][i], k, k),
                basis=_corner(parts["basis"][i], k),
                ok=parts["ok"][i],
            )
        )
    return specs


def _corner(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """The leading ``sizes`` block of ``t`` (itself where it already has that shape: no operation)."""
    if tuple(t.shape[: len(sizes)]) == sizes:
        return t
    return t[tuple(slice(0, size) for size in sizes)]
