"""Per-sample projections of a layer's hooked tensors on its top singular pair (MATH section 2): the
kernel of :meth:`lipverify.probe.DynamicsProbe.compute`, pure (no probe state), shared by both
routes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipverify.probe.layers import _conv_padding


def contract(
    module: nn.Module,
    kind: str,
    a: torch.Tensor,
    delta: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    outputs: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
    conv_method: str = "conv",
    conv_chunk_bytes: int = 8 << 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample projections of one layer's hooked tensors on its top singular pair (MATH section 2):
    ``y_i = G_i^T u`` (b, n) and ``x_i = G_i v`` (b, m) of the per-sample gradients
    ``G_i = sum_p delta_{i,p} a_{i,p}^T`` (never formed), and ``W y_i`` (b, m) from the forward output
    ``outputs`` when given (Linear only: ``W y_i = sum_p (delta_{i,p}^T u) (z_{i,p} - bias)``, formed in
    ``promote(outputs.dtype, compute_dtype)``), else None.

    ``module``/``kind``: the layer and ``"linear"`` or ``"conv"``; ``a``: its input (b, ..., n) or
    (b, C, H, W); ``delta``: the gradient of the loss with respect to its output (b, ..., m) or
    (b, m, Ho, Wo); ``u``, ``v``: (m,), (n,) in the dtype of ``a``. Convs: ``x`` by a one-channel
    convolution with v, ``y`` as the per-sample weight gradient of one output channel
    (``conv_method="conv"``: a grouped ``conv2d_weight`` over chunks of samples whose im2col buffer
    stays under ``conv_chunk_bytes``; ``"unfold"``: explicit patches). Linear in ``delta``."""
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
    if conv_method == "unfold":
        A = F.unfold(a, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)
        P = A.shape[-1]
        y = torch.bmm(A, t.reshape(b, P, 1))[..., 0]
        s = torch.matmul(v, A)  # (b, P)
        x = torch.bmm(d3, s.unsqueeze(-1))[..., 0]
        return y, x, None
    s = F.conv2d(a, v.reshape(1, C, kh, kw), None, module.stride, padding, module.dilation)
    x = torch.bmm(d3, s.reshape(b, -1, 1))[..., 0]  # sum_p delta_{i,p} (a_{i,p}^T v)
    # sum_p a_{i,p} t_{i,p}: per-sample weight gradient of one output channel, as one grouped
    # conv2d_weight over a chunk of samples (chunks bound its im2col buffer).
    H, Wd = a.shape[-2:]
    Ho, Wo = delta.shape[-2:]
    per_sample = C * kh * kw * Ho * Wo * a.element_size()
    chunk = max(1, min(b, conv_chunk_bytes // max(per_sample, 1)))
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
    return torch.cat(ys), x, None


def centre(y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y - mean_i y_i``, ``x - mean_i x_i`` (rows are samples)."""
    return y - y.mean(0, keepdim=True), x - x.mean(0, keepdim=True)
