"""Itô dynamics of the exact (circular-model) operator norm of a Conv2d: complex Lemmas 12/13 and
Theorem 14 at the top frequency.

Circular model. A stride-1 Conv2d with ``padding_mode="circular"`` on an ``N1 x N2`` grid is block
circulant; the 2-D DFT block-diagonalises it into the per-frequency ``c_out x c_in`` transfer matrices

``W_hat_f = sum_{k1, k2} W[:, :, k1, k2] exp(-2 pi i (f1 k1 / N1 + f2 k2 / N2))``,  f in Z_N1 x Z_N2

(PyTorch's cross-correlation has the conjugate phase, i.e. ``W_hat_{-f}``: the same set of matrices),
so ``||conv||_2 = max_f sigma_1(W_hat_f)``. ``W -> W_hat_f`` is real-linear, so sigma_1 at the top
frequency f* is a smooth function of the real W where that maximum is attained by one conjugate pair
with a simple top singular value, and Lemma 12/13 apply to the complex matrix A = W_hat_{f*}
(derivations/conv_norm.py derives and checks these complex forms):

* complex Lemma 12: ``d sigma_1 = Re(u^H dA v)`` (u, v the top left/right singular vectors, A v = s1 u);
* complex Lemma 13: ``d^2 sigma_1[E, E] = sum_{k=2..r} [s1 (|a_k|^2 + |c_k|^2) + 2 s_k Re(a_k c_k)] /
  (s1^2 - s_k^2) + (||u^H E||^2 - sum_{k<=r} |a_k|^2 + ||E v||^2 - sum_{k<=r} |c_k|^2) / s1
  + Im(u^H E v)^2 / s1``, with ``a_k = u^H E v_k``, ``c_k = u_k^H E v``. The last term is the complex
  correction: the phase direction of (u, v) is a singular pair of the Hermitian dilation at -s1, at
  distance 2 s1; it vanishes for real A and E (then this is the real Lemma 13 exactly).

Conjugate frequencies. For real W, ``W_hat_{-f} = conj(W_hat_f)`` for every W, so
``sigma_1(W_hat_{-f}(W)) = sigma_1(W_hat_f(W))`` identically: the top of the frequency map is always
attained twice unless f* is self-conjugate (2 f* = 0 mod N), but the max over the pair is the single
smooth function ``W -> sigma_1(W_hat_{f*}(W))`` (both members move identically), so it is not a
degeneracy. A tie with a frequency outside {f*, -f*} is one (the max is a kink there; a one-sided
derivative and no Itô term): it is flagged through the frequency gap.

Helpers ``frequency_matrix`` and ``circular_frequency_norms`` are small local versions of the transfer
matrices (lipverify.conv, built separately, has the full operator-norm toolkit).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import torch

from lipverify._validation import (
    SUPPORTED_DTYPES,
    DegenerateSpectrumError,
    LipverifyError,
    all_finite,
)
from lipverify.dynamics import LayerTerms, NonFiniteTermError
from lipverify.noise import estimator_scale
from lipverify.spectral import SpectralGapWarning, gap_tolerance_for, rounding_gap_tolerance

# ---------------------------------------------------------------------------------------------
# Complex Lemma 12 / 13
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComplexDecomposition:
    """Thin SVD ``A = U diag(sigma) V^H`` of a complex (m, n) matrix, r = min(m, n), descending.

    ``U`` (m, r) and ``V`` (n, r) complex128, ``sigma`` (r,) float64.
    The top pair's common phase is fixed (v's largest-magnitude entry real positive) so results are
    deterministic; every formula is invariant to ``(u, v) -> e^{i theta} (u, v)``.
    """

    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor

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
        """``sigma_1 - sigma_2`` (``sigma_2 := 0`` when r = 1)."""
        return self.sigma[0] - (self.sigma[1] if self.sigma.numel() > 1 else 0.0)

    @property
    def relative_gap(self) -> float:
        return float(self.gap / self.sigma[0])


def _check_complex_matrix(A: torch.Tensor, name: str) -> None:
    if not isinstance(A, torch.Tensor):
        raise LipverifyError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim != 2 or A.numel() == 0:
        raise LipverifyError(f"{name} must be a non-empty matrix (m, n), got shape {tuple(A.shape)}")
    if A.dtype not in (torch.complex64, torch.complex128, *SUPPORTED_DTYPES):
        raise LipverifyError(f"{name} has unsupported dtype {A.dtype}")
    if not bool(torch.isfinite(torch.view_as_real(A.to(torch.complex128))).all()):
        raise LipverifyError(f"{name} contains non-finite entries (inf or NaN)")


def complex_decompose(A: torch.Tensor, name: str = "A") -> ComplexDecomposition:
    """Validated thin SVD of a complex (or real, promoted) matrix A (m, n); raises for sigma_1 = 0."""
    _check_complex_matrix(A, name)
    Ac = A.to(torch.complex128)  # every precision is decomposed in complex128 (float64 references)
    U, S, Vh = torch.linalg.svd(Ac, full_matrices=False)
    if not bool(S[0] > 0):
        raise DegenerateSpectrumError(f"{name}: sigma_1 = 0 (dead layer)")
    V = Vh.mH
    k = int(torch.argmax(V[:, 0].abs()))
    phase = V[k, 0] / V[k, 0].abs()
    U = U.clone()
    V = V.clone()
    U[:, 0] = U[:, 0] / phase  # A v = s u is kept: both columns get the same phase
    V[:, 0] = V[:, 0] / phase
    return ComplexDecomposition(U=U, sigma=S, V=V)


def _require_simple_top(
    dec: ComplexDecomposition, name: str, gap_tolerance: float | None, warn: bool
) -> bool:
    """Gap policy of lipverify.spectral.check_gap for a complex matrix: a relative gap at rounding
    level raises :class:`DegenerateSpectrumError`; below ``gap_tolerance`` returns True (flag) and
    warns when ``warn``."""
    m, n = dec.U.shape[0], dec.V.shape[0]
    real_dtype = dec.sigma.dtype
    rel = dec.relative_gap
    rounding = rounding_gap_tolerance(m, n, real_dtype)
    if rel <= rounding:
        raise DegenerateSpectrumError(
            f"{name}: sigma_1 = {float(dec.sigma[0]):.17g} and sigma_2 = "
            f"{float(dec.sigma[1]) if dec.sigma.numel() > 1 else 0.0:.17g} are equal up to rounding "
            f"(relative gap {rel:.3g} <= {rounding:.3g}): sigma_1 is not differentiable there and its "
            "Hessian is unbounded (Assumption 11 fails)"
        )
    tol = gap_tolerance_for(real_dtype) if gap_tolerance is None else gap_tolerance
    flagged = rel < tol
    if flagged and warn:
        warnings.warn(
            f"{name}: relative spectral gap {rel:.3g} below {tol:.3g}: the Hessian form is amplified like "
            f"1/gap = {1 / rel:.2g} (relative error ~ eps/gap)",
            SpectralGapWarning,
            stacklevel=3,
        )
    return flagged


def complex_sigma_jacobian(A: torch.Tensor, gap_tolerance: float | None = None) -> torch.Tensor:
    """Complex Lemma 12: the gradient ``J = u v^H`` (m, n complex) of sigma_1 at A, in the sense
    ``d sigma_1 = Re(u^H dA v) = Re(sum_ij conj(J_ij) dA_ij)`` for any complex direction dA.

    A (m, n) complex (or real); returns complex128. Gap policy of
    lipverify.spectral: DegenerateSpectrumError when sigma_1 = sigma_2 up to rounding, a
    SpectralGapWarning below ``max(1e-6, sqrt(eps))``.
    """
    dec = complex_decompose(A)
    _require_simple_top(dec, "A", gap_tolerance, warn=True)
    return torch.outer(dec.u, dec.v.conj())


def complex_quadratic_form_from_projections(
    dec: ComplexDecomposition, left: torch.Tensor, right: torch.Tensor, variant: str = "complex"
) -> torch.Tensor:
    """Complex Lemma 13 ``d^2 sigma_1[E, E]`` from ``left = u^H E`` (..., n) and ``right = E v`` (..., m).

    With ``a = left V`` (a_k = u^H E v_k), ``c = U^H right`` (c_k = u_k^H E v), a_1 = c_1 = u^H E v:
    ``sum_{k>=2} [s1 (|a_k|^2 + |c_k|^2) + 2 s_k Re(a_k c_k)] / ((s1 - s_k)(s1 + s_k))
    + (|left - a V^H|^2 + |right - U c|^2 + Im(a_1)^2) / s1``. Real (...,) output.

    ``variant="real_formula"`` is the deliberately wrong real Lemma 13 read with moduli (no
    ``Im(u^H E v)^2 / s1`` term); ``variant="real_parts"`` the wrong real Lemma 13 on Re a, Re c (and
    real-part residuals). Both exist only to show that the checks reject them.
    """
    a = left @ dec.V  # (..., r)
    c = right @ dec.U.conj()  # (..., r): c_k = u_k^H E v
    s1 = dec.sigma[0]
    sk = dec.sigma[1:]
    ak, ck = a[..., 1:], c[..., 1:]
    denom = (s1 - sk) * (s1 + sk)  # as a product: no cancellation (MATH section 7)
    res_left = left - a @ dec.V.mH
    res_right = right - c @ dec.U.T
    if variant == "real_parts":
        ak, ck, res_left, res_right = ak.real, ck.real, res_left.real, res_right.real
        inner = ((s1 * (ak * ak + ck * ck) + 2 * sk * ak * ck) / denom).sum(-1)
        null = (res_left * res_left).sum(-1) + (res_right * res_right).sum(-1)
        return inner + null / s1
    inner = ((s1 * (ak.abs() ** 2 + ck.abs() ** 2) + 2 * sk * (ak * ck).real) / denom).sum(-1)
    null = (res_left.abs() ** 2).sum(-1) + (res_right.abs() ** 2).sum(-1)
    if variant == "complex":
        null = null + a[..., 0].imag ** 2
    elif variant != "real_formula":
        raise LipverifyError(
            f"unknown variant {variant!r}; expected 'complex', 'real_formula' or 'real_parts'"
        )
    return inner + null / s1


def complex_hessian_quadratic_form(
    A: torch.Tensor, E: torch.Tensor, gap_tolerance: float | None = None, variant: str = "complex"
) -> torch.Tensor:
    """Complex Lemma 13: ``d^2/dt^2 sigma_1(A + t E)`` at t = 0 for a batch of complex directions
    E (..., m, n), never forming the (2mn x 2mn) real Hessian. Formula:
    :func:`complex_quadratic_form_from_projections`. Returns real (...,) float64. Gap policy of
    :func:`complex_sigma_jacobian` (the form scales like 1/gap)."""
    dec = complex_decompose(A)
    if not isinstance(E, torch.Tensor) or E.ndim < 2 or tuple(E.shape[-2:]) != tuple(A.shape):
        shape = tuple(E.shape) if isinstance(E, torch.Tensor) else type(E).__name__
        raise LipverifyError(
            f"shape mismatch: direction E has shape {shape}, expected (..., {A.shape[0]}, {A.shape[1]})"
        )
    _require_simple_top(dec, "A", gap_tolerance, warn=True)
    Ec = E.to(dec.U.dtype)
    left = dec.u.conj() @ Ec  # u^H E, (..., n)
    right = Ec @ dec.v  # E v, (..., m)
    q = complex_quadratic_form_from_projections(dec, left, right, variant)
    if not all_finite(q):
        raise LipverifyError(f"the complex Hessian form is not finite (relative gap {dec.relative_gap:.3g})")
    return q


# ---------------------------------------------------------------------------------------------
# The circular-model frequency map of a Conv2d kernel
# ---------------------------------------------------------------------------------------------


def _check_grid(grid) -> tuple[int, int]:
    if (
        not isinstance(grid, tuple | list)
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise LipverifyError(f"grid must be two positive ints (N1, N2), got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_kernel(weight: torch.Tensor, grid: tuple[int, int], name: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise LipverifyError(f"{name} must be a Conv2d weight (c_out, c_in, kh, kw), got {shape}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise LipverifyError(
            f"{name} has unsupported dtype {weight.dtype} (a real floating weight is needed)"
        )
    if not all_finite(weight):
        raise LipverifyError(f"{name} contains non-finite entries (inf or NaN)")
    if not bool((weight != 0).any()):
        raise LipverifyError(f"{name} is identically zero: the operator norm is 0")
    kh, kw = weight.shape[-2:]
    if kh > grid[0] or kw > grid[1]:
        raise LipverifyError(
            f"{name}: kernel {kh}x{kw} is larger than the grid {grid[0]}x{grid[1]}; the circular model "
            "would wrap the kernel onto itself"
        )


def _phases(kh: int, kw: int, freq: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``exp(-2 pi i (f1 k1 / N1 + f2 k2 / N2))`` (kh, kw) complex128; angles reduced mod N exactly."""
    k1 = torch.arange(kh, dtype=torch.int64)[:, None]
    k2 = torch.arange(kw, dtype=torch.int64)[None, :]
    f1, f2 = freq[0] % grid[0], freq[1] % grid[1]
    # integer phase numerators mod N keep the angle exact for any f
    angle = (k1 * f1 % grid[0]).to(torch.float64) / grid[0] + (k2 * f2 % grid[1]).to(torch.float64) / grid[1]
    return torch.polar(torch.ones_like(angle), -2 * math.pi * angle)


def frequency_matrix(weight: torch.Tensor, freq: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The transfer matrix of a kernel at one frequency (the linear map W -> W_hat_f):
    ``W_hat_f = sum_{k1, k2} W[..., :, :, k1, k2] exp(-2 pi i (f1 k1 / N1 + f2 k2 / N2))``.

    weight (..., c_out, c_in, kh, kw) real (leading batch axes allowed, e.g. per-sample gradients);
    freq (f1, f2) ints (taken mod N); grid (N1, N2). Returns (..., c_out, c_in) complex128.
    Equals ``torch.fft.fft2(weight, s=grid)[..., f1, f2]``."""
    grid = _check_grid(grid)
    if not isinstance(weight, torch.Tensor) or weight.ndim < 4:
        raise LipverifyError("frequency_matrix needs a weight of shape (..., c_out, c_in, kh, kw)")
    phase = _phases(weight.shape[-2], weight.shape[-1], tuple(int(f) for f in freq), grid)
    return (weight.to(torch.float64).to(torch.complex128) * phase).sum((-2, -1))


def frequency_adjoint(
    J: torch.Tensor, freq: tuple[int, int], grid: tuple[int, int], kernel: tuple[int, int]
) -> torch.Tensor:
    """Adjoint of the real-linear map W -> W_hat_f for the pairing ``Re <J, W_hat_f>``: the real
    (c_out, c_in, kh, kw) gradient ``Re(conj(J) exp(-2 pi i (f1 k1/N1 + f2 k2/N2)))`` of
    ``W -> Re(sum conj(J) W_hat_f(W))``. With J = u v^H this is the gradient of ||conv|| (complex
    Lemma 12 pulled back to the kernel)."""
    grid = _check_grid(grid)
    phase = _phases(kernel[0], kernel[1], freq, grid)
    return (J.conj()[..., None, None] * phase).real


def circular_frequency_norms(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """sigma_1(W_hat_f) at every frequency: (N1, N2) float64, by one 2-D FFT of the zero-padded kernel
    and a batched SVD. Its max is the exact operator norm of the stride-1 circular conv on the grid."""
    grid = _check_grid(grid)
    _check_kernel(weight, grid, "weight")
    spectrum = torch.fft.fft2(weight.to(torch.float64), s=grid)  # (c_out, c_in, N1, N2)
    return torch.linalg.svdvals(spectrum.permute(2, 3, 0, 1))[..., 0]


def circular_conv_norm(weight: torch.Tensor, grid: tuple[int, int]) -> float:
    """``||conv||_2 = max_f sigma_1(W_hat_f)`` of the stride-1 circular conv on ``grid`` (float)."""
    return float(circular_frequency_norms(weight, grid).max())


@dataclass(frozen=True)
class TopFrequency:
    """Where the circular-model norm is attained.

    ``frequency``: f* (the canonical member of {f*, -f*}: the lexicographically smaller one mod N);
    ``conjugate``: -f* mod N; ``self_conjugate``: f* = -f* (W_hat_{f*} real); ``norm``: sigma_1 at f*;
    ``runner_up``: the largest sigma_1 over frequencies outside {f*, -f*} (0.0 if none) at
    ``runner_up_frequency``; ``frequency_gap = norm - runner_up``; ``conjugate_mismatch``: the
    computed |sigma_1(f*) - sigma_1(-f*)| (rounding only, for real W).
    """

    frequency: tuple[int, int]
    conjugate: tuple[int, int]
    self_conjugate: bool
    norm: float
    runner_up: float
    runner_up_frequency: tuple[int, int] | None
    frequency_gap: float
    conjugate_mismatch: float

    @property
    def relative_frequency_gap(self) -> float:
        return self.frequency_gap / self.norm


def top_frequency(weight: torch.Tensor, grid: tuple[int, int]) -> TopFrequency:
    """Locate f* = argmax_f sigma_1(W_hat_f), pair it with its conjugate -f* and measure the gap to the
    best frequency outside the pair (see the module docstring for why the pair is not a degeneracy)."""
    grid = _check_grid(grid)
    norms = circular_frequency_norms(weight, grid)
    N1, N2 = grid
    flat = int(torch.argmax(norms))
    f = (flat // N2, flat % N2)
    conj = ((-f[0]) % N1, (-f[1]) % N2)
    canonical = min(f, conj)
    partner = conj if canonical == f else f
    others = norms.clone()
    others[f] = -1.0
    others[conj] = -1.0
    best_other = int(torch.argmax(others))
    if float(others.view(-1)[best_other]) < 0:  # 1x1 or 1x2 grid: no frequency outside the pair
        runner_up, runner_freq = 0.0, None
    else:
        runner_up, runner_freq = float(others.view(-1)[best_other]), (best_other // N2, best_other % N2)
    norm = float(norms[canonical])
    return TopFrequency(
        frequency=canonical,
        conjugate=partner,
        self_conjugate=canonical == partner,
        norm=norm,
        runner_up=runner_up,
        runner_up_frequency=runner_freq,
        frequency_gap=float(norms[f]) - runner_up,
        conjugate_mismatch=abs(float(norms[f]) - float(norms[conj])),
    )


# ---------------------------------------------------------------------------------------------
# Theorem 14 of the exact circular conv norm
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvNormTerms:
    """Theorem 14 terms of ``||conv|| = max_f sigma_1(W_hat_f)`` at one step.

    ``terms``: :class:`lipverify.dynamics.LayerTerms` (sigma = the norm, mu, phi, psi; ``gap`` the
    smaller of the matrix gap and the frequency gap, ``degenerate`` if either is flagged), ready for
    :func:`lipverify.dynamics.network_terms` / :func:`predict_bound`. ``top``: the
    :class:`TopFrequency`; ``matrix_gap``: sigma_1 - sigma_2 of W_hat_{f*}; ``frequency_flagged``:
    the relative frequency gap is below the tolerance (another frequency ties: the max has a kink and
    the terms are those of f*'s branch only); ``matrix_flagged``: the matrix gap is.
    """

    terms: LayerTerms
    top: TopFrequency
    matrix_gap: float
    matrix_flagged: bool
    frequency_flagged: bool

    @property
    def near_tie(self) -> bool:
        """The frequency gap is below 2 phi (one step's noise std of the norm): the top frequency may
        switch within a step or two. Not a degeneracy of f*'s branch, but the max then gains drift that
        Theorem 14 at f* does not see (E max(X, Y) > max(E X, E Y)); reported as a diagnostic."""
        return self.top.frequency_gap < 2 * self.terms.phi

    def as_dict(self) -> dict:
        out = dict(self.terms.as_dict())
        out.update(
            frequency=list(self.top.frequency),
            self_conjugate=self.top.self_conjugate,
            matrix_gap=self.matrix_gap,
            frequency_gap=self.top.frequency_gap,
            matrix_flagged=self.matrix_flagged,
            frequency_flagged=self.frequency_flagged,
            near_tie=self.near_tie,
        )
        return out


def conv_norm_terms(
    weight: torch.Tensor,
    per_sample_grads: torch.Tensor,
    lr: float,
    grid: tuple[int, int],
    mean_grad: torch.Tensor | None = None,
    population_size: int | None = None,
    gap_tolerance: float | None = None,
    name: str = "conv",
) -> ConvNormTerms:
    """Theorem 14 for the exact circular-model norm of a Conv2d, mirroring
    :func:`lipverify.dynamics.layer_terms` with the map ``W -> W_hat_{f*}`` applied first.

    weight (c_out, c_in, kh, kw) real; per_sample_grads (b, c_out, c_in, kh, kw), b >= 2; mean_grad
    (c_out, c_in, kh, kw) estimate of grad_L (default: the batch mean); grid (N1, N2) the input size.
    With A = W_hat_{f*}, (u, v) its top pair, ``E_i = W_hat_{f*}(G_i - G_bar)`` and
    ``scale = (1 - b/N) / (b (b - 1))`` (Proposition 5, :func:`lipverify.noise.estimator_scale`):

    * ``mu = -lr Re(u^H W_hat_{f*}(grad_L) v)``                 (drift, complex Lemma 12)
    * ``phi = lr sqrt(scale sum_i Re(u^H E_i v)^2)``             (diffusion)
    * ``psi = (lr^2 / 2) scale sum_i q(E_i)``                    (Itô term, complex Lemma 13 form q)

    Computed in float64 / complex128; returns Python floats. Gap policy: sigma_1 = sigma_2 of
    W_hat_{f*} up to rounding raises :class:`DegenerateSpectrumError`; a relative matrix gap or a
    relative frequency gap below ``gap_tolerance`` (default :func:`gap_tolerance_for` float64) flags
    the result ``degenerate`` with a :class:`SpectralGapWarning` naming which. The conjugate partner
    -f* is not a degeneracy (module docstring).
    """
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise LipverifyError(f"{name}: the learning rate must be positive and finite, got {lr}")
    grid = _check_grid(grid)
    _check_kernel(weight, grid, name)
    if not isinstance(per_sample_grads, torch.Tensor) or tuple(per_sample_grads.shape[1:]) != tuple(
        weight.shape
    ):
        shape = tuple(per_sample_grads.shape) if isinstance(per_sample_grads, torch.Tensor) else None
        raise LipverifyError(
            f"shape mismatch: per_sample_grads has shape {shape}, expected (b, *{tuple(weight.shape)})"
        )
    b = per_sample_grads.shape[0]
    scale = estimator_scale(b, population_size)  # refuses b = 1 (Proposition 5)
    if not all_finite(per_sample_grads):
        raise LipverifyError(f"{name}: per_sample_grads contains non-finite entries (inf or NaN)")
    G = per_sample_grads.to(torch.float64)
    G_bar = G.mean(0)
    if mean_grad is None:
        mean_grad = G_bar
    elif not isinstance(mean_grad, torch.Tensor) or tuple(mean_grad.shape) != tuple(weight.shape):
        raise LipverifyError(f"shape mismatch: mean_grad must have the weight's shape {tuple(weight.shape)}")
    elif mean_grad.dtype not in SUPPORTED_DTYPES or not all_finite(mean_grad):
        raise LipverifyError(f"{name}: mean_grad must be a finite real floating tensor ({mean_grad.dtype})")

    top = top_frequency(weight, grid)
    A = frequency_matrix(weight, top.frequency, grid)
    dec = complex_decompose(A, f"{name} at frequency {top.frequency}")
    tol = gap_tolerance_for(torch.float64) if gap_tolerance is None else gap_tolerance
    matrix_flagged = _require_simple_top(dec, f"{name} at frequency {top.frequency}", tol, warn=False)
    frequency_flagged = top.relative_frequency_gap < tol
    E = frequency_matrix(G - G_bar, top.frequency, grid)  # centre before mapping (MATH section 7)
    left = dec.u.conj() @ E  # u^H E_i, (b, n)
    right = E @ dec.v  # E_i v, (b, m)
    proj = (left @ dec.v).real  # Re(u^H E_i v), (b,)
    q = complex_quadratic_form_from_projections(dec, left, right)
    drift = float((dec.u.conj() @ frequency_matrix(mean_grad, top.frequency, grid) @ dec.v).real)
    sigma = top.norm
    gap = min(float(dec.gap), top.frequency_gap)
    terms = LayerTerms(
        sigma=sigma,
        mu=-lr * drift,
        phi=lr * math.sqrt(max(float((proj * proj).sum()) * scale, 0.0)),
        psi=0.5 * lr * lr * float(q.sum()) * scale,
        gap=gap,
        degenerate=matrix_flagged or frequency_flagged,
        noise_projections=lr * math.sqrt(scale) * proj,
    )
    for key in ("mu", "phi", "psi"):
        if not math.isfinite(getattr(terms, key)):
            raise NonFiniteTermError(f"{name}: {key} is not finite (gap {gap:.3g}); check the inputs")
    if terms.degenerate:
        why = []
        if matrix_flagged:
            why.append(f"relative gap sigma_1 - sigma_2 of W_hat_{top.frequency} is {dec.relative_gap:.3g}")
        if frequency_flagged:
            why.append(
                f"frequency {top.runner_up_frequency} ties with {top.frequency} (relative frequency gap "
                f"{top.relative_frequency_gap:.3g}): the norm is a max with a kink, "
                "the terms are one branch's"
            )
        warnings.warn(
            f"{name}: " + "; ".join(why) + f" (below {tol:.3g}); flagged degenerate",
            SpectralGapWarning,
            stacklevel=2,
        )
    return ConvNormTerms(
        terms=terms,
        top=top,
        matrix_gap=float(dec.gap),
        matrix_flagged=matrix_flagged,
        frequency_flagged=frequency_flagged,
    )


def conv_norm_gradient(weight: torch.Tensor, grid: tuple[int, int], variant: str = "complex") -> torch.Tensor:
    """Gradient of ``||conv|| = max_f sigma_1(W_hat_f)`` with respect to the real kernel (c_out, c_in,
    kh, kw) float64: complex Lemma 12 at f* pulled back, ``Re(conj(u v^H)_{oi} e^{-2 pi i <f*, k / N>})``.

    ``variant="unconjugated"`` is the deliberately wrong ``Re(u^T dA v)`` (u not conjugated), for the
    tests. Valid where the top frequency pair is unique
    and its sigma_1 simple (:func:`conv_norm_terms` flags otherwise)."""
    top = top_frequency(weight, _check_grid(grid))
    dec = complex_decompose(frequency_matrix(weight, top.frequency, grid))
    _require_simple_top(dec, "W_hat_f*", None, warn=True)
    if variant == "complex":
        J = torch.outer(dec.u, dec.v.conj())
    elif variant == "unconjugated":
        J = torch.outer(dec.u.conj(), dec.v.conj())  # Re(<J, dA>) = Re(u^T dA v)
    else:
        raise LipverifyError(f"unknown variant {variant!r}; expected 'complex' or 'unconjugated'")
    return frequency_adjoint(J, top.frequency, grid, tuple(weight.shape[-2:]))


# ---------------------------------------------------------------------------------------------
# Along a training run (``conv_norm_every``): records, prediction, figure
# ---------------------------------------------------------------------------------------------

#: per-layer fields of ``conv_norm.csv``: ``norm`` = max_f sigma_1(W_hat_f) of the circular model on
#: the layer's padded input grid; Theorem 14 terms with the batch-mean drift (``mu``) and, at steps
#: where the run computes the full-data gradient, the full-data drift (``mu_full``)
CONV_NORM_FIELDS = ("norm", "mu", "mu_full", "psi", "phi", "frequency_gap", "frequency_flagged", "near_tie")
CONV_NORM_FILE = "conv_norm.csv"


def conv_norm_columns(names) -> list[str]:
    """Header of ``conv_norm.csv``: step, then ``<layer>.<field>`` for :data:`CONV_NORM_FIELDS`."""
    return ["step", *(f"{n}.{f}" for n in names for f in CONV_NORM_FIELDS)]


def conv_layer_grids(model: torch.nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Name -> grid (N1, N2) of the circular model of every Conv2d (``conv_spec(...).circular_grid``:
    the zero-padded input size, or the input size for circular padding), found from the input shapes
    of one eval-mode, no-grad forward of ``sample`` (1, ...). Eval mode draws no random numbers; the
    mode is restored. A Conv2d with dilation != 1 is refused (the phases here assume taps 1 apart).
    A strided Conv2d gets the stride-1 circular model of its kernel on that grid: an upper bound of
    the layer's norm (subsampling has norm <= 1), looser than lipverify.conv's polyphase bound."""
    from lipverify.conv import conv_spec

    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for n, m in convs.items():
        if tuple(m.dilation) != (1, 1) or m.groups != 1:
            raise LipverifyError(
                f"conv_norm_every: layer {n} has dilation {tuple(m.dilation)}, groups {m.groups}; "
                "only dilation 1 and groups 1 are supported"
            )
    shapes: dict[str, tuple[int, ...]] = {}

    def keep_shape(name: str):
        def hook(module, args) -> None:  # returns None: the input is not replaced
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    hooks = [m.register_forward_pre_hook(keep_shape(n)) for n, m in convs.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n: tuple(conv_spec(m, shapes[n]).circular_grid) for n, m in convs.items()}


def per_sample_conv_gradients(
    model: torch.nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor, names
) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``G_i = grad_W l(f(x_i), y_i)`` of each named Conv2d weight, by
    ``torch.func`` (``functional_call`` + ``vmap(grad)``), in the model's current mode (dropout masks
    drawn independently per sample, ``randomness="different"``). Returns name -> (b, *weight.shape)
    in the weight's dtype. Leaves no trace: the global random streams are forked and the buffers
    restored, so a training run is bitwise the same with or without this call. ``loss_fn(out, y)``
    must be mean-reduced; a model whose sample loss depends on the batch (batch norm in training
    mode) has no per-sample gradient and must not be passed."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    wanted = {f"{n}.weight": params[f"{n}.weight"] for n in names}
    rest = {k: v for k, v in params.items() if k not in wanted}

    def sample_loss(weights, xi, yi):
        out = functional_call(model, ({**rest, **weights}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    saved = [b.clone() for b in buffers.values()]
    devices = sorted({p.device.index or 0 for p in params.values() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices):
            g = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(wanted, inputs, targets)
    finally:
        with torch.no_grad():
            for b, old in zip(buffers.values(), saved, strict=True):
                b.copy_(old)
    return {n: g[f"{n}.weight"] for n in names}


def conv_norm_record(
    model: torch.nn.Module,
    loss_fn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    grids: dict[str, tuple[int, int]],
    step: int,
    population_size: int | None = None,
    full_grads: dict[str, torch.Tensor] | None = None,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
) -> dict:
    """One row of ``conv_norm.csv`` at W_t on the training batch (inputs (b, ...), targets (b,)):
    per Conv2d in ``grids``, :func:`conv_norm_terms` with the per-sample gradients of
    :func:`per_sample_conv_gradients`. The SGD step is ``W -= lr (grad_scale G_B + weight_decay W)``,
    so the terms are those of the effective rate ``lr * grad_scale`` with drift gradient
    ``G + (weight_decay / grad_scale) W``; ``mu`` uses the batch mean G_B, ``mu_full`` the full-data
    gradient ``full_grads[name]`` (any shape with the weight's numel) when given. Gap warnings are
    not raised here: they are the ``frequency_flagged`` column (and the matrix gap flag is folded in)."""
    grads = per_sample_conv_gradients(model, loss_fn, inputs, targets, list(grids))
    row: dict = {"step": step}
    eta = lr * grad_scale
    for name, grid in grids.items():
        W = dict(model.named_parameters())[f"{name}.weight"].detach()
        decay = (weight_decay / grad_scale) * W.to(torch.float64)
        G = grads[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpectralGapWarning)  # recorded as flags
            out = conv_norm_terms(
                W,
                G,
                eta,
                grid,
                mean_grad=G.to(torch.float64).mean(0) + decay,
                population_size=population_size,
                name=name,
            )
            mu_full = None
            if full_grads is not None and full_grads.get(name) is not None:
                full = full_grads[name].reshape(W.shape).to(torch.float64) + decay
                mu_full = conv_norm_terms(
                    W, G, eta, grid, mean_grad=full, population_size=population_size, name=name
                ).terms.mu
        t = out.terms
        row.update(
            {
                f"{name}.norm": t.sigma,
                f"{name}.mu": t.mu,
                f"{name}.mu_full": mu_full,
                f"{name}.psi": t.psi,
                f"{name}.phi": t.phi,
                f"{name}.frequency_gap": out.top.frequency_gap,
                f"{name}.frequency_flagged": out.terms.degenerate,
                f"{name}.near_tie": out.near_tie,
            }
        )
    return row


def conv_norm_final_row(model: torch.nn.Module, grids: dict[str, tuple[int, int]], step: int) -> dict:
    """The closing row of ``conv_norm.csv``: the observed norm of each layer at W_T, no terms."""
    params = dict(model.named_parameters())
    return {
        "step": step,
        **{f"{n}.norm": circular_conv_norm(params[f"{n}.weight"].detach(), g) for n, g in grids.items()},
    }


def conv_norm_prediction(rows) -> dict:
    """Fig. 2's forecast for each conv layer's norm from ``conv_norm.csv`` rows (dicts, increasing
    step; term rows at steps t_0 < t_1 < ... and a last row with the norm only).

    The terms are evaluated at the record steps and held constant until the next one (``k_j =
    t_{j+1} - t_j`` steps), accumulated by :func:`lipverify.prediction.log_bound_forecast` (Theorem
    15 for one factor): ``m_{t_{j+1}} = m_{t_j} + k_j ((mu + psi) / norm - phi^2 / (2 norm^2))`` and
    ``v_{t_{j+1}} = v_{t_j} + k_j phi^2 / norm^2`` from ``m_0 = ln norm_0``. The drift is the
    full-data ``mu_full`` when every term row has it (a forecast), else the batch ``mu`` (the
    realised batch drift: a one-step decomposition, not a forecast; ``drift`` says which).
    Compared with the observed ``ln norm`` at the record steps: predicted and observed change,
    ``z_T``, :func:`lipverify.prediction.calibration` (verdict, +/- 2 std coverage), and the counts of
    frequency-flagged and near-tie steps. Returns ``{layer: dict}``."""
    from lipverify.dynamics import network_terms
    from lipverify.prediction import calibration, log_bound_forecast

    rows = sorted(rows, key=lambda r: r["step"])
    term_rows = [r for r in rows if r.get(next(k for k in r if k.endswith(".mu"))) is not None]
    if len(rows) < 2 or not term_rows:
        raise LipverifyError("conv_norm.csv needs at least one row with terms and a later row")
    names = [k.removesuffix(".norm") for k in rows[0] if k.endswith(".norm")]
    out = {}
    for name in names:
        full = all(r.get(f"{name}.mu_full") is not None for r in term_rows)
        drift_key = f"{name}.mu_full" if full else f"{name}.mu"
        series, k_steps = [], []
        for r, nxt in itertools.pairwise(rows):
            if r.get(f"{name}.mu") is None:
                raise LipverifyError(f"conv_norm.csv: row at step {int(r['step'])} has no terms for {name}")
            term = LayerTerms(
                sigma=r[f"{name}.norm"], mu=r[drift_key], phi=r[f"{name}.phi"], psi=r[f"{name}.psi"], gap=1.0
            )
            k = int(nxt["step"] - r["step"])
            series += [network_terms([term])] * k  # held between evaluations
            k_steps.append(k)
        log_obs_all = [math.log(r[f"{name}.norm"]) for r in rows]
        m_all, v_all = log_bound_forecast(log_obs_all[0], series)
        at = [int(r["step"] - rows[0]["step"]) for r in rows]
        m, v = [m_all[i] for i in at], [v_all[i] for i in at]
        cal = calibration(log_obs_all, m, v)
        change = log_obs_all[-1] - log_obs_all[0]
        out[name] = {
            "drift": "full-data mu (forecast)" if full else "batch mu (realised drift; not a forecast)",
            "records": len(term_rows),
            "steps": int(rows[-1]["step"] - rows[0]["step"]),
            "norm_0": rows[0][f"{name}.norm"],
            "norm_T": rows[-1][f"{name}.norm"],
            "observed_log_change": change,
            "predicted_log_change": m[-1] - m[0],
            "predicted_log_std": math.sqrt(v[-1]),
            "z_T": (log_obs_all[-1] - m[-1]) / math.sqrt(v[-1]) if v[-1] > 0 else None,
            "coverage_2std": cal["coverage_2std"],
            "calibration": cal["verdict"],
            "flagged_steps": sum(bool(r[f"{name}.frequency_flagged"]) for r in term_rows),
            "near_tie_steps": sum(bool(r[f"{name}.near_tie"]) for r in term_rows),
            "series": {
                "step": [int(r["step"]) for r in rows],
                "observed_log": log_obs_all,
                "mean": m,
                "var": v,
            },
        }
    return out


def plot_conv_norm(rows, path):
    """``conv_norm.png``: per conv layer, observed ln norm against the predicted mean +/- 2 std."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = conv_norm_prediction(rows)
    fig, axes = plt.subplots(1, len(pred), figsize=(4.2 * len(pred), 3.4), squeeze=False)
    for ax, (name, p) in zip(axes[0], pred.items(), strict=True):
        s, mean = p["series"]["step"], p["series"]["mean"]
        std = [math.sqrt(x) for x in p["series"]["var"]]
        ax.plot(s, p["series"]["observed_log"], "k-", lw=1, label="observed ln ||conv||")
        ax.plot(s, mean, "C3-", lw=1, label=f"predicted mean ({p['drift'].split(' (')[0]})")
        ax.fill_between(
            s,
            [a - 2 * b for a, b in zip(mean, std, strict=True)],
            [a + 2 * b for a, b in zip(mean, std, strict=True)],
            color="C3",
            alpha=0.2,
            label="+/- 2 std",
        )
        ax.set_xlabel("step")
        ax.set_title(f"{name}: circular-model norm, Theorem 14", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
