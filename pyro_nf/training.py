"""Fit, evaluate and sample flow density models: the engine behind the ``pyro-nf`` command line.

:func:`train` takes a :class:`TrainConfig` (plain, typed values; nothing from
:mod:`argparse`), builds the data, the flow and an Adam optimizer, and runs
the loop

.. math::

    \\theta \\leftarrow \\theta - \\mathrm{Adam}\\Big(\\nabla_\\theta \\frac{1}{B}\\sum_{i=1}^{B}
    -\\big[\\log p_Z(f_\\theta^{-1}(y_i)) + \\log|\\det \\partial f_\\theta^{-1}/\\partial y_i|
    + \\log|\\det \\partial y_i / \\partial x_i|\\big]\\Big)

where ``y = g(x)`` is the fixed preprocessing (standardization of vectors,
uniform dequantization and scaling of images) whose log-determinant is
counted, so the loss is the negative log-likelihood of the data in its own
units: nats per sample for vectors, bits per dimension
``NLL / (D log 2)`` for images (with dequantization, an upper bound on the
discrete NLL, as reported in the RealNVP and Glow papers).

Everything a run writes goes to one folder: ``config.json`` (the full
resolved configuration), ``train.log``, ``history.csv`` (loss per logged
step), ``checkpoint.pt`` (see :mod:`pyro_nf.checkpoint`), periodic
validation figures in ``figures/``, ``curves.png`` and ``metrics.json``.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`; every process holds the
data, draws the same shuffled order and takes its slice of each global batch,
so the gradient is that of the whole batch and the run matches a
one-process run up to floating-point rounding. Only rank 0 writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyro
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from pyro_nf.checkpoint import Checkpoint, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from pyro_nf.core import validation
from pyro_nf.data import TOY_DATASETS, sample_toy
from pyro_nf.data.files import as_images, as_vectors, is_data_file, load_file
from pyro_nf.distributions import FlowModel
from pyro_nf.metrics import bits_per_dim
from pyro_nf.transforms.preprocess import dequantize, quantize

__all__ = [
    "FLOWS",
    "IMAGE_DATASETS",
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Unavailable",
    "evaluate",
    "resolve_config",
    "sample",
    "train",
]

DataKind = Literal["toy", "file", "image"]


class ConfigError(ValueError):
    """A configuration that cannot run (unknown flow or dataset, a flow that does not fit the data, ...)."""


class Unavailable(ConfigError):
    """A flow or dataset whose implementation is not part of this version of pyro_nf."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


@dataclass(frozen=True)
class FlowSpec:
    """How the trainer builds one flow family."""

    name: str
    kind: Literal["vector", "image"]
    module: str
    factory: str
    summary: str


FLOWS: dict[str, FlowSpec] = {
    spec.name: spec
    for spec in (
        FlowSpec("maf", "vector", "pyro_nf.transforms.autoregressive", "maf", "masked autoregressive flow"),
        FlowSpec("iaf", "vector", "pyro_nf.transforms.autoregressive", "iaf", "inverse autoregressive flow"),
        FlowSpec("realnvp", "vector", "pyro_nf.transforms.coupling", "realnvp", "affine coupling flow for vectors"),
        FlowSpec("ffjord", "vector", "pyro_nf.transforms.continuous", "ffjord", "continuous normalizing flow (FFJORD)"),
        FlowSpec("glow", "image", "pyro_nf.transforms.glow", "glow", "Glow (actnorm, 1x1 conv, coupling)"),
        FlowSpec(
            "realnvp-multiscale",
            "image",
            "pyro_nf.transforms.multiscale",
            "realnvp_multiscale",
            "multiscale RealNVP for images",
        ),
    )
}
"""The flows ``--flow`` accepts."""

IMAGE_DATASETS: dict[str, str] = {
    "digits": "8x8 handwritten digits from scikit-learn (1797 images, 17 grey levels)",
    "mnist": "MNIST 28x28 (60000 + 10000 images)",
    "fashion-mnist": "Fashion-MNIST 28x28 (60000 + 10000 images)",
}
"""The built-in image datasets ``--data`` accepts."""

_IMAGES_MODULE = "pyro_nf.data.images"


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and (module == error.name or module.startswith(error.name + ".")):
            raise Unavailable(f"{what} is not available in this version of pyro_nf (no module {module})") from None
        raise


def available_flows() -> dict[str, bool]:
    """Which flows of :data:`FLOWS` this installation can build."""
    return {name: importlib.util.find_spec(spec.module) is not None for name, spec in FLOWS.items()}


def available_datasets() -> dict[str, bool]:
    """Which built-in datasets this installation can load (toys always, images when their loader exists)."""
    images = importlib.util.find_spec(_IMAGES_MODULE) is not None
    return {**{name: True for name in TOY_DATASETS}, **{name: images for name in IMAGE_DATASETS}}


# --------------------------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """The full, resolved configuration of a training run (every field a plain value).

    Build one with :func:`resolve_config`, which fills the defaults that depend
    on the kind of data. Fields that do not apply to the chosen flow are None.

    Fields:

    - ``flow``: a key of :data:`FLOWS`.
    - ``data``: a toy name, an image dataset name, or a path to a ``.npy``/``.npz``/``.csv`` file.
    - ``out``: the folder that receives every output.
    - ``steps``: optimizer steps in total.
    - ``epochs``: the number of passes over the training set ``steps`` came from, if given that way.
    - ``batch_size``: samples per (global) batch.
    - ``lr``: Adam's learning rate after warm-up.
    - ``warmup_steps``: the learning rate rises linearly from ``lr / warmup_steps`` over these steps.
    - ``grad_clip``: the largest gradient norm (0 turns clipping off).
    - ``seed``: seeds the model's initialisation, the data split, the shuffling and the noise.
    - ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    - ``hidden``: hidden widths of the vector flows' networks.
    - ``num_transforms``: layers of a vector flow.
    - ``levels``: scales of an image flow.
    - ``depth``: steps per level of an image flow.
    - ``hidden_channels``: channels of an image flow's coupling networks.
    - ``coupling``: ``"affine"`` or ``"additive"`` (image flows).
    - ``n_levels``: pixel levels of image data (None for vectors).
    - ``data_dir``: a folder with the MNIST / Fashion-MNIST IDX files (default: the offline copies).
    - ``n_train``: training points drawn from a toy density.
    - ``n_val``: validation points (toys; files use 10 %).
    - ``n_test``: test points (toys; files use 10 %).
    - ``val_every``: steps between validations (a figure, the curves and a checkpoint).
    - ``checkpoint_every``: steps between checkpoints.
    - ``log_every``: steps between lines of ``history.csv``.
    - ``num_samples``: samples drawn for figures.
    - ``progress``: show a progress bar.
    """

    flow: str
    data: str
    out: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    grad_clip: float
    seed: int
    device: str
    epochs: int | None = None
    hidden: list[int] | None = None
    num_transforms: int | None = None
    levels: int | None = None
    depth: int | None = None
    hidden_channels: int | None = None
    coupling: str | None = None
    n_levels: int | None = None
    data_dir: str | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    val_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    num_samples: int = 2000
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`'s output (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"configuration: unknown keys {', '.join(unknown)}")
        return cls(**values)


_RESUMABLE = {"steps", "epochs", "val_every", "checkpoint_every", "log_every", "progress", "device", "num_samples"}
"""Options a resumed run may change; all others must match the checkpoint."""


def data_kind(data: str) -> DataKind:
    """``"toy"``, ``"image"`` or ``"file"``; raises :class:`ConfigError` listing the choices otherwise."""
    if data in TOY_DATASETS:
        return "toy"
    if data in IMAGE_DATASETS:
        return "image"
    if is_data_file(data):
        return "file"
    raise ConfigError(
        f"--data: unknown dataset {data!r}; expected one of {', '.join(TOY_DATASETS)}, "
        f"{', '.join(IMAGE_DATASETS)}, or a path to a .npy, .npz or .csv file"
    )


def _defaults(flow: str, kind: DataKind, data: str) -> dict[str, Any]:
    """Per-data-kind defaults (see ``docs/families/command-line.md``)."""
    spec = FLOWS[flow]
    out: dict[str, Any] = {"seed": 0, "device": "auto", "grad_clip": 0.0, "warmup_steps": 0}
    if spec.kind == "image":
        big = data in ("mnist", "fashion-mnist")
        out.update(
            steps=20000 if big else 1500,
            batch_size=64,
            lr=1e-3,
            warmup_steps=1000 if big else 100,
            grad_clip=50.0,
            levels=(3 if big else 2) if flow == "realnvp-multiscale" else 2,
            depth=16 if big else 4,
            hidden_channels=256 if big else 32,
            coupling="affine",
            val_every=2000 if big else 250,
            num_samples=64,
        )
        return out
    out.update(batch_size=256, lr=1e-3, val_every=500, num_samples=2000)
    if flow == "ffjord":
        out.update(steps=1000, hidden=[64, 64, 64], num_transforms=1, val_every=250)
    elif kind == "toy":
        out.update(steps=2000, hidden=[128, 128], num_transforms=6 if flow == "realnvp" else 5)
    else:
        out.update(steps=5000, hidden=None, num_transforms=6 if flow == "realnvp" else 5)
        if kind == "image":
            out.update(batch_size=128, lr=1e-4, warmup_steps=100, num_samples=64)
    if kind == "toy":
        out.update(n_train=20000, n_val=5000, n_test=5000)
    return out


def resolve_config(options: dict[str, Any]) -> TrainConfig:
    """Fill every option left as None with its default for the flow and kind of data.

    ``options`` holds :class:`TrainConfig` fields; ``flow`` and ``data`` may be
    None (MAF, two moons). ``epochs`` (if given) is kept and turned into steps
    once the size of the training set is known.

    Example::

        >>> config = resolve_config({"flow": "maf", "data": "moons", "out": "runs/demo"})
        >>> config.steps, config.batch_size, config.hidden
        (2000, 256, [128, 128])
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown options {', '.join(unknown)}")
    flow = options.get("flow") or "maf"
    data = options.get("data") or "moons"
    if flow not in FLOWS:
        raise ConfigError(f"--flow: unknown flow {flow!r}; expected one of {', '.join(FLOWS)}")
    kind = data_kind(data)
    if kind == "file":
        data = str(Path(data).expanduser().resolve())
    spec = FLOWS[flow]
    if spec.kind == "image" and kind == "toy":
        raise ConfigError(f"--flow {flow} models images, but {data!r} is a 2D toy; use maf, iaf, realnvp or ffjord")
    values = {key: value for key, value in options.items() if value is not None}
    values["flow"], values["data"] = flow, data
    merged = {**_defaults(flow, kind, data), **values}
    if "out" not in merged:
        stem = Path(data).stem if kind == "file" else data
        merged["out"] = str(Path("runs") / f"{stem}-{flow}")
    if spec.kind == "vector":
        for key in ("levels", "depth", "hidden_channels", "coupling"):
            if key in values:
                raise ConfigError(f"--{key.replace('_', '-')} applies to image flows, not to {flow}")
    else:
        for key in ("hidden", "num_transforms"):
            if key in values:
                raise ConfigError(f"--{key.replace('_', '-')} applies to vector flows, not to {flow}")
    if "data_dir" in values:
        if kind != "image" or data == "digits":
            raise ConfigError(f"--data-dir applies to mnist and fashion-mnist, not to {data!r}")
        merged["data_dir"] = str(Path(values["data_dir"]).expanduser().resolve())
    if kind != "toy":
        for key in ("n_train", "n_val", "n_test"):
            if key in values:
                raise ConfigError(f"--{key.replace('_', '-')} applies to the 2D toys, not to {data!r}")
    if "steps" in values and "epochs" in values:
        raise ConfigError("give either --steps or --epochs, not both")
    if "epochs" in values:
        merged["steps"] = 0  # set from the training-set size in prepare_data
    if "checkpoint_every" not in values:
        merged["checkpoint_every"] = merged.get("val_every", 500)
    config = TrainConfig(**merged)
    _validate(config)
    return config


def _validate(config: TrainConfig) -> None:
    positive = {
        "batch_size": config.batch_size,
        "val_every": config.val_every,
        "checkpoint_every": config.checkpoint_every,
        "log_every": config.log_every,
        "num_samples": config.num_samples,
    }
    for key in ("epochs", "num_transforms", "levels", "depth", "hidden_channels", "n_train", "n_val", "n_test"):
        value = getattr(config, key)
        if value is not None:
            positive[key] = value
    if config.epochs is None:
        positive["steps"] = config.steps
    for key, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{key.replace('_', '-')}: expected a positive integer, got {value!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"--lr: expected a positive number, got {config.lr!r}")
    if config.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps: expected an integer >= 0, got {config.warmup_steps!r}")
    if not (math.isfinite(config.grad_clip) and config.grad_clip >= 0):
        raise ConfigError(f"--grad-clip: expected a number >= 0 (0 turns it off), got {config.grad_clip!r}")
    if config.hidden is not None and (not config.hidden or any(h < 1 for h in config.hidden)):
        raise ConfigError(f"--hidden: expected positive widths such as 64,64, got {config.hidden!r}")
    if config.coupling is not None and config.coupling not in ("affine", "additive"):
        raise ConfigError(f"--coupling: expected affine or additive, got {config.coupling!r}")
    if config.n_levels is not None and config.n_levels < 2:
        raise ConfigError(f"--n-levels: expected an integer >= 2, got {config.n_levels!r}")
    if config.device != "auto":
        try:
            torch.device(config.device)
        except RuntimeError:
            raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {config.device!r}") from None


def merge_resume(saved: dict[str, Any], options: dict[str, Any]) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's, with the few options a resume may change.

    Raises:
        ConfigError: an option that differs from the checkpoint's and cannot change on resume.
    """
    config = TrainConfig.from_dict(saved)
    for key, value in options.items():
        if value is None or key in ("out",):
            continue
        if key == "data" and data_kind(value) == "file":
            value = str(Path(value).expanduser().resolve())
        if key in _RESUMABLE:
            setattr(config, key, value)
            if key == "steps":
                config.epochs = None
        elif getattr(config, key) != value:
            raise ConfigError(
                f"--{key.replace('_', '-')} {value!r} differs from the resumed run's {getattr(config, key)!r}; "
                f"a resumed run keeps its configuration (only {', '.join(sorted(_RESUMABLE))} may change)"
            )
    if options.get("epochs") is not None:
        config.steps = 0
    _validate(config)
    return config


# --------------------------------------------------------------------------------------------- data


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
        """Dequantized, centred images; the noise is drawn from ``generator`` (on the CPU)."""
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
    """Rebuild a preprocessing step from its :meth:`state`."""
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

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        return tuple(self.train.shape[1:])


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
        preprocess = Standardize.fit(train_t)
    return PreparedData(kind_out, train_t, val_t, test_t, preprocess, f"file {data.path}")


def _load_image_dataset(name: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train, test, n_levels)`` of a built-in image dataset, images as ``(N, C, H, W)``."""
    images = _import(_IMAGES_MODULE, f"the image dataset {name!r}")
    result = images.load_images(name, data_dir)
    return result.train.numpy(), result.test.numpy(), int(result.n_levels)


# --------------------------------------------------------------------------------------------- model


def build_model(config: TrainConfig, data: PreparedData) -> FlowModel:
    """The flow named by ``config.flow`` over the data's event shape, as a :class:`FlowModel`."""
    spec = FLOWS[config.flow]
    module = _import(spec.module, f"--flow {config.flow}")
    factory = getattr(module, spec.factory)
    if spec.kind == "vector":
        dim = math.prod(data.event_shape)
        if config.flow == "ffjord":
            flow = factory(dim, hidden_dims=config.hidden)
        else:
            flow = factory(dim, hidden_dims=config.hidden, num_transforms=config.num_transforms)
        return FlowModel(flow, (dim,))
    if data.kind != "image":
        raise ConfigError(
            f"--flow {config.flow} models images of shape (C, H, W), but the data are vectors of "
            f"shape {data.event_shape}; use maf, iaf, realnvp or ffjord, or save images as (N, C, H, W)"
        )
    shape = data.event_shape
    assert config.levels is not None
    squeezes = config.levels if config.flow == "glow" else config.levels - 1
    factor = 2**squeezes
    if shape[1] % factor or shape[2] % factor:
        raise ConfigError(
            f"--flow {config.flow} with --levels {config.levels} halves the image size {squeezes} times, so "
            f"height and width must be multiples of {factor}; got images of shape {shape}; give fewer --levels"
        )
    if config.flow == "glow":
        flow = factory(
            shape,
            levels=config.levels,
            depth=config.depth,
            hidden_channels=config.hidden_channels,
            coupling=config.coupling,
        )
    else:
        flow = factory(shape, num_scales=config.levels, hidden_channels=config.hidden_channels)
    return FlowModel(flow, shape)


def _model_view(model: nn.Module, y: Tensor) -> Tensor:
    shape: tuple[int, ...] = tuple(model.event_shape)  # type: ignore[arg-type]
    return y.reshape(y.shape[0], *shape)


# --------------------------------------------------------------------------------------------- distributed


@dataclass
class DistributedContext:
    """The process group of a ``torchrun`` launch (a single process when ``WORLD_SIZE`` is 1 or unset)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str) -> DistributedContext:
        """Join the process group ``torchrun`` describes in the environment."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not torch_dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            torch_dist.init_process_group(backend=backend)
            owns = True
        return cls(rank, world_size, local_rank, owns)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files."""
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over all processes."""
        if self.world_size > 1:
            value = value.clone()
            torch_dist.all_reduce(value)
            value /= self.world_size
        return value

    def close(self) -> None:
        """Leave the process group if this context joined it."""
        if self.owns_group:
            torch_dist.destroy_process_group()


def _resolve_device(device: str, context: DistributedContext) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if device == "cuda" and context.world_size > 1:
            device = f"cuda:{context.local_rank}"
    return torch.device(device)


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` reports."""

    out: Path
    steps: int
    metrics: dict[str, float]
    files: list[Path] = field(default_factory=list)


def _metric_name(data: PreparedData) -> str:
    return data.preprocess.metric_name


def _metric(model: nn.Module, data: PreparedData, y: Tensor) -> Tensor:
    """The metric per sample (nats, or bits per dimension for images) of preprocessed data ``y``."""
    return data.preprocess.metric(model(_model_view(_unwrap(model), y)))


def _device_of(model: nn.Module) -> torch.device:
    return next(_unwrap(model).buffers()).device


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _generator(seed: int, step: int) -> torch.Generator:
    """The generator of the dequantization noise of one global batch: a function of (seed, step) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def evaluate_nll(model: nn.Module, data: PreparedData, x: Tensor, *, batch_size: int = 1024, seed: int = 0) -> float:
    """The mean metric (nats per sample, or bits per dimension for images) of ``model`` on ``x``."""
    device = _device_of(model)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    generator = _generator(seed, 0)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].to(device)
            y = data.preprocess.to_model(chunk, generator)
            total += float(_metric(_unwrap(model), data, y).double().sum())
            count += len(chunk)
    model.train(was_training)
    return total / count


class _ConsoleHandler(logging.Handler):
    """Prints to stdout through ``tqdm.write``, so messages do not tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a closed or broken stdout must not stop training
            self.handleError(record)


class _RunLog:
    """``train.log`` (and the console) for rank 0; silent elsewhere."""

    def __init__(self, out: Path | None) -> None:
        self.logger = logging.getLogger(f"pyro_nf.train.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.handlers: list[logging.Handler] = []
        if out is not None:
            file_handler = logging.FileHandler(out / "train.log", mode="a", encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            console: logging.Handler = _ConsoleHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            console.addFilter(lambda record: getattr(record, "console", True))
            self.handlers = [file_handler, console]
        else:
            self.handlers = [logging.NullHandler()]
        for handler in self.handlers:
            self.logger.addHandler(handler)

    def info(self, message: str, *, console: bool = True) -> None:
        self.logger.info(message, extra={"console": console})

    def close(self) -> None:
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()


def _batches(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[tuple[int, Tensor]]:
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


def _history_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run (or resume) the training that ``config`` describes; see the module docstring.

    A folder that already holds a checkpoint is continued with ``resume=True``
    or replaced with ``overwrite=True``; otherwise it is left alone.

    Raises:
        ConfigError: the configuration cannot run on this data.
        NonFiniteLossError: the loss or gradient became NaN or infinite.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     config = resolve_config({"flow": "realnvp", "data": "moons", "out": tmp, "steps": 5,
        ...                              "n_train": 512, "n_val": 256, "n_test": 256, "hidden": [8],
        ...                              "num_transforms": 2, "progress": False, "num_samples": 100})
        ...     result = train(config)  # doctest: +ELLIPSIS
        pyro-nf: ...
        >>> result.steps, sorted(result.metrics)
        (5, ['test_nll', 'val_nll'])
    """
    existing = Path(config.out) / "checkpoint.pt"
    if not resume and not overwrite and existing.exists():
        raise ConfigError(
            f"{config.out} already holds a run ({existing}); pass --resume to continue it, --overwrite to "
            "start again in it, or choose another --out"
        )
    context = DistributedContext.from_env(config.device)
    try:
        return _train(config, context, resume)
    finally:
        context.close()


def _train(config: TrainConfig, context: DistributedContext, resume: bool) -> TrainResult:
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    device = _resolve_device(config.device, context)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    image_flow = FLOWS[config.flow].kind == "image"

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    data = prepare_data(config, image_flow=image_flow)
    _import(FLOWS[config.flow].module, f"--flow {config.flow}")
    if config.batch_size % context.world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} must be a multiple of the number of processes ({context.world_size})"
        )
    per_epoch = len(data.train) // config.batch_size
    if per_epoch < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the training set ({len(data.train)} samples)"
        )
    if config.epochs is not None and not config.steps:
        config.steps = config.epochs * per_epoch

    checkpoint: Checkpoint | None = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        data.preprocess = preprocess_from_state(checkpoint.extra["preprocess"])
    model = build_model(config, data).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)
        start = checkpoint.step
        if start > config.steps:
            raise ConfigError(f"the checkpoint is at step {start}, past --steps {config.steps}; give more steps")

    main = context.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
    log = _RunLog(out if main else None)
    history_path = out / "history.csv"
    curves: dict[str, list[float]] = {"steps": [], "train": [], "val": []}
    metric = _metric_name(data)
    try:
        if checkpoint is not None:
            curves = {key: list(map(float, values)) for key, values in checkpoint.extra["curves"].items()}
            if main:
                rows = [row for row in _history_rows(history_path) if int(row["step"]) <= start]
                _write_history(history_path, rows)
            rank_states = checkpoint.extra.get("rank_rng")
            restore_rng_state(checkpoint.rng)
            if rank_states is not None and len(rank_states) == context.world_size:
                torch.set_rng_state(rank_states[context.rank])
            log.info(f"pyro-nf: resuming {config.flow} on {data.description} at step {start} of {config.steps}")
        else:
            if main:
                _write_history(history_path, [])
            # Data-dependent initialisation (ActNorm) sees the first global batch, on every process alike.
            first = next(_batches(len(data.train), config.batch_size, config.seed, 0))[1]
            with torch.no_grad():
                x0 = data.train[first].to(device)
                _metric(model, data, data.preprocess.to_model(x0, _generator(config.seed, -1)))
            if context.world_size > 1:
                torch.manual_seed(config.seed + 7919 * context.rank)
            log.info(
                f"pyro-nf: training {config.flow} on {data.description} ({len(data.train)} train, "
                f"{len(data.val)} val, {len(data.test)} test, shape {data.event_shape}) for {config.steps} steps "
                f"on {device}" + (f" x {context.world_size} processes" if context.world_size > 1 else "")
            )
        if main:
            resolved = {
                **config.to_dict(),
                "resolved": {
                    "event_shape": list(data.event_shape),
                    "n_train": len(data.train),
                    "n_val": len(data.val),
                    "n_test": len(data.test),
                    "steps_per_epoch": per_epoch,
                    "world_size": context.world_size,
                    "device": str(device),
                    "preprocess": _jsonable(data.preprocess.state()),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "pyro_nf_version": _version(),
                },
            }
            _atomic_write_text(out / "config.json", json.dumps(resolved, indent=2) + "\n")

        ddp: nn.Module = model
        if context.world_size > 1:
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        share = config.batch_size // context.world_size
        lo, hi = context.rank * share, (context.rank + 1) * share
        interval: list[float] = []
        last_saved = start if checkpoint is not None else None
        progress = _progress(config, start, main)
        window_start, window_steps = time.perf_counter(), 0
        clip = config.grad_clip if config.grad_clip > 0 else math.inf
        model.train()
        batches = _batches(len(data.train), config.batch_size, config.seed, start)

        def stop(what: str) -> None:
            kept = f"the last good checkpoint (step {last_saved}) is kept at {checkpoint_path}"
            if last_saved is None:
                kept = "no checkpoint had been written yet"
            message = (
                f"{what}; training stopped and {kept}. Try a lower --lr (now {config.lr:g}), more --warmup-steps "
                f"(now {config.warmup_steps}), gradient clipping (--grad-clip, now {config.grad_clip:g})"
                + (", or --coupling additive" if image_flow else "")
            )
            log.info(f"pyro-nf: error: {message}", console=False)  # the command line prints it
            raise NonFiniteLossError(message)

        for step, indices in batches:
            if step >= config.steps:
                break
            lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = data.train[indices].to(device)
            # The whole global batch is preprocessed (same noise as one process would draw), then sliced.
            y = data.preprocess.to_model(x, _generator(config.seed, step))[lo:hi]
            # The data were checked when loaded; unchecked layers and base let a NaN reach the loss test below.
            with validation(False), pyro.validation_enabled(False):
                loss = _metric(ddp, data, y).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            reported = context.mean(torch.stack([loss.detach(), grad_norm.detach().to(loss)]))
            loss_value, norm_value = float(reported[0]), float(reported[1])
            if not math.isfinite(loss_value):
                stop(f"the loss became {loss_value} at step {step + 1}")
            if not math.isfinite(norm_value):
                stop(f"the gradient norm became {norm_value} at step {step + 1}")
            optimizer.step()
            done = step + 1
            interval.append(loss_value)
            window_steps += 1
            if main and (done % config.log_every == 0 or done == config.steps):
                _append_history(history_path, done, loss_value, lr, norm_value)
            if progress is not None:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                progress.set_postfix(
                    {metric: f"{loss_value:.4f}", "samples/s": f"{window_steps * config.batch_size / elapsed:.0f}"},
                    refresh=False,
                )
                progress.update(1)
                if elapsed > 5.0:
                    window_start, window_steps = time.perf_counter(), 0
            if done % config.val_every == 0 or done == config.steps:
                if main:
                    val = evaluate_nll(model, data, data.val, seed=config.seed + 1)
                    curves["steps"].append(float(done))
                    curves["train"].append(float(np.mean(interval)))
                    curves["val"].append(val)
                    log.info(f"step {done}: train {metric} {np.mean(interval):.4f}, val {metric} {val:.4f}")
                    with torch.random.fork_rng(devices=[]):
                        _figures(model, data, out, config, f"figures/step_{done:06d}.png", curves)
                interval = []
            if done % config.checkpoint_every == 0 or done == config.steps:
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    stop(f"the parameters became non-finite at step {done}")
                _save(checkpoint_path, model, optimizer, done, config, data, curves, context)
                last_saved = done
        if progress is not None:
            progress.close()
        metrics: dict[str, float] = {}
        files: list[Path] = []
        if main:
            last_figure = out / "figures" / f"step_{config.steps:06d}.png"
            if curves["steps"] and curves["steps"][-1] == config.steps and last_figure.exists():
                # The validation at the last step already scored this model and drew its figure.
                val_value = curves["val"][-1]
                shutil.copyfile(last_figure, out / "samples.png")
                files = [out / "samples.png", out / "curves.png"]
            else:
                val_value = evaluate_nll(model, data, data.val, seed=config.seed + 1)
                with torch.random.fork_rng(devices=[]):
                    files = _figures(model, data, out, config, "samples.png", curves)
            metrics = {
                f"val_{metric}": val_value,
                f"test_{metric}": evaluate_nll(model, data, data.test, seed=config.seed + 2),
            }
            _atomic_write_text(out / "metrics.json", json.dumps({"step": config.steps, **metrics}, indent=2) + "\n")
            files += [out / name for name in ("metrics.json", "checkpoint.pt", "config.json", "train.log")]
            unit = "bits/dim" if metric == "bpd" else "nats"
            log.info(
                f"pyro-nf: done, {config.steps} steps. val {metric} {metrics[f'val_{metric}']:.4f} {unit}, "
                f"test {metric} {metrics[f'test_{metric}']:.4f} {unit}"
            )
            log.info(f"pyro-nf: outputs in {out}/: " + ", ".join(p.name for p in files))
        return TrainResult(out, config.steps, metrics, files)
    finally:
        log.close()


def _version() -> str:
    from pyro_nf import __version__

    return __version__


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.tolist() if isinstance(value, Tensor) else value for key, value in state.items()}


def _progress(config: TrainConfig, start: int, main: bool) -> Any:
    if not (config.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=f"{config.flow}", unit="step", dynamic_ncols=True)


def _write_history(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "loss", "lr", "grad_norm"])
        writer.writeheader()
        writer.writerows(rows)


def _append_history(path: Path, step: int, loss: float, lr: float, norm: float) -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow([step, repr(loss), repr(lr), repr(norm)])


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _save(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    data: PreparedData,
    curves: dict[str, list[float]],
    context: DistributedContext,
) -> None:
    """Every process takes part (their generator states are gathered); rank 0 writes."""
    rank_rng: list[Tensor] | None = None
    if context.world_size > 1:
        state = torch.get_rng_state()
        gathered = [torch.empty_like(state) for _ in range(context.world_size)]
        torch_dist.all_gather_object(gathered, state)
        rank_rng = [t.cpu() for t in gathered]
    if not context.is_main:
        return
    extra: dict[str, Any] = {
        "preprocess": data.preprocess.state(),
        "event_shape": list(data.event_shape),
        "data_kind": data.kind,
        "curves": {key: list(values) for key, values in curves.items()},
    }
    if rank_rng is not None:
        extra["rank_rng"] = rank_rng
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_checkpoint(
        path,
        Checkpoint(state_dict, optimizer.state_dict(), step, capture_rng_state(), config.to_dict(), extra),
    )


# --------------------------------------------------------------------------------------------- figures


def _bounds(points: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = np.percentile(points, 0.5, axis=0), np.percentile(points, 99.5, axis=0)
    pad = 0.15 * (hi - lo) + 1e-3
    return ((float(lo[0] - pad[0]), float(hi[0] + pad[0])), (float(lo[1] - pad[1]), float(hi[1] + pad[1])))


def _samples(model: FlowModel, data: PreparedData, n: int, temperature: float = 1.0) -> Tensor:
    model.eval()
    with torch.no_grad():
        y = model.sample((n,), temperature=temperature).reshape(n, *data.event_shape)
        x = data.preprocess.to_data(y)
    model.train()
    return x.cpu()


def _figures(
    model: nn.Module,
    data: PreparedData,
    out: Path,
    config: TrainConfig,
    name: str,
    curves: dict[str, list[float]],
    resolution: int = 150,
) -> list[Path]:
    """The validation figure (density or samples) and the curves; returns the paths written."""
    from pyro_nf import plotting

    flow_model: FlowModel = _unwrap(model)  # type: ignore[assignment]
    files: list[Path] = []
    if data.kind == "image":
        files.append(_plot_images(flow_model, data, out / name))
    elif data.event_shape == (2,):
        samples = _samples(flow_model, data, config.num_samples)
        val = data.val[: config.num_samples]

        def log_prob(x: Tensor) -> Tensor:
            y = data.preprocess.to_model(x.to(torch.float32))
            return -data.preprocess.metric(flow_model.log_prob(y.to(_device_of(flow_model))))

        flow_model.eval()
        try:
            files.append(
                plotting.plot_density_2d(
                    log_prob, val, samples, out / name, bounds=_bounds(val.numpy()), resolution=resolution
                )
            )
        finally:
            flow_model.train()
    else:
        files.append(_plot_pairs(flow_model, data, out / name, config.num_samples))
    if curves["steps"]:
        unit = "bits/dim" if data.kind == "image" else "NLL (nats)"
        files.append(
            plotting.plot_curves(
                {"train": curves["train"], "validation": curves["val"]},
                out / "curves.png",
                steps=curves["steps"],
                ylabel=unit,
            )
        )
    return files


def _plot_pairs(model: FlowModel, data: PreparedData, path: Path, n: int) -> Path:
    """Scatter of the first two features: data beside samples (vectors with D != 2)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples = _samples(model, data, n).numpy()
    real = data.val[:n].numpy()
    columns = (0, 1) if data.event_shape[0] > 1 else (0, 0)
    fig = Figure(figsize=(8, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, points, title in zip(axes, (real, samples), ("data", "samples")):
        if columns[0] == columns[1]:
            ax.hist(points[:, 0], bins=50)
        else:
            ax.scatter(points[:, columns[0]], points[:, columns[1]], s=2, alpha=0.5)
        ax.set_title(f"{title} (features {columns[0] + 1}, {columns[1] + 1})")
    FigureCanvasAgg(fig)
    return _save_figure(fig, path)


TEMPERATURES = (0.5, 0.7, 0.85, 1.0)
"""Temperatures of the image sample grids (base noise scaled by ``T``)."""


def _plot_images(model: FlowModel, data: PreparedData, path: Path, per_row: int = 8) -> Path:
    """Real images beside samples at several temperatures, one panel each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = per_row * per_row
    panels = [("data", data.val[:n])]
    panels += [(f"T = {t:g}", _samples(model, data, n, temperature=t)) for t in TEMPERATURES]
    fig = Figure(figsize=(3 * len(panels), 3.3), layout="constrained")
    axes = fig.subplots(1, len(panels))
    levels = data.preprocess.n_levels if isinstance(data.preprocess, Dequantize) else 256
    for ax, (title, images) in zip(axes, panels):
        ax.imshow(_grid(images.numpy(), per_row) / (levels - 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    FigureCanvasAgg(fig)
    return _save_figure(fig, path)


def _grid(images: np.ndarray, per_row: int) -> np.ndarray:
    n, c, h, w = images.shape
    rows = math.ceil(n / per_row)
    canvas = np.ones((rows * (h + 1), per_row * (w + 1), c)) * images.max(initial=0)
    for i, image in enumerate(images):
        r, col = divmod(i, per_row)
        canvas[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image.transpose(1, 2, 0)
    return canvas[..., 0] if c == 1 else canvas


def _save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(temporary, dpi=100)
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------------- evaluate / sample


def _load_run(checkpoint_path: Path, device: str) -> tuple[FlowModel, TrainConfig, PreparedData | None, Checkpoint]:
    checkpoint = load_checkpoint(checkpoint_path)
    config = TrainConfig.from_dict(checkpoint.config)
    extra = checkpoint.extra
    shape = tuple(int(s) for s in extra["event_shape"])
    empty = torch.zeros((0, *shape))
    shell = PreparedData(extra["data_kind"], empty, empty, empty, preprocess_from_state(extra["preprocess"]), "")
    model = build_model(config, shell)
    model.load_state_dict(checkpoint.model)
    model.to(_resolve_device(device, DistributedContext()))
    model.eval()
    return model, config, shell, checkpoint


def evaluate(
    checkpoint_path: str | Path,
    *,
    split: Literal["val", "test", "train"] = "test",
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 1024,
) -> dict[str, Any]:
    """The mean NLL (nats per sample) or bits per dimension of a trained model on a split or on other data.

    Args:
        checkpoint_path: a ``checkpoint.pt`` written by :func:`train` (or its run folder).
        split: which split of the training data to score.
        data: score this ``.npy``/``.npz``/``.csv`` file (all of it) instead.
        device: where to run.
        batch_size: samples per forward pass.
    """
    path = _checkpoint_file(checkpoint_path)
    model, config, shell, _ = _load_run(path, device)
    assert shell is not None
    if data is not None:
        if data_kind(data) != "file":
            raise ConfigError(f"--data for evaluate: expected a .npy, .npz or .csv file, got {data!r}")
        loaded = load_file(data)
        if shell.kind == "image":
            arrays, _ = as_images(loaded, n_levels=shell.preprocess.n_levels)  # type: ignore[union-attr]
        else:
            arrays = as_vectors(loaded)
        values = torch.as_tensor(np.concatenate(list(arrays.values())), dtype=torch.float32)
        if tuple(values.shape[1:]) != shell.event_shape:
            raise ConfigError(
                f"{data}: expected samples of shape {shell.event_shape} (as the model was trained on), "
                f"got {tuple(values.shape[1:])}"
            )
        x, source = values, str(loaded.path)
    else:
        prepared = prepare_data(config, image_flow=FLOWS[config.flow].kind == "image")
        prepared.preprocess = shell.preprocess
        x, source = {"train": prepared.train, "val": prepared.val, "test": prepared.test}[split], f"{split} split"
    shell.train = x[:1]
    metric = _metric_name(shell)
    value = evaluate_nll(model, shell, x, batch_size=batch_size, seed=config.seed + 2)
    return {"metric": metric, "value": value, "data": source, "samples": len(x), "checkpoint": str(path)}


def sample(
    checkpoint_path: str | Path,
    output: str | Path,
    *,
    num: int = 1000,
    temperature: float = 1.0,
    seed: int = 0,
    device: str = "auto",
) -> tuple[Path, Path]:
    """Draw ``num`` samples in data units; write them as ``.npy`` and a picture beside it.

    Returns:
        The paths of the ``.npy`` file and of the ``.png`` picture.
    """
    path = _checkpoint_file(checkpoint_path)
    if num < 1:
        raise ConfigError(f"--num: expected a positive integer, got {num}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature: expected a positive number, got {temperature}")
    output = Path(output)
    if output.suffix != ".npy":
        raise ConfigError(f"--output: expected a .npy file name, got {str(output)!r}")
    model, config, shell, _ = _load_run(path, device)
    assert shell is not None
    torch.manual_seed(seed)
    x = _samples(model, shell, num, temperature)
    output.parent.mkdir(parents=True, exist_ok=True)
    array = x.numpy().astype(np.uint8 if shell.kind == "image" and shell.preprocess.n_levels <= 256 else np.float32)  # type: ignore[union-attr]
    np.save(output, array)
    picture = output.with_suffix(".png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    if shell.kind == "image":
        levels = shell.preprocess.n_levels  # type: ignore[union-attr]
        per_row = max(1, int(math.sqrt(min(num, 100))))
        ax.imshow(_grid(x[: per_row * per_row].numpy(), per_row) / (levels - 1), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    elif x.shape[1] >= 2:
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_xlabel("feature 1")
        ax.set_ylabel("feature 2")
    else:
        ax.hist(x[:, 0].numpy(), bins=50)
    ax.set_title(f"{num} samples of {config.flow} (T = {temperature:g})")
    FigureCanvasAgg(fig)
    _save_figure(fig, picture)
    return output, picture


def _checkpoint_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path
