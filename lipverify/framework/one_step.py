"""One-step check of Theorems 14/15 on a real model (a framework test beyond the paper).

At fixed weights ``W_k`` (after k SGD steps of a run) draw B mini-batches the way the training
loader does (b indices without replacement, independently per batch), take one SGD step from the
same ``W_k`` with each and record, per probed layer l and batch j,

- the observed increment ``Delta ln sigma_1 = ln sigma_1(W + Delta W) - ln sigma_1(W)`` with
  ``Delta W = -eta (alpha G_bar_j + lambda W)`` computed exactly in float64 (``sigma_1`` from the
  top eigenvalue of the smaller Gram matrix);
- its second-order split (MATH section 3): ``first = u^T Delta W v / sigma`` (Lemma 12),
  ``curvature = q_H(Delta W) / (2 sigma)`` (Lemma 13) and ``log_correction = -first^2 / 2`` (the
  second-order term of ``ln(1 + x)``); the remainder ``observed - (first + curvature +
  log_correction)`` is ``O(|Delta W|^3 / gap^2)``;
- the probe's terms of that batch (``DynamicsProbe.compute``, Proposition 5 with the
  without-replacement factor ``(1 - b/N)``): ``phi_j^2``, ``psi_j``, and the cross-layer term
  ``cross_layer_diffusion`` (what Assumption 3 drops, MATH section 4).

Predictions (per step, one unit of SDE time):

- ``Var_j(Delta ln sigma) = phi^2 / sigma^2`` (Theorem 14's diffusion through Ito's lemma for
  ln): ``phi^2`` is the variance over the batch draw of ``eta alpha u^T G_bar v``, the first-order
  increment. The prediction is the MEAN of the per-batch unbiased estimates ``phi_j^2`` over the B
  batches (Proposition 5: each is unbiased). The population value (the same estimator on the whole
  data set, rescaled by ``(N/b)(1 - b/N)``: exact for sampling without replacement) is reported
  next to it as ``population``.
- ``E[Delta ln sigma] = (mu + psi) / sigma - phi^2 / (2 sigma^2)`` (Theorem 15 per layer), with mu
  from the FULL-data gradient (``DynamicsProbe.drift``) and psi the mean of the per-batch psi_j.
  ``(mu + psi) / sigma`` alone is reported, and so is the deterministic term the SDE drops,
  ``dropped = (eta alpha)^2 q_H(grad_L) / (2 sigma)``, O(eta^2).
- ``Var_j(Delta ln K) = phi_bar^2 + cross`` with ``phi_bar^2 = sum_l phi_l^2 / sigma_l^2`` and
  ``cross`` the recorded cross-layer term; ``E[Delta ln K] = mu_bar + psi_bar - phi_bar^2 / 2``
  (the cross terms do not enter the mean: the Hessian of ``sum_l ln sigma_l`` is block-diagonal).

Statistics and verdicts: for each comparison the statistic ``observed - predicted`` (both computed
from the same batches) is bootstrapped jointly over batches (``resamples`` resamples, fixed seed,
percentile interval at ``confidence``). A check row FAILS when its interval excludes 0; it PASSES
when it includes 0 and the interval of its designated wrong variant excludes 0; otherwise it is
INCONCLUSIVE (the interval cannot tell the prediction from the wrong variant; a variant closer to
the prediction than the interval's half-width counts as not told apart even when an edge case
puts it outside the interval). Wrong variants (rows
of kind ``variant``, verdict ``rejected`` / ``not rejected``, with ``batches_needed``: the B at which
the interval's half-width would equal the distance between the two predictions, ``B (h / delta)^2``):

- the biased ``1/b^2`` estimator, ``phi^2 (b - 1) / b`` (designated for the variance rows; its
  distance is a fraction 1/b, so at b = 128 it takes ~10^5 batches to reject);
- ``2 phi`` (variance x4), a grossly wrong diffusion;
- psi dropped from the mean (designated for the mean rows);
- the network variance without the cross-layer term, ``phi_bar^2`` alone (Theorem 15 under
  Assumption 3; designated for the network variance row).

Exact step vs the framework: the observed increment is that of a float64 step from the float64
copy of W; the model may train in float32.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lipverify._validation import LipverifyError
from lipverify.probe import DynamicsProbe, cross_layer_diffusion, update_exceeds_gap, weight_matrix

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
REJECTED, NOT_REJECTED = "rejected", "not rejected"


@dataclass
class Row:
    """One comparison. ``observed``: statistic over the B batches; ``ci``: its bootstrap interval;
    ``predicted``: the prediction (mean over batches of the per-batch value); ``difference_ci``:
    joint bootstrap interval of ``observed - predicted``; ``ratio``/``ratio_ci``: ``observed /
    predicted`` (variance rows); ``verdict``: pass/fail/inconclusive (``check``) or rejected/not
    rejected (``variant``, ``info`` rows have none)."""

    quantity: str
    kind: str  # "check" | "variant" | "info"
    predicted: float
    observed: float
    ci: tuple[float, float]
    difference_ci: tuple[float, float]
    verdict: str | None
    ratio: float | None = None
    ratio_ci: tuple[float, float] | None = None
    population: float | None = None
    batches_needed: int | None = None
    note: str = ""


@dataclass
class OneStepResult:
    """Result of :func:`one_step_at` / :func:`one_step_check`.

    ``rows``: every comparison (per layer, then the network); ``split``: name -> mean over batches
    of the observed increment and its parts (``first``, ``curvature``, ``log_correction``,
    ``remainder``, all divided by sigma) and the dropped term; ``layers``: name -> sigma, gap,
    relative gap, degenerate flag, fraction of batches whose update reaches half the gap;
    ``settings``: lr, batch size, N, B, seed, confidence, resamples, step k, wall time.
    """

    rows: list[Row]
    split: dict[str, dict[str, float]]
    layers: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def verdict(self) -> str:
        """fail if any check fails, else inconclusive if any is, else pass."""
        verdicts = [r.verdict for r in self.rows if r.kind == "check"]
        if FAIL in verdicts:
            return FAIL
        return INCONCLUSIVE if INCONCLUSIVE in verdicts else PASS

    def row(self, quantity: str) -> Row:
        for r in self.rows:
            if r.quantity == quantity:
                return r
        raise KeyError(quantity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "settings": self.settings,
            "layers": self.layers,
            "split": self.split,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }


# --------------------------------------------------------------------------- bootstrap
class _Bootstrap:
    """Joint resampling of the B batches (one index matrix shared by every statistic)."""

    def __init__(self, batches: int, resamples: int, confidence: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.idx = rng.integers(0, batches, size=(resamples, batches))
        self.q = ((1 - confidence) / 2, (1 + confidence) / 2)

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(values, self.q)
        return float(lo), float(hi)

    def var(self, x: np.ndarray) -> np.ndarray:
        return x[self.idx].var(axis=1, ddof=1)

    def mean(self, x: np.ndarray) -> np.ndarray:
        return x[self.idx].mean(axis=1)


def _contains_zero(ci: tuple[float, float]) -> bool:
    return ci[0] <= 0.0 <= ci[1]


def _compare(
    boot: _Bootstrap,
    quantity: str,
    statistic: str,
    observed: np.ndarray,
    predicted: np.ndarray,
    variants: list[tuple[str, np.ndarray, bool]],
    population: float | None = None,
    note: str = "",
) -> list[Row]:
    """A check row of ``statistic`` ("var" or "mean") of ``observed`` (B,) against the mean of
    ``predicted`` (B,), then one variant row per ``(label, predicted_variant, designated)``."""
    stat = boot.var if statistic == "var" else boot.mean
    obs_value = float(observed.var(ddof=1) if statistic == "var" else observed.mean())
    obs_boot = stat(observed)
    obs_ci = boot.interval(obs_boot)

    def one(pred: np.ndarray):
        pred_boot = boot.mean(pred)
        diff_ci = boot.interval(obs_boot - pred_boot)
        ratio = ratio_ci = None
        if statistic == "var" and np.all(pred_boot > 0):
            ratio = obs_value / float(pred.mean())
            ratio_ci = boot.interval(obs_boot / pred_boot)
        return float(pred.mean()), diff_ci, ratio, ratio_ci

    pred_value, diff_ci, ratio, ratio_ci = one(predicted)
    half_width = (diff_ci[1] - diff_ci[0]) / 2
    rows, designated_rejected = [], None
    for label, pred_v, designated in variants:
        value_v, diff_v, ratio_v, ratio_ci_v = one(pred_v)
        rejected = not _contains_zero(diff_v)
        distance = abs(value_v - pred_value)
        needed = math.ceil(len(observed) * (half_width / distance) ** 2) if distance > 0 else None
        powered = needed is not None and needed <= len(observed)
        if designated:
            # an edge case (observed at the interval's end) rejects a variant closer than the
            # interval's half-width: that is luck, not power
            designated_rejected = rejected and powered
        note = "designated wrong variant" if designated else ""
        if rejected and not powered:
            note += "; rejected although closer than the interval half-width (underpowered)"
        rows.append(
            Row(
                f"{quantity} [{label}]",
                "variant",
                value_v,
                obs_value,
                obs_ci,
                diff_v,
                REJECTED if rejected else NOT_REJECTED,
                ratio_v,
                ratio_ci_v,
                batches_needed=needed,
                note=note.lstrip("; "),
            )
        )
    if not _contains_zero(diff_ci):
        verdict = FAIL
    elif designated_rejected is False:
        verdict = INCONCLUSIVE
    else:
        verdict = PASS
    check = Row(
        quantity,
        "check",
        pred_value,
        obs_value,
        obs_ci,
        diff_ci,
        verdict,
        ratio,
        ratio_ci,
        population,
        note=note,
    )
    return [check, *rows]


def _info(boot: _Bootstrap, quantity: str, observed: np.ndarray, predicted: np.ndarray, note: str) -> Row:
    obs_boot = boot.mean(observed)
    return Row(
        quantity,
        "info",
        float(predicted.mean()),
        float(observed.mean()),
        boot.interval(obs_boot),
        boot.interval(obs_boot - boot.mean(predicted)),
        None,
        note=note,
    )


# --------------------------------------------------------------------------- measurement
def _sigma1(W: torch.Tensor) -> float:
    """sigma_1 from the top eigenvalue of the smaller Gram matrix (3x faster than an SVD at 512x784;
    relative accuracy ~eps, enough for increments of 1e-6 relative)."""
    gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    return math.sqrt(float(torch.linalg.eigvalsh(gram)[-1]))


def one_step_at(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lr: float,
    batch_size: int,
    batches: int = 500,
    seed: int = 0,
    *,
    grad_scale: float = 1.0,
    weight_decay: float = 0.0,
    confidence: float = 0.99,
    resamples: int = 2000,
    full_chunk: int = 1000,
    phi_factor: float = 1.0,
) -> OneStepResult:
    """The one-step check at the model's current weights (see the module docstring).

    ``inputs`` (N, ...) and ``targets`` (N,): the whole training set, in the model's input format
    and dtype; ``loss_fn``: mean-reduced batch loss. Batches: ``torch.randperm(N)[:b]`` from a
    generator seeded with ``seed`` (the training loader's scheme: without replacement within a batch,
    independent across batches). The model is left unchanged (weights, ``.grad`` and buffers).
    ``phi_factor`` multiplies every predicted phi (1 = the framework; any other value is a
    deliberately wrong diffusion, for tests of the check's power).
    Returns an :class:`OneStepResult`; ``samples`` holds the per-batch arrays (B,) per layer.
    """
    N, b = int(targets.shape[0]), int(batch_size)
    if not 2 <= b <= N:
        raise LipverifyError(f"batch_size must be in [2, N = {N}], got {b}")
    if batches < 10:
        raise LipverifyError(f"batches must be >= 10 for a variance and its bootstrap, got {batches}")
    if not 0 < confidence < 1:
        raise LipverifyError(f"confidence must be in (0, 1), got {confidence}")
    if any(
        m.training for m in model.modules() if isinstance(m, nn.Dropout | nn.modules.batchnorm._BatchNorm)
    ):
        raise LipverifyError(
            "the one-step check needs a model without dropout or batch norm in training mode"
        )
    started = time.time()
    probe = DynamicsProbe(model, population_size=N, decomposition="svd")
    names = probe.layer_names
    modules = {name: probe._layers[name].module for name in names}
    decs = {name: probe.decomposition_of(name) for name in names}
    W0 = {name: weight_matrix(modules[name]).detach().to(torch.float64) for name in names}
    sigma = {name: float(decs[name].sigma1) for name in names}
    u = {name: decs[name].u.to(torch.float64) for name in names}
    v = {name: decs[name].v.to(torch.float64) for name in names}
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]

    def chunks():
        for s in range(0, N, full_chunk):
            yield inputs[s : s + full_chunk], targets[s : s + full_chunk]

    try:
        full = probe.full_gradient(chunks(), loss_fn)
        mu_full = probe.drift(full, lr, grad_scale, weight_decay)
        dropped = {}
        for name in names:
            g = full[name].to(torch.float64)
            q = float(decs[name].quadratic_form(g.T @ u[name], g @ v[name]))
            dropped[name] = 0.5 * (lr * grad_scale) ** 2 * q / sigma[name]
        # population phi^2, psi, cross: the estimator on all N samples is S^2/N (no (1 - N/N) factor
        # with population_size None); per-step variance of a without-replacement b-batch: S^2/b (1 - b/N)
        probe.population_size = None
        for p in params:
            p.grad = None
        with probe._side_effects_undone(), probe.capture():
            loss_fn(model(inputs), targets).backward()
        pop_terms = probe.compute(lr, grad_scale=grad_scale, weight_decay=weight_decay)
        to_step = (N / b) * (1 - b / N)
        population = {
            name: {"phi_sq": t.phi**2 * to_step, "psi": t.psi * to_step} for name, t in pop_terms.items()
        }
        population_cross = cross_layer_diffusion(pop_terms) * to_step
        probe.population_size = N

        gen = torch.Generator().manual_seed(seed)
        keys = ("observed", "first", "curvature", "log_correction", "phi_sq", "psi", "exceeds")
        per = {name: {k: np.empty(batches) for k in keys} for name in names}
        cross = np.empty(batches)
        for j in range(batches):
            idx = torch.randperm(N, generator=gen)[:b]
            for p in params:
                p.grad = None
            with probe._side_effects_undone(), probe.capture():
                loss_fn(model(inputs[idx]), targets[idx]).backward()
            terms = probe.compute(lr, grad_scale=grad_scale, weight_decay=weight_decay)
            cross[j] = cross_layer_diffusion(terms) * phi_factor**2
            for name in names:
                W, s = W0[name], sigma[name]
                G = modules[name].weight.grad.detach().to(torch.float64).reshape(W.shape)
                dW = -lr * (grad_scale * G + weight_decay * W)
                y, x = dW.T @ u[name], dW @ v[name]
                first = float(x @ u[name]) / s
                rec = per[name]
                rec["observed"][j] = math.log(_sigma1(W + dW) / s)
                rec["first"][j] = first
                rec["curvature"][j] = 0.5 * float(decs[name].quadratic_form(y, x)) / s
                rec["log_correction"][j] = -0.5 * first * first
                rec["phi_sq"][j] = (terms[name].phi * phi_factor) ** 2
                rec["psi"][j] = terms[name].psi
                rec["exceeds"][j] = update_exceeds_gap(dW, float(decs[name].gap))
    finally:
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g

    boot = _Bootstrap(batches, resamples, confidence, seed + 1)
    rows: list[Row] = []
    split: dict[str, dict[str, float]] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name in names:
        rec, s = per[name], sigma[name]
        var_pred = rec["phi_sq"] / s**2
        pop_var = population[name]["phi_sq"] * phi_factor**2 / s**2
        var_variants = [
            ("biased 1/b^2 estimator", var_pred * (b - 1) / b, True),
            ("2 phi", 4 * var_pred, False),
        ]
        rows += _compare(
            boot, f"{name}: Var(dln sigma)", "var", rec["observed"], var_pred, var_variants, pop_var
        )
        rows += _compare(
            boot,
            f"{name}: Var(u^T dW v / sigma)",
            "var",
            rec["first"],
            var_pred,
            var_variants,
            pop_var,
            note="first-order part: Proposition 5 exactly",
        )
        mu_part = np.full(batches, mu_full[name] / s)
        mean_pred = mu_part + rec["psi"] / s - 0.5 * var_pred
        rows += _compare(
            boot,
            f"{name}: E[dln sigma]",
            "mean",
            rec["observed"],
            mean_pred,
            [("psi dropped", mean_pred - rec["psi"] / s, True)],
            (mu_full[name] + population[name]["psi"]) / s - 0.5 * pop_var,
            note="Ito: (mu_full + psi)/sigma - phi^2/(2 sigma^2)",
        )
        rows.append(
            _info(
                boot,
                f"{name}: E[dln sigma] vs (mu+psi)/sigma",
                rec["observed"],
                mu_part + rec["psi"] / s,
                "no Ito term",
            )
        )
        rows.append(
            _info(
                boot,
                f"{name}: E[dln sigma] vs Ito + dropped",
                rec["observed"],
                mean_pred + dropped[name],
                "with the O(eta^2) term the SDE drops",
            )
        )
        second = rec["first"] + rec["curvature"] + rec["log_correction"]
        split[name] = {
            "observed": float(rec["observed"].mean()),
            "first": float(rec["first"].mean()),
            "curvature": float(rec["curvature"].mean()),
            "log_correction": float(rec["log_correction"].mean()),
            "remainder": float((rec["observed"] - second).mean()),
            "max_abs_remainder": float(np.abs(rec["observed"] - second).max()),
            "dropped": dropped[name],
            "mu_full_over_sigma": mu_full[name] / s,
            "psi_over_sigma": float(rec["psi"].mean() / s),
        }
        layers[name] = {
            "sigma": s,
            "gap": float(decs[name].gap),
            "relative_gap": float(decs[name].relative_gap),
            "update_exceeds_gap_fraction": float(rec["exceeds"].mean()),
        }
    net_obs = sum(per[n]["observed"] for n in names)
    net_phi_sq = sum(per[n]["phi_sq"] / sigma[n] ** 2 for n in names)
    pop_net = sum(population[n]["phi_sq"] * phi_factor**2 / sigma[n] ** 2 for n in names)
    pop_cross = population_cross * phi_factor**2
    rows += _compare(
        boot,
        "net: Var(dln K)",
        "var",
        net_obs,
        net_phi_sq + cross,
        [
            ("without cross-layer term (Assumption 3)", net_phi_sq, True),
            ("2 phi", 4 * (net_phi_sq + cross), False),
        ],
        pop_net + pop_cross,
        note="phi_bar^2 + cross-layer term",
    )
    net_mean = sum(mu_full[n] / sigma[n] + per[n]["psi"] / sigma[n] for n in names) - 0.5 * net_phi_sq
    rows += _compare(
        boot,
        "net: E[dln K]",
        "mean",
        net_obs,
        net_mean,
        [("psi dropped", net_mean - sum(per[n]["psi"] / sigma[n] for n in names), True)],
        note="Theorem 15: mu_bar + psi_bar - phi_bar^2/2",
    )
    split["net"] = {
        "observed": float(net_obs.mean()),
        "phi_bar_sq": float(net_phi_sq.mean()),
        "cross": float(cross.mean()),
        "cross_over_phi_bar_sq": float(cross.mean() / net_phi_sq.mean()),
        "population_phi_bar_sq": pop_net,
        "population_cross": pop_cross,
    }
    samples = {f"{n}.{k}": per[n][k] for n in names for k in keys}
    samples["net.cross"] = cross
    settings = {
        "lr": lr,
        "batch_size": b,
        "population_size": N,
        "batches": batches,
        "seed": seed,
        "confidence": confidence,
        "resamples": resamples,
        "grad_scale": grad_scale,
        "weight_decay": weight_decay,
        "phi_factor": phi_factor,
        "prediction": "mean over batches of the per-batch Proposition 5 estimates (population: whole data)",
        "sampling": "without replacement within a batch, (1 - b/N) factor",
        "wall_seconds": time.time() - started,
    }
    return OneStepResult(rows, split, layers, settings, samples)


def one_step_check(config, at_step: int, batches: int = 500, seed: int = 0, **kwargs: Any) -> OneStepResult:
    """:func:`one_step_at` at ``W_k``, k = ``at_step``: the weights after k training steps of
    ``config`` (a :class:`lipverify.training.TrainConfig`, run exactly as ``lipverify train`` runs it,
    same seeds). Plain SGD only (weight decay and ``grad_scale`` are accounted for); dropout, batch
    norm, mixup, FGSM, AutoAugment, injected gradient noise and label smoothing are refused
    (the check's step would not be the probe's model). ``seed`` seeds the B check batches (not the
    training). ``kwargs`` go to :func:`one_step_at`."""
    from lipverify.framework._plain_sgd import require_plain_sgd
    from lipverify.training import _Run

    config = dataclasses.replace(config).validate()
    require_plain_sgd(config, "one-step check")
    if not 0 <= at_step:
        raise LipverifyError(f"at_step must be >= 0, got {at_step}")
    config = dataclasses.replace(config, steps=max(at_step, 1), probe_every=max(at_step, 1) + 1)
    started = time.time()
    run = _Run(config)
    while run.step < at_step:
        run.train_step()
    trained = time.time() - started
    from lipverify.data import to_model_input

    inputs = to_model_input(run.images, config.model, run.dtype)
    result = one_step_at(
        run.model,
        inputs,
        run.labels,
        run.loss_fn,
        config.lr,
        config.batch_size,
        batches,
        seed,
        grad_scale=config.grad_scale,
        weight_decay=config.weight_decay,
        **kwargs,
    )
    result.settings.update(at_step=at_step, train_seconds=trained, config=dataclasses.asdict(config))
    return result
