"""Speed and accuracy of ``hessian_quadratic_form`` method='svd' vs method='resolvent' (Lemma 13).

Run: ``python benchmarks/bench_spectral.py [--repeats 5] [--directions 128] [--threads N]``.

Timing: layer-sized matrices (256x784, 512x512, 128x1152) with a batch of 128 directions, in
float32 and float64; each call includes the decomposition (that is what a probe pays per
layer and step). Minimum and median of ``--repeats`` alternating runs after one warm-up.

Accuracy: a 12x20 matrix with prescribed singular values and relative gaps 1e-2 .. 1e-8, 16
unit directions; error relative to an mpmath reference at 40 significant digits (Lemma 13
formula evaluated on a 40-digit SVD). The float64 dense reference (dilation Hessian of
:mod:`lipverify._reference`) is shown for comparison: at small gaps it is no more accurate than
the fast methods, which is why the extended-precision reference is used.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import mpmath
import torch

from lipverify import _reference as ref
from lipverify._validation import LipverifyError
from lipverify.spectral import SpectralGapWarning, hessian_quadratic_form

TIMING_SHAPES = ((256, 784), (512, 512), (128, 1152))
ACCURACY_SHAPE = (12, 20)
RELATIVE_GAPS = (1e-2, 1e-4, 1e-6, 1e-8)


def time_methods(W: torch.Tensor, E: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    """(min, median) seconds per call for each method. Calls alternate between the methods (order
    flipped every repeat) so both see the same machine load; the minimum is the least disturbed
    measurement on a shared machine."""
    methods = ("svd", "resolvent")
    times: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:
        hessian_quadratic_form(W, E, method=method)  # warm-up
    for i in range(repeats):
        for method in methods if i % 2 == 0 else methods[::-1]:
            start = time.perf_counter()
            hessian_quadratic_form(W, E, method=method)
            times[method].append(time.perf_counter() - start)
    return {m: (min(t), statistics.median(t)) for m, t in times.items()}


def mp_quadratic_forms(W: torch.Tensor, E: torch.Tensor, digits: int = 40) -> list[float]:
    """Lemma 13 at ``digits`` significant digits: full SVD in mpmath, then
    ``sum_k [s1 (a_k^2 + c_k^2) + 2 s_k a_k c_k]/(s1^2 - s_k^2) + (null-space a^2, c^2)/s1``."""
    mpmath.mp.dps = digits
    m, n = W.shape
    A = mpmath.matrix(W.tolist())
    U, S, V = mpmath.svd_r(A, full_matrices=True)  # A = U diag(S) V (V is V^T)
    r = min(m, n)
    s = [S[k] for k in range(r)]
    u = [U[i, 0] for i in range(m)]
    v = [V[0, j] for j in range(n)]
    out = []
    for e in E.tolist():
        Em = mpmath.matrix(e)
        y = [mpmath.fsum(Em[i, j] * u[i] for i in range(m)) for j in range(n)]  # E^T u
        x = [mpmath.fsum(Em[i, j] * v[j] for j in range(n)) for i in range(m)]  # E v
        a = [mpmath.fsum(V[k, j] * y[j] for j in range(n)) for k in range(n)]
        c = [mpmath.fsum(U[i, k] * x[i] for i in range(m)) for k in range(m)]
        q = mpmath.fsum(
            (s[0] * (a[k] ** 2 + c[k] ** 2) + 2 * s[k] * a[k] * c[k]) / (s[0] ** 2 - s[k] ** 2)
            for k in range(1, r)
        )
        q += (mpmath.fsum(a[k] ** 2 for k in range(r, n)) + mpmath.fsum(c[k] ** 2 for k in range(r, m))) / s[
            0
        ]
        out.append(float(q))
    return out


def relative_error(q: torch.Tensor, q_ref: torch.Tensor) -> float:
    return float(((q.double() - q_ref).abs() / q_ref.abs()).max())


def accuracy_table(directions: int = 16) -> list[tuple]:
    """Rows (relative gap, max |q|, errors of f64 svd, f64 resolvent, f32 svd, f32 resolvent, f64 dense)."""
    m, n = ACCURACY_SHAPE
    gen = torch.Generator().manual_seed(0)
    rows = []
    for gap in RELATIVE_GAPS:
        values = [1.0, 1.0 - gap, *torch.linspace(0.9, 0.1, min(m, n) - 2, dtype=torch.float64).tolist()]
        W = ref.matrix_with_singular_values(values, m, n, gen)
        E = torch.randn(directions, m, n, dtype=torch.float64, generator=gen)
        E = E / torch.linalg.matrix_norm(E)[:, None, None]
        q_ref = torch.tensor(mp_quadratic_forms(W, E), dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpectralGapWarning)
            row = [gap, float(q_ref.abs().max())]
            for dtype in (torch.float64, torch.float32):
                for method in ("svd", "resolvent"):
                    try:
                        q = hessian_quadratic_form(W.to(dtype), E.to(dtype), method=method)
                        row.append(relative_error(q, q_ref))
                    except LipverifyError:
                        row.append(float("nan"))  # refused with a clear error (gap below dtype resolution)
            row.append(relative_error(ref.quadratic_form_dense(ref.hessian_dilation(W), E), q_ref))
        rows.append(tuple(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--directions", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        f"\nTiming: min (median) of {args.repeats} alternating calls, {args.directions} directions,"
        " decomposition included"
    )
    print(f"{'shape':>10} {'dtype':>8} {'svd [ms]':>16} {'resolvent [ms]':>16} {'resolvent/svd (min)':>20}")
    gen = torch.Generator().manual_seed(1)
    for m, n in TIMING_SHAPES:
        W64 = torch.randn(m, n, dtype=torch.float64, generator=gen) / n**0.5
        E64 = torch.randn(args.directions, m, n, dtype=torch.float64, generator=gen)
        for dtype in (torch.float32, torch.float64):
            result = time_methods(W64.to(dtype), E64.to(dtype), args.repeats)
            (s_min, s_med), (r_min, r_med) = result["svd"], result["resolvent"]
            name = str(dtype).replace("torch.", "")
            print(
                f"{m:>4}x{n:<5} {name:>8} {1e3 * s_min:>7.1f} ({1e3 * s_med:>6.1f}) "
                f"{1e3 * r_min:>7.1f} ({1e3 * r_med:>6.1f}) {r_min / s_min:>20.2f}"
            )
    m, n = ACCURACY_SHAPE
    print(
        f"\nAccuracy: {m}x{n}, max relative error vs a 40-digit mpmath reference (nan: refused with an error)"
    )
    columns = ("f64 svd", "f64 resolv", "f32 svd", "f32 resolv", "f64 dense")
    print(f"{'rel. gap':>9} {'max |q|':>10} " + " ".join(f"{c:>10}" for c in columns))
    for row in accuracy_table():
        print(f"{row[0]:>9.0e} {row[1]:>10.3g} " + " ".join(f"{x:>10.2e}" for x in row[2:]))


if __name__ == "__main__":
    main()
