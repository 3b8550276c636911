"""The flow model of a training run, and its metric: nats per sample, or bits per dimension for images."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pyro_nf.distributions import FlowModel
from pyro_nf.registry import FLOWS
from pyro_nf.training.config import ConfigError, TrainConfig
from pyro_nf.training.data import PreparedData

__all__ = ["build_model", "evaluate_nll"]


def build_model(config: TrainConfig, data: PreparedData) -> FlowModel:
    """The flow named by ``config.flow`` over the data's event shape, as a :class:`~pyro_nf.distributions.FlowModel`."""
    spec = FLOWS[config.flow]
    if spec.kind == "vector":
        dim = math.prod(data.event_shape)
        options = {} if config.actnorm is None else {"actnorm": config.actnorm}
        flow = spec.build(dim, hidden_dims=config.hidden, num_transforms=config.num_transforms, **options)
        return FlowModel(flow, (dim,))
    if data.kind != "image":
        raise ConfigError(
            f"--flow {config.flow} models images of shape (C, H, W), but the data are vectors of "
            f"shape {data.event_shape}; use maf, iaf, realnvp, nsf or ffjord, or save images as (N, C, H, W)"
        )
    shape = data.event_shape
    assert config.levels is not None and config.hidden_channels is not None
    factor = 2**config.levels
    if shape[1] % factor or shape[2] % factor:
        raise ConfigError(
            f"--flow {config.flow} with --levels {config.levels} halves the image size {config.levels} times, so "
            f"height and width must be multiples of {factor}; got images of shape {shape}; give fewer --levels"
        )
    flow = spec.build(
        shape,
        levels=config.levels,
        hidden_channels=config.hidden_channels,
        depth=config.depth,
        coupling=config.coupling or "affine",
    )
    return FlowModel(flow, shape)


def _model_view(model: nn.Module, y: Tensor) -> Tensor:
    shape: tuple[int, ...] = tuple(model.event_shape)  # type: ignore[arg-type]
    return y.reshape(y.shape[0], *shape)


def _metric_name(data: PreparedData) -> str:
    return data.preprocess.metric_name


def _metric(model: nn.Module, data: PreparedData, y: Tensor) -> Tensor:
    """The metric per sample (nats, or bits per dimension for images) of preprocessed data ``y``."""
    return data.preprocess.metric(model(_model_view(_unwrap(model), y)))


def _device_of(model: nn.Module) -> torch.device:
    return next(_unwrap(model).buffers()).device


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _generator(seed: int, step: int, device: torch.device | None = None) -> torch.Generator:
    """The generator of the dequantization noise of one global batch: a function of (seed, step) only.

    On the CPU by default; on ``device`` (a GPU) the noise is drawn there, from a generator of that device.
    """
    if device is None or device.type == "cpu":
        return torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def evaluate_nll(
    model: nn.Module,
    data: PreparedData,
    x: Tensor,
    *,
    batch_size: int = 1024,
    seed: int = 0,
    after_batch: Callable[[], object] | None = None,
) -> float:
    """The mean metric (nats per sample, or bits per dimension for images) of ``model`` on ``x``.

    ``after_batch`` is called after each batch (to read solve statistics).
    """
    device = _device_of(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    generator = _generator(seed, 0)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].to(device)
            y = data.preprocess.to_model(chunk, generator)
            total += _metric(_unwrap(model), data, y).double().sum()  # read back once, at the end
            if after_batch is not None:
                after_batch()
    model.train(was_training)
    return float(total) / len(x)
