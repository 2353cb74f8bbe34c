"""A side stream for the probe's device route (issue 15): ``DynamicsProbe(..., side_stream=True)``.

What overlaps. :meth:`~lipverify.probe.DynamicsProbe.after_step` (Delta W, its projections, the
discrete truth, the batched spectra of W_{t+1}) and the next
:meth:`~lipverify.probe.DynamicsProbe.before_step` (its cache checks) are issued on a side stream.
The next step's forward and backward, issued on the current stream in the meantime, can run on the
device at the same time. The current stream waits for the side stream (a device-side event wait, no
host synchronisation) at the next probe call that reads what the side stream wrote:
``after_backward``, ``compute``, ``measure``, ``drift``, ``full_gradient``, ``decomposition_of``,
``sigmas``, ``warm_state``, ``load_warm_state``.

Why the order is safe (the semantics that allow the overlap):

* The side work reads the weights W_{t+1}. The forward and backward only read them too. The optimiser
  writes them after ``after_backward`` or ``compute``, which join first. :meth:`after_step` raises
  when the step before it forked in ``before_step`` and nothing joined before the optimiser step.
* The side stream starts after everything queued so far on the current stream (``wait_stream``).
  So it sees W_{t+1} written, and the memory it allocates is reused on it only after that.
* Tensors allocated on the current stream and read on the side stream (the kept gradient
  projections, a spectrum computed outside a step, the full-data gradient) are held by
  :class:`SideStream` until the next join. The caching allocator therefore cannot give their memory
  to the next forward while the side stream may still read it. (``Tensor.record_stream`` would do
  the same with one call per tensor; holding costs a list.)
* ``after_step``'s packed results are copied to pinned host memory on the side stream, and their
  event is recorded there. Reading them waits for that copy, not for the current stream.

Limits:

* Overlap needs the caller to read ``after_step``'s results later, e.g. a step later. Reading them at
  once waits on the host for the side work. ``lipverify train`` reads them within the step, so it
  does not offer the option.
* Held tensors live until the next join, so W_t's spectra and W_{t+1}'s coexist for one step: peak
  memory grows by one set of spectra (a weight copy and a k x k factor per layer).
* CUDA only. On CPU, :class:`SideStream` runs the same forks and joins in order (no stream). That
  is what CI checks with a dispatch-mode tracer (tests/test_probe_streams.py): every read of a side
  result on the current stream comes after a join, every write of a tensor the side stream touched
  comes after a join, and every current-stream tensor the side stream reads is a parameter or held.
  The overlap itself is only measured on a GPU (``benchmarks/device_check.sh``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class SideStream:
    """Fork/join of the probe's work onto one side stream of ``device`` (a no-op order on CPU).

    ``active``: whether work is being issued on the side stream now; ``joins``: joins so far;
    ``held``: tensors kept alive until the next join (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.active = False
        self.pending = False  # side work issued since the last join
        self.joins = 0
        self.held: list[torch.Tensor] = []

    @contextlib.contextmanager
    def fork(self, hold: Iterable[torch.Tensor] = ()) -> Iterator[None]:
        """Issue the block's work on the side stream, after everything queued on the current stream;
        ``hold``: current-stream tensors the block reads (kept alive until the next :meth:`join`)."""
        self.held.extend(hold)
        self.pending = True
        self.active = True
        try:
            if self.stream is None:
                yield
            else:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    yield
        finally:
            self.active = False

    def join(self) -> None:
        """The current stream waits for the side stream's work so far (on the device, no host
        synchronisation); the held tensors are released (later allocations come after that work)."""
        if not self.pending:
            return
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.pending = False
        self.held.clear()
        self.joins += 1


def tensors_of(obj) -> list[torch.Tensor]:
    """The tensors among ``obj``'s attributes (a spectrum dataclass), or ``obj`` itself / the
    tensors of a tuple or list; None gives none."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, tuple | list):
        return [t for item in obj for t in tensors_of(item)]
    return [t for t in vars(obj).values() if isinstance(t, torch.Tensor)]
