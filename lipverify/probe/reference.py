"""Slow references of the dynamics probe: materialised per-sample gradients (``torch.func`` vmap of
``grad(l_i)``, or per-sample weight copies with one autograd pass) and the Theorem 14 terms from them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lipverify._validation import LipverifyError, check_batch_size
from lipverify.dynamics import LayerTerms, layer_terms
from lipverify.probe.layers import _per_sample_weights, find_layers, weight_matrix


def reference_per_sample_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mode: str = "vmap",
    skip: Iterable[str] = (),
    reduction: str | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``grad l_i`` of every probed layer, (b, m, n) matrices (reference).

    ``mode="vmap"``: ``torch.func.vmap(grad(l_i))`` over ``functional_call`` with one sample at a
    time (no interactions between samples; dropout must be off). ``mode="copy"``: each layer gets b
    weight copies ``W_i = W`` that only sample i uses; one autograd pass of the batch loss gives
    ``G_i = b dL/dW_i`` (mean reduction) - the probe's definition with batch norm, and with dropout
    when the RNG state is the same as in the probe's forward pass. Costs O(b d) memory.
    """
    layers = find_layers(model, skip)
    b = inputs.shape[0]
    check_batch_size(b)
    if mode == "vmap":
        params = {k: p.detach() for k, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        names = {name: f"{name}.weight" for name in layers}

        def loss_one(p, x, t):
            out = torch.func.functional_call(model, (p, buffers), (x[None],))
            return loss_fn(out, t[None])

        try:
            grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0), randomness="error")(
                params, inputs, targets
            )
        except RuntimeError as exc:
            if "randomness" not in str(exc):
                raise
            raise LipverifyError(
                "mode='vmap' cannot replay random layers (dropout in training mode); use mode='copy' "
                "with the RNG state of the probe's forward pass"
            ) from exc
        return {name: grads[key].reshape(b, grads[key].shape[1], -1) for name, key in names.items()}
    if mode != "copy":
        raise LipverifyError(f"mode must be 'vmap' or 'copy', got {mode!r}")
    copies = {
        name: module.weight.detach().unsqueeze(0).expand(b, *module.weight.shape).clone().requires_grad_(True)
        for name, (module, _) in layers.items()
    }
    with _per_sample_weights(layers, copies):
        loss = loss_fn(model(inputs), targets)
    red = reduction or getattr(loss_fn, "reduction", "mean")
    if loss.ndim > 0:
        loss, red = loss.mean(), "mean"
    grads = torch.autograd.grad(loss, list(copies.values()))
    factor = b if red == "mean" else 1
    return {name: (g * factor).reshape(b, g.shape[1], -1) for name, g in zip(copies, grads, strict=True)}


def reference_layer_terms(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lr: float,
    mode: str = "vmap",
    skip: Iterable[str] = (),
    population_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LayerTerms]:
    """Theorem 14 terms from materialised per-sample gradients fed to
    :func:`lipverify.dynamics.layer_terms` (the slow reference of the probe)."""
    grads = reference_per_sample_gradients(model, inputs, targets, loss_fn, mode, skip)
    layers = find_layers(model, skip)
    return {
        name: layer_terms(
            weight_matrix(module).to(dtype), grads[name].to(dtype), lr, population_size=population_size
        )
        for name, (module, _) in layers.items()
    }
