"""The configuration check shared by the framework tests that re-run or linearise plain SGD."""

from __future__ import annotations

from typing import Any

from lipverify._validation import LipverifyError

#: TrainConfig fields that change the step away from plain (mini-batch, cross-entropy) SGD.
REGULARISERS = (
    "dropout",
    "batch_norm",
    "mixup",
    "fgsm_eps",
    "autoaugment",
    "grad_noise_std",
    "label_smoothing",
)


def require_plain_sgd(config: Any, test: str, also: tuple[str, ...] = ()) -> None:
    """Raise :class:`LipverifyError` naming every field of ``config`` (a validated TrainConfig) among
    :data:`REGULARISERS` and ``also`` that is set: ``test``'s model of the step would not be the
    step the run takes."""
    bad = [key for key in (*REGULARISERS, *also) if getattr(config, key)]
    if getattr(config, "amp", "none") != "none":  # the model of the step is float32 arithmetic
        bad.append("amp")
    if bad:
        raise LipverifyError(f"the {test} supports plain SGD only; unset {', '.join(bad)}")
