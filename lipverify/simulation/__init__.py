"""Monte Carlo validations of Theorems 14–17, Lemma 19 and Proposition 21 (MATH §3–§5, §8).

One module per case; the shared result types are in :mod:`lipverify.simulation.results`:

* :mod:`~lipverify.simulation.lognormal_bound`: ``lognormal`` (Theorems 15/17, Lemma 19, orders)
* :mod:`~lipverify.simulation.ornstein_uhlenbeck`: ``ou``
* :mod:`~lipverify.simulation.matrix_layer`: ``matrix_sde`` (Theorem 14) and the pathwise machinery
* :mod:`~lipverify.simulation.two_layer_net`: ``two_layer`` (Theorems 15/16)
* :mod:`~lipverify.simulation.sgd_vs_sde`: ``discrete_sgd`` (real SGD against the SGD-SDE)
* :mod:`~lipverify.simulation.batch_scaling`: ``batch_size_scaling`` (Proposition 21)
* :mod:`~lipverify.simulation.torchsde_reference`: ``torchsde_comparison``

The tests, the ``monte_carlo`` checks (:mod:`lipverify.checks.simulation`) and
``lipverify simulate`` all call these functions; see :mod:`~lipverify.simulation.results` for
the acceptance rule of a row and the pass / fail / inconclusive verdict.
"""

from __future__ import annotations

from collections.abc import Callable

from lipverify.simulation.batch_scaling import batch_size_scaling, matrix_batch_size_scaling
from lipverify.simulation.lognormal_bound import lognormal, lognormal_moments, strong_weak_orders
from lipverify.simulation.matrix_layer import default_problem, matrix_sde, well_gapped
from lipverify.simulation.ornstein_uhlenbeck import ou
from lipverify.simulation.results import Row, ValidationResult, Z
from lipverify.simulation.sgd_vs_sde import discrete_sgd, sgd_runs, sgd_runs_two_layer
from lipverify.simulation.torchsde_reference import (
    _torchsde_wrappers,
    require_torchsde,
    torchsde_comparison,
    torchsde_solve,
)
from lipverify.simulation.two_layer_net import two_layer

#: CLI case name -> validation function (``lipverify simulate CASE``).
CASES: dict[str, Callable[..., ValidationResult]] = {
    "lognormal": lognormal,
    "ou": ou,
    "matrix_sde": matrix_sde,
    "two_layer": two_layer,
    "discrete_sgd": discrete_sgd,
    "batch_size": batch_size_scaling,
    "torchsde": torchsde_comparison,
}

# _torchsde_wrappers: used by benchmarks/bench_sde.py
__all__ = [
    "CASES",
    "Row",
    "ValidationResult",
    "Z",
    "_torchsde_wrappers",
    "batch_size_scaling",
    "default_problem",
    "discrete_sgd",
    "lognormal",
    "lognormal_moments",
    "matrix_batch_size_scaling",
    "matrix_sde",
    "ou",
    "require_torchsde",
    "sgd_runs",
    "sgd_runs_two_layer",
    "strong_weak_orders",
    "torchsde_comparison",
    "torchsde_solve",
    "two_layer",
    "well_gapped",
]
