"""Lipschitz constant of a whole network in l2: certified upper bound, the paper's K, an empirical
lower bound (issue 16).

For ``f = g_L o ... o g_1``, ``Lip(f) <= prod_l Lip(g_l)`` with, in l2 and evaluation mode:

* ``nn.Linear``: sigma_1(W) (float64 SVD, times ``1 + ROUNDING_MARGIN``); ``nn.Conv2d``: the certified
  upper bound of :func:`lipverify.conv.conv_operator_norm` on the layer's actual input size (biases
  are translations: Lipschitz constant unchanged);
* ReLU, Flatten, Identity, Dropout (identity in eval mode): 1;
* ``nn.MaxPool2d``: ``sqrt(m)``, m the largest number of pooling windows that contain one input
  pixel (``|max_w a - max_w b| <= max_w |a - b|``, so ``||pool a - pool b||^2 <= sum_w sum_{i in w}
  (a_i - b_i)^2 <= m ||a - b||^2``); m = 1 for non-overlapping windows (the paper's MaxPool2d(2)), so
  overlapping pools are honestly looser, not treated as 1-Lipschitz;
* ``nn.BatchNorm2d`` with running statistics, eval mode: the diagonal scaling ``|gamma| /
  sqrt(var + eps)``, Lipschitz constant its largest entry. Without running statistics
  (``track_running_stats=False``, the paper's ConvNet with batch norm) eval mode still normalises with
  the batch's own statistics: the output of one sample depends on the others, there is no
  per-sample map to bound, and it is refused.

Any other module type is refused with a :class:`LipverifyError` naming it. The layer order comes
from :func:`layer_sequence` (the package's MLP and ConvNet, or an ``nn.Sequential``), checked against
the model's own forward.

``K = prod_l sigma_1(reshaped W_l)`` (the framework's bound, Proposition 8 with the matrix view of a
Conv2d weight) is reported beside them: it is not an upper bound for conv layers.

Empirical lower bound. For any x and direction delta, ``||f(x + delta) - f(x)|| / ||delta|| <= Lip(f)``
(the secant ratio: certified for any function, kinks included). At each sample x the direction is
the top right singular vector of the input Jacobian J(x) (power iteration on ``J^T J`` with
``torch.func.jvp``/``vjp``, float64, eval mode), the step ``delta = h v`` with ``h =``
:data:`SECANT_STEP` (relative to ``max(||x||, 1)``; float64 rounding of the difference is then
``~ 1e-10`` relative); ``jacobian_lower = max_x ||J(x) v|| / ||v||`` is reported
too, not used as a bound: it equals a secant limit where f is differentiable, but at a kink (a tie
inside a max-pool window, common on images with a flat zero background) autograd picks one
derivative, which can exceed every nearby secant (seen on Fashion-MNIST: about 15% above).
A ReLU network's Jacobian is piecewise
constant, so gradient ascent on ``||J(x)||`` has zero gradient almost everywhere; the ascent
(:data:`ASCENT_STEPS` normalised-gradient steps) is on the secant ratio at the coarser step
:data:`ASCENT_SECANT_STEP` over (x, direction) instead, and the largest ratio evaluated (coarse and
fine, at every iterate) is kept.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lipverify._validation import LipverifyError
from lipverify.conv import ROUNDING_MARGIN, conv_operator_norm, frequency_response, reshaped_sigma1

JACOBIAN_ITERATIONS = 20
SECANT_STEP = 1e-6
ASCENT_SECANT_STEP = 1e-2
ASCENT_STEPS = 5
ASCENT_LR = 0.05


def layer_sequence(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list ``(name, module)`` of the maps it composes (eval mode):
    ``lipverify.models.MLP``/``ConvNet`` by their forward, an ``nn.Sequential`` by its children."""
    from lipverify.models import MLP, ConvNet

    if isinstance(model, ConvNet):
        relu = nn.ReLU()
        return [
            ("conv1", model.conv1), ("relu1", relu), ("pool1", model.pool),
            ("conv2", model.conv2), ("relu2", relu), ("pool2", model.pool),
            ("conv3", model.conv3), ("relu3", relu), ("bn", model.bn), ("flatten", nn.Flatten()),
            ("fc1", model.fc1), ("relu4", relu), ("dropout", model.dropout), ("fc2", model.fc2),
        ]  # fmt: skip
    if isinstance(model, MLP):
        relu = nn.ReLU()
        return [
            ("flatten", nn.Flatten()), ("fc1", model.fc1), ("relu1", relu), ("drop1", model.drop),
            ("fc2", model.fc2), ("relu2", relu), ("drop2", model.drop), ("fc3", model.fc3),
        ]  # fmt: skip
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    raise LipverifyError(
        f"no layer order known for {type(model).__name__}: pass an nn.Sequential or a lipverify model"
    )


def _pool_overlap(pool: nn.MaxPool2d, shape: tuple[int, ...]) -> int:
    """Largest number of pooling windows containing one input pixel (gradient of the summed unfold)."""
    if pool.ceil_mode:
        raise LipverifyError("MaxPool2d with ceil_mode=True is not covered")
    x = torch.zeros(1, 1, *shape[-2:], dtype=torch.float64, requires_grad=True)
    cols = F.unfold(x, pool.kernel_size, pool.dilation, pool.padding, pool.stride)
    (count,) = torch.autograd.grad(cols.sum(), x)
    return round(float(count.max()))


@dataclass
class LayerBound:
    """One map of the sequence: ``factor`` its certified Lipschitz upper bound; for Linear/Conv2d also
    ``lower`` (certified), ``reshaped`` (the framework's sigma_1), ``exact`` and, for Conv2d, the
    ``radial_profile`` of its frequency response on the padded grid."""

    kind: str
    factor: float
    lower: float | None = None
    reshaped: float | None = None
    exact: bool = False
    radial_profile: list | None = None
    vector: torch.Tensor | None = None


@dataclass
class NetworkBounds:
    """``K`` (framework), ``upper`` (certified ``prod factor``), ``layers`` by name (forward order)."""

    K: float
    upper: float
    layers: dict[str, LayerBound] = field(default_factory=dict)


def _float64_eval(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).to(torch.float64)
    m.eval()
    return m


def _check_sequence(model: nn.Module, seq, x: torch.Tensor) -> None:
    """The sequence must reproduce the model's forward (eval mode, float64), else it is not the model."""
    y = x
    for _, module in seq:
        y = module(y)
    with torch.no_grad():
        ref = model(x)
        y = y.detach()
    if ref.shape != y.shape or not torch.allclose(
        ref, y, rtol=1e-10, atol=1e-10 * float(ref.abs().max() + 1)
    ):
        raise LipverifyError(f"layer sequence of {type(model).__name__} does not reproduce its forward")


def network_upper_bound(
    model: nn.Module,
    input_shape: tuple[int, ...],
    warm: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> NetworkBounds:
    """Certified ``upper = prod_l factor_l`` and the framework's ``K`` for inputs of ``input_shape``
    (one sample, no batch dimension); ``warm`` maps conv layer names to the previous power-iteration
    vectors. The model is copied to float64 in eval mode; the original is untouched."""
    m = _float64_eval(model)
    seq = layer_sequence(m)
    x = torch.zeros(1, *input_shape, dtype=torch.float64)
    _check_sequence(m, seq, torch.randn(2, *input_shape, dtype=torch.float64, generator=generator))
    warm = warm or {}
    layers: dict[str, LayerBound] = {}
    for name, module in seq:
        shape = tuple(x.shape[1:])
        if isinstance(module, nn.Conv2d):
            b = conv_operator_norm(module, shape, v0=warm.get(name), generator=generator)
            fr = frequency_response(module.weight, _circular_grid(module, shape), module.dilation)
            layers[name] = LayerBound(
                "conv2d",
                b.upper,
                b.lower,
                reshaped_sigma1(module.weight),
                b.exact,
                fr.radial_profile,
                b.vector,
            )
        elif isinstance(module, nn.Linear):
            s = reshaped_sigma1(module.weight)
            layers[name] = LayerBound("linear", s * (1 + ROUNDING_MARGIN), s * (1 - ROUNDING_MARGIN), s, True)
        elif isinstance(module, nn.ReLU | nn.Flatten | nn.Identity | nn.Dropout):
            layers[name] = LayerBound(type(module).__name__.lower(), 1.0)
        elif isinstance(module, nn.MaxPool2d):
            layers[name] = LayerBound("maxpool2d", math.sqrt(_pool_overlap(module, shape)))
        elif isinstance(module, nn.BatchNorm2d):
            if module.running_var is None:
                raise LipverifyError(
                    f"{name}: BatchNorm2d without running statistics normalises with the batch's own "
                    "statistics even in eval mode; one sample's output depends on the others, so there "
                    "is no per-sample Lipschitz constant to bound"
                )
            scale = (
                torch.ones_like(module.running_var) if module.weight is None else module.weight.detach().abs()
            )
            scale = scale / torch.sqrt(module.running_var + module.eps)
            layers[name] = LayerBound("batchnorm2d", float(scale.max()) * (1 + ROUNDING_MARGIN))
        else:
            raise LipverifyError(
                f"{name}: no certified Lipschitz bound for {type(module).__name__}; covered: Linear, "
                "Conv2d, ReLU, MaxPool2d, BatchNorm2d (running stats), Flatten, Dropout, Identity"
            )
        with torch.no_grad():
            x = module(x)
    K = math.prod(lb.reshaped for lb in layers.values() if lb.reshaped is not None)
    upper = math.prod(lb.factor for lb in layers.values())
    return NetworkBounds(K, upper, layers)


def _circular_grid(conv: nn.Conv2d, shape) -> tuple[int, int]:
    from lipverify.conv import conv_spec

    return conv_spec(conv, shape).circular_grid


@dataclass(frozen=True)
class EmpiricalLower:
    """``secant`` (certified lower bound on Lip(f): the largest secant ratio evaluated, ascent
    included), ``secant_at_samples`` (before the ascent), ``jacobian`` (largest ``||J(x) v||/||v||``
    over the sample), ``sample_index`` of the latter."""

    secant: float
    secant_at_samples: float
    jacobian: float
    sample_index: int


def empirical_lower_bound(
    model: nn.Module,
    inputs: torch.Tensor,
    iterations: int = JACOBIAN_ITERATIONS,
    ascent_steps: int = ASCENT_STEPS,
    generator: torch.Generator | None = None,
) -> EmpiricalLower:
    """Empirical lower bound on the l2 Lipschitz constant (module docstring) over ``inputs`` (n, ...),
    float64, eval mode (a copy of the model). Samples must not interact (no batch statistics)."""
    m = _float64_eval(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_var is None:
            raise LipverifyError("batch norm without running statistics: samples interact in eval mode")
    x = inputs.detach().to(torch.float64)
    if x.shape[0] < 1 or not bool(torch.isfinite(x).all()):
        raise LipverifyError("inputs must be a non-empty finite batch")
    v = torch.randn(x.shape, dtype=torch.float64, generator=generator)

    def norms(t):
        return t.flatten(1).norm(dim=1)

    v = v / norms(v).view(-1, *[1] * (x.dim() - 1))
    _, vjp_fn = torch.func.vjp(m, x)
    for _ in range(iterations):
        _, jv = torch.func.jvp(m, (x,), (v,))
        (w,) = vjp_fn(jv)
        n = norms(w).clamp_min(torch.finfo(torch.float64).tiny)
        v = w / n.view(-1, *[1] * (x.dim() - 1))
    _, jv = torch.func.jvp(m, (x,), (v,))
    jac = norms(jv).detach()
    idx = int(jac.argmax())

    def col(t):  # per-sample scalar as a broadcastable column
        return t.view(-1, *[1] * (x.dim() - 1))

    scale_x = col(norms(x).clamp_min(1.0))

    def secant(x_at, direction, h):
        d = h * scale_x * direction / col(norms(direction).clamp_min(1e-300))
        with torch.no_grad():
            return norms(m(x_at + d) - m(x_at)) / norms(d)

    at_samples = float(secant(x, v, SECANT_STEP).max())
    best = at_samples
    # ReLU nets: ||J(x)|| is piecewise constant in x (zero gradient a.e.), so the ascent moves x on
    # the secant ratio at the coarser step ASCENT_SECANT_STEP, whose gradient is not zero; both the
    # coarse and the fine ratio at every iterate are certified lower bounds, the largest is kept
    xa, direction = x.clone(), v.clone()
    for _ in range(ascent_steps):
        xa.requires_grad_(True)
        direction.requires_grad_(True)
        d = ASCENT_SECANT_STEP * scale_x * direction / col(norms(direction))
        r = norms(m(xa + d) - m(xa)) / norms(d)
        gx, gd = torch.autograd.grad(r.sum(), (xa, direction))
        with torch.no_grad():
            xa = xa + ASCENT_LR * scale_x * gx / col(norms(gx).clamp_min(1e-300))
            direction = direction + ASCENT_LR * gd / col(norms(gd).clamp_min(1e-300))
        xa, direction = xa.detach(), direction.detach()
        best = max(
            best,
            float(secant(xa, direction, ASCENT_SECANT_STEP).max()),
            float(secant(xa, direction, SECANT_STEP).max()),
        )
    return EmpiricalLower(best, at_samples, float(jac.max()), idx)


# ------------------------------------------------------------------------- records along a run
#: network columns of ``lipschitz.csv`` (``lipverify train`` with ``lipschitz_every > 0``)
LIPSCHITZ_NET_FIELDS = ("K", "upper", "lower_secant", "lower_secant_at_samples", "lower_jacobian", "seconds")
#: per Linear/Conv2d layer: certified lower/upper bound of its operator norm, the framework's sigma_1
LIPSCHITZ_LAYER_FIELDS = ("lower", "upper", "reshaped")
#: the power iterations of a record are seeded with ``LIPSCHITZ_SEED + step`` (resume-exact)
LIPSCHITZ_SEED = 7_000_003


def weight_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names (forward order) of the Linear/Conv2d maps of :func:`layer_sequence` and of its Conv2d."""
    seq = layer_sequence(model)
    weighted = [n for n, m in seq if isinstance(m, nn.Linear | nn.Conv2d)]
    return weighted, [n for n, m in seq if isinstance(m, nn.Conv2d)]


def lipschitz_columns(model: nn.Module, bins: int) -> list[str]:
    """Header of ``lipschitz.csv``: step, :data:`LIPSCHITZ_NET_FIELDS`, per weight layer
    ``<layer>.<field>`` for :data:`LIPSCHITZ_LAYER_FIELDS`, per Conv2d ``<layer>.radial_<i>`` (the
    radial frequency profile, :func:`lipverify.conv.frequency_response`, low to high frequency)."""
    weighted, convs = weight_layers(model)
    cols = ["step", *LIPSCHITZ_NET_FIELDS]
    for name in weighted:
        cols += [f"{name}.{f}" for f in LIPSCHITZ_LAYER_FIELDS]
    for name in convs:
        cols += [f"{name}.radial_{i}" for i in range(bins)]
    return cols


def lipschitz_record(
    model: nn.Module, inputs: torch.Tensor, step: int, warm: dict[str, torch.Tensor] | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One row of ``lipschitz.csv`` at the current weights: :func:`network_upper_bound` (certified
    upper, K, per-layer bounds and radial profiles) and :func:`empirical_lower_bound` on ``inputs``
    (n, ...), with power iterations seeded by ``LIPSCHITZ_SEED + step``; returns ``(row, warm)``,
    ``warm`` the conv power-iteration vectors for the next record. The model is not modified (float64
    eval-mode copies) and torch's global RNG is not used."""
    import time

    started = time.perf_counter()
    gen = torch.Generator().manual_seed(LIPSCHITZ_SEED + step)
    nb = network_upper_bound(model, tuple(inputs.shape[1:]), warm, gen)
    emp = empirical_lower_bound(model, inputs, generator=gen)
    row: dict = {
        "step": step,
        "K": nb.K,
        "upper": nb.upper,
        "lower_secant": emp.secant,
        "lower_secant_at_samples": emp.secant_at_samples,
        "lower_jacobian": emp.jacobian,
    }
    new_warm = {}
    for name, lb in nb.layers.items():
        if lb.reshaped is None:
            continue
        row.update({f"{name}.lower": lb.lower, f"{name}.upper": lb.factor, f"{name}.reshaped": lb.reshaped})
        if lb.radial_profile is not None:
            row.update({f"{name}.radial_{i}": v for i, v in enumerate(lb.radial_profile)})
        if lb.vector is not None:
            new_warm[name] = lb.vector
    for key, value in row.items():
        if value is not None and not math.isfinite(value):
            raise LipverifyError(f"Lipschitz record at step {step}: {key} is {value}")
    row["seconds"] = time.perf_counter() - started
    return row, new_warm


# ------------------------------------------------------------------------- report
def summarize_lipschitz(run_dir) -> dict:
    """From ``lipschitz.csv`` of a run: the first and last record's K, certified upper bound, empirical
    lower bound (secant), ``upper / K`` and ``upper / lower``, and per layer the first and last
    certified bounds and reshaped sigma_1. A record whose bounds are inconsistent (empirical lower
    above the certified upper) is a :class:`LipverifyError`: one of them would be wrong."""
    from pathlib import Path

    from lipverify.records import read_steps

    _, rows = read_steps(Path(run_dir) / "lipschitz.csv")
    if not rows:
        raise LipverifyError(f"{run_dir}/lipschitz.csv holds no record")
    for r in rows:
        if r["lower_secant"] > r["upper"]:
            raise LipverifyError(
                f"step {int(r['step'])}: empirical lower bound {r['lower_secant']:.6g} exceeds the "
                f"certified upper bound {r['upper']:.6g}"
            )

    def point(r):
        return {
            "step": int(r["step"]),
            "K": r["K"],
            "upper": r["upper"],
            "lower": r["lower_secant"],
            "upper_over_K": r["upper"] / r["K"],
            "upper_over_lower": r["upper"] / r["lower_secant"] if r["lower_secant"] > 0 else None,
        }

    layers = [k.removesuffix(".upper") for k in rows[0] if k.endswith(".upper")]
    per_layer = {
        n: {
            f"{w}_{f}": rows[i][f"{n}.{f}"]
            for i, w in ((0, "first"), (-1, "last"))
            for f in LIPSCHITZ_LAYER_FIELDS
        }
        for n in layers
    }
    return {"records": len(rows), "first": point(rows[0]), "last": point(rows[-1]), "layers": per_layer}


def plot_lipschitz(run_dir, path, profiles: int = 3):
    """Figure of ``lipschitz.csv``: left, K, the certified upper bound and the empirical lower bound
    over training (log scale; the true Lipschitz constant lies between the last two); then, per Conv2d,
    its radial frequency profile (sigma_1 of the transfer matrix, low to high frequency) at
    ``profiles`` records spread over the run, with the layer's certified bounds. Returns ``path``."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lipverify.records import read_steps

    _, rows = read_steps(Path(run_dir) / "lipschitz.csv")
    if not rows:
        raise LipverifyError(f"{run_dir}/lipschitz.csv holds no record")
    convs = [k.removesuffix(".radial_0") for k in rows[0] if k.endswith(".radial_0")]
    fig, axes = plt.subplots(1, 1 + len(convs), figsize=(4.2 * (1 + len(convs)), 3.6), squeeze=False)
    steps = [r["step"] for r in rows]
    ax = axes[0, 0]
    ax.plot(steps, [r["upper"] for r in rows], "C3-o", ms=3, label="certified upper bound")
    ax.plot(steps, [r["K"] for r in rows], "C0-s", ms=3, label="K (paper, reshaped sigma_1)")
    ax.plot(steps, [r["lower_secant"] for r in rows], "C2-^", ms=3, label="empirical lower bound")
    ax.fill_between(
        steps, [r["lower_secant"] for r in rows], [r["upper"] for r in rows], color="C7", alpha=0.15
    )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("network Lipschitz constant (l2)")
    ax.legend(fontsize=7)
    picks = sorted({round(i * (len(rows) - 1) / max(profiles - 1, 1)) for i in range(profiles)})
    for j, name in enumerate(convs, start=1):
        ax = axes[0, j]
        bins = sorted(int(k.split("_")[-1]) for k in rows[0] if k.startswith(f"{name}.radial_"))
        centres = [(b + 0.5) * math.sqrt(0.5) / len(bins) for b in bins]
        for c, i in enumerate(picks):
            r = rows[i]
            ys = [r[f"{name}.radial_{b}"] for b in bins]
            ys = [float("nan") if y is None else y for y in ys]  # empty bin: a gap in the line
            ax.plot(centres, ys, f"C{c}-o", ms=3, label=f"step {int(r['step'])}")
        last = rows[-1]
        # a strided layer's bound sits below its kernel's stride-1 response (the stride aliases)
        ax.axhline(
            last[f"{name}.upper"], color="k", ls="--", lw=0.8, label="layer's certified upper bound (last)"
        )
        ax.axhline(last[f"{name}.reshaped"], color="C0", ls=":", lw=0.8, label="reshaped sigma_1 (last)")
        ax.set_xlabel("normalised radial frequency |f/N|")
        ax.set_title(f"{name}: kernel response sigma_1(T_f), stride 1", fontsize=9)
        ax.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
