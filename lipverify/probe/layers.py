"""Layer discovery of the dynamics probe: which modules are probed, their weight in the matrix view of
MATH section 0 (a Conv2d weight ``(out, in, kh, kw)`` is the ``(out, in*kh*kw)`` matrix), and the
per-sample weight copies of the reference definition of ``G_i`` (see :mod:`lipverify.probe`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lipverify._validation import LipverifyError

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return (pads[0], pads[1])
    return tuple(module.padding)


def find_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, tuple[nn.Module, str]]:
    """The probed layers ``name -> (module, kind)``; raises listing every unsupported module.
    ``skip``: module names left out together with everything inside them; a name that is not a
    module of ``model`` is an error."""
    from torch.nn.utils import parametrize

    skip = set(skip)
    # a skipped module's descendants are skipped too ("block" covers "block.0", "block.1.fc")
    skipped_prefixes = tuple(f"{s}." for s in skip if s)
    layers: dict[str, tuple[nn.Module, str]] = {}
    problems: list[str] = []
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if name in skip or name.startswith(skipped_prefixes):
            continue
        own = [p for p in module.parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            problems.append(f"{name} ({type(module).__name__}: parametrised weights)")
            continue
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, nn.Conv2d):
            kind = "conv"
            if module.groups != 1:
                problems.append(f"{name} (Conv2d with groups={module.groups})")
                continue
            if module.padding_mode != "zeros":
                problems.append(f"{name} (Conv2d with padding_mode={module.padding_mode!r})")
                continue
            if _conv_padding(module) is None:
                problems.append(f"{name} (Conv2d with asymmetric 'same' padding)")
                continue
        elif isinstance(module, _NORM_TYPES) or not own:
            continue
        else:
            problems.append(f"{name} ({type(module).__name__})")
            continue
        base = nn.Linear if kind == "linear" else nn.Conv2d
        overridden = [
            f
            for f in ("forward", "_conv_forward")
            if getattr(type(module), f, None) is not getattr(base, f, None)
        ]
        if overridden:  # G_i = delta_i a_i^T holds only for the stock forward
            problems.append(f"{name} ({type(module).__name__} overrides {', '.join(overridden)})")
            continue
        if not isinstance(module.weight, nn.Parameter):
            problems.append(
                f"{name} ({type(module).__name__}: weight is computed, not a Parameter, e.g. by the hooks of "
                "torch.nn.utils.weight_norm/spectral_norm)"
            )
            continue
        if not module.weight.requires_grad:
            problems.append(f"{name} ({type(module).__name__}: frozen weight, requires_grad=False)")
            continue
        key = id(module.weight)
        if key in owners:
            problems.append(f"{name} (weight shared with {owners[key]})")
            continue
        owners[key] = name
        layers[name] = (module, kind)
    unknown = skip - {n for n, _ in model.named_modules()}
    if unknown:
        raise LipverifyError(f"skip names unknown modules: {', '.join(sorted(unknown))}")
    if problems:
        raise LipverifyError(
            "unsupported layers for the dynamics probe (supported: nn.Linear, nn.Conv2d with groups=1 and "
            "zero padding, with their own forward and unshared, unparametrised, trainable weights): "
            + "; ".join(problems)
            + ". Pass their names in skip=[...] to leave them out of the bound (a frozen layer's sigma_1 is "
            "a constant factor of K)."
        )
    if not layers:
        raise LipverifyError("the model has no nn.Linear or nn.Conv2d layer to probe")
    return layers


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight in the matrix view of MATH section 0: (out, in) or (out, in*kh*kw), detached."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


@contextlib.contextmanager
def _per_sample_weights(layers: Mapping[str, tuple[nn.Module, str]], copies: Mapping[str, torch.Tensor]):
    """Temporarily make each layer use weight ``copies[name][i]`` for sample i."""
    for name, (module, kind) in layers.items():
        Wc = copies[name]
        if kind == "linear":

            def fwd(a, module=module, Wc=Wc):
                out = torch.einsum("b...n,bmn->b...m", a, Wc)
                return out if module.bias is None else out + module.bias

        else:
            padding = _conv_padding(module)

            def fwd(a, module=module, Wc=Wc, padding=padding):
                def one(ai, wi):
                    return F.conv2d(ai[None], wi, module.bias, module.stride, padding, module.dilation)[0]

                return torch.func.vmap(one)(a, Wc)

        module.forward = fwd
    try:
        yield
    finally:
        for module, _ in layers.values():
            del module.forward  # back to the class method
