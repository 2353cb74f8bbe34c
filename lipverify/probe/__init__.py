"""Dynamics probe: Theorem 14/15 terms of a real ``nn.Module`` from one backward pass.

For every ``nn.Linear`` and ``nn.Conv2d`` (weight in the matrix view of MATH section 0: a Conv2d
weight ``(out, in, kh, kw)`` is the ``(out, in*kh*kw)`` matrix) the probe records, per step,
``sigma_1``, the gap, the degenerate flag, ``mu``, ``phi``, ``psi`` (Theorem 14 with the
Proposition 5 estimator), and for the network the Theorem 15 terms plus the cross-layer noise
diagnostic of MATH section 4; on request the full-data drift ``mu_full`` and the one-step discrete
truth of MATH section 3.

Per-sample structure (MATH section 2, end). Hooks capture each layer's input ``a`` and the gradient
``delta`` of the loss with respect to the layer's output. For a Linear layer ``G_i = delta_i a_i^T``
(summed over extra positions if the input has more than two dimensions), for a Conv2d
``G_i = sum_p delta_{i,p} a_{i,p}^T`` over output positions p with the unfolded patches
``a_{i,p}``. The probe only forms the projections

* ``y_i = G_i^T u = sum_p a_{i,p} (delta_{i,p}^T u)``  (n,)
* ``x_i = G_i v   = sum_p delta_{i,p} (a_{i,p}^T v)``  (m,)

never a per-sample gradient. For a Conv2d both are contractions of the patches ``a_{i,p}`` that
never form them (``conv_method="shifted"``, the default,
:func:`~lipverify.probe.projections.shifted_conv_projections`): on the flattened input ``A_i``
(C, L) patch entry (c, k) is ``A_i[c, pos(p, k)]`` (or a zero of the padding), so
``y_i = A_i T_i`` with ``T_i`` (L, K) a gather of ``t_{i,p} = delta_{i,p}^T u`` and ``a_{i,p}^T v``
a gather of ``V^T A_i``: two batched matrix products. ``conv_method="conv"`` takes
``a_{i,p}^T v`` as a convolution with ``v`` as a one-output-channel kernel and ``y_i`` as the
per-sample weight gradient of a single output channel (one grouped ``conv2d_weight`` call with
``groups = b``); ``"unfold"`` uses ``F.unfold`` (same numbers, the most memory).
The projections are linear in ``G_i``, so centring ``E_i = G_i - G_bar`` is ``y_i - y_bar``,
``x_i - x_bar``. The contractions with the activations run in ``projection_dtype`` (default: the
activations' own dtype, so float32 training keeps torch's fast float32 convolution kernels; a
float64 model gets float64 throughout); the projections are then cast to ``compute_dtype``
(float64 by default) before centring and everything after (decomposition, Lemma 13 forms,
Theorem 14 sums) runs in ``compute_dtype``.

Spectral parts per step (``decomposition=``). ``"gram"`` and ``"svd"`` take a full thin
SVD of every weight and evaluate Lemma 13 over all r singular pairs. ``"resolvent"`` (default) never does
after a layer's first step: it keeps the top pair, sigma_2 and the Cholesky factor of the deflated
``s1^2 I - W W^T + s1^2 u u^T`` on the smaller Gram side, warm-started from the previous step
(:func:`resolvent_spectrum`), and evaluates the resolvent form of MATH section 2 with one
triangular solve (:meth:`ResolventSpectrum.quadratic_form`). Not-converged steps fall back to the
full decomposition and are counted in ``DynamicsProbe.resolvent_stats``; for bitwise-identical
resumed runs the warm-start state must travel with the checkpoint (:meth:`DynamicsProbe.warm_state`).
The spectra, their cache and the warm starts are a :class:`~lipverify.probe.spectrum_cache.SpectrumCache`
owned by the probe.

Per-sample loss. The probe uses ``G_i = grad of l_i`` with the per-sample loss defined by
``L = (1/b) sum_i l_i``. The hooked output gradient of a ``reduction="mean"`` loss is
``(1/b) grad l_i``, so the probe multiplies ``delta`` by b. A ``reduction="sum"`` loss
``sum_i l_i = b L`` is SGD on L with learning rate ``b eta``: the hooked gradient is already
``grad l_i`` and the terms are computed with ``b eta`` (so mu and phi scale by b, psi by b^2). The
reduction is read from ``loss_fn.reduction`` when present, else ``"mean"`` (the default of torch's
functional losses); pass ``reduction=`` explicitly for anything else. A loss function returning
per-sample losses (shape (b,)) is averaged (``reduction="mean"``).

Definition of the per-sample gradient (also with batch norm and dropout). ``G_i`` is b times the
gradient of the batch loss with respect to a private copy ``W_i`` of the weight that only sample i
uses in the forward pass (evaluated at ``W_i = W``). Without interactions between samples this is
exactly ``grad l_i``. With batch norm in training mode (batch statistics) the samples interact:
``G_i`` then contains the interaction terms through the batch mean and variance (it is what the
hooks capture: the output gradient of sample i under the full batch loss), and
``(1/b) sum_i G_i`` is still exactly the batch gradient. With dropout each sample uses its own mask
of the single forward pass. :func:`reference_per_sample_gradients` implements this definition
independently of hooks (``mode="copy"``: per-sample weight copies, one autograd pass) and also the
``torch.func`` ``vmap(grad(l_i))`` definition (``mode="vmap"``) for models without interactions.

Parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm) are not part of the bound
``K = prod sigma_1(W_l)`` and are ignored. Any other module with its own parameters (Conv1d,
Conv3d, ConvTranspose, Bilinear, Embedding, ...), a grouped Conv2d, a non-zero padding mode,
parametrised weights, computed weights (the hooks of ``torch.nn.utils.weight_norm`` /
``spectral_norm``), frozen weights (``requires_grad=False``: a constant factor of K), a Linear/Conv2d
subclass that overrides ``forward`` (or ``_conv_forward``), weights shared between modules or a layer
called twice in one forward raise a :class:`LipverifyError` listing them, unless named in ``skip=``.

Decompositions are cached per layer (:class:`~lipverify.probe.spectrum_cache.SpectrumCache`) and reused
while the weight holds the values they were computed from: the version counter and a comparison with a
snapshot of W (writes through ``.data`` and fused optimiser kernels do not bump the counter).

Routes (``DynamicsProbe(route=...)`` or ``LIPVERIFY_PROBE_ROUTE``): the host route above (CPU's
default: scipy kernels, converged-or-fallback decided on the host) and the device route (CUDA's
default, ``route="device"`` on CPU: torch only, fixed work per step, no host synchronisation after a
layer's first step, results as :class:`~lipverify.probe.deferred.DeferredResults` read later; the
layers' spectra in one zero-padded batch per step,
:func:`~lipverify.probe.resolvent.resolvent_spectra_device`, optionally replayed from a CUDA graph,
``cuda_graphs=True``, :mod:`lipverify.probe.graphs`; ``after_step`` and the next ``before_step``
optionally on a side stream that overlaps the next forward and backward, ``side_stream=True``,
:mod:`lipverify.probe.streams`). :mod:`lipverify.probe.interpose` counts ATen operations and host
synchronisations (the proof on CPU).

Mixed precision. The probe's own work (decompositions, projections, terms, discrete truth) runs with
autocast off and float32 kept in float32 (no TF32, no oneDNN bf16), whatever region the caller is in;
hooked bfloat16/float16 activations and output gradients are cast up to the projection dtype. With a
``torch.amp.GradScaler``, :meth:`DynamicsProbe.use_grad_scaler` divides the hooked gradients by the
scale of the captured backward and skips the steps the scaler skips (:mod:`lipverify.probe.precision`).

Layout: :mod:`lipverify.probe.layers` (layer discovery, matrix view, per-sample weight copies),
:mod:`lipverify.probe.resolvent` (the spectrum kernels, one layer and batched),
:mod:`lipverify.probe.projections` (the per-sample projection kernel), :mod:`lipverify.probe.truth`
(the discrete-truth kernels), :mod:`lipverify.probe.buffers` (copy-free weight comparisons),
:mod:`lipverify.probe.spectrum_cache` (the per-layer spectra: cache, snapshots, warm starts, the device
route's batches), :mod:`lipverify.probe.graphs` (CUDA graphs of the spectra),
:mod:`lipverify.probe.streams` (the side stream's fork and join),
:mod:`lipverify.probe.dynamics_probe` (the :class:`DynamicsProbe` orchestration: hooks, schedule,
terms, discrete truth), :mod:`lipverify.probe.reference`
(the slow references), :mod:`lipverify.probe.precision` (autocast/TF32 off, GradScaler),
:mod:`lipverify.probe.deferred` and :mod:`lipverify.probe.interpose` (device-route results, counters).
"""

from lipverify.probe.deferred import DeferredResults
from lipverify.probe.dynamics_probe import (
    QUANTITIES,
    ROUTES,
    DynamicsProbe,
    ProbeSchedule,
    cross_layer_diffusion,
    update_exceeds_gap,
)
from lipverify.probe.layers import find_layers, weight_matrix
from lipverify.probe.reference import reference_layer_terms, reference_per_sample_gradients
from lipverify.probe.resolvent import (
    RESOLVENT_BLOCK,
    RESOLVENT_DIRECT_K,
    RESOLVENT_MAX_DIM,
    RESOLVENT_MAX_ITER,
    ResolventSpectrum,
    fast_decompose,
    resolvent_spectrum,
    resolvent_spectrum_device,
)

__all__ = [
    "QUANTITIES",
    "RESOLVENT_BLOCK",
    "RESOLVENT_DIRECT_K",
    "RESOLVENT_MAX_DIM",
    "RESOLVENT_MAX_ITER",
    "ROUTES",
    "DeferredResults",
    "DynamicsProbe",
    "ProbeSchedule",
    "ResolventSpectrum",
    "cross_layer_diffusion",
    "fast_decompose",
    "find_layers",
    "reference_layer_terms",
    "reference_per_sample_gradients",
    "resolvent_spectrum",
    "resolvent_spectrum_device",
    "update_exceeds_gap",
    "weight_matrix",
]
