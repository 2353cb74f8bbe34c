"""``DynamicsProbe(side_stream=True)`` (issue 15, :mod:`lipverify.probe.streams`) on CPU.

CPU has no streams, so the overlap itself is measured on a GPU only. What CI proves here is the
order that makes the overlap safe, with a dispatch-mode tracer that knows which operations the probe
issues on the side stream (``SideStream.active``) and when the current stream joins it
(``SideStream.joins``):

* no operation on the current stream reads a tensor the side stream wrote since the last join;
* no operation on the current stream writes a tensor the side stream read or wrote since the last join
  (the optimiser's update of W after ``before_step``'s cache check reads it);
* every tensor the side stream reads that the current stream allocated is a model parameter or held
  by the :class:`SideStream` until the next join (else the caching allocator may hand its memory to
  the next forward while the side stream still reads it).

Each rule has a wrong variant the same tracer rejects: joins that do nothing, holds left out, and a
probe that never forks (no overlap at all)."""

import contextlib

import pytest
import torch
from test_probe_sync import LR, _probe_step
from test_probe_sync import _setup as _setup_sync  # tests/ is on sys.path (pytest's prepend import mode)
from torch.utils._python_dispatch import TorchDispatchMode

import lipverify.probe.streams as streams
from lipverify._validation import LipverifyError
from lipverify.dynamics import network_terms
from lipverify.probe import DynamicsProbe
from lipverify.probe.interpose import counting
from lipverify.probe.spectrum_cache import SpectrumCache

STEPS = 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


class StreamOrderTracer(TorchDispatchMode):
    """Records violations of the three rules of the module docstring. ``probe._side`` is looked up at
    every operation (it is made at the first fork); ``exempt``: storages of the model's parameters."""

    def __init__(self, probe: DynamicsProbe, exempt: set[int]) -> None:
        super().__init__()
        self.probe = probe
        self.exempt = exempt
        self.owner: dict[int, str] = {}  # storage -> stream that allocated it ("main" when unknown)
        self.side_read: set[int] = set()
        self.side_written: set[int] = set()
        self.joins_seen = 0
        self.side_ops: list[str] = []
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        side = self.probe._side
        if side is not None and side.joins != self.joins_seen:
            self.joins_seen = side.joins
            self.side_read.clear()
            self.side_written.clear()
        on_side = side is not None and side.active
        reads, writes = set(), set()
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            ptrs = {_storage(t) for t in _tensors(value)} - {0}
            writes |= ptrs if arg.alias_info is not None and arg.alias_info.is_write else set()
            reads |= ptrs
        out = func(*args, **kwargs)
        fresh = {_storage(t) for t in _tensors(out)} - reads - {0}
        name = str(func.overloadpacket.__name__)
        if name.startswith("lift_fresh"):  # a constant torch.tensor(...) made on the host just now
            self.owner.update(dict.fromkeys(reads, "side" if on_side else "main"))
            return out
        if on_side:
            self.side_ops.append(name)
            held = {_storage(t) for t in side.held}
            for p in reads - self.exempt - held:
                if self.owner.get(p, "main") == "main":
                    self.violations.append(f"side stream reads a current-stream tensor not held: {name}")
            self.side_read |= reads
            self.side_written |= writes | fresh
            self.owner.update(dict.fromkeys(fresh, "side"))
        else:
            if reads & self.side_written:
                self.violations.append(f"current stream reads a side-stream result before a join: {name}")
            if writes & (self.side_read | self.side_written):
                self.violations.append(
                    f"current stream writes what the side stream uses, before a join: {name}"
                )
            # a new tensor at an address the side stream used: CPU's allocator reused freed memory
            self.side_read -= fresh
            self.side_written -= fresh
            self.owner.update(dict.fromkeys(fresh, "main"))
        return out


def _setup(model_name: str, side_stream: bool):
    return _setup_sync(model_name, "device", side_stream=side_stream)


def _run(model_name: str, side_stream: bool, trace: bool = False):
    """``STEPS`` probe steps, each step's results read after the next step was issued (the use the
    side stream is for). Returns the results, the probe, the tracer (``trace``) and the host
    synchronisations of the steady-state steps."""
    model, x, y, opt, probe = _setup(model_name, side_stream)
    tracer = None
    if trace:
        tracer = StreamOrderTracer(probe, {_storage(p) for p in model.parameters()})
    results, syncs, read = [], [], []
    with tracer or contextlib.nullcontext():
        for i in range(STEPS):
            with counting() as c:
                results.append(_probe_step(model, x, y, opt, probe))
            if i >= 2:  # steps 0 and 1: cold decompositions, then the first warm ones
                syncs.append(c.sync_count)
            if i >= 1:  # the previous step's results, read a step later
                terms, truth = results[i - 1]
                read.append((network_terms(terms), dict(terms), dict(truth)))
        terms, truth = results[-1]
        read.append((network_terms(terms), dict(terms), dict(truth)))
    return read, probe, tracer, syncs


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_side_stream_gives_the_in_order_results_bit_for_bit_without_host_sync(model_name):
    ref, _, _, _ = _run(model_name, side_stream=False)
    got, probe, _, syncs = _run(model_name, side_stream=True)
    for (_, terms, truth), (_, ref_terms, ref_truth) in zip(got, ref, strict=True):
        for name, r in ref_terms.items():
            assert terms[name].converged and r.converged
            for f in ("sigma", "gap", "mu", "phi", "psi"):
                assert getattr(terms[name], f) == getattr(r, f), (name, f)
            assert truth[name] == ref_truth[name]
    assert syncs and all(s == 0 for s in syncs)
    # one join per step: after_backward waits for after_step(t - 1) and before_step(t) together
    assert probe._side is not None and probe._side.joins == STEPS


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_side_stream_order_is_safe(model_name):
    _, _, tracer, _ = _run(model_name, side_stream=True, trace=True)
    assert not tracer.violations, sorted(set(tracer.violations))
    # the side stream did the work it is for: after_step's batched spectra of W_{t+1} (Cholesky
    # factorisations) and its discrete truth, not only bookkeeping
    assert "linalg_cholesky_ex" in tracer.side_ops
    assert len(tracer.side_ops) > 100


def test_tracer_rejects_a_join_that_does_not_wait(monkeypatch):
    # wrong variant: the current stream never waits for the side stream (join does nothing)
    monkeypatch.setattr(streams.SideStream, "join", lambda self: None)
    _, _, tracer, _ = _run("mlp", side_stream=True, trace=True)
    assert any("reads a side-stream result before a join" in v for v in tracer.violations)
    assert any("writes what the side stream uses" in v for v in tracer.violations)


def test_tracer_rejects_side_reads_of_tensors_not_held(monkeypatch):
    # wrong variant: nothing held, so e.g. after_backward's gradient projections (current stream)
    # could be freed and reused while after_step on the side stream still reads them
    monkeypatch.setattr(DynamicsProbe, "_after_step_hold", lambda self, mean_grads: [])
    monkeypatch.setattr(SpectrumCache, "tensors", lambda self: [])
    _, _, tracer, _ = _run("mlp", side_stream=True, trace=True)
    assert any("side stream reads a current-stream tensor not held" in v for v in tracer.violations)


def test_tracer_rejects_a_probe_that_never_forks(monkeypatch):
    # wrong variant: everything in order on the current stream (safe, but nothing overlaps)
    monkeypatch.setattr(DynamicsProbe, "_fork", lambda self, hold: contextlib.nullcontext())
    _, _, tracer, _ = _run("mlp", side_stream=True, trace=True)
    assert "linalg_cholesky_ex" not in tracer.side_ops


def test_optimiser_step_without_a_join_is_refused():
    model, x, y, opt, probe = _setup("mlp", side_stream=True)
    _probe_step(model, x, y, opt, probe)
    probe.before_step()
    opt.zero_grad(set_to_none=True)
    with probe.capture():
        torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # no after_backward()/compute(): the update races before_step's side-stream reads of W
    with pytest.raises(LipverifyError, match="after_backward\\(\\) or compute\\(\\) between the backward"):
        probe.after_step(LR)


def test_side_stream_forks_nothing_on_the_host_route():
    # route "auto" with CPU weights is the host route; the refusal of route="host" and of other
    # decompositions is tested with cuda_graphs' in tests/test_probe_graphs.py
    model, x, y, opt, _ = _setup("mlp", side_stream=False)
    probe = DynamicsProbe(model, route="auto", side_stream=True, population_size=60000)
    terms, truth = _probe_step(model, x, y, opt, probe)
    assert not probe.on_device_route() and probe._side is None
    assert dict(truth) and all(t.converged for t in terms.values())
