"""Dense symmetric kernels of the probe's resolvent route (private).

With torch on one CPU thread, float32/float64 tensors go through scipy's BLAS/LAPACK (``syrk``,
``symm``, ``potrf``, ``potrs``, ``trsm``) on zero-copy Fortran-ordered views: torch has no ``syrk``
(``W @ W.T`` is a full ``gemm``, twice the flops) and its CPU ``cholesky_ex`` / ``solve_triangular``
add copies that cost 2-2.5x the LAPACK call at the probe's sizes (k = 256-512,
benchmarks/bench_probe.py). scipy's OpenBLAS is then held to one thread too (threadpoolctl): its
worker threads spinning next to torch's OpenMP pool slowed the probe down 20x on 2 cores. With more
torch threads, on other devices and for other dtypes the torch operations run (they are also the
reference the tests compare against). Symmetric matrices produced here carry their values in the
lower triangle; the upper one is unspecified and never read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
from scipy.linalg import blas, lapack

_PREFIX = {torch.float32: "s", torch.float64: "d"}
_state = threading.local()
_openblas = None  # threadpoolctl selection of the loaded OpenBLAS libraries (created on first use)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Hold the OpenBLAS libraries scipy/numpy loaded to one thread (re-entrant; the previous limits
    are restored on exit). Costs ~15 us, so callers wrap a whole decomposition, not each kernel."""
    global _openblas
    depth = getattr(_state, "depth", 0)
    if depth:
        _state.depth = depth + 1
        try:
            yield
        finally:
            _state.depth -= 1
        return
    if _openblas is None:
        from threadpoolctl import ThreadpoolController

        _openblas = ThreadpoolController().select(internal_api="openblas")
    _state.depth = 1
    try:
        with _openblas.limit(limits=1):
            yield
    finally:
        _state.depth = 0


def _scipy(t: torch.Tensor) -> str | None:
    """BLAS prefix when ``t`` goes through scipy (CPU, float32/float64, torch on one thread)."""
    if t.device.type == "cpu" and t.dtype in _PREFIX and torch.get_num_threads() == 1:
        return _PREFIX[t.dtype]
    return None


def _fortran(t: torch.Tensor) -> np.ndarray:
    """Fortran-ordered numpy array with the values of ``t`` (a view when ``t`` already is one)."""
    a = t.detach().numpy()
    return a if a.flags.f_contiguous else np.asfortranarray(a)


def gram(W: torch.Tensor) -> torch.Tensor:
    """Gram matrix on the smaller side of ``W`` (m, n): ``W W^T`` (m <= n) or ``W^T W``, (k, k).

    Lower triangle only (``syrk``, half the flops of ``W @ W.T``)."""
    m, n = W.shape
    p = _scipy(W)
    if p is None:
        return W @ W.T if m <= n else W.T @ W
    Wt = W.detach().contiguous().numpy().T  # (n, m), Fortran-ordered view of W
    syrk = getattr(blas, p + "syrk")
    with single_threaded_blas():  # syrk(trans=1): a^T a = W W^T; trans=0: a a^T = W^T W
        return torch.from_numpy(syrk(1.0, Wt, trans=1 if m <= n else 0, lower=1))


def sym_matmul(G: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``G @ Z`` for a symmetric ``G`` (k, k) from :func:`gram` (lower triangle) and ``Z`` (k, p)."""
    p = _scipy(G)
    if p is None:
        return G @ Z
    with single_threaded_blas():
        return torch.from_numpy(getattr(blas, p + "symm")(1.0, _fortran(G), _fortran(Z), side=0, lower=1))


def shifted_cholesky(
    G: torch.Tensor, shift: float, w: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor | None:
    """Lower Cholesky factor of ``shift I - G + alpha w w^T`` (k, k), or None if not positive definite.

    ``G``: (k, k) symmetric (lower triangle read), ``w``: (k,). The upper triangle of the result is
    unspecified (every consumer here, and torch's triangular solvers, read the lower one only)."""
    k = G.shape[0]
    p = _scipy(G)
    if p is None:
        A = -G
        A.diagonal().add_(shift)
        if w is not None and alpha:
            A.addr_(w, w, alpha=alpha)
        L, info = torch.linalg.cholesky_ex(A)
        return L if int(info) == 0 else None
    A = np.negative(_fortran(G), order="F")
    A[np.diag_indices(k)] += shift
    with single_threaded_blas():
        if w is not None and alpha:
            A = getattr(blas, p + "syr")(alpha, _fortran(w), lower=1, a=A, overwrite_a=1)
        # clean=0: zeroing the upper triangle costs half as much as the factorisation at k = 512
        L, info = getattr(lapack, p + "potrf")(A, lower=1, clean=0, overwrite_a=1)
    return torch.from_numpy(L) if info == 0 else None


def cholesky_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^{-1} B`` for a lower factor ``L`` (k, k) and ``B`` (k, p)."""
    p = _scipy(L)
    if p is None:
        return torch.cholesky_solve(B, L)
    with single_threaded_blas():
        x, info = getattr(lapack, p + "potrs")(_fortran(L), _fortran(B), lower=1)
    if info != 0:  # only for invalid arguments: a programming error
        raise RuntimeError(f"{p}potrs failed with info={info}")
    return torch.from_numpy(x)


def solve_lower(L: torch.Tensor, B: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``L^{-1} B`` for a lower triangular ``L`` (k, k) and ``B`` (k, N); ``overwrite``: B is a
    temporary the solve may overwrite (saves a copy)."""
    p = _scipy(L)
    if p is None:
        return torch.linalg.solve_triangular(L, B, upper=False)
    b = _fortran(B)
    with single_threaded_blas():
        overwrite_b = int(overwrite and b.flags.writeable)
        x = getattr(blas, p + "trsm")(1.0, _fortran(L), b, lower=1, overwrite_b=overwrite_b)
    return torch.from_numpy(x)
