"""Itô dynamics of the operator norm: Theorems 14-17 and Proposition 21.

Layer level (Theorem 14), with the Proposition 5 estimator of the batch noise and learning rate eta:

* ``mu  = -eta u^T grad_L v``                         (optimisation-induced drift)
* ``phi = eta sqrt(J^T Sigma_hat J)``, ``J^T Sigma_hat J = scale * sum_i (u^T (G_i - G_bar) v)^2``
* ``psi = (eta^2 / 2) tr(H Sigma_hat) = (eta^2 / 2) scale * sum_i q_H(G_i - G_bar)``

with ``scale = (1 - b/N) / (b (b - 1))``. Everything is computed from the per-sample projections
``G_i^T u`` and ``G_i v`` (MATH section 3); no d x d object is formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lipverify._validation import (
    SUPPORTED_DTYPES,
    DegenerateSpectrumError,
    LipverifyError,
    check_per_sample,
)
from lipverify.noise import estimator_scale
from lipverify.spectral import (
    SpectralDecomposition,
    decompose,
    gap_tolerance_for,
)


class NonFiniteTermError(LipverifyError):
    """A Theorem 14 term overflowed (inf/NaN): the training loop reports it as a divergence at its
    step and lr."""


@dataclass(frozen=True)
class LayerTerms:
    """Theorem 14 terms of one layer at one step (Python floats).

    ``sigma``: sigma_1; ``mu``, ``psi``: drift parts per step; ``phi``: diffusion per sqrt(step);
    ``gap``: sigma_1 - sigma_2; ``degenerate``: relative gap below the tolerance (default
    :func:`lipverify.spectral.gap_tolerance_for` the compute dtype; psi then loses accuracy like
    eps/gap). ``noise_projections`` (b,): ``eta sqrt(scale) u^T (G_i - G_bar) v``, whose squares sum
    to phi^2; used for the cross-layer diagnostic of MATH section 4.
    """

    sigma: float
    mu: float
    phi: float
    psi: float
    gap: float
    degenerate: bool = False
    noise_projections: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def relative_gap(self) -> float:
        return self.gap / self.sigma

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "sigma": self.sigma,
            "mu": self.mu,
            "phi": self.phi,
            "psi": self.psi,
            "gap": self.gap,
            "degenerate": self.degenerate,
        }


def layer_terms_from_projections(
    dec: SpectralDecomposition,
    y: torch.Tensor,
    x: torch.Tensor,
    drift_projection: torch.Tensor | float,
    lr: float,
    population_size: int | None = None,
    gap_tolerance: float | None = None,
    name: str = "layer",
    quadratic_forms: torch.Tensor | None = None,
) -> LayerTerms:
    """Theorem 14 from projections of the centred per-sample gradients E_i = G_i - G_bar.

    ``y``: (b, n) rows ``E_i^T u``; ``x``: (b, m) rows ``E_i v``; ``drift_projection``:
    ``u^T grad_L v`` for the chosen estimate of the expected gradient. The kernel shared by
    :func:`layer_terms` and the model probe. ``dec`` is a
    :class:`~lipverify.spectral.SpectralDecomposition` or any object with the same ``sigma``
    (at least sigma_1, sigma_2), ``sigma1``, ``gap``, ``u`` and ``quadratic_form(y, x)`` (the probe's
    Cholesky-based resolvent spectrum). ``quadratic_forms``: (b,) ``q_H(E_i)`` when the caller has
    computed them already (default: ``dec.quadratic_form(y, x)``).
    """
    if not (math.isfinite(lr) and lr > 0):
        raise LipverifyError(f"{name}: the learning rate must be positive and finite, got {lr}")
    b = y.shape[0]
    scale = estimator_scale(b, population_size)
    if dec.sigma.numel() > 1 and not bool(dec.sigma[0] > dec.sigma[1]):
        raise DegenerateSpectrumError(
            f"{name}: sigma_1 = sigma_2 = {float(dec.sigma[0]):.6g}; psi (Theorem 14) is undefined"
        )
    if gap_tolerance is None:
        gap_tolerance = gap_tolerance_for(dec.sigma1.dtype)
    proj = x @ dec.u  # u^T E_i v, (b,)
    q = dec.quadratic_form(y, x) if quadratic_forms is None else quadratic_forms
    jsj = (proj * proj).sum() * scale
    trace_hs = q.sum() * scale
    sigma = float(dec.sigma1)
    gap = float(dec.gap)
    terms = LayerTerms(
        sigma=sigma,
        mu=-lr * float(drift_projection),
        phi=lr * math.sqrt(max(float(jsj), 0.0)),
        psi=0.5 * lr * lr * float(trace_hs),
        gap=gap,
        degenerate=gap / sigma < gap_tolerance,
        noise_projections=lr * math.sqrt(scale) * proj,
    )
    for key in ("mu", "phi", "psi"):
        if not math.isfinite(getattr(terms, key)):
            raise NonFiniteTermError(f"{name}: {key} is not finite (gap {gap:.3g}); check the inputs")
    return terms


def layer_terms(
    W: torch.Tensor,
    per_sample_grads: torch.Tensor,
    lr: float,
    mean_grad: torch.Tensor | None = None,
    population_size: int | None = None,
    gap_tolerance: float | None = None,
) -> LayerTerms:
    """Theorem 14 for one layer with the Proposition 5 noise estimator.

    W: (m, n); per_sample_grads: (b, m, n) or (b, m*n) column-major, b >= 2; ``mean_grad``: (m, n)
    estimate of the expected gradient grad_L (default: the batch mean, which carries the realised
    noise; pass the full-data gradient for the exact expectation); ``population_size``: N for the
    without-replacement factor. Computed in W's compute dtype (use float64 for references).
    """
    dec = decompose(W)
    m, n = W.shape
    G = check_per_sample(per_sample_grads, m, n).to(dec.sigma.dtype)
    G_bar = G.mean(0)
    if mean_grad is None:
        mean_grad = G_bar
    elif tuple(mean_grad.shape) != (m, n):
        raise LipverifyError(
            f"shape mismatch: mean_grad has shape {tuple(mean_grad.shape)}, W has ({m}, {n})"
        )
    elif mean_grad.dtype not in SUPPORTED_DTYPES:
        raise LipverifyError(f"mean_grad has unsupported dtype {mean_grad.dtype}")
    E = G - G_bar
    y = dec.u @ E  # E_i^T u, (b, n); matmul is much faster than einsum over E's row axis
    x = E @ dec.v  # E_i v, (b, m)
    drift = dec.u @ mean_grad.to(dec.sigma.dtype) @ dec.v
    return layer_terms_from_projections(dec, y, x, drift, lr, population_size, gap_tolerance)


@dataclass(frozen=True)
class NetworkTerms:
    """Theorem 15 terms of ``ln K = sum_l ln sigma_l`` at one step.

    ``mu = sum mu_l / sigma_l``, ``psi = sum psi_l / sigma_l``, ``phi_sq = sum phi_l^2 / sigma_l^2``;
    ``d ln K = (mu + psi - phi_sq / 2) dt + sqrt(phi_sq) dB``. ``phi_sq_cross``: the cross-layer
    terms Assumption 3 drops (MATH section 4), or None when projections were not available.
    """

    log_bound: float
    mu: float
    psi: float
    phi_sq: float
    phi_sq_cross: float | None = None
    degenerate: bool = False

    @property
    def log_drift(self) -> float:
        """Theorem 15 drift of ln K."""
        from lipverify import _generated

        return _generated.log_bound_drift(self.mu, self.psi, self.phi_sq)

    def as_dict(self) -> dict[str, float | bool | None]:
        return {
            "log_bound": self.log_bound,
            "mu": self.mu,
            "psi": self.psi,
            "phi_sq": self.phi_sq,
            "phi_sq_cross": self.phi_sq_cross,
            "degenerate": self.degenerate,
        }


def _layer_list(layers: Sequence[LayerTerms] | Mapping[str, LayerTerms]) -> list[LayerTerms]:
    items = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not items:
        raise LipverifyError("network_terms needs at least one layer")
    return items


def network_terms(layers: Sequence[LayerTerms] | Mapping[str, LayerTerms]) -> NetworkTerms:
    """Theorem 15: combine per-layer terms (a sequence or a name -> LayerTerms mapping)."""
    from lipverify import _generated

    items = _layer_list(layers)
    cross = None
    projections = [t.noise_projections for t in items]
    if all(p is not None for p in projections) and len({p.shape for p in projections}) == 1:
        # Diffusion of ln K without Assumption 3: sum_i (sum_l p_{l,i} / sigma_l)^2.
        full = sum(p.to(torch.float64) / t.sigma for p, t in zip(projections, items, strict=True))
        cross = float((full * full).sum()) - sum(t.phi**2 / t.sigma**2 for t in items)
    return NetworkTerms(
        log_bound=sum(math.log(t.sigma) for t in items),
        mu=sum(_generated.normalised_rate(t.mu, t.sigma) for t in items),
        psi=sum(_generated.normalised_rate(t.psi, t.sigma) for t in items),
        phi_sq=sum(_generated.normalised_diffusion_sq(t.phi, t.sigma) for t in items),
        phi_sq_cross=cross,
        degenerate=any(t.degenerate for t in items),
    )


@dataclass(frozen=True)
class BoundPrediction:
    """Theorems 16/17 along a recorded series, at steps t = 0..T (arrays of length T + 1, float64).

    ``mean = E[K_t]``, ``var = Var[K_t]``; ``layer_mean``/``layer_var``: (T + 1, L) first-order
    per-layer ``E[sigma_t]`` and ``Var[sigma_t]`` when a layer series was given, else None.
    """

    mean: torch.Tensor
    var: torch.Tensor
    layer_mean: torch.Tensor | None = None
    layer_var: torch.Tensor | None = None

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


def _cumulative(values: Sequence[float]) -> torch.Tensor:
    """Left-point sums: entry t is sum_{s < t} values[s] (dt = 1 step), length T + 1."""
    v = torch.tensor(list(values), dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(v, 0)])


def predict_bound(
    network_series: Sequence[NetworkTerms],
    bound0: float,
    layer_series: Sequence[Sequence[LayerTerms] | Mapping[str, LayerTerms]] | None = None,
) -> BoundPrediction:
    """Theorem 17 with mu, psi, phi measured along the run (treated as deterministic in time).

    ``E[K_t] = K_0 exp(sum_{s<t} (mu_s + psi_s))``, ``Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1)``,
    ``Phi_t = sum_{s<t} phi_sq_s``; per layer ``E[sigma_t] = sigma_0 + sum_{s<t} (mu + psi)``,
    ``Var[sigma_t] = sum_{s<t} phi^2`` (first order). The initial per-layer sigma_0 is taken from
    the first entry of ``layer_series``.
    """
    if not network_series:
        raise LipverifyError("predict_bound needs a non-empty series of NetworkTerms")
    if not (math.isfinite(bound0) and bound0 > 0):
        raise LipverifyError(f"bound0 must be a positive finite number, got {bound0}")
    for step, t in enumerate(network_series):
        if not all(math.isfinite(float(v)) for v in (t.mu, t.psi, t.phi_sq)):
            raise LipverifyError(f"network terms at step {step} are not finite: {t}")
        if float(t.phi_sq) < 0:
            raise LipverifyError(f"phi_sq at step {step} is negative ({float(t.phi_sq)}): it is a variance")
    from lipverify import _generated

    drift = _cumulative([t.mu + t.psi for t in network_series])
    Phi = _cumulative([t.phi_sq for t in network_series])
    mean = _generated.bound_mean(bound0, drift)
    var = _generated.bound_variance(mean, Phi)
    layer_mean = layer_var = None
    if layer_series is not None:
        rows = [_layer_list(step) for step in layer_series]
        if len(rows) != len(network_series):
            raise LipverifyError(
                f"layer_series has {len(rows)} steps, network_series has {len(network_series)}"
            )
        L = len(rows[0])
        sigma0 = torch.tensor([t.sigma for t in rows[0]], dtype=torch.float64)
        drift_l = torch.tensor([[t.mu + t.psi for t in r] for r in rows], dtype=torch.float64).reshape(-1, L)
        phi_l = torch.tensor([[t.phi**2 for t in r] for r in rows], dtype=torch.float64).reshape(-1, L)
        zeros = torch.zeros(1, L, dtype=torch.float64)
        layer_mean = _generated.layer_mean(sigma0, torch.cat([zeros, torch.cumsum(drift_l, 0)]))
        layer_var = _generated.layer_variance(torch.cat([zeros, torch.cumsum(phi_l, 0)]))
    return BoundPrediction(mean=mean, var=var, layer_mean=layer_mean, layer_var=layer_var)


def rescale_batch_size(
    network_series: Sequence[NetworkTerms], batch_size: int, new_batch_size: int
) -> list[NetworkTerms]:
    """Proposition 21: a series measured at batch size b, moved to b' when b changes only Sigma.

    ``psi -> psi b / b'`` and ``phi_sq -> phi_sq b / b'`` (Sigma = C / b); mu is unchanged.
    Feed the result to :func:`predict_bound`: ``Var[K_t]`` then scales like 1/b' to first order.
    """
    if batch_size < 2 or new_batch_size < 2:
        raise LipverifyError(f"batch sizes must be >= 2, got {batch_size} and {new_batch_size}")
    from lipverify import _generated

    def rescale(value: float) -> float:
        return _generated.rescale_noise_term(value, batch_size, new_batch_size)

    return [
        NetworkTerms(
            log_bound=t.log_bound,
            mu=t.mu,
            psi=rescale(t.psi),
            phi_sq=rescale(t.phi_sq),
            phi_sq_cross=None if t.phi_sq_cross is None else rescale(t.phi_sq_cross),
            degenerate=t.degenerate,
        )
        for t in network_series
    ]
