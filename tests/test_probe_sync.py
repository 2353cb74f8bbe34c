"""The probe's device route issues no host synchronisation after warm-up, and its ATen operation count
per step stays within a fixed budget, a multiple of a plain step's count (issue 15). Proven on CPU
with ``route="device"`` (the code CUDA runs), by :class:`lipverify.probe.interpose.SyncCounter`; the
host route (CPU's own, with scipy and host-side convergence tests) is the wrong variant both checks
reject."""

import pytest
import torch
import torch.nn.functional as F

from lipverify.dynamics import network_terms
from lipverify.models import build_model
from lipverify.probe import DynamicsProbe, reference_layer_terms
from lipverify.probe.interpose import counting

LR = 0.01
WARMUP = 2  # step 0: cold full decompositions (eigh); step 1: the first warm-started spectra
STEPS = 3
SHAPES = {"mlp": (784,), "convnet": (3, 32, 32)}
B = 16

#: ATen operations per probed step on the device route, as a multiple of a plain step's, measured on
#: CPU (b = 16, float64 spectral parts) as printed by test_probe_step_op_count. Torch 2.13: mlp 713,
#: convnet 1071 (plain steps: 60 and 79; 11.9x and 13.6x), after the layers' spectra were batched into
#: one padded call per step (resolvent_spectra_device; before that 959 and 1600). The budget is that
#: plus 5%: 746 / 60 and 1120 / 79 (a change that adds a per-layer Python loop over iterations or
#: samples exceeds it). A multiple, not a count: how torch decomposes a step into ATen operations
#: changes between releases for the plain step and the probe alike (torch 2.4.1: plain mlp 66,
#: device route 757, 11.5x). The host route (CPU's default) counts 1227-1264 (mlp) and 1286-1334
#: (convnet; its iteration counts adapt), the host route before the device route existed 1310 and
#: 1456, its torch route (the one CUDA ran) 1226 and 1384, and the unbatched device route 959 and
#: 1600 (16x and 20x a plain step): the budgets reject all of them. The issue's aim, 4x a plain step,
#: is not met (12x and 13.5x).
OP_BUDGET = {"mlp": 746 / 60, "convnet": 1120 / 79}


def _plain_step_counts(model_name: str):
    """The :class:`SyncCounter` of one plain training step (after one uncounted step), with this
    torch."""
    model, x, y, opt, _ = _setup(model_name, "device")
    _plain_step(model, x, y, opt)
    with counting() as plain:
        _plain_step(model, x, y, opt)
    return plain


def _setup(model_name: str, route: str, **probe_options):
    """Model, batch (b = B), SGD and a probe on ``route`` with ``probe_options``."""
    model = build_model(model_name, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, *SHAPES[model_name], generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    return model, x, y, opt, DynamicsProbe(model, route=route, population_size=60000, **probe_options)


def _plain_step(model, x, y, opt):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _probe_step(model, x, y, opt, probe):
    """One training step with the full probe; the results stay unread (the caller reads them)."""
    probe.before_step()
    opt.zero_grad(set_to_none=True)
    with probe.capture():
        F.cross_entropy(model(x), y).backward()
    probe.after_backward()
    terms = probe.compute(LR)
    opt.step()
    truth = probe.after_step(LR)
    return terms, truth


def _count_steady_state(model_name: str, route: str):
    model, x, y, opt, probe = _setup(model_name, route)
    for _ in range(WARMUP):
        terms, truth = _probe_step(model, x, y, opt, probe)
        network_terms(terms), dict(truth)  # read on the host outside the window
    counts, results = [], []
    for _ in range(STEPS):
        with counting() as c:
            results.append(_probe_step(model, x, y, opt, probe))
        counts.append(c)
        # the previous step's packed results read a step later, outside the counted window
        for terms, truth in results[:-1]:
            network_terms(terms), dict(truth)
    return model, x, y, probe, counts, results


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_device_route_steady_state_issues_no_host_sync(model_name, monkeypatch):
    *_, counts, results = _count_steady_state(model_name, "device")
    found = [dict(c.syncs) for c in counts]
    assert all(not s for s in found), f"host synchronisations after warm-up: {found}"
    # the unread results are the real ones: the same numbers as the host route's for the same steps
    # (the probe does not touch the training, so both routes see the same weights and batches).
    # Like for like: the host route's W y from a float32 forward output (float32 rounding, checked
    # against its own bound in tests/test_probe.py) is switched off; both routes multiply by W.
    contract = DynamicsProbe._contract

    def product_with_w(self, layer, a, d, u, v, outputs=None):
        if outputs is not None and outputs.dtype != self.compute_dtype:
            outputs = None
        return contract(self, layer, a, d, u, v, outputs)

    monkeypatch.setattr(DynamicsProbe, "_contract", product_with_w)
    *_, host_results = _count_steady_state(model_name, "host")
    for (terms, truth), (host_terms, host_truth) in zip(results, host_results, strict=True):
        for name, h in host_terms.items():
            t = terms[name]
            assert t.converged and not t.degenerate
            for f in ("sigma", "gap", "mu", "phi", "psi"):
                assert abs(getattr(t, f) - getattr(h, f)) <= 1e-8 * abs(getattr(h, f)), (name, f)
            scale = abs(host_truth[name]["dsigma_first"])
            for f in ("dsigma_observed", "dsigma_first", "dsigma_second"):
                # differences of sigmas: absolute, at the spectra's rounding level
                assert abs(truth[name][f] - host_truth[name][f]) <= 1e-6 * scale + 1e-13 * t.sigma, (name, f)


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_host_route_is_rejected_by_the_same_counter(model_name):
    # the wrong variant: CPU's own route reads convergence tests, LAPACK info and the cache check on
    # the host; the counter must see them (else the test above proves nothing)
    *_, counts, _ = _count_steady_state(model_name, "host")
    assert all(c.sync_count > 0 for c in counts)
    per_step = [c.sync_count for c in counts]
    print(f"{model_name} host route: syncs per step {per_step}: {dict(counts[-1].syncs)}")


def test_device_route_terms_match_the_reference_after_steady_state_steps():
    # results read a step late are those of their own step: W_t's terms against the float64
    # torch.func reference at W_t (a float64 model: the projections are float64 too)
    model, x, y, opt, probe = _setup("mlp", "device")
    model.double()
    x = x.double()
    for _ in range(WARMUP + 1):
        _probe_step(model, x, y, opt, probe)
    ref = reference_layer_terms(model, x, y, F.cross_entropy, LR, population_size=60000)
    terms, _ = _probe_step(model, x, y, opt, probe)
    _probe_step(model, x, y, opt, probe)  # the next step runs before the read
    for name, r in ref.items():
        t = terms[name]
        assert t.converged
        for f in ("sigma", "gap", "mu", "phi", "psi"):
            assert abs(getattr(t, f) - getattr(r, f)) <= 1e-8 * abs(getattr(r, f)), (name, f)


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_probe_step_op_count(model_name):
    plain = _plain_step_counts(model_name)
    *_, counts, _ = _count_steady_state(model_name, "device")
    *_, host_counts, _ = _count_steady_state(model_name, "host")
    probe_ops, host_ops = counts[-1].op_count, host_counts[-1].op_count
    kernels = counts[-1].compute_op_count
    budget = OP_BUDGET[model_name] * plain.op_count
    print(
        f"{model_name}: ATen ops per step: plain {plain.op_count}, probe (device route) {probe_ops} "
        f"({probe_ops / plain.op_count:.1f}x), probe (host route) {host_ops} "
        f"({host_ops / plain.op_count:.1f}x); budget {budget:.0f} ({OP_BUDGET[model_name]:.2f}x); "
        f"without views: plain {plain.compute_op_count}, device route {kernels} "
        f"({kernels / plain.compute_op_count:.1f}x)"
    )
    assert probe_ops <= budget
    assert host_ops > budget  # the wrong variant this budget rejects


def test_op_sites_charge_each_operation_to_the_innermost_lipverify_function():
    # fast_decompose calls with_canonical_sign (lipverify.spectral), which issues its own operations:
    # charged to it, not to the caller (the wrong variant, charging the outermost lipverify frame,
    # would put them all on fast_decompose); torch's own operations called from here are OUTSIDE
    from lipverify.probe.interpose import OUTSIDE
    from lipverify.probe.resolvent import fast_decompose

    W = torch.randn(6, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with counting() as plain:
        fast_decompose(W, torch.float64)
    with counting() as torch_only:
        torch.ones(3).add_(1)
    with counting(sites=True) as c:
        fast_decompose(W, torch.float64)
        torch.ones(3).add_(1)
    assert not plain.sites  # off by default
    assert c.sites[OUTSIDE] == torch_only.op_count > 0
    assert sum(c.sites.values()) == c.op_count == plain.op_count + torch_only.op_count
    assert c.sites["probe/resolvent.py:fast_decompose"] > 0 and c.sites["spectral.py:with_canonical_sign"] > 0
    assert set(c.sites) == {OUTSIDE, "probe/resolvent.py:fast_decompose", "spectral.py:with_canonical_sign"}


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_op_budget_rejects_the_unbatched_device_route(model_name, monkeypatch):
    # the wrong variant: the device route with one spectrum call per layer (no cross-layer batch)
    from lipverify.probe.spectrum_cache import SpectrumCache

    monkeypatch.setattr(SpectrumCache, "decompositions", _one_at_a_time)
    *_, counts, _ = _count_steady_state(model_name, "device")
    assert counts[-1].op_count > OP_BUDGET[model_name] * _plain_step_counts(model_name).op_count


def _one_at_a_time(self, names, in_step=True):
    return {name: self.decomposition(name, in_step) for name in names}


def test_route_is_validated():
    model = build_model("mlp", seed=0)
    with pytest.raises(Exception, match="route must be one of auto, device, host"):
        DynamicsProbe(model, route="gpu")
    with pytest.raises(Exception, match="route='device' needs decomposition='resolvent'"):
        DynamicsProbe(model, route="device", decomposition="gram")
    assert DynamicsProbe(model, route="device").on_device_route()
    assert not DynamicsProbe(model).on_device_route()  # auto on CPU: the host route


@pytest.mark.parametrize("shape", [(20, 50), (50, 20), (1, 7)])
def test_update_exceeds_gap_on_device_agrees_with_the_host_decision(shape):
    # |dW|_2 just below and just above gap / 2 (1e-6 relative: far above rounding); the Frobenius bound
    # alone (the wrong variant) says True for both when |dW|_F > |dW|_2
    from lipverify.probe import update_exceeds_gap
    from lipverify.probe.dynamics_probe import _exceeds_gap_on_device

    dW = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    norm2 = float(torch.linalg.matrix_norm(dW, 2))
    for factor, expected in ((1 + 1e-6, False), (1 - 1e-6, True)):
        gap = 2 * norm2 * factor
        assert bool(_exceeds_gap_on_device(dW, torch.tensor(gap, dtype=torch.float64))) is expected
        assert update_exceeds_gap(dW, gap) is expected
    if min(shape) > 1:
        assert float(torch.linalg.matrix_norm(dW)) > norm2 * (1 + 1e-6)  # the Frobenius bound is not enough
