"""Per-sample projections of a layer's hooked tensors on its top singular pair (MATH section 2): the
kernel of :meth:`lipverify.probe.DynamicsProbe.compute`, pure (no probe state), shared by both
routes."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.probe.layers import _conv_padding

CONV_METHODS = ("shifted", "conv", "unfold")  # the first is the default


def contract(
    module: nn.Module,
    kind: str,
    a: torch.Tensor,
    delta: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    outputs: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
    conv_method: str = "shifted",
    conv_chunk_bytes: int = 8 << 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample projections of one layer's hooked tensors on its top singular pair (MATH section 2):
    ``y_i = G_i^T u`` (b, n) and ``x_i = G_i v`` (b, m) of the per-sample gradients
    ``G_i = sum_p delta_{i,p} a_{i,p}^T`` (never formed), and ``W y_i`` (b, m) from the forward output
    ``outputs`` when given (Linear only: ``W y_i = sum_p (delta_{i,p}^T u) (z_{i,p} - bias)``, formed in
    ``promote(outputs.dtype, compute_dtype)``), else None.

    ``module``/``kind``: the layer and ``"linear"`` or ``"conv"``; ``a``: its input (b, ..., n) or
    (b, C, H, W); ``delta``: the gradient of the loss with respect to its output (b, ..., m) or
    (b, m, Ho, Wo); ``u``, ``v``: (m,), (n,) in the dtype of ``a``. Convs, three methods with the same
    numbers: ``conv_method="shifted"`` (default, :func:`shifted_conv_projections`: two matrix
    products over the flattened input, the padding copied or read as a zero, no patches, no
    per-sample convolution); ``"conv"``: ``x`` by a one-channel convolution with v, ``y`` as the
    per-sample weight gradient of one output channel (a grouped ``conv2d_weight`` over chunks of
    samples whose im2col buffer stays under ``conv_chunk_bytes``; the shifted products run over such
    chunks too); ``"unfold"``: explicit patches (the most memory). Linear in ``delta``."""
    b = a.shape[0]
    if kind == "linear":
        a3 = a.reshape(b, -1, a.shape[-1])  # (b, P, n)
        d3 = delta.reshape(b, -1, delta.shape[-1])  # (b, P, m)
        z3 = None
        if outputs is not None:  # in the compute dtype: z - bias and t (z - bias) without new rounding
            cd = torch.promote_types(outputs.dtype, compute_dtype)
            z3 = outputs.reshape(b, -1, outputs.shape[-1]).to(cd)
            if module.bias is not None:
                z3 = z3 - module.bias.detach().to(cd)
        if a3.shape[1] == 1:  # one position per sample: outer products, no batched matmul
            t, s = (d3[:, 0] @ u).unsqueeze(1), (a3[:, 0] @ v).unsqueeze(1)
            wy = None if z3 is None else t.to(z3.dtype) * z3[:, 0]
            return t * a3[:, 0], s * d3[:, 0], wy
        t = (d3 @ u).unsqueeze(1)  # (b, 1, P)
        y = torch.bmm(t, a3)[:, 0]
        x = torch.bmm((a3 @ v).unsqueeze(1), d3)[:, 0]
        wy = None if z3 is None else torch.bmm(t.to(z3.dtype), z3)[:, 0]
        return y, x, wy
    C = a.shape[1]
    kh, kw = module.kernel_size
    padding = _conv_padding(module)
    m = delta.shape[1]
    d3 = delta.reshape(b, m, -1)  # (b, m, P), a view
    t = torch.matmul(u, d3)  # (b, P): delta_{i,p}^T u, no copy of delta
    if conv_method == "shifted":  # chunks of samples bound the temporaries
        geometry = (module.kernel_size, module.stride, padding, module.dilation)
        size, K = tuple(a.shape[2:]), kh * kw
        pads = _pads_input(C, K, size, padding)  # decided once: the chunks' budget is that route's
        if pads:  # temporaries: the padded input, T and V^T A
            per_sample = (C + 2 * K) * (size[0] + 2 * padding[0]) * (size[1] + 2 * padding[1])
        else:  # T, V^T A and its copy with the appended zero
            per_sample = 3 * K * size[0] * size[1] + 1
        chunk = _chunk_size(b, per_sample * a.element_size(), conv_chunk_bytes)
        parts = [
            shifted_conv_projections(a[i : i + chunk], t[i : i + chunk], v, *geometry, pad_input=pads)
            for i in range(0, b, chunk)
        ]
        y, s = parts[0] if len(parts) == 1 else (torch.cat(z) for z in zip(*parts, strict=True))
    elif conv_method == "unfold":
        A = F.unfold(a, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)
        P = A.shape[-1]
        y = torch.bmm(A, t.reshape(b, P, 1))[..., 0]
        s = torch.matmul(v, A)  # (b, P)
    else:
        s = F.conv2d(a, v.reshape(1, C, kh, kw), None, module.stride, padding, module.dilation).reshape(b, -1)
        # sum_p a_{i,p} t_{i,p}: per-sample weight gradient of one output channel, as one grouped
        # conv2d_weight over a chunk of samples (chunks bound its im2col buffer).
        H, Wd = a.shape[-2:]
        Ho, Wo = delta.shape[-2:]
        chunk = _chunk_size(b, C * kh * kw * Ho * Wo * a.element_size(), conv_chunk_bytes)
        ys = []
        for i in range(0, b, chunk):
            c = min(chunk, b - i)
            ys.append(
                torch.nn.grad.conv2d_weight(
                    a[i : i + c].reshape(1, c * C, H, Wd),
                    (c, C, kh, kw),
                    t[i : i + c].reshape(1, c, Ho, Wo),
                    stride=module.stride,
                    padding=padding,
                    dilation=module.dilation,
                    groups=c,
                ).reshape(c, -1)
            )
        y = torch.cat(ys)
    x = torch.bmm(d3, s.unsqueeze(-1))[..., 0]  # sum_p delta_{i,p} (a_{i,p}^T v), s (b, P)
    return y, x, None


def _chunk_size(b: int, bytes_per_sample: int, budget: int) -> int:
    """Samples per chunk whose temporary buffers stay within ``budget`` bytes (at least one)."""
    return max(1, min(b, budget // max(bytes_per_sample, 1)))


def _pads_input(C: int, K: int, input_size: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether :func:`shifted_conv_projections` zero-pads the input explicitly (a copy of ``C H' W'``
    values per sample) rather than reading the padding as an appended zero (a copy of ``V^T A``,
    ``K H W`` values per sample): whichever copies less; no copy at all without padding."""
    (H, W), (ph, pw) = input_size, padding
    return (ph or pw) > 0 and C * (H + 2 * ph) * (W + 2 * pw) < K * H * W


@functools.lru_cache(maxsize=64)
def _shift_indices(
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    device: torch.device,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Index tensors of :func:`shifted_conv_projections` for one conv geometry, built once on
    ``device`` (no host copy): ``L = H W`` (the input, flattened; the zero padding is not stored),
    ``taps`` (L K,) and ``reads`` (P K,). Output position ``p = (h, w)`` reads through kernel tap
    ``k = (i, j)`` input row ``h s_h - p_h + i d_h`` and column ``w s_w - p_w + j d_w``: flat position
    ``pos[p, k]`` when both lie inside the input, else the padding. ``taps[q K + k]`` is the p with
    ``pos[p, k] = q`` (P, the index of an appended zero, where none is); ``reads[p K + k] =
    k L + pos[p, k]`` (``K L``, the index of an appended zero, where p reads the padding)."""
    (H, W), (Ho, Wo), (kh, kw) = input_size, output_size, kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    L, P, K = H * W, Ho * Wo, kh * kw
    if (Ho - 1) * sh + (kh - 1) * dh >= H + 2 * ph or (Wo - 1) * sw + (kw - 1) * dw >= W + 2 * pw:
        raise ValueError(f"output size {output_size} does not fit input {input_size} with this geometry")
    arange = functools.partial(torch.arange, device=device)
    rows = (arange(Ho)[:, None] * sh - ph + arange(kh)[None] * dh)[:, None, :, None]  # (Ho, 1, kh, 1)
    cols = (arange(Wo)[:, None] * sw - pw + arange(kw)[None] * dw)[None, :, None, :]  # (1, Wo, 1, kw)
    inside = ((rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)).reshape(P, K)
    pos = (rows * W + cols).reshape(P, K)  # distinct within each column k where inside
    tap = arange(K)
    # a read of the padding is scattered to its own slot past L K (dropped), so no index repeats
    slots = torch.where(inside, pos * K + tap, L * K + arange(P * K).reshape(P, K))
    taps = torch.full((L * K + P * K,), P, dtype=torch.long, device=device)
    taps.scatter_(0, slots.reshape(-1), arange(P).repeat_interleave(K))
    reads = torch.where(inside, tap * L + pos, K * L).reshape(-1)
    return L, taps[: L * K], reads


def shifted_conv_projections(
    a: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    pad_input: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two patch contractions of a Conv2d's projections (MATH section 2) without patches:
    ``y_i = sum_p t_{i,p} a_{i,p}`` (b, C kh kw) and ``s_{i,p} = a_{i,p}^T v`` (b, P), where
    ``a_{i,p}`` is the patch of output position p of sample i (``F.unfold``'s column).

    With the input flattened to ``A_i`` (C, L), patch entry ``(c, k)`` is ``A_i[c, pos(p, k)]``, or a
    zero of the padding (:func:`_shift_indices`). So ``y_i[c, k] = sum_q A_i[c, q] T_i[q, k]`` with
    ``T_i[q, k] = t_{i,p}`` where ``pos(p, k) = q`` (a gather of t, zero elsewhere): one batched
    product ``A (b, C, L) @ T (b, L, K)``, never a per-sample convolution (a tap that reads the padding
    adds nothing to y). Likewise ``s_{i,p} = sum_k M_i[k, pos(p, k)]`` with ``M_i = V^T A_i`` (K, L),
    ``V`` = v as (C, K): one product and one gather, reading an appended zero for the padding.
    ``pad_input``: zero-pad the input explicitly first (then the geometry has no padding; None:
    whichever copies less, :func:`_pads_input`). ``a`` (b, C, H, W); ``t`` (b, P)
    (``delta_{i,p}^T u``); ``v`` (C kh kw,); all one floating dtype, any device."""
    b, C = a.shape[:2]
    kh, kw = kernel_size
    K = kh * kw
    P = t.shape[1]
    padding = tuple(padding)
    Ho = (a.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    if _pads_input(C, K, tuple(a.shape[2:]), padding) if pad_input is None else pad_input:
        a, padding = F.pad(a, (padding[1], padding[1], padding[0], padding[0])), (0, 0)
    geometry = (tuple(kernel_size), tuple(stride), padding, tuple(dilation))
    L, taps, reads = _shift_indices(tuple(a.shape[2:]), (Ho, P // Ho), *geometry, a.device)
    A = a.reshape(b, C, L)
    T = F.pad(t, (0, 1)).index_select(1, taps).view(b, L, K)  # the appended zero fills unread taps
    y = torch.bmm(A, T).reshape(b, C * K)
    M = torch.matmul(v.reshape(C, K).t(), A).reshape(b, K * L)  # (b, K, L) flattened
    if any(padding):  # the appended zero that reads of the padding take
        M = F.pad(M, (0, 1))
    s = M.index_select(1, reads).view(b, P, K).sum(-1)
    return y, s


def centre(y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y - mean_i y_i``, ``x - mean_i x_i`` (rows are samples)."""
    return y - y.mean(0, keepdim=True), x - x.mean(0, keepdim=True)
