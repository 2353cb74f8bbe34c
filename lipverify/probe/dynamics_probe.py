"""``DynamicsProbe``: the orchestration of the probe (hooks, schedule, Theorem 14/15 terms, discrete
truth); the spectra, their cache and warm starts are a :class:`~lipverify.probe.spectrum_cache.SpectrumCache`,
the kernels live in :mod:`lipverify.probe.layers`, :mod:`lipverify.probe.resolvent`,
:mod:`lipverify.probe.projections`, :mod:`lipverify.probe.truth` and :mod:`lipverify.probe.buffers`
(see :mod:`lipverify.probe` for the whole description)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lipverify._validation import LipverifyError, check_batch_size
from lipverify.dynamics import (
    DegenerateSpectrumError,
    LayerTerms,
    NonFiniteTermError,
    estimator_scale,
    layer_terms_from_projections,
)
from lipverify.probe.buffers import _subtract_into
from lipverify.probe.deferred import DeferredResults
from lipverify.probe.layers import find_layers, weight_matrix
from lipverify.probe.precision import GradScalerLink, full_precision
from lipverify.probe.projections import CONV_METHODS, centre, contract
from lipverify.probe.resolvent import ResolventSpectrum
from lipverify.probe.spectrum_cache import SpectrumCache
from lipverify.probe.streams import SideStream, tensors_of
from lipverify.probe.truth import _exceeds_gap_on_device, _top_pair_projections, update_exceeds_gap
from lipverify.spectral import SpectralDecomposition, gap_tolerance_for

#: Routes of :class:`DynamicsProbe` (``route=`` or the environment variable ``LIPVERIFY_PROBE_ROUTE``).
ROUTES = ("auto", "device", "host")
ROUTE_ENV = "LIPVERIFY_PROBE_ROUTE"
#: Columns of the packed per-step rows of the device route.
TERM_COLUMNS = ("sigma", "mu", "phi", "psi", "gap", "ok")
TRUTH_COLUMNS = (
    "dsigma_observed",
    "dsigma_first",
    "dsigma_second",
    "dropped_drift_term",
    "update_exceeds_gap",
    "ok",
)

#: Quantities a :class:`ProbeSchedule` can schedule.
QUANTITIES = ("terms", "full_gradient", "discrete")


@dataclass
class ProbeSchedule:
    """Which probe quantities run every how many steps (0 = never).

    ``terms``: sigma, gap, mu, phi, psi and the network terms (needs the hooks on the training
    backward); ``full_gradient``: ``mu_full`` from a pass over the whole data set; ``discrete``:
    observed ``Delta sigma_1`` of the optimiser step against its first/second-order predictions.
    """

    every: dict[str, int] = field(default_factory=lambda: {"terms": 1, "full_gradient": 0, "discrete": 1})

    def __post_init__(self) -> None:
        for key, value in self.every.items():
            if key not in QUANTITIES:
                raise LipverifyError(
                    f"unknown probe quantity {key!r}; expected one of {', '.join(QUANTITIES)}"
                )
            if not isinstance(value, int) or value < 0:
                raise LipverifyError(f"probe schedule for {key!r} must be an integer >= 0, got {value!r}")

    def due(self, quantity: str, step: int) -> bool:
        k = self.every.get(quantity, 0)
        return k > 0 and step % k == 0


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # "linear" | "conv"
    inputs: torch.Tensor | None = None
    grad_out: torch.Tensor | None = None
    # a Linear layer's forward output and its version (an in-place op after the layer changes it)
    outputs: torch.Tensor | None = None
    outputs_version: int = -1
    calls: int = 0
    # (G_bar^T u, G_bar v) of the batch gradient at W_t (after_backward), or G_bar itself
    batch_grad_projections: tuple[torch.Tensor, torch.Tensor] | None = None
    batch_grad: torch.Tensor | None = None
    weight_before: torch.Tensor | None = None
    # persistent (m, n) buffer in the compute dtype (a fresh one per use costs an allocation and, on CPU,
    # page faults): the gradient cast for its projections (after_backward), then Delta W (after_step)
    update_buffer: torch.Tensor | None = None
    dec_before: SpectralDecomposition | None = None


class DynamicsProbe:
    """Theorem 14/15 terms of every Linear/Conv2d layer of ``model`` from hooked activations.

    Arguments: ``skip``: module names to leave out; ``compute_dtype``: dtype of the projections and
    the spectral parts (float64 default; the model may train in float32); ``decomposition``:
    ``"gram"`` (:func:`fast_decompose`), ``"svd"`` (:func:`lipverify.spectral.decompose`) or
    ``"resolvent"`` (:func:`resolvent_spectrum`: top pair, sigma_2 and the deflated Cholesky factor
    from the smaller Gram matrix, warm-started from the previous step; no full decomposition, the
    first step of each layer and any non-converged step use the full ``"gram"`` decomposition,
    counted in :attr:`resolvent_stats`);
    ``conv_method``: ``"shifted"`` (default), ``"conv"`` or ``"unfold"`` (the same projections by
    three contractions: :func:`lipverify.probe.projections.contract`); ``projection_dtype``:
    dtype of the contractions with the activations (None: the activations' dtype);
    ``conv_chunk_bytes``: bound on the temporary buffers of the conv projections (per chunk of samples);
    ``population_size``: N
    for the without-replacement factor ``(1 - b/N)`` of Proposition 5 (None: with replacement);
    ``gap_tolerance``: relative gap below which a layer is flagged ``degenerate`` (None:
    :func:`lipverify.spectral.gap_tolerance_for` the compute dtype); ``route``: ``"auto"`` (default,
    or the environment variable ``LIPVERIFY_PROBE_ROUTE``): the device route for CUDA weights, the
    host route for CPU ones; ``"device"``: the device route everywhere (CPU then runs exactly CUDA's
    code: torch only, no scipy/LAPACK, no threadpoolctl); ``"host"``: the host route everywhere;
    ``cuda_graphs``: on the device route, run each step's batched spectra through a CUDA graph
    captured once per group of layer shapes (:mod:`lipverify.probe.graphs`: what is captured, the
    limits; on CPU the same static-buffer steps run eagerly); :attr:`graph_status` reports it;
    ``side_stream``: on the device route, issue ``after_step`` and the next ``before_step`` on a side
    stream that overlaps the next step's forward and backward (:mod:`lipverify.probe.streams`: the
    order that makes it safe, the limits; on CPU the same forks and joins run in order). Then
    ``after_backward`` (or ``compute``) must come between the backward and the optimiser step.

    The device route (``"resolvent"`` only; :meth:`on_device_route`) issues no host synchronisation
    in ``before_step``, ``capture``, ``after_backward``, ``compute`` and ``after_step`` once every layer
    has had its first (cold, full) decomposition: the spectrum is
    :func:`~lipverify.probe.resolvent.resolvent_spectrum_device` (fixed work, convergence verdict on
    the device), the cache check compares W with its snapshot on the device, and ``compute`` /
    ``after_step`` return :class:`~lipverify.probe.deferred.DeferredResults`: the same mapping, built
    from one packed tensor per call when first read (read it a step later to keep the device busy).
    A not-converged (or stale) layer comes out ``converged=False, degenerate=True`` and restarts cold.

    Two ways to use it: :meth:`measure` (one batch, the model is not updated, the parameters'
    ``.grad`` are restored), or inside a training loop::

        probe.before_step()                      # snapshot W_t (for the discrete truth)
        with probe.capture():
            loss = loss_fn(model(x), y); loss.backward()
        probe.after_backward()                   # keeps the batch gradient
        terms = probe.compute(lr)                # name -> LayerTerms
        optimizer.step()
        truth = probe.after_step(lr)             # name -> observed/first/second/dropped
    """

    def __init__(
        self,
        model: nn.Module,
        skip: Iterable[str] = (),
        compute_dtype: torch.dtype = torch.float64,
        decomposition: str = "resolvent",
        conv_method: str = "shifted",
        projection_dtype: torch.dtype | None = None,
        conv_chunk_bytes: int = 8 << 20,
        population_size: int | None = None,
        gap_tolerance: float | None = None,
        schedule: ProbeSchedule | None = None,
        route: str | None = None,
        cuda_graphs: bool = False,
        side_stream: bool = False,
    ) -> None:
        if route is None:  # the environment's choice applies to the "resolvent" decomposition only
            route = os.environ.get(ROUTE_ENV) or "auto"
            route = route if decomposition == "resolvent" or route not in ROUTES else "auto"
        if route not in ROUTES:
            raise LipverifyError(
                f"route must be one of {', '.join(ROUTES)} (argument or ${ROUTE_ENV}), got {route!r}"
            )
        if route == "device" and decomposition != "resolvent":
            raise LipverifyError(f"route='device' needs decomposition='resolvent', got {decomposition!r}")
        if cuda_graphs and (route == "host" or decomposition != "resolvent"):
            raise LipverifyError(
                "cuda_graphs=True needs the device route (decomposition='resolvent', route 'auto' or "
                f"'device'), got decomposition={decomposition!r}, route={route!r}"
            )
        if side_stream and (route == "host" or decomposition != "resolvent"):
            raise LipverifyError(
                "side_stream=True needs the device route (decomposition='resolvent', route 'auto' or "
                f"'device'), got decomposition={decomposition!r}, route={route!r}"
            )
        if decomposition not in ("gram", "svd", "resolvent"):
            raise LipverifyError(f"decomposition must be 'gram', 'svd' or 'resolvent', got {decomposition!r}")
        if conv_method not in CONV_METHODS:
            raise LipverifyError(f"conv_method must be one of {', '.join(CONV_METHODS)}, got {conv_method!r}")
        self.model = model
        self.compute_dtype = compute_dtype
        self.decomposition = decomposition
        self.conv_method = conv_method
        self.projection_dtype = projection_dtype
        self.conv_chunk_bytes = conv_chunk_bytes
        self.population_size = population_size
        self.gap_tolerance = gap_tolerance
        self.schedule = schedule or ProbeSchedule()
        self.route = route
        self._layers = {
            name: _Layer(name, module, kind) for name, (module, kind) in find_layers(model, skip).items()
        }
        # the spectra, their cache and warm starts (lipverify.probe.spectrum_cache)
        self._spectra = SpectrumCache(
            self._layers,
            decomposition,
            compute_dtype,
            cuda_graphs,
            _device_route_test(route, decomposition, self._layers),
        )
        self.side_stream = side_stream
        self._side: SideStream | None = None
        self._forked_in_before_step = False  # a before_step fork not joined yet (see after_step)
        self._capturing = False
        # mixed precision (lipverify.probe.precision): the GradScaler of use_grad_scaler, and whether
        # the scaler skips the current step (then compute() and after_step() return {})
        self._scaler: GradScalerLink | None = None
        self.step_skipped = False

    def use_grad_scaler(self, scaler, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Train with ``torch.amp.GradScaler`` ``scaler`` stepping ``optimizer`` (None: stop).

        The hooked output gradients and the ``.grad`` of a ``scaler.scale(loss).backward()`` carry
        the scale S; the probe divides them by the S of the captured backward, so the terms are those
        of the unscaled loss (no ``grad_scale=1/S``). A step the scaler skips (an inf/NaN gradient of
        the optimiser's parameters) is skipped here too: :meth:`compute` and :meth:`after_step`
        return ``{}``, :attr:`step_skipped` is True, the spectral cache stays valid (the weights did
        not move). Order: ``before_step``, ``capture`` around ``scaler.scale(loss).backward()``,
        ``after_backward``, ``compute``, ``scaler.step``, ``scaler.update``, ``after_step``
        (``scaler.unscale_`` for clipping may come anywhere before ``scaler.step``).
        See :mod:`lipverify.probe.precision` for the scaler internals this reads."""
        if self._scaler is not None:
            self._scaler.close()
        self._scaler = None if scaler is None else GradScalerLink(scaler, optimizer)

    def _skip_step(self) -> bool:
        """Whether the GradScaler skips this step (one host synchronisation when a scaler is used)."""
        self.step_skipped = self._scaler is not None and bool(self._scaler.found_inf())
        return self.step_skipped

    @property
    def graph_status(self) -> dict[str, str]:
        """``cuda_graphs=True``: per group of layers (their names joined by ``+``), the
        :attr:`~lipverify.probe.graphs.SpectraGraph.status` of its graph and its replays so far
        (:attr:`SpectrumCache.graph_status`)."""
        return self._spectra.graph_status

    @property
    def resolvent_stats(self) -> dict[str, int]:
        """``"resolvent"`` mode: ``iterative`` (warm-started resolvent steps), ``iterations`` (their
        total block iterations), ``cold`` (first decomposition of a layer: full), ``fallback`` (warm
        start did not converge or a factorisation failed: full decomposition instead); the cache's own
        dict (:attr:`SpectrumCache.stats`)."""
        return self._spectra.stats

    @property
    def cuda_graphs(self) -> bool:
        """Whether the device route's batched spectra run through CUDA graphs
        (:mod:`lipverify.probe.graphs`)."""
        return self._spectra.cuda_graphs

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def on_device_route(self) -> bool:
        """Whether the next step runs the device route: ``route="device"``, or ``"auto"`` with the
        probed weights on CUDA (``"resolvent"`` decomposition only). The device route is torch
        operations only (no scipy/LAPACK, no threadpoolctl), issues no host synchronisation after a
        layer's first (cold) step, and returns :class:`~lipverify.probe.deferred.DeferredResults`."""
        return self._spectra.on_device_route()

    def _fork(self, hold: Callable[[], Iterable[torch.Tensor]]) -> contextlib.AbstractContextManager:
        """``side_stream`` on the device route: the block's work on the side stream, the tensors
        ``hold()`` lists kept alive until the next join (:class:`~lipverify.probe.streams.SideStream`);
        else in order (``hold`` is not called)."""
        if not (self.side_stream and self.on_device_route()):
            return contextlib.nullcontext()
        device = next(iter(self._layers.values())).module.weight.device
        if self._side is None or self._side.device != device:
            self._join()
            self._side = SideStream(device)
        return self._side.fork(hold())

    def _join(self) -> None:
        """The current stream waits for the side stream's work (no host synchronisation)."""
        if self._side is not None:
            self._side.join()
        self._forked_in_before_step = False

    # ----------------------------------------------------------------- spectral parts
    @full_precision()
    def decomposition_of(self, name: str) -> SpectralDecomposition | ResolventSpectrum:
        """Thin SVD (or, in ``"resolvent"`` mode, the :class:`ResolventSpectrum`) of layer ``name``'s
        weight matrix, cached until the weight changes (the cache check compares W with its snapshot on
        the host: use it between steps, not inside the device route's steady state)."""
        self._join()
        if self.on_device_route():  # warm layers are computed in one batch (SpectrumCache.decompositions)
            return self._spectra.decompositions(self._layers, in_step=False)[name]
        return self._spectra.decomposition(name, in_step=False)

    def warm_state(self) -> dict[str, torch.Tensor | None]:
        """``"resolvent"`` mode: per layer, the warm-start basis (k, p) the next decomposition of the
        uninterrupted run starts from (None: a cold, full one), :meth:`SpectrumCache.warm_state`. Saved
        with a checkpoint and given to :meth:`load_warm_state` of a fresh probe, the resumed run gives
        bitwise the same numbers as the uninterrupted run."""
        self._join()
        return self._spectra.warm_state()

    def load_warm_state(self, state: Mapping[str, torch.Tensor | None]) -> None:
        """Restore :meth:`warm_state` (call before the first step of the resumed run)."""
        self._join()
        self._spectra.load_warm_state(state)

    def sigmas(self) -> dict[str, float]:
        """sigma_1 of every layer from :meth:`decomposition_of` (cached while the weight is unchanged).

        Always the same route, so a value never depends on what the process happens to hold: a run
        resumed from a checkpoint (:meth:`warm_state`) records the same bits as the uninterrupted one.
        In ``"resolvent"`` mode a warm-started decomposition also costs less than
        ``torch.linalg.matrix_norm(W, 2)``. On the device route: one batch, one host read."""
        self._join()
        if self.on_device_route():
            with full_precision():
                decs = self._spectra.decompositions(self._layers, in_step=False)
            values = torch.stack([d.sigma1 for d in decs.values()]).tolist()
            return dict(zip(self._layers, values, strict=True))
        return {name: float(self.decomposition_of(name).sigma1) for name in self._layers}

    def log_bound(self) -> float:
        """``ln K = sum_l ln sigma_1(W_l)`` (Proposition 8)."""
        return sum(math.log(s) for s in self.sigmas().values())

    # ----------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Install forward hooks (inputs) and output-tensor hooks (output gradients) for one
        forward/backward pass; removed on exit, the captured tensors are kept for :meth:`compute`."""
        handles = []
        if not any(layer.dec_before is not None for layer in self._layers.values()):
            self._spectra.begin_step()  # a step without before_step starts here
        for layer in self._layers.values():
            layer.inputs = layer.grad_out = layer.outputs = None
            layer.calls = 0
            handles.append(layer.module.register_forward_hook(self._make_hook(layer)))
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
            for h in handles:
                h.remove()
            if self._scaler is not None:  # the scale S of the backward just captured
                self._scaler.record_scale()

    @staticmethod
    def _make_hook(layer: _Layer) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            layer.calls += 1
            layer.inputs = args[0].detach()
            if layer.kind == "linear":
                layer.outputs = output.detach()
                layer.outputs_version = output._version
            if output.requires_grad:

                def grad_hook(g: torch.Tensor) -> None:
                    layer.grad_out = g.detach()

                output.register_hook(grad_hook)

        return hook

    # ----------------------------------------------------------------- projections
    def _per_sample_scale(self, b: int, reduction: str) -> float:
        """Factor turning the hooked output gradient into that of l_i (L = (1/b) sum l_i)."""
        if reduction == "mean":
            return float(b)
        if reduction == "sum":
            return 1.0
        raise LipverifyError(f"loss reduction must be 'mean' or 'sum', got {reduction!r}")

    def _projections(
        self, layer: _Layer, dec: SpectralDecomposition | ResolventSpectrum, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Uncentred ``(y, x, W y)``: rows ``G_i^T u`` (b, n), ``G_i v`` (b, m) and, when it comes for
        free, ``W G_i^T u`` (b, m) (else None): for a wide Linear layer in resolvent mode whose
        forward output ``z = a W^T + bias`` is in the projection dtype and unchanged since the forward,
        ``W y_i = sum_p (delta_{i,p}^T u) (z_{i,p} - bias)`` (MATH section 2: no product with W),
        formed in the compute dtype.

        On the host route a float32 ``z`` with float64 spectral parts is used too (the device route
        keeps the float64 product: fewer operations to launch). z carries the forward's float32
        rounding, ``|fl(z) - z| <= gamma_{n+1} (|W| |a| + |bias|)`` (n inputs, unit roundoff
        ``u = 2^-24``, ``gamma_j = j u / (1 - j u)``), the same order as the float32 rounding already
        in ``y = fl(t a)`` (``u |t| |W| |a|`` after the product with W). In the quadratic form that
        error e enters ``L^{-1} e`` with ``|L^{-1}| <= (s1^2 - s2^2)^{-1/2}``, so psi moves by at most
        ``2 sqrt(psi c S) + c S``, ``S = sum_i |e_i|^2 / (s1 (s1^2 - s2^2))``, c the psi prefactor
        (tests/test_probe.py checks this bound against the float64 product and the float64 reference)."""
        if layer.calls != 1:
            raise LipverifyError(
                f"layer {layer.name} was called {layer.calls} times in the captured forward pass; the probe "
                "needs exactly one call per layer (layers reused or unused in the forward, and activation "
                "checkpointing, which runs a forward again during backward, are not supported: skip=[...])"
            )
        if layer.grad_out is None:
            raise LipverifyError(
                f"no output gradient captured for layer {layer.name}: run loss.backward() inside "
                "probe.capture(), with the layer's output on the path to the loss and its weight trainable "
                "(not frozen after the probe was built, no torch.no_grad() around the forward)"
            )
        dt = self.projection_dtype or layer.inputs.dtype
        if dt not in (torch.float32, torch.float64):
            dt = torch.float32
        a = layer.inputs.to(dt)
        delta = layer.grad_out.to(dt)
        u, v = dec.u.to(dt), dec.v.to(dt)
        z = layer.outputs
        cd = self.compute_dtype
        use_z = (
            isinstance(dec, ResolventSpectrum)
            and not dec.tall
            and z is not None
            and z._version == layer.outputs_version
            and z.dtype == dt
            and (cd == dt or (cd == torch.float64 and not self.on_device_route()))
        )
        y, x, wy = self._contract(layer, a, delta, u, v, z if use_z else None)  # linear in delta
        return y.to(cd) * scale, x.to(cd) * scale, None if wy is None else wy.to(cd) * scale

    def _contract(
        self,
        layer: _Layer,
        a: torch.Tensor,
        delta: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        outputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:func:`lipverify.probe.projections.contract` with this probe's settings."""
        return contract(
            layer.module,
            layer.kind,
            a,
            delta,
            u,
            v,
            outputs,
            self.compute_dtype,
            self.conv_method,
            self.conv_chunk_bytes,
        )

    # ----------------------------------------------------------------- terms
    @full_precision()
    def compute(
        self,
        lr: float,
        reduction: str = "mean",
        mean_grads: Mapping[str, torch.Tensor] | None = None,
        grad_scale: float = 1.0,
        grad_noise_var: float = 0.0,
        weight_decay: float = 0.0,
    ) -> dict[str, LayerTerms]:
        """Theorem 14 terms of every layer from the last captured forward/backward pass.

        ``lr``: eta. The update is ``W <- W - eta (alpha g_B + beta xi + lambda W)`` with
        ``alpha = grad_scale``, per-entry noise variance ``beta^2 = grad_noise_var`` added once to
        the batch gradient and weight decay ``lambda``. Then (MATH sections 3 and 8.4)
        ``mu = -eta alpha u^T grad_L v - eta lambda sigma_1``,
        ``phi^2 = (eta alpha)^2 J^T Sigma_hat J + eta^2 beta^2`` and
        ``psi = ((eta alpha)^2 / 2) tr(H Sigma_hat) + (eta^2 beta^2 / 2) tr H``.
        ``grad_L`` is the batch mean ``G_bar`` unless ``mean_grads`` (name -> (m, n), e.g. from
        :meth:`full_gradient`) is given. ``noise_projections`` covers the gradient noise only (the
        injected noise is independent across layers).

        On the device route (:meth:`on_device_route`) the result is a
        :class:`~lipverify.probe.deferred.DeferredResults` with the same keys and values, computed from
        one packed tensor read on the host at the first access (the call itself does not synchronise);
        the errors this method raises on the host route (non-finite term, sigma_1 = sigma_2) are raised
        at that access. A layer whose resolvent iteration did not converge (or whose weight changed
        without a version bump since its spectrum was cached) comes out with ``converged=False`` and
        ``degenerate=True``, and restarts cold at its next decomposition.
        """
        self._join()
        out: dict[str, LayerTerms] = {}
        if self._skip_step():  # the GradScaler skips this step: no terms (one host read of found_inf)
            return out
        if self.on_device_route():
            return self._compute_device(lr, reduction, mean_grads, grad_scale, grad_noise_var, weight_decay)
        for name, layer in self._layers.items():
            if layer.inputs is None:
                raise LipverifyError(
                    f"nothing captured for layer {name}: run the forward pass inside capture()"
                )
            b = check_batch_size(layer.inputs.shape[0])
            lr_eff = lr * grad_scale * (b if reduction == "sum" else 1)
            dec = self.decomposition_of(name)
            drift, yc, xc, wyc = self._centred_projections(name, layer, dec, b, reduction, mean_grads)
            q = None
            if wyc is not None:
                q = dec.quadratic_form(yc, xc, weight_times_y=wyc)
            terms = layer_terms_from_projections(
                dec, yc, xc, drift, lr_eff, self.population_size, self.gap_tolerance, name, q
            )
            if weight_decay or grad_noise_var:
                trace_h = float(dec.hessian_trace())
                terms = replace(
                    terms,
                    mu=terms.mu - lr * weight_decay * terms.sigma,
                    phi=math.sqrt(terms.phi**2 + lr * lr * grad_noise_var),
                    psi=terms.psi + 0.5 * lr * lr * grad_noise_var * trace_h,
                )
            out[name] = terms
        return out

    def _centred_projections(
        self,
        name: str,
        layer: _Layer,
        dec: SpectralDecomposition | ResolventSpectrum,
        b: int,
        reduction: str,
        mean_grads: Mapping[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer's inputs to the Theorem 14 terms, shared by both routes: the drift projection
        ``u^T grad_L v`` (``mean_grads[name]`` if given, else the batch mean of ``u^T G_i v``) and the
        centred per-sample factors ``yc``, ``xc`` and ``W y`` (None where the layer has none), with a
        GradScaler's scale taken out of the hooked gradients."""
        y, x, wy = self._projections(layer, dec, self._per_sample_scale(b, reduction))
        if self._scaler is not None:  # hooked gradients of scaler.scale(loss): divide by S
            y, x, wy = (self._scaler.unscale(t) for t in (y, x, wy))
        if mean_grads is not None and name in mean_grads:
            drift = dec.u @ mean_grads[name].to(dec.sigma.dtype).reshape(dec.shape) @ dec.v
        else:
            drift = (x @ dec.u).mean()
        yc, xc = centre(y, x)
        wyc = None if wy is None else wy - wy.mean(0, keepdim=True)
        return drift, yc, xc, wyc

    def _compute_device(
        self,
        lr: float,
        reduction: str,
        mean_grads: Mapping[str, torch.Tensor] | None,
        grad_scale: float,
        grad_noise_var: float,
        weight_decay: float,
    ) -> DeferredResults:
        """:meth:`compute` without a host synchronisation: the same formulas on tensors, one packed
        (L, 6) row per layer (:data:`TERM_COLUMNS`)."""
        rows, noise, decs = [], {}, {}
        for name, layer in self._layers.items():
            if layer.inputs is None:
                raise LipverifyError(
                    f"nothing captured for layer {name}: run the forward pass inside capture()"
                )
        spectra = self._spectra.decompositions(self._layers)
        for name, layer in self._layers.items():
            b = check_batch_size(layer.inputs.shape[0])
            lr_eff = lr * grad_scale * (b if reduction == "sum" else 1)
            if not (math.isfinite(lr_eff) and lr_eff > 0):
                raise LipverifyError(f"{name}: the learning rate must be positive and finite, got {lr_eff}")
            dec = decs[name] = spectra[name]
            drift, yc, xc, wyc = self._centred_projections(name, layer, dec, b, reduction, mean_grads)
            if wyc is not None:
                q = dec.quadratic_form(yc, xc, weight_times_y=wyc)
            else:
                q = dec.quadratic_form(yc, xc)
            scale = estimator_scale(b, self.population_size)
            proj = xc @ dec.u  # u^T E_i v
            sigma = dec.sigma1
            mu = -lr_eff * drift
            phi = lr_eff * ((proj * proj).sum() * scale).clamp(min=0).sqrt()
            psi = 0.5 * lr_eff * lr_eff * (q.sum() * scale)
            if weight_decay or grad_noise_var:
                mu = mu - lr * weight_decay * sigma
                phi = (phi * phi + lr * lr * grad_noise_var).sqrt()
                psi = psi + 0.5 * lr * lr * grad_noise_var * dec.hessian_trace()
            ok = self._spectra.ok(name, dec).to(sigma.dtype)
            rows.append(torch.stack([sigma, mu.to(sigma.dtype), phi, psi, dec.gap, ok]))
            noise[name] = lr_eff * math.sqrt(scale) * proj
        tolerance = self.gap_tolerance or gap_tolerance_for(self.compute_dtype)

        def build(packed: list[list[float]]) -> dict[str, LayerTerms]:
            out = {}
            for name, (sigma, mu, phi, psi, gap, ok) in zip(decs, packed, strict=True):
                converged = ok > 0.5
                if not converged:
                    self._spectra.not_converged(name, decs[name])
                elif not gap > 0:
                    raise DegenerateSpectrumError(
                        f"{name}: sigma_1 = sigma_2 = {sigma:.6g}; psi (Theorem 14) is undefined"
                    )
                for key, value in (("mu", mu), ("phi", phi), ("psi", psi)):
                    if not math.isfinite(value):
                        why = "" if converged else "; the resolvent iteration did not converge at this step"
                        raise NonFiniteTermError(
                            f"{name}: {key} is not finite (gap {gap:.3g}){why}; check the inputs"
                        )
                out[name] = LayerTerms(
                    sigma=sigma,
                    mu=mu,
                    phi=phi,
                    psi=psi,
                    gap=gap,
                    degenerate=not converged or gap / sigma < tolerance,
                    noise_projections=noise[name],
                    converged=converged,
                )
            return out

        packed = torch.stack(rows)
        # device tensors for diagnostics computed before the results are read (lipverify train)
        tensors = {"noise_projections": list(noise.values()), "sigma": packed[:, 0]}
        return DeferredResults(list(decs), packed, build, tensors)

    @full_precision()
    def drift(
        self,
        mean_grads: Mapping[str, torch.Tensor],
        lr: float,
        grad_scale: float = 1.0,
        weight_decay: float = 0.0,
        reduction: str = "mean",
    ) -> dict[str, float]:
        """``mu = -eta alpha u^T grad_L v - eta lambda sigma_1`` for expected gradients (e.g. full-data).

        ``mean_grads``: name -> mean per-sample gradient (m, n) (e.g. :meth:`full_gradient`).
        ``reduction``: of the training loss, as in :meth:`compute`; with ``"sum"`` the step moves by
        ``eta alpha b grad_L``, b taken from the last captured batch."""
        lr_eff = lr * grad_scale * self._mean_gradient_factor(reduction)
        out = {}
        for name in self._layers:
            dec = self.decomposition_of(name)
            g = mean_grads[name].to(dec.sigma.dtype).reshape(dec.shape)
            out[name] = -lr_eff * float(dec.u @ g @ dec.v) - lr * weight_decay * float(dec.sigma1)
        return out

    def _mean_gradient_factor(self, reduction: str) -> int:
        """The optimiser's gradient over the mean gradient: 1 (``"mean"`` loss) or the batch size b of
        the last captured batch (``"sum"``)."""
        if reduction == "mean":
            return 1
        if reduction != "sum":
            raise LipverifyError(f"loss reduction must be 'mean' or 'sum', got {reduction!r}")
        sizes = [layer.inputs.shape[0] for layer in self._layers.values() if layer.inputs is not None]
        if not sizes:
            raise LipverifyError(
                "reduction='sum' scales the mean gradient by the batch size of the last captured batch: "
                "capture one first"
            )
        return check_batch_size(sizes[0])

    def measure(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        lr: float,
        reduction: str | None = None,
        mean_grads: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, LayerTerms]:
        """Theorem 14 terms for one batch without updating the model (its ``.grad`` is restored).

        ``loss_fn(outputs, targets)`` returns the batch loss (scalar, ``reduction`` read from
        ``loss_fn.reduction`` or ``"mean"``) or per-sample losses of shape (b,) (averaged here).
        The forward runs in the model's current mode (dropout draws masks, batch norm in training mode
        uses the batch statistics) under :meth:`_side_effects_undone`: the random streams and the
        buffers (batch-norm running statistics) are as before the call, and so is the training
        step's capture (a later :meth:`compute`, :meth:`drift` or :meth:`after_step` still sees it).
        """
        check_batch_size(inputs.shape[0])
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        captured = [
            (layer.inputs, layer.grad_out, layer.outputs, layer.outputs_version, layer.calls)
            for layer in self._layers.values()
        ]
        for p in params:
            p.grad = None
        scaler, self._scaler = self._scaler, None  # measure's own backward is not scaled
        try:
            with self._side_effects_undone(), self.capture():
                loss = loss_fn(self.model(inputs), targets)
                red = reduction or getattr(loss_fn, "reduction", "mean")
                if loss.ndim > 0:
                    loss, red = loss.mean(), "mean"
                loss.backward()
            return self.compute(lr, reduction=red, mean_grads=mean_grads)
        finally:
            for p, g in zip(params, saved, strict=True):
                p.grad = g
            for layer, state in zip(self._layers.values(), captured, strict=True):
                layer.inputs, layer.grad_out, layer.outputs, layer.outputs_version, layer.calls = state
            self._scaler = scaler

    def full_gradient(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Full-data gradient ``grad_L = (1/N) sum_i grad l_i`` of each layer weight, (m, n).

        ``loss_fn`` must be mean-reduced per batch. Runs in the model's current mode under
        :meth:`_side_effects_undone` (dropout masks here do not change the training's random stream,
        batch-norm running statistics are restored); with batch norm in training mode the statistics
        are those of each chunk in ``batches``.
        """
        weights = [layer.module.weight for layer in self._layers.values()]
        total = [torch.zeros_like(w, dtype=self.compute_dtype) for w in weights]
        count = 0
        with self._side_effects_undone():
            for x, y in batches:
                loss = loss_fn(self.model(x), y) * x.shape[0]
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for acc, g in zip(total, grads, strict=True):
                    if g is not None:
                        acc += g.to(self.compute_dtype)
                count += x.shape[0]
        if count == 0:
            raise LipverifyError("full_gradient got no data")
        return {
            name: (acc / count).reshape(acc.shape[0], -1)
            for name, acc in zip(self._layers, total, strict=True)
        }

    @contextlib.contextmanager
    def _side_effects_undone(self) -> Iterator[None]:
        """Forked random streams (CPU and the model's CUDA devices) and the model's buffers (e.g.
        batch-norm ``running_mean``/``running_var``/``num_batches_tracked``) restored on exit: a
        measurement pass leaves no trace in the training."""
        buffers = [b for b in self.model.buffers() if b is not None]
        saved = [b.clone() for b in buffers]
        devices = sorted({b.device.index or 0 for b in (*self.model.parameters(), *buffers) if b.is_cuda})
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            with torch.no_grad():
                for b, old in zip(buffers, saved, strict=True):
                    b.copy_(old)

    # ----------------------------------------------------------------- discrete truth
    @full_precision()
    def before_step(self) -> None:
        """Snapshot every weight (and its decomposition) before the optimiser step.

        The snapshot is the one the decomposition cache keeps (in ``"resolvent"`` mode the
        decomposition's own copy of W_t when it holds the weight's values exactly). W must not change
        between this call and the optimiser step. With ``side_stream`` its device work (the cache
        checks, any spectrum to compute) goes on the side stream."""
        self._spectra.begin_step()
        device = self.on_device_route()
        with self._fork(self._spectra.tensors):
            batched = self._spectra.decompositions(self._layers) if device else None
            for name, layer in self._layers.items():
                dec = batched[name] if batched else self._spectra.decomposition(name, in_step=True)
                layer.dec_before = dec
                layer.weight_before = self._spectra.snapshot(name)
        self._forked_in_before_step = self._side is not None and self._side.pending
        if self._scaler is not None:
            self._scaler.begin_step()

    @full_precision()
    def after_backward(self) -> None:
        """Keep the batch gradient ``G_bar`` of each layer (for the dropped drift term): its projections
        ``(G_bar^T u, G_bar v)`` on the top pair of W_t after :meth:`before_step`, else a copy."""
        self._join()
        for layer in self._layers.values():
            g = layer.module.weight.grad
            layer.batch_grad_projections = layer.batch_grad = None
            if g is None:
                continue
            g = g.detach().reshape(g.shape[0], -1)
            if self._scaler is not None and not self._scaler.grads_unscaled():
                g = self._scaler.unscale(g)  # .grad of scaler.scale(loss) before scaler.unscale_
            if layer.dec_before is not None:
                buffer = _update_buffer(layer, layer.dec_before)
                layer.batch_grad_projections = _top_pair_projections(layer.dec_before, g, buffer)
            else:  # after_backward before before_step: u, v of W_t are not known yet
                layer.batch_grad = g.clone()

    @full_precision()
    def after_step(
        self,
        lr: float,
        mean_grads: Mapping[str, torch.Tensor] | None = None,
        grad_scale: float = 1.0,
        reduction: str = "mean",
    ) -> dict[str, dict[str, float]]:
        """One-step discrete truth (MATH section 3) of the update ``Delta W = W_{t+1} - W_t``.

        Per layer: ``dsigma_observed = sigma_1(W_{t+1}) - sigma_1(W_t)``, ``dsigma_first = u^T Delta W v``,
        ``dsigma_second = u^T Delta W v + q_H(Delta W) / 2``, ``dropped_drift_term =
        ((eta alpha)^2 / 2) q_H(grad_L)`` (grad_L: ``mean_grads`` if given, else the batch mean kept
        by :meth:`after_backward`; weight decay adds nothing since ``q_H(W) = 0``) and
        ``update_exceeds_gap``: ``|Delta W|_2 >= (sigma_1 - sigma_2) / 2`` at W_t. Then Weyl's
        inequality no longer keeps sigma_1(W_{t+1}) apart from the perturbed sigma_2 (both move by at
        most ``|Delta W|_2``), the expansion's remainder ``O(|Delta W|^3 / gap^2)`` is not small, and the
        observed top pair may be another singular pair: the discrete truth of that layer is unreliable.
        ``|Delta W|_F < gap / 2`` decides False without the spectral norm (``|.|_2 <= |.|_F``); only
        otherwise ``torch.linalg.matrix_norm(Delta W, 2)`` is computed. ``reduction`` (of the training
        loss, as in :meth:`compute`) matters only with ``mean_grads``: with ``"sum"`` the step moves by
        ``eta alpha b grad_L``.

        On the device route (:meth:`on_device_route`) the result is a
        :class:`~lipverify.probe.deferred.DeferredResults` (same keys and values, read on the host at
        the first access); W_{t+1}'s spectrum is always recomputed (fused optimiser kernels do not bump
        the version counter), ``update_exceeds_gap`` is decided by whether ``(gap/2)^2 I - Delta W Delta W^T``
        (smaller side) has a Cholesky factor (:func:`_exceeds_gap_on_device`), and it is also True for a
        not-converged spectrum at W_t or W_{t+1} (the truth of that layer is then not to be used).
        With ``side_stream`` the device route's work is issued on the side stream (read the results
        later for it to overlap the next step).
        """
        if self._forked_in_before_step:
            raise LipverifyError(
                "side_stream=True: call after_backward() or compute() between the backward and the "
                "optimiser step (the optimiser writes the weights that before_step's side-stream work reads)"
            )
        with self._fork(lambda: self._after_step_hold(mean_grads)):
            return self._after_step(lr, mean_grads, grad_scale, reduction)

    def _after_step(
        self, lr: float, mean_grads: Mapping[str, torch.Tensor] | None, grad_scale: float, reduction: str
    ) -> dict[str, dict[str, float]]:
        """:meth:`after_step` (on the side stream when it forked)."""
        device = self.on_device_route()
        mean_grad_scale = (
            grad_scale * self._mean_gradient_factor(reduction) if mean_grads is not None else 1.0
        )
        out = {}
        self.step_skipped = self._scaler is not None and not self._scaler.optimizer_stepped
        if self.step_skipped:
            # the GradScaler skipped optimizer.step(): W_{t+1} = W_t, W_t's spectrum stays cached
            self._scaler.skipped_steps += 1
            for layer in self._layers.values():
                layer.dec_before = layer.weight_before = None
                layer.batch_grad_projections = layer.batch_grad = None
            return out
        rows, decs = [], {}
        for name, layer in self._layers.items():
            if layer.dec_before is None:
                raise LipverifyError("after_step needs before_step() before the optimiser step")
            if device:
                rows.append(self._truth_at_before(name, layer, lr, mean_grads, grad_scale, mean_grad_scale))
                continue
            dec = layer.dec_before
            dW, y, x, projections, scale = self._update_projections(
                name, layer, mean_grads, grad_scale, mean_grad_scale, _subtract_into
            )
            first = float(x @ dec.u)  # u^T Delta W v
            dropped = math.nan
            if projections is not None and isinstance(dec, ResolventSpectrum):
                # both quadratic forms in one call: one pass over W_t, one triangular solve
                both = dec.quadratic_form(torch.stack([y, projections[0]]), torch.stack([x, projections[1]]))
                q, qg = (float(t) for t in both)
                dropped = 0.5 * (lr * scale) ** 2 * qg
            else:
                q = float(dec.quadratic_form(y, x))
                if projections is not None:
                    dropped = 0.5 * (lr * scale) ** 2 * float(dec.quadratic_form(*projections))
            exceeds = update_exceeds_gap(dW, float(dec.gap))
            sigma_before = dec.sigma1
            # W_t's spectrum (weight copy, factor) is released before W_{t+1}'s is computed: peak memory
            dec = dW = None
            layer.dec_before = layer.weight_before = None
            layer.batch_grad_projections = layer.batch_grad = None
            new = self.decomposition_of(name)
            out[name] = {
                "dsigma_observed": float(new.sigma1 - sigma_before),
                "dsigma_first": first,
                "dsigma_second": first + 0.5 * q,
                "dropped_drift_term": dropped,
                "update_exceeds_gap": exceeds,
            }
        if not device:
            return out
        # W_{t+1}'s spectra, batched, once every layer has released W_t's (peak memory)
        new = self._spectra.decompositions(self._layers)
        decs = {name: (new[name],) for name in self._layers}  # W_t's spectra are released
        rows = [
            torch.cat(
                [
                    (new[name].sigma1 - sigma_before).reshape(1),
                    part,
                    (ok_before & self._spectra.ok(name, new[name])).to(part.dtype).reshape(1),
                ]
            )
            for name, (part, sigma_before, ok_before) in zip(self._layers, rows, strict=True)
        ]

        def build(packed: list[list[float]]) -> dict[str, dict[str, float]]:
            for name, (_, _, _, _, _, ok) in zip(decs, packed, strict=True):
                if ok < 0.5:
                    for dec in decs[name]:
                        self._spectra.not_converged(name, dec)
            return {
                name: {
                    "dsigma_observed": observed,
                    "dsigma_first": first,
                    "dsigma_second": second,
                    "dropped_drift_term": dropped,
                    "update_exceeds_gap": exceeds > 0.5 or ok < 0.5,
                }
                for name, (observed, first, second, dropped, exceeds, ok) in zip(decs, packed, strict=True)
            }

        return DeferredResults(list(decs), torch.stack(rows), build)

    def _after_step_hold(self, mean_grads: Mapping[str, torch.Tensor] | None) -> list[torch.Tensor]:
        """What ``after_step``'s side-stream work reads that the current stream may have allocated: per
        layer W_t's spectrum and snapshot, the kept gradient (or its projections), the update buffer;
        the full-data gradients ``mean_grads``; and the spectral cache."""
        hold = [] if mean_grads is None else [g for g in mean_grads.values() if isinstance(g, torch.Tensor)]
        for layer in self._layers.values():
            hold += tensors_of(layer.dec_before) + tensors_of(layer.weight_before)
            hold += tensors_of(layer.batch_grad_projections) + tensors_of(layer.batch_grad)
            hold += tensors_of(layer.update_buffer)
        return hold + self._spectra.tensors()

    def _update_projections(self, name, layer, mean_grads, grad_scale, mean_grad_scale, subtract) -> tuple:
        """Both routes of :meth:`after_step`, one layer at W_t: ``(dW, y, x, projections, scale)`` with
        ``Delta W = W_{t+1} - W_t`` in the spectrum's dtype (``subtract(W1, W0, out=buffer)`` when the
        promotion is exact), its top-pair projections ``y = Delta W^T u``, ``x = Delta W v``, the
        projections of the gradient of the dropped drift term (``mean_grads[name]`` if given, else the
        batch gradient kept by :meth:`after_backward`; None if neither) and that gradient's factor in
        the optimiser's step (``grad_scale``, or ``mean_grad_scale`` for ``mean_grads``)."""
        dec = layer.dec_before
        dt = dec.sigma.dtype
        W1, W0 = weight_matrix(layer.module), layer.weight_before
        if torch.promote_types(W1.dtype, W0.dtype) == dt:
            dW = subtract(W1, W0, out=_update_buffer(layer, dec))  # the promotion to dt is exact
        else:
            dW = W1.to(dt) - W0.to(dt)
        y, x = _top_pair_projections(dec, dW)
        if mean_grads is not None and name in mean_grads:
            return dW, y, x, _top_pair_projections(dec, mean_grads[name]), mean_grad_scale
        if layer.batch_grad is not None:
            projections = _top_pair_projections(dec, layer.batch_grad)
        else:
            projections = layer.batch_grad_projections
        return dW, y, x, projections, grad_scale  # the optimiser's gradient is grad_scale times the kept one

    def _truth_at_before(self, name, layer, lr, mean_grads, grad_scale, mean_grad_scale) -> tuple:
        """Device route of :meth:`after_step` for one layer, the part at W_t: ``(first, second, dropped,
        exceeds)`` of :data:`TRUTH_COLUMNS` as one tensor, sigma_1(W_t) and W_t's verdict; W_t's spectrum
        is released (``after_step`` then computes every W_{t+1} spectrum in one batch)."""
        dec = layer.dec_before
        dt = dec.sigma.dtype
        # torch's subtraction: the device route stays torch only (numpy reads are host reads)
        dW, y, x, projections, scale = self._update_projections(
            name, layer, mean_grads, grad_scale, mean_grad_scale, torch.sub
        )
        first = x @ dec.u
        if projections is not None:  # both quadratic forms in one call (one triangular solve)
            q, qg = dec.quadratic_form(torch.stack([y, projections[0]]), torch.stack([x, projections[1]]))
            dropped = 0.5 * (lr * scale) ** 2 * qg
        else:
            q = dec.quadratic_form(y, x)
            dropped = torch.full((), math.nan, dtype=dt, device=dW.device)
        exceeds = _exceeds_gap_on_device(dW, dec.gap).to(dt)
        ok_before, sigma_before = self._spectra.ok(name, dec), dec.sigma1
        # W_t's spectrum is released before W_{t+1}'s is computed (peak memory)
        dec = dW = None
        layer.dec_before = layer.weight_before = None
        layer.batch_grad_projections = layer.batch_grad = None
        self._spectra.forget(name)
        return torch.stack([first, first + 0.5 * q, dropped, exceeds]), sigma_before, ok_before


def _device_route_test(route: str, decomposition: str, layers: Mapping[str, _Layer]) -> Callable[[], bool]:
    """:meth:`DynamicsProbe.on_device_route`'s test, for the probe's :class:`SpectrumCache`:
    ``route="device"``, or ``"auto"`` with the probed weights on CUDA (``"resolvent"`` only). It closes
    over the settings and the layers, not the probe (no reference cycle: a dropped probe frees its
    spectra at once)."""

    def on_device_route() -> bool:
        if decomposition != "resolvent" or route == "host":
            return False
        return route == "device" or next(iter(layers.values())).module.weight.is_cuda

    return on_device_route


def _update_buffer(layer: _Layer, dec: SpectralDecomposition | ResolventSpectrum) -> torch.Tensor:
    """The layer's persistent (m, n) buffer in the dtype and on the device of ``dec`` (made or remade
    when those or the shape changed)."""
    dt, buf = dec.u.dtype, layer.update_buffer
    if buf is None or buf.dtype != dt or buf.shape != dec.shape or buf.device != dec.u.device:
        buf = layer.update_buffer = torch.empty(dec.shape, dtype=dt, device=dec.u.device)
    return buf


def cross_layer_diffusion(terms: Mapping[str, LayerTerms]) -> float:
    """Cross-layer part of the diffusion of ln K that Assumption 3 drops (MATH section 4).

    ``sum_i (sum_l p_{l,i} / sigma_l)^2 - sum_l sum_i p_{l,i}^2 / sigma_l^2
    = 2 sum_{l < l'} sum_i p_{l,i} p_{l',i} / (sigma_l sigma_l')`` with ``p_{l,i}`` the layers'
    ``noise_projections``. Unlike ``network_terms(...).phi_sq_cross`` it uses the projections only,
    so it stays correct when ``phi`` also carries injected gradient noise (independent across
    layers, hence without cross terms).
    """
    items = list(terms.values())
    if any(t.noise_projections is None for t in items):
        raise LipverifyError("cross_layer_diffusion needs LayerTerms with noise_projections")
    squares = cross_layer_squares([t.noise_projections for t in items], [t.sigma for t in items])
    return combine_cross_layer_squares(squares.tolist())  # one read


def cross_layer_squares(noise_projections: Sequence[torch.Tensor], sigmas: Sequence) -> torch.Tensor:
    """The parts of :func:`cross_layer_diffusion` on the device, without a host read: float64
    ``(L + 1,)``, ``[sum_i (sum_l p_{l,i} / sigma_l)^2, sum_i p_{1,i}^2 / sigma_1^2, ...]`` from the
    layers' noise projections (b,) each and their sigma_1 (floats or 0-d tensors, same values give
    the same bits); :func:`combine_cross_layer_squares` of its values is the diagnostic."""
    scaled = [p.to(torch.float64) / s for p, s in zip(noise_projections, sigmas, strict=True)]
    total = sum(scaled)
    return torch.stack([(total * total).sum(), *((p * p).sum() for p in scaled)])


def combine_cross_layer_squares(squares: Sequence[float]) -> float:
    """``squares[0] - sum(squares[1:])`` on the host (:func:`cross_layer_squares`)."""
    return squares[0] - sum(squares[1:])
