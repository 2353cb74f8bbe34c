"""Theorem 14 of the exact conv operator norm against its observed evolution (issue 16, Fig. 2 style).

A small ConvNet whose convolutions use ``padding_mode="circular"`` (stride 1, 'same' size), so the
circular model is the layer itself and ``||conv||_2 = max_f sigma_1(W_hat_f)`` is exact. It is trained
by SGD (mini-batches drawn with replacement, float64) on a synthetic two-class task labelled by a
random teacher of the same architecture. At every step, per conv layer, lipverify.conv_dynamics gives
mu (full-data gradient: the expected drift), phi and psi (Proposition 5 noise of the batch's
per-sample gradients). The prediction is accumulated as lipverify.prediction does for ln K
(``log_bound_forecast``: ``m_t = ln||conv||_0 + sum_{s<t} (mu + psi - phi^2/2) / sigma``,
``v_t = sum_{s<t} phi^2 / sigma^2``) and compared with the observed ``ln||conv||_t``: the error of
``E[ln||conv||_T]`` (absolute in log = relative in the norm, and relative to the observed change),
the coverage of the +/- 2 std band over t = 1..T, and lipverify.prediction.calibration's verdict.
Also recorded per step: the realised one-step Taylor check ``Delta||conv|| = -eta Re(u^H W_hat(G_B) v)
+ eta^2/2 q(W_hat(G_B)) + O(eta^3)`` (G_B the batch mean actually used).

    PYTHONPATH=. python experiments/conv_norm_dynamics.py --steps 200 \
        --out experiments/results/conv_norm_dynamics/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lipverify import conv_dynamics as cd
from lipverify.dynamics import network_terms
from lipverify.prediction import calibration, log_bound_forecast
from lipverify.spectral import SpectralGapWarning


class CircularConvNet(nn.Module):
    """conv(1->c, 3x3, circular) - ReLU - conv(c->c, 3x3, circular) - ReLU - Linear(c*N*N -> 2)."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, padding_mode="circular")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(channels * size * size, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


CONV_LAYERS = ("conv1", "conv2")


def make_data(n: int, size: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 10_000)
    x = torch.randn(n, 1, size, size, dtype=torch.float64, generator=gen)
    torch.manual_seed(seed + 20_000)
    teacher = CircularConvNet(channels, size).double()
    with torch.no_grad():
        logits = teacher(x)
    return x, (logits[:, 1] > logits[:, 0]).long()


def run(
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.05,
    n_train: int = 512,
    size: int = 7,
    channels: int = 4,
    seed: int = 0,
) -> dict:
    """Train, record the Theorem 14 terms of each conv layer's exact norm, compare. Returns a dict."""
    started = time.perf_counter()
    x, y = make_data(n_train, size, channels, seed)
    torch.manual_seed(seed)
    model = CircularConvNet(channels, size).double()
    grid = (size, size)
    loss_fn = nn.CrossEntropyLoss()

    def sample_loss(params, xi, yi):
        out = functional_call(model, params, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    gen = torch.Generator().manual_seed(seed + 1)
    observed = {name: [] for name in CONV_LAYERS}
    terms = {name: [] for name in CONV_LAYERS}
    taylor = {name: [] for name in CONV_LAYERS}
    flagged = {name: 0 for name in CONV_LAYERS}
    top_changes = {name: 0 for name in CONV_LAYERS}
    for step in range(steps + 1):
        params = {k: v.detach() for k, v in model.named_parameters()}
        for name in CONV_LAYERS:
            observed[name].append(cd.circular_conv_norm(params[f"{name}.weight"], grid))
        if step == steps:
            break
        full = grad(lambda p: loss_fn(functional_call(model, p, (x,)), y))(params)
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        g = per_sample(params, x[idx], y[idx])
        batch_mean = {k: v.mean(0) for k, v in g.items()}
        for name in CONV_LAYERS:
            W = params[f"{name}.weight"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SpectralGapWarning)  # counted through the flag
                out = cd.conv_norm_terms(
                    W, g[f"{name}.weight"], lr, grid, mean_grad=full[f"{name}.weight"], name=name
                )
            terms[name].append(out)
            flagged[name] += int(out.terms.degenerate)
            A = cd.frequency_matrix(W, out.top.frequency, grid)
            E = cd.frequency_matrix(batch_mean[f"{name}.weight"], out.top.frequency, grid)
            jac = float((cd.complex_sigma_jacobian(A).conj() * E).sum().real)
            q = float(cd.complex_hessian_quadratic_form(A, E))
            new = cd.circular_conv_norm(W - lr * batch_mean[f"{name}.weight"], grid)
            taylor[name].append(
                {
                    "observed_change": new - out.top.norm,
                    "first_order": -lr * jac,
                    "second_order": -lr * jac + 0.5 * lr * lr * q,
                    "top_changed": cd.top_frequency(W - lr * batch_mean[f"{name}.weight"], grid).frequency
                    != out.top.frequency,
                }
            )
            top_changes[name] += int(taylor[name][-1]["top_changed"])
        with torch.no_grad():
            for k, p in model.named_parameters():
                p -= lr * batch_mean[k]

    layers = {}
    for name in CONV_LAYERS:
        obs = observed[name]
        log_obs = [math.log(v) for v in obs]
        series = [network_terms([t.terms]) for t in terms[name]]
        m, v = log_bound_forecast(log_obs[0], series)
        inside = sum(abs(log_obs[t] - m[t]) <= 2 * math.sqrt(v[t]) for t in range(1, steps + 1))
        change = log_obs[-1] - log_obs[0]
        clean = [r for r in taylor[name] if not r["top_changed"]]
        res2 = [abs(r["observed_change"] - r["second_order"]) for r in clean]
        res1 = [abs(r["observed_change"] - r["first_order"]) for r in clean]
        scale = [abs(r["observed_change"]) for r in clean]
        layers[name] = {
            "observed_norm_0": obs[0],
            "observed_norm_T": obs[-1],
            "observed_log_change": change,
            "predicted_log_mean_T": m[-1],
            "predicted_log_std_T": math.sqrt(v[-1]),
            "log_error_T": m[-1] - log_obs[-1],
            "relative_error_of_change": (m[-1] - log_obs[-1]) / change if change != 0 else None,
            "no_drift_log_error_T": log_obs[0] - log_obs[-1],
            "band_coverage_2std": inside / steps,
            "z_T": (log_obs[-1] - m[-1]) / math.sqrt(v[-1]) if v[-1] > 0 else None,
            "sum_mu_over_sigma": sum(t.terms.mu / t.terms.sigma for t in terms[name]),
            "sum_psi_over_sigma": sum(t.terms.psi / t.terms.sigma for t in terms[name]),
            "sum_phi_sq_over_sigma_sq": v[-1],
            "calibration": calibration(log_obs, m, v)["verdict"],
            "flagged_steps": flagged[name],
            "near_tie_steps": sum(t.near_tie for t in terms[name]),
            "top_frequency_changes": top_changes[name],
            "top_frequencies": sorted({tuple(t.top.frequency) for t in terms[name]}),
            "one_step_taylor": {
                "steps_compared": len(clean),
                "mean_abs_change": sum(scale) / max(len(scale), 1),
                "mean_abs_residual_second_order": sum(res2) / max(len(res2), 1),
                "mean_abs_residual_first_order": sum(res1) / max(len(res1), 1),
            },
            "series": {"observed_log": log_obs, "predicted_log_mean": m, "predicted_log_var": v},
        }
    return {
        "config": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "n_train": n_train,
            "size": size,
            "channels": channels,
            "seed": seed,
            "drift": "full-data gradient",
            "noise": "Proposition 5 on the batch's per-sample gradients (with replacement)",
        },
        "layers": layers,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--size", type=int, default=7, help="odd: only f = 0 is self-conjugate")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    result = run(args.steps, args.batch_size, args.lr, args.n_train, args.size, args.channels, args.seed)
    for name, layer in result["layers"].items():
        t = layer["one_step_taylor"]
        rel = layer["relative_error_of_change"]
        print(
            f"{name}: ||conv|| {layer['observed_norm_0']:.5f} -> {layer['observed_norm_T']:.5f}; "
            f"E[ln||conv||_T] error {layer['log_error_T']:+.3g} "
            f"(observed change {layer['observed_log_change']:+.3g}, "
            f"relative {rel if rel is None else round(rel, 3)}; "
            f"no-drift error {layer['no_drift_log_error_T']:+.3g}); "
            f"std_T {layer['predicted_log_std_T']:.3g}, "
            f"z_T {layer['z_T']:.2f}; 2-std coverage {layer['band_coverage_2std']:.3f}; "
            f"calibration {layer['calibration']}; flagged {layer['flagged_steps']}, "
            f"near ties {layer['near_tie_steps']}, top changes {layer['top_frequency_changes']}; "
            f"one-step |residual| 2nd order {t['mean_abs_residual_second_order']:.2g} "
            f"vs 1st {t['mean_abs_residual_first_order']:.2g} (|change| {t['mean_abs_change']:.2g})"
        )
    print(f"{result['seconds']:.1f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)  # never a half-written result file
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
