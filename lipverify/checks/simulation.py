"""Monte Carlo checks (kind ``monte_carlo``) of Theorems 14–17, Lemma 19 and Proposition 21.

Each check runs a validation of :mod:`lipverify.simulation` (fixed seeds) and turns its rows
into a :class:`~lipverify.verification.Comparison`: the error is the largest normalised
deviation ``|MC - predicted| / (z se + bias)`` of the correct rows (tolerance 1), the wrong
error the smallest one of the wrong-variant rows (must exceed 1). Validations shared by several
checks are computed once per process. The batched kernels are tiny, so each check runs with one
intra-op thread (restored afterwards); on a busy machine this is several times faster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager

import torch

from lipverify import simulation as sim
from lipverify.verification import Comparison, register


@contextmanager
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.cache
def _run(name: str, **kwargs) -> sim.ValidationResult:
    with single_thread():
        return getattr(sim, name)(**kwargs)


def _compare(name: str, prefix: str, **kwargs) -> Comparison:
    return _run(name, **tuple_free(kwargs)).comparison(prefix)


def tuple_free(kwargs: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _check(result: str, statement: str, exhaustive: bool = False) -> Callable:
    return register(result, "monte_carlo", statement, exhaustive=exhaustive)


# Theorem 14 ------------------------------------------------------------------------------------


@_check("Theorem 14", "E[sigma_T] - sigma_0 = E[int (mu + psi) dt] on the matrix SGD-SDE")
def theorem14_mean() -> Comparison:
    """matrix SGD-SDE: E[sigma_T] - sigma_0 vs E[int(mu+psi)] (wrong: no psi)"""
    return _compare("matrix_sde", "Thm 14 E")


@_check("Theorem 14", "pathwise Itô residual of sigma_1 -> 0 as dt -> 0 (E[R^2] extrapolated to 0)")
def theorem14_pathwise() -> Comparison:
    """matrix SGD-SDE: pathwise residual sigma_T - sigma_0 - sum(mu+psi)dt - sum J^T D dB -> 0"""
    return _compare("matrix_sde", "Thm 14 pathwise")


@_check("Theorem 14", "Theorem 14 mean and pathwise, 4000 paths, 5 nested levels", exhaustive=True)
def theorem14_precise() -> Comparison:
    """matrix SGD-SDE, high precision (4000 paths, dt down to 1/16 step)"""
    return _compare("matrix_sde", "Thm 14", paths=4000, levels=(10, 20, 40, 80, 160))


# Theorems 15 / 16 ------------------------------------------------------------------------------


@_check("Theorem 15", "E[ln K_T] - ln K_0 = E[int (mu_bar + psi_bar - phi_bar^2/2) dt], two-layer linear net")
def theorem15_mean() -> Comparison:
    """two-layer SGD-SDE: E[ln K_T] - ln K_0 vs Theorem 15 drift (wrong: no Itô correction)"""
    return _compare("two_layer", "Thm 15 E")


@_check("Theorem 16", "E[K_T] - K_0 = E[int K (mu_bar + psi_bar + phi_cross/2) dt] (shared batch noise)")
def theorem16_mean() -> Comparison:
    """two-layer SGD-SDE: E[K_T] - K_0 vs K drift (wrong: ln K drift used for K)"""
    return _compare("two_layer", "Thm 16 E")


@_check("Theorem 15", "Theorems 15/16 on the two-layer net, 4000 paths, 4 levels", exhaustive=True)
def theorem15_precise() -> Comparison:
    """two-layer SGD-SDE, high precision (4000 paths, dt down to 1/32 step)"""
    return _compare("two_layer", "Thm 1", paths=4000, levels=(20, 40, 80, 160))


# Lemma 19 / Theorem 17 ------------------------------------------------------------------------


@functools.cache
def _moments(paths: int = 20000, steps: int = 256) -> sim.ValidationResult:
    with single_thread():
        rows, series = sim.lognormal_moments(paths, steps)
    return sim.ValidationResult("lognormal", rows, series)


@_check("Lemma 19", "E[exp(int b dB)] = exp(Phi/2), Monte Carlo")
def lemma19_mgf() -> Comparison:
    """lognormal bound: Lemma 19 MGF at s = 1 (wrong: no Itô term)"""
    return _moments().comparison("Lemma 19")


@_check("Theorem 17", "E[K_t] = K0 exp(int a), Var[K_t] = E^2 (exp(Phi) - 1), Monte Carlo")
def theorem17_moments() -> Comparison:
    """lognormal bound: Theorem 17 mean and variance (wrong: no Itô correction / first order)"""
    return _moments().comparison("Thm 17")


@_check("Theorem 15", "E[ln K_t] = ln K0 + int (a - b^2/2), Monte Carlo on the lognormal bound")
def theorem15_lognormal() -> Comparison:
    """lognormal bound: Theorem 15 log-mean (wrong: no Itô correction)"""
    return _moments().comparison("Thm 15")


@_check("Theorem 17", "Theorem 17 moments with 200000 paths, 1024 steps", exhaustive=True)
def theorem17_precise() -> Comparison:
    """lognormal bound: Theorem 17 / Lemma 19 / Theorem 15, 200000 paths"""
    return _moments(200000, 1024).comparison("")


def _order_check(scheme: str, **kw) -> Comparison:
    with single_thread():
        rows, _ = sim.strong_weak_orders(scheme, **kw)
    return sim.ValidationResult("orders", rows).comparison("")


@_check("Theorem 17", "Euler–Maruyama strong order 1/2 and weak order 1 on the lognormal bound")
def euler_orders() -> Comparison:
    """Euler–Maruyama measured strong/weak orders (wrong: strong 1, weak 1/2 claimed)"""
    return _order_check("euler")


@_check("Theorem 17", "Milstein strong order 1 and weak order 1 on the lognormal bound")
def milstein_orders() -> Comparison:
    """Milstein measured strong/weak orders (wrong: strong 1/2, weak 1/2 claimed)"""
    return _order_check("milstein")


@_check("Theorem 17", "scheme orders with 8000 / 200000 paths", exhaustive=True)
def orders_precise() -> Comparison:
    """Euler and Milstein orders, high precision"""
    a = _order_check("euler", strong_paths=8000, weak_paths=200000)
    b = _order_check("milstein", strong_paths=8000, weak_paths=200000)
    return Comparison(
        max(a.max_error, b.max_error),
        1.0,
        a.wrong_variant,
        min(a.wrong_error, b.wrong_error),
        a.details + " | " + b.details,
    )


@_check("Theorem 17", "real mini-batch SGD: spread of sigma_T vs the SGD-SDE, gap O(eta)", exhaustive=True)
def discrete_sgd() -> Comparison:
    """real SGD vs SGD-SDE: mean/std gaps within an O(eta) band (wrong: noise C/b^2)"""
    return _compare("discrete_sgd", "", lrs=(0.2, 0.1, 0.05, 0.025))


# Proposition 21 --------------------------------------------------------------------------------


@_check("Proposition 21", "std(K_t) across paths ~ b^{-1/2} (lognormal bound, Sigma = C/b)")
def proposition21_lognormal() -> Comparison:
    """lognormal bound: exponent of std(K_T) in b (wrong: noise C/b^2)"""
    return _compare("batch_size_scaling", "")


@_check("Proposition 21", "std(sigma_T) across paths ~ b^{-1/2} on the matrix SGD-SDE", exhaustive=True)
def proposition21_matrix() -> Comparison:
    """matrix SGD-SDE: exponent of std(sigma_T) in b (wrong: noise C/b^2)"""
    return _compare("matrix_batch_size_scaling", "")
