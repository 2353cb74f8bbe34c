"""SDEs with known solutions or moments, and the matrix SGD-SDE of Definition 4 (float64).

* :class:`LognormalBound` — ``dK = K a(t) dt + K b(t) dB`` (Theorem 16/17 with deterministic
  coefficients): exact solution given the Brownian path, exact moments, and the exact moments of
  the Euler–Maruyama chain (so the scheme's bias is known, not guessed).
* :class:`OrnsteinUhlenbeck` — ``dX = theta (m - X) dt + s dB``: exact mean/variance and the exact
  moments of the Euler–Maruyama chain.
* :class:`LeastSquares` — a finite data set X (N, n), Y (N, m), per-sample loss
  ``l_i(W) = |W x_i - y_i|^2 / 2``, per-sample gradients ``G_i = (W x_i - y_i) x_i^T``.
* :class:`MatrixSGDSDE` — ``d theta = -eta grad L dt + eta Sigma^{1/2} dB`` for theta = W, with the
  exact population noise ``Sigma(W) = C(W) / b``, ``C = (1/N) sum_i E_i E_i^T``,
  ``E_i = G_i - G_bar`` (sampling with replacement, MATH §1). The root is the low-rank factor of
  Proposition 7: ``D(W) = eta [E_1, ..., E_N] / sqrt(N b)``, d x N, driven by an N-dimensional
  Brownian motion: ``D D^T = eta^2 Sigma`` exactly, so the SDE has the same law as with the
  symmetric root (MATH §1, Prop. 7 note).
* :class:`TwoLayerSGDSDE` — the same for ``W2 W1`` with the loss on ``W2 W1 x``; both layers are
  driven by the *same* Brownian motion (one mini-batch drives both layers' noise).

The Theorem 14 terms along each path are computed in batch over paths by
:func:`layer_quantities` — the formulas of :func:`lipverify.dynamics.layer_terms_from_projections`
with the population scale ``1/(N b)`` (tests check both agree path by path).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lipverify._validation import DegenerateSpectrumError, LipverifyError
from lipverify.sde import SDE
from lipverify.spectral import SpectralDecomposition, quadratic_form_from_projections


def _integral(func: Callable[[float], float], t: float) -> float:
    from scipy.integrate import quad

    value, _ = quad(func, 0.0, t, limit=200, epsabs=1e-13, epsrel=1e-12)
    return value


class LognormalBound(SDE):
    """``dK = K a(t) dt + K b(t) dB``, state (P, 1), diagonal noise.

    Exact: ``K_t = K0 exp(A(t) - Q(t)/2 + int_0^t b dB)``, ``A = int a``, ``Q = int b^2``;
    ``E[K_t] = K0 e^{A}``, ``Var[K_t] = E[K_t]^2 (e^{Q} - 1)`` (Theorem 17 with mu_bar + psi_bar = a,
    phi_bar = b), ``E[ln K_t] = ln K0 + A - Q/2`` (Theorem 15). ``a``, ``b``: callables of a float t;
    ``int_a``, ``int_b2``: their antiderivatives from 0 (default: scipy quad to 1e-12).
    """

    noise_type = "diagonal"
    state_dim = 1
    noise_dim = 1

    def __init__(
        self,
        a: Callable[[float], float],
        b: Callable[[float], float],
        k0: float = 1.0,
        int_a: Callable[[float], float] | None = None,
        int_b2: Callable[[float], float] | None = None,
        b_prime_max: float | None = None,
    ) -> None:
        if not (math.isfinite(k0) and k0 > 0):
            raise LipverifyError(f"K0 must be positive and finite, got {k0}")
        self.a, self.b, self.k0 = a, b, float(k0)
        self._int_a = int_a or (lambda t: _integral(a, t))
        self._int_b2 = int_b2 or (lambda t: _integral(lambda s: b(s) ** 2, t))
        self.b_prime_max = b_prime_max

    @classmethod
    def example(cls, k0: float = 1.0, batch_size: float = 1.0) -> LognormalBound:
        """``a(t) = 0.3 + 0.2 cos(2 pi t)``, ``b(t) = (0.5 + 0.2 sin(2 pi t)) / sqrt(batch)``: the
        noise of a bound with ``Sigma = C / b`` (Proposition 21), analytic integrals."""
        w = 2 * math.pi
        s = 1.0 / math.sqrt(batch_size)
        return cls(
            a=lambda t: 0.3 + 0.2 * math.cos(w * t),
            b=lambda t: s * (0.5 + 0.2 * math.sin(w * t)),
            k0=k0,
            int_a=lambda t: 0.3 * t + 0.2 * math.sin(w * t) / w,
            # (0.5 + 0.2 sin)^2 = 0.25 + 0.2 sin + 0.02 (1 - cos 2wt)
            int_b2=lambda t: (
                s * s * (0.27 * t + 0.2 * (1 - math.cos(w * t)) / w - 0.01 * math.sin(2 * w * t) / w)
            ),
            b_prime_max=s * 0.2 * w,
        )

    def drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return self.a(t) * x

    def diffusion(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return self.b(t) * x

    def diffusion_derivative(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.b(t))

    def int_a(self, t: float) -> float:
        return self._int_a(t)

    def int_b2(self, t: float) -> float:
        return self._int_b2(t)

    def mean(self, t: float) -> float:
        """Theorem 17: ``E[K_t] = K0 exp(int a)``."""
        return self.k0 * math.exp(self.int_a(t))

    def variance(self, t: float) -> float:
        """Theorem 17: ``Var[K_t] = E[K_t]^2 (exp(int b^2) - 1)``."""
        return self.mean(t) ** 2 * math.expm1(self.int_b2(t))

    def log_mean(self, t: float) -> float:
        """Theorem 15: ``E[ln K_t] = ln K0 + int (a - b^2 / 2)``."""
        return math.log(self.k0) + self.int_a(t) - 0.5 * self.int_b2(t)

    def euler_moments(self, h: float, steps: int, t0: float = 0.0) -> tuple[float, float]:
        """Exact mean and variance of the Euler–Maruyama chain ``K_{k+1} = K_k (1 + a_k h + b_k dB)``:
        ``E = K0 prod (1 + a_k h)``, ``E[K^2] = K0^2 prod ((1 + a_k h)^2 + b_k^2 h)``."""
        m1 = self.k0
        m2 = self.k0**2
        for k in range(steps):
            t = t0 + k * h
            ak, bk = self.a(t), self.b(t)
            m1 *= 1 + ak * h
            m2 *= (1 + ak * h) ** 2 + bk * bk * h
        return m1, m2 - m1 * m1

    def exact(self, dB: torch.Tensor, h: float, t0: float = 0.0) -> torch.Tensor:
        """Exact K at the end of the grid given the increments ``dB`` (steps, P, 1) of step h.

        ``int b dB`` is evaluated as ``sum_k b(t_k + h/2) dB_k``; its error is Gaussian with variance
        ``sum_k int (b(s) - b(mid_k))^2 ds <= max|b'|^2 T h^2 / 12``, so the reference has strong
        error O(h) (:meth:`reference_error`). Returns (P, 1) float64.
        """
        steps = dB.shape[0]
        T = steps * h
        mids = torch.tensor(
            [self.b(t0 + (k + 0.5) * h) for k in range(steps)], dtype=dB.dtype, device=dB.device
        )
        stoch = torch.einsum("k,kpd->pd", mids, dB)
        det = (self.int_a(t0 + T) - self.int_a(t0)) - 0.5 * (self.int_b2(t0 + T) - self.int_b2(t0))
        return self.k0 * torch.exp(det + stoch)

    def reference_error(self, h: float, T: float) -> float:
        """Bound on the RMS of ``log`` error of :meth:`exact`: ``max|b'| sqrt(T / 12) h``."""
        bp = self.b_prime_max if self.b_prime_max is not None else math.inf
        return bp * math.sqrt(T / 12) * h


class OrnsteinUhlenbeck(SDE):
    """``dX = theta (m - X) dt + s dB`` in d independent coordinates (diagonal noise).

    ``E[X_t] = m + (x0 - m) e^{-theta t}``, ``Var[X_t] = s^2 (1 - e^{-2 theta t}) / (2 theta)``.
    """

    noise_type = "diagonal"

    def __init__(
        self, theta: float = 1.5, m: float = 0.5, s: float = 0.8, x0: float = 2.0, dim: int = 1
    ) -> None:
        if theta <= 0 or s <= 0:
            raise LipverifyError(f"OU needs theta > 0 and s > 0, got theta={theta}, s={s}")
        self.theta, self.m, self.s, self.x0 = float(theta), float(m), float(s), float(x0)
        self.state_dim = self.noise_dim = int(dim)

    def drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return self.theta * (self.m - x)

    def diffusion(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.s)

    def diffusion_derivative(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def mean(self, t: float) -> float:
        return self.m + (self.x0 - self.m) * math.exp(-self.theta * t)

    def variance(self, t: float) -> float:
        return self.s**2 * (-math.expm1(-2 * self.theta * t)) / (2 * self.theta)

    def euler_moments(self, h: float, steps: int) -> tuple[float, float]:
        """Exact moments of the Euler chain: ``m + (x0 - m) r^N`` and ``s^2 h (1 - r^{2N}) / (1 - r^2)``,
        ``r = 1 - theta h``."""
        r = 1 - self.theta * h
        var = self.s**2 * h * steps if r * r == 1 else self.s**2 * h * (1 - r ** (2 * steps)) / (1 - r * r)
        return self.m + (self.x0 - self.m) * r**steps, var


@dataclass(frozen=True)
class LeastSquares:
    """Finite data set for ``l_i(W) = |W x_i - y_i|^2 / 2``: X (N, n), Y (N, m), float64."""

    X: torch.Tensor
    Y: torch.Tensor

    @property
    def size(self) -> int:
        return self.X.shape[0]

    @classmethod
    def random(cls, m: int = 3, n: int = 4, N: int = 20, seed: int = 0, noise: float = 0.5) -> LeastSquares:
        """X ~ N(0, 1), Y = X W*^T + noise (W* ~ N(0, 1)), from a fixed seed."""
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(N, n, generator=g, dtype=torch.float64)
        Wstar = torch.randn(m, n, generator=g, dtype=torch.float64)
        Y = X @ Wstar.T + noise * torch.randn(N, m, generator=g, dtype=torch.float64)
        return cls(X, Y)

    def to(self, device: torch.device | str) -> LeastSquares:
        """The same data set on ``device``."""
        return LeastSquares(self.X.to(device), self.Y.to(device))

    def residuals(self, W: torch.Tensor) -> torch.Tensor:
        """``W x_i - y_i`` for W (..., m, n): (..., N, m)."""
        return torch.einsum("...mn,in->...im", W, self.X) - self.Y

    def per_sample_grads(self, W: torch.Tensor) -> torch.Tensor:
        """``G_i = (W x_i - y_i) x_i^T``: (..., N, m, n)."""
        r = self.residuals(W)
        return r.unsqueeze(-1) * self.X.unsqueeze(-2)

    def gradient(self, W: torch.Tensor) -> torch.Tensor:
        """Full-data gradient ``grad L = (1/N) sum_i G_i``: (..., m, n)."""
        return torch.einsum("...im,in->...mn", self.residuals(W), self.X) / self.size


@dataclass
class LayerQuantities:
    """Theorem 14 terms of one layer for P paths (tensors (P,) unless stated), float64.

    ``mu = -eta u^T grad_L v``, ``psi = (eta^2/2) scale sum_i q_H(E_i)``, ``phi_sq = eta^2 scale
    sum_i (u^T E_i v)^2``, ``proj`` (P, N) ``= eta sqrt(scale) u^T E_i v`` (so that the noise part
    of ``d sigma`` is ``sum_i proj_i dB_i``), ``gap = sigma_1 - sigma_2``.
    """

    sigma: torch.Tensor
    mu: torch.Tensor
    psi: torch.Tensor
    phi_sq: torch.Tensor
    proj: torch.Tensor
    gap: torch.Tensor


def layer_quantities(
    W: torch.Tensor, delta: torch.Tensor, act: torch.Tensor, lr: float, scale: float
) -> LayerQuantities:
    """Theorem 14 terms for a layer whose per-sample gradients are ``G_i = delta_i act_i^T``.

    W (P, m, n); delta (P, N, m); act (P, N, n) or (N, n); the population is the whole data set,
    so ``grad L = G_bar`` exactly and ``Sigma = scale * sum_i E_i E_i^T`` with ``scale = 1/(N b)``.
    Projections (MATH §2): ``E_i^T u = act_i (delta_i . u) - G_bar^T u``,
    ``E_i v = delta_i (act_i . v) - G_bar v``; no d x d object is formed.
    """
    N = delta.shape[-2]
    if act.ndim == 2:
        act = act.expand(delta.shape[0], -1, -1)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.transpose(-1, -2)
    if S.shape[-1] > 1 and bool((S[:, 0] <= S[:, 1]).any()):
        raise DegenerateSpectrumError("sigma_1 = sigma_2 on some path: psi (Theorem 14) is undefined")
    u, v = U[..., 0], V[..., 0]
    Gbar = torch.einsum("pim,pin->pmn", delta, act) / N
    du = torch.einsum("pim,pm->pi", delta, u)
    av = torch.einsum("pin,pn->pi", act, v)
    Gtu = torch.einsum("pmn,pm->pn", Gbar, u)
    Gv = torch.einsum("pmn,pn->pm", Gbar, v)
    uGv = (Gtu * v).sum(-1)
    y = act * du.unsqueeze(-1) - Gtu.unsqueeze(1)
    x = delta * av.unsqueeze(-1) - Gv.unsqueeze(1)
    p = du * av - uGv.unsqueeze(-1)
    q = quadratic_form_from_projections(SpectralDecomposition(U=U, sigma=S, V=V), y, x)
    gap = S[:, 0] - S[:, 1] if S.shape[-1] > 1 else S[:, 0]
    return LayerQuantities(
        sigma=S[:, 0],
        mu=-lr * uGv,
        psi=0.5 * lr * lr * scale * q.sum(-1),
        phi_sq=lr * lr * scale * (p * p).sum(-1),
        proj=lr * math.sqrt(scale) * p,
        gap=gap,
    )


def _noise_step(delta: torch.Tensor, act: torch.Tensor, dB: torch.Tensor) -> torch.Tensor:
    """``sum_i dB_i E_i = sum_i dB_i delta_i act_i^T - (sum_i dB_i) G_bar``: (P, m, n)."""
    N = delta.shape[-2]
    if act.ndim == 2:
        act = act.expand(delta.shape[0], -1, -1)
    raw = torch.einsum("pi,pim,pin->pmn", dB, delta, act)
    Gbar = torch.einsum("pim,pin->pmn", delta, act) / N
    return raw - dB.sum(-1)[:, None, None] * Gbar


class MatrixSGDSDE(SDE):
    """SGD-SDE of one least-squares layer: ``dW = -eta grad L dt + eta Sigma^{1/2} dB`` (Definition 4).

    State: W flattened row-major, (P, m n) (the SDE does not depend on how theta is ordered).
    Noise: N-dimensional, ``g(W) dB = eta sqrt(noise_scale) sum_i E_i dB_i`` with
    ``noise_scale = 1/(N b)`` (exact population Sigma = C/b). A different ``noise_scale`` builds
    the wrong variants (e.g. ``1/(N b^2)``).
    """

    noise_type = "general"

    def __init__(
        self, problem: LeastSquares, lr: float, batch_size: int, noise_scale: float | None = None
    ) -> None:
        _check_step_parameters(lr, batch_size)
        self.problem = problem
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.m, self.n = problem.Y.shape[1], problem.X.shape[1]
        self.state_dim = self.m * self.n
        self.noise_dim = problem.size
        self.scale = noise_scale if noise_scale is not None else 1.0 / (problem.size * batch_size)

    def matrix(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.m, self.n)

    def _parts(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.problem.residuals(W), self.problem.X.to(W)

    def drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return (-self.lr * self.problem.gradient(self.matrix(x))).reshape(x.shape)

    def diffusion_apply(self, t: float, x: torch.Tensor, dB: torch.Tensor) -> torch.Tensor:
        delta, act = self._parts(self.matrix(x))
        return (self.lr * math.sqrt(self.scale) * _noise_step(delta, act, dB)).reshape(x.shape)

    def diffusion(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """(P, m n, N): column i is ``eta sqrt(scale) vec_rowmajor(E_i)`` (for torchsde)."""
        G = self.problem.per_sample_grads(self.matrix(x))
        E = G - G.mean(-3, keepdim=True)
        return self.lr * math.sqrt(self.scale) * E.reshape(x.shape[0], self.noise_dim, -1).transpose(-1, -2)

    def terms(self, x: torch.Tensor) -> LayerQuantities:
        W = self.matrix(x)
        delta, act = self._parts(W)
        return layer_quantities(W, delta, act, self.lr, self.scale)


@dataclass
class NetworkQuantities:
    """Theorem 15 terms of ``ln K = ln sigma(W1) + ln sigma(W2)`` for P paths ((P,) tensors).

    ``phi_sq`` keeps Assumption 3 (sum of per-layer terms), ``phi_sq_cross`` is what it drops,
    ``proj`` (P, N): noise part of ``d ln K`` is ``sum_i proj_i dB_i`` (with the cross terms).
    """

    layers: tuple[LayerQuantities, LayerQuantities]
    log_bound: torch.Tensor
    mu: torch.Tensor
    psi: torch.Tensor
    phi_sq: torch.Tensor
    phi_sq_cross: torch.Tensor
    proj: torch.Tensor


def _check_step_parameters(lr: float, batch_size: int) -> None:
    """SGD-SDE coefficients need a finite lr > 0 and an integer batch size b >= 1."""
    if not (math.isfinite(lr) and lr > 0) or int(batch_size) != batch_size or batch_size < 1:
        raise LipverifyError(
            f"need a finite lr > 0 and an integer batch_size >= 1, got lr={lr}, batch_size={batch_size}"
        )


class TwoLayerSGDSDE(SDE):
    """SGD-SDE of ``f(x) = W2 W1 x`` (W1 (h, n), W2 (m, h)) with ``l_i = |W2 W1 x_i - y_i|^2 / 2``.

    Per-sample gradients: ``G1_i = (W2^T r_i) x_i^T``, ``G2_i = r_i (W1 x_i)^T``, r_i the residual.
    State: ``[vec_row(W1), vec_row(W2)]`` (P, h n + m h); one N-dimensional Brownian motion
    drives both layers (the batch noise is shared), so the layers' noises are correlated.
    """

    noise_type = "general"

    def __init__(
        self, problem: LeastSquares, hidden: int, lr: float, batch_size: int, noise_scale: float | None = None
    ) -> None:
        _check_step_parameters(lr, batch_size)
        self.problem = problem
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.m, self.n, self.h = problem.Y.shape[1], problem.X.shape[1], int(hidden)
        self.state_dim = self.h * self.n + self.m * self.h
        self.noise_dim = problem.size
        self.scale = noise_scale if noise_scale is not None else 1.0 / (problem.size * batch_size)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.h * self.n
        return x[:, :k].reshape(-1, self.h, self.n), x[:, k:].reshape(-1, self.m, self.h)

    def join(self, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
        return torch.cat([W1.reshape(W1.shape[0], -1), W2.reshape(W2.shape[0], -1)], -1)

    def _parts(self, x: torch.Tensor):
        W1, W2 = self.split(x)
        X = self.problem.X.to(x)
        hid = torch.einsum("phn,in->pih", W1, X)  # W1 x_i
        r = torch.einsum("pmh,pih->pim", W2, hid) - self.problem.Y.to(x)
        back = torch.einsum("pmh,pim->pih", W2, r)  # W2^T r_i
        return W1, W2, (back, X), (r, hid)

    def drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        _, _, (d1, a1), (d2, a2) = self._parts(x)
        N = self.noise_dim
        g1 = torch.einsum("pih,in->phn", d1, a1) / N
        g2 = torch.einsum("pim,pih->pmh", d2, a2) / N
        return -self.lr * self.join(g1, g2)

    def diffusion_apply(self, t: float, x: torch.Tensor, dB: torch.Tensor) -> torch.Tensor:
        _, _, (d1, a1), (d2, a2) = self._parts(x)
        c = self.lr * math.sqrt(self.scale)
        return c * self.join(_noise_step(d1, a1, dB), _noise_step(d2, a2, dB))

    def diffusion(self, t: float, x: torch.Tensor) -> torch.Tensor:
        _, _, (d1, a1), (d2, a2) = self._parts(x)
        P = x.shape[0]
        G1 = d1.unsqueeze(-1) * a1.expand(P, -1, -1).unsqueeze(-2)
        G2 = d2.unsqueeze(-1) * a2.unsqueeze(-2)
        E1 = (G1 - G1.mean(1, keepdim=True)).reshape(P, self.noise_dim, -1)
        E2 = (G2 - G2.mean(1, keepdim=True)).reshape(P, self.noise_dim, -1)
        return self.lr * math.sqrt(self.scale) * torch.cat([E1, E2], -1).transpose(-1, -2)

    def terms(self, x: torch.Tensor) -> NetworkQuantities:
        W1, W2, (d1, a1), (d2, a2) = self._parts(x)
        l1 = layer_quantities(W1, d1, a1, self.lr, self.scale)
        l2 = layer_quantities(W2, d2, a2, self.lr, self.scale)
        proj = l1.proj / l1.sigma.unsqueeze(-1) + l2.proj / l2.sigma.unsqueeze(-1)
        phi_sq = l1.phi_sq / l1.sigma**2 + l2.phi_sq / l2.sigma**2
        return NetworkQuantities(
            layers=(l1, l2),
            log_bound=torch.log(l1.sigma) + torch.log(l2.sigma),
            mu=l1.mu / l1.sigma + l2.mu / l2.sigma,
            psi=l1.psi / l1.sigma + l2.psi / l2.sigma,
            phi_sq=phi_sq,
            phi_sq_cross=(proj * proj).sum(-1) - phi_sq,
            proj=proj,
        )
