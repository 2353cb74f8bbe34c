"""Mixed precision around the probe: autocast/TF32 off inside its work, GradScaler scale removed,
skipped steps skipped, threadpoolctl only for CPU tensors (lipverify.probe.precision)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lipverify import _linalg
from lipverify.models import build_model
from lipverify.probe import DynamicsProbe, precision, reference_layer_terms

LOSS = nn.CrossEntropyLoss()
FIELDS = ("sigma", "gap", "mu", "phi", "psi")
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
# float32 model against the float64 reference (as in test_probe.py): f32 rounding ~1e-6 in the
# activations and output gradients (sqrt(n) eps32 over the contractions), amplified at most ~10x by
# centring b = 6 samples: 1e-4 keeps a 10x margin. bfloat16 (eps 7.8e-3) inside the probe is ~1e-2.
F32_VS_F64 = 1e-4
# the same captured pass through the same float64/float32 kernels: only reassociation could differ,
# and it does not (same shapes, same threads); 64 eps64 admits last-bit noise, not a bf16 matmul
SAME_KERNELS = 64 * EPS64
# bfloat16 rounds each operand of a contraction to 2^-9 = 2e-3 relative: the worst term over the
# layers moves by more than 1e-3 (measured 9e-3 for the MLP's fc3 mu)
BF16_VISIBLE = 1e-3


def _max_rel(got, ref) -> float:
    worst = 0.0
    for name, r in ref.items():
        for f in FIELDS:
            a, b = getattr(got[name], f), getattr(r, f)
            worst = max(worst, abs(a - b) / max(abs(b), 1e-300))
    return worst


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def _smooth_convnet() -> nn.Module:
    # tanh instead of ReLU: a pre-activation within f32 rounding of a kink would flip its gradient
    # between the float32 run and the float64 reference (the model's non-smoothness, not the probe's)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(16 * 16 * 16, 10),
        )


def _case(which):
    if which == "mlp":
        return build_model("mlp", seed=0), (784,)
    if which == "convnet":
        return build_model("convnet", seed=0), (3, 32, 32)
    return _smooth_convnet(), (3, 32, 32)


def _batch(shape, b=6, classes=10, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    return x.to(dtype), torch.randint(0, classes, (b,), generator=g)


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _autocast_left_on(monkeypatch):
    """Wrong variant: the probe no longer switches autocast off inside its work (no device types;
    the oneDNN float32 settings it also skips are at their float32 default here)."""
    monkeypatch.setattr(precision, "_autocast_devices", lambda: [])


# --------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("which", ["mlp", "smooth-convnet", "convnet"])
def test_compute_inside_autocast_equals_compute_outside(which, monkeypatch):
    # float32 model, forward/backward in float32; only compute() runs inside autocast(bfloat16)
    model, shape = _case(which)
    x, y = _batch(shape)
    probe = DynamicsProbe(model, decomposition="gram")
    with probe.capture():
        LOSS(model(x), y).backward()
    outside = probe.compute(0.05)
    with _autocast():
        inside = probe.compute(0.05)
    assert _max_rel(inside, outside) <= SAME_KERNELS
    if which != "convnet":  # ReLU kinks: see _smooth_convnet
        ref = reference_layer_terms(copy.deepcopy(model).double(), x.double(), y, LOSS, lr=0.05)
        assert _max_rel(inside, ref) < F32_VS_F64
    # wrong variant: autocast left on inside the probe (the code before the fix): the ConvNet's
    # projection fails in conv2d_weight, the MLP's float32 contractions degrade to bfloat16
    _autocast_left_on(monkeypatch)
    try:
        with _autocast():
            wrong = probe.compute(0.05)
    except RuntimeError:
        assert which != "mlp"
        return
    assert _max_rel(wrong, outside) > BF16_VISIBLE


@pytest.mark.parametrize("which", ["mlp", "convnet"])
@pytest.mark.parametrize("compute_dtype", [torch.float64, torch.float32])
def test_autocast_training_step_captures_are_cast_up(which, compute_dtype, monkeypatch):
    # the whole step inside autocast(bfloat16): hooked activations/grad-outputs are bfloat16; the
    # probe casts them up explicitly and runs its own math with autocast off, so compute() gives
    # the same terms inside the region as after it (same captured tensors)
    model, shape = _case(which)
    x, y = _batch(shape)
    probe = DynamicsProbe(model, compute_dtype=compute_dtype)
    with _autocast():
        with probe.capture():
            LOSS(model(x), y).backward()
        inside = probe.compute(0.05)
    assert any(layer.grad_out.dtype == torch.bfloat16 for layer in probe._layers.values())
    outside = probe.compute(0.05)
    assert _max_rel(inside, outside) <= SAME_KERNELS
    assert all(math.isfinite(getattr(t, f)) for t in inside.values() for f in FIELDS)
    _autocast_left_on(monkeypatch)
    try:
        with _autocast():
            wrong = probe.compute(0.05)
    except RuntimeError:
        assert which == "convnet"
        return
    assert _max_rel(wrong, outside) > BF16_VISIBLE


def test_full_precision_switches_off_and_restores_the_callers_settings():
    # torch 2.9+ also has the per-operation API (oneDNN's fp32_precision); older torch only the legacy
    # one, which full_precision then handles alone (the package needs torch >= 2.4)
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("medium")  # oneDNN float32 matmul in bf16, CUDA in TF32
    try:
        assert mkldnn is None or mkldnn.fp32_precision == "bf16"
        with _autocast():
            with precision.full_precision():
                assert not torch.is_autocast_enabled("cpu")
                assert torch.get_float32_matmul_precision() == "highest"
                assert mkldnn is None or mkldnn.fp32_precision == "ieee"
                # cuDNN's TF32 (on by default) only matters, and is only switched off, with CUDA
                assert torch.backends.cudnn.allow_tf32 == (before[1] and not torch.cuda.is_available())
            assert torch.is_autocast_enabled("cpu")
        assert torch.get_float32_matmul_precision() == "medium"
        assert mkldnn is None or mkldnn.fp32_precision == "bf16"
        assert torch.backends.cudnn.allow_tf32 == before[1]
    finally:
        torch.set_float32_matmul_precision(before[0])


# --------------------------------------------------------------------------- GradScaler
S = 2.0**10


def _small(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(30, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5)]
    return nn.Sequential(*layers).double()


def _scaled_step(model, probe, opt, scaler, x, y, lr, poison=False):
    """One probed step with the scaler; ``poison``: an inf in the last bias gradient (not a probed
    weight: the probe must follow the scaler's decision, not its own projections)."""
    probe.before_step()
    opt.zero_grad()
    with probe.capture():
        scaler.scale(LOSS(model(x), y)).backward()
    if poison:
        model[-1].bias.grad[0] = math.inf
    probe.after_backward()
    terms = probe.compute(lr)
    scaler.step(opt)
    scaler.update()
    truth = probe.after_step(lr)
    return terms, truth


def _plain_step(model, probe, opt, x, y, lr):
    probe.before_step()
    opt.zero_grad()
    with probe.capture():
        LOSS(model(x), y).backward()
    probe.after_backward()
    terms = probe.compute(lr)
    opt.step()
    return terms, probe.after_step(lr)


def _truth_close(a, b, terms) -> bool:
    """Discrete truths agree: 1e-10 relative (two spectral routes, test_probe.py's tolerance), plus
    64 eps64 sigma_1 absolute: dsigma_observed is a difference of two sigma_1 values (~1e-6 of sigma)."""
    return all(
        abs(a[n][k] - b[n][k]) <= 1e-10 * abs(b[n][k]) + 64 * EPS64 * terms[n].sigma
        for n in b
        for k in ("dsigma_observed", "dsigma_first", "dsigma_second", "dropped_drift_term")
    )


def test_grad_scaler_scale_is_taken_out_of_the_hooked_gradients():
    lr = 0.05
    model, plain_model = _small(), _small()
    x, y = _batch((30,), classes=5, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    probe = DynamicsProbe(model)
    probe.use_grad_scaler(scaler, opt)
    ref = reference_layer_terms(copy.deepcopy(model), x, y, LOSS, lr=lr)
    terms, truth = _scaled_step(model, probe, opt, scaler, x, y, lr)
    plain_terms, plain_truth = _plain_step(
        plain_model, DynamicsProbe(plain_model), torch.optim.SGD(plain_model.parameters(), lr=lr), x, y, lr
    )
    # S = 2^10 scales and unscales exactly: the scaled run equals the unscaled one to rounding
    assert _max_rel(terms, plain_terms) <= SAME_KERNELS
    assert _max_rel(terms, ref) < 1e-8  # the float64 reference (test_probe.py's RTOL)
    assert _truth_close(truth, plain_truth, plain_terms)
    assert not probe.step_skipped
    # wrong variant: the scale not removed (a probe without use_grad_scaler on the scaled backward)
    wrong_model = _small()
    wrong_probe = DynamicsProbe(wrong_model)
    with wrong_probe.capture():
        (S * LOSS(wrong_model(x), y)).backward()
    wrong = wrong_probe.compute(lr)
    for name, t in ref.items():
        assert math.isclose(wrong[name].mu / t.mu, S, rel_tol=1e-8)
        assert math.isclose(wrong[name].phi / t.phi, S, rel_tol=1e-8)
        assert math.isclose(wrong[name].psi / t.psi, S * S, rel_tol=1e-8)
    assert _max_rel(wrong, ref) > 1.0


def test_a_step_the_scaler_skips_is_skipped_by_the_probe(monkeypatch):
    lr = 0.05
    model = _small()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    probe = DynamicsProbe(model)
    probe.use_grad_scaler(scaler, opt)
    batches = [_batch((30,), classes=5, seed=s, dtype=torch.float64) for s in range(3)]
    _scaled_step(model, probe, opt, scaler, *batches[0], lr)
    weights = [p.detach().clone() for p in model.parameters()]
    cached = {n: probe.decomposition_of(n) for n in probe.layer_names}
    stats = dict(probe.resolvent_stats)
    terms, truth = _scaled_step(model, probe, opt, scaler, *batches[1], lr, poison=True)
    # the scaler skipped optimizer.step() and backed off its scale; the probe skipped the step too
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert scaler.get_scale() == S / 2
    assert terms == {} and truth == {} and probe.step_skipped
    assert probe._scaler.skipped_steps == 1
    # the spectral cache of W_t is still valid: nothing recomputed
    assert all(probe.decomposition_of(n) is cached[n] for n in probe.layer_names)
    assert probe.resolvent_stats == stats
    # the next step (scale now S/2) is right against the unscaled probe of a copy of the model
    twin = copy.deepcopy(model)
    plain_terms, plain_truth = _plain_step(
        twin, DynamicsProbe(twin), torch.optim.SGD(twin.parameters(), lr=lr), *batches[2], lr
    )
    terms, truth = _scaled_step(model, probe, opt, scaler, *batches[2], lr)
    assert not probe.step_skipped
    # the probe's warm resolvent spectrum against the twin's cold full one: test_probe.py's 1e-10
    assert _max_rel(terms, plain_terms) <= 1e-10 and _truth_close(truth, plain_truth, plain_terms)
    # wrong variant: the probe ignores the scaler's skip (its terms would enter the records)
    blind = DynamicsProbe(model)
    with blind.capture():
        scaler.scale(LOSS(model(batches[1][0]), batches[1][1])).backward()
    model[-1].bias.grad[0] = math.inf
    assert blind.compute(lr) != {}
    # wrong variant: the first scale kept instead of the scale of each captured backward
    model2 = _small()
    opt2 = torch.optim.SGD(model2.parameters(), lr=lr)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=S)
    stale = DynamicsProbe(model2)
    stale.use_grad_scaler(scaler2, opt2)
    _scaled_step(model2, stale, opt2, scaler2, *batches[0], lr)
    monkeypatch.setattr(precision.GradScalerLink, "record_scale", lambda self: None)
    _scaled_step(model2, stale, opt2, scaler2, *batches[1], lr, poison=True)
    got, _ = _scaled_step(model2, stale, opt2, scaler2, *batches[2], lr)
    for name, t in plain_terms.items():
        assert math.isclose(got[name].mu / t.mu, 0.5, rel_tol=1e-8)


def test_grad_scaler_with_unscale_before_after_backward():
    # scaler.unscale_ (e.g. for clipping) before after_backward: the .grad are already divided by S
    lr = 0.05
    model, twin = _small(), _small()
    x, y = _batch((30,), classes=5, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    probe = DynamicsProbe(model)
    probe.use_grad_scaler(scaler, opt)
    probe.before_step()
    with probe.capture():
        scaler.scale(LOSS(model(x), y)).backward()
    scaler.unscale_(opt)
    probe.after_backward()
    probe.compute(lr)
    scaler.step(opt)
    scaler.update()
    truth = probe.after_step(lr)
    plain_terms, plain_truth = _plain_step(
        twin, DynamicsProbe(twin), torch.optim.SGD(twin.parameters(), lr=lr), x, y, lr
    )
    assert _truth_close(truth, plain_truth, plain_terms)


def test_use_grad_scaler_rejects_a_missing_optimizer():
    from lipverify import LipverifyError

    with pytest.raises(LipverifyError, match="optimizer"):
        DynamicsProbe(_small()).use_grad_scaler(torch.amp.GradScaler("cpu"))


# --------------------------------------------------------------------------- CPU-only routes
def test_threadpoolctl_and_scipy_only_for_cpu_tensors(monkeypatch):
    class Refuse:
        def limit(self, limits):
            raise AssertionError("threadpoolctl entered")

    monkeypatch.setattr(_linalg, "_openblas", Refuse())
    for device in ("meta", torch.device("cuda")):
        with _linalg.single_threaded_blas(device):
            pass
        assert _linalg._scipy(torch.empty(4, 4, dtype=torch.float64, device="meta")) is None
    with pytest.raises(AssertionError, match="threadpoolctl"):  # the check can fail: CPU enters it
        with _linalg.single_threaded_blas("cpu"):
            pass
    assert _linalg._scipy(torch.empty(4, 4, dtype=torch.float64)) == "d"
    # the resolvent route passes the weight's device (the kernels' own calls sit behind _scipy: CPU)
    seen = []
    real = _linalg.single_threaded_blas

    def spy(device=None):
        seen.append(device)
        return real("meta")

    monkeypatch.setattr(_linalg, "single_threaded_blas", spy)
    from lipverify.probe import resolvent_spectrum

    W = torch.randn(12, 8, dtype=torch.float64)
    resolvent_spectrum(W, torch.float64, torch.linalg.svd(W).Vh[:2].T.contiguous())
    assert seen[0] == W.device


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_and_grad_scaler_match_the_reference(amp_dtype):
    lr = 0.05
    model = _smooth_convnet().cuda()
    x, y = _batch((3, 32, 32))
    ref = reference_layer_terms(copy.deepcopy(model).double().cpu(), x.double(), y, LOSS, lr=lr)
    x, y = x.cuda(), y.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", init_scale=S)
    probe = DynamicsProbe(model)
    probe.use_grad_scaler(scaler, opt)
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # the default: the probe must switch it off for its work
    try:
        with probe.capture():
            scaler.scale(LOSS(model(x), y)).backward()  # float32 forward: comparable to the reference
        with torch.autocast("cuda", dtype=amp_dtype):
            terms = probe.compute(lr)
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    assert _max_rel(terms, ref) < F32_VS_F64
    # a bf16/fp16 forward: captured in low precision, cast up, finite terms
    probe.before_step()
    opt.zero_grad()
    with torch.autocast("cuda", dtype=amp_dtype):
        with probe.capture():
            scaler.scale(LOSS(model(x), y)).backward()
        terms = probe.compute(lr)
    scaler.step(opt)
    scaler.update()
    truth = probe.after_step(lr)
    assert probe.step_skipped or all(math.isfinite(getattr(t, f)) for t in terms.values() for f in FIELDS)
    assert probe.step_skipped == (truth == {})


def test_measure_with_a_grad_scaler_attached_is_not_unscaled():
    # measure() runs its own, unscaled backward: the scaler's S must not divide it
    lr = 0.05
    model = _small()
    x, y = _batch((30,), classes=5, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    probe = DynamicsProbe(model)
    probe.use_grad_scaler(scaler, opt)
    with probe.capture():  # a scaled training backward first: the scaler's S is now live
        scaler.scale(LOSS(model(x), y)).backward()
    training = probe.compute(lr)
    measured = probe.measure(x, y, LOSS, lr)
    ref = reference_layer_terms(copy.deepcopy(model), x, y, LOSS, lr=lr)
    assert _max_rel(measured, ref) < 1e-8 and _max_rel(training, ref) < 1e-8
    # the training capture (and its S) survives measure()
    assert _max_rel(probe.compute(lr), training) <= SAME_KERNELS
