"""Framework tests beyond the paper (lipverify issue 13): checks of the SDE framework itself on real
models, not of the paper's stated results.

- :func:`one_step_check` / :func:`one_step_at`: at fixed weights, many one-step SGD increments of
  ln sigma_1 and ln K against Theorems 14/15's per-step mean and variance.
- :func:`cross_layer_along_run`: the cross-layer noise that Assumption 3 drops, along a recorded run.
- :func:`label_noise_model`: Section 8.5's ``mu_p = (1 - p) mu_0`` at the same weights along training,
  and label-noise runs against grad_scale = 1 - p runs and the clean run at step (1 - p)T.
- :func:`mean_reversion`: feedback of the drift on noise kicks across many sampling seeds (the spread
  against Theorem 17's sqrt(Phi_t), the reversion slope, kick-drift lag correlations, lr -> 0).
- :func:`linear_response`: Theorem 17, reduced (per-layer ln sigma_1) and full-parameter adjoint
  linear-response predictions of std ln K_t; :func:`compare_with_seeds` against many sampling seeds.
"""

from lipverify.framework.assumption3 import cross_layer_along_run
from lipverify.framework.label_noise_model import label_noise_model, label_noise_model_records
from lipverify.framework.linear_response import (
    LinearResponseResult,
    compare_with_seeds,
    linear_response,
    propagate_covariance,
)
from lipverify.framework.mean_reversion import MeanReversionResult, SeedPanel, mean_reversion
from lipverify.framework.one_step import OneStepResult, Row, one_step_at, one_step_check

__all__ = [
    "LinearResponseResult",
    "MeanReversionResult",
    "OneStepResult",
    "Row",
    "SeedPanel",
    "compare_with_seeds",
    "cross_layer_along_run",
    "label_noise_model",
    "label_noise_model_records",
    "linear_response",
    "mean_reversion",
    "one_step_at",
    "one_step_check",
    "propagate_covariance",
]
