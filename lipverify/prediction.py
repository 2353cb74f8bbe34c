"""Theorem 16/17 predictions along a recorded run, against what the run observed.

The per-step series of ``steps.csv`` (written by :func:`lipverify.training.train`) is fed to
:func:`lipverify.dynamics.predict_bound`: ``E[K_t] = K_0 exp(sum_{s<t} (mu_bar_s + psi_bar_s))``,
``Var[K_t] = E[K_t]^2 (exp(Phi_t) - 1)``, ``Phi_t = sum_{s<t} phi_bar_s^2``, and per layer
``E[sigma_t] = sigma_0 + sum_{s<t} (mu_s + psi_s)``, ``Var[sigma_t] = sum_{s<t} phi_s^2``. Steps
without a measurement (``probe_every > 1``) reuse the last measured terms (piecewise constant).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lipverify._validation import LipverifyError
from lipverify.dynamics import LayerTerms, NetworkTerms, predict_bound
from lipverify.records import read_json, read_steps


def _status_note(meta: dict) -> str:
    """``; meta.json says status 'failed': <error>`` for a failed (or other unfinished) run."""
    status = meta.get("status")
    if status in (None, "complete"):
        return ""
    error = meta.get("error")
    return f"; meta.json says status {status!r}" + (f": {error}" if error else "")


def _series(run_dir: Path):
    """The recorded series of a finished run. An unfinished one (no steps.csv, or no final row) is a
    :class:`LipverifyError` that quotes meta.json's ``status`` and ``error``: resuming helps only a
    stopped or killed run, not a failed one."""
    meta = read_json(run_dir / "meta.json")
    note = _status_note(meta)
    # a stopped or killed run resumes; a failed one repeats its failure
    hint = "resume it first"
    if meta.get("status") == "failed":
        hint = "fix the cause (a diverged run needs a smaller lr) before resuming"
    try:
        _, rows = read_steps(run_dir / "steps.csv")
    except LipverifyError as exc:
        if not note:
            raise
        raise LipverifyError(f"{run_dir} has no completed run ({exc}{note})") from exc
    layers = meta.get("layers")
    if not layers:
        raise LipverifyError(f"{run_dir / 'meta.json'} lists no layers; is this a lipverify train run?{note}")
    train_rows = [r for r in rows if r.get("loss") is not None]
    if not train_rows or rows[-1].get("loss") is not None:
        raise LipverifyError(f"{run_dir} has no completed run (steps.csv lacks the final row{note}); {hint}")
    if train_rows[0].get("net_mu") is None:
        raise LipverifyError(f"{run_dir}: the first step carries no probe measurement")
    net, per_layer = [], []
    last_net = last_layers = None
    for r in train_rows:
        if r.get("net_mu") is not None:
            last_net = NetworkTerms(
                log_bound=r["log_bound"],
                mu=r["net_mu"],
                psi=r["net_psi"],
                phi_sq=r["net_phi_sq"],
                phi_sq_cross=r.get("net_phi_sq_cross"),
            )
            last_layers = {
                n: LayerTerms(
                    sigma=r[f"{n}.sigma"],
                    mu=r[f"{n}.mu"],
                    phi=r[f"{n}.phi"],
                    psi=r[f"{n}.psi"],
                    gap=r[f"{n}.gap"],
                    degenerate=bool(r[f"{n}.degenerate"]),
                )
                for n in layers
            }
        net.append(last_net)
        per_layer.append(last_layers)
    return meta, layers, rows, train_rows, net, per_layer


def _full_mu_series(layers, train_rows, net):
    """Network terms with mu_bar from the full-data drift ``mu_full`` (forward-filled), or None."""
    if not any(r.get(f"{layers[0]}.mu_full") is not None for r in train_rows):
        return None
    out, last = [], None
    for r, t in zip(train_rows, net, strict=True):
        if r.get(f"{layers[0]}.mu_full") is not None:
            last = sum(r[f"{n}.mu_full"] / r[f"{n}.sigma"] for n in layers)
        if last is None:
            return None  # mu_full must be measured at the first step
        out.append(NetworkTerms(t.log_bound, last, t.psi, t.phi_sq, t.phi_sq_cross))
    return out


def _observed_bound(run_dir: Path, meta: dict, rows, T: int) -> list[float]:
    """``K_t = exp(log_bound_t)`` for t = 0..T; a non-finite one (inf/NaN ln K, or exp overflow) is
    a :class:`LipverifyError` naming the step."""
    out = []
    for t, r in enumerate(rows[: T + 1]):
        log_k = r.get("log_bound")
        try:
            K = math.exp(log_k) if log_k is not None else math.nan
        except OverflowError:
            K = math.inf
        if not math.isfinite(K):
            raise LipverifyError(
                f"{run_dir}: the observed bound K overflows at step {t} (ln K = {log_k}): the run "
                f"diverged; train again with a smaller lr (lr = {_lr(meta)})"
            )
        out.append(K)
    return out


def _check_finite(run_dir: Path, meta: dict, rows, mean: torch.Tensor, std: torch.Tensor) -> None:
    """A :class:`LipverifyError` naming the first step where the predicted ``mean`` or ``std`` of K
    is inf or NaN, with the observed ln K there: ``|K - inf| <= inf`` would count such a step as
    inside the band."""
    bad = ~(torch.isfinite(mean) & torch.isfinite(std))
    if not bool(bad.any()):
        return
    t = int(bad.nonzero()[0, 0])
    raise LipverifyError(
        f"{run_dir}: the Theorem 17 prediction overflows at step {t} (E[K_t] = {float(mean[t]):.6g}, "
        f"std = {float(std[t]):.6g}; observed ln K_t = {rows[t]['log_bound']:.6g}): the run diverged; "
        f"train again with a smaller lr (lr = {_lr(meta)})"
    )


def _lr(meta: dict) -> object:
    return (meta.get("config") or {}).get("lr")


def _checked_prediction(run_dir: Path, meta: dict, rows, T: int, net, per_layer=None):
    """Observed K_0..K_T and the Theorem 17 prediction, both checked finite at every step."""
    K_obs = _observed_bound(run_dir, meta, rows, T)
    pred = predict_bound(net, K_obs[0], per_layer)
    # the layer predictions are sums of the same terms divided by sigma: the network's overflows first
    _check_finite(run_dir, meta, rows, pred.mean, pred.std)
    return K_obs, pred


def check_prediction(run_dir: str | Path) -> None:
    """Raise :class:`LipverifyError` when :func:`summarize_run` would: an unfinished run, or an
    observed K or Theorem 17 prediction (mean or std, batch or full-data mu) that is not finite at
    some step. :func:`lipverify.training.train` calls it so that such a run is not "complete"."""
    run_dir = Path(run_dir)
    meta, layers, rows, train_rows, net, per_layer = _series(run_dir)
    _checked_prediction(run_dir, meta, rows, len(train_rows), net, per_layer)
    full_series = _full_mu_series(layers, train_rows, net)
    if full_series is not None:
        _checked_prediction(run_dir, meta, rows, len(train_rows), full_series)


def summarize_run(run_dir: str | Path) -> dict:
    """Summary numbers of a finished run (T = number of steps).

    * ``K0``, ``K_T_observed``: ``exp(log_bound)`` at steps 0 and T.
    * ``K_T_predicted_mean``, ``K_T_predicted_std``: Theorem 17 at T.
    * ``relative_error``: ``(K_T_predicted_mean - K_T_observed) / K_T_observed`` (signed).
    * ``fraction_in_2std``: fraction of t = 1..T with ``|K_t - E[K_t]| <= 2 std[K_t]``.
    * ``cumulative_mu``, ``cumulative_psi``, ``cumulative_phi_sq``: ``sum_{t<T}`` of the network terms
      ``mu_bar``, ``psi_bar``, ``phi_bar^2``; ``psi_mu_ratio = cumulative_psi / |cumulative_mu|``
      (inf when cumulative_mu = 0): how much of the drift of ln K is noise-driven.
    * ``log_bound_change_observed`` and ``log_bound_change_predicted`` (``sum (mu_bar + psi_bar -
      phi_bar^2 / 2)``, Theorem 15), ``cumulative_phi_sq_cross`` (what Assumption 3 drops).
    * ``K_T_predicted_mean_full_mu``, ``K_T_predicted_std_full_mu``, ``fraction_in_2std_full_mu``,
      ``cumulative_mu_full``: the same with mu_bar from the full-data gradient (``mu_full``,
      forward-filled between measurements; None when not recorded). The batch-mean mu carries the
      realised noise of each step, so its prediction follows the realised path; the full-data
      mu is the Theorem 14 drift proper.
    * ``layers``: per layer sigma_0, observed sigma_T, predicted mean/std, fraction in 2 std, and the
      discrete truth: mean ``|observed - first|`` / ``|observed - second|`` order errors and
      ``sum dropped_drift_term`` against ``sum psi``.

    A diverged run has no summary: an observed K or a predicted mean or std of K (with batch or
    full-data mu) that is inf or NaN at any step raises :class:`LipverifyError` naming the first
    such step and the observed ln K there, so no step is counted inside an infinite band and no inf
    is reported as a number.
    """
    run_dir = Path(run_dir)
    meta, layers, rows, train_rows, net, per_layer = _series(run_dir)
    T = len(train_rows)
    K_obs, pred = _checked_prediction(run_dir, meta, rows, T, net, per_layer)
    mean, std = pred.mean.tolist(), pred.std.tolist()
    inside = [abs(K_obs[t] - mean[t]) <= 2 * std[t] for t in range(1, T + 1)]
    cum_mu = sum(t.mu for t in net)
    cum_psi = sum(t.psi for t in net)
    cum_phi = sum(t.phi_sq for t in net)
    cross = [t.phi_sq_cross for t in net if t.phi_sq_cross is not None]
    full_series = _full_mu_series(layers, train_rows, net)
    full = {"K_T_predicted_mean_full_mu": None, "K_T_predicted_std_full_mu": None}
    full.update(fraction_in_2std_full_mu=None, cumulative_mu_full=None)
    if full_series is not None:
        _, pf = _checked_prediction(run_dir, meta, rows, T, full_series)
        fm, fs = pf.mean.tolist(), pf.std.tolist()
        full.update(
            K_T_predicted_mean_full_mu=fm[T],
            K_T_predicted_std_full_mu=fs[T],
            fraction_in_2std_full_mu=sum(abs(K_obs[t] - fm[t]) <= 2 * fs[t] for t in range(1, T + 1)) / T,
            cumulative_mu_full=sum(t.mu for t in full_series),
        )
    layer_summary = {}
    for j, name in enumerate(layers):
        sig = [r[f"{name}.sigma"] for r in rows[: T + 1]]
        lm, ls = pred.layer_mean[:, j].tolist(), pred.layer_var[:, j].sqrt().tolist()
        obs = [r.get(f"{name}.dsigma_observed") for r in train_rows]
        first = [r.get(f"{name}.dsigma_first") for r in train_rows]
        second = [r.get(f"{name}.dsigma_second") for r in train_rows]
        dropped = [r.get(f"{name}.dropped_drift_term") for r in train_rows]
        ok = [i for i in range(T) if obs[i] is not None and first[i] is not None and second[i] is not None]
        layer_summary[name] = {
            "sigma0": sig[0],
            "sigma_T_observed": sig[T],
            "sigma_T_predicted_mean": lm[T],
            "sigma_T_predicted_std": ls[T],
            "fraction_in_2std": sum(abs(sig[t] - lm[t]) <= 2 * ls[t] for t in range(1, T + 1)) / T,
            "cumulative_mu": sum(s[name].mu for s in per_layer),
            "cumulative_psi": sum(s[name].psi for s in per_layer),
            "discrete_first_order_error": (sum(abs(obs[i] - first[i]) for i in ok) / len(ok)) if ok else None,
            "discrete_second_order_error": (sum(abs(obs[i] - second[i]) for i in ok) / len(ok))
            if ok
            else None,
            "cumulative_dropped_drift_term": sum(d for d in dropped if d is not None),
            "degenerate_steps": int(sum(bool(r.get(f"{name}.degenerate")) for r in train_rows)),
        }
    return {
        "steps": T,
        "K0": K_obs[0],
        "K_T_observed": K_obs[T],
        "K_T_predicted_mean": mean[T],
        "K_T_predicted_std": std[T],
        "relative_error": (mean[T] - K_obs[T]) / K_obs[T],
        "fraction_in_2std": sum(inside) / T,
        "psi_mu_ratio": cum_psi / abs(cum_mu) if cum_mu != 0 else math.inf,
        "cumulative_mu": cum_mu,
        "cumulative_psi": cum_psi,
        "cumulative_phi_sq": cum_phi,
        "cumulative_phi_sq_cross": sum(cross) if cross else None,
        "log_bound_change_observed": math.log(K_obs[T]) - math.log(K_obs[0]),
        "log_bound_change_predicted": sum(t.mu + t.psi - 0.5 * t.phi_sq for t in net),
        **full,
        "final_loss": train_rows[-1]["loss"],
        "layers": layer_summary,
        "config": meta.get("config"),
    }


def plot_run(run_dir: str | Path, path: str | Path) -> Path:
    """Figure in the style of the paper's Figure 2: top row, observed sigma_1 of every layer and
    the network bound K against the predicted mean with an E +/- 2 std band; bottom row, the
    network terms mu_bar, psi_bar, phi_bar^2 and the per-layer mu, psi, phi over time. Refuses a
    diverged run (non-finite observation or prediction) like :func:`summarize_run`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    meta, layers, rows, train_rows, net, per_layer = _series(run_dir)
    T = len(train_rows)
    K_obs, pred = _checked_prediction(run_dir, meta, rows, T, net, per_layer)
    steps = list(range(T + 1))
    ncol = max(len(layers) + 1, 4)
    fig, axes = plt.subplots(2, ncol, figsize=(3.2 * ncol, 6.4), squeeze=False)
    for j, name in enumerate([*layers, "K"]):
        ax = axes[0, j]
        if name == "K":
            obs, mean, std = K_obs, pred.mean, pred.std
            ax.set_title("network bound K")
        else:
            obs = [r[f"{name}.sigma"] for r in rows[: T + 1]]
            mean, std = pred.layer_mean[:, j], pred.layer_var[:, j].sqrt()
            ax.set_title(f"{name}: sigma_1")
        mean, std = mean.numpy(), std.numpy()
        ax.fill_between(steps, mean - 2 * std, mean + 2 * std, color="C1", alpha=0.3, label="E ± 2 std")
        ax.plot(steps, mean, color="C1", lw=1.2, label="predicted E")
        ax.plot(steps, obs, color="C0", lw=1.0, label="observed")
        ax.set_xlabel("step")
        if j == 0:
            ax.legend(fontsize=7)
    for ax in axes[0, len(layers) + 1 :]:
        ax.axis("off")
    t_axis = list(range(T))
    ax = axes[1, 0]
    ax.plot(t_axis, [t.mu for t in net], label="mu_bar")
    ax.plot(t_axis, [t.psi for t in net], label="psi_bar")
    ax.plot(t_axis, [0.5 * t.phi_sq for t in net], label="phi_bar^2 / 2")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("network terms (per step)")
    ax.legend(fontsize=7)
    for ax, key, title in zip(
        axes[1, 1:4], ("mu", "psi", "phi"), ("mu (drift)", "psi (curvature)", "phi (diffusion)"), strict=True
    ):
        for name in layers:
            ax.plot(t_axis, [getattr(s[name], key) for s in per_layer], lw=0.8, label=name)
        if key != "mu":
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"layers: {title}")
        ax.legend(fontsize=7)
    for ax in axes[1, 4:]:
        ax.axis("off")
    for ax in axes[1]:
        ax.set_xlabel("step")
    cfg = meta.get("config", {})
    fig.suptitle(
        f"{cfg.get('model')} on {cfg.get('dataset')}: b={cfg.get('batch_size')}, lr={cfg.get('lr')}, "
        f"T={T} (arXiv 2506.18588, Thm 17)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
