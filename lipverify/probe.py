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

never a per-sample gradient. For a Conv2d, ``a_{i,p}^T v`` is a convolution of the input with
``v`` reshaped as a one-output-channel kernel, and ``y_i`` is the per-sample weight gradient of a
single output channel with output gradient ``delta^T u`` (one grouped ``conv2d_weight`` call with
``groups = b``); ``conv_method="unfold"`` uses ``F.unfold`` instead (same numbers, more memory).
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

Decompositions are cached per layer and reused while the weight holds the values they were computed
from: the version counter and a comparison with a snapshot of W (writes through ``.data`` and fused
optimiser kernels do not bump the counter).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from lipverify import _linalg
from lipverify._validation import LipverifyError, check_batch_size
from lipverify.dynamics import LayerTerms, layer_terms, layer_terms_from_projections
from lipverify.spectral import (
    SpectralDecomposition,
    decompose,
    separation_tolerance,
    with_canonical_sign,
)

#: Quantities a :class:`ProbeSchedule` can schedule.
QUANTITIES = ("terms", "full_gradient", "discrete")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


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
    # persistent buffer of Delta W (a fresh (m, n) tensor per step costs page faults on CPU)
    update_buffer: torch.Tensor | None = None
    dec_before: SpectralDecomposition | None = None


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return (pads[0], pads[1])
    return tuple(module.padding)


def find_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, tuple[nn.Module, str]]:
    """The probed layers ``name -> (module, kind)``; raises listing every unsupported module.
    ``skip``: module names left out together with everything inside them; a name that is not a
    module of ``model`` is an error."""
    from torch.nn.utils import parametrize

    skip = set(skip)
    # a skipped module's descendants are skipped too ("block" covers "block.0", "block.1.fc")
    skipped_prefixes = tuple(f"{s}." for s in skip if s)
    layers: dict[str, tuple[nn.Module, str]] = {}
    problems: list[str] = []
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if name in skip or name.startswith(skipped_prefixes):
            continue
        own = [p for p in module.parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            problems.append(f"{name} ({type(module).__name__}: parametrised weights)")
            continue
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, nn.Conv2d):
            kind = "conv"
            if module.groups != 1:
                problems.append(f"{name} (Conv2d with groups={module.groups})")
                continue
            if module.padding_mode != "zeros":
                problems.append(f"{name} (Conv2d with padding_mode={module.padding_mode!r})")
                continue
            if _conv_padding(module) is None:
                problems.append(f"{name} (Conv2d with asymmetric 'same' padding)")
                continue
        elif isinstance(module, _NORM_TYPES) or not own:
            continue
        else:
            problems.append(f"{name} ({type(module).__name__})")
            continue
        base = nn.Linear if kind == "linear" else nn.Conv2d
        overridden = [
            f
            for f in ("forward", "_conv_forward")
            if getattr(type(module), f, None) is not getattr(base, f, None)
        ]
        if overridden:  # G_i = delta_i a_i^T holds only for the stock forward
            problems.append(f"{name} ({type(module).__name__} overrides {', '.join(overridden)})")
            continue
        if not isinstance(module.weight, nn.Parameter):
            problems.append(
                f"{name} ({type(module).__name__}: weight is computed, not a Parameter, e.g. by the hooks of "
                "torch.nn.utils.weight_norm/spectral_norm)"
            )
            continue
        if not module.weight.requires_grad:
            problems.append(f"{name} ({type(module).__name__}: frozen weight, requires_grad=False)")
            continue
        key = id(module.weight)
        if key in owners:
            problems.append(f"{name} (weight shared with {owners[key]})")
            continue
        owners[key] = name
        layers[name] = (module, kind)
    unknown = skip - {n for n, _ in model.named_modules()}
    if unknown:
        raise LipverifyError(f"skip names unknown modules: {', '.join(sorted(unknown))}")
    if problems:
        raise LipverifyError(
            "unsupported layers for the dynamics probe (supported: nn.Linear, nn.Conv2d with groups=1 and "
            "zero padding, with their own forward and unshared, unparametrised, trainable weights): "
            + "; ".join(problems)
            + ". Pass their names in skip=[...] to leave them out of the bound (a frozen layer's sigma_1 is "
            "a constant factor of K)."
        )
    if not layers:
        raise LipverifyError("the model has no nn.Linear or nn.Conv2d layer to probe")
    return layers


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight in the matrix view of MATH section 0: (out, in) or (out, in*kh*kw), detached."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def fast_decompose(W: torch.Tensor, dtype: torch.dtype, name: str = "W") -> SpectralDecomposition:
    """Thin SVD of ``W`` (m, n) in ``dtype`` via the eigendecomposition of the smaller Gram matrix.

    ``W W^T = U diag(s^2) U^T`` (m <= n) and ``V = W^T U / s`` (or the transpose). 3-5x faster than
    ``torch.linalg.svd`` on CPU; falls back to :func:`lipverify.spectral.decompose` when the smallest
    singular value is below ``1e-4 sigma_1`` (where ``W^T U / s`` loses digits). Same sign
    convention as ``decompose``.
    """
    Wc = W.to(dtype)
    m, n = Wc.shape
    if not bool(torch.isfinite(Wc).all()):
        return decompose(Wc, name)  # raises the named error
    tall = m > n
    gram = Wc.T @ Wc if tall else Wc @ Wc.T
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    if not bool(evals[-1] > (1e-4**2) * evals[0]):
        return decompose(Wc, name)
    s = evals.sqrt()
    other = (Wc @ evecs if tall else Wc.T @ evecs) / s
    U, V = (other, evecs) if tall else (evecs, other)
    return with_canonical_sign(U, s, V)


@dataclass(frozen=True)
class ResolventSpectrum:
    """What the resolvent form of Lemma 13 needs (MATH section 2), without a full decomposition.

    With ``k = min(m, n)`` (the smaller Gram side) and ``w = u`` (m <= n, ``G = W W^T``) or
    ``w = v`` (m > n, ``G = W^T W``): ``L`` (k, k) is the lower Cholesky factor of the deflated
    matrix ``A = s1^2 I_k - G + s1^2 w w^T``. A's eigenvalues are ``s1^2`` (on w) and
    ``s1^2 - s_j^2`` (j = 2..k), so A is SPD iff ``s1 > s2``, and on the complement of w
    ``A^{-1}`` is the pseudo-inverse ``R_U = (s1^2 I - W W^T)^+`` (resp. ``R_V``).

    ``W``: (m, n) snapshot in the compute dtype; ``u`` (m,), ``v`` (n,), ``s1``, ``s2``: 0-d
    tensors, same dtype; ``basis``: (k, p) Ritz vectors of G for the top p eigenvalues (the warm
    start of the next step). Duck-types the parts of :class:`SpectralDecomposition` the probe uses
    (``sigma1``, ``u``, ``v``, ``gap``, ``shape``).
    """

    W: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    factor: torch.Tensor = field(repr=False)
    basis: torch.Tensor = field(repr=False)

    @property
    def L(self) -> torch.Tensor:
        """The lower Cholesky factor (``factor`` holds it in its lower triangle; its upper triangle is
        LAPACK workspace, never read)."""
        return torch.tril(self.factor)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    @property
    def sigma1(self) -> torch.Tensor:
        return self.s1

    @property
    def sigma(self) -> torch.Tensor:
        """``(sigma_1, sigma_2)`` only (the rest of the spectrum is not computed)."""
        return torch.stack([self.s1, self.s2])

    @property
    def gap(self) -> torch.Tensor:
        return self.s1 - self.s2

    @property
    def relative_gap(self) -> torch.Tensor:
        return self.gap / self.s1

    @property
    def tall(self) -> bool:
        return self.W.shape[0] > self.W.shape[1]

    def quadratic_form(
        self, y: torch.Tensor, x: torch.Tensor, weight_times_y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Lemma 13 ``q_H(E)`` from ``y = E^T u`` (..., n) and ``x = E v`` (..., m) -> (...,).

        MATH section 2: ``q = s1 (y_perp^T R_V y_perp + x_perp^T R_U x_perp) + 2 y_perp^T R_V W^T x_perp``
        with ``y_perp = y - (v^T y) v``, ``x_perp = x - (u^T x) u``. For m <= n the push-through
        identity ``R_V y_perp = s1^{-2} (y_perp + W^T A^{-1} W y_perp)`` (``W y_perp`` is orthogonal to u
        since ``u^T W y_perp = s1 v^T y_perp = 0``) and ``W R_V y_perp = A^{-1} W y_perp`` turn it into

        ``q = (|y_perp|^2 + |L^{-1} (W y_perp + s1 x_perp)|^2) / s1``

        (one triangular solve, a sum of squares: no cancellation, q >= 0 as H is PSD). For m > n
        the mirror image ``q = (|x_perp|^2 + |L^{-1} (W^T x_perp + s1 y_perp)|^2) / s1``.

        ``weight_times_y`` (m <= n only): ``W y`` (..., m) when the caller has it (the probe takes it
        from a Linear layer's forward output); then ``W y_perp = W y - s1 (v^T y) u`` costs no product
        with W.
        """
        u, v, s1 = self.u, self.v, self.s1
        yv = y @ v
        yp = y - yv.unsqueeze(-1) * v
        xp = x - (x @ u).unsqueeze(-1) * u
        if self.tall:
            rhs = xp @ self.W + s1 * yp  # (..., n)
            outside = (xp * xp).sum(-1)
        else:
            if weight_times_y is None:
                rhs = yp @ self.W.T + s1 * xp  # (..., m)
            else:
                rhs = weight_times_y - (s1 * yv).unsqueeze(-1) * u + s1 * xp
            outside = (yp * yp).sum(-1)
        k = rhs.shape[-1]
        z = _linalg.solve_lower(self.factor, rhs.reshape(-1, k).T)  # (k, N)
        return (outside + (z * z).sum(0).reshape(rhs.shape[:-1])) / s1

    def hessian_trace(self) -> torch.Tensor:
        """``tr H = s1 (tr R_U + tr R_V) = 2 s1 tr R_k + (m + n - 2k) / s1`` with
        ``tr R_k = tr A^{-1} - 1/s1^2 = |L^{-1}|_F^2 - 1/s1^2`` (MATH section 2, k = min(m, n))."""
        m, n = self.shape
        k = min(m, n)
        eye = torch.eye(k, dtype=self.factor.dtype, device=self.factor.device)
        Linv = _linalg.solve_lower(self.factor, eye)
        tr_r = (Linv * Linv).sum() - 1.0 / (self.s1 * self.s1)
        return 2 * self.s1 * tr_r + (m + n - 2 * k) / self.s1


#: Block size (Ritz vectors carried between steps) and iteration cap of :func:`resolvent_spectrum`.
RESOLVENT_BLOCK = 4
RESOLVENT_MAX_ITER = 25
#: Thick restart of the shift-invert block Krylov subspace at this many blocks.
RESOLVENT_MAX_DIM = 10
#: Smaller sides up to this size take G's full eigendecomposition instead of the iteration
#: (at k <= 64 ``eigh`` costs less than the iteration's fixed per-step work).
RESOLVENT_DIRECT_K = 64


def resolvent_spectrum(
    W: torch.Tensor,
    dtype: torch.dtype,
    basis: torch.Tensor,
    max_iter: int = RESOLVENT_MAX_ITER,
    direct_k: int = RESOLVENT_DIRECT_K,
) -> tuple[ResolventSpectrum | None, int]:
    """sigma_1, u, v, sigma_2 and the deflated Cholesky factor of W (m, n) from a warm start.

    ``basis`` (k, p), k = min(m, n), p >= 2: approximate top eigenvectors of the smaller Gram matrix
    G (e.g. the previous step's :attr:`ResolventSpectrum.basis`). All in ``dtype``. G is formed once
    with ``syrk``; on CPU the dense kernels run through scipy's BLAS/LAPACK (:mod:`lipverify._linalg`).

    ``k <= direct_k``: G's full ``eigh`` gives the top pair and lambda_2 (0 iterations).

    Phase 1 (sigma_1, u, v): block inverse iteration with the Cholesky factor of ``s I - G``, s
    slightly above lambda_1 (a successful factorisation certifies ``s > lambda_1``; the margin is at
    least ``1e-2 (theta_1 - theta_2)``, so the top vector converges by ~1e-2 per iteration), with
    Rayleigh-Ritz on G each iteration. It stops when the residual ``r_1 = |G z_1 - theta_1 z_1|`` is at
    the rounding floor ``2 eps theta_1``, or below ``16 sqrt(k) eps theta_1`` and no longer decreasing
    (stagnation at the floor); the eigenvector error is then ``r_1 / (lambda_1 - lambda_2)``, as for a
    full ``eigh`` of the same G. ``sigma_1 = |W^T u|`` (or ``|W v|``), the other vector by
    ``W^T u / sigma_1``. Then the deflated ``A`` of :class:`ResolventSpectrum` is factorised.

    Phase 2 (sigma_2): block Krylov subspace of ``A^{-1}`` on the complement of u (its largest
    eigenvalue is ``1 / (lambda_1 - lambda_2)``), Rayleigh-Ritz on G, until
    ``r_2 <= 1e-8 theta_1 sqrt(eps / eps_64)``: the Ritz value error is ``<= r_2^2 / sep`` (sep: the
    distance to the rest of the spectrum), i.e. ``sigma_2`` to ~1e-16 relative for separations down
    to ~1e-6 theta_1 in float64.

    Returns ``(spectrum, iterations)``, or ``(None, iterations)`` when the iteration did not
    converge within ``max_iter``, a factorisation failed, or ``s1^2 - lambda_2 <= 2
    separation_tolerance(k) s1^2`` (s1 = s2 to working precision, whichever way the factorisation of
    the then singular deflated A rounded); the caller falls back to the full decomposition, which
    raises :class:`~lipverify.DegenerateSpectrumError` on the same tolerance.
    """
    with _linalg.single_threaded_blas():
        return _resolvent_spectrum(W, dtype, basis, max_iter, direct_k)


def _resolvent_spectrum(
    W: torch.Tensor, dtype: torch.dtype, basis: torch.Tensor, max_iter: int, direct_k: int
) -> tuple[ResolventSpectrum | None, int]:
    Wc = W.to(dtype)
    if Wc.data_ptr() == W.data_ptr():
        Wc = Wc.clone()  # the spectrum keeps W_t; the optimiser updates the parameter in place
    G = _linalg.gram(Wc)  # lower triangle
    k = G.shape[0]
    p = basis.shape[1]
    eps = torch.finfo(dtype).eps
    if k <= direct_k:
        evals, evecs = torch.linalg.eigh(G)  # reads the lower triangle
        evals, evecs = evals.flip(0), evecs.flip(1)
        z1, it = evecs[:, 0], 0
    else:
        z1, Z, lam1, it = _top_eigenvector(G, basis.to(dtype), eps, max_iter)
        if z1 is None:
            return None, it
    top = _top_pair(Wc, z1)
    s1sq = float(top[2]) ** 2
    L = _linalg.shifted_cholesky(G, s1sq, top[3], s1sq)  # the deflated A
    if L is None:
        return None, it
    if k <= direct_k:
        lam2, X = evals[1], evecs[:, 1:p]
    else:
        lam2, X, it2 = _second_eigenvalue(G, L, top[3], Z[:, 1:], lam1, eps, max_iter)
        it += it2
        X = X[:, : p - 1]
    # sigma_1 = sigma_2 to working precision: decided from the spectrum with the same tolerance as
    # the full decomposition (2 x relative gap, on squares), not by whether the Cholesky of the
    # singular deflated A happened to fail (a rounding coin flip of the kernel)
    if lam2 is None or not bool(s1sq - lam2 > 2 * separation_tolerance(k, dtype) * s1sq):
        return None, it
    return _assemble(Wc, top, lam2, L, X), it


def _top_eigenvector(
    G: torch.Tensor, basis: torch.Tensor, eps: float, max_iter: int
) -> tuple[torch.Tensor | None, torch.Tensor, float, int]:
    """Phase 1 of :func:`resolvent_spectrum`: block inverse iteration with ``s I - G`` from ``basis``.
    Returns ``(z_1 or None if not converged, Ritz block (k, p), theta_1, iterations)``."""
    k = G.shape[0]
    tol1_rel = 16 * math.sqrt(k) * eps
    Z, _ = torch.linalg.qr(basis)
    chol = None
    it = 0
    lam1 = math.nan
    prev = math.inf
    for it in range(1, max_iter + 1):
        GZ = _linalg.sym_matmul(G, Z)
        T = Z.T @ GZ
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        theta, S = theta.flip(0), S.flip(1)
        Z, GZ = Z @ S, GZ @ S
        res = torch.linalg.vector_norm(GZ[:, 0] - Z[:, 0] * theta[0])
        lam1 = float(theta[0])
        if not (lam1 > 0 and math.isfinite(float(res))):
            return None, Z, lam1, it
        r = float(res)
        # at the rounding floor, or below the bound and no longer decreasing (stagnation at the floor)
        if r <= 2 * eps * lam1 or (r <= tol1_rel * lam1 and r > 0.25 * prev):
            return Z[:, 0], Z, lam1, it
        prev = r
        if chol is None:
            # shift above lambda_1: the Ritz value is a lower bound, the residual bounds the distance
            margin = max(2 * r, 1e-2 * (lam1 - float(theta[1])), 64 * eps * lam1)
            for _ in range(8):
                chol = _linalg.shifted_cholesky(G, lam1 + margin)
                if chol is not None:
                    break
                margin *= 4
            if chol is None:
                return None, Z, lam1, it
        Z, _ = torch.linalg.qr(_linalg.cholesky_solve(chol, Z))
    return None, Z, lam1, it


def _top_pair(Wc: torch.Tensor, z1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(u, v, sigma_1, w)`` from the top eigenvector ``z1`` of the smaller Gram matrix (w = z1 up to
    the sign convention of :func:`lipverify.spectral.with_canonical_sign`: largest |v_j| positive)."""
    tall = Wc.shape[0] > Wc.shape[1]
    other = Wc @ z1 if tall else Wc.T @ z1  # W v (tall) or W^T u
    s1 = torch.linalg.vector_norm(other)
    other = other / s1
    u, v = (other, z1) if tall else (z1, other)
    sign = torch.sign(v[torch.argmax(v.abs())])
    u, v = u * sign, v * sign
    return u, v, s1, (v if tall else u)


def _second_eigenvalue(
    G: torch.Tensor, L: torch.Tensor, w: torch.Tensor, X: torch.Tensor, lam1: float, eps: float, max_iter: int
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Phase 2 of :func:`resolvent_spectrum`: lambda_2 of G (and its Ritz block) by block Krylov with
    ``A^{-1} = (L L^T)^{-1}`` on the complement of w, Rayleigh-Ritz on G, thick restart at
    RESOLVENT_MAX_DIM blocks. Returns ``(lambda_2 or None, Ritz vectors (k, q), iterations)``."""
    k = G.shape[0]
    tol2 = 1e-8 * math.sqrt(eps / torch.finfo(torch.float64).eps) * lam1
    X = X - torch.outer(w, w @ X)
    Q, _ = torch.linalg.qr(X)
    GQ = _linalg.sym_matmul(G, Q)
    q = Q.shape[1]
    max_dim = min(k - 1, RESOLVENT_MAX_DIM * q)
    it = 0
    while it < max_iter:
        it += 1
        T = Q.T @ GQ
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        theta, S = theta.flip(0)[:q], S.flip(1)[:, :q]
        X = Q @ S
        z2 = X[:, 0]
        res2 = torch.linalg.vector_norm(GQ @ S[:, 0] - theta[0] * z2)
        if float(res2) <= tol2 or Q.shape[1] >= k - 1:
            return theta[0], X, it
        if Q.shape[1] + q > max_dim:
            Q, GQ = X, GQ @ S
        new = _linalg.cholesky_solve(L, X)
        new = new / torch.linalg.vector_norm(new, dim=0)
        for _ in range(2):  # classical Gram-Schmidt against w and Q, twice
            new = new - torch.outer(w, w @ new)
            new = new - Q @ (Q.T @ new)
        # at most k - 1 orthonormal columns fit in the complement of w
        keep = torch.nonzero(torch.linalg.vector_norm(new, dim=0) > 1e-8)[:, 0][: k - 1 - Q.shape[1]]
        if keep.numel() == 0:
            return theta[0], X, it
        new, _ = torch.linalg.qr(new[:, keep])
        new = new - Q @ (Q.T @ new)
        new = new / torch.linalg.vector_norm(new, dim=0)
        Q = torch.cat([Q, new], 1)
        GQ = torch.cat([GQ, _linalg.sym_matmul(G, new)], 1)
    return None, X, it


def _assemble(Wc, top, lam2, L, X) -> ResolventSpectrum:
    u, v, s1, w = top
    s2 = lam2.clamp(min=0).sqrt()
    basis_next = torch.cat([w.unsqueeze(1), X], 1).contiguous()
    return ResolventSpectrum(W=Wc, u=u, v=v, s1=s1, s2=s2, factor=L, basis=basis_next)


class DynamicsProbe:
    """Theorem 14/15 terms of every Linear/Conv2d layer of ``model`` from hooked activations.

    Arguments: ``skip``: module names to leave out; ``compute_dtype``: dtype of the projections and
    the spectral parts (float64 default; the model may train in float32); ``decomposition``:
    ``"gram"`` (:func:`fast_decompose`), ``"svd"`` (:func:`lipverify.spectral.decompose`) or
    ``"resolvent"`` (:func:`resolvent_spectrum`: top pair, sigma_2 and the deflated Cholesky factor
    from the smaller Gram matrix, warm-started from the previous step; no full decomposition, the
    first step of each layer and any non-converged step use the full ``"gram"`` decomposition,
    counted in :attr:`resolvent_stats`);
    ``conv_method``: ``"conv"`` or ``"unfold"`` (see the module docstring); ``projection_dtype``:
    dtype of the contractions with the activations (None: the activations' dtype);
    ``conv_chunk_bytes``: bound on the im2col buffer of the per-sample conv weight gradient;
    ``population_size``: N
    for the without-replacement factor ``(1 - b/N)`` of Proposition 5 (None: with replacement);
    ``gap_tolerance``: relative gap below which a layer is flagged ``degenerate`` (None:
    :func:`lipverify.spectral.gap_tolerance_for` the compute dtype).

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
        conv_method: str = "conv",
        projection_dtype: torch.dtype | None = None,
        conv_chunk_bytes: int = 8 << 20,
        population_size: int | None = None,
        gap_tolerance: float | None = None,
        schedule: ProbeSchedule | None = None,
    ) -> None:
        if decomposition not in ("gram", "svd", "resolvent"):
            raise LipverifyError(f"decomposition must be 'gram', 'svd' or 'resolvent', got {decomposition!r}")
        if conv_method not in ("conv", "unfold"):
            raise LipverifyError(f"conv_method must be 'conv' or 'unfold', got {conv_method!r}")
        self.model = model
        self.compute_dtype = compute_dtype
        self.decomposition = decomposition
        self.conv_method = conv_method
        self.projection_dtype = projection_dtype
        self.conv_chunk_bytes = conv_chunk_bytes
        self.population_size = population_size
        self.gap_tolerance = gap_tolerance
        self.schedule = schedule or ProbeSchedule()
        self._layers = {
            name: _Layer(name, module, kind) for name, (module, kind) in find_layers(model, skip).items()
        }
        # name -> (data_ptr, version, snapshot of W, decomposition)
        self._dec_cache: dict[
            str, tuple[int, int, torch.Tensor, SpectralDecomposition | ResolventSpectrum]
        ] = {}
        self._warm: dict[str, torch.Tensor] = {}
        self._warm_in: dict[str, torch.Tensor | None] = {}
        #: ``"resolvent"`` mode: ``iterative`` (warm-started resolvent steps), ``iterations`` (their
        #: total block iterations), ``cold`` (first decomposition of a layer: full), ``fallback``
        #: (warm start did not converge or a factorisation failed: full decomposition instead).
        self.resolvent_stats = {"iterative": 0, "iterations": 0, "cold": 0, "fallback": 0}
        self._capturing = False

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    # ----------------------------------------------------------------- spectral parts
    def decomposition_of(self, name: str) -> SpectralDecomposition | ResolventSpectrum:
        """Thin SVD (or, in ``"resolvent"`` mode, the :class:`ResolventSpectrum`) of layer ``name``'s
        weight matrix, cached until the weight changes."""
        dec = self._cached(name)
        if dec is not None:
            return dec
        # a stale one is dropped before the new one is computed (peak memory)
        self._dec_cache.pop(name, None)
        layer = self._layers[name]
        w = layer.module.weight
        key = (w.data_ptr(), w._version)
        W = weight_matrix(layer.module)
        if self.decomposition == "resolvent":
            dec = self._resolvent_decomposition(name, W)
        elif self.decomposition == "gram":
            dec = fast_decompose(W, self.compute_dtype, name)
        else:
            dec = decompose(W.to(self.compute_dtype), name)
        # the spectrum's own copy of W is the snapshot when it holds W's values exactly
        own = isinstance(dec, ResolventSpectrum) and _exactly_representable(W.dtype, dec.W.dtype)
        self._dec_cache[name] = (*key, dec.W if own else W.clone(), dec)
        return dec

    def _cached(self, name: str) -> SpectralDecomposition | ResolventSpectrum | None:
        """The cached decomposition of layer ``name`` if it is of the weight's current values, else None.

        The version counter alone is not enough: writes through ``.data`` and the fused optimiser
        kernels (``SGD(fused=True)``) change a weight without bumping it. So a cache hit also
        compares the weight with the snapshot it was decomposed from (one pass over W, at every hit:
        skipping it on the strength of an earlier comparison left stale spectra after an aborted
        step)."""
        cached = self._dec_cache.get(name)
        if cached is None:
            return None
        w = self._layers[name].module.weight
        if cached[:2] != (w.data_ptr(), w._version):
            return None
        W, snapshot = weight_matrix(self._layers[name].module), cached[2]
        return cached[3] if torch.equal(W.to(snapshot.dtype), snapshot) else None

    def _resolvent_decomposition(
        self, name: str, W: torch.Tensor
    ) -> SpectralDecomposition | ResolventSpectrum:
        stats = self.resolvent_stats
        basis = self._warm.get(name)
        k = min(W.shape)
        self._warm_in[name] = basis
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
        if k >= 2:
            self._warm[name] = small[:, : min(RESOLVENT_BLOCK, k)].clone()
        return dec

    def warm_state(self) -> dict[str, torch.Tensor | None]:
        """``"resolvent"`` mode: per layer, the warm-start basis (k, p) the next decomposition of
        the uninterrupted run starts from (None: a cold, full one). When the cached decomposition is
        of the current weight (the uninterrupted run would reuse it), that is the basis that produced
        it, so the resumed run recomputes it identically; otherwise the basis it left behind. Saved
        with a checkpoint and given to :meth:`load_warm_state` of a fresh probe, the resumed run gives
        bitwise the same numbers as the uninterrupted run."""
        state: dict[str, torch.Tensor | None] = {}
        for name in self._layers:
            current = self._cached(name) is not None
            basis = self._warm_in.get(name) if current else self._warm.get(name)
            state[name] = None if basis is None else basis.clone()
        return state

    def load_warm_state(self, state: Mapping[str, torch.Tensor | None]) -> None:
        """Restore :meth:`warm_state` (call before the first step of the resumed run)."""
        for name, basis in state.items():
            if name not in self._layers:
                raise LipverifyError(f"warm state names unknown layer {name!r}")
            if basis is None:
                self._warm.pop(name, None)
            else:
                self._warm[name] = basis.to(self.compute_dtype).clone()

    def sigmas(self) -> dict[str, float]:
        """sigma_1 of every layer from :meth:`decomposition_of` (cached while the weight is unchanged).

        Always the same route, so a value never depends on what the process happens to hold: a run
        resumed from a checkpoint (:meth:`warm_state`) records the same bits as the uninterrupted one.
        In ``"resolvent"`` mode a warm-started decomposition also costs less than
        ``torch.linalg.matrix_norm(W, 2)``."""
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

    @staticmethod
    def _centre(y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y - y.mean(0, keepdim=True), x - x.mean(0, keepdim=True)

    def _projections(
        self, layer: _Layer, dec: SpectralDecomposition | ResolventSpectrum, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Uncentred ``(y, x, W y)``: rows ``G_i^T u`` (b, n), ``G_i v`` (b, m) and, when it comes for
        free, ``W G_i^T u`` (b, m) (else None): for a wide Linear layer in resolvent mode whose
        forward output ``z = a W^T + bias`` is in the compute dtype and unchanged since the forward,
        ``W y_i = sum_p (delta_{i,p}^T u) (z_{i,p} - bias)`` (MATH section 2: no product with W)."""
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
        use_z = (
            isinstance(dec, ResolventSpectrum)
            and not dec.tall
            and z is not None
            and z._version == layer.outputs_version
            and z.dtype == dt == self.compute_dtype
        )
        y, x, wy = self._contract(layer, a, delta, u, v, z if use_z else None)  # linear in delta
        cd = self.compute_dtype
        return y.to(cd) * scale, x.to(cd) * scale, None if wy is None else wy * scale

    def _contract(
        self,
        layer: _Layer,
        a: torch.Tensor,
        delta: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        outputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b = a.shape[0]
        module = layer.module
        if layer.kind == "linear":
            a3 = a.reshape(b, -1, a.shape[-1])  # (b, P, n)
            d3 = delta.reshape(b, -1, delta.shape[-1])  # (b, P, m)
            z3 = None
            if outputs is not None:
                z3 = outputs.reshape(b, -1, outputs.shape[-1])
                if module.bias is not None:
                    z3 = z3 - module.bias.detach().to(z3.dtype)
            if a3.shape[1] == 1:  # one position per sample: outer products, no batched matmul
                t, s = (d3[:, 0] @ u).unsqueeze(1), (a3[:, 0] @ v).unsqueeze(1)
                wy = None if z3 is None else t * z3[:, 0]
                return t * a3[:, 0], s * d3[:, 0], wy
            t = (d3 @ u).unsqueeze(1)  # (b, 1, P)
            y = torch.bmm(t, a3)[:, 0]
            x = torch.bmm((a3 @ v).unsqueeze(1), d3)[:, 0]
            wy = None if z3 is None else torch.bmm(t, z3)[:, 0]
            return y, x, wy
        C = a.shape[1]
        kh, kw = module.kernel_size
        padding = _conv_padding(module)
        m = delta.shape[1]
        d3 = delta.reshape(b, m, -1)  # (b, m, P), a view
        t = torch.matmul(u, d3)  # (b, P): delta_{i,p}^T u, no copy of delta
        if self.conv_method == "unfold":
            A = F.unfold(a, (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride)
            P = A.shape[-1]
            y = torch.bmm(A, t.reshape(b, P, 1))[..., 0]
            s = torch.matmul(v, A)  # (b, P)
            x = torch.bmm(d3, s.unsqueeze(-1))[..., 0]
            return y, x, None
        s = F.conv2d(a, v.reshape(1, C, kh, kw), None, module.stride, padding, module.dilation)
        x = torch.bmm(d3, s.reshape(b, -1, 1))[..., 0]  # sum_p delta_{i,p} (a_{i,p}^T v)
        # sum_p a_{i,p} t_{i,p}: per-sample weight gradient of one output channel, as one grouped
        # conv2d_weight over a chunk of samples (chunks bound its im2col buffer).
        H, Wd = a.shape[-2:]
        Ho, Wo = delta.shape[-2:]
        per_sample = C * kh * kw * Ho * Wo * a.element_size()
        chunk = max(1, min(b, self.conv_chunk_bytes // max(per_sample, 1)))
        ys = []
        for i in range(0, b, chunk):
            c = min(chunk, b - i)
            ys.append(
                torch.nn.grad.conv2d_weight(
                    a[i : i + c].reshape(1, c * C, H, Wd),
                    (c, C, kh, kw),
                    t[i : i + c].reshape(1, c, Ho, Wo),
                    stride=module.stride,
                    padding=padding,
                    dilation=module.dilation,
                    groups=c,
                ).reshape(c, -1)
            )
        return torch.cat(ys), x, None

    # ----------------------------------------------------------------- terms
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
        """
        out: dict[str, LayerTerms] = {}
        for name, layer in self._layers.items():
            if layer.inputs is None:
                raise LipverifyError(
                    f"nothing captured for layer {name}: run the forward pass inside capture()"
                )
            b = check_batch_size(layer.inputs.shape[0])
            lr_eff = lr * grad_scale * (b if reduction == "sum" else 1)
            dec = self.decomposition_of(name)
            y, x, wy = self._projections(layer, dec, self._per_sample_scale(b, reduction))
            if mean_grads is not None and name in mean_grads:
                drift = dec.u @ mean_grads[name].to(dec.sigma.dtype).reshape(dec.shape) @ dec.v
            else:
                drift = (x @ dec.u).mean()
            yc, xc = self._centre(y, x)
            q = None
            if wy is not None:
                q = dec.quadratic_form(yc, xc, weight_times_y=wy - wy.mean(0, keepdim=True))
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
    def before_step(self) -> None:
        """Snapshot every weight (and its decomposition) before the optimiser step.

        The snapshot is the one the decomposition cache keeps (in ``"resolvent"`` mode the
        decomposition's own copy of W_t when it holds the weight's values exactly). W must not change
        between this call and the optimiser step."""
        for name, layer in self._layers.items():
            layer.dec_before = self.decomposition_of(name)
            layer.weight_before = self._dec_cache[name][2]

    def after_backward(self) -> None:
        """Keep the batch gradient ``G_bar`` of each layer (for the dropped drift term): its projections
        ``(G_bar^T u, G_bar v)`` on the top pair of W_t after :meth:`before_step`, else a copy."""
        for layer in self._layers.values():
            g = layer.module.weight.grad
            layer.batch_grad_projections = layer.batch_grad = None
            if g is None:
                continue
            g = g.detach().reshape(g.shape[0], -1)
            if layer.dec_before is not None:
                layer.batch_grad_projections = _top_pair_projections(layer.dec_before, g)
            else:  # after_backward before before_step: u, v of W_t are not known yet
                layer.batch_grad = g.clone()

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
        """
        mean_grad_scale = (
            grad_scale * self._mean_gradient_factor(reduction) if mean_grads is not None else 1.0
        )
        out = {}
        for name, layer in self._layers.items():
            if layer.dec_before is None:
                raise LipverifyError("after_step needs before_step() before the optimiser step")
            dec = layer.dec_before
            dt = dec.sigma.dtype
            buf = layer.update_buffer
            if buf is None or buf.dtype != dt or buf.shape != dec.shape or buf.device != dec.u.device:
                buf = layer.update_buffer = torch.empty(dec.shape, dtype=dt, device=dec.u.device)
            W1, W0 = weight_matrix(layer.module), layer.weight_before
            if torch.promote_types(W1.dtype, W0.dtype) == dt:
                dW = torch.sub(W1, W0, out=buf)  # the promotion to dt is exact
            else:
                dW = W1.to(dt) - W0.to(dt)
            y, x = _top_pair_projections(dec, dW)
            first = float(x @ dec.u)  # u^T Delta W v
            q = float(dec.quadratic_form(y, x))
            scale = grad_scale  # the optimiser's gradient is grad_scale times the kept one
            if mean_grads is not None and name in mean_grads:
                projections = _top_pair_projections(dec, mean_grads[name])
                scale = mean_grad_scale
            elif layer.batch_grad is not None:
                projections = _top_pair_projections(dec, layer.batch_grad)
            else:
                projections = layer.batch_grad_projections
            dropped = math.nan
            if projections is not None:
                qg = float(dec.quadratic_form(*projections))
                dropped = 0.5 * (lr * scale) ** 2 * qg
            exceeds = update_exceeds_gap(dW, float(dec.gap))
            sigma_before = dec.sigma1
            # W_t's spectrum (weight copy, factor) is released before W_{t+1}'s is computed: peak memory
            dec = dW = W0 = None
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
        return out


def _top_pair_projections(dec: SpectralDecomposition | ResolventSpectrum, M: torch.Tensor):
    """``(M^T u, M v)`` of an (m, n) matrix ``M`` (any layout that reshapes to it) in the dtype of ``dec``."""
    M = M.to(dec.u.dtype).reshape(dec.shape)
    return M.T @ dec.u, M @ dec.v


def _exactly_representable(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every ``src`` value is a ``dst`` value (float16/bfloat16 -> float32 -> float64)."""
    order = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    if src == dst:
        return True
    return src in order and dst in order and order[dst] > order[src]


def update_exceeds_gap(dW: torch.Tensor, gap: float, power_steps: int = 8) -> bool:
    """``|dW|_2 >= gap / 2`` for an update dW (m, n) and the gap ``sigma_1 - sigma_2`` of W_t.

    Decided without the spectral norm where possible: ``|dW|_F < gap / 2`` gives False (the Frobenius
    norm bounds the spectral norm from above); ``|dW x| >= gap / 2`` for a unit x from a few power
    steps on ``dW^T dW`` gives True (a lower bound). Otherwise the exact spectral norm decides.
    """
    half = 0.5 * gap
    if float(torch.linalg.matrix_norm(dW)) < half:
        return False
    x = dW[torch.argmax(torch.linalg.vector_norm(dW, dim=1))]  # largest row: dW x != 0
    for _ in range(power_steps):
        x = x / torch.linalg.vector_norm(x)
        dWx = dW @ x
        if float(torch.linalg.vector_norm(dWx)) >= half:
            return True
        x = dW.T @ dWx
    return bool(float(torch.linalg.matrix_norm(dW, 2)) >= half)


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
    scaled = [t.noise_projections.to(torch.float64) / t.sigma for t in items]
    total = sum(scaled)
    return float((total * total).sum()) - sum(float((p * p).sum()) for p in scaled)


# --------------------------------------------------------------------------- references
@contextlib.contextmanager
def _per_sample_weights(layers: Mapping[str, tuple[nn.Module, str]], copies: Mapping[str, torch.Tensor]):
    """Temporarily make each layer use weight ``copies[name][i]`` for sample i."""
    for name, (module, kind) in layers.items():
        Wc = copies[name]
        if kind == "linear":

            def fwd(a, module=module, Wc=Wc):
                out = torch.einsum("b...n,bmn->b...m", a, Wc)
                return out if module.bias is None else out + module.bias

        else:
            padding = _conv_padding(module)

            def fwd(a, module=module, Wc=Wc, padding=padding):
                def one(ai, wi):
                    return F.conv2d(ai[None], wi, module.bias, module.stride, padding, module.dilation)[0]

                return torch.func.vmap(one)(a, Wc)

        module.forward = fwd
    try:
        yield
    finally:
        for module, _ in layers.values():
            del module.forward  # back to the class method


def reference_per_sample_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mode: str = "vmap",
    skip: Iterable[str] = (),
    reduction: str | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``grad l_i`` of every probed layer, (b, m, n) matrices (reference).

    ``mode="vmap"``: ``torch.func.vmap(grad(l_i))`` over ``functional_call`` with one sample at a
    time (no interactions between samples; dropout must be off). ``mode="copy"``: each layer gets b
    weight copies ``W_i = W`` that only sample i uses; one autograd pass of the batch loss gives
    ``G_i = b dL/dW_i`` (mean reduction) - the probe's definition with batch norm, and with dropout
    when the RNG state is the same as in the probe's forward pass. Costs O(b d) memory.
    """
    layers = find_layers(model, skip)
    b = inputs.shape[0]
    check_batch_size(b)
    if mode == "vmap":
        params = {k: p.detach() for k, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        names = {name: f"{name}.weight" for name in layers}

        def loss_one(p, x, t):
            out = torch.func.functional_call(model, (p, buffers), (x[None],))
            return loss_fn(out, t[None])

        try:
            grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0), randomness="error")(
                params, inputs, targets
            )
        except RuntimeError as exc:
            if "randomness" not in str(exc):
                raise
            raise LipverifyError(
                "mode='vmap' cannot replay random layers (dropout in training mode); use mode='copy' "
                "with the RNG state of the probe's forward pass"
            ) from exc
        return {name: grads[key].reshape(b, grads[key].shape[1], -1) for name, key in names.items()}
    if mode != "copy":
        raise LipverifyError(f"mode must be 'vmap' or 'copy', got {mode!r}")
    copies = {
        name: module.weight.detach().unsqueeze(0).expand(b, *module.weight.shape).clone().requires_grad_(True)
        for name, (module, _) in layers.items()
    }
    with _per_sample_weights(layers, copies):
        loss = loss_fn(model(inputs), targets)
    red = reduction or getattr(loss_fn, "reduction", "mean")
    if loss.ndim > 0:
        loss, red = loss.mean(), "mean"
    grads = torch.autograd.grad(loss, list(copies.values()))
    factor = b if red == "mean" else 1
    return {name: (g * factor).reshape(b, g.shape[1], -1) for name, g in zip(copies, grads, strict=True)}


def reference_layer_terms(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lr: float,
    mode: str = "vmap",
    skip: Iterable[str] = (),
    population_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, LayerTerms]:
    """Theorem 14 terms from materialised per-sample gradients fed to
    :func:`lipverify.dynamics.layer_terms` (the slow reference of the probe)."""
    grads = reference_per_sample_gradients(model, inputs, targets, loss_fn, mode, skip)
    layers = find_layers(model, skip)
    return {
        name: layer_terms(
            weight_matrix(module).to(dtype), grads[name].to(dtype), lr, population_size=population_size
        )
        for name, (module, _) in layers.items()
    }
