"""DynamicsProbe against torch.func / materialised per-sample references (float64, rtol 1e-8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipverify import LipverifyError
from lipverify.dynamics import network_terms
from lipverify.models import ConvNet, build_model
from lipverify.probe import (
    DynamicsProbe,
    ProbeSchedule,
    ResolventSpectrum,
    cross_layer_diffusion,
    fast_decompose,
    reference_layer_terms,
    reference_per_sample_gradients,
    resolvent_spectrum,
    update_exceeds_gap,
)
from lipverify.spectral import decompose, hessian_trace_from_spectrum, quadratic_form_from_projections

RTOL = 1e-8
FIELDS = ("sigma", "gap", "mu", "phi", "psi")


@pytest.fixture(autouse=True, params=["host", "device"])
def probe_route(request, monkeypatch):
    """Every test runs on both routes of the "resolvent" probe: "host" (CPU's own: scipy LAPACK,
    converged-or-fallback on the host) and "device" (CUDA's: torch only, fixed iterations, results
    read from one packed tensor), against the same float64 references."""
    monkeypatch.setenv("LIPVERIFY_PROBE_ROUTE", request.param)
    return request.param


def _max_rel(probe_terms, ref_terms) -> float:
    worst = 0.0
    for name, ref in ref_terms.items():
        got = probe_terms[name]
        assert got.converged  # a not-converged device-route step is flagged, never compared as valid
        for f in FIELDS:
            a, b = getattr(got, f), getattr(ref, f)
            worst = max(worst, abs(a - b) / max(abs(b), 1e-300))
        pa, pb = got.noise_projections, ref.noise_projections.to(got.noise_projections.dtype)
        worst = max(worst, float((pa - pb).abs().max() / pb.abs().max()))
    return worst


def _mlp(seed=0, dropout=0.0):
    return build_model("mlp", dropout=dropout, seed=seed).double()


def _convnet(seed=0, dropout=0.0, batch_norm=False):
    return build_model("convnet", dropout=dropout, batch_norm=batch_norm, seed=seed).double()


def _batch(shape, b=6, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (b,), generator=g
    )


LOSS = nn.CrossEntropyLoss()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def _small(seed=0, dropout=0.0):
    """A small MLP (30 -> 24 -> 16 -> 5) for the checks that are not about the paper's shapes."""
    torch.manual_seed(seed)
    layers = [
        nn.Linear(30, 24),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(24, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ]
    return nn.Sequential(*layers).double()


def test_mlp_matches_vmap_reference():
    model = _mlp()
    x, y = _batch((784,))
    probe = DynamicsProbe(model)
    got = probe.measure(x, y, LOSS, lr=0.05)
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.05, mode="vmap")
    assert list(got) == ["fc1", "fc2", "fc3"]
    assert _max_rel(got, ref) < RTOL


@pytest.mark.parametrize(
    "conv_method,chunk", [("shifted", 8 << 20), ("shifted", 1), ("conv", 8 << 20), ("conv", 1), ("unfold", 0)]
)
def test_convnet_matches_vmap_reference(conv_method, chunk):
    model = _convnet()
    x, y = _batch((3, 32, 32), b=4)
    probe = DynamicsProbe(model, conv_method=conv_method, conv_chunk_bytes=chunk, population_size=100)
    got = probe.measure(x, y, LOSS, lr=0.1)
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.1, mode="vmap", population_size=100)
    assert list(got) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert _max_rel(got, ref) < RTOL


def test_copy_reference_equals_vmap_reference_without_interactions():
    model = _convnet()
    x, y = _batch((3, 32, 32), b=3)
    a = reference_per_sample_gradients(model, x, y, LOSS, mode="vmap")
    b = reference_per_sample_gradients(model, x, y, LOSS, mode="copy")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-10, atol=1e-14), name


@pytest.mark.parametrize("which", ["mlp", "convnet"])
def test_dropout_matches_copy_reference_with_same_masks(which):
    # Dropout draws one mask per forward pass; the reference replays the same RNG state, so both
    # see the same per-sample masks.
    model = _mlp(dropout=0.3) if which == "mlp" else _convnet(dropout=0.3)
    model.train()
    x, y = _batch((784,) if which == "mlp" else (3, 32, 32), b=4)
    probe = DynamicsProbe(model)
    state = torch.get_rng_state()
    got = probe.measure(x, y, LOSS, lr=0.05)
    torch.set_rng_state(state)
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.05, mode="copy")
    assert _max_rel(got, ref) < RTOL
    if which == "mlp":
        with pytest.raises(LipverifyError, match="mode='copy'"):
            reference_per_sample_gradients(model, x, y, LOSS, mode="vmap")
    # A different mask gives different terms: the comparison is sensitive to the masks.
    other = probe.measure(x, y, LOSS, lr=0.05)
    assert _max_rel(other, ref) > 1e-4


def test_batch_norm_matches_copy_reference():
    model = _convnet(batch_norm=True, dropout=0.2)
    model.train()
    x, y = _batch((3, 32, 32), b=4)
    probe = DynamicsProbe(model)
    state = torch.get_rng_state()
    got = probe.measure(x, y, LOSS, lr=0.05)
    torch.set_rng_state(state)
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.05, mode="copy")
    assert _max_rel(got, ref) < RTOL
    torch.set_rng_state(state)
    grads = reference_per_sample_gradients(model, x, y, LOSS, mode="copy")
    # The per-sample gradients average exactly to the batch gradient (interaction terms included).
    model.zero_grad()
    torch.set_rng_state(state)
    LOSS(model(x), y).backward()
    for n, m in model.named_modules():
        if n in grads:
            assert torch.allclose(grads[n].mean(0), m.weight.grad.reshape(grads[n].shape[1:]), rtol=1e-10)


def test_batch_norm_interaction_terms_are_not_vmap_gradients():
    # With batch statistics, the 'copy' definition differs from treating samples independently
    # (vmap over single samples would give per-sample batch statistics): documented choice.
    model = _convnet(batch_norm=True)
    model.eval()  # track_running_stats=False: batch statistics even in eval mode
    x, y = _batch((3, 32, 32), b=4)
    copy = reference_per_sample_gradients(model, x, y, LOSS, mode="copy")
    single = reference_per_sample_gradients(model, x, y, LOSS, mode="vmap")
    assert not torch.allclose(copy["conv1"], single["conv1"], rtol=1e-3)


def test_rejects_probe_without_b_scaling(monkeypatch):
    model = _small()
    x, y = _batch((30,), classes=5)
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.05)
    monkeypatch.setattr(DynamicsProbe, "_per_sample_scale", lambda self, b, red: 1.0)
    assert _max_rel(DynamicsProbe(model).measure(x, y, LOSS, lr=0.05), ref) > 0.5


def test_rejects_probe_with_uncentred_projections(monkeypatch):
    model = _small()
    x, y = _batch((30,), classes=5)
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.05)
    import lipverify.probe.dynamics_probe as probe_module

    monkeypatch.setattr(probe_module, "centre", lambda y_, x_: (y_, x_))
    assert _max_rel(DynamicsProbe(model).measure(x, y, LOSS, lr=0.05), ref) > 1e-3


def test_sum_reduction_and_per_sample_losses():
    model = _small()
    x, y = _batch((30,), classes=5)
    probe = DynamicsProbe(model)
    mean_terms = probe.measure(x, y, LOSS, lr=0.05)
    # L_sum = b L_mean is SGD on L_mean with learning rate b eta: mu, phi scale by b, psi by b^2.
    sum_terms = probe.measure(x, y, nn.CrossEntropyLoss(reduction="sum"), lr=0.05)
    none_terms = probe.measure(x, y, nn.CrossEntropyLoss(reduction="none"), lr=0.05)
    b = x.shape[0]
    for name in mean_terms:
        assert math.isclose(sum_terms[name].mu, b * mean_terms[name].mu, rel_tol=1e-10)
        assert math.isclose(sum_terms[name].phi, b * mean_terms[name].phi, rel_tol=1e-10)
        assert math.isclose(sum_terms[name].psi, b * b * mean_terms[name].psi, rel_tol=1e-10)
        assert math.isclose(none_terms[name].phi, mean_terms[name].phi, rel_tol=1e-10)
        assert math.isclose(none_terms[name].mu, mean_terms[name].mu, rel_tol=1e-10)


def test_measure_does_not_update_model_or_grads():
    model = _small()
    x, y = _batch((30,), classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.full_like(model[0].weight, 3.0)
    model[0].weight.grad = marker.clone()
    DynamicsProbe(model).measure(x, y, LOSS, lr=0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, marker)
    assert model[3].weight.grad is None


@pytest.mark.parametrize("warm", [False, True])
def test_discrete_truth_of_a_plain_sgd_step(warm):
    # warm: resolvent spectra, W_t snapshot shared with the spectrum, batch gradient kept as projections
    torch.manual_seed(0)
    model = _mlp()
    x, y = _batch((784,), b=8)
    lr = 0.005
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = _warm_probe(model, (784,), steps=2, lr=lr) if warm else DynamicsProbe(model)
    probe.before_step()
    if warm:
        assert all(isinstance(probe.decomposition_of(n), ResolventSpectrum) for n in probe.layer_names)
    with probe.capture():
        opt.zero_grad()
        LOSS(model(x), y).backward()
    probe.after_backward()
    terms = probe.compute(lr)
    opt.step()
    truth = probe.after_step(lr)
    for name, t in truth.items():
        # Delta W = -eta G_bar: the first-order prediction is mu (batch-mean drift) and the
        # second-order correction is exactly the dropped deterministic term.
        assert math.isclose(t["dsigma_first"], terms[name].mu, rel_tol=1e-9)
        assert math.isclose(t["dsigma_second"] - t["dsigma_first"], t["dropped_drift_term"], rel_tol=1e-9)
        # O(|dW|^2) vs O(|dW|^3) errors of the first- and second-order predictions
        err1 = abs(t["dsigma_observed"] - t["dsigma_first"])
        err2 = abs(t["dsigma_observed"] - t["dsigma_second"])
        assert err2 < 0.05 * err1, (name, err1, err2)


def test_full_gradient_drift_equals_batch_drift_on_the_whole_data():
    model = _small()
    x, y = _batch((30,), b=10, classes=5)
    probe = DynamicsProbe(model)
    batch_terms = probe.measure(x, y, LOSS, lr=0.05)
    full = probe.full_gradient([(x[:4], y[:4]), (x[4:], y[4:])], LOSS)
    mu_full = probe.drift(full, lr=0.05)
    for name in batch_terms:
        assert math.isclose(mu_full[name], batch_terms[name].mu, rel_tol=1e-10)
    with_full = probe.measure(x[:5], y[:5], LOSS, lr=0.05, mean_grads=full)
    for name in with_full:
        assert math.isclose(with_full[name].mu, mu_full[name], rel_tol=1e-10)


def test_weight_decay_and_injected_noise_terms():
    from lipverify.spectral import hessian_trace

    model = _small()
    x, y = _batch((30,), classes=5)
    probe = DynamicsProbe(model)
    with probe.capture():
        LOSS(model(x), y).backward()
    base = probe.compute(0.1)
    alpha, beta2, lam = 0.5, 1e-4, 1e-3
    mod = probe.compute(0.1, grad_scale=alpha, grad_noise_var=beta2, weight_decay=lam)
    for name, t in base.items():
        W = model.get_submodule(name).weight.detach()
        m = mod[name]
        assert math.isclose(m.mu, alpha * t.mu - 0.1 * lam * t.sigma, rel_tol=1e-10)
        assert math.isclose(m.phi**2, alpha**2 * t.phi**2 + 0.01 * beta2, rel_tol=1e-10)
        expected_psi = alpha**2 * t.psi + 0.5 * 0.01 * beta2 * float(hessian_trace(W))
        assert math.isclose(m.psi, expected_psi, rel_tol=1e-9)


def test_fast_decompose_matches_svd():
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 12), (12, 7), (9, 9)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        a, b = fast_decompose(W, torch.float64), decompose(W)
        assert torch.allclose(a.sigma, b.sigma, rtol=1e-12)
        assert torch.allclose(a.U[:, 0], b.U[:, 0], atol=1e-12)
        assert torch.allclose(a.V[:, 0], b.V[:, 0], atol=1e-12)
        # every singular triple satisfies W v_k = s_k u_k
        assert torch.allclose(W @ a.V, a.U * a.sigma, atol=1e-12)
    # rank-deficient input falls back to the SVD instead of dividing by zero
    W = torch.randn(8, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 6, generator=g, dtype=torch.float64
    )
    got, ref = fast_decompose(W, torch.float64), decompose(W)
    assert torch.isfinite(got.V).all()
    # and it is the accurate one: the Gram route would lose the small singular triples
    assert torch.allclose(got.sigma[:3], ref.sigma[:3], rtol=1e-12)
    assert torch.allclose(W @ got.V[:, :3], got.U[:, :3] * got.sigma[:3], atol=1e-12)
    # a small but positive sigma_min (1e-6 sigma_1): W^T U / s would lose ~12 digits in that column
    Q1, _ = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    W = Q1 @ torch.diag(torch.tensor([1.0, 0.5, 1e-6], dtype=torch.float64)) @ Q2.T  # (8, 3)
    got = fast_decompose(W, torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(got.U.T @ got.U, eye, atol=1e-10)
    assert torch.allclose(got.V.T @ got.V, eye, atol=1e-10)


def _smooth_convnet() -> nn.Module:
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


@pytest.mark.parametrize("which", ["mlp", "smooth-convnet"])
def test_float32_model_agrees_with_float64_reference(which):
    # float32 training: contractions in float32, spectral parts and centring in float64. Only rounding
    # separates the two runs: f32 errors ~1e-6 in activations and output gradients, amplified at most
    # ~10x by the centring of b = 6 samples, so 1e-4 has a 10x margin. The conv case uses tanh: with
    # ReLU/max-pool a pre-activation within f32 rounding of a kink flips its gradient between the two
    # runs (one flipped ReLU in the paper ConvNet's conv1 moved its mu by 2.6e-3 on an AMX CPU), which
    # is the model's non-smoothness, not the probe's precision.
    model = build_model("mlp", seed=0) if which == "mlp" else _smooth_convnet()
    x, y = _batch((784,) if which == "mlp" else (3, 32, 32), b=6)
    got = DynamicsProbe(model).measure(x.float(), y, LOSS, lr=0.05)
    ref = reference_layer_terms(model.double(), x, y, LOSS, lr=0.05)
    assert _max_rel(got, ref) < 1e-4


def test_unsupported_layers_are_listed_and_skippable():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 4), nn.Bilinear(4, 4, 2))
    with pytest.raises(LipverifyError, match=r"0 \(Conv1d\).*3 \(Bilinear\)"):
        DynamicsProbe(model)
    probe = DynamicsProbe(model, skip=["0", "3"])
    assert probe.layer_names == ["2"]
    with pytest.raises(LipverifyError, match="unknown modules"):
        DynamicsProbe(model, skip=["nope"])


def test_grouped_conv_shared_weights_and_parametrisation_are_rejected():
    with pytest.raises(LipverifyError, match="groups=2"):
        DynamicsProbe(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    other = nn.Linear(4, 4)
    other2 = nn.Linear(4, 4)
    other2.weight = other.weight
    with pytest.raises(LipverifyError, match="weight shared"):
        DynamicsProbe(nn.Sequential(other, other2))
    par = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))
    with pytest.raises(LipverifyError, match="parametrised"):
        DynamicsProbe(nn.Sequential(par))


def test_batch_of_one_and_layer_called_twice_are_refused():
    model = _mlp()
    x, y = _batch((784,), b=2)
    with pytest.raises(LipverifyError, match="b = 1"):
        DynamicsProbe(model).measure(x[:1], y[:1], LOSS, lr=0.1)
    lin = nn.Linear(4, 4).double()
    twice = DynamicsProbe(lin)
    with pytest.raises(LipverifyError, match="called 2 times"):
        twice.measure(torch.randn(3, 4, dtype=torch.float64), None, lambda out, _: lin(out).sum(), lr=0.1)


def test_schedule():
    s = ProbeSchedule({"terms": 1, "full_gradient": 50, "discrete": 0})
    assert s.due("terms", 7) and s.due("full_gradient", 100) and not s.due("full_gradient", 7)
    assert not s.due("discrete", 0)
    with pytest.raises(LipverifyError, match="unknown probe quantity"):
        ProbeSchedule({"sigma": 1})


def test_convnet_shape_contract():
    net = ConvNet(classes=7, batch_norm=True, dropout=0.5)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net.fc1.in_features == 2048


def test_cross_layer_diffusion_matches_materialised_covariance():
    # Diffusion of ln K without Assumption 3: eta^2 scale sum_i (sum_l u_l^T E_{l,i} v_l / sigma_l)^2,
    # computed here from the reference's materialised per-sample gradients.
    from lipverify.noise import estimator_scale

    model = _small()
    x, y = _batch((30,), b=7, classes=5)
    probe = DynamicsProbe(model)
    terms = probe.measure(x, y, LOSS, lr=0.1)
    grads = reference_per_sample_gradients(model, x, y, LOSS)
    total = 0.0
    for name, G in grads.items():
        dec = probe.decomposition_of(name)
        E = G - G.mean(0)
        total = total + (dec.u @ E @ dec.v) / dec.sigma1
    full = 0.01 * estimator_scale(7) * float((total * total).sum())
    independent = sum(t.phi**2 / t.sigma**2 for t in terms.values())
    cross = cross_layer_diffusion(terms)
    assert math.isclose(cross, full - independent, rel_tol=1e-9)
    assert math.isclose(cross, network_terms(terms).phi_sq_cross, rel_tol=1e-9)
    # with injected noise phi grows but the cross term does not
    with probe.capture():
        LOSS(model(x), y).backward()
    noisy = probe.compute(0.1, grad_noise_var=1e-3)
    assert math.isclose(cross_layer_diffusion(noisy), cross, rel_tol=1e-9)


# --------------------------------------------------------------------------- resolvent mode
def _warm_probe(model, shape, decomposition="resolvent", steps=3, lr=0.05, b=6, classes=10, **kw):
    """A probe that has seen ``steps`` SGD steps of ``model``, so its next decomposition is warm."""
    probe = DynamicsProbe(model, decomposition=decomposition, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for s in range(steps):
        x, y = _batch(shape, b=b, classes=classes, seed=100 + s)
        x = x.to(next(model.parameters()).dtype)
        probe.before_step()
        opt.zero_grad()
        with probe.capture():
            LOSS(model(x), y).backward()
        probe.after_backward()
        probe.compute(lr)
        opt.step()
        probe.after_step(lr)
    return probe


@pytest.mark.parametrize("which", ["mlp", "convnet"])
def test_resolvent_mode_matches_vmap_reference(which):
    # Warm-started resolvent decompositions (no full SVD) against torch.func + full SVDs, float64.
    model = _mlp() if which == "mlp" else _convnet()
    shape = (784,) if which == "mlp" else (3, 32, 32)
    probe = _warm_probe(model, shape, population_size=100)
    n_layers = len(probe.layer_names)
    stats = dict(probe.resolvent_stats)
    # the first decomposition of each layer is the full one, every later one is iterative
    assert stats["cold"] == n_layers and stats["fallback"] == 0 and stats["iterative"] == 3 * n_layers
    x, y = _batch(shape, b=6)
    got = probe.measure(x, y, LOSS, lr=0.05)
    # W_3 was decomposed (warm) by the last after_step; measure reuses it
    assert probe.resolvent_stats == stats
    assert all(isinstance(probe.decomposition_of(n), ResolventSpectrum) for n in probe.layer_names)
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.05, mode="vmap", population_size=100)
    assert _max_rel(got, ref) < RTOL
    # the gram mode on the same weights agrees to rounding
    gram = DynamicsProbe(model, population_size=100).measure(x, y, LOSS, lr=0.05)
    assert _max_rel(got, gram) < 1e-10


def _with_gap(m, n, rel_gap, seed):
    """Random (m, n) float64 matrix with sigma_1 = 1 and sigma_2 = 1 - rel_gap."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    s = torch.sort(torch.rand(r, generator=g, dtype=torch.float64), descending=True).values
    s = s * 0.9 * (1.0 - rel_gap)
    s[0], s[1] = 1.0, 1.0 - rel_gap
    return U[:, :r] @ torch.diag(s) @ V[:, :r].T


def _warm_basis(W, seed, noise=1e-2):
    """Top-4 small-side singular vectors of a perturbation of W (a previous step's basis)."""
    g = torch.Generator().manual_seed(seed)
    prev = decompose(W + noise * torch.randn(W.shape, generator=g, dtype=W.dtype) / max(W.shape) ** 0.5)
    small = prev.V if W.shape[0] > W.shape[1] else prev.U
    return small[:, :4]


@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (9, 9), (40, 60), (60, 40)])
@pytest.mark.parametrize("rel_gap", [0.3, 1e-3, 1e-5])
@pytest.mark.parametrize("route", ["iterative", "direct"])
def test_resolvent_spectrum_matches_full_decompositions(shape, rel_gap, route):
    W = _with_gap(*shape, rel_gap, seed=sum(shape))
    direct_k = 0 if route == "iterative" else min(shape)
    spec, iters = resolvent_spectrum(W, torch.float64, _warm_basis(W, 1), direct_k=direct_k)
    assert spec is not None and (1 <= iters <= 25 if route == "iterative" else iters == 0)
    assert spec.basis.shape == (min(shape), 4)
    ref = decompose(W)
    gram = fast_decompose(W, torch.float64)
    m, n = shape
    g = torch.Generator().manual_seed(2)
    E = torch.randn(5, m, n, generator=g, dtype=torch.float64)
    for full in (ref, gram):
        assert math.isclose(float(spec.sigma1), float(full.sigma1), rel_tol=1e-13)
        # sigma_2 from a Rayleigh-Ritz value: error <= r_2^2 / separation, far below rtol 1e-8 of the gap
        assert math.isclose(float(spec.gap), float(full.gap), rel_tol=1e-8)
        # the singular vectors to rounding over the gap (eps / rel_gap), same sign convention
        tol = 1e-13 / rel_gap
        assert torch.allclose(spec.u, full.u, atol=tol) and torch.allclose(spec.v, full.v, atol=tol)
        q_ref = quadratic_form_from_projections(full, full.u @ E, E @ full.v)
        q = spec.quadratic_form(spec.u @ E, E @ spec.v)
        # Lemma 13 terms carry a relative rounding error ~ eps / rel_gap (MATH section 7)
        assert torch.allclose(q, q_ref, rtol=1e-12 / rel_gap, atol=0)
        tr = hessian_trace_from_spectrum(full.sigma, m, n)
        assert math.isclose(float(spec.hessian_trace()), float(tr), rel_tol=1e-12 / rel_gap)


def test_resolvent_wrong_variants_are_rejected():
    # The deflation term s1^2 w w^T and the push-through term W y_perp are both needed.
    W = _with_gap(9, 14, 0.2, seed=3)
    spec, _ = resolvent_spectrum(W, torch.float64, _warm_basis(W, 4), direct_k=0)
    ref = decompose(W)
    E = torch.randn(4, 9, 14, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y, x = spec.u @ E, E @ spec.v
    q_ref = quadratic_form_from_projections(ref, ref.u @ E, E @ ref.v)
    assert torch.allclose(spec.quadratic_form(y, x), q_ref, rtol=1e-12)
    s1, u, v = spec.s1, spec.u, spec.v
    yp = y - (y @ v)[:, None] * v
    xp = x - (x @ u)[:, None] * u
    # missing push-through term: only the R_U part and the R_V null-space part survive
    z = torch.linalg.solve_triangular(spec.L, (s1 * xp).T, upper=False)
    no_push = ((yp * yp).sum(-1) + (z * z).sum(0)) / s1
    assert ((no_push - q_ref).abs() / q_ref).max() > 1e-2
    # non-deflated resolvent s1^2 I - W W^T: singular (u is its null vector), so whether its Cholesky
    # fails is a rounding coin flip of the kernel; judged by the spectrum instead. Computed eigenvalues
    # are within c k eps ||.|| of the exact ones (backward stable eigh; c = 4 covers s1's own rounding),
    # so the non-deflated matrix's smallest is at the rounding level and the factor's L L^T must have
    # the deflated A's: s1^2 on u, s1^2 - s2^2 = 1 - 0.8^2 = 0.36 at the bottom.
    k, eps = 9, torch.finfo(W.dtype).eps
    rounding = 4 * k * eps * float(s1) ** 2
    non_deflated = s1 * s1 * torch.eye(k, dtype=W.dtype) - W @ W.T
    assert float(torch.linalg.eigvalsh(non_deflated).abs().min()) <= rounding
    LLt = spec.L @ spec.L.T
    assert abs(float(u @ LLt @ u) - float(s1) ** 2) <= rounding  # ~0 with the non-deflated factor
    assert abs(float(torch.linalg.eigvalsh(LLt)[0]) - (1.0 - 0.8**2)) <= rounding
    # used in the resolvent, u^T A^{-1} u = 1 / s1^2 (a factor of the non-deflated matrix: >= 1 / rounding),
    # to the solve's relative error 4 k eps cond(A), cond(A) = s1^2 / (s1^2 - s2^2) = 1 / 0.36
    z_u = torch.linalg.solve_triangular(spec.L, u[:, None], upper=False)
    assert abs(float((z_u * z_u).sum()) * float(s1) ** 2 - 1.0) <= 4 * k * eps / 0.36


def test_phase_one_shift_falls_back_to_the_safe_margins_for_a_poor_warm_start(monkeypatch):
    # Phase 1 first tries a shift from the Kato-Temple estimate (fast for a warm start); a poor warm
    # start (2nd..5th singular vectors plus 1e-3 of the top one: theta_1 ~ sigma_2^2, far from lambda_1)
    # makes that factorisation fail, and the safe margins max(2r, 1e-2 spread) 4^j must follow: the
    # iteration then converges in about 14 of its 25 iterations. Wrong variant: the estimate grown by
    # 4x only (8 tries) never gets above lambda_1 -> None (full-decomposition fallback every time).
    import lipverify.probe.resolvent as resolvent_mod

    def poor_basis(W):
        d = decompose(W)
        basis = d.U[:, 1:5].clone()
        basis[:, 0] += 1e-3 * d.U[:, 0]
        return basis

    cases = [_with_gap(60, 80, 1e-3, seed=seed) for seed in range(3)]
    for W in cases:
        spec, _ = resolvent_spectrum(W, torch.float64, poor_basis(W), direct_k=0)
        assert spec is not None
        assert math.isclose(float(spec.s1), 1.0, rel_tol=1e-12)
        assert math.isclose(float(spec.s2), 1.0 - 1e-3, rel_tol=1e-12)
        # and a warm start still converges from the first (estimated) margin
        warm, _ = resolvent_spectrum(W, torch.float64, _warm_basis(W, 5, noise=1e-4), direct_k=0)
        assert warm is not None and math.isclose(float(warm.s1), 1.0, rel_tol=1e-12)
    real = resolvent_mod._shift_margins

    def estimate_only(r, theta1, spread, eps):
        first = real(r, theta1, spread, eps)[0]
        return [first * 4**j for j in range(8)]

    monkeypatch.setattr(resolvent_mod, "_shift_margins", estimate_only)
    for W in cases:
        assert resolvent_spectrum(W, torch.float64, poor_basis(W), direct_k=0)[0] is None


@pytest.mark.parametrize("cholesky_rounds", ["as-is", "positive"])
def test_resolvent_spectrum_gives_up_on_degenerate_or_unconverged_input(monkeypatch, cholesky_rounds):
    # sigma_1 = sigma_2 exactly: the deflated A is singular, so whether its Cholesky fails is a rounding
    # coin flip; "positive" makes every factorisation succeed (a kernel rounding the singular pivot up,
    # by the eigenvalue rounding 4 k eps shift). Either way -> None, decided from s1^2 - lambda_2.
    if cholesky_rounds == "positive":
        import lipverify._linalg as linalg_mod

        real = linalg_mod.shifted_cholesky
        eps = torch.finfo(torch.float64).eps

        def rounded_up(G, shift, w=None, alpha=0.0):
            return real(G, shift * (1 + 4 * G.shape[0] * eps), w, alpha)

        monkeypatch.setattr(linalg_mod, "shifted_cholesky", rounded_up)
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    basis = torch.eye(4, dtype=torch.float64)[:, :3] + 1e-3
    for direct_k in (0, 4):
        assert resolvent_spectrum(W, torch.float64, basis, direct_k=direct_k)[0] is None
    # the same spectrum rotated: computed sigma_1, sigma_2 differ by 0 to a few ulps
    W = _with_gap(9, 14, 0.0, seed=11)
    for direct_k in (0, 9):
        assert resolvent_spectrum(W, torch.float64, _warm_basis(W, 12), direct_k=direct_k)[0] is None
    # a poor basis and one iteration allowed: not converged -> None
    W = _with_gap(30, 40, 1e-2, seed=7)
    rand = torch.randn(30, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    spec, iters = resolvent_spectrum(W, torch.float64, rand, max_iter=1, direct_k=0)
    assert spec is None and iters == 1


def test_resolvent_mode_falls_back_to_the_full_decomposition(monkeypatch, probe_route):
    import lipverify.probe.spectrum_cache as probe_mod

    model = _small()
    probe = _warm_probe(model, (30,), steps=2, b=5, lr=0.1, classes=5)
    assert probe.resolvent_stats["fallback"] == 0
    if probe_route == "device":
        _device_non_convergence_is_flagged_and_restarts_cold(model, probe, probe_mod, monkeypatch)
        return
    monkeypatch.setattr(probe_mod, "resolvent_spectrum", lambda W, dtype, basis: (None, 25))
    with torch.no_grad():  # a new weight: the next decomposition is not the cached one
        for p in model.parameters():
            p.mul_(1.001)
    x, y = _batch((30,), classes=5)
    got = probe.measure(x, y, LOSS, lr=0.1)
    assert probe.resolvent_stats["fallback"] == 3 and probe.resolvent_stats["iterations"] >= 75
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.1)
    assert _max_rel(got, ref) < RTOL


def _device_non_convergence_is_flagged_and_restarts_cold(model, probe, probe_mod, monkeypatch):
    # the device route cannot fall back within the step (that is a host branch): a spectrum whose
    # on-device verdict is False must come out flagged (converged=False, degenerate=True) and the layer
    # restarts cold at its next decomposition
    from dataclasses import replace

    real, real_batched = probe_mod.resolvent_spectrum_device, probe_mod.resolvent_spectra_device
    monkeypatch.setattr(
        probe_mod, "resolvent_spectrum_device", lambda *a: replace(real(*a), ok=torch.tensor(False))
    )
    monkeypatch.setattr(  # the layers' warm steps run batched
        probe_mod,
        "resolvent_spectra_device",
        lambda *a: [replace(s, ok=torch.tensor(False)) for s in real_batched(*a)],
    )
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
    x, y = _batch((30,), classes=5)
    cold = probe.resolvent_stats["cold"]
    got = probe.measure(x, y, LOSS, lr=0.1)
    assert all(not t.converged and t.degenerate for t in got.values())
    assert probe.resolvent_stats["fallback"] == 3
    monkeypatch.setattr(probe_mod, "resolvent_spectrum_device", real)
    monkeypatch.setattr(probe_mod, "resolvent_spectra_device", real_batched)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
    got = probe.measure(x, y, LOSS, lr=0.1)
    assert probe.resolvent_stats["cold"] == cold + 3
    assert all(t.converged and not t.degenerate for t in got.values())
    assert _max_rel(got, reference_layer_terms(model, x, y, LOSS, lr=0.1)) < RTOL


def test_resolvent_mode_weight_decay_noise_and_discrete_truth():
    from lipverify.spectral import hessian_trace

    model = _small()
    probe = _warm_probe(model, (30,), steps=2, b=5, lr=0.1, classes=5)
    gram = DynamicsProbe(model)
    x, y = _batch((30,), classes=5)
    kw = {"grad_scale": 0.5, "grad_noise_var": 1e-4, "weight_decay": 1e-3}
    terms = {}
    for p in (probe, gram):
        with p.capture():
            model.zero_grad()
            LOSS(model(x), y).backward()
        terms[p] = p.compute(0.1, **kw)
    assert isinstance(probe.decomposition_of("0"), ResolventSpectrum)
    assert _max_rel(terms[probe], terms[gram]) < 1e-10
    for name in terms[probe]:
        W = model.get_submodule(name).weight.detach()
        tr = float(hessian_trace(W))
        assert math.isclose(float(probe.decomposition_of(name).hessian_trace()), tr, rel_tol=1e-10)
    # discrete truth of one step: same numbers as the gram mode
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    truths = []
    for p in (probe, gram):
        p.before_step()
    opt.step()
    for p in (probe, gram):
        p.after_backward()
        truths.append(p.after_step(0.1))
    for name in truths[0]:
        for k in ("dsigma_first", "dsigma_second", "dropped_drift_term"):
            assert math.isclose(truths[0][name][k], truths[1][name][k], rel_tol=1e-10), (name, k)
        assert truths[0][name]["update_exceeds_gap"] == truths[1][name]["update_exceeds_gap"]


def test_update_exceeds_gap():
    g = torch.Generator().manual_seed(0)
    # |dW|_F = 1 but |dW|_2 = 1 / sqrt(4): the spectral norm decides, not the Frobenius bound
    dW = torch.eye(4, dtype=torch.float64) / 2
    assert not update_exceeds_gap(dW, gap=1.2)  # 0.5 < 0.6
    assert update_exceeds_gap(dW, gap=1.0)  # 0.5 >= 0.5
    assert not update_exceeds_gap(torch.randn(5, 6, generator=g, dtype=torch.float64) * 1e-6, gap=1e-3)
    # in the discrete truth: a tiny step keeps clear of the gap, a huge one does not
    for lr, expected in ((1e-7, False), (50.0, True)):
        model = _small()
        probe = DynamicsProbe(model)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        x, y = _batch((30,), classes=5)
        probe.before_step()
        with probe.capture():
            LOSS(model(x), y).backward()
        probe.after_backward()
        opt.step()
        flags = {n: t["update_exceeds_gap"] for n, t in probe.after_step(lr).items()}
        assert set(flags.values()) == {expected}, (lr, flags)
    # gap << |dW|_2 << sigma_1: the gap decides (sigma_1 would say the update is small)
    layer = nn.Linear(6, 5).double()
    U, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 5, generator=g, dtype=torch.float64))
    with torch.no_grad():
        layer.weight.copy_(
            U @ torch.diag(torch.tensor([1.0, 0.999, 0.5, 0.3, 0.1], dtype=torch.float64)) @ V.T
        )
    probe = DynamicsProbe(nn.Sequential(layer))
    probe.before_step()
    with torch.no_grad():
        layer.weight.add_(0.01 * torch.outer(U[:, 1], V[:, 0]))  # |dW|_2 = 0.01 >= gap / 2 = 5e-4
    assert probe.after_step(0.1)["0"]["update_exceeds_gap"]


@pytest.mark.parametrize("threads", [1, 2])  # scipy's syrk/potrf (one thread) or torch's kernels
@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_update_exceeds_gap_decides_what_the_bounds_cannot_without_an_svd(shape, threads, monkeypatch):
    # dW with singular values 2 (1 - 1e-3 j), j = 0..k-1: |dW|_F ~ sqrt(k) |dW|_2, and 8 power steps
    # from a row of dW stay below 2 (1 - 2e-4), so for gap / 2 = 2 (1 -+ 1e-4) neither bound decides
    # and the Gram/Cholesky branch must (the spy below checks that it ran). The expected answer is
    # |dW|_2 = 2 against gap / 2 with a relative margin of 1e-4, far above float64 rounding of a k x k
    # factorisation (~k eps). sigma_1 = 2, not 1, so that comparing sigma_1^2 with gap / 2 instead of
    # (gap / 2)^2 answers wrongly.
    from lipverify import _linalg
    from lipverify.probe.interpose import counting

    factorisations, original = [], _linalg.shifted_cholesky

    def spy(G, shift, *args, **kwargs):
        factorisations.append(shift)
        return original(G, shift, *args, **kwargs)

    monkeypatch.setattr(_linalg, "shifted_cholesky", spy)
    g = torch.Generator().manual_seed(3)
    m, n = shape
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    dW = U @ torch.diag(2 * (1 - 1e-3 * torch.arange(k, dtype=torch.float64))) @ V.T
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for half, expected in ((2 * (1 + 1e-4), False), (2 * (1 - 1e-4), True)):
            factorisations.clear()
            with counting() as c:
                assert update_exceeds_gap(dW, 2 * half) is expected
            assert factorisations == [half * half]  # neither bound decided
            # wrong variant (the decision before): matrix_norm(dW, 2), a full SVD of dW
            assert not {"aten.linalg_svd", "aten._linalg_svd", "aten.linalg_matrix_norm"} & set(c.ops), c.ops
        # nothing certifies an update as small against a gap that is not positive, or with inf or NaN
        # entries (the old SVD raised for those; scipy's potrf on one thread accepts a NaN pivot)
        zero = torch.zeros_like(dW)
        assert update_exceeds_gap(zero, 1.0) is False
        for bad_gap in (0.0, -1e-12, float("nan")):
            assert update_exceeds_gap(zero, bad_gap) is True, bad_gap
        for bad in (float("nan"), float("inf")):
            broken = dW.clone()
            broken[0, 0] = bad
            assert update_exceeds_gap(broken, 1e6) is True, bad
    finally:
        torch.set_num_threads(previous)


def test_resolvent_mode_float32_model():
    # float32 training with float32 spectral parts (the fast training setting): as accurate as the
    # float32 gram mode against the float64 reference (both lose ~eps_32 / rel_gap).
    model = build_model("mlp", seed=0)
    probe = _warm_probe(model, (784,), compute_dtype=torch.float32, b=6)
    x, y = _batch((784,), b=6)
    got = probe.measure(x.float(), y, LOSS, lr=0.05)
    gram = DynamicsProbe(model, compute_dtype=torch.float32).measure(x.float(), y, LOSS, lr=0.05)
    assert probe.resolvent_stats["fallback"] == 0 and probe.resolvent_stats["iterative"] >= 9
    ref = reference_layer_terms(model.double(), x, y, LOSS, lr=0.05)
    err, err_gram = _max_rel(got, ref), _max_rel(gram, ref)
    assert err < 1e-2 and err < 3 * err_gram, (err, err_gram)


def test_resolvent_warm_state_makes_a_resumed_probe_bitwise_identical():
    model = _small()
    probe = _warm_probe(model, (30,), steps=3, b=5, lr=0.1, classes=5)
    state = probe.warm_state()
    assert all(isinstance(b, torch.Tensor) for b in state.values())
    resumed = DynamicsProbe(model, decomposition="resolvent")
    resumed.load_warm_state(state)
    for name in probe.layer_names:
        a, b = probe.decomposition_of(name), resumed.decomposition_of(name)
        assert isinstance(b, ResolventSpectrum)
        for f in ("s1", "s2", "u", "v", "L"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (name, f)
    # without the state the resumed probe starts cold (full decomposition), to rounding only
    cold = DynamicsProbe(model, decomposition="resolvent")
    assert not isinstance(cold.decomposition_of("0"), ResolventSpectrum)
    with pytest.raises(LipverifyError, match="unknown layer"):
        cold.load_warm_state({"nope": None})


def test_gap_flag_follows_the_compute_dtype():
    """Relative gap 1e-4: Lemma 13 terms carry ~eps/gap relative error (1e-3 in float32), so a
    float32 probe flags the layer (threshold sqrt(eps32) = 3.5e-4) and a float64 one does not
    (threshold 1e-6). A probe pinned to 1e-6 would leave the float32 layer unflagged."""
    g = torch.Generator().manual_seed(5)
    Q1, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    S = torch.zeros(4, 6, dtype=torch.float64)
    S[range(4), range(4)] = torch.tensor([1.0, 1.0 - 1e-4, 0.5, 0.2], dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(Q1 @ S @ Q2.T)
    x = torch.randn(8, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    flags = {
        dtype: DynamicsProbe(model, compute_dtype=dtype, decomposition="svd")
        .measure(x, y, LOSS, lr=0.05)["0"]
        .degenerate
        for dtype in (torch.float32, torch.float64)
    }
    assert flags == {torch.float32: True, torch.float64: False}


# --------------------------------------------------------------------------- W y from the forward output
def _spy_weight_times_y(monkeypatch):
    """Record, per quadratic-form call of the resolvent route, whether W y came from the forward."""
    calls = []
    orig = ResolventSpectrum.quadratic_form

    def spy(self, y, x, weight_times_y=None):
        calls.append(weight_times_y is not None)
        return orig(self, y, x, weight_times_y)

    monkeypatch.setattr(ResolventSpectrum, "quadratic_form", spy)
    return calls


def test_linear_output_shortcut_matches_the_product_with_w(monkeypatch):
    # MATH section 2: W y_i = sum_p (delta_{i,p}^T u)(z_{i,p} - bias) from the Linear layer's output
    model = _mlp()
    probe = _warm_probe(model, (784,), population_size=100)
    x, y = _batch((784,), b=6)
    calls = _spy_weight_times_y(monkeypatch)
    fast = probe.measure(x, y, LOSS, lr=0.05)
    assert calls == [True] * 3  # every MLP layer is wide: all three take the shortcut
    orig = DynamicsProbe._contract

    def without_outputs(self, layer, a, d, u, v, outputs=None):
        return orig(self, layer, a, d, u, v)

    monkeypatch.setattr(DynamicsProbe, "_contract", without_outputs)
    slow = probe.measure(x, y, LOSS, lr=0.05)
    assert calls[3:] == [False] * 3
    assert _max_rel(fast, slow) < 1e-12
    ref = reference_layer_terms(model, x, y, LOSS, lr=0.05, mode="vmap", population_size=100)
    assert _max_rel(fast, ref) < RTOL
    # wrong variant: the bias left in z
    monkeypatch.setattr(
        DynamicsProbe,
        "_contract",
        lambda self, layer, a, d, u, v, outputs=None: orig(
            self, layer, a, d, u, v, None if outputs is None else outputs + layer.module.bias.detach()
        ),
    )
    assert _max_rel(probe.measure(x, y, LOSS, lr=0.05), ref) > 1e-3


def test_linear_output_shortcut_skips_outputs_changed_in_place(monkeypatch):
    # ReLU(inplace=True) overwrites the first layer's output: that layer multiplies by W instead
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(inplace=True), nn.Linear(20, 5)).double()
    probe = _warm_probe(model, (30,), steps=2, b=5, classes=5)
    x, y = _batch((30,), classes=5)
    calls = _spy_weight_times_y(monkeypatch)
    got = probe.measure(x, y, LOSS, lr=0.1)
    assert calls == [False, True]
    assert _max_rel(got, reference_layer_terms(model, x, y, LOSS, lr=0.1)) < RTOL


def _forward_output_psi_bound(probe, name, lr, psi) -> float:
    """Largest ``|psi(W y from the float32 forward output) - psi(W y as a float64 product)|`` of layer
    ``name`` for the last capture (float32 model, float64 spectral parts, mean loss, no population
    correction), ``psi`` the product path's value.

    Both paths use the same float32 ``t_i = delta_i^T u``. The product path multiplies
    ``y_i = fl32(t_i a_i)`` (error <= u |t_i| |a_i|) by W in float64; the shortcut takes
    ``t_i (fl32(W a_i + c) - c)`` (float32 matmul, any summation order: error <= gamma_{n+1}
    (|W| |a_i| + |c|)). So ``|e_i| <= b |t_i| gamma_{n+2} (|W| |a_i| + |c|)`` entrywise (b: the
    per-sample scale of a mean loss), u = 2^-24, ``gamma_j = j u / (1 - j u)``. Centring does not grow
    ``sum_i |e_i|^2`` (a projection), ``|L^{-1} e| <= |e| / sqrt(s1^2 - s2^2)`` (s1^2 - s2^2: the
    smallest eigenvalue of the deflated A), and with ``S = sum_i |L^{-1} e_i|^2 / s1``,
    ``Q = sum_i q_i = psi / k``, ``k = lr^2 b / (2 (b - 1))``:
    ``|d psi| <= k (2 sqrt(Q S) + S) = 2 sqrt(k psi S) + k S``; plus 1e-10 psi of float64 rounding."""
    from lipverify.noise import estimator_scale
    from lipverify.probe import weight_matrix

    layer = probe._layers[name]
    dec = probe.decomposition_of(name)
    a, delta = layer.inputs.double(), layer.grad_out.double()
    b, n = a.shape
    W = weight_matrix(layer.module).double()
    t = b * (delta @ dec.u).abs()
    u32 = 2.0**-24
    gamma = (n + 2) * u32 / (1 - (n + 2) * u32)
    e = gamma * t[:, None] * (a.abs() @ W.abs().T + layer.module.bias.detach().double().abs())
    s1, s2 = float(dec.s1), float(dec.s2)
    S = float((e * e).sum()) / (s1 * (s1 * s1 - s2 * s2))
    k = 0.5 * lr * lr * estimator_scale(b)
    return 2 * math.sqrt(k * psi * S) + k * S + 1e-10 * psi


def _psi_with_and_without_forward_output(model, monkeypatch, outputs_fn=None, before_compute=None):
    """(terms with W y from the forward output, terms of the float64 product, W-y-shortcut flags, probe)
    for one float32 batch of ``model`` (float32) with float64 spectral parts. ``outputs_fn`` /
    ``before_compute``: a wrong variant (what the shortcut receives as z / a change after the capture)."""
    probe = _warm_probe(model, (784,))
    x, y = _batch((784,))
    x = x.float()
    orig = DynamicsProbe._contract
    calls = _spy_weight_times_y(monkeypatch)

    def contract(self, layer, a, d, u, v, outputs=None):
        if outputs is not None and outputs_fn is not None:
            outputs = outputs_fn(layer, outputs)
        return orig(self, layer, a, d, u, v, outputs)

    def without_outputs(self, layer, a, d, u, v, outputs=None):
        return orig(self, layer, a, d, u, v)

    results = []
    for fn in (contract, without_outputs):
        monkeypatch.setattr(DynamicsProbe, "_contract", fn)
        with probe.capture():
            LOSS(model(x), y).backward()
        if before_compute is not None:
            before_compute(probe)
        results.append(dict(probe.compute(0.05)))
    monkeypatch.setattr(DynamicsProbe, "_contract", orig)
    n = len(probe.layer_names)
    return results[0], results[1], calls[:n], probe, x, y


def _outside_forward_output_bound(probe, fast, slow) -> list[str]:
    """Layers whose psi from the forward output misses the float64 product's by more than the bound;
    sigma, mu, phi and the noise projections do not involve W y and must agree exactly."""
    outside = []
    for name in probe.layer_names:
        for f in ("sigma", "gap", "mu", "phi"):
            assert getattr(fast[name], f) == getattr(slow[name], f), (name, f)
        assert torch.equal(fast[name].noise_projections, slow[name].noise_projections)
        bound = _forward_output_psi_bound(probe, name, 0.05, slow[name].psi)
        if abs(fast[name].psi - slow[name].psi) > bound:
            outside.append(name)
    return outside


def test_float32_forward_output_gives_w_y_for_float64_spectral_parts(monkeypatch, probe_route):
    # Host route: a float32 model with float64 spectral parts takes W y_i from the float32 forward
    # output (no (b, n) x (n, m) float64 product). Its error is within the derived bound of
    # _forward_output_psi_bound, and the terms agree with the float64 reference as well as the float64
    # product's terms do (float32 criterion of test_float32_model_agrees_with_float64_reference).
    # The device route keeps the float64 product (fewer launches): the same checks hold trivially.
    model = build_model("mlp", seed=0)
    fast, slow, calls, probe, x, y = _psi_with_and_without_forward_output(model, monkeypatch)
    assert calls == [probe_route == "host"] * 3
    assert _outside_forward_output_bound(probe, fast, slow) == []
    ref = reference_layer_terms(model.double(), x.double(), y, LOSS, lr=0.05)
    assert _max_rel(slow, ref) < 1e-4 and _max_rel(fast, ref) < 1e-4
    for name in probe.layer_names:
        bound = _forward_output_psi_bound(probe, name, 0.05, slow[name].psi)
        assert abs(fast[name].psi - ref[name].psi) <= abs(slow[name].psi - ref[name].psi) + bound


@pytest.mark.parametrize("wrong", ["bias left in z", "z changed in place after the capture"])
def test_float32_forward_output_wrong_variants_leave_the_bound(wrong, monkeypatch, probe_route):
    if probe_route == "device":
        pytest.skip("the device route keeps the float64 product for float32 forward outputs")
    model = build_model("mlp", seed=0)
    if wrong == "bias left in z":
        fast, slow, calls, probe, _, _ = _psi_with_and_without_forward_output(
            model, monkeypatch, outputs_fn=lambda layer, z: z + layer.module.bias.detach()
        )
    else:  # an in-place op the version check would have caught, here hidden from it

        def relu_in_place_unseen(probe):
            for layer in probe._layers.values():
                layer.outputs.relu_()
                layer.outputs_version = layer.outputs._version

        fast, slow, calls, probe, _, _ = _psi_with_and_without_forward_output(
            model, monkeypatch, before_compute=relu_in_place_unseen
        )
    assert calls == [True] * 3
    assert _outside_forward_output_bound(probe, fast, slow) != []


@pytest.mark.parametrize("decomposition", ["resolvent", "gram"])
def test_after_step_releases_the_old_spectrum_before_the_new_one(decomposition, monkeypatch):
    # peak memory: W_t's spectrum (a weight copy and a k x k factor per layer) must be garbage by the
    # time W_{t+1}'s is computed, or the probe holds two of each at its peak
    import weakref

    import lipverify.probe.spectrum_cache as probe_module

    model = _small()
    probe = _warm_probe(model, (30,), decomposition=decomposition, steps=2, b=5, lr=0.1, classes=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch((30,), b=5, classes=5, seed=7)
    probe.before_step()
    old = [weakref.ref(probe.decomposition_of(name)) for name in probe.layer_names]
    with probe.capture():
        LOSS(model(x), y).backward()
    probe.after_backward()
    probe.compute(0.1)
    opt.step()
    alive = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            alive.append(sum(ref() is not None for ref in old))
            return fn(*args, **kwargs)

        return wrapped

    for fn in ("resolvent_spectrum", "resolvent_spectrum_device", "resolvent_spectra_device"):
        monkeypatch.setattr(probe_module, fn, spy(getattr(probe_module, fn)))
    for fn in ("fast_decompose",):
        monkeypatch.setattr(probe_module, fn, spy(getattr(probe_module, fn)))
    probe.after_step(0.1)
    if probe.on_device_route():
        # one batch for every layer (resolvent_spectra_device), once all old spectra are released
        assert alive == [0]
    else:
        # layer l's new spectrum is computed once layers 0..l have released their old ones
        assert alive == [len(old) - 1 - i for i in range(len(old))]


@pytest.mark.parametrize("write", ["data", "fused-sgd"])
def test_cached_spectrum_follows_writes_that_do_not_bump_the_version(write, probe_route):
    # a write through .data and a fused optimiser kernel change W without its version counter; a
    # cache keyed on (data_ptr, version) alone keeps serving W_t's spectrum (sigma, mu, psi of W_t,
    # dsigma_observed = 0)
    lr = 0.05
    results = {}
    for variant in ("plain", write):
        model = _small()
        x, y = _batch((30,), classes=5)
        probe = _warm_probe(model, (30,), steps=2, b=6, lr=lr, classes=5)
        versions = [p._version for p in model.parameters()]
        probe.before_step()
        with probe.capture():
            LOSS(model(x), y).backward()
        probe.after_backward()
        probe.compute(lr)
        if variant == "data":
            for p in model.parameters():
                p.data.mul_(1.5)
        else:
            torch.optim.SGD(model.parameters(), lr=lr, fused=variant == "fused-sgd").step()
        if variant != "plain":
            assert [p._version for p in model.parameters()] == versions  # the case under test
        results[variant] = probe.after_step(lr)
        exact = {
            name: float(torch.linalg.matrix_norm(model[i].weight.detach(), 2))
            for name, i in zip(probe.layer_names, (0, 3, 5), strict=True)
        }
        for name, sigma in probe.sigmas().items():
            assert math.isclose(sigma, exact[name], rel_tol=1e-12)
        after = probe.measure(x, y, LOSS, lr=lr)
        assert _max_rel(after, reference_layer_terms(model, x, y, LOSS, lr=lr)) < RTOL
        # a write between steps: the next step's before_step (and its compute) must see it
        for p in model.parameters():
            p.data.mul_(0.5)
        probe.before_step()
        with probe.capture():
            LOSS(model(x), y).backward()
        probe.after_backward()
        terms = probe.compute(lr)
        for name, sigma in exact.items():
            got = terms[name]
            if probe_route == "device" and not got.converged:
                # the device-side cache check flagged the stale spectrum (no host branch); never used
                assert got.degenerate
                assert math.isclose(probe.sigmas()[name], 0.5 * sigma, rel_tol=1e-12)
            else:
                assert math.isclose(got.sigma, 0.5 * sigma, rel_tol=1e-12)
    for name, truth in results[write].items():
        if write == "data":  # every sigma_1 scales by 1.5
            sigma_before = exact[name] / 1.5
            assert math.isclose(truth["dsigma_observed"], 0.5 * sigma_before, rel_tol=1e-12)
        else:  # the fused kernel takes the same step
            assert math.isclose(
                truth["dsigma_observed"], results["plain"][name]["dsigma_observed"], rel_tol=1e-9
            )


def test_computed_frozen_and_custom_forward_weights_are_rejected():
    class DoubledLinear(nn.Linear):  # rescales its weight at run time: G_i != delta_i a_i^T
        def forward(self, x):
            return F.linear(x, 2 * self.weight, self.bias)

    class DoubledConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, 2 * weight, bias)

    class TaggedLinear(nn.Linear):  # the stock forward: supported
        pass

    frozen = nn.Linear(4, 4)
    frozen.weight.requires_grad_(False)
    cases = [
        (nn.utils.spectral_norm(nn.Linear(4, 4)), "computed, not a Parameter"),
        (frozen, "frozen weight"),
        (DoubledLinear(4, 4), "DoubledLinear overrides forward"),
        (DoubledConv(2, 2, 3), "DoubledConv overrides _conv_forward"),
    ]
    for module, message in cases:
        with pytest.raises(LipverifyError, match=message):
            DynamicsProbe(nn.Sequential(module, nn.ReLU(), nn.Linear(4, 2)))
        assert DynamicsProbe(nn.Sequential(module, nn.ReLU(), nn.Linear(4, 2)), skip=["0"]).layer_names == [
            "2"
        ]
    assert DynamicsProbe(nn.Sequential(TaggedLinear(4, 4))).layer_names == ["0"]


def test_sum_reduction_in_full_gradient_drift_and_dropped_term():
    # a sum-reduced loss moves W by eta b grad_L: drift() and after_step(mean_grads=...) must carry b
    model = _small()
    x, y = _batch((30,), classes=5)
    b, lr = x.shape[0], 0.002
    probe = DynamicsProbe(model)
    probe.before_step()
    with probe.capture():
        nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    probe.after_backward()
    terms = probe.compute(lr, reduction="sum")
    full = probe.full_gradient([(x[:4], y[:4]), (x[4:], y[4:])], LOSS)  # the mean gradient of the batch
    mu_full = probe.drift(full, lr, reduction="sum")
    mu_unscaled = probe.drift(full, lr)  # the wrong variant for this loss: 1/b of the drift
    torch.optim.SGD(model.parameters(), lr=lr).step()
    truth = probe.after_step(lr, mean_grads=full, reduction="sum")
    for name, t in truth.items():
        assert math.isclose(mu_full[name], terms[name].mu, rel_tol=1e-10)
        assert math.isclose(mu_unscaled[name] * b, terms[name].mu, rel_tol=1e-10)
        # Delta W = -eta b grad_L exactly: the second-order correction is the dropped term
        assert math.isclose(t["dsigma_second"] - t["dsigma_first"], t["dropped_drift_term"], rel_tol=1e-9)
    with pytest.raises(LipverifyError, match="reduction must be"):
        probe.drift(full, lr, reduction="max")


def test_measure_and_full_gradient_leave_buffers_and_random_streams_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(30, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, 5)
    ).double()
    x, y = _batch((30,), classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe = DynamicsProbe(model)
    probe.measure(x, y, LOSS, lr=0.05)
    probe.full_gradient([(x[:3], y[:3]), (x[3:], y[3:])], LOSS)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(x)  # a training-mode forward does move them: the check above can fail
    assert not torch.equal(before["1.running_mean"], model[1].running_mean)


def test_a_step_aborted_after_before_step_leaves_no_trusted_stale_spectrum():
    # before_step compared W with the snapshot; a write after an aborted step must still be seen
    model = _small()
    x, y = _batch((30,), classes=5)
    probe = DynamicsProbe(model)
    probe.before_step()
    with pytest.raises(RuntimeError, match="aborted"), probe.capture():
        raise RuntimeError("aborted")
    model[0].weight.data.mul_(2)
    sigma = float(torch.linalg.matrix_norm(model[0].weight.detach(), 2))
    assert math.isclose(probe.sigmas()["0"], sigma, rel_tol=1e-12)
    with probe.capture():
        LOSS(model(x), y).backward()
    assert math.isclose(probe.compute(0.05)["0"].sigma, sigma, rel_tol=1e-12)


def test_measure_keeps_the_training_capture():
    # measure() on another batch between the training backward and compute()/drift()
    model = _small()
    x, y = _batch((30,), b=8, classes=5)
    x2, y2 = _batch((30,), b=4, classes=5, seed=3)
    probe = DynamicsProbe(model)
    sum_loss = nn.CrossEntropyLoss(reduction="sum")
    with probe.capture():
        sum_loss(model(x), y).backward()
    full = probe.full_gradient([(x, y)], LOSS)
    before = probe.compute(0.01, reduction="sum")
    drift_before = probe.drift(full, 0.01, reduction="sum")
    probe.measure(x2, y2, LOSS, lr=0.01)
    after = probe.compute(0.01, reduction="sum")
    assert all(after[n].mu == before[n].mu and after[n].psi == before[n].psi for n in before)
    assert probe.drift(full, 0.01, reduction="sum") == drift_before  # b = 8, not measure's 4


def test_readme_training_loop_example_runs():
    # the README's probe example, run as written on a small model (docs that cannot rot silently)
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\nfrom lipverify.probe import DynamicsProbe")
    code = readme[start + len("```python\n") : readme.index("```", start + 3)]
    model = _small()
    scope = {
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.05),
        "lr": 0.05,
        "loss_fn": LOSS,
        "loader": [_batch((30,), classes=5, seed=s) for s in range(3)],
    }
    exec(compile(code, "README.md", "exec"), scope)
    assert set(scope["terms"]) == set(scope["truth"]) == {"0", "3", "5"}
    assert all(math.isfinite(t.psi) and t.psi > 0 for t in scope["terms"].values())


def test_weight_decay_and_gradient_scale_each_on_their_own():
    # each knob alone (the combined test cannot tell which one a formula applies)
    model = _small()
    x, y = _batch((30,), classes=5)
    lr, wd, alpha = 0.05, 1e-3, 0.5
    probe = DynamicsProbe(model)
    with probe.capture():
        LOSS(model(x), y).backward()
    plain = probe.compute(lr)
    decayed = probe.compute(lr, weight_decay=wd)
    scaled = probe.compute(lr, grad_scale=alpha)
    full = probe.full_gradient([(x, y)], LOSS)
    drift = probe.drift(full, lr, grad_scale=alpha, weight_decay=wd)
    for name, i in zip(probe.layer_names, (0, 3, 5), strict=True):
        W = model[i].weight.detach()
        U, S, Vh = torch.linalg.svd(W)
        sigma, u, v = float(S[0]), U[:, 0], Vh[0]
        # mu = -eta alpha u^T grad_L v - eta lambda sigma_1; phi, psi do not see the decay
        assert math.isclose(decayed[name].mu, plain[name].mu - lr * wd * sigma, rel_tol=1e-12)
        assert decayed[name].psi == plain[name].psi and decayed[name].phi == plain[name].phi
        assert math.isclose(scaled[name].mu, alpha * plain[name].mu, rel_tol=1e-12)
        assert math.isclose(scaled[name].psi, alpha**2 * plain[name].psi, rel_tol=1e-12)
        expected = -lr * alpha * float(u @ full[name] @ v) - lr * wd * sigma
        assert math.isclose(drift[name], expected, rel_tol=1e-10)


@pytest.mark.parametrize("kept", ["batch", "mean_grads"])
def test_dropped_term_follows_the_gradient_scale(kept):
    # Delta W = -eta alpha G_bar exactly: the second-order correction equals the dropped term
    model = _small()
    x, y = _batch((30,), classes=5)
    lr, alpha = 0.01, 0.5
    probe = DynamicsProbe(model)
    probe.before_step()
    with probe.capture():
        LOSS(model(x), y).backward()
    probe.after_backward()
    full = probe.full_gradient([(x, y)], LOSS) if kept == "mean_grads" else None
    for p in model.parameters():
        p.grad.mul_(alpha)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    for t in probe.after_step(lr, mean_grads=full, grad_scale=alpha).values():
        assert math.isclose(t["dsigma_second"] - t["dsigma_first"], t["dropped_drift_term"], rel_tol=1e-9)


def test_multi_position_linear_and_dilated_same_conv_match_the_reference():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 3)).double()
    x = torch.randn(5, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    got = DynamicsProbe(seq).measure(x, y, LOSS, lr=0.1)
    assert _max_rel(got, reference_layer_terms(seq, x, y, LOSS, lr=0.1)) < RTOL
    conv = nn.Sequential(
        nn.Conv2d(2, 3, 3, dilation=2, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)
    ).double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 1])
    for method in ("shifted", "conv", "unfold"):
        got = DynamicsProbe(conv, conv_method=method).measure(x, y, LOSS, lr=0.1)
        assert _max_rel(got, reference_layer_terms(conv, x, y, LOSS, lr=0.1)) < RTOL, method
    with pytest.raises(LipverifyError, match="asymmetric 'same' padding"):
        DynamicsProbe(nn.Sequential(nn.Conv2d(2, 3, 4, padding="same")))


def test_skip_leaves_out_a_module_and_everything_inside_it():
    """skip=["block"] skips block.0 and block.2 (not only a module named exactly "block"), but not
    "block2.0", whose name merely starts with the same letters; an unknown name still raises."""
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5)))
    model.add_module("block2", nn.Sequential(nn.Linear(5, 5)))
    model.add_module("head", nn.Linear(5, 2))
    assert DynamicsProbe(model, skip=["block"]).layer_names == ["block2.0", "head"]
    assert DynamicsProbe(model, skip=["block.0"]).layer_names == ["block.2", "block2.0", "head"]
    with pytest.raises(LipverifyError, match="skip names unknown modules: blok"):
        DynamicsProbe(model, skip=["blok"])


# -- regularisers of the paper's validation (Fig. 2): the gradient each step takes, and the probe on it
def _soft_loss(smoothing=0.0):
    """Mean cross-entropy with (b, C) probability targets (mixup) or class targets; label smoothing."""
    return lambda out, t: F.cross_entropy(out, t, label_smoothing=smoothing)


def _regularised_batch(which, model, x, y):
    """The inputs and targets whose plain gradient the training step takes (lipverify.training):
    mixup mixes inputs and one-hot targets with one lam ~ Beta(a, a) and a permutation; FGSM replaces
    x by clip(x + eps sign grad_x L, 0, 1), held fixed; label smoothing changes only the loss."""
    if which == "mixup":
        gen = torch.Generator().manual_seed(5)
        lam = float(torch.distributions.Beta(0.4, 0.4).sample())
        perm = torch.randperm(x.shape[0], generator=gen)
        onehot = F.one_hot(y, 10).to(x.dtype)
        return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm], _soft_loss()
    if which == "fgsm":
        xr = x.clamp(0, 1).requires_grad_(True)
        (gx,) = torch.autograd.grad(LOSS(model(xr), y), xr)
        return (xr + 0.03 * gx.sign()).clamp(0, 1).detach(), y, _soft_loss()
    if which == "label_smoothing":
        return x, y, _soft_loss(0.1)
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["mixup", "fgsm", "label_smoothing"])
def test_regularised_step_matches_per_sample_reference(which):
    """The probe projects the gradient the step takes: per-sample gradients of the mixed loss at the
    mixed inputs (mixup), of the loss at the FGSM inputs (FGSM), of the smoothed loss (label
    smoothing). Its terms equal the torch.func per-sample reference of that loss (rtol 1e-8); the
    wrong variant, the probe on the clean cross-entropy of the clean batch, is rejected (> 1e-3)."""
    model = _convnet()
    x, y = _batch((3, 32, 32), b=4)
    x = x.sigmoid()  # images in [0, 1], as FGSM's clip assumes
    xs, ys, loss = _regularised_batch(which, model, x, y)
    ref = reference_layer_terms(model, xs, ys, loss, lr=0.1, mode="vmap", population_size=100)
    probe = DynamicsProbe(model, population_size=100)
    assert _max_rel(probe.measure(xs, ys, loss, lr=0.1), ref) < RTOL
    clean = DynamicsProbe(model, population_size=100).measure(x, y, LOSS, lr=0.1)
    assert _max_rel(clean, ref) > 1e-3


def test_weight_decay_matches_per_sample_reference_of_the_regularised_objective():
    """SGD with weight decay lam follows the gradient of l_i + (lam/2) ||W||^2: per-sample gradients
    grad l_i + lam W. The probe's terms with ``weight_decay=lam`` equal layer_terms of those (mu gets
    -eta lam sigma; phi and psi, from the centred noise, are unchanged); without it they do not."""
    from lipverify.dynamics import layer_terms
    from lipverify.probe import weight_matrix

    lam, lr = 0.05, 0.1
    model = _convnet()
    x, y = _batch((3, 32, 32), b=4)
    grads = reference_per_sample_gradients(model, x, y, LOSS, mode="vmap")
    ref = {}
    for name, g in grads.items():
        W = weight_matrix(model.get_submodule(name)).double()
        ref[name] = layer_terms(W, g + lam * W, lr, population_size=100)
    probe = DynamicsProbe(model, population_size=100)
    with probe.capture():
        LOSS(model(x), y).backward()
    assert _max_rel(probe.compute(lr, weight_decay=lam), ref) < RTOL
    assert _max_rel(probe.compute(lr), ref) > 1e-3


def test_host_route_casts_each_float32_weight_once_per_step(probe_route):
    # Host route, float32 model, float64 spectral parts: per steady-state step the spectrum's own
    # snapshot of W_{t+1} is the only float32 -> float64 copy of a weight. The cache checks (before_step,
    # compute) compare W with the float64 snapshot without casting it, Delta W is formed without a cast
    # of W_{t+1}, and the gradient's cast (after_backward) goes to a persistent buffer.
    if probe_route == "device":
        pytest.skip("the device route's cache check and Delta W stay torch operations")
    from torch.utils._python_dispatch import TorchDispatchMode

    model = build_model("mlp", seed=0)
    probe = _warm_probe(model, (784,), steps=2)
    weights = {m.weight.data_ptr(): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    casts = {name: [] for name in weights.values()}
    aten = torch.ops.aten

    class WeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in (aten._to_copy.default, aten.copy_.default):
                src = args[1] if func is aten.copy_.default else args[0]
                if src.data_ptr() in weights and out.dtype == torch.float64 and src.dtype == torch.float32:
                    casts[weights[src.data_ptr()]].append(func)
            return out

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batch((784,), seed=7)
    with WeightCasts():
        probe.before_step()
        opt.zero_grad()
        with probe.capture():
            LOSS(model(x.float()), y).backward()
        probe.after_backward()
        probe.compute(0.05)
        opt.step()
        probe.after_step(0.05)
    assert probe.resolvent_stats["fallback"] == 0
    assert {name: len(c) for name, c in casts.items()} == {name: 1 for name in casts}


def test_cache_check_sees_a_one_ulp_write_to_a_float32_weight(monkeypatch):
    # float32 W against its float64 snapshot, compared without a cast (numpy, mixed dtypes): a write
    # through .data (no version bump) of one ulp in one entry must invalidate the cached spectrum
    from lipverify.probe import spectrum_cache

    def one_ulp_write(model):
        with torch.no_grad():
            w = model.fc1.weight.data
            w[123, 456] = torch.nextafter(w[123, 456], torch.tensor(math.inf, dtype=w.dtype))

    for variant in ("exact", "allclose"):  # the wrong variant: a comparison with a tolerance
        if variant == "allclose":
            tolerant = lambda W, S: torch.allclose(W.double(), S.double())
            monkeypatch.setattr(spectrum_cache, "_equal_values", tolerant)
        model = build_model("mlp", seed=0)
        probe = _warm_probe(model, (784,), steps=1)
        dec = probe.decomposition_of("fc1")
        version = model.fc1.weight._version
        assert probe.decomposition_of("fc1") is dec  # W unchanged: the cache serves it
        one_ulp_write(model)
        assert model.fc1.weight._version == version
        fresh = probe.decomposition_of("fc1") is not dec
        assert fresh == (variant == "exact"), variant
