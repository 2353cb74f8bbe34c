"""Section 8 implications of arXiv 2506.18588 as pass/fail claims on a sweep's runs (issues 6, 13).

``report_sweep(sweep_dir)`` reads a sweep directory (see :mod:`lipverify.sweep`), summarises every
complete run, evaluates the sweep's claim, draws its figure (PNG) and writes ``claims.md`` and
``claims.json``. The rules are pure functions of run records (:mod:`lipverify.claims.records`).

Every :class:`ClaimResult` row is either ``kind="paper"`` (it tests a sentence of the paper, quoted
in ``paper_quote``) or ``kind="framework"`` (ours: a stronger test of the theory than the paper
states, quoting the derivation step it rests on), with the measured numbers, their uncertainty, the
rule and a verdict ``pass`` / ``fail`` / ``inconclusive``. Thresholds come from the stated
uncertainty (Tracy-Widom scale, seed spread, chi-square and t intervals) or, where the paper's words
are qualitative ("one order smaller", "non-negligible", "negligible"), from a reading stated with
its reason in the rule; never from the outcome.

Layout: :mod:`.stats` (shared statistics), :mod:`.records` (record loading), one module per paper
claim (:mod:`.init` 8.2, :mod:`.near_convergence` 8.3, :mod:`.noisy_gradient` 8.4,
:mod:`.label_noise` 8.5, :mod:`.batch_size` 8.6, :mod:`.trajectories` 8.7; each holds its rule,
numbers and figure), one module per framework test (``framework_*``), :mod:`.dispatch` (which
rules belong to a sweep claim) and :mod:`.report` (Markdown, report_sweep, collect_results).
"""

from lipverify.claims.batch_size import evaluate_batch_size
from lipverify.claims.dispatch import EVALUATORS, PLOTTERS, RULES, evaluate
from lipverify.claims.framework_label_drift import evaluate_label_drift, initial_drift
from lipverify.claims.framework_noise_growth import evaluate_noise_growth
from lipverify.claims.framework_spread_magnitude import evaluate_spread_magnitude
from lipverify.claims.framework_trajectory_spread import evaluate_trajectory_spread
from lipverify.claims.init import evaluate_init, init_std, mp_edge, tw_relative_scale
from lipverify.claims.label_noise import evaluate_label_noise
from lipverify.claims.near_convergence import LOG10_RATIO_BAND, SHARE_MIN, evaluate_near_convergence
from lipverify.claims.noisy_gradient import evaluate_noisy_gradient
from lipverify.claims.records import layer_shapes, load_records, predicted_path, read_steps_csv
from lipverify.claims.report import collect_results, render_markdown, report_sweep
from lipverify.claims.result import FRAMEWORK, PAPER, ClaimResult
from lipverify.claims.stats import (
    ALPHA,
    TW1_MEAN,
    TW1_STD,
    adjacent_reversals,
    chi2_std_bounds_one_sided,
    chi2_std_interval,
    fit_log_slope,
    group_by,
    level_stats,
    spearman,
    t_interval,
)
from lipverify.claims.trajectories import NEGLIGIBLE_FRACTION, evaluate_trajectories, trajectory_spread

__all__ = [
    "ALPHA",
    "EVALUATORS",
    "FRAMEWORK",
    "LOG10_RATIO_BAND",
    "NEGLIGIBLE_FRACTION",
    "PAPER",
    "PLOTTERS",
    "RULES",
    "SHARE_MIN",
    "TW1_MEAN",
    "TW1_STD",
    "ClaimResult",
    "adjacent_reversals",
    "chi2_std_bounds_one_sided",
    "chi2_std_interval",
    "collect_results",
    "evaluate",
    "evaluate_batch_size",
    "evaluate_init",
    "evaluate_label_drift",
    "evaluate_label_noise",
    "evaluate_near_convergence",
    "evaluate_noise_growth",
    "evaluate_noisy_gradient",
    "evaluate_spread_magnitude",
    "evaluate_trajectories",
    "evaluate_trajectory_spread",
    "fit_log_slope",
    "group_by",
    "init_std",
    "initial_drift",
    "layer_shapes",
    "level_stats",
    "load_records",
    "mp_edge",
    "predicted_path",
    "read_steps_csv",
    "render_markdown",
    "report_sweep",
    "spearman",
    "t_interval",
    "trajectory_spread",
    "tw_relative_scale",
]
