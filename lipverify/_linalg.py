"""Dense symmetric kernels of the probe's resolvent route (private).

With torch on one CPU thread, float32/float64 tensors go through scipy's BLAS/LAPACK (``syrk``,
``symm``, ``potrf``) on zero-copy Fortran-ordered views: torch has no ``syrk`` (``W @ W.T`` is a
full ``gemm``, twice the flops) and its CPU ``cholesky_ex`` copies and cleans the factor, 2.3x the
LAPACK call at k = 512 (the sizes of benchmarks/bench_probe.py). Triangular solves stay with torch
(:func:`solve_lower`): its ``trsm`` is the faster one here. scipy's OpenBLAS is held to one thread
too (threadpoolctl): its worker threads spinning next to torch's OpenMP pool slowed the probe down
20x on 2 cores. With more torch threads, on other devices and for other dtypes the torch operations
run (they are also the reference the tests compare against). Symmetric matrices produced here carry
their values in the lower triangle; the upper one is unspecified and never read.
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
def single_threaded_blas(device: torch.device | str | None = None) -> Iterator[None]:
    """Hold the OpenBLAS libraries scipy/numpy loaded to one thread (re-entrant; the previous limits
    are restored on exit). Costs ~15 us, so callers wrap a whole decomposition, not each kernel.
    ``device``: of the tensors the block works on; anything but CPU never reaches scipy, so the
    block runs without threadpoolctl.

    Not for several Python threads at once: the OpenBLAS limit is process-wide, and blocks entered
    and left concurrently from four threads (1,500 each) left OpenBLAS at one thread afterwards, with
    a per-thread depth as here and also with a process-wide count under a lock. On CPU, use the probe
    and :func:`lipverify.probe.update_exceeds_gap` from one Python thread at a time."""
    global _openblas
    if not uses_cpu_blas(device):
        yield
        return
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


def uses_cpu_blas(device: torch.device | str | None) -> bool:
    """Whether work on ``device`` may go through scipy/OpenBLAS (None: unknown, assume CPU)."""
    return device is None or torch.device(device).type == "cpu"


def _scipy(t: torch.Tensor) -> str | None:
    """BLAS prefix when ``t`` goes through scipy (CPU, float32/float64, torch on one thread)."""
    if uses_cpu_blas(t.device) and t.dtype in _PREFIX and torch.get_num_threads() == 1:
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
    """``(L L^T)^{-1} B`` for a lower factor ``L`` (k, k) and ``B`` (k, p).

    Two triangular solves (:func:`solve_lower`, then its transpose): on one CPU thread half the
    time of LAPACK ``potrs`` through scipy or of ``torch.cholesky_solve`` (which copies ``L``)."""
    if _scipy(L) is None:
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve_triangular(L.mT, solve_lower(L, B), upper=True)


def solve_lower(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``L^{-1} B`` for a lower triangular ``L`` (k, k) and ``B`` (k, N).

    ``torch.linalg.solve_triangular`` (BLAS ``trsm``, which references the lower triangle only, so
    the unspecified upper triangle of :func:`shifted_cholesky`'s factor is never read; a test fills it
    with NaN). On one CPU thread it is 2.5-3x faster than OpenBLAS ``trsm`` through scipy at the
    probe's sizes (k = 512, N = 128: 0.44 vs 1.19 ms in float64), so it is used on every route."""
    return torch.linalg.solve_triangular(L, B, upper=False)
