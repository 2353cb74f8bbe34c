"""Operator-norm derivatives of a weight matrix: Lemma 12 (Jacobian) and Lemma 13 (Hessian).

Conventions (MATH section 0): ``W`` has shape (m, n), ``vec`` is column-major, so
``vec(u v^T) = v kron u`` and a flat index ``i + m*j`` addresses ``W[i, j]``.
All functions accept float16/bfloat16/float32/float64 on any device; half precisions are
decomposed in float32 and cast back.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from lipverify._validation import (
    SUPPORTED_DTYPES,
    DegenerateSpectrumError,
    LipverifyError,
    all_finite,
    check_weight,
    compute_dtype,
)

#: Floor of the relative gap (sigma_1 - sigma_2) / sigma_1 below which results are flagged (MATH section 7).
DEFAULT_GAP_TOLERANCE = 1e-6


def gap_tolerance_for(dtype: torch.dtype) -> float:
    """Relative-gap flag threshold for a compute dtype: ``max(1e-6, sqrt(eps))``.

    The Hessian terms carry a relative rounding error of about ``eps / relative_gap`` (MATH section 7),
    so an unflagged result has relative error at most ``sqrt(eps)`` (1.5e-8 in float64, 3.5e-4 in
    float32; the 1e-6 floor governs float64).
    """
    return max(DEFAULT_GAP_TOLERANCE, torch.finfo(dtype).eps ** 0.5)


def rounding_gap_tolerance(m: int, n: int, dtype: torch.dtype) -> float:
    """Relative gap at or below which ``sigma_1 = sigma_2`` up to rounding: ``4 eps (sqrt(m) + sqrt(n))``
    of the compute dtype, capped at :func:`gap_tolerance_for` (reached only for float32 with
    ``sqrt(m) + sqrt(n) > 724``). Never below :func:`separation_tolerance`, the kernels' check.

    Derivation: rounding W's entries (``|dw_ij| <= eps/2 |w_ij|``, independent signs) is a random
    perturbation of norm ``~ (eps/2) max|w_ij| (sqrt(m) + sqrt(n)) <= (eps/2) (sqrt(m) + sqrt(n))
    sigma_1``; by Weyl each singular value moves by at most that, so a matrix with ``sigma_1 = sigma_2``
    shows a computed relative gap up to ``eps (sqrt(m) + sqrt(n))``. The backward-stable SVD adds an
    error of the same kind. The factor 4 is the safety margin: over 9000 random exactly degenerate
    matrices (2x2 to 16x16, float32 and float64, built as ``U diag(s) V^T`` in the dtype) the largest
    computed relative gap was ``1.6 eps (sqrt(m) + sqrt(n))``, and at most ``0.2 eps (sqrt(m) + sqrt(n))``
    from 128x128 to 512x2048. At or below this level the gap cannot be told from zero: u and v are
    not defined. The worst-case (linear in ``max(m, n)``) SVD error bound is not used: in float32 it
    exceeds the flag threshold ``sqrt(eps)`` above ``max(m, n) = 1448`` and would refuse layers whose
    vectors are accurate to ``eps / gap``.
    """
    eps = torch.finfo(dtype).eps
    # never below separation_tolerance (a flat spectrum's computed spread grows like r eps), so what the
    # kernels' check refuses, the public functions refuse too
    return min(
        max(4 * eps * (m**0.5 + n**0.5), separation_tolerance(min(m, n), dtype)), gap_tolerance_for(dtype)
    )


#: Largest d = m*n for which the dense (d, d) Hessian is built.
MAX_DENSE_HESSIAN_DIM = 4096


class SpectralGapWarning(UserWarning):
    """The relative spectral gap is below tolerance: Lemma 13 quantities lose accuracy like eps/gap."""


@dataclass(frozen=True)
class SpectralDecomposition:
    """Thin SVD ``W = U diag(sigma) V^T`` with r = min(m, n) singular values, descending.

    ``U``: (m, r), ``sigma``: (r,), ``V``: (n, r), all in the compute dtype (float32 for half inputs).
    """

    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[0]

    @property
    def sigma1(self) -> torch.Tensor:
        return self.sigma[0]

    @property
    def u(self) -> torch.Tensor:
        return self.U[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.V[:, 0]

    @property
    def gap(self) -> torch.Tensor:
        """Absolute gap sigma_1 - sigma_2 (sigma_2 := 0 when r = 1)."""
        if self.sigma.numel() == 1:
            return self.sigma[0]
        return self.sigma[0] - self.sigma[1]

    @property
    def relative_gap(self) -> torch.Tensor:
        return self.gap / self.sigma[0]

    def quadratic_form(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Lemma 13 ``q_H(E)`` from ``y = E^T u`` and ``x = E v``: :func:`quadratic_form_from_projections`."""
        return quadratic_form_from_projections(self, y, x)

    def hessian_trace(self) -> torch.Tensor:
        """``tr H`` from the spectrum: :func:`hessian_trace_from_spectrum`."""
        return hessian_trace_from_spectrum(self.sigma, *self.shape)


def with_canonical_sign(U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor) -> SpectralDecomposition:
    """Flip ``(u, v)`` together so that v's largest-magnitude entry is positive: results are then
    deterministic (every formula is invariant to the flip). U (m, r), sigma (r,), V (n, r)."""
    k = torch.argmax(V[:, 0].abs())
    s = torch.sign(V[k, 0])
    s = torch.where(s == 0, torch.ones_like(s), s)
    U = U.clone()
    V = V.clone()
    U[:, 0] *= s
    V[:, 0] *= s
    return SpectralDecomposition(U=U, sigma=sigma, V=V)


def decompose(W: torch.Tensor, name: str = "W") -> SpectralDecomposition:
    """Validated thin SVD of ``W`` (m, n). Raises if W is zero, non-finite or of a bad dtype."""
    check_weight(W, name)
    Wc = W.to(compute_dtype(W.dtype))
    U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
    if not (all_finite(S) and all_finite(U) and all_finite(Vh)):
        raise LipverifyError(
            f"{name}: the SVD is not finite in {Wc.dtype} (largest |entry| {float(Wc.abs().max()):.3g}): "
            "sigma_1 overflows; rescale W"
        )
    if not bool(S[0] > 0):
        raise DegenerateSpectrumError(f"{name}: sigma_1 = 0 (dead layer)")
    return with_canonical_sign(U, S, Vh.transpose(-1, -2))


def check_gap(
    dec: SpectralDecomposition,
    name: str = "W",
    gap_tolerance: float | None = None,
    stacklevel: int = 3,
    warn: bool = True,
) -> float:
    """The policy for sigma_1 close to sigma_2 shared by the public functions; returns the relative gap
    ``g = (sigma_1 - sigma_2) / sigma_1`` (``sigma_2 := 0`` for a rank-one shape).

    * ``g <= rounding_gap_tolerance(m, n, dtype)`` (sigma_1 = sigma_2 exactly or up to rounding):
      :class:`DegenerateSpectrumError` naming sigma_1, sigma_2, g and the threshold. u and v are not
      defined there (any unit vector of the top singular subspace is as good), sigma_1 is not
      differentiable and the Lemma 13 terms, which divide by ``sigma_1^2 - sigma_2^2``, are unbounded.
    * ``g < gap_tolerance`` (default :func:`gap_tolerance_for` the compute dtype): values are returned
      and a :class:`SpectralGapWarning` says by how much they are amplified: u, v carry errors up to
      ``eps / g`` (Davis-Kahan), the Lemma 13 terms scale like ``1 / g`` with relative error ``eps / g``.
      ``warn=False`` leaves the warning to the caller (which can name the amplified value).
    """
    sigma = dec.sigma
    dtype = sigma.dtype
    m, n = dec.shape
    s1 = float(sigma[0])
    s2 = float(sigma[1]) if sigma.numel() > 1 else 0.0
    rel = float(dec.relative_gap)
    rounding = rounding_gap_tolerance(m, n, dtype)
    if rel <= rounding:
        raise DegenerateSpectrumError(
            f"{name}: sigma_1 = {s1:.17g} and sigma_2 = {s2:.17g} are equal up to rounding (relative gap "
            f"{rel:.3g} <= {rounding:.3g} = 4 eps (sqrt(m) + sqrt(n)) in {dtype}, {m}x{n}): the top "
            "singular vectors are not defined, sigma_1 is not differentiable there and its Hessian is "
            "unbounded (Assumption 11 fails)"
        )
    if gap_tolerance is None:
        gap_tolerance = gap_tolerance_for(dtype)
    if warn and rel < gap_tolerance:
        eps = torch.finfo(dtype).eps
        warnings.warn(
            f"{name}: relative spectral gap {rel:.3g} (sigma_1 = {s1:.6g}, sigma_2 = {s2:.6g}) is below "
            f"{gap_tolerance:.3g}: u, v carry errors up to eps/gap = {eps / rel:.2g} and the Hessian "
            f"terms are amplified like 1/gap = {1 / rel:.2g} (relative error ~ eps/gap)",
            SpectralGapWarning,
            stacklevel=stacklevel,
        )
    return rel


def _require_simple(dec: SpectralDecomposition, name: str, gap_tolerance: float | None = None) -> None:
    check_gap(dec, name, gap_tolerance, stacklevel=4)


def _require_finite(
    result: torch.Tensor, dtype: torch.dtype, what: str, dec: SpectralDecomposition
) -> torch.Tensor:
    """``result`` cast to ``dtype``, or a :class:`LipverifyError` when a value overflows there (e.g.
    1/sigma_1 of a tiny W, 1/gap in float16): never an inf or NaN returned silently."""
    out = result.to(dtype)
    if not all_finite(out):
        raise LipverifyError(
            f"W: {what} is not finite in {dtype} (sigma_1 = {float(dec.sigma1):.3g}, relative gap "
            f"{float(dec.relative_gap):.3g}); it scales like 1/sigma_1 and 1/gap: rescale W or use float64"
        )
    return out


def top_singular(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma_1 and its singular vectors: ``(sigma, u, v)`` with ``W v = sigma u``.

    W: (m, n) -> sigma: scalar tensor, u: (m,), v: (n,), in W's dtype and device (decomposed in
    float32 for half inputs). Gap policy (:func:`check_gap`): when sigma_1 = sigma_2 up to rounding
    (relative gap ``<= 4 eps (sqrt(m) + sqrt(n))``, :func:`rounding_gap_tolerance`) u and v are not
    defined and :class:`DegenerateSpectrumError` is raised (``spectral_gap`` still measures the gap);
    below ``max(1e-6, sqrt(eps))`` the values come with a :class:`SpectralGapWarning` (u, v accurate
    to ``~eps / gap``). A sigma_1 that overflows a half dtype raises :class:`LipverifyError`.
    """
    dec = decompose(W)
    _require_simple(dec, "W")
    sigma = _require_finite(dec.sigma1, W.dtype, "sigma_1", dec)
    return sigma, dec.u.to(W.dtype), dec.v.to(W.dtype)


def spectral_gap(W: torch.Tensor) -> torch.Tensor:
    """Absolute spectral gap ``sigma_1 - sigma_2`` (``sigma_2 := 0`` for a rank-one shape), scalar in
    W's dtype. The measurement of degeneracy itself: it never raises for a small or zero gap (a gap
    at rounding level, ``<= rounding_gap_tolerance(m, n, dtype) * sigma_1``, is indistinguishable
    from 0)."""
    dec = decompose(W)
    return _require_finite(dec.gap, W.dtype, "the spectral gap", dec)


def jacobian(W: torch.Tensor) -> torch.Tensor:
    """Lemma 12: ``d sigma_1 / dW = u v^T``, shape (m, n) (``v kron u`` in column-major vec), W's dtype.

    Gap policy of :func:`top_singular`: :class:`DegenerateSpectrumError` when sigma_1 = sigma_2 up to
    rounding (sigma_1 is not differentiable), :class:`SpectralGapWarning` below ``max(1e-6, sqrt(eps))``.
    """
    dec = decompose(W)
    _require_simple(dec, "W")
    return torch.outer(dec.u, dec.v).to(W.dtype)


def _vec(M: torch.Tensor) -> torch.Tensor:
    """Column-major vec of (..., m, n) -> (..., m*n)."""
    return M.transpose(-1, -2).reshape(*M.shape[:-2], -1)


def hessian(W: torch.Tensor, max_dim: int = MAX_DENSE_HESSIAN_DIM) -> torch.Tensor:
    """Lemma 13: dense Hessian of sigma_1 with respect to column-major vec(W), shape (m*n, m*n).

    ``H = sum_{k=2..r} [s1 (x_k x_k^T + y_k y_k^T) + s_k (x_k y_k^T + y_k x_k^T)] / (s1^2 - s_k^2)
    + (1/s1) (sum_{k>r} x_k x_k^T + sum_{j>r} y_j y_j^T)``, ``x_k = v_k kron u``, ``y_k = v kron u_k``.
    Small matrices only: raises above ``max_dim`` = m*n. Gap policy of :func:`top_singular` (the
    terms divide by ``s1^2 - s2^2``); an entry that overflows W's dtype raises :class:`LipverifyError`.
    """
    check_weight(W)
    m, n = W.shape
    if m * n > max_dim:
        raise LipverifyError(
            f"dense Hessian of a {m}x{n} matrix has {m * n}^2 entries (limit d = {max_dim}); "
            "use hessian_quadratic_form instead"
        )
    dec = decompose(W)
    _require_simple(dec, "W")
    dtype = dec.sigma.dtype
    Wc = W.to(dtype)
    Uf, _, Vhf = torch.linalg.svd(Wc, full_matrices=True)
    Vf = Vhf.transpose(-1, -2)
    # Align the full bases with the sign-fixed thin decomposition's leading vectors.
    Uf[:, : dec.U.shape[1]] = dec.U
    Vf[:, : dec.V.shape[1]] = dec.V
    u, v, s1 = dec.u, dec.v, dec.sigma1
    r = dec.sigma.numel()
    H = torch.zeros(m * n, m * n, dtype=dtype, device=W.device)
    for k in range(1, r):
        sk = dec.sigma[k]
        xk = _vec(torch.outer(u, Vf[:, k]))
        yk = _vec(torch.outer(Uf[:, k], v))
        denom = (s1 - sk) * (s1 + sk)
        H += (
            s1 * (torch.outer(xk, xk) + torch.outer(yk, yk))
            + sk * (torch.outer(xk, yk) + torch.outer(yk, xk))
        ) / denom
    for k in range(r, n):
        xk = _vec(torch.outer(u, Vf[:, k]))
        H += torch.outer(xk, xk) / s1
    for j in range(r, m):
        yj = _vec(torch.outer(Uf[:, j], v))
        H += torch.outer(yj, yj) / s1
    return _require_finite(H, W.dtype, "the Hessian", dec)


def quadratic_form_from_projections(
    dec: SpectralDecomposition, y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Lemma 13 quadratic form ``vec(E)^T H vec(E)`` from the two projections of E it depends on.

    y = E^T u: (..., n), x = E v: (..., m). With a_k = v_k^T y, c_k = u_k^T x:
    ``sum_{k=2..r} [s1 (a_k^2 + c_k^2) + 2 s_k a_k c_k] / ((s1 - s_k)(s1 + s_k))
    + (|y - V a|^2 + |x - U c|^2) / s1``; the null-space parts are computed as residual norms
    (no cancellation), and ``s1^2 - s_k^2`` as a product (MATH section 7). Cost O((m + n) r) per E.
    Raises :class:`DegenerateSpectrumError` when ``sigma_1 = sigma_2`` (the form is unbounded).

    A batch of decompositions (``U`` (P, m, r), ``sigma`` (P, r), ``V`` (P, n, r), e.g. one per
    simulated path) takes y (P, N, n) and x (P, N, m) -> (P, N): one sample axis after the batch axes.
    """
    _require_separated_top(dec.sigma)
    a = y @ dec.V  # (..., r)
    c = x @ dec.U
    sigma = dec.sigma if dec.sigma.ndim == 1 else dec.sigma.unsqueeze(-2)
    s1 = sigma[..., :1]
    sk = sigma[..., 1:]
    ak, ck = a[..., 1:], c[..., 1:]
    denom = (s1 - sk) * (s1 + sk)
    inner = ((s1 * (ak * ak + ck * ck) + 2 * sk * ak * ck) / denom).sum(-1)
    null = torch.zeros_like(inner)
    if dec.V.shape[-2] > dec.V.shape[-1]:
        ry = y - a @ dec.V.transpose(-1, -2)
        null = null + (ry * ry).sum(-1)
    if dec.U.shape[-2] > dec.U.shape[-1]:
        rx = x - c @ dec.U.transpose(-1, -2)
        null = null + (rx * rx).sum(-1)
    return inner + null / s1[..., 0]


def _check_direction(W: torch.Tensor, E: torch.Tensor) -> None:
    if not isinstance(E, torch.Tensor) or E.ndim < 2 or tuple(E.shape[-2:]) != tuple(W.shape):
        shape = tuple(E.shape) if isinstance(E, torch.Tensor) else type(E).__name__
        raise LipverifyError(
            f"shape mismatch: direction E has shape {shape}, expected (..., {W.shape[0]}, {W.shape[1]})"
        )
    if E.dtype not in SUPPORTED_DTYPES:
        raise LipverifyError(f"direction E has unsupported dtype {E.dtype}")
    if not all_finite(E):
        raise LipverifyError("direction E contains non-finite entries")


def hessian_quadratic_form(W: torch.Tensor, E: torch.Tensor, method: str = "svd") -> torch.Tensor:
    """Lemma 13: ``vec(E)^T H vec(E)`` for a batch of directions E (..., m, n), never forming H.

    ``method="svd"`` (default): thin SVD and :func:`quadratic_form_from_projections`,
    O(mn r) once plus O(mn + (m+n) r) per direction.
    ``method="resolvent"``: ``s1 (y_perp^T R_V y_perp + x_perp^T R_U x_perp) + 2 y_perp^T R_V W^T x_perp``
    with the deflated resolvents ``R_V = (s1^2 I - W^T W + s1^2 v v^T)^{-1}`` restricted to v's
    complement (MATH section 2), one linear solve each. Returns (...,) in W's dtype.
    Gap policy of :func:`top_singular`; a value that overflows W's dtype raises :class:`LipverifyError`.
    """
    dec = decompose(W)
    _check_direction(W, E)
    _require_simple(dec, "W")
    dtype = dec.sigma.dtype
    Ec = E.to(dtype)
    u, v, s1 = dec.u, dec.v, dec.sigma1
    # matmul, not einsum: einsum contracts E's row axis through a copy (20x slower for 128 x 512 x 512)
    y = u @ Ec  # E^T u, (..., n)
    x = Ec @ v  # E v, (..., m)
    if method == "svd":
        q = quadratic_form_from_projections(dec, y, x)
    elif method == "resolvent":
        Wc = W.to(dtype)
        m, n = W.shape
        s1sq = s1 * s1
        A_V = s1sq * torch.eye(n, dtype=dtype, device=W.device) - Wc.T @ Wc + s1sq * torch.outer(v, v)
        A_U = s1sq * torch.eye(m, dtype=dtype, device=W.device) - Wc @ Wc.T + s1sq * torch.outer(u, u)
        y_perp = y - (y @ v)[..., None] * v
        x_perp = x - (x @ u)[..., None] * u
        try:
            Ry = torch.linalg.solve(A_V, y_perp.reshape(-1, n).T).T.reshape(y_perp.shape)
            Rx = torch.linalg.solve(A_U, x_perp.reshape(-1, m).T).T.reshape(x_perp.shape)
        except torch.linalg.LinAlgError as exc:
            raise DegenerateSpectrumError(
                f"W: the deflated resolvent (s1^2 I - W^T W) is numerically singular in {dtype} "
                f"(relative gap {float(dec.relative_gap):.3g}); use method='svd' or float64"
            ) from exc
        q = s1 * ((y_perp * Ry).sum(-1) + (x_perp * Rx).sum(-1)) + 2 * (Ry * (x_perp @ Wc)).sum(-1)
    else:
        raise LipverifyError(f"unknown method {method!r}; expected 'svd' or 'resolvent'")
    return _require_finite(q, W.dtype, f"the quadratic form (method={method!r})", dec)


def hessian_trace(W: torch.Tensor) -> torch.Tensor:
    """``tr H = sum_{k=2..r} 2 s1 / (s1^2 - s_k^2) + (m + n - 2r) / s1`` (MATH section 2), scalar in
    W's dtype. Gap policy of :func:`top_singular`; overflow in W's dtype raises :class:`LipverifyError`."""
    dec = decompose(W)
    _require_simple(dec, "W")
    return _require_finite(hessian_trace_from_spectrum(dec.sigma, *W.shape), W.dtype, "tr H", dec)


def separation_tolerance(r: int, dtype: torch.dtype) -> float:
    """Relative gap ``(sigma_1 - sigma_2) / sigma_1`` at or below which the two top computed singular
    values of a matrix with r = min(m, n) cannot be told apart: ``8 sqrt(r) eps(dtype)``, the square
    case of :func:`rounding_gap_tolerance` (``4 eps (sqrt(m) + sqrt(n)) >= 8 sqrt(r) eps``), so this
    check, used where only the spectrum is at hand, refuses nothing the public functions accept.

    An exactly degenerate sigma_1 = sigma_2 comes out with a computed gap anywhere from 0 to a few ulps,
    depending on the BLAS kernel and thread count (measured: 0 to 7 ulps over random rotations of
    diag(2, 2, 1)). A flat spectrum (all sigma equal, e.g. an orthogonal W) spreads further, up to
    ~1.2 r eps at r = 256 (measured); above this tolerance it gets the :class:`SpectralGapWarning` and
    the ``degenerate`` flag instead of the error. A tolerance linear in r would refuse resolvable gaps
    of wide float32 layers (4 r eps = 2.4e-4 at r = 512, against the flag threshold 3.5e-4)."""
    return 8.0 * math.sqrt(r) * torch.finfo(dtype).eps


def _require_separated_top(sigma: torch.Tensor, name: str = "W") -> None:
    """Raise :class:`DegenerateSpectrumError` when ``sigma_1 = sigma_2`` to working precision
    (``sigma_1 - sigma_2 <= separation_tolerance(r) sigma_1``; sigma (..., r), descending; for a
    batch, on any of them): sigma_1 is not differentiable there and the Hessian terms, which divide
    by ``sigma_1^2 - sigma_2^2``, are unbounded. A tolerance, not ``sigma_1 > sigma_2``: whether an
    exactly degenerate spectrum's computed values tie is a rounding coin flip of the kernel."""
    r = sigma.shape[-1]
    tol = separation_tolerance(r, sigma.dtype) if sigma.is_floating_point() else 0.0
    if r > 1 and not bool((sigma[..., 0] - sigma[..., 1] > tol * sigma[..., 0]).all()):
        value = f" = {float(sigma[0]):.6g}" if sigma.ndim == 1 else " on some batch entry"
        raise DegenerateSpectrumError(
            f"{name}: sigma_1 = sigma_2{value}; sigma_1 is not differentiable there and its Hessian is "
            "unbounded (Assumption 11 fails)"
        )


def hessian_trace_from_spectrum(sigma: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """tr H from the r = min(m, n) singular values (descending) of an m x n matrix; raises
    :class:`DegenerateSpectrumError` when ``sigma_1 = sigma_2``."""
    from lipverify import _generated

    _require_separated_top(sigma)

    s1, sk = sigma[0], sigma[1:]
    r = sigma.numel()
    return _generated.hessian_trace_pair_term(s1, sk).sum() + _generated.hessian_trace_null_term(s1, m, n, r)
