"""Linear-response prediction of the spread (issue 13, part 3): kernels on problems with known
solutions, the reduced drift Jacobian against finite differences, wrong variants, CLI smoke."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from lipverify._validation import LipverifyError
from lipverify.framework.linear_response import (
    _Functional,
    _top_pairs,
    adjoint_variance,
    default_adjoint_steps,
    ou_covariance,
    ou_exact_discretisation,
    propagate_covariance,
    reduced_drift,
    reduced_step,
)

EPS = np.finfo(np.float64).eps

# A two-dimensional OU with a non-normal drift (K != K^T, so a missing transpose shows) and
# correlated noise (off-diagonal Q, so dropping cross terms shows).
K_OU = np.array([[0.3, 0.4], [-0.2, 0.5]])
S_OU = np.array([[0.5, 0.0], [0.45, 0.2]])
T_OU = 60


def _ou_recursion(**kwargs):
    A, Q = ou_exact_discretisation(K_OU, S_OU)
    return propagate_covariance(np.repeat(A[None], T_OU, 0), np.repeat(Q[None], T_OU, 0), **kwargs)


def _ou_error(C: np.ndarray) -> float:
    """Max over t of the relative error of C_t against the closed form."""
    return max(
        float(
            np.abs(C[t] - ou_covariance(K_OU, S_OU, t)).max() / np.abs(ou_covariance(K_OU, S_OU, T_OU)).max()
        )
        for t in range(T_OU + 1)
    )


# Rounding bound: each step costs a few ulps of |C| (two 2x2 products and a sum) and the
# discretisation itself (expm, Van Loan) a few more; 60 steps of a contraction: < 1e3 eps.
OU_TOLERANCE = 1e3 * EPS


def test_ou_transient_and_stationary_exact():
    C = _ou_recursion()
    assert _ou_error(C) < OU_TOLERANCE
    C_inf = scipy.linalg.solve_continuous_lyapunov(K_OU, S_OU @ S_OU.T)
    A, Q = ou_exact_discretisation(K_OU, S_OU)
    C_long = propagate_covariance(np.repeat(A[None], 400, 0), np.repeat(Q[None], 400, 0))[-1]
    # 400 steps: transient e^{-2 * 0.4 * 400} is far below rounding
    assert np.abs(C_long - C_inf).max() < OU_TOLERANCE * np.abs(C_inf).max()


def test_ou_rejects_wrong_variants():
    A, Q = ou_exact_discretisation(K_OU, S_OU)
    assert abs(Q[0, 1]) > 0.1 * math.sqrt(Q[0, 0] * Q[1, 1])  # cross terms matter here

    def stack(M):
        return np.repeat(M[None], T_OU, 0)

    wrong = {
        "no transpose": _ou_recursion(transpose=False),
        "A with the wrong sign": propagate_covariance(stack(-A), stack(Q)),
        "cross terms of Q dropped": propagate_covariance(stack(A), stack(np.diag(np.diag(Q)))),
        "Euler (continuous-time) A = -K, Q = S S^T": propagate_covariance(stack(-K_OU), stack(S_OU @ S_OU.T)),
    }
    for name, C in wrong.items():
        assert _ou_error(C) > 1e6 * OU_TOLERANCE, name


def test_no_feedback_reduces_to_phi_bar_sum_with_cross_terms():
    rng = np.random.default_rng(1)
    T, L = 30, 3
    B = rng.normal(size=(T, L, L))
    Q = B @ B.transpose(0, 2, 1)  # random covariances with cross terms
    C = propagate_covariance(np.zeros((T, L, L)), Q)
    ones = np.ones(L)
    with_cross = np.cumsum(Q.sum(axis=(1, 2)))
    np.testing.assert_allclose(ones @ C[1:] @ ones, with_cross, rtol=50 * EPS)
    # wrong variant: Theorem 17's phi_bar^2 sum (diagonal only) differs by the cross terms
    diag_only = np.cumsum(np.trace(Q, axis1=1, axis2=2))
    assert np.abs(diag_only - with_cross).max() > 1e-3 * with_cross.max()
    # the adjoint with J = I: the same sum evaluated in the final direction
    g = rng.normal(size=L)
    eye = np.repeat(np.eye(L)[None], T, 0)
    assert math.isclose(adjoint_variance(eye, Q, g), float(g @ Q.sum(axis=0) @ g), rel_tol=50 * EPS)


def test_adjoint_equals_forward_covariance():
    rng = np.random.default_rng(2)
    T, d = 25, 4
    J = np.eye(d) + 0.2 * rng.normal(size=(T, d, d))
    B = rng.normal(size=(T, d, d))
    Q = B @ B.transpose(0, 2, 1)
    g = rng.normal(size=d)
    forward = float(g @ propagate_covariance(J - np.eye(d), Q)[-1] @ g)
    assert math.isclose(adjoint_variance(J, Q, g), forward, rel_tol=1e-12)
    # wrong variant: propagating g with J instead of J^T
    wrong = adjoint_variance(J.transpose(0, 2, 1), Q, g)
    assert abs(wrong - forward) > 1e-3 * forward


def test_kernels_refuse_bad_input():
    with pytest.raises(LipverifyError, match="non-finite"):
        propagate_covariance(np.full((2, 2, 2), np.nan), np.zeros((2, 2, 2)))
    with pytest.raises(LipverifyError, match="must both be"):
        propagate_covariance(np.zeros((2, 2, 2)), np.zeros((3, 2, 2)))


class _Tiny(nn.Module):
    """Smooth (tanh) three-layer net: finite differences never cross a ReLU kink."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _tiny_problem():
    torch.manual_seed(0)
    model = _Tiny().to(torch.float64)
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    fn = _Functional(model, x, y)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return fn, theta, ["fc1.weight", "fc2.weight", "fc3.weight"]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_reduced_jacobian_matches_finite_differences(weight_decay):
    fn, theta, names = _tiny_problem()
    eta, alpha = 0.1, 0.7
    step = reduced_step(fn, theta, names, eta, alpha, weight_decay)
    delta = 1e-4
    fd = np.zeros_like(step["A"])
    for j, (s_j, _, E_j) in enumerate(_top_pairs(fn, theta, names)):
        # x_j -> x_j +- delta exactly: W_j -> W_j + (e^{+-delta} - 1) sigma_j E_j keeps u_j, v_j
        plus = reduced_drift(fn, theta + math.expm1(delta) * s_j * E_j, names, eta, alpha, weight_decay)
        minus = reduced_drift(fn, theta + math.expm1(-delta) * s_j * E_j, names, eta, alpha, weight_decay)
        fd[:, j] = (plus - minus) / (2 * delta)
    scale = np.abs(fd).max()
    # central difference: truncation ~delta^2 (1e-8) of the third derivative, rounding ~eps / delta
    tolerance = 1e-6 * scale
    assert np.abs(step["A"] - fd).max() < tolerance
    # wrong variants: the sketch of MATH section 9 (no -a_l on the diagonal), and the wrong sign
    assert np.abs(step["A_sketch"] - fd).max() > 1e2 * tolerance
    assert np.abs(-step["A"] - fd).max() > 1e2 * tolerance
    np.testing.assert_allclose(
        step["drift"], reduced_drift(fn, theta, names, eta, alpha, weight_decay), rtol=1e-12
    )


def test_reduced_noise_covariance_is_the_batch_covariance():
    """Q = noise_scale * Cov of the per-sample projections: checked against per-sample gradients by
    autograd (a different route), cross terms included."""
    fn, theta, names = _tiny_problem()
    step = reduced_step(fn, theta, names, 0.1, 1.0, 0.0, noise_scale=1.0)
    pairs = _top_pairs(fn, theta, names)
    proj = []
    for i in range(fn.x.shape[0]):
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn.per_sample_losses(t)[i], t)
        proj.append([float(E @ g) / s for s, _, E in pairs])
    np.testing.assert_allclose(step["Q"], np.cov(np.array(proj), rowvar=False), rtol=1e-10, atol=1e-16)
    assert np.abs(step["Q"] - np.diag(np.diag(step["Q"]))).max() > 0


def test_default_adjoint_steps():
    assert default_adjoint_steps(6) == [1, 2, 3, 4, 5, 6]
    s = default_adjoint_steps(60)
    assert s[0] == 1 and s[-1] == 60 and len(s) <= 11 and s == sorted(set(s))


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lipverify.cli", "framework", "linear-response", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


TINY = ["model=mlp", "dataset=mnist5k", "train_size=32", "batch_size=4", "lr=0.05", "steps=2", "seed_init=0"]


@pytest.fixture(scope="module")
def seeds_sweep(tmp_path_factory):
    """Three sampling seeds of the tiny config, as ``lipverify sweep`` writes them."""
    from lipverify.sweep import load_sweep_config, run_sweep

    tmp = tmp_path_factory.mktemp("linresp")
    toml = tmp / "seeds.toml"
    base = "".join(f"{k} = {json.dumps(_value(v))}\n" for k, v in (a.split("=") for a in TINY))
    toml.write_text(
        f'claim = "trajectories"\n[base]\n{base}sharpness_every = 0\n[grid]\nseed_sampling = [0, 1, 2]\n'
    )
    run_sweep(load_sweep_config(toml), tmp / "sweep", jobs=1)
    return tmp / "sweep"


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def test_cli_smoke(seeds_sweep, tmp_path):
    out = tmp_path / "out"
    proc = _cli(*TINY, "--seeds-dir", str(seeds_sweep), "--out", str(out), cwd=os.getcwd())
    assert proc.returncode == 3, proc.stdout + proc.stderr  # 3 seeds < 30: inconclusive
    doc = json.loads((out / "results.json").read_text())
    assert doc["verdict"] == "inconclusive" and doc["comparison"]["seeds"] == 3
    assert len(doc["reduced_std"]) == 3 and all(v is not None and v > 0 for v in doc["adjoint_std"][1:])
    assert "std of ln K_t" in proc.stdout
    # the stored predictions come back unchanged (reuse with --predictions)
    from lipverify.framework.linear_response import LinearResponseResult

    back = LinearResponseResult.from_dict(doc)
    np.testing.assert_array_equal(back.reduced_std, np.asarray(doc["reduced_std"]))
    # bad input: exit 2 with a message naming the problem
    bad = _cli(*TINY, "--adjoint-steps", "9", "--out", str(out), cwd=os.getcwd())
    assert bad.returncode == 2 and "adjoint steps" in bad.stderr


def test_seeds_must_share_the_config(seeds_sweep):
    from lipverify.framework.linear_response import seeds_log_k
    from lipverify.training import load_config

    steps, log_k = seeds_log_k(seeds_sweep, load_config(None, TINY))
    assert steps.tolist() == [0.0, 1.0, 2.0]
    assert log_k.shape == (3, 3) and np.all(log_k.std(axis=0, ddof=1)[1:] > 0)
    with pytest.raises(LipverifyError, match="seed_init"):
        seeds_log_k(seeds_sweep, load_config(None, [*TINY[:-1], "seed_init=1"]))


def _result_with(std: np.ndarray):
    from lipverify.framework.linear_response import LinearResponseResult

    T = len(std) - 1
    z = np.zeros((T, 1, 1))
    return LinearResponseResult(
        steps=np.arange(T + 1, dtype=np.float64),
        log_k=np.zeros(T + 1),
        theorem17_std=std,
        no_feedback_std=std,
        reduced_std=std,
        reduced_sketch_std=std,
        adjoint_std=np.full(T + 1, np.nan),
        layers=["fc1"],
        sigma=np.ones((T + 1, 1)),
        relative_gap=np.ones((T + 1, 1)),
        A=z,
        Q=z,
        flagged_steps=[],
        costs={},
        settings={},
    )


def test_comparison_passes_the_true_std_and_fails_a_wrong_one():
    """Gaussian random walks with known std s sqrt(t): 2000 seeds make the std's relative standard
    error 1/sqrt(2 * 1999) = 1.6%, so the 15% band is 9 standard errors wide (a spurious miss has
    probability < 1e-15 per step). The true std passes; 1.3 x it (a wrong prediction) fails."""
    from lipverify.framework.linear_response import compare_with_seeds

    rng = np.random.default_rng(5)
    T, s = 20, 0.01
    log_k = np.concatenate([np.zeros((2000, 1)), np.cumsum(rng.normal(0, s, (2000, T)), axis=1)], axis=1)
    true = s * np.sqrt(np.arange(T + 1.0))
    steps = np.arange(T + 1.0)
    good = compare_with_seeds(_result_with(true), steps, log_k)
    assert good["verdict"] == "pass" and good["goal_met_by"] == ["reduced"]
    bad = compare_with_seeds(_result_with(1.3 * true), steps, log_k)
    assert bad["verdict"] == "fail" and bad["goal"]["reduced"]["decided_outside"] == T
    few = compare_with_seeds(_result_with(true), steps, log_k[:10])
    assert few["verdict"] == "inconclusive"
