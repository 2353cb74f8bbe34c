"""Sharpness of the loss: the largest eigenvalue of its Hessian in the parameters.

The SDE picture of SGD (the paper's Theorems 14-17 treat ``W_{t+1} = W_t - eta g`` as an Itô
step) needs the step to be stable on the local quadratic model: gradient descent on
``L(theta) ~ 1/2 theta^T H theta`` contracts along every eigendirection only when
``eta * lambda_max(H) < 2``. Past that, the iterates oscillate with growing amplitude (the
"edge of stability") and the small-step expansion behind the drift/diffusion terms no longer
describes the dynamics.

Stability concerns the largest *algebraic* eigenvalue ``lambda_max`` (a negative eigenvalue is a
direction of descent, unstable for any eta but not by oscillation). Power iteration finds the
eigenvalue of largest *magnitude*; when that is negative, ``lambda_max`` is found by a second
power iteration on the shifted operator ``H - lambda_dom I`` (all of its eigenvalues are >= 0 and
its top one is ``lambda_max - lambda_dom``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lipverify._validation import LipverifyError


@dataclass(frozen=True)
class SharpnessResult:
    """``eigenvalue``: lambda_max (Python float, largest algebraic eigenvalue of the Hessian);
    ``vector``: its unit eigenvector, flattened over the parameters in order (1-D tensor, the
    parameters' dtype); ``iterations``: Hessian-vector products used; ``residual``:
    ``||H v - lambda v||``, which bounds the distance of ``eigenvalue`` to an eigenvalue of H;
    ``converged``: the residual met the tolerance; ``shifted``: the magnitude-dominant eigenvalue
    was negative and the shifted iteration was run."""

    eigenvalue: float
    vector: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    shifted: bool


def hessian_vector_product(
    loss_closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for ``H`` the Hessian of ``loss_closure()`` (a scalar) in ``params``, by double
    backward through one retained graph. ``v`` and the result are flat (sum of ``numel``,) tensors."""
    params = list(params)
    loss = loss_closure()
    if loss.dim() != 0:
        raise LipverifyError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.cat(
            [
                (h if h is not None else torch.zeros_like(p)).reshape(-1)
                for h, p in zip(hv, params, strict=True)
            ]
        ).detach()

    return hvp


def _power(
    matvec, v: torch.Tensor, max_iterations: int, tol: float
) -> tuple[float, torch.Tensor, int, float]:
    """Power iteration on ``matvec``: (Rayleigh quotient rho, unit v, products used, residual
    ``||A v - rho v||``); stops when the residual is ``<= tol * max(|rho|, tiny)``."""
    v = v / v.norm()
    rho, residual = 0.0, math.inf
    for it in range(1, max_iterations + 1):
        av = matvec(v)
        if not bool(torch.isfinite(av).all()):
            return math.nan, v, it, math.nan
        rho = float(v @ av)
        residual = float((av - rho * v).norm())
        if residual <= tol * max(abs(rho), torch.finfo(v.dtype).tiny):
            return rho, v, it, residual
        norm = av.norm()
        if not bool(norm > 0):  # A v = 0: v is in the null space, rho = 0 is exact
            return 0.0, v, it, 0.0
        v = av / norm
    return rho, v, max_iterations, residual


def top_hessian_eigenvalue(
    loss_closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    v0: torch.Tensor | None = None,
    max_iterations: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """lambda_max of the Hessian of ``loss_closure()`` in ``params`` by HVP power iteration.

    ``params``: the tensors (requires_grad) the loss is differentiated in, any float dtype (the
    iteration runs in their common dtype; pass float64 parameters for references). ``v0``: warm
    start (e.g. the previous call's ``vector``), flat of length ``sum numel``; default a Gaussian
    from ``generator`` (a fresh seed-0 generator: the result does not depend on the global RNG).
    Stops after ``max_iterations`` products per phase or when the relative residual
    ``||H v - rho v|| / |rho|`` is below ``tol``. A negative magnitude-dominant eigenvalue triggers
    the shifted second phase (module docstring). Non-finite results are a :class:`LipverifyError`.
    """
    params = [p for p in params]
    if not params:
        raise LipverifyError("top_hessian_eigenvalue needs at least one parameter")
    dtype = params[0].dtype
    n = sum(p.numel() for p in params)
    if v0 is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        v0 = torch.randn(n, generator=gen, dtype=dtype).to(params[0].device)
    elif v0.shape != (n,):
        raise LipverifyError(f"v0 has shape {tuple(v0.shape)}; the parameters have {n} entries")
    v0 = v0.to(device=params[0].device, dtype=dtype)
    if not bool(torch.isfinite(v0).all()) or not bool(v0.norm() > 0):
        raise LipverifyError("v0 must be finite and non-zero")
    hvp = hessian_vector_product(loss_closure, params)
    rho, v, its, residual = _power(hvp, v0, max_iterations, tol)
    converged = residual <= tol * max(abs(rho), torch.finfo(dtype).tiny)
    shifted = False
    if rho < 0:
        shifted = True
        shift = rho  # H - rho I is positive semi-definite up to the accuracy of rho
        mu, v2, its2, residual = _power(lambda x: hvp(x) - shift * x, v0, max_iterations, tol)
        # the shifted operator's residual is H's: tolerance relative to the shifted eigenvalue
        converged = residual <= tol * max(abs(mu), torch.finfo(dtype).tiny)
        rho, v, its = mu + shift, v2, its + its2
    if not (math.isfinite(rho) and math.isfinite(residual)):
        raise LipverifyError(
            f"the Hessian's top eigenvalue is not finite ({rho}); the loss or parameters overflow"
        )
    return SharpnessResult(rho, v.detach(), its, residual, converged, shifted)
