"""The operator norm of a Conv2d as the layer is used, with certified bounds, and its frequency response.

The object: ``A: R^{c_in x H x W} -> R^{c_out x L1 x L2}``, ``x -> conv2d(pad(x), W, stride, dilation)``
without bias (PyTorch's cross-correlation ``y[o,i,j] = sum_{c,a,b} W[o,c,a,b] xp[c, s1 i + d1 a,
s2 j + d2 b]``), for zero (``"zeros"``) or ``"circular"`` padding. Its Lipschitz constant in l2 is
``||A||_2``. The framework's ``sigma_1`` of the reshaped ``(c_out, c_in kh kw)`` kernel matrix is
neither an upper nor a lower bound of it (issue 16).

Circular model (derivations/conv_operator.py). A stride-1 circular cross-correlation ``C`` on an
``N1 x N2`` grid is diagonalised by the 2-D DFT: on the Fourier mode ``x = v e^{2 pi i (f1 n1/N1 +
f2 n2/N2)}`` it acts as ``C x = (T_f v) e^{...}`` with the transfer matrix

    ``T_f = sum_{a,b} W[:, :, a, b] exp(+2 pi i (f1 d1 a / N1 + f2 d2 b / N2))``   (c_out, c_in)

(the ``+`` sign because PyTorch's conv2d is a cross-correlation; for a real kernel ``T_f`` is the
complex conjugate of the convolution DFT ``sum W e^{-2 pi i f.k/N}``, so the singular values are
the same at every f). Hence ``||C||_2 = max_f sigma_1(T_f)``, exactly.

Certified bounds (:func:`conv_operator_norm`):

* upper, ``"zeros"``: the zero-padded stride-1 operator is ``R C P`` with P the isometric embedding
  into the padded grid (``N = H + pad_lo + pad_hi``), C the circular cross-correlation on that grid
  and R the restriction to the valid outputs (indices ``i <= N - d(k-1) - 1``, where no tap wraps
  around); ``||R||, ||P|| <= 1`` so ``||A_1|| <= ||C||``. A strided conv is ``S A_1`` with S the
  subsampling ``i -> s i``: it is the compression of the *strided* circular conv on the padded grid
  rounded up to a multiple of s, whose norm is exact in polyphase form (:func:`transfer_matrices`
  with ``stride``: c_out x c_in s1 s2 matrices on the grid N/s), so the bound keeps the stride (the
  stride-1 bound, ``||S|| <= 1``, is also valid but looser). Dilation is the kernel with d-1 zeros
  between taps, placed at offsets ``d a mod N``.
* upper, ``"circular"``: the operator is the circular cross-correlation on the ``H x W`` grid itself,
  shifted by the padding and restricted to ``L`` outputs (and subsampled by the stride); when
  ``L <= H`` these are distinct rows of C (strided, polyphase, when s divides H), so
  ``||A|| <= ||C||``, with equality when ``L = H`` and s divides H (A is then C, rows permuted).
* lower: ``||A x|| / ||x||`` of the explicit vector x that power iteration on ``A^T A`` returns
  (``A^T`` is ``conv_transpose2d`` then cropping the padding; autograd of the pad for circular
  padding). Any x gives ``||A x|| / ||x|| <= ||A||``.

Both are evaluated in float64; the only error is rounding, covered by the relative margin
:data:`ROUNDING_MARGIN` (upper multiplied by ``1 + margin``, lower by ``1 - margin``): the FFT's
relative error is ``O(eps log N)`` and the SVD's backward error ``O(eps min(c_out, c_in))``, both
below ``1e-12`` for grids up to ``10^6`` pixels and up to ``10^4`` channels.

Refused with a :class:`LipverifyError`: grouped convs, ``"reflect"``/``"replicate"`` padding,
circular padding wider than the grid (rows would repeat), an input too small for the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipverify._validation import LipverifyError

#: relative rounding margin of the certified bounds (see the module docstring)
ROUNDING_MARGIN = 1e-10
#: bins of the radial frequency profile over the normalised radius ``|f/N|`` in ``[0, sqrt(2)/2]``
RADIAL_BINS = 8
POWER_ITERATIONS = 100
POWER_TOL = 1e-7


@dataclass(frozen=True)
class ConvSpec:
    """A bias-free Conv2d as an operator: float64 ``weight`` (c_out, c_in, kh, kw), ``input_shape``
    (c_in, H, W), ``stride``/``dilation`` (2,), ``pad`` ``(h_lo, h_hi, w_lo, w_hi)``, ``padding_mode``."""

    weight: torch.Tensor
    input_shape: tuple[int, int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]
    padding_mode: str

    @property
    def padded_grid(self) -> tuple[int, int]:
        _, H, W = self.input_shape
        return H + self.pad[0] + self.pad[1], W + self.pad[2] + self.pad[3]

    @property
    def stride1_output(self) -> tuple[int, int]:
        """Output size of the stride-1 operator: ``N - d (k - 1)`` per dimension."""
        (n1, n2), (_, _, kh, kw) = self.padded_grid, self.weight.shape
        return n1 - self.dilation[0] * (kh - 1), n2 - self.dilation[1] * (kw - 1)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        l1, l2 = self.stride1_output
        return self.weight.shape[0], (l1 - 1) // self.stride[0] + 1, (l2 - 1) // self.stride[1] + 1

    @property
    def circular_grid(self) -> tuple[int, int]:
        """The grid of the circular embedding: the padded grid (zeros) or the input grid (circular)."""
        return self.padded_grid if self.padding_mode == "zeros" else tuple(self.input_shape[1:])

    @property
    def embedding_grid(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(grid, stride) of the circular operator A is a compression of. Zeros: the padded grid
        rounded up to a multiple of the stride (more zero padding: still an isometric embedding,
        and no valid output reads past ``N - 1``), with the stride. Circular: the input grid, with
        the stride when it divides the grid, else stride 1 (the subsampled rows are rows of it)."""
        if self.padding_mode == "zeros":
            grid = tuple(-(-n // s) * s for n, s in zip(self.padded_grid, self.stride, strict=True))
            return grid, self.stride  # type: ignore[return-value]
        grid = tuple(self.input_shape[1:])
        divides = all(n % s == 0 for n, s in zip(grid, self.stride, strict=True))
        return grid, (self.stride if divides else (1, 1))  # type: ignore[return-value]

    @property
    def exact(self) -> bool:
        """True when the upper bound is the exact norm: circular padding, L = H and W outputs at
        stride 1, and the stride divides the grid (A is then the strided circular conv, rows permuted)."""
        grid, stride = self.embedding_grid
        return self.padding_mode == "circular" and self.stride1_output == grid and stride == self.stride


def _pair(value, name: str) -> tuple[int, int]:
    out = (value, value) if isinstance(value, int) else tuple(value)
    if len(out) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise LipverifyError(f"{name} must be an int or a pair of ints, got {value!r}")
    return out  # type: ignore[return-value]


def conv_spec(
    conv_or_weight: nn.Conv2d | torch.Tensor,
    input_shape,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
) -> ConvSpec:
    """The operator of ``conv_or_weight`` on inputs of ``input_shape`` ((c_in, H, W) or (H, W)).
    An ``nn.Conv2d`` supplies its own stride, padding, dilation and padding mode (the keyword
    arguments are then ignored); a weight tensor (c_out, c_in, kh, kw) uses them."""
    if isinstance(conv_or_weight, nn.Conv2d):
        m = conv_or_weight
        if m.groups != 1:
            raise LipverifyError(f"grouped Conv2d (groups={m.groups}) is not supported")
        weight, stride, padding, dilation, padding_mode = (
            m.weight,
            m.stride,
            m.padding,
            m.dilation,
            m.padding_mode,
        )
    elif isinstance(conv_or_weight, torch.Tensor):
        weight = conv_or_weight
    else:
        raise LipverifyError(f"expected an nn.Conv2d or a weight tensor, got {type(conv_or_weight).__name__}")
    if weight.dim() != 4:
        raise LipverifyError(f"a Conv2d weight has shape (c_out, c_in, kh, kw), got {tuple(weight.shape)}")
    weight = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(weight).all()):
        raise LipverifyError("the conv weight has non-finite entries")
    if padding_mode not in ("zeros", "circular"):
        raise LipverifyError(
            f"padding_mode {padding_mode!r} is not covered (only 'zeros' and 'circular'): "
            "reflect/replicate padding is not a compression of a circular conv"
        )
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (weight.shape[1], *shape)
    if len(shape) != 3 or shape[0] != weight.shape[1]:
        raise LipverifyError(f"input_shape {tuple(input_shape)} does not match c_in = {weight.shape[1]}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(shape) < 1:
        raise LipverifyError(f"stride {stride}, dilation {dilation} and input_shape {shape} must be >= 1")
    kh, kw = weight.shape[2:]
    if padding == "valid":
        pad = (0, 0, 0, 0)
    elif padding == "same":
        th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
        pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = _pair(padding, "padding")
        if min(ph, pw) < 0:
            raise LipverifyError(f"padding must be >= 0, got {padding!r}")
        pad = (ph, ph, pw, pw)
    spec = ConvSpec(weight, shape, stride, dilation, pad, padding_mode)
    if min(spec.stride1_output) < 1:
        raise LipverifyError(
            f"input {shape[1:]} with padding {pad} is smaller than the dilated kernel "
            f"({dilation[0] * (kh - 1) + 1} x {dilation[1] * (kw - 1) + 1})"
        )
    if padding_mode == "circular" and (
        max(pad[:2]) > shape[1]
        or max(pad[2:]) > shape[2]
        or spec.stride1_output[0] > shape[1]
        or spec.stride1_output[1] > shape[2]
    ):
        raise LipverifyError(
            f"circular padding {pad} on a {shape[1:]} grid gives {spec.stride1_output} stride-1 outputs: "
            "more than the grid, so rows of the circular conv repeat; not covered"
        )
    return spec


def apply_conv(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    """``A x`` for x (B, c_in, H, W) float64."""
    mode = "constant" if spec.padding_mode == "zeros" else "circular"
    h_lo, h_hi, w_lo, w_hi = spec.pad
    xp = F.pad(x, (w_lo, w_hi, h_lo, h_hi), mode=mode) if any(spec.pad) else x
    return F.conv2d(xp, spec.weight, stride=spec.stride, dilation=spec.dilation)


def apply_adjoint(spec: ConvSpec, y: torch.Tensor) -> torch.Tensor:
    """``A^T y`` for y (B, c_out, L1', L2'): ``conv_transpose2d`` onto the padded grid, then the
    padding cropped (zeros); for circular padding the adjoint of the pad by autograd."""
    if spec.padding_mode == "circular":
        x = torch.zeros(y.shape[0], *spec.input_shape, dtype=y.dtype, requires_grad=True)
        (g,) = torch.autograd.grad(apply_conv(spec, x), x, grad_outputs=y)
        return g
    n1, n2 = spec.padded_grid
    z = F.conv_transpose2d(y, spec.weight, stride=spec.stride, dilation=spec.dilation)
    # rows of the padded grid no output reads (stride remainder) get zero
    z = F.pad(z, (0, n2 - z.shape[3], 0, n1 - z.shape[2]))
    h_lo, _, w_lo, _ = spec.pad
    _, H, W = spec.input_shape
    return z[:, :, h_lo : h_lo + H, w_lo : w_lo + W]


def conv_dense_matrix(
    conv_or_weight, input_shape, stride=1, padding=0, dilation=1, padding_mode: str = "zeros"
) -> torch.Tensor:
    """The dense matrix of A (float64, (c_out L1 L2, c_in H W), row-major flattening): A applied to
    every basis vector. The slow, obviously correct reference for small inputs."""
    spec = conv_spec(conv_or_weight, input_shape, stride, padding, dilation, padding_mode)
    n = math.prod(spec.input_shape)
    if n > 20000:
        raise LipverifyError(f"conv_dense_matrix is a reference for small inputs; {n} columns is too many")
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *spec.input_shape)
    return apply_conv(spec, basis).reshape(n, -1).T.contiguous()


def _embedded_kernel(weight: torch.Tensor, grid, dilation) -> torch.Tensor:
    """The (dilated) kernel on the grid: ``K[:, :, d1 a mod N1, d2 b mod N2] += W[:, :, a, b]``."""
    n1, n2 = grid
    co, ci, kh, kw = weight.shape
    rows = (torch.arange(kh) * dilation[0]) % n1
    cols = (torch.arange(kw) * dilation[1]) % n2
    flat = (rows[:, None] * n2 + cols[None, :]).reshape(-1)
    k = torch.zeros(co, ci, n1 * n2, dtype=weight.dtype)
    k.index_add_(2, flat, weight.reshape(co, ci, kh * kw))
    return k.reshape(co, ci, n1, n2)


def transfer_matrices(
    weight: torch.Tensor, grid, dilation=1, stride=1, half_plane: bool = False
) -> torch.Tensor:
    """Per-frequency transfer matrices of the circular cross-correlation with ``weight``
    (c_out, c_in, kh, kw) on a ``grid = (N1, N2)``.

    Stride 1: complex128 (N1, N2, c_out, c_in),
    ``T[f1, f2] = sum_{a,b} W[:, :, a, b] exp(+2 pi i (f1 d1 a / N1 + f2 d2 b / N2))`` (module
    docstring), summed over the kh kw taps (equal to ``conj(fft2)`` of the kernel embedded in the grid).

    Stride s (s must divide N; polyphase form): ``y[i] = sum_a W_a x[(s i + d a) mod N]`` and with
    ``d a = s q + r`` the input phase ``x_r[m] = x[s m + r]`` enters through the tap ``q`` on the grid
    ``M = N / s``: a stride-1 circular cross-correlation with ``c_in s1 s2`` input channels on
    ``M1 x M2``. Returns (M1, M2, c_out, c_in s1 s2), columns ordered (c, r1, r2).

    ``half_plane``: only ``f2 = 0 .. M2 // 2`` (a real kernel has ``T[-f] = conj(T[f])``, same singular
    values), shape (M1, M2 // 2 + 1, ...)."""
    dilation, stride = _pair(dilation, "dilation"), _pair(stride, "stride")
    n1, n2 = _pair(tuple(grid), "grid")
    if n1 % stride[0] or n2 % stride[1]:
        raise LipverifyError(f"stride {stride} must divide the grid {(n1, n2)}")
    w = weight.detach().to(torch.float64)
    co, ci, kh, kw = w.shape
    (s1, s2), (m1, m2) = stride, (n1 // stride[0], n2 // stride[1])
    p1 = _phases(kh, dilation[0], n1, s1)
    p2 = _phases(kw, dilation[1], n2, s2)
    if half_plane:
        p2 = p2[: m2 // 2 + 1]
    g2 = p2.shape[0]
    # one (m1 g2 s1 s2, kh kw) x (kh kw, co ci) product: a sum over the taps only, cheaper than an FFT
    q = torch.einsum("fra,gsb->fgrsab", p1, p2).reshape(m1 * g2 * s1 * s2, kh * kw)
    t = q @ w.reshape(co * ci, kh * kw).T.to(torch.complex128)
    t = t.reshape(m1, g2, s1, s2, co, ci).permute(0, 1, 4, 5, 2, 3)
    return t.reshape(m1, g2, co, ci * s1 * s2)


def _phases(k: int, d: int, n: int, s: int) -> torch.Tensor:
    """(M, s, k) complex128: ``P[f, r, a] = exp(+2 pi i f q / M)`` if the tap offset ``e = d a mod N``
    has phase ``r = e mod s`` (``q = e // s``, ``M = N / s``), else 0; taps that alias (``d a >= N``)
    land on the same offset and add up."""
    m = n // s
    e = (torch.arange(k) * d) % n
    r, q = e % s, e // s
    f = torch.arange(m, dtype=torch.float64)
    phase = torch.exp(2j * torch.pi * f[:, None] * q[None, :].to(torch.float64) / m)  # (M, k)
    out = torch.zeros(m, s, k, dtype=torch.complex128)
    out[:, r, torch.arange(k)] = phase
    return out


def _top_singular_values(t: torch.Tensor) -> torch.Tensor:
    """sigma_1 of each matrix of a batch (..., m, n): ``sqrt(lambda_max)`` of the Gram matrix on the
    smaller side (Hermitian ``eigvalsh``; backward error ``O(eps) sigma_1^2``, i.e. ``O(eps)`` relative
    on sigma_1, within :data:`ROUNDING_MARGIN`)."""
    g = t.mH @ t if t.shape[-1] <= t.shape[-2] else t @ t.mH
    return torch.linalg.eigvalsh(g)[..., -1].clamp_min(0.0).sqrt()


@dataclass(frozen=True)
class FrequencyResponse:
    """``sigma_map`` (N1, N2) float64: sigma_1(T_f) at each frequency (index f as in the DFT);
    ``radial_edges`` (RADIAL_BINS + 1,) over the normalised radius ``sqrt((f1'/N1)^2 + (f2'/N2)^2)``
    with ``f' in [-N/2, N/2)`` (0 = constant input, ``sqrt(2)/2`` = checkerboard); ``radial_profile``
    (RADIAL_BINS,) the largest sigma_1 in each bin, NaN-free: a bin without a grid frequency is None."""

    sigma_map: torch.Tensor
    radial_edges: list[float]
    radial_profile: list[float | None]

    @property
    def norm(self) -> float:
        return float(self.sigma_map.max())


def frequency_response(weight: torch.Tensor, grid, dilation=1, bins: int = RADIAL_BINS) -> FrequencyResponse:
    """sigma_1 of the transfer matrix at every frequency of ``grid`` and its radial profile (low to
    high frequency). Its maximum is the norm of the circular conv on that grid."""
    t = transfer_matrices(weight, grid, dilation)
    sigma = _top_singular_values(t)
    n1, n2 = sigma.shape
    r = torch.sqrt(
        torch.fft.fftfreq(n1, dtype=torch.float64)[:, None] ** 2
        + torch.fft.fftfreq(n2, dtype=torch.float64)[None, :] ** 2
    )
    edges = torch.linspace(0.0, math.sqrt(0.5), bins + 1, dtype=torch.float64)
    index = torch.bucketize(r, edges[1:-1], right=True)
    profile: list[float | None] = []
    for b in range(bins):
        sel = sigma[index == b]
        profile.append(float(sel.max()) if sel.numel() else None)
    return FrequencyResponse(sigma, [float(e) for e in edges], profile)


@dataclass(frozen=True)
class ConvNormBounds:
    """Certified ``lower <= ||A||_2 <= upper`` (float64, margins included), ``gap = upper - lower``,
    ``exact`` (upper is the exact norm, circular case), ``vector`` the explicit x (c_in, H, W) float64
    of the lower bound (pass it as ``v0`` next time), ``iterations`` of the power iteration."""

    lower: float
    upper: float
    exact: bool
    vector: torch.Tensor
    iterations: int

    @property
    def gap(self) -> float:
        return self.upper - self.lower

    @property
    def relative_gap(self) -> float:
        return self.gap / self.upper if self.upper > 0 else 0.0


def circular_upper_bound(spec: ConvSpec) -> float:
    """``max_f sigma_1(T_f)`` of the strided circular conv on the embedding grid (:attr:`ConvSpec.
    embedding_grid`, polyphase form of :func:`transfer_matrices`) times ``1 + ROUNDING_MARGIN``."""
    grid, stride = spec.embedding_grid
    t = transfer_matrices(spec.weight, grid, spec.dilation, stride, half_plane=True)
    return float(_top_singular_values(t).max()) * (1 + ROUNDING_MARGIN)


def power_lower_bound(
    spec: ConvSpec,
    v0: torch.Tensor | None = None,
    iterations: int = POWER_ITERATIONS,
    tol: float = POWER_TOL,
    generator: torch.Generator | None = None,
) -> tuple[float, torch.Tensor, int]:
    """Power iteration on ``A^T A`` from ``v0`` (else a Gaussian vector from ``generator``); returns
    ``(||A x|| / ||x|| * (1 - ROUNDING_MARGIN), x, iterations)`` for the last iterate x. Stops when the
    Rayleigh quotient changes by less than ``tol`` relatively."""
    if v0 is not None and tuple(v0.shape) == spec.input_shape and float(v0.norm()) > 0:
        x = v0.detach().to(torch.float64).clone()
    else:
        x = torch.randn(spec.input_shape, dtype=torch.float64, generator=generator)
    x = x / x.norm()
    best_x, best = x, float(apply_conv(spec, x[None]).norm())
    done = 0
    for done in range(1, iterations + 1):  # noqa: B007
        z = apply_adjoint(spec, apply_conv(spec, x[None]))[0]
        nz = float(z.norm())
        if nz == 0.0:  # x in the kernel of A; the bound 0 stands
            break
        x = z / nz
        value = float(apply_conv(spec, x[None]).norm())
        improved = value - best
        if value > best:
            best, best_x = value, x
        if improved <= tol * best:
            break
    return best * (1 - ROUNDING_MARGIN), best_x, done


def conv_operator_norm(
    conv_or_weight,
    input_shape,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    *,
    v0: torch.Tensor | None = None,
    iterations: int = POWER_ITERATIONS,
    tol: float = POWER_TOL,
    generator: torch.Generator | None = None,
) -> ConvNormBounds:
    """Certified bounds on the l2 operator norm of the conv as used on ``input_shape`` (module
    docstring: the upper bound from the circular embedding, the lower bound a Rayleigh quotient of
    an explicit vector; both float64 with a rounding margin). ``v0`` warm-starts the power iteration
    (the ``vector`` of the previous call)."""
    spec = conv_spec(conv_or_weight, input_shape, stride, padding, dilation, padding_mode)
    upper = circular_upper_bound(spec)
    lower, x, its = power_lower_bound(spec, v0, iterations, tol, generator)
    return ConvNormBounds(min(lower, upper), upper, spec.exact, x, its)


def reshaped_sigma1(weight: torch.Tensor) -> float:
    """The framework's sigma_1 of a Conv2d/Linear weight: of the (c_out, c_in kh kw) matrix view."""
    w = weight.detach().to(torch.float64)
    return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2))
