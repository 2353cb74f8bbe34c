"""Vectorised SDE integrators (Euler–Maruyama, Milstein) for the Monte Carlo checks of MATH §8.

An SDE ``dX = f(t, X) dt + g(t, X) dB`` is an :class:`SDE` object whose state has shape
(P, d) (P independent paths, float64 by default, CPU or GPU) driven by a k-dimensional Brownian
motion. ``noise_type`` says how ``g`` acts on the increments ``dB`` (P, k):

* ``"diagonal"``: ``g`` has shape (P, d), k = d, the update is ``g * dB`` (component-wise);
* ``"general"``:  ``g`` has shape (P, d, k), the update is ``g @ dB``. Subclasses may override
  :meth:`SDE.diffusion_apply` to apply g to dB without forming the (P, d, k) tensor.

Each scheme declares its strong and weak orders as data (as torchsde does), and one generic test
measures both for every scheme in :data:`SCHEMES`. Brownian increments can be given, so that
nested step sizes share one Brownian path: the coarse increments are sums of the fine ones
(:func:`coarsen`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lipverify._validation import LipverifyError

NOISE_TYPES = ("diagonal", "general")


class SDE:
    """Base class: implement :meth:`drift` and :meth:`diffusion` (and optionally
    :meth:`diffusion_apply`, :meth:`diffusion_derivative`).

    Attributes: ``noise_type`` (one of :data:`NOISE_TYPES`), ``state_dim`` d, ``noise_dim`` k.
    ``drift(t, x)``: x (P, d) -> (P, d). ``diffusion(t, x)``: (P, d) for diagonal noise,
    (P, d, k) for general noise.
    """

    noise_type: str = "general"
    state_dim: int = 1
    noise_dim: int = 1

    def drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, t: float, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diffusion_apply(self, t: float, x: torch.Tensor, dB: torch.Tensor) -> torch.Tensor:
        """``g(t, x) dB``: (P, d) from x (P, d) and dB (P, k)."""
        g = self.diffusion(t, x)
        if self.noise_type == "diagonal":
            return g * dB
        return torch.einsum("pdk,pk->pd", g, dB)

    def diffusion_derivative(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """Diagonal noise only: ``d g_i / d x_i`` (P, d), by autograd unless overridden (assumes
        g_i depends on x_i only, the diagonal-noise setting of the Milstein scheme)."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.diffusion(t, xr).sum(), xr)
        return grad


class Scheme:
    """A one-step method ``x_{k+1} = step(sde, t_k, x_k, h, dB_k)`` with declared orders."""

    name: str = ""
    strong_order: float = float("nan")
    weak_order: float = float("nan")
    noise_types: tuple[str, ...] = NOISE_TYPES

    @staticmethod
    def step(sde: SDE, t: float, x: torch.Tensor, h: float, dB: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EulerMaruyama(Scheme):
    """``x + f(t, x) h + g(t, x) dB``: strong order 1/2, weak order 1 (Kloeden–Platen §10.2, §14.1)."""

    name = "euler"
    strong_order = 0.5
    weak_order = 1.0

    @staticmethod
    def step(sde: SDE, t: float, x: torch.Tensor, h: float, dB: torch.Tensor) -> torch.Tensor:
        return x + sde.drift(t, x) * h + sde.diffusion_apply(t, x, dB)


class Milstein(Scheme):
    """Diagonal noise: ``x + f h + g dB + (1/2) g (dg/dx) (dB^2 - h)`` (Itô form): strong order 1,
    weak order 1 (Kloeden–Platen §10.3)."""

    name = "milstein"
    strong_order = 1.0
    weak_order = 1.0
    noise_types = ("diagonal",)

    @staticmethod
    def step(sde: SDE, t: float, x: torch.Tensor, h: float, dB: torch.Tensor) -> torch.Tensor:
        g = sde.diffusion(t, x)
        gp = sde.diffusion_derivative(t, x)
        return x + sde.drift(t, x) * h + g * dB + 0.5 * g * gp * (dB * dB - h)


#: Scheme registry: name -> class. The generic order test iterates over it.
SCHEMES: dict[str, type[Scheme]] = {"euler": EulerMaruyama, "milstein": Milstein}


def get_scheme(scheme: str | type[Scheme]) -> type[Scheme]:
    if isinstance(scheme, type) and issubclass(scheme, Scheme):
        return scheme
    if scheme not in SCHEMES:
        raise LipverifyError(f"unknown scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LipverifyError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_dt(dt: float) -> float:
    if not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise LipverifyError(f"step size dt must be a positive finite number, got {dt!r}")
    return float(dt)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded torch generator on ``device`` (None when seed is None)."""
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


class NormalSource:
    """Standard normal draws for ``device``: numpy's PCG64 on CPU (about twice as fast as
    ``torch.randn`` in float64 there), a seeded ``torch.Generator`` elsewhere. The same seed and
    device give the same draws; CPU and GPU streams differ."""

    def __init__(
        self, seed: int | None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        if self.device.type == "cpu" and dtype in (torch.float64, torch.float32):
            import numpy as np

            self._np = np.random.default_rng(seed)
            self._np_dtype = np.float64 if dtype == torch.float64 else np.float32
            self._gen = None
        else:
            self._np = None
            self._gen = make_generator(seed, self.device)

    def draw(self, *shape: int) -> torch.Tensor:
        if self._np is not None:
            return torch.from_numpy(self._np.standard_normal(shape, dtype=self._np_dtype))
        return torch.randn(*shape, dtype=self.dtype, device=self.device, generator=self._gen)


def brownian_increments(
    steps: int,
    paths: int,
    noise_dim: int,
    dt: float,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Independent increments ``dB ~ N(0, dt I_k)``, shape (steps, paths, noise_dim)."""
    _check_positive_int(steps, "steps")
    _check_positive_int(paths, "paths")
    _check_positive_int(noise_dim, "noise_dim")
    dt = check_dt(dt)
    return NormalSource(seed, device, dtype).draw(steps, paths, noise_dim) * math.sqrt(dt)


def coarsen(dB: torch.Tensor, factor: int) -> torch.Tensor:
    """Increments of step ``factor * h`` from increments of step h on the same Brownian path:
    sums of ``factor`` consecutive fine increments. (steps, P, k) -> (steps // factor, P, k)."""
    _check_positive_int(factor, "factor")
    if dB.ndim != 3 or dB.shape[0] % factor:
        raise LipverifyError(
            f"cannot coarsen increments of shape {tuple(dB.shape)} by {factor}: need (steps, P, k) "
            "with steps divisible by the factor"
        )
    return dB.reshape(dB.shape[0] // factor, factor, *dB.shape[1:]).sum(1)


@dataclass
class Solution:
    """Result of :func:`integrate`.

    ``times`` (R,) float64 and ``states`` (R, P, d): recorded states (always t0 and the final
    time). ``final`` (P, d): final state, NaN rows for diverged paths. ``diverged`` (D,) int64:
    indices of paths that became non-finite; ``diverged_step`` (P,) int64: the first step index
    (1-based: the state after step k) at which the path was non-finite, -1 if it never was.
    A diverged path is frozen at its last finite state in ``states`` and never averaged in.
    """

    times: torch.Tensor
    states: torch.Tensor
    final: torch.Tensor
    diverged: torch.Tensor
    diverged_step: torch.Tensor
    dt: float
    scheme: str

    @property
    def paths(self) -> int:
        return self.final.shape[0]

    @property
    def finite_final(self) -> torch.Tensor:
        """Final states of the paths that never diverged, (P - D, d)."""
        return self.final[self.diverged_step < 0]

    def require_finite(self) -> Solution:
        """Raise a :class:`LipverifyError` naming the diverged paths and their first bad step."""
        if self.diverged.numel():
            idx = self.diverged[:5].tolist()
            steps = self.diverged_step[self.diverged[:5]].tolist()
            raise LipverifyError(
                f"{self.diverged.numel()} of {self.paths} paths diverged (non-finite state); first "
                f"paths {idx} at steps {steps} (dt = {self.dt:g})"
            )
        return self


Observer = Callable[[int, float, torch.Tensor, torch.Tensor], None]


def integrate(
    sde: SDE,
    x0: torch.Tensor,
    dt: float,
    steps: int | None = None,
    paths: int | None = None,
    scheme: str | type[Scheme] = "euler",
    dB: torch.Tensor | None = None,
    seed: int | None = None,
    t0: float = 0.0,
    record_every: int | None = None,
    observer: Observer | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Solution:
    """Integrate ``sde`` from ``x0`` over ``steps`` steps of size ``dt`` for ``paths`` paths.

    ``x0``: (d,) (broadcast to every path) or (P, d). ``dB``: optional Brownian increments
    (steps, P, k), each ~ N(0, dt I); drawn from ``seed`` otherwise. ``observer(k, t_k, x_k, dB_k)``
    is called at the left point of every step (before the update) — used to accumulate Itô sums
    along each path. ``record_every``: also record every that many steps (default: only t0 and
    the end). Non-finite paths are frozen and reported in the :class:`Solution`, not averaged.
    """
    dt = check_dt(dt)
    sch = get_scheme(scheme)
    if sde.noise_type not in sch.noise_types:
        raise LipverifyError(
            f"scheme {sch.name!r} supports noise types {sch.noise_types}, SDE has {sde.noise_type!r}"
        )
    if not isinstance(x0, torch.Tensor):
        x0 = torch.as_tensor(x0, dtype=dtype)
    device = torch.device(device) if device is not None else x0.device
    x0 = x0.to(dtype=dtype, device=device)
    if x0.ndim == 1:
        x0 = x0.unsqueeze(0)
    if x0.ndim != 2 or x0.shape[1] != sde.state_dim:
        raise LipverifyError(
            f"shape mismatch: initial state has shape {tuple(x0.shape)}, "
            f"SDE state dimension is {sde.state_dim}"
        )
    if not bool(torch.isfinite(x0).all()):
        raise LipverifyError("initial state contains non-finite entries (inf or NaN)")
    if dB is not None:
        if dB.ndim != 3 or dB.shape[2] != sde.noise_dim:
            raise LipverifyError(
                f"shape mismatch: Brownian increments have shape {tuple(dB.shape)}, expected "
                f"(steps, paths, {sde.noise_dim})"
            )
        if steps is not None and steps != dB.shape[0]:
            raise LipverifyError(f"steps = {steps} but the increments have {dB.shape[0]} steps")
        if paths is not None and paths != dB.shape[1]:
            raise LipverifyError(f"paths = {paths} but the increments have {dB.shape[1]} paths")
        steps, paths = dB.shape[0], dB.shape[1]
        dB = dB.to(dtype=dtype, device=device)
    if steps is None:
        raise LipverifyError("give steps (or Brownian increments dB)")
    _check_positive_int(steps, "steps")
    if paths is None:
        paths = x0.shape[0]
    _check_positive_int(paths, "paths")
    if x0.shape[0] not in (1, paths):
        raise LipverifyError(f"shape mismatch: initial state has {x0.shape[0]} rows for {paths} paths")
    x = x0.expand(paths, -1).clone()
    source = NormalSource(seed, device, dtype) if dB is None else None
    sqrt_dt = math.sqrt(dt)

    # Check the diffusion's shape once, with a clear message (not a broadcasting error later).
    g0 = sde.diffusion(t0, x[:1])
    want = (1, sde.state_dim) if sde.noise_type == "diagonal" else (1, sde.state_dim, sde.noise_dim)
    if tuple(g0.shape) != want:
        raise LipverifyError(
            f"shape mismatch: diffusion returned shape {tuple(g0.shape)} for one path, expected {want} "
            f"({sde.noise_type} noise, state dimension {sde.state_dim}, noise dimension {sde.noise_dim})"
        )
    if sde.noise_type == "diagonal" and sde.noise_dim != sde.state_dim:
        raise LipverifyError("diagonal noise needs noise_dim == state_dim")

    times = [t0]
    states = [x.clone()]
    bad_step = torch.full((paths,), -1, dtype=torch.int64, device=device)
    bad = torch.zeros(paths, dtype=torch.bool, device=device)
    any_bad = False
    for k in range(steps):
        t = t0 + k * dt
        if dB is None:
            inc = source.draw(paths, sde.noise_dim) * sqrt_dt
        else:
            inc = dB[k]
        if observer is not None:
            observer(k, t, x, inc)
        x_new = sch.step(sde, t, x, dt, inc)
        # One reduction per step: a non-finite entry makes the sum non-finite (the per-path test
        # runs only then). Diverged paths are frozen at their last finite state.
        if any_bad or not bool(torch.isfinite(x_new.sum())):
            nonfinite = ~torch.isfinite(x_new).all(-1)
            newly = nonfinite & ~bad
            bad_step[newly] = k + 1
            bad |= nonfinite
            any_bad = bool(bad.any())
            if any_bad:
                x_new = torch.where(bad.unsqueeze(-1), x, x_new)
        x = x_new
        if record_every is not None and (k + 1) % record_every == 0 and k + 1 != steps:
            times.append(t0 + (k + 1) * dt)
            states.append(x.clone())
    times.append(t0 + steps * dt)
    states.append(x.clone())
    final = x.clone()
    final[bad] = float("nan")
    return Solution(
        times=torch.tensor(times, dtype=torch.float64),
        states=torch.stack(states),
        final=final,
        diverged=torch.nonzero(bad).flatten(),
        diverged_step=bad_step,
        dt=dt,
        scheme=sch.name,
    )
