"""The circular embedding that :mod:`lipverify.conv` relies on: the DFT block-diagonalises a circular
cross-correlation, so its singular values are those of the per-frequency transfer matrices.

1-D statement (the 2-D one is the tensor product of two 1-D DFTs). On a grid of N points, the
circular cross-correlation with kernel taps ``W_0..W_{k-1}`` (each c_out x c_in) is
``(C x)[n] = sum_a W_a x[(n + a) mod N]``. On the Fourier mode ``x[n] = v w^{f n}``, ``w = e^{2 pi i/N}``,

    ``C x = (T_f v) w^{f n}``  with  ``T_f = sum_a W_a w^{+f a}``.

The N modes ``e_f (x) v`` span C^{N c_in} and ``F = (w^{f n} / sqrt N)`` is unitary, so
``(F^H (x) I) C (F (x) I) = blockdiag(T_0, ..., T_{N-1})`` and the singular values of C are the union
of those of the T_f (``||C|| = max_f sigma_1(T_f)``). PyTorch's conv2d is a cross-correlation, hence
the ``+`` sign; ``-`` (the convolution DFT) is the wrong variant for a non-symmetric kernel (its
sigma_1 map is the same for real kernels, its matrices are not).

:func:`block_diagonal_symbolic` checks the block-diagonal identity with symbolic kernel entries,
exactly (``w`` an exact root of unity; N = 3, 4 and c = 1, 2); :func:`singular_values_numeric`
checks the singular-value statement on random 2-D kernels against the dense matrix of
:func:`lipverify.conv.conv_dense_matrix` with circular padding.
"""

from __future__ import annotations

import sympy as sp
import torch

from derivations._result import Derivation


def _circular_matrix(taps: list[sp.Matrix], N: int) -> sp.Matrix:
    """Dense (N c_out, N c_in) matrix of ``(C x)[n] = sum_a W_a x[(n + a) mod N]`` (blocks by grid point)."""
    co, ci = taps[0].shape
    C = sp.zeros(N * co, N * ci)
    for n in range(N):
        for a, W in enumerate(taps):
            m = (n + a) % N
            C[n * co : (n + 1) * co, m * ci : (m + 1) * ci] += W
    return C


def block_diagonal_symbolic(N: int, c_out: int, c_in: int, k: int = 2, wrong: bool = False) -> Derivation:
    """``(F^H (x) I) C (F (x) I)`` against ``blockdiag(T_f)`` with symbolic taps (``wrong``: the
    convolution sign ``T_f = sum_a W_a w^{-f a}``). ``error`` is 0.0 when every entry of the
    difference simplifies to 0 exactly, else the largest absolute entry at a rational point."""
    taps = [sp.Matrix(c_out, c_in, lambda i, j, a=a: sp.Symbol(f"w{a}_{i}{j}", real=True)) for a in range(k)]
    w = sp.exp(2 * sp.pi * sp.I / N)
    F = sp.Matrix(N, N, lambda n, f: w ** (f * n)) / sp.sqrt(N)
    C = _circular_matrix(taps, N)
    lhs = sp.kronecker_product(F.H, sp.eye(c_out)) * C * sp.kronecker_product(F, sp.eye(c_in))
    sign = -1 if wrong else 1
    blocks = [
        sum((W * w ** (sign * f * a) for a, W in enumerate(taps)), sp.zeros(c_out, c_in)) for f in range(N)
    ]
    diff = (lhs - sp.diag(*blocks)).applyfunc(lambda e: sp.nsimplify(sp.expand_complex(sp.expand(e))))
    if all(sp.simplify(e) == 0 for e in diff):
        error = 0.0
    else:
        point = {s: sp.Rational(p + 1, 3 + p) for p, s in enumerate(sorted(diff.free_symbols, key=str))}
        error = max(float(abs(sp.N(e.subs(point)))) for e in diff)
    return Derivation(
        result="circular embedding (DFT block-diagonalises a circular cross-correlation)",
        statement="(F^H x I) C (F x I) = blockdiag(sum_a W_a w^{+f a})",
        derived=lhs,
        closed_form=sp.diag(*blocks),
        error=error,
        tolerance=0.0,
        method=f"exact, symbolic taps, N={N}, c_out={c_out}, c_in={c_in}, k={k}"
        + (" (wrong sign)" if wrong else ""),
    )


def singular_values_numeric(
    c_out: int, c_in: int, grid: tuple[int, int], kernel: int = 3, seed: int = 0, wrong: str | None = None
) -> Derivation:
    """Sorted singular values of the dense circular conv (stride 1, padding ``kernel // 2``, odd
    kernel, so L = N) against those of the transfer matrices of
    :func:`lipverify.conv.transfer_matrices`. ``wrong="ortho"`` divides the transfer matrices by
    ``sqrt(N1 N2)`` (the unitary DFT's normalisation), the wrong variant. ``error`` the max absolute
    difference; tolerance ``64 eps`` times the largest singular value times the matrix dimension."""
    from lipverify.conv import conv_dense_matrix, transfer_matrices

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g, dtype=torch.float64)
    shape = (c_in, *grid)
    dense = conv_dense_matrix(weight, shape, padding=kernel // 2, padding_mode="circular")
    s_dense = torch.linalg.svdvals(dense)
    t = transfer_matrices(weight, grid)
    if wrong == "ortho":
        t = t / (grid[0] * grid[1]) ** 0.5
    s_blocks = torch.linalg.svdvals(t).reshape(-1)
    s_blocks = torch.sort(s_blocks, descending=True).values[: s_dense.numel()]
    error = float((s_dense - s_blocks).abs().max())
    tol = 64 * torch.finfo(torch.float64).eps * float(s_dense[0]) * max(dense.shape)
    return Derivation(
        result="singular values of a circular conv = those of its transfer matrices",
        statement="svd(C) = union_f svd(T_f)",
        derived=s_dense,
        closed_form=s_blocks,
        error=error,
        tolerance=tol,
        method=f"float64, dense matrix vs FFT, c_out={c_out}, c_in={c_in}, grid={grid}, k={kernel}"
        + (f" (wrong: {wrong})" if wrong else ""),
    )
