"""The data of a training run: toys, image datasets and files, split and preprocessed.

The files themselves are read by :mod:`pyro_nf.data.files`; this module splits
them and fits the fixed preprocessing whose log-determinant the loss counts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pyro_nf.data import sample_toy
from pyro_nf.data.files import DataFileError, FileData, as_images, as_vectors, column_label, load_file
from pyro_nf.metrics import bits_per_dim
from pyro_nf.training.config import IMAGE_DATASETS, ConfigError, TrainConfig, data_kind
from pyro_nf.transforms.preprocess import dequantize, quantize

__all__ = [
    "Dequantize",
    "PreparedData",
    "Preprocess",
    "Standardize",
    "batch_order",
    "on_device",
    "prepare_data",
    "preprocess_from_state",
]


class Standardize:
    """Vectors: ``y = (x - shift) / scale`` per feature; the metric is the NLL in data units (nats).

    ``-log p(x) = -log p_model(y) + sum(log scale)``.
    """

    kind = "standardize"
    metric_name = "nll"

    def __init__(self, shift: Tensor, scale: Tensor) -> None:
        self.shift, self.scale = shift, scale

    @classmethod
    def fit(cls, train: Tensor) -> Standardize:
        """Shift and scale from the training data (a constant feature gets scale 1)."""
        scale = train.std(dim=0)
        return cls(train.mean(dim=0), torch.where(scale > 0, scale, torch.ones_like(scale)))

    def to_model(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The model's input for data ``x``."""
        return (x - self.shift.to(x)) / self.scale.to(x)

    def metric(self, log_prob: Tensor) -> Tensor:
        """``-log p(x)`` per sample from the model's ``log p_model(y)``."""
        return -(log_prob - self.scale.log().sum().to(log_prob))

    def to_data(self, y: Tensor) -> Tensor:
        """Back to data units."""
        return y * self.scale.to(y) + self.shift.to(y)

    def state(self) -> dict[str, Any]:
        """Tensors and plain values, for a checkpoint."""
        return {"kind": self.kind, "shift": self.shift.cpu(), "scale": self.scale.cpu()}


class Dequantize:
    """Images: uniform dequantization to the unit cube, centred, ``y = (x + u) / K - 1/2`` with ``u ~ U[0, 1)``.

    The metric is bits per dimension (:func:`pyro_nf.metrics.bits_per_dim`):
    the shift by ``1/2`` has log-determinant 0, so ``log p_model(y)`` is the
    density of ``(x + u) / K`` on the unit cube.
    """

    kind = "dequantize"
    metric_name = "bpd"

    def __init__(self, n_levels: int, event_shape: Sequence[int]) -> None:
        self.n_levels = int(n_levels)
        self.event_shape = tuple(int(s) for s in event_shape)

    def to_model(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Dequantized, centred images; the noise is drawn by ``generator`` (on the CPU, or on ``x``'s device)."""
        if generator is not None and generator.device == x.device:
            return dequantize(x, self.n_levels, generator=generator) - 0.5
        return dequantize(x.cpu(), self.n_levels, generator=generator).to(x.device) - 0.5

    def metric(self, log_prob: Tensor) -> Tensor:
        """Bits per dimension per image."""
        return bits_per_dim(log_prob, self.event_shape, self.n_levels)

    def to_data(self, y: Tensor) -> Tensor:
        """The pixel level of each value."""
        return quantize(y + 0.5, self.n_levels).to(y.dtype)

    def state(self) -> dict[str, Any]:
        """Plain values, for a checkpoint."""
        return {"kind": self.kind, "n_levels": self.n_levels, "event_shape": list(self.event_shape)}


Preprocess = Standardize | Dequantize


def preprocess_from_state(state: dict[str, Any]) -> Preprocess:
    """Rebuild a preprocessing step from its ``state()``."""
    if state["kind"] == "standardize":
        return Standardize(state["shift"], state["scale"])
    return Dequantize(state["n_levels"], state["event_shape"])


@dataclass
class PreparedData:
    """The splits of a dataset in data units (images: pixel levels as floats), and how to preprocess them."""

    kind: Literal["vector", "image"]
    train: Tensor
    val: Tensor
    test: Tensor
    preprocess: Preprocess
    description: str
    columns: tuple[str, ...] | None = None  # the features' names (a CSV's header), for the figures

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(self.train.shape[1:])


def on_device(train: Tensor, device: torch.device) -> Tensor:
    """``train`` copied to the GPU ``device`` if it takes at most a quarter of the free memory there, else as it is."""
    if device.type != "cuda":
        return train
    free, _ = torch.cuda.mem_get_info(device)
    if train.numel() * train.element_size() > free // 4:
        return train
    return train.to(device)


def _split(array: np.ndarray, seed: int, fractions: tuple[float, float]) -> tuple[np.ndarray, ...]:
    order = torch.randperm(len(array), generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, int(round(fractions[0] * len(array))))
    n_test = max(1, int(round(fractions[1] * len(array)))) if fractions[1] > 0 else 0
    if len(array) - n_val - n_test < 2:
        raise ConfigError(f"too few samples to split ({len(array)}); give at least 10")
    parts = np.split(array[order], [n_val, n_val + n_test])
    return parts[2], parts[0], parts[1]


def prepare_data(config: TrainConfig, *, image_flow: bool) -> PreparedData:
    """Load or draw the data named by ``config.data``, split it and fit the preprocessing."""
    kind = data_kind(config.data)
    if kind == "toy":
        assert config.n_train is not None and config.n_val is not None and config.n_test is not None
        parts = [
            sample_toy(config.data, n, generator=torch.Generator().manual_seed(config.seed * 3 + i))
            for i, n in enumerate((config.n_train, config.n_val, config.n_test))
        ]
        return PreparedData(
            "vector", parts[0], parts[1], parts[2], Standardize.fit(parts[0]), f"2D toy '{config.data}'"
        )
    if kind == "image":
        train, test, n_levels = _load_image_dataset(config.data, config.data_dir)
        train_np, val_np = _split(train, config.seed, (0.1, 0.0))[:2]
        return PreparedData(
            "image",
            torch.as_tensor(train_np, dtype=torch.float32),
            torch.as_tensor(val_np, dtype=torch.float32),
            torch.as_tensor(test, dtype=torch.float32),
            Dequantize(config.n_levels or n_levels, train.shape[1:]),
            IMAGE_DATASETS[config.data],
        )
    data = load_file(config.data)
    if image_flow:
        arrays, n_levels = as_images(data, n_levels=config.n_levels)
        preprocess: Preprocess | None = Dequantize(n_levels, next(iter(arrays.values())).shape[1:])
        kind_out: Literal["vector", "image"] = "image"
    else:
        arrays = as_vectors(data)
        preprocess, kind_out = None, "vector"
    if "train" in arrays:
        train = arrays["train"]
        if "val" not in arrays:
            train, val = _split(train, config.seed, (0.1, 0.0))[:2]
        else:
            val = arrays["val"]
        test = arrays.get("test", val)
    else:
        train, val, test = _split(arrays["data"], config.seed, (0.1, 0.1))
    train_t, val_t, test_t = (torch.as_tensor(a, dtype=torch.float32) for a in (train, val, test))
    if preprocess is None:
        _refuse_constant_columns(train_t, data)
        preprocess = Standardize.fit(train_t)
    columns = data.columns if kind_out == "vector" else None
    return PreparedData(kind_out, train_t, val_t, test_t, preprocess, f"file {data.path}", columns)


def _refuse_constant_columns(train: Tensor, data: FileData) -> None:
    """A :class:`DataFileError` naming the first column that holds one value in every training sample.

    A constant column has no spread to standardise and its density is a point mass: the
    likelihood of a flow fitting it grows without bound. It is refused rather than dropped, so
    the data a model sees are the data in the file.
    """
    constant = (train.amax(0) == train.amin(0)).nonzero().flatten()
    if constant.numel():
        column = int(constant[0])
        others = f" (and {constant.numel() - 1} more)" if constant.numel() > 1 else ""
        raise DataFileError(
            f"{data.path}, column {column_label(column, data.columns)}{others}: every training sample has the "
            f"value {float(train[0, column]):g}; a density needs a spread in every column (a constant column's "
            "likelihood is unbounded): remove the column"
        )


def _load_image_dataset(name: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train, test, n_levels)`` of a built-in image dataset, images as ``(N, C, H, W)``."""
    from pyro_nf.data.images import load_images

    try:
        result = load_images(name, data_dir)
    except ImportError as error:  # a dataset whose reader is an optional dependency: a usage error, one line
        raise ConfigError(f"--data {name}: {error}") from error
    return result.train.numpy(), result.test.numpy(), int(result.n_levels)


def batch_order(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[tuple[int, Tensor]]:
    """``(step, indices of the global batch)`` from ``start_step`` on; each epoch is a fresh permutation.

    The order is a function of (seed, epoch) only, so a resumed run and every
    process of a distributed run draw the same batches.
    """
    per_epoch = n // batch_size
    step = start_step
    epoch, permutation = -1, torch.empty(0, dtype=torch.long)
    while True:
        current, offset = divmod(step, per_epoch)
        if current != epoch:
            epoch = current
            permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch + 1))
        yield step, permutation[offset * batch_size : (offset + 1) * batch_size]
        step += 1
