"""Input checks shared by the numeric kernels: every bad input gets an error that names it."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LipverifyError(ValueError):
    """Bad input to a lipverify computation (the message names the problem)."""


class DegenerateSpectrumError(LipverifyError):
    """sigma_1 is not simple (sigma_1 == sigma_2) or zero: Assumption 11 fails, derivatives undefined."""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of floating ``t`` is finite, exactly. A sum is NaN/inf whenever an entry
    is, so a finite sum proves the tensor finite in one fast reduction (20-30x faster than
    ``isfinite(t).all()`` on 128 x 512 x 512); only a non-finite sum (an entry, or an overflow of
    the sum itself) falls back to the elementwise test. Half precisions are summed in float32."""
    accumulate = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    if bool(torch.isfinite(t.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(t).all())


def check_weight(W: torch.Tensor, name: str = "W") -> torch.Tensor:
    """Validate a weight matrix of shape (m, n): floating dtype, finite, not identically zero."""
    if not isinstance(W, torch.Tensor):
        raise LipverifyError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in SUPPORTED_DTYPES:
        raise LipverifyError(
            f"{name} has unsupported dtype {W.dtype}; expected one of "
            + ", ".join(str(d) for d in SUPPORTED_DTYPES)
        )
    if W.ndim != 2:
        raise LipverifyError(f"{name} must be a matrix of shape (m, n), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise LipverifyError(f"{name} is empty (shape {tuple(W.shape)})")
    if not all_finite(W):
        raise LipverifyError(f"{name} contains non-finite entries (inf or NaN)")
    if not bool((W != 0).any()):
        raise LipverifyError(f"{name} is identically zero: sigma_1 = 0, the Lipschitz bound is degenerate")
    return W


def check_per_sample(G: torch.Tensor, m: int, n: int, name: str = "per_sample_grads") -> torch.Tensor:
    """Validate per-sample gradients and return them as (b, m, n).

    Accepts (b, m, n) or (b, d) with d = m*n in column-major vec order (MATH section 0).
    """
    if not isinstance(G, torch.Tensor):
        raise LipverifyError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dtype not in SUPPORTED_DTYPES:
        raise LipverifyError(f"{name} has unsupported dtype {G.dtype}")
    if G.ndim == 3:
        if tuple(G.shape[1:]) != (m, n):
            raise LipverifyError(
                f"shape mismatch: {name} has per-sample shape {tuple(G.shape[1:])}, W has ({m}, {n})"
            )
    elif G.ndim == 2:
        if G.shape[1] != m * n:
            raise LipverifyError(
                f"shape mismatch: {name} has {G.shape[1]} columns, W has m*n = {m * n} entries"
            )
        G = G.reshape(G.shape[0], n, m).transpose(-1, -2)  # column-major vec -> matrix
    else:
        raise LipverifyError(f"{name} must have shape (b, m, n) or (b, m*n), got {tuple(G.shape)}")
    check_batch_size(G.shape[0])
    if not all_finite(G):
        raise LipverifyError(f"{name} contains non-finite entries (inf or NaN)")
    return G


def check_batch_size(b: int) -> int:
    if b < 2:
        raise LipverifyError(
            f"batch size b = {b}: the unbiased noise estimator (Proposition 5) divides by b(b-1) "
            "and needs b >= 2"
        )
    return b


def check_population(b: int, population_size: int | None) -> float:
    """Finite-population factor (1 - b/N) for sampling without replacement (Proposition 5)."""
    if population_size is None:
        return 1.0
    if population_size < b:
        raise LipverifyError(f"population_size N = {population_size} is smaller than the batch size b = {b}")
    return 1.0 - b / population_size


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precisions are decomposed in float32 (torch has no half-precision SVD on CPU)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
