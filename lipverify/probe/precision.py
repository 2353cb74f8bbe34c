"""Mixed precision around the dynamics probe: autocast and TF32 off inside the probe's own work, and
the scale of a ``torch.amp.GradScaler`` taken out of the hooked gradients (skipped steps skipped).

Why. The probe's contractions run in ``projection_dtype`` (float32 for a float32 or lower-precision
model) and its spectral parts in ``compute_dtype``. Inside a user's ``torch.autocast`` region torch
would silently run those float32 matmuls/convolutions in bfloat16/float16 (relative error ~4e-3
instead of ~6e-8; float64 is never autocast, but the float32 projections feed it), and the grouped
``conv2d_weight`` of the ConvNet projection receives mixed dtypes and fails. TF32 (CUDA matmul, cuDNN
convolutions, on by default for cuDNN) and oneDNN's bf16 float32 mode do the same outside autocast.
:func:`full_precision` switches all of them off for the probe's work and restores the caller's
settings on exit; hooked activations and output gradients (bfloat16/float16 under autocast) are cast
up explicitly to the projection dtype by the probe (:meth:`DynamicsProbe._projections`).

GradScaler. ``scaler.scale(loss).backward()`` makes every hooked output gradient ``S delta`` and
every ``.grad`` ``S g`` (S = the scaler's current scale), so unscaled per-sample projections would
give mu, phi S times and psi S^2 times too large. :class:`GradScalerLink` divides them by the S of the
captured backward and decides, like the scaler, whether the step is skipped (an inf/NaN in a
gradient of the optimiser's parameters). It relies on these ``torch.amp.GradScaler`` internals
(torch/amp/grad_scaler.py, torch 2.x), each with a fallback:

* ``scaler._scale``: the 0-d float32 scale tensor on the gradients' device, the value
  ``scaler.scale()`` multiplied the loss with until ``scaler.update()``. Read (and cloned) without a
  host synchronisation; fallback ``scaler.get_scale()`` (one synchronisation) when it is missing.
* ``scaler._per_optimizer_states[id(optimizer)]``: ``"stage"`` (``OptState.UNSCALED`` after
  ``scaler.unscale_(optimizer)``: the ``.grad`` are already divided by S) and
  ``"found_inf_per_device"`` (device -> 0-d tensor, > 0 when a gradient was inf/NaN), which
  ``scaler.step`` sums to decide the skip. Read with ``.get`` (the defaultdict is not written).
  When ``unscale_`` has not run yet (the usual order: the probe's ``compute`` before
  ``scaler.step``), the probe evaluates the same criterion itself on the optimiser's gradients.
* That ``scaler.step`` skips by not calling ``optimizer.step()``: a step post-hook on the optimiser
  (public ``Optimizer.register_step_post_hook``) tells :meth:`DynamicsProbe.after_step` whether the
  weights moved.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from lipverify._validation import LipverifyError

#: (backend, operation) of torch's per-operation float32 precision settings (new API, torch 2.9+);
#: the CUDA ones are touched only where CUDA is available
_FP32_SETTINGS = {
    "cpu": (("mkldnn", "matmul"), ("mkldnn", "conv")),
    "cuda": (("cuda", "matmul"), ("cuda", "conv")),  # cuBLAS, cuDNN convolutions
}
_get_fp32 = getattr(torch._C, "_get_fp32_precision_getter", None)
_set_fp32 = getattr(torch._C, "_set_fp32_precision_setter", None)
_devices: list[str] = []  # autocast device types of this process: "cpu" (+ "cuda"), found on first use
_nesting = threading.local()


def _autocast_devices() -> list[str]:
    if not _devices:
        _devices.append("cpu")
        if torch.cuda.is_available():
            _devices.append("cuda")
    return _devices


def _fp32_settings() -> list[tuple[str, str]]:
    if _get_fp32 is None or _set_fp32 is None:  # torch before the per-operation API
        return []
    return [pair for device in _autocast_devices() for pair in _FP32_SETTINGS[device]]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off (CPU, and CUDA where available) and float32 kept in float32 for the block: oneDNN
    without its bf16/TF32 float32 modes and, where CUDA is available, cuBLAS and cuDNN without TF32.
    The caller's settings are restored on exit, in both of torch's APIs
    (``torch.set_float32_matmul_precision`` / ``torch.backends.cudnn.allow_tf32`` and the
    per-operation ``fp32_precision``: torch 2.9+ refuses to read a state mixed from the two, so both
    are written consistently and restored verbatim). Re-entrant: a nested block (``compute`` calling
    ``decomposition_of``) costs a counter, not the ~20 us of reading and writing the settings."""
    depth = getattr(_nesting, "depth", 0)
    if depth:
        _nesting.depth = depth + 1
        try:
            yield
        finally:
            _nesting.depth -= 1
        return
    devices = _autocast_devices()
    cuda = "cuda" in devices
    with contextlib.ExitStack() as stack:
        for device_type in devices:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        try:
            legacy_matmul = torch.get_float32_matmul_precision()
        except RuntimeError:  # the caller mixed the two APIs: only the per-operation one is readable
            legacy_matmul = None
        legacy_cudnn = None
        if cuda:
            try:
                legacy_cudnn = torch.backends.cudnn.allow_tf32
            except RuntimeError:
                pass
        settings = _fp32_settings()
        saved = [_get_fp32(*pair) for pair in settings]
        _nesting.depth = 1
        try:
            if legacy_matmul not in (None, "highest"):
                torch.set_float32_matmul_precision("highest")
            if legacy_cudnn:
                torch.backends.cudnn.allow_tf32 = False
            for pair in settings:  # also over "none", which inherits a backend-wide setting
                _set_fp32(*pair, "ieee")
            yield
        finally:
            _nesting.depth = 0
            if legacy_matmul not in (None, "highest"):
                torch.set_float32_matmul_precision(legacy_matmul)
            if legacy_cudnn:
                torch.backends.cudnn.allow_tf32 = True
            for pair, value in zip(settings, saved, strict=True):
                _set_fp32(*pair, value)  # verbatim: the legacy setters above may have rewritten it


def current_scale(scaler) -> torch.Tensor | None:
    """The GradScaler's current scale S as a 0-d tensor (a clone of ``scaler._scale``, no host
    synchronisation), or None when the scaler is disabled or has not scaled anything yet."""
    if not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().clone()
    if scale is None and hasattr(scaler, "_scale"):
        return None  # lazily initialised by the first scaler.scale(): nothing was scaled
    return torch.tensor(float(scaler.get_scale()), dtype=torch.float32)  # other scaler versions


class GradScalerLink:
    """The probe's view of a ``torch.amp.GradScaler`` driving ``optimizer`` (see the module docstring
    for the internals it reads).

    ``record_scale()`` (end of the capture): S of the captured backward. ``unscale(t)``: ``t / S``
    (exact: S is a power of two) in at least float32. ``found_inf()``: 0-d bool tensor, the scaler's
    skip criterion for this step. ``optimizer_stepped``: whether ``optimizer.step()`` ran since
    ``begin_step()``.
    """

    def __init__(self, scaler, optimizer: torch.optim.Optimizer) -> None:
        if not (hasattr(scaler, "scale") and hasattr(scaler, "is_enabled") and hasattr(scaler, "step")):
            raise LipverifyError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise LipverifyError(
                "use_grad_scaler needs the optimizer the scaler steps (its skipped steps are per "
                f"optimizer), got {type(optimizer).__name__}"
            )
        self.scaler = scaler
        self.optimizer = optimizer
        self.scale: torch.Tensor | None = None
        self.optimizer_stepped = False
        self.skipped_steps = 0
        self._handle = optimizer.register_step_post_hook(self._on_step)

    def _on_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_stepped = True

    def close(self) -> None:
        self._handle.remove()

    def begin_step(self) -> None:
        self.optimizer_stepped = False

    def record_scale(self) -> None:
        self.scale = current_scale(self.scaler)

    def unscale(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t / S`` with the S of the captured backward (``t`` unchanged without one)."""
        if t is None or self.scale is None:
            return t
        dt = torch.promote_types(t.dtype, torch.float32)
        return t.to(dt) / self.scale.to(device=t.device, dtype=dt)

    def grads_unscaled(self) -> bool:
        """Whether ``scaler.unscale_(optimizer)`` already divided the ``.grad`` by S this step."""
        from torch.amp.grad_scaler import OptState

        state = getattr(self.scaler, "_per_optimizer_states", {}).get(id(self.optimizer))
        return state is not None and state.get("stage") is not OptState.READY

    def found_inf(self) -> torch.Tensor:
        """0-d bool tensor: the scaler will skip (or skipped) this step. The scaler's own
        ``found_inf_per_device`` once ``unscale_`` ran, else the same criterion (an inf/NaN in any
        ``.grad`` of the optimiser's parameters) evaluated here; no host synchronisation."""
        if not self.scaler.is_enabled():
            return torch.zeros((), dtype=torch.bool)
        state = getattr(self.scaler, "_per_optimizer_states", {}).get(id(self.optimizer))
        flags = list(state.get("found_inf_per_device", {}).values()) if state else []
        if flags:
            device = flags[0].device
            return torch.stack([f.to(device) > 0 for f in flags]).any()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool)
        device = grads[0].device
        return torch.stack([~torch.isfinite(g).all().to(device) for g in grads]).any()
