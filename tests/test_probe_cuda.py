"""CUDA checks of the probe's device route (issue 15); skipped without CUDA (CI is CPU-only).

``benchmarks/device_check.sh`` runs them on a lent GPU machine (``pytest -k cuda``). The CPU proofs
of the same properties are in tests/test_probe_sync.py (``route="device"`` on CPU)."""

import pytest
import torch
from test_probe_sync import LR, SHAPES, _probe_step  # tests/ is on sys.path (pytest's prepend import mode)

from lipverify.models import build_model
from lipverify.probe import DynamicsProbe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _run(
    model_name: str,
    device: str,
    route: str,
    steps: int,
    b: int = 32,
    sync_check: bool = False,
    cuda_graphs: bool = False,
    side_stream: bool = False,
):
    """``steps`` probe steps of a float64 model (results read after each next step); under
    ``torch.cuda.set_sync_debug_mode("error")`` from the third step on when ``sync_check``."""
    model = build_model(model_name, seed=0).double().to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, *SHAPES[model_name], generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 10, (b,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    probe = DynamicsProbe(
        model, route=route, population_size=60000, cuda_graphs=cuda_graphs, side_stream=side_stream
    )
    results = []
    for i in range(steps):
        checked = sync_check and i >= 2  # step 0: cold full decompositions (eigh reads its info)
        if checked:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            terms, truth = _probe_step(model, x, y, opt, probe)
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode("default")
        results.append((terms, truth))
    return [({n: t for n, t in terms.items()}, dict(truth)) for terms, truth in results], probe


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_cuda_device_route_steady_state_has_no_sync(model_name):
    # set_sync_debug_mode("error") raises on any synchronising CUDA call (item, nonzero, a blocking
    # copy, a LAPACK info read) inside the steady-state steps
    results, probe = _run(model_name, "cuda", "auto", steps=5, sync_check=True)
    assert probe.on_device_route()
    assert all(t.converged for terms, _ in results[2:] for t in terms.values())


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_cuda_device_route_matches_the_cpu_host_route(model_name):
    # float64 model on both devices: the same training trajectory up to rounding; every term of every
    # step agrees with CPU's own (scipy, host-converged) route to 1e-8 relative
    cuda, _ = _run(model_name, "cuda", "auto", steps=4)
    cpu, _ = _run(model_name, "cpu", "host", steps=4)
    _assert_close(cuda, cpu, terms_rtol=1e-8, truth_rtol=1e-6)


def _assert_close(results, reference, terms_rtol: float, truth_rtol: float) -> None:
    """Every term relative to ``terms_rtol``; the discrete truth (differences of sigmas) to
    ``truth_rtol`` of the first-order change plus the spectra's rounding level."""
    for (terms, truth), (ref, ref_truth) in zip(results, reference, strict=True):
        for name, r in ref.items():
            t = terms[name]
            assert t.converged
            for f in ("sigma", "gap", "mu", "phi", "psi"):
                assert abs(getattr(t, f) - getattr(r, f)) <= terms_rtol * abs(getattr(r, f)), (name, f)
            scale = abs(ref_truth[name]["dsigma_first"])
            for f in ("dsigma_observed", "dsigma_first", "dsigma_second"):
                assert abs(truth[name][f] - ref_truth[name][f]) <= truth_rtol * scale + 1e-13 * r.sigma, (
                    name,
                    f,
                )


def test_cuda_sync_debug_mode_catches_the_host_route():
    # the wrong variant: the host route's float()/eigh/equal on CUDA tensors must raise under the
    # same mode, or the test above proves nothing
    with pytest.raises(RuntimeError):
        _run("mlp", "cuda", "host", steps=3, sync_check=True)


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_cuda_graphs_are_captured_replayed_without_sync_and_match_the_eager_route(model_name):
    # step 0 cold, step 1 the first warm step (capture happens there), steps 2.. replay under
    # set_sync_debug_mode("error"); every term and truth value equal to the eager device route's to
    # rounding (the same kernels, replayed)
    eager, _ = _run(model_name, "cuda", "auto", steps=5)
    graphed, probe = _run(model_name, "cuda", "auto", steps=5, sync_check=True, cuda_graphs=True)
    status = probe.graph_status
    assert status and all(v.startswith("captured") for v in status.values()), status
    assert all(int(v.split(", ")[1].split()[0]) >= 3 for v in status.values()), status
    _assert_close(graphed, eager, terms_rtol=1e-12, truth_rtol=1e-9)


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_cuda_side_stream_overlaps_without_sync_and_matches_the_in_order_route(model_name, cuda_graphs):
    # after_step and the next before_step on a side stream (lipverify.probe.streams), results read after
    # the last step: no host synchronisation in the steady state, every value equal to the in-order
    # device route's to rounding (the same kernels on another stream); the order itself is proven on
    # CPU by tests/test_probe_streams.py
    in_order, _ = _run(model_name, "cuda", "auto", steps=5, cuda_graphs=cuda_graphs)
    side, probe = _run(
        model_name, "cuda", "auto", steps=5, sync_check=True, cuda_graphs=cuda_graphs, side_stream=True
    )
    assert probe._side is not None and probe._side.stream is not None and probe._side.joins == 5
    _assert_close(side, in_order, terms_rtol=1e-12, truth_rtol=1e-9)


def test_cuda_training_with_deferred_reads_and_side_stream_matches_the_in_step_loop():
    # lipverify train's loop on CUDA: defer_reads (records read a step later from pinned copies) and
    # side_stream give the in-step loop's records to rounding (the same kernels; the side stream may
    # only reorder independent work)
    from test_training import tiny

    from lipverify.training import _Run

    def records(**options):
        run = _Run(tiny(device="cuda", steps=6, **options).validate())
        rows = []
        for _ in range(6):
            rows += run.advance() if options else [run.train_step()]
        return rows + run.flush()

    in_step = records()
    deferred = records(defer_reads=True, side_stream=True)
    assert [r["step"] for r in deferred] == [r["step"] for r in in_step] == list(range(6))
    for got, ref in zip(deferred, in_step, strict=True):
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert got[key] == value, key
