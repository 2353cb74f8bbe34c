"""``DynamicsProbe(cuda_graphs=True)`` (issue 15, :mod:`lipverify.probe.graphs`) on CPU: the static
buffers, copies and cloning of :class:`SpectraGraph` give bitwise the results of the uncaptured device
route over several steps, and the route stays free of host synchronisation. The capture and replay
themselves need a GPU (tests/test_probe_cuda.py)."""

import pytest
import torch
from test_probe_sync import _probe_step, _setup  # tests/ is on sys.path (pytest's prepend import mode)

import lipverify.probe.graphs as graphs
from lipverify._validation import LipverifyError
from lipverify.models import build_model
from lipverify.probe import DynamicsProbe
from lipverify.probe.interpose import counting


def _run(model_name: str, cuda_graphs: bool, steps: int = 4, count: bool = False):
    """``steps`` probe steps on the device route; returns the results read on the host, the probe and
    the host syncs of the steady-state steps (when ``count``)."""
    model, x, y, opt, probe = _setup(model_name, "device", cuda_graphs=cuda_graphs)
    results, syncs = [], []
    for i in range(steps):
        with counting() as c:
            terms, truth = _probe_step(model, x, y, opt, probe)
        if count and i >= 2:  # steps 0 and 1: cold decompositions, then the first warm ones
            syncs.append(c.sync_count)
        results.append((terms, truth))
    read = [(dict(terms), dict(truth)) for terms, truth in results]
    return read, probe, syncs


def _assert_identical(got, ref):
    for (terms, truth), (ref_terms, ref_truth) in zip(got, ref, strict=True):
        for name, r in ref_terms.items():
            t = terms[name]
            assert t.converged and r.converged
            for f in ("sigma", "gap", "mu", "phi", "psi"):
                assert getattr(t, f) == getattr(r, f), (name, f)
            for f, value in ref_truth[name].items():
                assert truth[name][f] == value, (name, f)


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_graph_route_gives_the_uncaptured_results_bit_for_bit(model_name):
    ref, _, _ = _run(model_name, cuda_graphs=False)
    got, probe, syncs = _run(model_name, cuda_graphs=True, count=True)
    _assert_identical(got, ref)
    assert syncs and all(s == 0 for s in syncs)
    status = probe.graph_status
    assert list(status) == ["+".join(probe.layer_names)]  # one group: every layer of the model
    assert all(v.startswith("eager") for v in status.values())  # CPU: the stand-in, no capture


def test_outputs_that_alias_the_static_buffers_are_rejected(monkeypatch):
    # the wrong variant: returning the static buffers instead of clones; the next call overwrites
    # W_t's snapshot with W_{t+1} (dW = 0 in the discrete truth), and the comparison fails
    ref, _, _ = _run("mlp", cuda_graphs=False)
    monkeypatch.setattr(graphs.SpectraGraph, "_fresh", staticmethod(lambda out: out))
    got, _, _ = _run("mlp", cuda_graphs=True)
    with pytest.raises(AssertionError):
        _assert_identical(got, ref)


@pytest.mark.parametrize("option", ["cuda_graphs", "side_stream"])
def test_graphs_and_side_stream_need_the_device_route(option):
    model = build_model("mlp", seed=0)
    for other in ({"route": "host"}, {"decomposition": "gram"}):
        with pytest.raises(LipverifyError, match=f"{option}=True needs the device route"):
            DynamicsProbe(model, **other, **{option: True})


def test_a_failed_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    # on CUDA a build that cannot capture an operation raises inside torch.cuda.graph; the group then
    # runs eagerly (same results), says why in graph_status, and warns once. Emulated on CPU by a
    # capture that raises at its first step.
    from test_probe import _warm_basis
    from test_resolvent_batched import _scaled_with_gap

    from lipverify.probe.resolvent import DeviceBatchPlan, resolvent_spectra_device

    Ws = [_scaled_with_gap(12, 20, 0.1, 1), _scaled_with_gap(9, 5, 0.2, 2)]
    bases = [_warm_basis(W, 3) for W in Ws]
    plan = DeviceBatchPlan.build([tuple(W.shape) for W in Ws], torch.float64, torch.device("cpu"))
    graph = graphs.SpectraGraph(plan, torch.float64, torch.device("cpu"))
    graph.status = "not captured"  # as on CUDA before the first call

    def no_capture(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.torch.cuda, "Stream", no_capture)
    with pytest.warns(RuntimeWarning, match="capture of the spectra failed"):
        got = graph(Ws, bases)
    assert graph.status.startswith("eager (capture failed: operation not permitted")
    assert graph.graph is None and graph.replays == 0
    again = graph(Ws, bases)  # no second attempt, no second warning
    ref = resolvent_spectra_device(Ws, torch.float64, bases, plan)
    for a, b, r in zip(got, again, ref, strict=True):
        for f in ("s1", "s2", "u", "v", "W", "factor", "basis", "ok"):
            assert torch.equal(getattr(a, f), getattr(r, f)) and torch.equal(getattr(b, f), getattr(r, f)), f
