"""Weight snapshots and copies of the probe's spectral cache and discrete truth without avoidable
float32 -> float64 copies: exact comparisons and differences of mixed-dtype CPU tensors through numpy
(which converts in buffered chunks), and which dtype holds another's values exactly."""

from __future__ import annotations

import numpy as np
import torch

#: dtypes numpy holds exactly as torch does (bfloat16 has no numpy dtype)
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def _numpy_views(*tensors: torch.Tensor) -> list[np.ndarray] | None:
    """Zero-copy numpy views of strided CPU tensors in :data:`_NUMPY_DTYPES` (no lazy negation), else
    None."""
    if all(
        t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and t.layout == torch.strided and not t.is_neg()
        for t in tensors
    ):
        return [t.detach().numpy() for t in tensors]
    return None


def _equal_values(W: torch.Tensor, snapshot: torch.Tensor) -> bool:
    """``torch.equal(W.to(snapshot.dtype), snapshot)`` (the cast is exact) without the cast's copy: on
    CPU numpy compares the mixed dtypes in buffered chunks (one read of each, no float64 copy of a
    float32 W: the cache check at every reuse is two of these per step)."""
    views = _numpy_views(W, snapshot)
    if views is None or W.shape != snapshot.shape:
        return torch.equal(W.to(snapshot.dtype), snapshot)
    return bool(np.array_equal(*views))


def _subtract_into(W1: torch.Tensor, W0: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.sub(W1, W0, out=out)`` (W1, W0 promote exactly to out's dtype); on CPU by numpy, which
    casts W1 in buffered chunks where torch first makes a whole float64 copy of it."""
    views = _numpy_views(W1, W0, out)
    if views is None:
        return torch.sub(W1, W0, out=out)
    np.subtract(*views[:2], out=views[2])
    return out


def _exactly_representable(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every ``src`` value is a ``dst`` value (float16/bfloat16 -> float32 -> float64)."""
    order = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    if src == dst:
        return True
    return src in order and dst in order and order[dst] > order[src]
