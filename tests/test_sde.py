"""Integrator tests: bad input, divergence reporting, nested Brownian paths, declared orders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipverify._validation import LipverifyError
from lipverify.montecarlo import mean, variance
from lipverify.problems import LognormalBound, MatrixSGDSDE, OrnsteinUhlenbeck
from lipverify.sde import SCHEMES, SDE, EulerMaruyama, Milstein, brownian_increments, coarsen, integrate
from lipverify.simulation import default_problem, strong_weak_orders, well_gapped

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


class Blowup(SDE):
    """dx = x^2 dt (no noise): Euler x_{k+1} = x_k + x_k^2 h overflows in finitely many steps."""

    noise_type = "diagonal"
    state_dim = noise_dim = 1

    def drift(self, t, x):
        return x * x

    def diffusion(self, t, x):
        return torch.zeros_like(x)


class BadShape(SDE):
    noise_type = "general"
    state_dim = 2
    noise_dim = 3

    def drift(self, t, x):
        return torch.zeros_like(x)

    def diffusion(self, t, x):
        return torch.zeros(x.shape[0], 2, 2, dtype=x.dtype)


@pytest.mark.parametrize("dt", [0.0, -0.1, float("nan"), float("inf")])
def test_non_positive_dt_is_refused(dt):
    with pytest.raises(LipverifyError, match="step size dt"):
        integrate(OrnsteinUhlenbeck(), torch.tensor([1.0]), dt, steps=3, paths=4, seed=0)


@pytest.mark.parametrize("kw", [{"paths": 0}, {"paths": -3}])
def test_non_positive_paths_is_refused(kw):
    with pytest.raises(LipverifyError, match="paths must be a positive integer"):
        integrate(OrnsteinUhlenbeck(), torch.tensor([1.0]), 0.1, steps=3, seed=0, **kw)
    with pytest.raises(LipverifyError, match="paths must be a positive integer"):
        brownian_increments(3, kw["paths"], 1, 0.1)


def test_non_positive_steps_is_refused():
    with pytest.raises(LipverifyError, match="steps must be a positive integer"):
        integrate(OrnsteinUhlenbeck(), torch.tensor([1.0]), 0.1, steps=0, paths=2, seed=0)


def test_diffusion_shape_mismatch_is_named():
    with pytest.raises(LipverifyError, match=r"diffusion returned shape \(1, 2, 2\).*expected \(1, 2, 3\)"):
        integrate(BadShape(), torch.zeros(2), 0.1, steps=2, paths=2, seed=0)


def test_state_and_increment_shape_mismatch_is_named():
    with pytest.raises(LipverifyError, match="initial state has shape"):
        integrate(OrnsteinUhlenbeck(dim=2), torch.zeros(3), 0.1, steps=2, paths=2, seed=0)
    with pytest.raises(LipverifyError, match="Brownian increments have shape"):
        integrate(OrnsteinUhlenbeck(), torch.zeros(1), 0.1, dB=torch.zeros(4, 5, 2, dtype=torch.float64))


def test_non_finite_initial_state_is_refused():
    with pytest.raises(LipverifyError, match="non-finite"):
        integrate(OrnsteinUhlenbeck(), torch.tensor([float("nan")]), 0.1, steps=2, paths=2, seed=0)


def test_milstein_refuses_general_noise():
    sde = MatrixSGDSDE(default_problem(), 0.1, 2)
    with pytest.raises(LipverifyError, match="milstein"):
        integrate(
            sde,
            well_gapped(3, 4, (1.5, 0.8, 0.3)).reshape(-1),
            0.1,
            steps=2,
            paths=2,
            seed=0,
            scheme="milstein",
        )


def test_diverging_path_is_reported_with_its_step_not_averaged():
    h = 0.01
    x0 = torch.tensor([[0.1], [10.0], [0.2]], dtype=torch.float64)
    sol = integrate(Blowup(), x0, h, steps=200, seed=0)
    # Independent reference: the same recursion in numpy float64, first step whose state overflows.
    x, expected = np.float64(10.0), None
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(200):
            x = x + x * x * np.float64(h)
            if not np.isfinite(x):
                expected = k + 1
                break
    assert expected is not None
    assert sol.diverged.tolist() == [1]
    assert sol.diverged_step.tolist() == [-1, expected, -1]
    assert math.isnan(float(sol.final[1, 0]))
    assert torch.isfinite(sol.states).all()  # frozen at the last finite state, no NaN propagated
    assert sol.finite_final.shape == (2, 1)
    with pytest.raises(LipverifyError, match=rf"1 of 3 paths diverged.*\[1\] at steps \[{expected}\]"):
        sol.require_finite()
    with pytest.raises(LipverifyError, match="1 of 3 samples are non-finite"):
        mean(sol.final)


def test_coarse_increments_are_sums_of_fine_ones():
    dB = brownian_increments(8, 5, 2, 0.125, seed=3)
    c = coarsen(dB, 4)
    assert c.shape == (2, 5, 2)
    torch.testing.assert_close(c[1], dB[4:].sum(0))
    with pytest.raises(LipverifyError, match="cannot coarsen"):
        coarsen(dB, 3)


def test_increments_have_variance_dt():
    """Var of N(0, dt) draws: MC interval of the sample variance (4th-moment standard error)."""
    dt = 0.37
    dB = brownian_increments(4, 20000, 1, dt, seed=11).flatten()
    v = variance(dB)
    assert v.contains(dt), (v, dt)
    assert abs(mean(dB).z_score(0.0)) < 4


def test_same_seed_same_paths_and_given_increments_reproduce():
    p = OrnsteinUhlenbeck()
    a = integrate(p, torch.tensor([1.0]), 0.01, steps=10, paths=7, seed=5)
    b = integrate(p, torch.tensor([1.0]), 0.01, steps=10, paths=7, seed=5)
    torch.testing.assert_close(a.final, b.final, rtol=0, atol=0)
    dB = brownian_increments(10, 7, 1, 0.01, seed=5)
    c = integrate(p, torch.tensor([1.0]), 0.01, dB=dB)
    # Euler on OU by hand with the same increments
    x = torch.ones(7, 1, dtype=torch.float64)
    for k in range(10):
        x = x + p.theta * (p.m - x) * 0.01 + p.s * dB[k]
    torch.testing.assert_close(c.final, x)


def test_record_every_and_times():
    sol = integrate(OrnsteinUhlenbeck(), torch.tensor([1.0]), 0.1, steps=10, paths=3, seed=0, record_every=5)
    assert sol.times.tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert sol.states.shape == (3, 3, 1)


def test_schemes_declare_orders_as_data():
    assert EulerMaruyama.strong_order == 0.5 and EulerMaruyama.weak_order == 1.0
    assert Milstein.strong_order == 1.0 and Milstein.weak_order == 1.0
    assert set(SCHEMES) == {"euler", "milstein"}


def test_milstein_autograd_derivative_matches_the_analytic_one():
    p = LognormalBound.example()
    x = torch.rand(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    torch.testing.assert_close(SDE.diffusion_derivative(p, 0.3, x), p.diffusion_derivative(0.3, x))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_measured_orders_match_declared_orders(scheme):
    """Generic: fit strong and weak orders from nested step sizes sharing one Brownian path; the
    band is z * (MC bound of the slope) + |slope(fine half) - slope(coarse half)| (docstring of
    lipverify.simulation.results._order_row). The wrong declared orders must fall outside it."""
    rows, _ = strong_weak_orders(scheme)
    assert len(rows) == 4
    for r in rows:
        assert r.ok, (r.quantity, r.predicted, r.estimate, r.allowance, r.wrong)
    declared = {r.quantity.split()[0]: r.predicted for r in rows if not r.wrong}
    assert declared == {"strong": SCHEMES[scheme].strong_order, "weak": SCHEMES[scheme].weak_order}


def test_torchsde_same_increments_same_paths():
    pytest.importorskip("torchsde")
    from lipverify.simulation import torchsde_solve

    p = LognormalBound.example()
    dB = brownian_increments(50, 100, 1, 0.02, seed=2)
    ours = integrate(p, torch.tensor([1.0]), 0.02, dB=dB).final
    theirs = torchsde_solve(p, torch.tensor([1.0], dtype=torch.float64), 0.02, dB)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_the_closed_form():
    p = LognormalBound.example()
    sol = integrate(p, torch.tensor([1.0]), 1 / 256, steps=256, paths=50000, seed=0, device="cuda")
    K = sol.final.flatten()
    assert K.device.type == "cuda"
    bias = p.euler_moments(1 / 256, 256)[0] - p.mean(1.0)
    assert mean(K.cpu()).contains(p.mean(1.0), bias=bias)


def test_missing_torchsde_gives_a_clear_message(monkeypatch):
    import sys

    from lipverify.simulation import torchsde_solve

    monkeypatch.setitem(sys.modules, "torchsde", None)  # makes `import torchsde` raise ImportError
    dB = brownian_increments(2, 3, 1, 0.1, seed=0)
    with pytest.raises(LipverifyError, match=r"pip install 'lipverify\[sde\]'"):
        torchsde_solve(LognormalBound.example(), torch.tensor([1.0]), 0.1, dB)
