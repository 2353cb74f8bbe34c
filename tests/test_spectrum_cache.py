"""``SpectrumCache`` (:mod:`lipverify.probe.spectrum_cache`) on its own, without a probe: cache hits,
writes that do not bump the version counter, the device route's per-step staleness flag, the warm state."""

import pytest
import torch
from torch import nn

from lipverify._validation import LipverifyError
from lipverify.probe import spectrum_cache
from lipverify.probe.spectrum_cache import SpectrumCache
from lipverify.spectral import decompose

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(40, 30, dtype=torch.float64)


def _write_without_version_bump(module: nn.Linear) -> None:
    """A write through ``.data`` (what fused optimiser kernels also do): W changes, its version does not."""
    version = module.weight._version
    module.weight.data[3, 5] += 0.5
    assert module.weight._version == version


@pytest.mark.parametrize("method", ["resolvent", "gram", "svd"])
def test_hit_is_the_same_object_and_a_data_write_is_a_miss(method, monkeypatch):
    # the wrong variant: a cache keyed on (data_ptr, version) alone (no comparison with the snapshot)
    # keeps serving W_t's spectrum after the write
    for variant in ("snapshot", "version only"):
        if variant == "version only":
            monkeypatch.setattr(spectrum_cache, "_equal_values", lambda W, snapshot: True)
        fc = _layer()
        cache = SpectrumCache({"fc": fc}, method)
        dec = cache.decomposition("fc", in_step=False)
        assert cache.decomposition("fc", in_step=False) is dec  # unchanged W: a hit
        assert cache.cached("fc") is dec
        assert torch.equal(cache.snapshot("fc"), fc.weight.detach())
        _write_without_version_bump(fc)
        new = cache.decomposition("fc", in_step=False)
        missed = new is not dec
        assert missed == (variant == "snapshot"), variant
        if missed:  # the spectrum of the written W, not W_t's
            ref = float(decompose(fc.weight.detach(), "fc").sigma1)
            assert abs(float(new.sigma1) - ref) <= 1e-12 * ref
            assert torch.equal(cache.snapshot("fc"), fc.weight.detach())
        cache.forget("fc")
        assert cache.cached("fc") is None


def test_device_route_flags_a_data_write_once_a_new_step_begins():
    # in a device-route step the cache check is a device flag (ok() False), computed once per step:
    # a write within the step is not seen (W must not change within a step); begin_step() checks again.
    # The wrong variant (no begin_step) keeps ok() True after the write.
    for variant in ("begin_step", "no begin_step"):
        fc = _layer()
        cache = SpectrumCache({"fc": fc}, "resolvent", device_route=True)
        dec = cache.decomposition("fc", in_step=True)
        assert cache.cached("fc", in_step=True) is dec
        assert bool(cache.ok("fc", dec))
        _write_without_version_bump(fc)
        if variant == "begin_step":
            cache.begin_step()
        assert cache.cached("fc", in_step=True) is dec  # in a step: no host branch, the flag carries it
        assert bool(cache.ok("fc", dec)) == (variant == "no begin_step"), variant
        stats = dict(cache.stats)
        cache.not_converged("fc", dec)  # what reading the step's packed results does for a flagged layer
        assert cache.cached("fc") is None and cache.stats["fallback"] == stats["fallback"] + 1
        assert cache.warm_state() == {"fc": None}  # the layer restarts cold


def test_warm_state_names_the_basis_of_the_current_spectrum():
    # warm_state gives the basis that produced the cached spectrum of the current W (the resumed run
    # recomputes that spectrum), else the basis the last spectrum left
    fc = _layer()
    cache = SpectrumCache({"fc": fc}, "resolvent")
    assert cache.warm_state() == {"fc": None}
    cache.decomposition("fc", in_step=False)  # cold: full decomposition, leaves a basis
    assert cache.stats["cold"] == 1
    left = cache.warm_state()["fc"]
    assert left is None  # the current spectrum came from no basis
    with torch.no_grad():
        fc.weight.mul_(1.001)  # bumps the version: a miss
    state = cache.warm_state()["fc"]  # W moved: the basis the cold spectrum left
    assert state is not None
    warm = cache.decomposition("fc", in_step=False)
    assert cache.stats["iterative"] == 1
    assert torch.equal(cache.warm_state()["fc"], state)  # the basis that produced `warm`
    fresh = SpectrumCache({"fc": fc}, "resolvent")
    fresh.load_warm_state({"fc": state})
    again = fresh.decomposition("fc", in_step=False)
    assert fresh.stats["iterative"] == 1 and torch.equal(again.sigma, warm.sigma)
    with pytest.raises(LipverifyError, match="unknown layer 'nope'"):
        fresh.load_warm_state({"nope": None})
