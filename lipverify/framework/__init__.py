"""Framework tests beyond the paper (lipverify issue 13): checks of the SDE framework itself on real
models, not of the paper's stated results.

- :func:`one_step_check` / :func:`one_step_at`: at fixed weights, many one-step SGD increments of
  ln sigma_1 and ln K against Theorems 14/15's per-step mean and variance.
- :func:`cross_layer_along_run`: the cross-layer noise that Assumption 3 drops, along a recorded run.
- :func:`label_noise_model`: Section 8.5's ``mu_p = (1 - p) mu_0`` at the same weights along training,
  and label-noise runs against grad_scale = 1 - p runs and the clean run at step (1 - p)T.
"""

from lipverify.framework.assumption3 import cross_layer_along_run
from lipverify.framework.label_noise_model import label_noise_model, label_noise_model_records
from lipverify.framework.one_step import OneStepResult, Row, one_step_at, one_step_check

__all__ = [
    "OneStepResult",
    "Row",
    "cross_layer_along_run",
    "label_noise_model",
    "label_noise_model_records",
    "one_step_at",
    "one_step_check",
]
