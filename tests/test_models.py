"""The paper's models (Table 1) and initialisations (Section 8.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipverify import LipverifyError
from lipverify.models import ConvNet, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def test_mlp_architecture():
    m = build_model("mlp", seed=0)
    assert [(n, tuple(p.shape)) for n, p in m.named_parameters() if n.endswith("weight")] == [
        ("fc1.weight", (512, 784)),
        ("fc2.weight", (256, 512)),
        ("fc3.weight", (10, 256)),
    ]
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_convnet_architecture():
    net = ConvNet(classes=10, batch_norm=True, dropout=0.5)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    assert shapes == {
        "conv1.weight": (32, 3, 3, 3),
        "conv2.weight": (64, 32, 3, 3),
        "conv3.weight": (128, 64, 3, 3),
        "bn.weight": (128,),
        "fc1.weight": (256, 2048),
        "fc2.weight": (10, 256),
    }
    assert net.conv3.stride == (2, 2) and net.conv1.padding == (1, 1)
    assert isinstance(net.bn, nn.BatchNorm2d) and net.bn.track_running_stats is False
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(ConvNet().bn, nn.Identity) and isinstance(ConvNet().dropout, nn.Identity)


@pytest.mark.parametrize(
    "init,var", [("default", lambda f: 1 / (3 * f)), ("kaiming_normal", lambda f: 2 / f)]
)
def test_init_variance_and_scale(init, var):
    for scale in (1.0, 0.5):
        m = build_model("mlp", init=init, init_scale=scale, seed=1)
        w = m.fc1.weight.detach()
        expected = scale**2 * var(784)
        assert abs(float(w.var()) / expected - 1) < 0.02


def test_kaiming_sigma1_at_marchenko_pastur_edge():
    # Section 8.2: sigma_1 ~ s (sqrt(m) + sqrt(n)) for i.i.d. entries of standard deviation s.
    m = build_model("mlp", init="kaiming_normal", init_scale=2.0, seed=2)
    W = m.fc1.weight.detach().double()
    s = 2.0 * math.sqrt(2 / 784)
    predicted = s * (math.sqrt(512) + math.sqrt(784))
    assert abs(float(torch.linalg.matrix_norm(W, 2)) / predicted - 1) < 0.03


def test_seed_determinism_and_rng_isolation():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model("convnet", seed=5), build_model("convnet", seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_model("convnet", seed=6)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_bad_model_options():
    with pytest.raises(LipverifyError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(LipverifyError, match="unknown init"):
        build_model("mlp", init="xavier")
    with pytest.raises(LipverifyError, match="batch_norm"):
        build_model("mlp", batch_norm=True)
    with pytest.raises(LipverifyError, match="init_scale"):
        build_model("mlp", init_scale=0.0)
