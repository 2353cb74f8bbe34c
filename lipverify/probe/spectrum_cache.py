"""``SpectrumCache``: the spectral decompositions of the probed weights, cached per layer, and the
warm starts of the ``"resolvent"`` decomposition (:class:`~lipverify.probe.dynamics_probe.DynamicsProbe`
orchestrates, this class owns the spectra; see :mod:`lipverify.probe` for the whole description).

A decomposition is reused while the weight holds the values it was computed from: the key is the
weight's ``(data_ptr, version)``, and every hit also compares W with the snapshot it was decomposed
from (writes through ``.data`` and fused optimiser kernels do not bump the version counter). In
``"resolvent"`` mode each layer's next spectrum is warm-started from the basis the previous one left
(:func:`~lipverify.probe.resolvent.resolvent_spectrum`, on the device route
:func:`~lipverify.probe.resolvent.resolvent_spectra_device` batched over the layers, optionally replayed
from a CUDA graph, :mod:`lipverify.probe.graphs`); :meth:`SpectrumCache.warm_state` carries those bases
across a checkpoint, so a resumed run gives bitwise the numbers of the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from lipverify._validation import LipverifyError
from lipverify.probe.buffers import _equal_values, _exactly_representable
from lipverify.probe.graphs import SpectraGraph
from lipverify.probe.layers import weight_matrix
from lipverify.probe.resolvent import (
    DEVICE_SECOND_SQUARINGS,
    DEVICE_TOP_SQUARINGS,
    RESOLVENT_BLOCK,
    DeviceBatchPlan,
    ResolventSpectrum,
    device_batch_groups,
    fast_decompose,
    resolvent_spectra_device,
    resolvent_spectrum,
    resolvent_spectrum_device,
)
from lipverify.probe.streams import tensors_of
from lipverify.spectral import SpectralDecomposition, decompose

Spectrum = SpectralDecomposition | ResolventSpectrum


class SpectrumCache:
    """Per-layer spectra of the probed weights, cached until the weight changes, with warm starts.

    ``layers``: name -> the layer's ``nn.Module`` (or any object with a ``.module``, e.g. the probe's
    per-layer record); its ``weight`` in the matrix view of MATH section 0
    (:func:`~lipverify.probe.layers.weight_matrix`). ``decomposition``: ``"gram"``
    (:func:`fast_decompose`), ``"svd"`` (:func:`lipverify.spectral.decompose`) or ``"resolvent"``
    (:func:`resolvent_spectrum`: top pair, sigma_2 and the deflated Cholesky factor, warm-started; a
    layer's first step and any non-converged step take the full ``"gram"`` decomposition, counted in
    :attr:`stats`). ``compute_dtype``: dtype of the spectra. ``cuda_graphs``: on the device route, the
    batched spectra replayed from a :class:`~lipverify.probe.graphs.SpectraGraph` per group of layer
    shapes (:attr:`graph_status`). ``device_route``: a flag, or a callable asked at every use, telling
    whether the device route is active (torch only, no host synchronisation in a step's cache checks,
    the warm layers' spectra in one batch: :meth:`decompositions`).
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        decomposition: str = "resolvent",
        compute_dtype: torch.dtype = torch.float64,
        cuda_graphs: bool = False,
        device_route: bool | Callable[[], bool] = False,
    ) -> None:
        if decomposition not in ("gram", "svd", "resolvent"):
            raise LipverifyError(f"decomposition must be 'gram', 'svd' or 'resolvent', got {decomposition!r}")
        self._modules = {
            name: layer if isinstance(layer, nn.Module) else layer.module for name, layer in layers.items()
        }
        self.method = decomposition  # the "decomposition" argument (a method of that name computes one)
        self.compute_dtype = compute_dtype
        self.cuda_graphs = cuda_graphs
        self._device_route = device_route if callable(device_route) else (lambda: bool(device_route))
        # device route: name -> 0-d bool, the weight differs from the snapshot of its cached spectrum
        self._stale: dict[str, torch.Tensor | None] = {}
        self._stale_checked: dict[str, tuple[int, int]] = {}  # the (data_ptr, version) checked this step
        # name -> (data_ptr, version, snapshot of W, decomposition)
        self._dec_cache: dict[str, tuple[int, int, torch.Tensor, Spectrum]] = {}
        self._warm: dict[str, torch.Tensor] = {}
        self._warm_in: dict[str, torch.Tensor | None] = {}
        # device route: (shapes, dtype, device) -> the fixed data of one batched spectra call, and
        # with cuda_graphs its SpectraGraph
        self._batch_plans: dict[tuple, DeviceBatchPlan] = {}
        self._graphs: dict[tuple, tuple[list[str], SpectraGraph]] = {}
        #: ``"resolvent"`` mode: ``iterative`` (warm-started resolvent steps), ``iterations`` (their
        #: total block iterations), ``cold`` (first decomposition of a layer: full), ``fallback``
        #: (warm start did not converge or a factorisation failed: full decomposition instead).
        self.stats = {"iterative": 0, "iterations": 0, "cold": 0, "fallback": 0}

    def on_device_route(self) -> bool:
        """Whether the device route is active now (the ``device_route`` flag or callable)."""
        return self._device_route()

    @property
    def graph_status(self) -> dict[str, str]:
        """``cuda_graphs=True``: per group of layers (their names joined by ``+``), the
        :attr:`~lipverify.probe.graphs.SpectraGraph.status` of its graph and its replays so far."""
        return {
            "+".join(names): f"{graph.status}, {graph.replays} replays"
            for names, graph in self._graphs.values()
        }

    def begin_step(self) -> None:
        """A new step starts: each layer's device-route cache check (W against its snapshot) runs once
        again (:meth:`cached` with ``in_step``). W must not change within a step."""
        self._stale_checked.clear()

    def snapshot(self, name: str) -> torch.Tensor:
        """The copy of W that layer ``name``'s cached spectrum was computed from (in ``"resolvent"``
        mode the spectrum's own copy when it holds W's values exactly): W_t for the discrete truth."""
        return self._dec_cache[name][2]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds: snapshots, spectra, warm-start bases and device-route stale
        flags (what a side stream may read; :mod:`lipverify.probe.streams` holds them to its join)."""
        held: list[torch.Tensor] = []
        for _, _, snapshot, dec in self._dec_cache.values():
            held += [snapshot, *tensors_of(dec)]
        for group in (self._warm, self._warm_in, self._stale):
            held += [t for t in group.values() if t is not None]
        return held

    def forget(self, name: str) -> None:
        """Drop layer ``name``'s cached spectrum (and its snapshot of W), e.g. before the optimiser's
        W_{t+1} is decomposed (peak memory); its warm-start basis stays."""
        self._dec_cache.pop(name, None)

    def decomposition(self, name: str, in_step: bool) -> Spectrum:
        """Thin SVD (or, in ``"resolvent"`` mode, the :class:`ResolventSpectrum`) of layer ``name``'s
        weight matrix, cached until the weight changes; ``in_step`` on the device route: the cache check
        stays on the device (:meth:`cached`)."""
        dec = self.cached(name, in_step)
        if dec is not None:
            return dec
        # a stale one is dropped before the new one is computed (peak memory)
        self._dec_cache.pop(name, None)
        module = self._modules[name]
        w = module.weight
        key = (w.data_ptr(), w._version)
        W = weight_matrix(module)
        if self.method == "resolvent":
            dec = self._resolvent_decomposition(name, W)
        elif self.method == "gram":
            dec = fast_decompose(W, self.compute_dtype, name)
        else:
            dec = decompose(W.to(self.compute_dtype), name)
        # the spectrum's own copy of W is the snapshot when it holds W's values exactly
        own = isinstance(dec, ResolventSpectrum) and _exactly_representable(W.dtype, dec.W.dtype)
        self._dec_cache[name] = (*key, dec.W if own else W.clone(), dec)
        return dec

    def cached(self, name: str, in_step: bool = False) -> Spectrum | None:
        """The cached decomposition of layer ``name`` if it is of the weight's current values, else None.

        The version counter alone is not enough: writes through ``.data`` and the fused optimiser
        kernels (``SGD(fused=True)``) change a weight without bumping it. So a cache hit also
        compares the weight with the snapshot it was decomposed from (one pass over W, at every hit:
        skipping it on the strength of an earlier comparison left stale spectra after an aborted
        step). Inside a device-route step (``in_step``) the comparison is a device flag folded into the
        step's results (a changed weight flags them ``converged=False``) instead of a host branch."""
        cached = self._dec_cache.get(name)
        if cached is None:
            return None
        w = self._modules[name].weight
        if cached[:2] != (w.data_ptr(), w._version):
            return None
        W, snapshot = weight_matrix(self._modules[name]), cached[2]
        if in_step and self.on_device_route():
            # compared on the device; a changed weight flags the step's results instead of a host branch
            # once per step (begin_step starts one): W must not change within a step
            if self._stale_checked.get(name) != cached[:2]:
                self._stale[name] = (W.to(snapshot.dtype) != snapshot).any()
                self._stale_checked[name] = cached[:2]
            return cached[3]
        return cached[3] if _equal_values(W, snapshot) else None

    def _resolvent_decomposition(self, name: str, W: torch.Tensor) -> Spectrum:
        """``"resolvent"`` mode, one layer: warm-started from the basis the previous spectrum left
        (device route: :func:`resolvent_spectrum_device`, fixed work, verdict on the device; host route:
        :func:`resolvent_spectrum`), else (first step, ``k < 2``, not converged) the full
        :func:`fast_decompose`, whose leading singular vectors of the smaller side start the next one."""
        stats = self.stats
        basis = self._warm.get(name)
        k = min(W.shape)
        self._warm_in[name] = basis
        self._stale[name] = None
        device = self.on_device_route()
        if basis is not None and device:
            spec = resolvent_spectrum_device(W, self.compute_dtype, basis)
            stats["iterative"] += 1
            stats["iterations"] += 2**DEVICE_TOP_SQUARINGS + 2**DEVICE_SECOND_SQUARINGS
            self._warm[name] = spec.basis
            return spec
        if basis is not None and k >= 2:  # non-finite W: NaN Ritz values, fallback raises
            spec, iters = resolvent_spectrum(W, self.compute_dtype, basis)
            stats["iterations"] += iters
            if spec is not None:
                stats["iterative"] += 1
                self._warm[name] = spec.basis
                return spec
            stats["fallback"] += 1
        else:
            stats["cold"] += 1
        dec = fast_decompose(W, self.compute_dtype, name)
        small = dec.V if W.shape[0] > W.shape[1] else dec.U
        if k >= 2 or device:
            self._warm[name] = small[:, : min(RESOLVENT_BLOCK, k)].clone()
        return dec

    def decompositions(self, names: Iterable[str], in_step: bool = True) -> dict[str, Spectrum]:
        """Device route: :meth:`decomposition` of several layers, the warm-started misses computed
        together by :func:`resolvent_spectra_device` (one batch per group of
        :func:`device_batch_groups`: a few launches per step instead of ~150 operations per layer).
        Cache hits, cold layers and layers with k < 3 take the one-layer path. The bookkeeping (cache
        entry and snapshot, warm bases, :attr:`stats`) is that of :meth:`decomposition`. Every
        device-route spectrum of a warm layer comes from here, in batches of the layers that miss
        together (all of them after a step, or after a resume from :meth:`warm_state`), so a resumed
        run batches, and rounds, as the uninterrupted one did."""
        out: dict[str, Spectrum] = {}
        batch = []
        for name in names:
            dec = self.cached(name, in_step)
            if dec is not None:
                out[name] = dec
                continue
            basis = self._warm.get(name)
            W = weight_matrix(self._modules[name])
            if basis is None or min(W.shape) < 3 or basis.shape[1] < 3:
                out[name] = self.decomposition(name, in_step)
            else:
                self._dec_cache.pop(name, None)  # a stale one goes before the new ones (peak memory)
                batch.append((name, W, basis))
        shapes = [tuple(W.shape) for _, W, _ in batch]
        for group in device_batch_groups(shapes):
            members = [batch[i] for i in group]
            Ws, bases = [W for _, W, _ in members], [basis for *_, basis in members]
            key = (tuple(shapes[i] for i in group), self.compute_dtype, Ws[0].device)
            plan = self._batch_plans.get(key)
            if plan is None:
                plan = self._batch_plans[key] = DeviceBatchPlan.build(
                    key[0], self.compute_dtype, Ws[0].device
                )
            if self.cuda_graphs:
                if key not in self._graphs:
                    graph = SpectraGraph(plan, self.compute_dtype, Ws[0].device)
                    self._graphs[key] = ([name for name, *_ in members], graph)
                specs = self._graphs[key][1](Ws, bases)
            else:
                specs = resolvent_spectra_device(Ws, self.compute_dtype, bases, plan)
            for (name, W, basis), spec in zip(members, specs, strict=True):
                w = self._modules[name].weight
                self.stats["iterative"] += 1
                self.stats["iterations"] += 2**DEVICE_TOP_SQUARINGS + 2**DEVICE_SECOND_SQUARINGS
                self._warm_in[name] = basis
                self._stale[name] = None
                self._warm[name] = spec.basis
                own = _exactly_representable(W.dtype, spec.W.dtype)
                self._dec_cache[name] = (w.data_ptr(), w._version, spec.W if own else W.clone(), spec)
                out[name] = spec
        return {name: out[name] for name in names}

    def ok(self, name: str, dec: Spectrum) -> torch.Tensor:
        """Device route: 0-d bool, ``dec`` converged and the weight still holds its snapshot."""
        ok = getattr(dec, "ok", None)
        if ok is None:
            ok = torch.ones((), dtype=torch.bool, device=dec.u.device)
        stale = self._stale.get(name)
        return ok if stale is None else ok & ~stale

    def not_converged(self, name: str, dec: Spectrum) -> None:
        """Device route, when a step's packed results are read: a layer whose spectrum did not converge
        (or went stale) restarts cold, and its cached spectrum is dropped if it is still that one."""
        self.stats["fallback"] += 1
        self._warm.pop(name, None)
        cached = self._dec_cache.get(name)
        if cached is not None and cached[3] is dec:
            self._dec_cache.pop(name)

    def warm_state(self) -> dict[str, torch.Tensor | None]:
        """``"resolvent"`` mode: per layer, the warm-start basis (k, p) the next decomposition of
        the uninterrupted run starts from (None: a cold, full one). When the cached decomposition is
        of the current weight (the uninterrupted run would reuse it), that is the basis that produced
        it, so the resumed run recomputes it identically; otherwise the basis it left behind. Saved
        with a checkpoint and given to :meth:`load_warm_state` of a fresh cache, the resumed run gives
        bitwise the same numbers as the uninterrupted run."""
        state: dict[str, torch.Tensor | None] = {}
        for name in self._modules:
            current = self.cached(name) is not None
            basis = self._warm_in.get(name) if current else self._warm.get(name)
            state[name] = None if basis is None else basis.clone()
        return state

    def load_warm_state(self, state: Mapping[str, torch.Tensor | None]) -> None:
        """Restore :meth:`warm_state` (call before the first step of the resumed run)."""
        for name, basis in state.items():
            if name not in self._modules:
                raise LipverifyError(f"warm state names unknown layer {name!r}")
            if basis is None:
                self._warm.pop(name, None)
            else:
                self._warm[name] = basis.to(self.compute_dtype).clone()
