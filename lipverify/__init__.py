"""lipverify: checkable dynamics of a network's Lipschitz bound under SGD (arXiv 2506.18588).

Layers of the package, data flowing one way: ``derivations`` (SymPy truth) -> ``spectral``,
``noise``, ``dynamics`` (torch kernels) -> ``verification`` (checks) -> probe and experiments.
"""

from importlib.metadata import PackageNotFoundError, version

from lipverify._validation import DegenerateSpectrumError, LipverifyError
from lipverify.dynamics import (
    BoundOverflowWarning,
    BoundPrediction,
    LayerTerms,
    NetworkTerms,
    layer_terms,
    network_terms,
    predict_bound,
    rescale_batch_size,
)
from lipverify.noise import batch_noise_covariance, noise_sqrt, variance_covariance_split
from lipverify.spectral import (
    SpectralGapWarning,
    hessian,
    hessian_quadratic_form,
    hessian_trace,
    jacobian,
    spectral_gap,
    top_singular,
)

try:
    __version__ = version("lipverify")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = [
    "BoundOverflowWarning",
    "BoundPrediction",
    "DegenerateSpectrumError",
    "LayerTerms",
    "LipverifyError",
    "NetworkTerms",
    "SpectralGapWarning",
    "__version__",
    "batch_noise_covariance",
    "hessian",
    "hessian_quadratic_form",
    "hessian_trace",
    "jacobian",
    "layer_terms",
    "network_terms",
    "noise_sqrt",
    "predict_bound",
    "rescale_batch_size",
    "spectral_gap",
    "top_singular",
    "variance_covariance_split",
]
