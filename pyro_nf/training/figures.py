"""The figures of a run: the validation figure (density, pairs or image grids), the curves, sample pictures.

The generic drawing lives in :mod:`pyro_nf.plotting`; this module draws a
trained model's samples and density in data units.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pyro_nf.distributions import FlowModel
from pyro_nf.training.config import TrainConfig
from pyro_nf.training.data import Dequantize, PreparedData
from pyro_nf.training.model import _device_of, _unwrap

__all__ = ["TEMPERATURES"]


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
        train = "train (flow-matching loss)" if config.objective == "flow-matching" else "train"
        files.append(
            plotting.plot_curves(
                {train: curves["train"], "validation": curves["val"]},
                out / "curves.png",
                steps=curves["steps"],
                ylabel=unit,
            )
        )
    return files


def _plot_pairs(model: FlowModel, data: PreparedData, path: Path, n: int) -> Path:
    """Scatter of the first two features: data beside samples (vectors with D != 2)."""
    from matplotlib.figure import Figure

    from pyro_nf.plotting import save_figure

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
    return save_figure(fig, path)


TEMPERATURES = (0.5, 0.7, 0.85, 1.0)
"""Temperatures of the image sample grids (base noise scaled by ``T``)."""


def _plot_images(model: FlowModel, data: PreparedData, path: Path, per_row: int = 8) -> Path:
    """Real images beside samples at several temperatures, one panel each."""
    from pyro_nf.plotting import plot_image_grids

    n = per_row * per_row
    panels = {"data": data.val[:n]}
    panels.update({f"T = {t:g}": _samples(model, data, n, temperature=t) for t in TEMPERATURES})
    levels = data.preprocess.n_levels if isinstance(data.preprocess, Dequantize) else 256
    return plot_image_grids(panels, path, n_levels=levels, per_row=per_row)


def _plot_sample_picture(x: Tensor, data: PreparedData, path: Path, title: str) -> Path:
    """The picture beside the samples :func:`pyro_nf.training.trained.sample` writes."""
    from matplotlib.figure import Figure

    from pyro_nf.plotting import save_figure, tile_images

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    if data.kind == "image":
        levels = data.preprocess.n_levels  # type: ignore[union-attr]
        per_row = max(1, int(math.sqrt(min(len(x), 100))))
        ax.imshow(tile_images(x[: per_row * per_row].numpy(), per_row) / (levels - 1), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    elif x.shape[1] >= 2:
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_xlabel("feature 1")
        ax.set_ylabel("feature 2")
    else:
        ax.hist(x[:, 0].numpy(), bins=50)
    ax.set_title(title)
    return save_figure(fig, path)
