"""Shared test settings: a modest Hypothesis profile (2-core machine, several suites in parallel).

The default dtype of torch is NOT changed: every reference converts to float64 explicitly.
"""

import sys
import types

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "lipverify",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("lipverify")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a whole test module (the previous count restored after it),
    requested by ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``: the kernels under test
    are small, and with more threads than free cores on a shared 2-core machine LAPACK and the OpenMP
    pool stall each other (seconds for one 512 x 784 norm)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def inverting_torchvision(monkeypatch):
    """A stand-in ``torchvision`` whose AutoAugment inverts the image (torchvision is optional and not
    installed here): checks the AutoAugment wiring. Returns the list of policies it was built with."""
    policies = []

    class InvertingAutoAugment:
        def __init__(self, policy):
            policies.append(policy)

        def __call__(self, img):
            assert img.dtype == torch.uint8 and img.shape[0] == 3
            return 255 - img

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    tr.AutoAugment = InvertingAutoAugment
    tr.AutoAugmentPolicy = types.SimpleNamespace(CIFAR10="cifar10")
    tv.transforms = tr
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", tr)
    return policies
