"""Linear-response prediction of the spread of ln K_t across sampling seeds (issue 13, part 3;
derivation: docs/MATH.md section 9).

SGD is the discrete map ``theta_{s+1} = theta_s - eta (alpha grad L_B(theta_s) + lambda theta_s)``
(``alpha`` = grad_scale, ``lambda`` = weight decay, one step = one unit of time). Linearised around a
reference path ``theta_s`` (the realised path of the config's seed, or the full-gradient path),
a deviation obeys ``delta_{s+1} = J_s delta_s - eta alpha xi_s`` with ``J_s = I - eta (alpha H_s +
lambda I)``, ``H_s`` the full-data loss Hessian and ``xi_s = grad L_B - grad L`` the batch noise,
``Cov xi_s = Sigma_s = (1 - b/N) S_s / b`` (``S_s``: the per-sample gradient covariance over the N
training samples, ``N - 1`` in the denominator; exact for b indices drawn without replacement).

Three predictions of ``std ln K_t``, ``ln K = sum_l ln sigma_1(W_l)``, all float64:

- **Theorem 17**: ``sqrt(Phi_t)``, ``Phi_t = sum_{s<t} phi_bar_s^2``, ``phi_bar^2 = tr Q_s`` (no
  cross terms, no feedback).
- **reduced** (state ``x_l = ln sigma_1(W_l)``, L numbers): ``C_{s+1} = (I + A_s) C_s (I + A_s)^T +
  Q_s``, ``Var ln K_t = 1^T C_t 1`` with ``Q_s = eta^2 alpha^2 Cov(u_l^T Gbar v_l / sigma_l)`` (L x L,
  cross terms included) and ``A_{ll'} = -eta (sigma_l'/sigma_l) (alpha <E_l, H_s[E_l']> + lambda
  delta_ll') - delta_ll' a_l``, ``a_l = -eta <E_l, alpha grad L + lambda W_l> / sigma_l`` the drift of
  ``ln sigma_l`` (the last term, from ``1/sigma_l`` in ``d ln sigma_l / dW_l = E_l / sigma_l``, is
  missing from the shared spec's sketch (its section 9), reported as ``reduced_sketch``).
- **adjoint** (all parameters): ``Var f(theta_t) = eta^2 alpha^2 sum_{s<t} g_s^T Sigma_s g_s``,
  ``g_{t-1} = grad f(theta_t)``, ``g_{s-1} = J_s g_s`` (``J`` symmetric; one Hessian-vector product
  per step), ``g_s^T Sigma_s g_s`` from the per-sample directional derivatives ``g_s^T grad l_i``
  (one forward-mode pass over the data per step). Cost O(t^2) Hessian-vector products for all t.

Kernels (pure functions of arrays): :func:`propagate_covariance`, :func:`adjoint_variance`,
:func:`ou_exact_discretisation`, :func:`ou_covariance`. Driver: :func:`linear_response`.
Comparison with many seeds: :func:`compare_with_seeds`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from lipverify._validation import LipverifyError

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
#: Relative spectral gap (sigma_1 - sigma_2) / sigma_1 below which a step is flagged: the top pair and
#: its derivatives move like 1/gap, so the linearisation of ln sigma_1 is unreliable there.
GAP_FLAG = 1e-2
#: Config fields that do not change the SGD trajectory (read-only diagnostics, output cadence).
READ_ONLY_FIELDS = (
    "seed_sampling",
    "probe_every",
    "sharpness_every",
    "full_gradient_every",
    "checkpoint_every",
    "lipschitz_every",
    "lipschitz_samples",
    "cuda_graphs",
    "defer_reads",
    "side_stream",
)


# --------------------------------------------------------------------------- kernels
def propagate_covariance(
    A: np.ndarray, Q: np.ndarray, C0: np.ndarray | None = None, *, transpose: bool = True
) -> np.ndarray:
    """Covariance of the linear recursion ``x_{t+1} = (I + A_t) x_t + eps_t``, ``Cov eps_t = Q_t``.

    ``C_{t+1} = (I + A_t) C_t (I + A_t)^T + Q_t`` (exact for the discrete recursion; no Ito term: one
    step = one unit of time). ``A``, ``Q``: (T, L, L) float arrays; ``C0``: (L, L), default 0.
    ``transpose=False`` is a deliberately wrong variant (``(I + A) C (I + A)``) for tests.
    Returns ``C`` (T + 1, L, L) float64. Non-finite input is a :class:`LipverifyError`.
    """
    A, Q = np.asarray(A, dtype=np.float64), np.asarray(Q, dtype=np.float64)
    if A.ndim != 3 or A.shape[1] != A.shape[2] or Q.shape != A.shape:
        raise LipverifyError(f"A and Q must both be (T, L, L), got {A.shape} and {Q.shape}")
    if not (np.isfinite(A).all() and np.isfinite(Q).all()):
        raise LipverifyError("A or Q has non-finite entries")
    T, L = A.shape[0], A.shape[1]
    C = np.zeros((T + 1, L, L))
    if C0 is not None:
        C[0] = C0
    eye = np.eye(L)
    for t in range(T):
        M = eye + A[t]
        C[t + 1] = M @ C[t] @ (M.T if transpose else M) + Q[t]
    return C


def adjoint_variance(jacobians: np.ndarray, noise_cov: np.ndarray, final_gradient: np.ndarray) -> float:
    """``Var f(x_T)`` to first order for ``x_{s+1} = J_s x_s + eps_s``, ``Cov eps_s = noise_cov[s]``:
    ``sum_{s<T} g_s^T noise_cov[s] g_s`` with ``g_{T-1} = final_gradient``, ``g_{s-1} = J_s^T g_s``.

    ``jacobians``, ``noise_cov``: (T, d, d); ``final_gradient``: (d,). Returns a float (float64). The
    same number as ``g^T C_T g`` of :func:`propagate_covariance` with ``A_s = J_s - I``, one backward
    sweep of vectors instead of d x d covariances (what makes the full-parameter version affordable).
    """
    J, S = np.asarray(jacobians, dtype=np.float64), np.asarray(noise_cov, dtype=np.float64)
    g = np.asarray(final_gradient, dtype=np.float64).copy()
    if J.ndim != 3 or S.shape != J.shape or g.shape != J.shape[1:2]:
        raise LipverifyError(f"shapes: jacobians {J.shape}, noise_cov {S.shape}, final_gradient {g.shape}")
    total = 0.0
    for s in range(J.shape[0] - 1, -1, -1):
        total += float(g @ S[s] @ g)
        g = J[s].T @ g
    return total


def ou_exact_discretisation(K: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact unit-time discretisation of the Ornstein-Uhlenbeck process ``dX = -K X dt + S dB``:
    ``X_{t+1} = (I + A) X_t + eps``, ``I + A = expm(-K)``, ``Cov eps = int_0^1 e^{-Ku} S S^T
    e^{-K^T u} du`` (Van Loan's block exponential). ``K`` (L, L), ``S`` (L, m). Returns ``(A, Q)``."""
    K, S = np.asarray(K, dtype=np.float64), np.asarray(S, dtype=np.float64)
    L = K.shape[0]
    block = np.zeros((2 * L, 2 * L))
    block[:L, :L] = K
    block[:L, L:] = S @ S.T
    block[L:, L:] = -K.T
    E = scipy.linalg.expm(block)
    Phi = E[L:, L:].T  # expm(-K)
    Q = Phi @ E[:L, L:]
    return Phi - np.eye(L), 0.5 * (Q + Q.T)


def ou_covariance(K: np.ndarray, S: np.ndarray, t: float) -> np.ndarray:
    """Closed-form covariance of the OU process ``dX = -K X dt + S dB`` from ``X_0 = 0`` at time t
    (K with eigenvalues of positive real part): ``C(t) = C_inf - e^{-Kt} C_inf e^{-K^T t}``,
    ``K C_inf + C_inf K^T = S S^T`` (continuous Lyapunov equation)."""
    K, S = np.asarray(K, dtype=np.float64), np.asarray(S, dtype=np.float64)
    C_inf = scipy.linalg.solve_continuous_lyapunov(K, S @ S.T)
    P = scipy.linalg.expm(-K * t)
    return C_inf - P @ C_inf @ P.T


# --------------------------------------------------------------------------- model driver
@dataclass
class LinearResponseResult:
    """Predictions along a reference path. Arrays are float64 over t = 0..T (``steps``):
    ``theorem17_std``, ``no_feedback_std`` (cross terms, A = 0), ``reduced_std``,
    ``reduced_sketch_std`` (MATH section 9 as sketched: no -a_l diagonal term), ``adjoint_std``
    (NaN where not computed); ``log_k`` (T+1,) the reference path's ln K; ``sigma``,
    ``relative_gap`` (T+1, L); ``A``, ``Q`` (T, L, L); ``flagged_steps``: steps whose relative gap
    is below :data:`GAP_FLAG`; ``costs``: seconds per part; ``settings``."""

    steps: np.ndarray
    log_k: np.ndarray
    theorem17_std: np.ndarray
    no_feedback_std: np.ndarray
    reduced_std: np.ndarray
    reduced_sketch_std: np.ndarray
    adjoint_std: np.ndarray
    layers: list[str]
    sigma: np.ndarray
    relative_gap: np.ndarray
    A: np.ndarray
    Q: np.ndarray
    flagged_steps: list[int]
    costs: dict[str, float]
    settings: dict[str, Any]
    comparison: dict[str, Any] | None = field(default=None)

    PREDICTIONS = ("theorem17", "no_feedback", "reduced", "reduced_sketch", "adjoint")

    def prediction(self, name: str) -> np.ndarray:
        return getattr(self, f"{name}_std")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearResponseResult:
        """Inverse of :meth:`as_dict` (a ``results.json`` written by ``lipverify framework
        linear-response``); the comparison is dropped (recomputed against the seeds given)."""
        try:
            kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name != "comparison"}
        except KeyError as exc:
            raise LipverifyError(f"not a linear-response result: no field {exc}") from exc
        for f in dataclasses.fields(cls):
            if f.type == "np.ndarray":
                kwargs[f.name] = np.asarray(kwargs[f.name], dtype=np.float64)
        return cls(**kwargs)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in dataclasses.asdict(self).items()}
        d["verdict"] = self.comparison["verdict"] if self.comparison else INCONCLUSIVE
        return d


class _Functional:
    """The model as a pure function of float64 parameters over the whole training set."""

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.model = model
        self.x = inputs.to(torch.float64)
        self.y = targets
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.buffers = {n: b.to(torch.float64) for n, b in model.named_buffers()}

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: t.reshape(s)
            for n, t, s in zip(self.names, torch.split(flat, self.sizes), self.shapes, strict=True)
        }

    def per_sample_losses(self, flat: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, (self.unflatten(flat), self.buffers), (self.x,))
        return F.cross_entropy(out, self.y, reduction="none")

    def loss(self, flat: torch.Tensor) -> torch.Tensor:
        return self.per_sample_losses(flat).mean()

    def gradient(self, flat: torch.Tensor) -> torch.Tensor:
        return grad(self.loss)(flat)

    def hvp(self, flat: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """``H direction`` by double backward (2.6x less CPU than forward-over-reverse
        ``jvp(grad)`` on the 8.7 MLP at N = 1024; equal to ~1e-16 relative)."""
        theta = flat.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(theta), theta, create_graph=True)
        (h,) = torch.autograd.grad(g @ direction, theta)
        return h

    def directional(self, flat: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """(N,) per-sample derivatives ``direction^T grad l_i`` (forward mode, one pass)."""
        return jvp(self.per_sample_losses, (flat,), (direction,))[1]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).to(
        torch.float64
    )


def _top_pairs(fn: _Functional, flat: torch.Tensor, weight_names: Sequence[str]):
    """Per layer: sigma_1, relative gap, and the embedded directions E_l = u_l v_l^T (flat, float64)."""
    params = fn.unflatten(flat)
    out = []
    for name in weight_names:
        W = params[name].reshape(params[name].shape[0], -1)
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        if not torch.isfinite(s).all() or float(s[0]) <= 0:
            raise LipverifyError(f"layer {name}: sigma_1 is {float(s[0])}, not a positive finite number")
        E = torch.zeros_like(flat)
        d = fn.unflatten(E)  # views into E
        d[name].copy_(torch.outer(U[:, 0], Vh[0]).reshape(d[name].shape))
        gap = float((s[0] - s[1]) / s[0]) if s.numel() > 1 else 1.0
        out.append((float(s[0]), gap, E))
    return out


def reduced_drift(
    fn: _Functional,
    theta: torch.Tensor,
    weight_names: Sequence[str],
    eta: float,
    alpha: float = 1.0,
    lam: float = 0.0,
) -> np.ndarray:
    """(L,) drift of ``x_l = ln sigma_1(W_l)`` per step, first order: ``a_l = -eta <E_l, alpha grad_l L
    + lambda W_l> / sigma_l`` (``d ln sigma_1 / dW = E / sigma``, Lemma 12), full-data gradient."""
    g = fn.gradient(theta)
    return np.array(
        [-eta * float(E @ (alpha * g + lam * theta)) / s for s, _, E in _top_pairs(fn, theta, weight_names)]
    )


def reduced_step(
    fn: _Functional,
    theta: torch.Tensor,
    weight_names: Sequence[str],
    eta: float,
    alpha: float = 1.0,
    lam: float = 0.0,
    noise_scale: float = 0.0,
) -> dict[str, Any]:
    """The reduced linearisation at ``theta`` (flat float64 parameters of ``fn``'s model).

    Returns ``sigma``, ``relative_gap`` (L,), ``drift`` (L,) of :func:`reduced_drift`, ``A`` (L, L)
    ``= d a_l / d x_l'`` for a change of ``x_l'`` realised as ``W_l' -> W_l' + (e^dx - 1) sigma_l' E_l'``:
    ``A_ll' = -eta (sigma_l'/sigma_l)(alpha <E_l, H[E_l']> + lambda delta_ll') - delta_ll' a_l``,
    ``A_sketch`` (the same without ``- delta_ll' a_l``, MATH section 9 as sketched) and ``Q`` (L, L)
    ``= noise_scale * Cov_i(<E_l, grad l_i> / sigma_l)`` (``N - 1`` denominator; ``noise_scale`` =
    ``(eta alpha)^2 (1 - b/N) / b`` gives the per-step covariance of the noise of ``x``). One forward-mode
    pass per layer (per-sample derivatives; their mean gives the drift) and L Hessian-vector products.
    """
    pairs = _top_pairs(fn, theta, weight_names)
    L = len(pairs)
    proj = torch.stack([fn.directional(theta, E / s) for s, _, E in pairs]).T.numpy()  # (N, L)
    drift = np.array(
        [-eta * (alpha * proj[:, i].mean() + lam * float(E @ theta) / s) for i, (s, _, E) in enumerate(pairs)]
    )
    hvps = [fn.hvp(theta, E) for _, _, E in pairs]
    A_sketch = np.zeros((L, L))
    for i, (s_i, _, E_i) in enumerate(pairs):
        for j, (s_j, _, E_j) in enumerate(pairs):
            curvature = alpha * float(E_i @ hvps[j]) + lam * float(E_i @ E_j)
            A_sketch[i, j] = -eta * (s_j / s_i) * curvature
    return {
        "sigma": np.array([p[0] for p in pairs]),
        "relative_gap": np.array([p[1] for p in pairs]),
        "drift": drift,
        "A": A_sketch - np.diag(drift),
        "A_sketch": A_sketch,
        "Q": noise_scale * np.cov(proj, rowvar=False, ddof=1).reshape(L, L),
    }


def default_adjoint_steps(steps: int, points: int = 10) -> list[int]:
    """Every step up to 10, else ``points`` log-spaced steps in [1, steps] (distinct, the last included):
    the adjoint at step t costs O(t) Hessian-vector products, O(T^2) for all T steps."""
    if steps <= points:
        return list(range(1, steps + 1))
    return sorted({round(steps ** (j / (points - 1))) for j in range(points)} | {steps})


def linear_response(
    config, reference: str = "realised", adjoint_steps: Sequence[int] | None = None
) -> LinearResponseResult:
    """Theorem 17, reduced and adjoint predictions of ``std ln K_t`` along a reference path of
    ``config`` (a :class:`lipverify.training.TrainConfig`; plain SGD, any weight decay / grad_scale).

    ``reference``: ``"realised"`` (the path of the config's seed_sampling, as ``lipverify train``
    runs it) or ``"mean"`` (full-gradient descent from the same initialisation). ``adjoint_steps``:
    the steps t at which the full-parameter adjoint is evaluated (cost t - 1 Hessian-vector products
    and t forward-mode passes at step t); default :func:`default_adjoint_steps`, ``[]`` for none.
    Hessians and noise covariances are those of the full training set, in float64.
    """
    from lipverify.data import to_model_input
    from lipverify.framework._plain_sgd import require_plain_sgd
    from lipverify.probe import DynamicsProbe
    from lipverify.training import _Run

    config = dataclasses.replace(config).validate()
    require_plain_sgd(config, "linear-response prediction", also=("label_noise",))
    if reference not in ("realised", "mean"):
        raise LipverifyError(f"reference must be 'realised' or 'mean', got {reference!r}")
    config = dataclasses.replace(config, probe_every=config.steps + 1, sharpness_every=0)
    adjoint_steps = (
        default_adjoint_steps(config.steps) if adjoint_steps is None else sorted(set(adjoint_steps))
    )
    if any(not 1 <= t <= config.steps for t in adjoint_steps):
        raise LipverifyError(f"adjoint steps must lie in [1, {config.steps}], got {adjoint_steps}")
    T, eta, alpha, lam = config.steps, config.lr, config.grad_scale, config.weight_decay
    costs: dict[str, float] = {}

    started = time.time()
    run = _Run(config)
    N, b = len(run.data), config.batch_size
    if b < 2:
        raise LipverifyError("batch_size must be >= 2 for a batch-noise covariance (Proposition 5)")
    noise_scale = (eta * alpha) ** 2 * (1 - b / N) / b  # Cov of -eta alpha xi per unit S
    fn = _Functional(run.model, to_model_input(run.images, config.model, torch.float64), run.labels)
    layers = DynamicsProbe(run.model).layer_names
    weight_names = [f"{name}.weight" for name in layers]
    missing = [w for w in weight_names if w not in fn.names]
    if missing:
        raise LipverifyError(f"no trainable parameter(s) {missing} for the probed layers")
    states = [_flat(run.model)]
    for _ in range(T):
        if reference == "realised":
            run.train_step()
            states.append(_flat(run.model))
        else:
            theta = states[-1]
            states.append(theta - eta * (alpha * fn.gradient(theta) + lam * theta))
        if not torch.isfinite(states[-1]).all():
            raise LipverifyError(f"the reference path diverged at step {len(states) - 1} (lr = {eta})")
    costs["reference_path_s"] = time.time() - started

    started = time.time()
    L = len(layers)
    sigma, gaps = np.zeros((T + 1, L)), np.zeros((T + 1, L))
    A, A_sketch, Q = np.zeros((T, L, L)), np.zeros((T, L, L)), np.zeros((T, L, L))
    log_k = np.zeros(T + 1)
    for t in range(T + 1):
        if t == T:
            pairs = _top_pairs(fn, states[t], weight_names)
            sigma[t], gaps[t] = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            step = reduced_step(fn, states[t], weight_names, eta, alpha, lam, noise_scale)
            sigma[t], gaps[t] = step["sigma"], step["relative_gap"]
            A[t], A_sketch[t], Q[t] = step["A"], step["A_sketch"], step["Q"]
        log_k[t] = float(np.log(sigma[t]).sum())
    ones = np.ones(L)
    C = propagate_covariance(A, Q)
    C_sketch = propagate_covariance(A_sketch, Q)
    theorem17 = np.concatenate([[0.0], np.cumsum(np.trace(Q, axis1=1, axis2=2))])
    no_feedback = np.concatenate([[0.0], np.cumsum(Q.sum(axis=(1, 2)))])
    costs["reduced_s"] = time.time() - started

    adjoint_var = np.full(T + 1, np.nan)
    adjoint_var[0] = 0.0
    hvp_count = 0
    started = time.time()
    for t in adjoint_steps:
        g = sum(E / s for s, _, E in _top_pairs(fn, states[t], weight_names))
        total = 0.0
        for s in range(t - 1, -1, -1):
            d = fn.directional(states[s], g)
            total += noise_scale * float(d.var(correction=1))
            if s > 0:
                g = g - eta * (alpha * fn.hvp(states[s], g) + lam * g)
                hvp_count += 1
        adjoint_var[t] = total
    costs["adjoint_s"] = time.time() - started
    costs["adjoint_hvps"] = hvp_count
    flagged = sorted({int(t) for t, _ in zip(*np.nonzero(gaps < GAP_FLAG), strict=True)})
    settings = {
        "reference": reference,
        "population_size": N,
        "batch_size": b,
        "lr": eta,
        "grad_scale": alpha,
        "weight_decay": lam,
        "steps": T,
        "adjoint_steps": list(adjoint_steps),
        "parameters": int(states[0].numel()),
        "noise": "full-data per-sample covariance, without-replacement factor (1 - b/N)/b",
        "config": dataclasses.asdict(config),
    }
    return LinearResponseResult(
        steps=np.arange(T + 1, dtype=np.float64),
        log_k=log_k,
        theorem17_std=np.sqrt(theorem17),
        no_feedback_std=np.sqrt(np.maximum(no_feedback, 0.0)),
        reduced_std=np.sqrt(np.maximum(np.einsum("i,tij,j->t", ones, C, ones), 0.0)),
        reduced_sketch_std=np.sqrt(np.maximum(np.einsum("i,tij,j->t", ones, C_sketch, ones), 0.0)),
        adjoint_std=np.sqrt(adjoint_var),
        layers=layers,
        sigma=sigma,
        relative_gap=gaps,
        A=A,
        Q=Q,
        flagged_steps=flagged,
        costs=costs,
        settings=settings,
    )


# --------------------------------------------------------------------------- comparison with seeds
def seeds_log_k(sweep_dir: str | Path, config=None) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T+1,), ln K_t (runs, T+1)) of the complete runs of a ``lipverify sweep`` directory.

    With ``config`` (a TrainConfig), every run must share it up to :data:`READ_ONLY_FIELDS`
    (seed_sampling and fields that do not change the trajectory), else a :class:`LipverifyError`
    naming the field."""
    from lipverify.records import read_steps
    from lipverify.sweep import read_sweep

    sweep_dir = Path(sweep_dir)
    doc = read_sweep(sweep_dir)
    wanted = None if config is None else dataclasses.asdict(config)
    rows, steps = [], None
    for run in doc["runs"]:
        if run.get("status") != "complete":
            continue
        if wanted is not None:
            differ = [
                k
                for k, v in run["config"].items()
                if k not in READ_ONLY_FIELDS and k in wanted and wanted[k] != v
            ]
            if differ:
                raise LipverifyError(
                    f"{sweep_dir / run['dir']}: config differs from the prediction's in {', '.join(differ)}"
                )
        _, records = read_steps(sweep_dir / run["dir"] / "steps.csv")
        s = np.array([r["step"] for r in records], dtype=np.float64)
        lk = np.array([r["log_bound"] for r in records], dtype=np.float64)
        if steps is None:
            steps = s
        elif not np.array_equal(s, steps):
            raise LipverifyError(f"{sweep_dir / run['dir']}: recorded steps differ from the other runs'")
        rows.append(lk)
    if len(rows) < 3:
        raise LipverifyError(f"{sweep_dir}: {len(rows)} complete run(s); the spread needs >= 3")
    log_k = np.stack(rows)
    if not np.isfinite(log_k).all():
        raise LipverifyError(f"{sweep_dir}: non-finite ln K in a run")
    return steps, log_k


def compare_with_seeds(
    result: LinearResponseResult,
    steps: np.ndarray,
    log_k: np.ndarray,
    tolerance: float = 0.15,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Each prediction against the empirical std of ln K_t across the runs (``log_k`` (n, T+1)).

    Per logged t >= 1: the empirical std (ddof 1), its two-sided chi-square ``confidence`` interval,
    and per prediction the ratio ``predicted / empirical``, the ratio's interval ``[p / hi, p / lo]``
    and whether ``|ratio - 1| <= tolerance``. A prediction meets the goal when the point ratio is
    within ``tolerance`` at every logged t where it is computed (all of them for every prediction but
    the adjoint, which covers ``settings['adjoint_steps']``). The chi-square interval's half-width at
    n seeds is about ``z / sqrt(2 (n - 1))`` (12% at n = 128, 95%), comparable to the 15% tolerance:
    ``decided`` counts the steps where the whole ratio interval lies on one side of the tolerance band.
    Verdict: pass if the reduced or the adjoint prediction meets the goal, fail otherwise
    (inconclusive with fewer than 30 runs).
    """
    from lipverify.claims.stats import chi2_std_interval

    T = len(result.steps) - 1
    if len(steps) < T + 1 or not np.array_equal(steps[: T + 1], result.steps):
        raise LipverifyError(f"the runs recorded steps {steps[:5]}..., not 0..{T} every step")
    n = log_k.shape[0]
    emp = log_k[:, : T + 1].std(axis=0, ddof=1)
    rows, goal = [], {}
    for name in result.PREDICTIONS:
        pred = result.prediction(name)
        within_all, decided_in, decided_out, ratios = True, 0, 0, []
        for t in range(1, T + 1):
            if not np.isfinite(pred[t]):
                continue
            if emp[t] <= 0:
                raise LipverifyError(f"empirical std of ln K is 0 at step {t}: the runs are identical")
            lo, hi = chi2_std_interval(float(emp[t]), n, 1 - confidence)
            ratio, r_lo, r_hi = pred[t] / emp[t], pred[t] / hi, pred[t] / lo
            within = abs(ratio - 1) <= tolerance
            within_all &= within
            decided_in += (1 - tolerance) <= r_lo and r_hi <= (1 + tolerance)
            decided_out += r_hi < 1 - tolerance or r_lo > 1 + tolerance
            ratios.append({"step": t, "ratio": ratio, "ratio_ci": [r_lo, r_hi], "within": bool(within)})
        goal[name] = {
            # a prediction evaluated at no step (the adjoint with --adjoint-steps none) meets nothing
            "within_tolerance_at_every_step": bool(within_all and ratios),
            "steps_compared": len(ratios),
            "steps_within": sum(r["within"] for r in ratios),
            "decided_within": int(decided_in),
            "decided_outside": int(decided_out),
            "min_ratio": min((r["ratio"] for r in ratios), default=None),
            "max_ratio": max((r["ratio"] for r in ratios), default=None),
            "per_step": ratios,
        }
    for t in range(1, T + 1):
        lo, hi = chi2_std_interval(float(emp[t]), n, 1 - confidence)
        rows.append(
            {
                "step": t,
                "empirical_std": float(emp[t]),
                "empirical_ci": [lo, hi],
                **{name: float(result.prediction(name)[t]) for name in result.PREDICTIONS},
            }
        )
    met = [name for name in ("reduced", "adjoint") if goal[name]["within_tolerance_at_every_step"]]
    if n < 30:
        verdict = INCONCLUSIVE
    else:
        verdict = PASS if met else FAIL
    message = f"{n} seeds: " + "; ".join(
        f"{name}: not evaluated"
        if not g["steps_compared"]
        else f"{name}: {'WITHIN' if g['within_tolerance_at_every_step'] else 'NOT within'} "
        f"{100 * tolerance:g}% at every logged t ({g['steps_within']}/{g['steps_compared']} steps, "
        f"ratio {g['min_ratio']:.2f}..{g['max_ratio']:.2f})"
        for name, g in goal.items()
    )
    return {
        "verdict": verdict,
        "goal_met_by": met,
        "message": message,
        "seeds": n,
        "tolerance": tolerance,
        "confidence": confidence,
        "goal": goal,
        "rows": rows,
    }
