"""CUDA graphs for the probe's device route (issue 15): ``DynamicsProbe(..., cuda_graphs=True)``.

What is captured: the batched spectra of every step (:func:`~lipverify.probe.resolvent._spectra_core`,
the largest fixed block of the device route's per-step work: 228 of the MLP's 713 ATen
operations per step), once per group of layer shapes
(:func:`~lipverify.probe.resolvent.device_batch_groups`), at the group's first warm-started step.
Every later step copies the weights and warm vectors into the graph's static input buffers, replays
the graph, and clones its outputs, so the spectra it returns are fresh tensors exactly as
:func:`~lipverify.probe.resolvent.resolvent_spectra_device`'s (a later replay never overwrites a
spectrum the probe or the caller still holds).

Limits (documented in the README):

* Only the spectra are captured. The projections of the hooked activations, the Theorem 14 terms and
  the discrete truth run eagerly: their inputs are new tensors every step (and change shape with the
  batch size), so capturing them would need static activation buffers and a fixed batch.
* The replay runs on the current stream; with ``side_stream=True`` (:mod:`lipverify.probe.streams`) that
  is the side stream for the spectra of W_{t+1} computed in ``after_step``.
* A graph holds its static buffers and a private memory pool for the group's intermediates (about the
  memory of one eager call) for as long as the probe lives.
* If capture fails (an operation that cannot be captured on this CUDA/torch build), the group runs
  eagerly from then on, :attr:`SpectraGraph.status` says why, and a :class:`RuntimeWarning` is issued
  once.

On CPU there are no graphs: :class:`SpectraGraph` then runs the same static-buffer steps eagerly
(copy in, run the core on the static input buffers, copy its results into static output buffers as a
replay would leave them, clone out). That is what CI tests: the buffers, the copies and
the cloning give bitwise the results of the uncaptured route (tests/test_probe_graphs.py), and the
route issues no host synchronisation (a precondition of capture). Capture and replay themselves are
only exercised on a GPU (tests/test_probe_cuda.py, ``benchmarks/device_check.sh``).
"""

from __future__ import annotations

import warnings

import torch

from lipverify.probe.resolvent import (
    DeviceBatchPlan,
    ResolventSpectrum,
    _spectra_core,
    split_spectra,
    wide_form,
)

#: Eager runs on a side stream before capture (cuBLAS/cuSOLVER handles and workspaces are created
#: there, as torch.cuda.graphs' documentation requires).
CAPTURE_WARMUP = 3


class SpectraGraph:
    """:func:`~lipverify.probe.resolvent.resolvent_spectra_device` of one group of layers (one
    :class:`~lipverify.probe.resolvent.DeviceBatchPlan`) through static buffers and, on CUDA, a
    captured graph.

    ``plan``: the group's shapes; ``dtype``: the compute dtype; ``device``: where the weights live.
    Calling it with the layers' weights ``Ws`` (m, n) each and warm vectors ``bases`` (k, >= 3) each
    returns one :class:`~lipverify.probe.resolvent.ResolventSpectrum` per layer, equal bit for bit
    to ``resolvent_spectra_device(Ws, dtype, bases, plan)`` (the same core on the same values).
    ``status``: ``"eager"`` (CPU), ``"not captured"`` (CUDA, before the first call), ``"captured"``,
    or ``"eager (capture failed: ...)"``; ``replays``: graph replays so far."""

    def __init__(self, plan: DeviceBatchPlan, dtype: torch.dtype, device: torch.device) -> None:
        self.plan = plan
        self.device = torch.device(device)
        B = len(plan.shapes)
        # static inputs: their padding is zero once and never written (only the corners are)
        self.weights = torch.zeros(B, plan.K, plan.N, dtype=dtype, device=self.device)
        self.bases = torch.zeros(B, plan.K, 3, dtype=dtype, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: dict[str, torch.Tensor] | None = None
        self.status = "not captured" if self.device.type == "cuda" else "eager"
        self.replays = 0

    def __call__(self, Ws: list[torch.Tensor], bases: list[torch.Tensor]) -> list[ResolventSpectrum]:
        for i, (W, basis) in enumerate(zip(Ws, bases, strict=True)):
            Ww = wide_form(W)
            self.weights[i, : Ww.shape[0], : Ww.shape[1]].copy_(Ww)
            self.bases[i, : basis.shape[0]].copy_(basis[:, :3])
        if self.status == "not captured":
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            out = self.static_out
        else:  # CPU stand-in (or a failed capture): the outputs pass through static buffers too
            eager = _spectra_core(self.weights, self.bases, self.plan)
            if self.static_out is None:
                self.static_out = {key: torch.empty_like(t) for key, t in eager.items()}
            out = self.static_out
            for key, t in eager.items():
                out[key].copy_(t)
        return split_spectra(self.plan, self._fresh(out))

    @staticmethod
    def _fresh(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Clones: the next call overwrites the static buffers (``W`` is the static input itself)."""
        return {key: t.clone() for key, t in out.items()}

    def _capture(self) -> None:
        """Warm up on a side stream, then capture the core on the static buffers (torch.cuda.graph)."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARMUP):
                    _spectra_core(self.weights, self.bases, self.plan)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = _spectra_core(self.weights, self.bases, self.plan)
        except RuntimeError as exc:  # an operation this build cannot capture: stay eager
            self.status = f"eager (capture failed: {exc})"
            warnings.warn(
                f"lipverify probe: CUDA graph capture of the spectra failed, running them eagerly: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.graph, self.static_out, self.status = graph, static_out, "captured"
