"""torchsde, the reference integrator: pathwise agreement of our Euler–Maruyama with
``torchsde.sdeint(method='euler')`` on identical Brownian increments."""

from __future__ import annotations

import time

import torch

from lipverify._validation import LipverifyError
from lipverify.montecarlo import mean
from lipverify.problems import (
    LognormalBound,
    MatrixSGDSDE,
)
from lipverify.sde import brownian_increments, integrate
from lipverify.simulation.matrix_layer import default_problem, well_gapped
from lipverify.simulation.results import Row, ValidationResult


def require_torchsde():
    try:
        import torchsde
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise LipverifyError(
            "torchsde is not installed; install the optional extra: pip install 'lipverify[sde]'"
        ) from exc
    return torchsde


def _torchsde_wrappers(torchsde):
    class GridBrownian(torchsde.BaseBrownian):
        """Serves the increments of a fixed grid (steps, P, k) to torchsde (same Brownian path)."""

        __slots__ = ("_W", "_dt", "_t0")

        def __init__(self, dB: torch.Tensor, dt: float, t0: float = 0.0):
            self._W = torch.cat([torch.zeros_like(dB[:1]), dB.cumsum(0)])
            self._dt, self._t0 = dt, t0

        def _index(self, t) -> int:
            k = round((float(t) - self._t0) / self._dt)
            if abs(k * self._dt + self._t0 - float(t)) > 1e-9 * max(1.0, abs(float(t))):
                raise LipverifyError(f"torchsde asked for the Brownian path off the grid, t = {float(t)}")
            return k

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            if tb is None:
                return self._W[self._index(ta)]
            return self._W[self._index(tb)] - self._W[self._index(ta)]

        def __repr__(self):
            return f"GridBrownian(steps={self._W.shape[0] - 1}, dt={self._dt})"

        @property
        def dtype(self):
            return self._W.dtype

        @property
        def device(self):
            return self._W.device

        @property
        def shape(self):
            return self._W.shape[1:]

        @property
        def levy_area_approximation(self):
            return "none"

    class Wrapped(torch.nn.Module):
        def __init__(self, sde):
            super().__init__()
            self.sde = sde
            self.noise_type = sde.noise_type
            self.sde_type = "ito"

        def f(self, t, y):
            return self.sde.drift(float(t), y)

        def g(self, t, y):
            return self.sde.diffusion(float(t), y)

    return GridBrownian, Wrapped


def torchsde_solve(sde, x0: torch.Tensor, dt: float, dB: torch.Tensor) -> torch.Tensor:
    """Integrate with ``torchsde.sdeint(method='euler')`` on the same Brownian increments dB
    (steps, P, k); returns the final state (P, d)."""
    torchsde = require_torchsde()
    GridBrownian, Wrapped = _torchsde_wrappers(torchsde)
    steps, P = dB.shape[0], dB.shape[1]
    y0 = x0.to(dB).expand(P, -1).clone()
    ts = torch.tensor([0.0, steps * dt], dtype=dB.dtype, device=dB.device)
    with torch.no_grad():
        ys = torchsde.sdeint(Wrapped(sde), y0, ts, bm=GridBrownian(dB, dt), method="euler", dt=dt)
    return ys[-1]


def torchsde_comparison(
    paths: int = 2000, steps: int = 100, seed: int = 0, device: str = "cpu"
) -> ValidationResult:
    """Our Euler–Maruyama against ``torchsde.sdeint(method='euler')`` on identical Brownian
    increments, for the lognormal bound (diagonal noise) and the matrix SGD-SDE (general noise).
    Pathwise agreement to rounding (tolerance 1e-10 relative, z = 1 used as a plain bound), and
    the speed ratio. Wrong variant: torchsde on an independent Brownian path (the pathwise test
    must notice). Also the distributions: MC mean of K_T of both against Theorem 17."""
    start = time.perf_counter()
    rows = []
    info = {}
    p = LognormalBound.example()
    mat = MatrixSGDSDE(default_problem(seed), 0.1, 2)
    W0 = well_gapped(3, 4, (1.5, 0.8, 0.3), seed)
    for name, sde, x0, T in (
        ("lognormal", p, torch.tensor([p.k0]), 1.0),
        ("matrix_sde", mat, W0.reshape(-1), 10.0),
    ):
        h = T / steps
        dB = brownian_increments(steps, paths, sde.noise_dim, h, seed=seed, device=device)
        t0 = time.perf_counter()
        ours = integrate(sde, x0, h, dB=dB, device=device).require_finite().final
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = torchsde_solve(sde, x0.to(device), h, dB)
        t_theirs = time.perf_counter() - t0
        other = torchsde_solve(
            sde,
            x0.to(device),
            h,
            brownian_increments(steps, paths, sde.noise_dim, h, seed=seed + 1, device=device),
        )
        scale = float(ours.abs().max())
        diff = float((ours - theirs).abs().max()) / scale
        wdiff = float((ours - other).abs().max()) / scale
        rows.append(Row(f"{name}: max |ours - torchsde| / max|x|", 0.0, diff, 0.0, 1e-10, z=1.0))
        rows.append(
            Row(
                f"{name}: max |ours - torchsde| / max|x|",
                0.0,
                wdiff,
                0.0,
                1e-10,
                True,
                z=1.0,
                note="independent Brownian path",
            )
        )
        info[name] = {"ours_s": t_ours, "torchsde_s": t_theirs, "speed_ratio": t_theirs / t_ours}
        if name == "lognormal":
            m1, m2 = mean(ours.flatten().cpu()), mean(theirs.flatten().cpu())
            bias = p.euler_moments(h, steps)[0] - p.mean(T)
            rows.append(Row("lognormal: E[K_T] ours (Thm 17)", p.mean(T), m1.value, m1.stderr, bias))
            rows.append(Row("lognormal: E[K_T] torchsde (Thm 17)", p.mean(T), m2.value, m2.stderr, bias))
    return ValidationResult("torchsde", rows, {}, info, time.perf_counter() - start)
