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
import warnings
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
    SpectralGapWarning,
    check_gap,
    decompose,
    gap_tolerance_for,
)


class NonFiniteTermError(LipverifyError):
    """A Theorem 14 term overflowed (inf/NaN): the training loop reports it as a divergence at its
    step and lr."""


class BoundOverflowWarning(RuntimeWarning):
    """:func:`predict_bound` overflowed float64 (``BoundPrediction.overflow`` holds the message)."""


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
    #: False: the probe's device-route spectrum of this step did not converge (then also
    #: ``degenerate=True``); the step's terms are not to be used
    converged: bool = True

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

    Gap policy of this kernel (the probe records every step and flags rather than stops): exactly
    ``sigma_1 = sigma_2`` raises :class:`DegenerateSpectrumError`; any relative gap below
    ``gap_tolerance`` returns ``degenerate=True`` without a warning, whatever psi's size. The public
    :func:`layer_terms` adds the rounding-level refusal and the warning.
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
    name: str = "W",
) -> LayerTerms:
    """Theorem 14 for one layer with the Proposition 5 noise estimator.

    W: (m, n); per_sample_grads: (b, m, n) or (b, m*n) column-major, b >= 2; ``mean_grad``: (m, n)
    estimate of the expected gradient grad_L (default: the batch mean, which carries the realised
    noise; pass the full-data gradient for the exact expectation); ``population_size``: N for the
    without-replacement factor; ``name``: the layer's name in messages. Computed in W's compute
    dtype (use float64 for references); returns Python floats.

    Gap policy (g = relative gap (sigma_1 - sigma_2) / sigma_1):

    * g <= ``rounding_gap_tolerance(m, n, dtype)`` = 4 eps (sqrt(m) + sqrt(n)) (sigma_1 = sigma_2 up
      to rounding, e.g. an orthogonal W): :class:`DegenerateSpectrumError`; u, v and psi are undefined
      (psi would be an arbitrary number of size ~1/g, 7e12 for an 8x8 orthogonal W).
    * g < ``gap_tolerance`` (default ``max(1e-6, sqrt(eps))``): the terms are returned with
      ``degenerate=True`` and a :class:`SpectralGapWarning` naming the layer, g, psi and its
      amplification 1/g (psi carries a relative error ~ eps/g).
    """
    dec = decompose(W, name)
    try:
        check_gap(dec, name, gap_tolerance, warn=False)
    except DegenerateSpectrumError as exc:
        raise DegenerateSpectrumError(f"{exc}; psi (Theorem 14) is undefined") from None
    m, n = W.shape
    G = check_per_sample(per_sample_grads, m, n).to(dec.sigma.dtype)
    G_bar = G.mean(0)
    if mean_grad is None:
        mean_grad = G_bar
    elif not isinstance(mean_grad, torch.Tensor) or tuple(mean_grad.shape) != (m, n):
        shape = tuple(mean_grad.shape) if isinstance(mean_grad, torch.Tensor) else type(mean_grad).__name__
        raise LipverifyError(f"shape mismatch: mean_grad has shape {shape}, W has ({m}, {n})")
    elif mean_grad.dtype not in SUPPORTED_DTYPES:
        raise LipverifyError(f"mean_grad has unsupported dtype {mean_grad.dtype}")
    E = G - G_bar
    y = dec.u @ E  # E_i^T u, (b, n); matmul is much faster than einsum over E's row axis
    x = E @ dec.v  # E_i v, (b, m)
    drift = dec.u @ mean_grad.to(dec.sigma.dtype) @ dec.v
    terms = layer_terms_from_projections(dec, y, x, drift, lr, population_size, gap_tolerance, name)
    if terms.degenerate:
        rel = terms.relative_gap
        warnings.warn(
            f"{name}: relative spectral gap {rel:.3g} is below "
            f"{gap_tolerance if gap_tolerance is not None else gap_tolerance_for(dec.sigma.dtype):.3g}: "
            f"psi = {terms.psi:.3g} is amplified like 1/gap = {1 / rel:.2g} and carries a relative error "
            f"~ eps/gap = {torch.finfo(dec.sigma.dtype).eps / rel:.2g}; the terms are flagged degenerate",
            SpectralGapWarning,
            stacklevel=2,
        )
    return terms


@dataclass(frozen=True)
class NetworkTerms:
    """Theorem 15 terms of ``ln K = sum_l ln sigma_l`` at one step.

    ``mu = sum mu_l / sigma_l``, ``psi = sum psi_l / sigma_l``, ``phi_sq = sum phi_l^2 / sigma_l^2``;
    ``d ln K = (mu + psi - phi_sq / 2) dt + sqrt(phi_sq) dB``. ``phi_sq_cross``: the cross-layer
    terms Assumption 3 drops (MATH section 4), or None when projections were not available.
    ``degenerate``: some layer is flagged; ``degenerate_layers``: their names (mapping keys, or
    ``"layer i"`` for a sequence) with their relative gaps, as ``(name, relative_gap)`` pairs.
    """

    log_bound: float
    mu: float
    psi: float
    phi_sq: float
    phi_sq_cross: float | None = None
    degenerate: bool = False
    degenerate_layers: tuple[tuple[str, float], ...] = ()

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


def _named_layers(layers: Sequence[LayerTerms] | Mapping[str, LayerTerms]) -> list[tuple[str, LayerTerms]]:
    if isinstance(layers, Mapping):
        items = [(str(k), t) for k, t in layers.items()]
    else:
        items = [(f"layer {i}", t) for i, t in enumerate(layers)]
    if not items:
        raise LipverifyError("network_terms needs at least one layer")
    return items


def _layer_list(layers: Sequence[LayerTerms] | Mapping[str, LayerTerms]) -> list[LayerTerms]:
    return [t for _, t in _named_layers(layers)]


def network_terms(
    layers: Sequence[LayerTerms] | Mapping[str, LayerTerms], diffusion_sq_full: float | None = None
) -> NetworkTerms:
    """Theorem 15: combine per-layer terms (a sequence or a name -> LayerTerms mapping).

    ``phi_sq_cross`` needs ``sum_i (sum_l p_{l,i} / sigma_l)^2`` from the layers' noise projections;
    ``diffusion_sq_full`` gives it when it was computed already (on the device, e.g. the first entry of
    :func:`lipverify.probe.dynamics_probe.cross_layer_squares`), so this call reads no tensor.

    Each layer needs a positive finite sigma and finite mu, phi, psi (else :class:`LipverifyError`
    naming the layer); a sum that overflows float64 is refused the same way. Degenerate layers are
    carried in ``degenerate`` / ``degenerate_layers`` (no warning here: the training loop calls this
    every step; :func:`layer_terms` warns, :func:`predict_bound` names them when psi overflows).
    """
    from lipverify import _generated

    named = _named_layers(layers)
    items = [t for _, t in named]
    for name, t in named:
        if not (math.isfinite(t.sigma) and t.sigma > 0):
            raise LipverifyError(f"{name}: sigma_1 = {t.sigma} must be positive and finite (ln K needs it)")
        for key in ("mu", "phi", "psi"):
            if not math.isfinite(getattr(t, key)):
                raise LipverifyError(f"{name}: {key} = {getattr(t, key)} is not finite")
    cross = None
    projections = [t.noise_projections for t in items]
    if all(p is not None for p in projections) and len({p.shape for p in projections}) == 1:
        # Diffusion of ln K without Assumption 3: sum_i (sum_l p_{l,i} / sigma_l)^2.
        if diffusion_sq_full is None:
            full = sum(p.to(torch.float64) / t.sigma for p, t in zip(projections, items, strict=True))
            diffusion_sq_full = float((full * full).sum())
        cross = diffusion_sq_full - sum(t.phi**2 / t.sigma**2 for t in items)
    try:
        net = NetworkTerms(
            log_bound=sum(math.log(t.sigma) for t in items),
            mu=sum(_generated.normalised_rate(t.mu, t.sigma) for t in items),
            psi=sum(_generated.normalised_rate(t.psi, t.sigma) for t in items),
            phi_sq=sum(_generated.normalised_diffusion_sq(t.phi, t.sigma) for t in items),
            phi_sq_cross=cross,
            degenerate=any(t.degenerate for t in items),
            degenerate_layers=tuple((name, t.relative_gap) for name, t in named if t.degenerate),
        )
        sums = ("mu", "psi", "phi_sq", "phi_sq_cross")
        bad = [k for k in sums if not math.isfinite(getattr(net, k) or 0.0)]
    except (OverflowError, ZeroDivisionError):  # Python floats: (phi / sigma)^2 with sigma^2 -> 0
        bad = ["mu, psi or phi_sq"]
    if bad:
        # the layer with the largest |term| / sigma is the one that overflowed
        worst, wt = max(named, key=lambda nt: max(abs(nt[1].mu), abs(nt[1].psi), nt[1].phi) / nt[1].sigma)
        raise LipverifyError(
            f"network {bad[0]} = sum over layers of term / sigma overflows float64; largest layer {worst} "
            f"(sigma {wt.sigma:.3g}, mu {wt.mu:.3g}, psi {wt.psi:.3g}, phi {wt.phi:.3g}, "
            f"degenerate={wt.degenerate})"
        )
    return net


@dataclass(frozen=True)
class BoundPrediction:
    """Theorems 16/17 along a recorded series, at steps t = 0..T (arrays of length T + 1, float64).

    ``mean = E[K_t]``, ``var = Var[K_t]``; ``layer_mean``/``layer_var``: (T + 1, L) first-order
    per-layer ``E[sigma_t]`` and ``Var[sigma_t]`` when a layer series was given, else None.
    ``overflow_step``: the first t at which some output is inf or NaN (None: all finite);
    ``overflow``: the message naming that step, the overflowing term and any degenerate layer.
    """

    mean: torch.Tensor
    var: torch.Tensor
    layer_mean: torch.Tensor | None = None
    layer_var: torch.Tensor | None = None
    overflow_step: int | None = None
    overflow: str | None = None

    @property
    def finite(self) -> bool:
        """Whether every output is finite (``overflow_step is None``)."""
        return self.overflow_step is None

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
    on_overflow: str = "warn",
) -> BoundPrediction:
    """Theorem 17 with mu, psi, phi measured along the run (treated as deterministic in time).

    ``E[K_t] = K_0 exp(sum_{s<t} (mu_s + psi_s))``, ``Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1)``,
    ``Phi_t = sum_{s<t} phi_sq_s``; per layer ``E[sigma_t] = sigma_0 + sum_{s<t} (mu + psi)``,
    ``Var[sigma_t] = sum_{s<t} phi^2`` (first order). The initial per-layer sigma_0 is taken from
    the first entry of ``layer_series``. Outputs are float64 tensors of length T + 1.

    Overflow (``exp`` above ln(max float64) = 709.78, e.g. psi ~ 1/gap of a degenerate layer): the
    message names the first step t with a non-finite output, the overflowing sum and its largest term,
    and the degenerate layers (with their relative gaps) among the steps before t. With
    ``on_overflow="warn"`` (default) the prediction is returned with ``overflow_step``/``overflow``
    set and a :class:`BoundOverflowWarning` is emitted; ``on_overflow="raise"`` raises
    :class:`LipverifyError` instead. Returning is the default because the finite prefix (steps < t) is
    still the Theorem 17 prediction and callers such as :mod:`lipverify.prediction` add their own
    context (the observed ln K, the learning rate) before refusing; the warning and the flag make the
    inf/NaN impossible to take for a number.
    """
    if on_overflow not in ("warn", "raise"):
        raise LipverifyError(f"on_overflow must be 'warn' or 'raise', got {on_overflow!r}")
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
    rows = None
    if layer_series is not None:
        rows = [_named_layers(step) for step in layer_series]
        if len(rows) != len(network_series):
            raise LipverifyError(
                f"layer_series has {len(rows)} steps, network_series has {len(network_series)}"
            )
        L = len(rows[0])
        if any(len(r) != L for r in rows):
            raise LipverifyError(f"layer_series: every step needs the same {L} layers")
        sigma0 = torch.tensor([t.sigma for _, t in rows[0]], dtype=torch.float64)
        drift_l = torch.tensor([[t.mu + t.psi for _, t in r] for r in rows], dtype=torch.float64)
        phi_l = torch.tensor([[t.phi**2 for _, t in r] for r in rows], dtype=torch.float64)
        zeros = torch.zeros(1, L, dtype=torch.float64)
        layer_mean = _generated.layer_mean(sigma0, torch.cat([zeros, torch.cumsum(drift_l, 0)]))
        layer_var = _generated.layer_variance(torch.cat([zeros, torch.cumsum(phi_l, 0)]))
    bad = ~(torch.isfinite(mean) & torch.isfinite(var))
    if layer_mean is not None:
        bad |= ~(torch.isfinite(layer_mean).all(1) & torch.isfinite(layer_var).all(1))
    if not bool(bad.any()):
        return BoundPrediction(mean=mean, var=var, layer_mean=layer_mean, layer_var=layer_var)
    step = int(bad.nonzero()[0, 0])
    message = _overflow_message(step, network_series, rows, drift, Phi, mean, var)
    if on_overflow == "raise":
        raise LipverifyError(message)
    warnings.warn(message, BoundOverflowWarning, stacklevel=2)
    return BoundPrediction(
        mean=mean, var=var, layer_mean=layer_mean, layer_var=layer_var, overflow_step=step, overflow=message
    )


def _overflow_message(step, network_series, rows, drift, Phi, mean, var) -> str:
    """Names the first non-finite step of :func:`predict_bound`, the sum that overflowed, its largest
    term and the degenerate layers before it (from ``rows`` when given, else the network flags)."""
    before = network_series[:step]
    if not math.isfinite(float(mean[step])):
        what = (
            f"E[K_t] = K_0 exp(sum_{{s<t}} (mu_bar + psi_bar)) with sum = {float(drift[step]):.3g} overflows "
            "float64 (exp overflows above 709.78)"
        )
        key, s_max = max(
            ((k, s) for s in range(step) for k in ("mu", "psi")),
            key=lambda ks: abs(getattr(before[ks[1]], ks[0])),
        )
        term = f"{key}_bar = {getattr(before[s_max], key):.3g} at step {s_max}"
    elif not math.isfinite(float(var[step])):
        what = (
            f"Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1) with E[K_t] = {float(mean[step]):.3g}, "
            f"Phi_t = {float(Phi[step]):.3g} overflows float64"
        )
        s_max = max(range(step), key=lambda s: before[s].phi_sq)
        term = f"phi_sq_bar = {before[s_max].phi_sq:.3g} at step {s_max}"
    else:
        what = "the per-layer E[sigma_t] or Var[sigma_t] (sums of mu + psi, phi^2) overflows float64"
        term = "a layer term of order 1e308"
    degenerate = []
    for s in range(step):
        if rows is not None:
            degenerate += [(s, name, t.relative_gap) for name, t in rows[s] if t.degenerate]
        elif network_series[s].degenerate_layers:
            degenerate += [(s, name, g) for name, g in network_series[s].degenerate_layers]
        elif network_series[s].degenerate:
            degenerate.append((s, "some layer", math.nan))
    if degenerate:
        shown = "; ".join(
            f"{name} at step {s}" + ("" if math.isnan(g) else f" (relative gap {g:.2g}: psi ~ 1/gap)")
            for s, name, g in degenerate[:3]
        )
        more = f" and {len(degenerate) - 3} more" if len(degenerate) > 3 else ""
        cause = f"; degenerate layers (sigma_1 ~ sigma_2): {shown}{more}"
    else:
        cause = "; no layer is flagged degenerate (the terms themselves are this large: diverging run?)"
    return f"predict_bound: step {step}: {what}; largest term {term}{cause}"


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
            degenerate_layers=t.degenerate_layers,
        )
        for t in network_series
    ]
