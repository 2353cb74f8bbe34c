"""Plain-SGD training runs with the dynamics probe, crash-safe records and exact resume.

Update (no momentum): ``W <- W - eta (alpha g_B + beta xi + lambda W)`` with ``alpha =
grad_scale``, ``xi`` per-entry i.i.d. noise of unit variance (Gaussian, or uniform on
``[-sqrt 3, sqrt 3]``) added once to the mini-batch gradient of every parameter, ``beta =
grad_noise_std`` (paper Section 8.4) and weight decay ``lambda``. The probe's terms account for all
three (:meth:`lipverify.probe.DynamicsProbe.compute`).

Randomness: ``seed_init`` seeds only the initialisation; ``seed_sampling`` seeds a generator that
draws each mini-batch (b indices without replacement, independently at every step, so the
Proposition 5 factor ``(1 - b/N)`` applies) and, offset by one, torch's global RNG used by
dropout, mixup, injected noise, FGSM and AutoAugment; label corruption uses
``seed_sampling + 1_000_003``. Both generator states are checkpointed, so a resumed run on CPU
reproduces the uninterrupted one bit for bit.

Regularisers: batch norm and dropout (ConvNet; dropout also in the MLP), weight decay, mixup
(``Beta(a, a)`` mixing coefficient, one per batch, partner = a random permutation of the batch),
label smoothing, AutoAugment (torchvision's CIFAR-10 policy on uint8 3-channel images; needs
``pip install lipverify[vision]``), FGSM adversarial training (the step uses
``x_adv = clip(x + eps sign grad_x L, 0, 1)`` only). The full-data gradient for ``mu_full`` is the
expected step gradient: the training loss (label smoothing, weight decay in the drift) over the whole
training set in chunks of 1000, with the labels the run trains on (corrupted under ``label_noise``),
each chunk FGSM-perturbed, mixed or augmented like a batch (:meth:`_Run.full_batches`). With
``full_gradient_clean`` the same steps also record ``mu_full_clean``, the drift from the uncorrupted
labels at the same weights, and the network drifts ``net_mu_full`` / ``net_mu_full_clean``
(``sum_l mu_l / sigma_l``): the Section 8.5 model ``mu_p = (1 - p) mu_0`` compared at the weights of
one run (:mod:`lipverify.framework.label_noise_model`).

Files in ``out_dir``: ``steps.csv`` (one flushed row per step; see :func:`step_columns`),
``meta.json`` (config, versions, seeds, device, status, all written atomically) and
``checkpoint.pt`` (model, optimiser-free state, RNG states, step, records so far) and, with
``lipschitz_every = k > 0``, ``lipschitz.csv``: at steps 0, k, 2k, ... and the last, the paper's K,
the certified upper bound on the network's l2 Lipschitz constant, the empirical lower bound on the
first ``lipschitz_samples`` training samples, per layer the certified bounds of its operator norm and
per Conv2d its radial frequency profile (:mod:`lipverify.lipschitz`; read-only: float64 eval-mode
copies of the model and private random generators, so the training trajectory is unchanged);
with ``conv_norm_every = k > 0`` (convnet, no batch norm, mixup or injected noise), ``conv_norm.csv``:
at steps 0, k, 2k, ... the Theorem 14 terms (mu, mu_full at full-gradient steps, psi, phi) of each
Conv2d's circular-model norm ``max_f sigma_1(W_hat_f)`` on its padded input grid, from per-sample
gradients of the step's own batch (torch.func; forked random streams, so the trajectory is
unchanged), with the frequency flags, and a last row with the norms at W_T
(:mod:`lipverify.conv_dynamics`).

Reads (issue 15). A step's record needs values computed on the device: the loss, the batch accuracy,
whether every gradient is finite, and the probe's terms, cross-layer diagnostic and discrete truth.
By default they are read and checked within the step, so a divergence is reported before the probe
runs on an overflowed gradient. With ``defer_reads = true`` they stay on the device, packed, and are
copied to the host without blocking. Each step's record is read after the next step's work has been
issued: the host never waits for the device inside a step on the probe's device route (CUDA), except
at steps that also compute sharpness, ``sigmas`` or full-data drifts. The records are the same bits.
A divergence is then reported one step later (the failing step is still named), and the last record
is read at checkpoints and at the end. ``side_stream = true`` (with ``defer_reads``) also issues the
probe's ``after_step`` on a CUDA side stream (:mod:`lipverify.probe.streams`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import sys
import time
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lipverify._validation import LipverifyError
from lipverify.data import DATASETS, ImageData, corrupt_labels, load_dataset, to_model_input
from lipverify.dynamics import NonFiniteTermError, network_terms
from lipverify.models import INITS, build_model
from lipverify.prediction import STABILITY_WARNING, check_prediction
from lipverify.probe import DynamicsProbe, ProbeSchedule
from lipverify.probe.deferred import DeferredResults
from lipverify.probe.dynamics_probe import combine_cross_layer_squares, cross_layer_squares
from lipverify.records import StepLog, atomic_torch_save, read_json, write_json
from lipverify.sharpness import top_hessian_eigenvalue

LAYER_FIELDS = (
    "sigma",
    "gap",
    "degenerate",
    "mu",
    "psi",
    "phi",
    "mu_full",
    "dsigma_observed",
    "dsigma_first",
    "dsigma_second",
    "dropped_drift_term",
    "update_exceeds_gap",
)
NET_FIELDS = ("net_mu", "net_psi", "net_phi_sq", "net_phi_sq_cross")
#: with ``full_gradient_clean``: full-data network drifts with the run's and with the clean labels
CLEAN_DRIFT_NET_FIELDS = ("net_mu_full", "net_mu_full_clean")
#: with ``full_gradient_clean``: per layer, the full-data drift with the clean labels
CLEAN_DRIFT_LAYER_FIELD = "mu_full_clean"
#: per-record file of ``lipschitz_every`` (:func:`lipverify.lipschitz.lipschitz_columns`)
LIPSCHITZ_FILE = "lipschitz.csv"
#: lambda_max of the loss Hessian and lr * lambda_max, every ``sharpness_every`` steps (else empty)
SHARPNESS_FIELDS = ("sharpness", "lr_sharpness")
#: the fixed batch the sharpness is evaluated on: the first samples of the training set
SHARPNESS_BATCH = 256
#: power-iteration products per evaluation (warm-started from the previous eigenvector)
SHARPNESS_ITERATIONS = 20
SHARPNESS_TOL = 1e-3
FULL_GRADIENT_CHUNK = 1000
#: largest share of a run's time the automatic full-data gradient may add
FULL_GRADIENT_OVERHEAD = 0.3
#: cost of one probed training step in per-sample forward/backward passes, per sample of the batch
#: (benchmarks/bench_probe.py, CPU, b = 128: the probed MLP step is ~11.6x a plain step, the
#: ConvNet's ~1.8x); a full-data pass costs about N of them
PROBED_STEP_COST = {"mlp": 11.6, "convnet": 1.8}


def full_gradient_period(config: TrainConfig, train_size: int) -> int:
    """Steps between two full-data gradients (``mu_full``): ``config.full_gradient_every`` when
    set (0 = off), else the smallest k with ``N / (k c b) <= FULL_GRADIENT_OVERHEAD``, i.e.
    ``k = ceil(N / (0.3 c b))``: a pass over the N training samples every k steps costs at most 30%
    of the probed steps (c = :data:`PROBED_STEP_COST` of the model, b the batch size). MLP on
    MNIST-5k, b = 128: k = 12; ConvNet on 10k Fashion-MNIST samples: k = 145. Between two passes
    ``mu_full`` is held (the last measured value; causal, like a forecast made with what is known).
    ``probe_every > 1`` rounds k up to a multiple of it, so every pass lands on a probed step."""
    if config.full_gradient_every is not None:
        return config.full_gradient_every
    cost = PROBED_STEP_COST[config.model] * config.batch_size * FULL_GRADIENT_OVERHEAD
    k = max(1, math.ceil(train_size / cost))
    return config.probe_every * math.ceil(k / config.probe_every)


#: label corruption is seeded with ``seed_sampling + LABEL_NOISE_SEED_OFFSET``
LABEL_NOISE_SEED_OFFSET = 1_000_003
#: the range ``torch.Generator.manual_seed`` accepts
SEED_RANGE = (-(2**63), 2**64 - 1)


#: ``TrainConfig.amp``: autocast of the training step's forward passes.
AMP_MODES = ("none", "bf16")


@dataclass
class TrainConfig:
    """One training run (see the module docstring for the semantics of each field)."""

    model: str = "mlp"  # "mlp" | "convnet"
    dataset: str = "mnist5k"  # "mnist5k" | "mnist" | "fashion-mnist" | "cifar10" | "cifar100"
    data_dir: str | None = None
    train_size: int | None = None  # use the first n training samples (None: all)
    batch_size: int = 128
    lr: float = 0.05
    steps: int = 300
    init: str = "default"  # "default" | "kaiming_normal"
    init_scale: float = 1.0
    seed_init: int = 0
    seed_sampling: int = 0
    dropout: float = 0.0
    batch_norm: bool = False
    weight_decay: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    label_smoothing: float = 0.0
    autoaugment: bool = False
    fgsm_eps: float = 0.0
    grad_scale: float = 1.0  # alpha
    grad_noise: str = "none"  # "none" | "gaussian" | "uniform"
    grad_noise_std: float = 0.0  # beta: std of the injected per-entry noise
    label_noise: float = 0.0  # p
    probe_every: int = 1
    full_gradient_every: int | None = None  # None = auto (full_gradient_period); 0 = off
    full_gradient_clean: bool = False  # also the full-data drift with the uncorrupted labels
    sharpness_every: int = 25  # lambda_max of the loss Hessian every k steps; 0 = off
    lipschitz_every: int = 0  # certified/empirical Lipschitz bounds into lipschitz.csv every k steps; 0 = off
    lipschitz_samples: int = 32  # training samples of the empirical lower bound (Jacobian, secant)
    conv_norm_every: int = (
        0  # Theorem 14 terms of each Conv2d's circular-model norm into conv_norm.csv; 0 = off
    )
    checkpoint_every: int = 50
    cuda_graphs: bool = False  # probe on the device route (CUDA): spectra replayed from a CUDA graph
    defer_reads: bool = False  # read each step's record a step later (after the next step is issued)
    side_stream: bool = False  # probe on the device route: after_step on a CUDA side stream (defer_reads)
    device: str = "cpu"
    dtype: str = "float32"
    amp: str = "none"  # "none" | "bf16": forward passes of the step (and its full-data gradient) in bfloat16

    def validate(self) -> TrainConfig:
        """Check every field: its type (an int is accepted for a float), finite floats, the ranges
        and choices below, seeds inside ``torch.Generator.manual_seed``'s range (``seed_sampling``
        also with its derived seeds ``+1`` and ``+LABEL_NOISE_SEED_OFFSET``), and a device that is
        ``cpu`` or an available ``cuda[:index]``."""

        def bad(msg: str) -> None:
            raise LipverifyError(f"invalid config: {msg}")

        for key, hint in _field_types().items():
            value = getattr(self, key)
            options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            if value is None and type(None) in options:
                continue
            base = next(t for t in options if t is not type(None))
            allowed = (int, float) if base is float else (base,)
            if not isinstance(value, allowed) or (base is not bool and isinstance(value, bool)):
                bad(f"{key} must be {base.__name__}, got {value!r}")
            # nan passes every `< 0` / `> 0` range check below
            if base is float and not math.isfinite(value):
                bad(f"{key} must be a finite number, got {value}")
        lo, hi = SEED_RANGE
        if not lo <= self.seed_init <= hi:
            bad(f"seed_init must be in [-2**63, 2**64 - 1] (torch's seed range), got {self.seed_init}")
        if not lo <= self.seed_sampling <= hi - LABEL_NOISE_SEED_OFFSET:
            bad(
                f"seed_sampling must be in [-2**63, 2**64 - 1 - {LABEL_NOISE_SEED_OFFSET}] "
                f"(torch.Generator.manual_seed, with the derived label-noise seed), got {self.seed_sampling}"
            )
        if self.model not in ("mlp", "convnet"):
            bad(f"model must be 'mlp' or 'convnet', got {self.model!r}")
        if self.dataset not in DATASETS:
            bad(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.init not in INITS:
            bad(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.grad_noise not in ("none", "gaussian", "uniform"):
            bad(f"grad_noise must be 'none', 'gaussian' or 'uniform', got {self.grad_noise!r}")
        if self.dtype not in ("float32", "float64"):
            bad(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.amp not in AMP_MODES:
            hint = (
                "; float16 needs loss scaling, which lipverify train does not do (use 'bf16', or "
                "DynamicsProbe.use_grad_scaler in your own loop)"
                if self.amp in ("fp16", "float16")
                else ""
            )
            bad(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}{hint}")
        if self.amp != "none" and self.dtype != "float32":
            bad(f"amp = {self.amp!r} needs dtype = 'float32', got {self.dtype!r}")
        if self.amp != "none" and self.conv_norm_every:
            bad("conv_norm_every needs amp = 'none' (its per-sample terms are of the float32 step)")
        if self.batch_size < 2:
            bad(f"batch_size must be >= 2 (Proposition 5 divides by b(b-1)), got {self.batch_size}")
        for key in (
            "steps",
            "probe_every",
            "full_gradient_every",
            "checkpoint_every",
            "sharpness_every",
            "lipschitz_every",
            "conv_norm_every",
        ):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                bad(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.steps < 1:
            bad(f"steps must be >= 1, got {self.steps}")
        if self.probe_every < 1:
            bad(f"probe_every must be >= 1, got {self.probe_every}")
        for key in ("lr", "init_scale", "grad_scale"):
            if not getattr(self, key) > 0:
                bad(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("weight_decay", "mixup", "fgsm_eps", "grad_noise_std"):
            if getattr(self, key) < 0:
                bad(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("dropout", "label_smoothing"):
            if not 0 <= getattr(self, key) < 1:
                bad(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.label_noise <= 1:
            bad(f"label_noise must be in [0, 1], got {self.label_noise}")
        if self.full_gradient_clean and self.full_gradient_every == 0:
            bad("full_gradient_clean needs full_gradient_every > 0 (it records at the full-gradient steps)")
        if self.grad_noise == "none" and self.grad_noise_std > 0:
            bad("grad_noise_std > 0 needs grad_noise = 'gaussian' or 'uniform'")
        if self.side_stream and not self.defer_reads:
            bad("side_stream needs defer_reads = true (reading a record within its step waits for it)")
        if self.batch_norm and self.model != "convnet":
            bad("batch_norm is only available for the convnet")
        if self.lipschitz_samples < 1:
            bad(f"lipschitz_samples must be >= 1, got {self.lipschitz_samples}")
        if self.lipschitz_every and self.batch_norm:
            bad(
                "lipschitz_every needs batch_norm = false: the ConvNet's BatchNorm2d keeps no running "
                "statistics, so even in eval mode a sample's output depends on the batch and the network "
                "has no per-sample Lipschitz constant to bound"
            )
        if self.conv_norm_every:
            why = [
                why
                for cond, why in (
                    (self.model != "convnet", f"model = 'convnet' (got {self.model!r}: no Conv2d)"),
                    (self.batch_norm, "batch_norm = false (a sample's loss depends on its batch)"),
                    (self.mixup > 0, "mixup = 0 (a mixed pair has no per-sample loss)"),
                    (self.grad_noise != "none", "grad_noise = 'none' (injected noise is not in the terms)"),
                )
                if cond
            ]
            if why:
                bad("conv_norm_every needs " + "; ".join(why))
        if self.autoaugment:
            try:
                import torchvision  # noqa: F401
            except ImportError:
                bad("autoaugment needs torchvision: pip install lipverify[vision]")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            bad(f"device must be 'cpu' or 'cuda[:index]', got {self.device!r}")
        if device.type not in ("cpu", "cuda"):
            bad(f"device must be 'cpu' or 'cuda[:index]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            bad(f"device {self.device!r} requested but CUDA is not available")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            bad(f"device {self.device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return self


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _parse_value(key: str, text: str, hint: object) -> object:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and text.strip().lower() in ("none", "null", ""):
        return None
    base = next(t for t in options if t is not type(None))
    try:
        if base is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        return base(text)
    except ValueError as exc:
        raise LipverifyError(f"config key {key!r}: cannot parse {text!r} as {base.__name__}") from exc


def _coerce(key: str, value: object, hint: object) -> object:
    if isinstance(value, str):
        return _parse_value(key, value, hint)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    base = next(t for t in options if t is not type(None))
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise LipverifyError(f"config key {key!r}: expected {base.__name__}, got {value!r}")
    return value


def coerce_value(key: str, value: object) -> object:
    """``value`` for the TrainConfig field ``key`` as :func:`load_config` reads it from a TOML file:
    a string is parsed to the field's type, an int is widened for a float field, any other type is
    a :class:`LipverifyError`, as is an unknown ``key``."""
    hints = _field_types()
    if key not in hints:
        raise LipverifyError(f"unknown config key {key!r}; valid keys: {', '.join(hints)}")
    return _coerce(key, value, hints[key])


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file (keys at top level or under ``[train]``, which must be
    a table) and ``key=value`` overrides (parsed to the field's type; ``none`` for optional fields).
    A missing, unreadable (e.g. a directory) or malformed file is a :class:`LipverifyError`. A
    relative ``data_dir`` is kept as written: it is relative to the current directory, not to the
    config file."""
    hints = _field_types()
    valid = ", ".join(hints)
    values: dict[str, object] = {}
    if path is not None:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise LipverifyError(f"config file {path} not found") from exc
        except IsADirectoryError as exc:
            raise LipverifyError(f"config file {path} is a directory; expected a TOML file") from exc
        except OSError as exc:
            raise LipverifyError(f"cannot read config file {path}: {exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise LipverifyError(f"malformed TOML in {path}: {exc}") from exc
        table = doc.get("train", doc)
        if not isinstance(table, dict):
            raise LipverifyError(
                f"'train' in {path} must be a table ([train] followed by key = value lines), "
                f"got {type(table).__name__} {table!r}"
            )
        if "train" in doc:
            extra = set(doc) - {"train"}
            if extra:
                raise LipverifyError(f"unknown top-level key(s) {sorted(extra)} in {path} next to [train]")
        for key, value in table.items():
            if key not in hints:
                raise LipverifyError(f"unknown config key {key!r} in {path}; valid keys: {valid}")
            values[key] = _coerce(key, value, hints[key])
    for item in overrides:
        if "=" not in item:
            raise LipverifyError(f"override {item!r} must have the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in hints:
            raise LipverifyError(f"unknown config key {key!r}; valid keys: {valid}")
        values[key] = _parse_value(key, text, hints[key])
    return TrainConfig(**values).validate()


def step_columns(layers: typing.Sequence[str], clean_drift: bool = False) -> list[str]:
    """Header of ``steps.csv``: step, loss, batch_acc, log_bound, the network terms, the sharpness
    columns (:data:`SHARPNESS_FIELDS`), then per layer
    ``<layer>.<field>`` for :data:`LAYER_FIELDS`. With ``clean_drift`` (the config's
    ``full_gradient_clean``) then :data:`CLEAN_DRIFT_NET_FIELDS` and ``<layer>.mu_full_clean``."""
    cols = ["step", "loss", "batch_acc", "log_bound", *NET_FIELDS, *SHARPNESS_FIELDS]
    for name in layers:
        cols += [f"{name}.{f}" for f in LAYER_FIELDS]
    if clean_drift:
        cols += [*CLEAN_DRIFT_NET_FIELDS, *(f"{name}.{CLEAN_DRIFT_LAYER_FIELD}" for name in layers)]
    return cols


def _versions() -> dict[str, str]:
    import numpy

    from lipverify import __version__

    return {
        "lipverify": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


def _autoaugment(images: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    aug = AutoAugment(AutoAugmentPolicy.CIFAR10)
    if images.shape[1] == 1:
        return torch.stack([aug(img.expand(3, -1, -1))[:1] for img in images])
    return torch.stack([aug(img) for img in images])


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (the sampled indices: drawn on the CPU so CPU and CUDA runs see the same batches)
    on ``device``; to CUDA from pinned memory without blocking (a copy from pageable memory waits for
    the stream, i.e. for the previous step's GPU work)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _check_diverged(row: dict, step: int, lr: float) -> None:
    """Raise when the loss, ``log_bound`` or a layer's sigma of a step's record is inf or NaN."""
    keys = ["loss", "log_bound", *(k for k in row if k.endswith(".sigma"))]
    for key in keys:
        value = row.get(key)
        if value is not None and not math.isfinite(value):
            raise LipverifyError(
                f"training diverged at step {step}: {key} is {value}; try a smaller lr (lr = {lr})"
            )


def _diverged_in_terms(exc: NonFiniteTermError, step: int, lr: float) -> LipverifyError:
    """The divergence error for a non-finite probe term (e.g. psi = lr^2/2 tr(H Sigma) overflows at a
    huge lr before any weight does)."""
    why = str(exc).removesuffix("; check the inputs")
    return LipverifyError(f"training diverged at step {step}: {why}; try a smaller lr (lr = {lr})")


@dataclass
class _PendingStep:
    """What one issued step leaves for its record (:meth:`_Run._finish`): ``pack`` the loss, batch
    accuracy and per-gradient finiteness (then, deferred, the cross-layer diagnostic's squares) as
    floats, or, deferred, as a :class:`~lipverify.probe.deferred.DeferredResults` still to be read;
    the probe's ``terms`` and ``truth`` (possibly deferred); host values read in the step."""

    step: int
    pack: list[float] | DeferredResults | None = None
    cross_in_pack: bool = False
    grad_names: list[str] = field(default_factory=list)
    sharpness: float | None = None
    terms: Mapping | None = None
    sigmas: dict[str, float] | None = None
    mu_full: dict[str, float] | None = None
    mu_full_clean: dict[str, float] | None = None
    truth: Mapping | None = None


class _Run:
    """State of one run (built from the config; restored from a checkpoint on resume)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = c = config
        self.device = torch.device(c.device)
        self.dtype = getattr(torch, c.dtype)
        data: ImageData = load_dataset(c.dataset, c.data_dir).subset(c.train_size)
        if len(data) < c.batch_size:
            raise LipverifyError(f"batch_size {c.batch_size} exceeds the {len(data)} training samples")
        labels = corrupt_labels(
            data.labels, c.label_noise, data.classes, c.seed_sampling + LABEL_NOISE_SEED_OFFSET
        )
        self.data = ImageData(data.name, data.images, labels, data.classes)
        self.images = data.images.to(self.device)
        self.labels = labels.to(self.device)
        self.clean_labels = data.labels.to(self.device)
        in_features = int(math.prod(data.images.shape[1:]))
        self.model = build_model(
            c.model,
            data.classes,
            in_features,
            c.dropout,
            c.batch_norm,
            c.init,
            c.init_scale,
            seed=c.seed_init,
        ).to(self.device, self.dtype)
        self.model.train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=c.lr, momentum=0.0, weight_decay=c.weight_decay
        )
        self.gen = torch.Generator().manual_seed(c.seed_sampling)
        torch.manual_seed(c.seed_sampling + 1)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(c.seed_sampling + 1)
        self.full_gradient_every = full_gradient_period(c, len(self.data))
        schedule = ProbeSchedule(
            {"terms": c.probe_every, "discrete": c.probe_every, "full_gradient": self.full_gradient_every}
        )
        self.probe = DynamicsProbe(
            self.model,
            population_size=len(self.data),
            schedule=schedule,
            cuda_graphs=c.cuda_graphs,
            side_stream=c.side_stream,
        )
        self._pending: _PendingStep | None = None  # defer_reads: the issued step not recorded yet
        self.step = 0
        self.records: list[dict] = []
        self.sharpness_vector: torch.Tensor | None = None
        self.stability_warned = False
        self.lipschitz_records: list[dict] = []
        self.lipschitz_warm: dict[str, torch.Tensor] = {}
        self.conv_norm_records: list[dict] = []
        self.conv_norm_row: dict | None = None  # this step's conv_norm.csv row (conv_norm_every)
        self._conv_grids: dict[str, tuple[int, int]] | None = None

    def autocast(self):
        """The step's autocast region: bfloat16 on the run's device with ``amp = "bf16"``, else none.
        The probe does its own work in full precision whatever region it is called in."""
        if self.config.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- data
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        idx = _to_device(torch.randperm(len(self.data), generator=self.gen)[: c.batch_size], self.device)
        images = self.images[idx]
        if c.autoaugment:
            images = _autoaugment(images.cpu()).to(self.device)
        return to_model_input(images, c.model, self.dtype), self.labels[idx]

    def loss_fn(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target, label_smoothing=self.config.label_smoothing)

    def full_batches(self, labels: torch.Tensor | None = None):
        """Chunks of the whole training set with ``labels`` (default: the run's, corrupted under label
        noise), transformed like a training batch, so that the full-data gradient estimates the
        expected step gradient ``E[g_B | W]`` (the Theorem 14 drift): FGSM inputs, mixed inputs with
        mixed one-hot targets (:meth:`_mixup_as_in_batches`: each sample's lam and partner drawn
        with their law in a training batch, so an unbiased Monte Carlo estimate of the step's
        expected gradient), AutoAugment-ed images (one random policy draw per image).

        Chunks are :data:`FULL_GRADIENT_CHUNK` consecutive samples, except under batch norm: in
        training mode it normalises by the batch's own statistics, so the step gradient depends on
        which b samples share a batch, and ``E[g_B | W]`` is over batches of b. The chunks are then a
        random partition into batches of b, the ``N mod b`` left over left out (each chunk is still a
        uniform b-subset, so their mean is unbiased for ``E[g_B | W]``). Runs inside the probe's
        forked random stream."""
        c = self.config
        labels = self.labels if labels is None else labels
        n = len(self.data)
        if c.batch_norm:
            order = torch.randperm(n).to(self.device)
            chunks = [order[s : s + c.batch_size] for s in range(0, n - c.batch_size + 1, c.batch_size)]
        else:
            chunks = [slice(s, s + FULL_GRADIENT_CHUNK) for s in range(0, n, FULL_GRADIENT_CHUNK)]
        for sl in chunks:
            images = self.images[sl]
            if c.autoaugment:
                images = _autoaugment(images.cpu()).to(self.device)
            x, y = to_model_input(images, c.model, self.dtype), labels[sl]
            if c.fgsm_eps > 0:
                x_req = x.clone().requires_grad_(True)
                (gx,) = torch.autograd.grad(self.loss_fn(self.model(x_req), y), x_req)
                x = (x + c.fgsm_eps * gx.sign()).clamp(0, 1).detach()
            if c.mixup > 0:
                x, y = self._mixup_as_in_batches(x, y)
            yield x, y

    def _mixup_as_in_batches(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup of a chunk of n samples drawn as the training step draws it: the chunk is split into
        random groups of ``batch_size`` samples, and each group gets its own ``lam ~ Beta(a, a)`` and
        its own partner permutation (``torch.randperm(group)``). A sample's (lam, partner) then has
        the law it has in a training batch, including the partner being itself with probability
        1/b (mixing with itself = the clean sample), which one permutation of the whole chunk would
        make 1/n. Targets are the mixed one-hot vectors ``lam e_y + (1 - lam) e_y'``: cross-entropy
        (with label smoothing) is linear in the target, so this is the step's two-term loss
        ``lam CE(out, y) + (1 - lam) CE(out, y')`` sample by sample.

        x: (n, ...), y: (n,) int64 -> x_mixed (n, ...), soft targets (n, classes) in x.dtype."""
        c, n = self.config, x.shape[0]
        order = torch.randperm(n)
        partner = torch.empty(n, dtype=torch.long)
        lam = torch.empty(n, dtype=torch.float64)
        for start in range(0, n, c.batch_size):
            group = order[start : start + c.batch_size]
            partner[group] = group[torch.randperm(group.numel())]
            lam[group] = float(torch.distributions.Beta(c.mixup, c.mixup).sample())
        partner, lam = partner.to(self.device), lam.to(self.device, x.dtype)
        onehot = F.one_hot(y, self.data.classes).to(x.dtype)
        lam_x = lam.reshape(n, *([1] * (x.dim() - 1)))
        return lam_x * x + (1 - lam_x) * x[partner], lam[:, None] * onehot + (1 - lam[:, None]) * onehot[
            partner
        ]

    def sharpness(self) -> float:
        """lambda_max of the Hessian of the loss on the first :data:`SHARPNESS_BATCH` training
        samples at the current weights (:func:`lipverify.sharpness.top_hessian_eigenvalue`, warm
        started from the last eigenvector). Evaluated in eval mode: dropout off and batch norm on
        its running statistics, so the Hessian is a deterministic function of the weights, and no
        random stream or buffer of the run is touched (resume stays bitwise identical)."""
        n = min(SHARPNESS_BATCH, len(self.data))
        x = to_model_input(self.images[:n], self.config.model, self.dtype)
        y = self.labels[:n]
        params = [p for p in self.model.parameters() if p.requires_grad]
        was_training = self.model.training
        self.model.eval()
        try:
            res = top_hessian_eigenvalue(
                lambda: F.cross_entropy(self.model(x), y, label_smoothing=self.config.label_smoothing),
                params,
                v0=self.sharpness_vector,
                max_iterations=SHARPNESS_ITERATIONS,
                tol=SHARPNESS_TOL,
            )
        finally:
            self.model.train(was_training)
        self.sharpness_vector = res.vector
        return res.eigenvalue

    def lipschitz_due(self) -> bool:
        """A Lipschitz record is due at steps 0, k, 2k, ... and at the end (the weights W_t before step t)."""
        k, t = self.config.lipschitz_every, self.step
        if not k or (self.lipschitz_records and self.lipschitz_records[-1]["step"] == t):
            return False
        return t % k == 0 or t == self.config.steps

    def record_lipschitz(self) -> dict:
        """Certified upper bound, K, empirical lower bound and per-layer conv bounds and frequency
        profiles at the current weights (:func:`lipverify.lipschitz.lipschitz_record`) on the first
        ``lipschitz_samples`` training samples; warm-starts the conv power iterations."""
        from lipverify.lipschitz import lipschitz_record

        n = min(self.config.lipschitz_samples, len(self.data))
        x = to_model_input(self.images[:n], self.config.model, self.dtype)
        try:
            row, self.lipschitz_warm = lipschitz_record(self.model, x, self.step, self.lipschitz_warm)
        except LipverifyError as exc:
            raise LipverifyError(f"training diverged at step {self.step}: {exc}") from exc
        self.lipschitz_records.append(row)
        return row

    def conv_grids(self) -> dict[str, tuple[int, int]]:
        """Grid of the circular model of each Conv2d (:func:`lipverify.conv_dynamics.conv_layer_grids`)."""
        if self._conv_grids is None:
            from lipverify.conv_dynamics import conv_layer_grids

            sample = to_model_input(self.images[:1], self.config.model, self.dtype)
            self._conv_grids = conv_layer_grids(self.model, sample)
        return self._conv_grids

    def record_conv_norm(self, x: torch.Tensor, y: torch.Tensor, full: dict | None) -> dict:
        """Theorem 14 terms of each Conv2d's circular-model norm at W_t on the step's batch (x, y)
        (:func:`lipverify.conv_dynamics.conv_norm_record`); ``full``: the probe's full-data gradients
        of this step, if any. Leaves the run's random streams, buffers and gradients untouched."""
        from lipverify.conv_dynamics import conv_norm_record

        c = self.config
        try:
            row = conv_norm_record(
                self.model,
                self.loss_fn,
                x,
                y,
                c.lr,
                self.conv_grids(),
                self.step,
                population_size=len(self.data),
                full_grads=full,
                weight_decay=c.weight_decay,
                grad_scale=c.grad_scale,
            )
        except NonFiniteTermError as exc:
            raise LipverifyError(f"training diverged at step {self.step}: {exc}; try a smaller lr") from exc
        self.conv_norm_records.append(row)
        return row

    def final_conv_norm_row(self) -> dict:
        from lipverify.conv_dynamics import conv_norm_final_row

        row = conv_norm_final_row(self.model, self.conv_grids(), self.step)
        self.conv_norm_records.append(row)
        return row

    # -- one step
    def train_step(self) -> dict:
        """One SGD step with the probe; returns its record, read and checked within the step."""
        return self._finish(self._launch(read_now=True))

    def advance(self) -> list[dict]:
        """``defer_reads``: issue one step and return the records it completes: the previous step's
        (read now, after this step's work is queued), none at the first step. :meth:`flush` returns
        the last one."""
        pending = self._launch(read_now=False)  # if it raises, the previous step stays pending
        previous, self._pending = self._pending, pending
        if previous is None:
            return []
        try:
            return [self._finish(previous)]
        except BaseException:
            self._pending = None  # the run failed at the previous step: no record after it
            raise

    def flush(self) -> list[dict]:
        """The record of the step :meth:`advance` issued last, if it was not returned yet."""
        previous, self._pending = self._pending, None
        return [] if previous is None else [self._finish(previous)]

    def _launch(self, read_now: bool) -> _PendingStep:
        """Issue one step (sampling, forward/backward, the probe, the SGD update). With ``read_now``
        the loss, accuracy and gradient finiteness are read and checked before the probe runs (as a
        step that fails reports it); else everything the record needs stays on the device until
        :meth:`_finish`, packed into one tensor copied to the host without blocking."""
        c, probe, step = self.config, self.probe, self.step
        p = _PendingStep(step=step)
        if c.sharpness_every and step % c.sharpness_every == 0:
            try:
                p.sharpness = self.sharpness()
            except LipverifyError as exc:
                raise LipverifyError(
                    f"training diverged at step {step}: {exc}; try a smaller lr (lr = {c.lr})"
                ) from exc
            sharp = p.sharpness
            if c.lr * sharp >= STABILITY_WARNING and not self.stability_warned:
                self.stability_warned = True
                print(
                    f"lipverify train: warning: lr * lambda_max = {c.lr * sharp:.3g} at step {step} "
                    f"(lambda_max = {sharp:.4g}, lr = {c.lr}): near or past the SGD stability limit 2, "
                    "where the SDE approximation breaks",
                    file=sys.stderr,
                )
        x, y = self.batch()
        if c.fgsm_eps > 0:
            x_req = x.clone().requires_grad_(True)
            with self.autocast():
                adversarial_loss = self.loss_fn(self.model(x_req), y)
            (gx,) = torch.autograd.grad(adversarial_loss, x_req)
            x = (x + c.fgsm_eps * gx.sign()).clamp(0, 1).detach()
        lam, perm = 1.0, None
        if c.mixup > 0:
            lam = float(torch.distributions.Beta(c.mixup, c.mixup).sample())
            perm = _to_device(torch.randperm(x.shape[0]), self.device)
            x = lam * x + (1 - lam) * x[perm]
        due_terms = probe.schedule.due("terms", step)
        due_disc = probe.schedule.due("discrete", step)
        due_full = probe.schedule.due("full_gradient", step)
        if due_disc:
            probe.before_step()
        self.optimizer.zero_grad(set_to_none=True)
        capture = probe.capture() if due_terms else contextlib.nullcontext()
        with capture:
            with self.autocast():
                out = self.model(x)
                loss = self.loss_fn(out, y)
                if perm is not None:
                    loss = lam * loss + (1 - lam) * self.loss_fn(out, y[perm])
            loss.backward()
        grads = [(name, w.grad) for name, w in self.model.named_parameters() if w.grad is not None]
        p.grad_names = [name for name, _ in grads]
        # loss, batch accuracy and each gradient's finiteness: one tensor, one host read
        acc = (out.detach().argmax(1) == y).float().mean()
        finite = [torch.isfinite(g).all() for _, g in grads]
        pack = torch.stack([loss.detach(), acc.to(loss.dtype), *(f.to(loss.dtype) for f in finite)])
        if read_now:
            p.pack = pack.tolist()
            # before the probe divides by a gap or squares a projection of an overflowed gradient
            self._check_loss_pack(p)
        full = full_clean = None
        with self.autocast():  # the full-data gradient of the step's own (autocast) arithmetic
            if due_full:
                full = probe.full_gradient(self.full_batches(), self.loss_fn)
            if due_full and c.full_gradient_clean:
                full_clean = probe.full_gradient(self.full_batches(self.clean_labels), self.loss_fn)
        self.conv_norm_row = None
        if c.conv_norm_every and step % c.conv_norm_every == 0:
            self.conv_norm_row = self.record_conv_norm(x, y, full)
        noise_var = c.grad_noise_std**2 if c.grad_noise != "none" else 0.0
        if due_disc:
            probe.after_backward()
        cross = None
        if due_terms:
            try:
                p.terms = probe.compute(
                    c.lr, grad_scale=c.grad_scale, grad_noise_var=noise_var, weight_decay=c.weight_decay
                )
            except NonFiniteTermError as exc:  # the host route raises here, the device route when read
                raise _diverged_in_terms(exc, step, c.lr) from exc
            tensors = getattr(p.terms, "tensors", {})
            if not read_now and "noise_projections" in tensors:  # device route: the diagnostic's parts
                cross = cross_layer_squares(tensors["noise_projections"], tensors["sigma"])
        else:
            p.sigmas = probe.sigmas()
        if full is not None:
            p.mu_full = probe.drift(full, c.lr, c.grad_scale, c.weight_decay)
        if full_clean is not None:
            # both drifts at the same weights W_t: the Section 8.5 model mu_p = (1 - p) mu_0
            p.mu_full_clean = probe.drift(full_clean, c.lr, c.grad_scale, c.weight_decay)
        # gradient modification (Section 8.4), then the plain SGD step
        with torch.no_grad():
            for w in self.model.parameters():
                if w.grad is None:
                    continue
                if c.grad_scale != 1.0:
                    w.grad.mul_(c.grad_scale)
                if c.grad_noise == "gaussian":
                    w.grad.add_(torch.randn_like(w.grad), alpha=c.grad_noise_std)
                elif c.grad_noise == "uniform":
                    w.grad.add_((torch.rand_like(w.grad) * 2 - 1) * math.sqrt(3.0), alpha=c.grad_noise_std)
        self.optimizer.step()
        if due_disc:
            p.truth = probe.after_step(c.lr, full, c.grad_scale)
        if not read_now:
            parts = [pack.to(torch.float64)] + ([] if cross is None else [cross])
            packed = torch.cat(parts)[None]
            p.pack = DeferredResults(["step"], packed, lambda rows: rows[0])  # copied without blocking
            p.cross_in_pack = cross is not None
        self.step += 1
        return p

    def _check_loss_pack(self, p: _PendingStep) -> None:
        """The step's loss and every gradient finite, else the divergence error naming the first
        non-finite one."""
        c = self.config
        _check_diverged({"loss": p.pack[0]}, p.step, c.lr)
        finite = p.pack[2 : 2 + len(p.grad_names)]
        bad = next((name for name, f in zip(p.grad_names, finite, strict=True) if not f), None)
        if bad is not None:
            raise LipverifyError(
                f"training diverged at step {p.step}: the gradient of {bad} is not finite; "
                f"try a smaller lr (lr = {c.lr})"
            )

    def _finish(self, p: _PendingStep) -> dict:
        """The step's record from what :meth:`_launch` left (read on the host here), checked."""
        c = self.config
        if not isinstance(p.pack, list):  # deferred: one host read, of this step's own copy
            p.pack = p.pack.resolve()
            self._check_loss_pack(p)
        loss_value, acc_value = p.pack[:2]
        row: dict = {"step": p.step, "loss": loss_value, "batch_acc": acc_value}
        if p.sharpness is not None:
            row.update(sharpness=p.sharpness, lr_sharpness=c.lr * p.sharpness)
        if p.terms is not None:
            try:
                terms = list(p.terms.values())  # the device route's deferred terms are read and checked
                if p.cross_in_pack:
                    squares = p.pack[2 + len(p.grad_names) :]
                else:  # one read for both network_terms' cross term and the diagnostic
                    noise = [t.noise_projections for t in terms]
                    squares = cross_layer_squares(noise, [t.sigma for t in terms]).tolist()
                net = network_terms(p.terms, squares[0])
            except NonFiniteTermError as exc:
                raise _diverged_in_terms(exc, p.step, c.lr) from exc
            cross = combine_cross_layer_squares(squares)
            row.update(
                log_bound=net.log_bound,
                net_mu=net.mu,
                net_psi=net.psi,
                net_phi_sq=net.phi_sq,
                net_phi_sq_cross=cross,
            )
            for name, t in p.terms.items():
                for f in ("sigma", "gap", "degenerate", "mu", "psi", "phi"):
                    row[f"{name}.{f}"] = getattr(t, f)
        else:
            row["log_bound"] = sum(math.log(s) for s in p.sigmas.values())
            for name, s in p.sigmas.items():
                row[f"{name}.sigma"] = s
        if p.mu_full is not None:
            for name, mu in p.mu_full.items():
                row[f"{name}.mu_full"] = mu
        if p.mu_full_clean is not None:
            drifts = p.mu_full_clean
            row["net_mu_full"] = sum(row[f"{n}.mu_full"] / row[f"{n}.sigma"] for n in drifts)
            row["net_mu_full_clean"] = sum(mu / row[f"{n}.sigma"] for n, mu in drifts.items())
            for name, mu in drifts.items():
                row[f"{name}.{CLEAN_DRIFT_LAYER_FIELD}"] = mu
        if p.truth is not None:
            for name, d in p.truth.items():
                for k, v in d.items():
                    row[f"{name}.{k}"] = v
        _check_diverged(row, p.step, c.lr)
        return row

    def final_row(self) -> dict:
        sig = self.probe.sigmas()
        row = {"step": self.step, "log_bound": sum(math.log(s) for s in sig.values())}
        row.update({f"{n}.sigma": s for n, s in sig.items()})
        _check_diverged(row, self.step, self.config.lr)
        return row

    # -- checkpoints
    def state(self) -> dict:
        if self._pending is not None:  # its record would be lost from the checkpoint
            raise LipverifyError(f"step {self._pending.step} has no record yet: flush() before state()")
        return {
            "config": asdict(self.config),
            "step": self.step,
            "model": self.model.state_dict(),
            "gen_sampling": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "records": self.records,
            # warm start of the probe's iterative spectrum: a resumed run decomposes identically
            "probe_warm_state": self.probe.warm_state(),
            # warm start of the sharpness power iteration: a resumed run records the same sharpness
            "sharpness_vector": self.sharpness_vector,
            "stability_warned": self.stability_warned,
            "lipschitz_records": self.lipschitz_records,
            "lipschitz_warm": self.lipschitz_warm,
            "conv_norm_records": self.conv_norm_records,
        }

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.gen.set_state(state["gen_sampling"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.records = list(state["records"])
        if state.get("probe_warm_state") is not None:
            self.probe.load_warm_state(state["probe_warm_state"])
        self.sharpness_vector = state.get("sharpness_vector")
        self.stability_warned = bool(state.get("stability_warned", False))
        self.lipschitz_records = list(state.get("lipschitz_records", []))
        self.lipschitz_warm = dict(state.get("lipschitz_warm", {}))
        self.conv_norm_records = list(state.get("conv_norm_records", []))


@contextlib.contextmanager
def _deferred_sigint():
    """While active (main thread, default SIGINT handler only), a first Ctrl-C sets
    ``flag.requested`` so that the training loop stops at the next step boundary, where the state is
    consistent and can be checkpointed; a second Ctrl-C raises KeyboardInterrupt at once."""
    import signal
    import threading

    flag = types.SimpleNamespace(requested=False)
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _thread_counts() -> dict[str, int]:
    """Torch's intra-op and inter-op thread counts: reductions split differently with another
    count, so an exact resume (bitwise-equal records) needs the same ones."""
    return {"intraop": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}


def train(
    config: TrainConfig, out_dir: str | Path, progress: bool = True, *, stop_after: int | None = None
) -> Path:
    """Run (or resume) one training run; returns ``out_dir``.

    Resumes from ``out_dir/checkpoint.pt`` when it holds a checkpoint of the same config (rows of
    ``steps.csv`` written after that checkpoint are dropped and recomputed identically); a
    checkpoint of a different config is an error. ``meta.json`` ``status``: ``"running"``, then
    ``"complete"``, ``"failed"`` (with ``error``), ``"interrupted"`` (KeyboardInterrupt, re-raised;
    ``interrupted_at_step`` and ``checkpoint_step``, the step a resume starts from) or
    ``"stopped"`` (``stop_after`` steps were run in this call without a final checkpoint - the
    behaviour of a killed process, used by tests). ``meta.json`` ``threads`` records torch's
    intra-op/inter-op thread counts; resuming with other counts warns (RuntimeWarning) that the
    records may differ from an uninterrupted run in the last bits.

    The run directory is locked (:func:`lipverify.records.run_dir_lock`) for the whole call: a
    second process training into it gets :class:`lipverify.records.RunDirBusy` before anything is
    read or written. A first Ctrl-C (SIGINT, main thread) finishes the current step and writes a
    checkpoint there; a KeyboardInterrupt raised inside a step keeps the last checkpoint.

    A diverged run fails (:class:`LipverifyError`, status ``"failed"``, records and meta.json
    kept): a step whose loss, ln K or a layer's sigma is inf or NaN ("training diverged at step
    t", with a Theorem 14 term that overflows and the sharpness evaluation). Finite records whose
    Theorem 17 prediction overflows (a tiny sigma_1, a huge lr) are "complete": the summary flags
    the prediction "not applicable" (:func:`lipverify.prediction.summarize_run`).
    """
    from lipverify.records import run_dir_lock

    config = dataclasses.replace(config).validate()
    with run_dir_lock(out_dir) as out:
        return _train_locked(config, out, progress, stop_after)


def _train_locked(config: TrainConfig, out: Path, progress: bool, stop_after: int | None) -> Path:
    import warnings

    from tqdm import tqdm

    ckpt_path, meta_path = out / "checkpoint.pt", out / "meta.json"
    state = None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, weights_only=False)
        except Exception as exc:
            raise LipverifyError(f"cannot read checkpoint {ckpt_path}: {exc}") from exc
        saved = state.get("config")
        if isinstance(saved, dict):  # fields added since that checkpoint was written: their defaults
            saved = {**{k: v for k, v in asdict(TrainConfig()).items() if k not in saved}, **saved}
        if saved != asdict(config):
            diff = sorted(k for k, v in asdict(config).items() if (saved or {}).get(k) != v)
            raise LipverifyError(
                f"{out} holds a checkpoint of a different config (differs in {diff}); "
                "use another output directory"
            )
    started = time.time()
    meta = {
        "config": asdict(config),
        "versions": _versions(),
        "seeds": {"init": config.seed_init, "sampling": config.seed_sampling},
        "device": config.device,
        "threads": _thread_counts(),
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }
    if meta_path.exists() and state is not None:
        old = read_json(meta_path)
        meta["resumed_from_step"] = state["step"]
        meta["started"] = old.get("started", meta["started"])
        before = old.get("threads")
        if before is not None and before != meta["threads"]:
            meta["threads_before_resume"] = before
            warnings.warn(
                f"{out} was trained with torch threads {before} and resumes with {meta['threads']}: "
                "the records may differ from an uninterrupted run in the last bits "
                "(torch.set_num_threads / set_num_interop_threads restore them)",
                RuntimeWarning,
                stacklevel=3,
            )
    write_json(meta_path, meta)
    run = None
    checkpoint_step = None if state is None else state["step"]
    at_step_boundary = False  # the run's state is consistent: a checkpoint may be written
    try:
        run = _Run(config)
        if state is not None:
            run.restore(state)
        meta.update(layers=run.probe.layer_names, train_size=len(run.data), classes=run.data.classes)
        meta["full_gradient_every"] = run.full_gradient_every  # the resolved period (0 = off)
        write_json(meta_path, meta)
        columns = step_columns(run.probe.layer_names, config.full_gradient_clean)
        lip_log = contextlib.nullcontext()
        if config.lipschitz_every:
            from lipverify.conv import RADIAL_BINS
            from lipverify.lipschitz import lipschitz_columns

            lip_columns = lipschitz_columns(run.model, RADIAL_BINS)
            lip_log = StepLog(out / LIPSCHITZ_FILE, lip_columns, run.lipschitz_records)
        cn_log = contextlib.nullcontext()
        if config.conv_norm_every:
            from lipverify.conv_dynamics import CONV_NORM_FILE, conv_norm_columns

            cn_log = StepLog(out / CONV_NORM_FILE, conv_norm_columns(run.conv_grids()), run.conv_norm_records)
        with (
            lip_log as lip_log,
            cn_log as cn_log,
            StepLog(out / "steps.csv", columns, run.records) as log,
            tqdm(
                total=config.steps, initial=run.step, disable=not progress, desc="train", unit="step"
            ) as bar,
            _deferred_sigint() as sigint,
        ):
            done_here = 0
            at_step_boundary = True

            def record(rows: list[dict]) -> None:
                for row in rows:
                    run.records.append(row)
                    log.append(row)

            while run.step < config.steps:
                if sigint.requested:
                    record(run.flush())  # defer_reads: the last issued step's record
                    raise KeyboardInterrupt
                if stop_after is not None and done_here >= stop_after:
                    record(run.flush())
                    meta["status"] = "stopped"
                    meta["stopped_at_step"] = run.step
                    write_json(meta_path, meta)
                    return out
                if run.lipschitz_due():
                    lip_log.append(run.record_lipschitz())
                at_step_boundary = False
                # defer_reads: the previous step's record (none at the first), read after this step
                try:
                    rows = run.advance() if config.defer_reads else [run.train_step()]
                except Exception:
                    record(run.flush())  # the previous step's record first (its own error wins)
                    raise
                record(rows)
                if run.conv_norm_row is not None:
                    cn_log.append(run.conv_norm_row)
                at_step_boundary = True
                done_here += 1
                bar.update(1)
                if rows:
                    bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", lnK=f"{rows[-1]['log_bound']:.3f}")
                if (
                    config.checkpoint_every
                    and run.step % config.checkpoint_every == 0
                    and run.step < config.steps
                ):
                    record(run.flush())  # a checkpoint holds every record up to its step
                    atomic_torch_save(ckpt_path, run.state())
                    checkpoint_step = run.step
            at_step_boundary = False  # a Ctrl-C during the last step lets the run finish
            record(run.flush())
            if run.lipschitz_due():
                lip_log.append(run.record_lipschitz())
            if not run.records or run.records[-1].get("loss") is not None:
                final = run.final_row()
                run.records.append(final)
                log.append(final)
                if config.conv_norm_every:
                    cn_log.append(run.final_conv_norm_row())
            atomic_torch_save(ckpt_path, run.state())
        # a non-finite observed K is a divergence; an overflowed prediction is a verdict, not an error
        check_prediction(out)
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
        if run is not None and at_step_boundary and run.step != checkpoint_step:
            try:
                run.records.extend(run.flush())  # steps.csv is rewritten from them on resume
                atomic_torch_save(ckpt_path, run.state())
                checkpoint_step = run.step
            except Exception as exc:  # the last checkpoint is kept; resuming starts from it
                meta["checkpoint_error"] = f"{type(exc).__name__}: {exc}"
        meta["interrupted_at_step"] = None if run is None else run.step
        meta["checkpoint_step"] = checkpoint_step
        write_json(meta_path, meta)
        raise
    except BaseException as exc:
        meta["status"] = "failed"
        meta["error"] = f"{type(exc).__name__}: {exc}"
        write_json(meta_path, meta)
        raise
    meta["status"] = "complete"
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["wall_seconds"] = time.time() - started
    write_json(meta_path, meta)
    return out
