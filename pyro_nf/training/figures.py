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
                    log_prob,
                    val,
                    samples,
                    out / name,
                    bounds=_bounds(val.numpy()),
                    resolution=resolution,
                    labels=_labels(data)[:2],  # type: ignore[arg-type]
                )
            )
        finally:
            flow_model.train()
    else:
        val = data.val[: config.num_samples]
        samples = _samples(flow_model, data, len(val))  # as many as there are data points to show
        files.append(plotting.plot_pairs({"data": val, "samples": samples}, out / name, columns=_labels(data)))
    if curves["steps"] or (out / "history.csv").exists():
        files.append(_plot_curves(data, out, curves, config.objective))
    return files


def _labels(data: PreparedData) -> tuple[str, ...]:
    """The features' names: a CSV's header, else ``feature 1 .. D``."""
    if data.columns is not None and len(data.columns) == data.event_shape[0]:
        return data.columns
    return tuple(f"feature {i + 1}" for i in range(data.event_shape[0]))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """The trailing mean over ``window`` values (fewer at the start), one per value."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def _plot_curves(data: PreparedData, out: Path, curves: dict[str, list[float]], objective: str = "likelihood") -> Path:
    """``curves.png``: the training loss as ``history.csv`` logged it (smoothed) and the validation points.

    A flow-matching run's training loss is the regression loss, not an NLL: its label says so.
    """
    from pyro_nf import plotting
    from pyro_nf.training.run_log import history_rows

    history = {"validation": curves["val"]} if curves["steps"] else {}
    steps = {"validation": curves["steps"]}
    rows = [r for r in history_rows(out / "history.csv") if math.isfinite(float(r["loss"]))]
    if rows:
        logged = np.array([float(r["loss"]) for r in rows])
        window = max(1, len(logged) // 25)
        every = int(rows[1]["step"]) - int(rows[0]["step"]) if len(rows) > 1 else 1
        loss = "flow-matching loss, " if objective == "flow-matching" else ""
        name = f"train ({loss}every {every} steps" + (f", mean of {window})" if window > 1 else ")")
        history = {name: _smooth(logged, window).tolist(), **history}
        steps[name] = [float(r["step"]) for r in rows]
    elif curves["steps"]:
        name = "train (flow-matching loss)" if objective == "flow-matching" else "train"
        history = {name: curves["train"], **history}
        steps[name] = curves["steps"]
    last = max(max(s) for name, s in steps.items() if name in history)
    unit = "bits/dim" if data.kind == "image" else "NLL (nats)"
    return plotting.plot_curves(history, out / "curves.png", steps=steps, ylabel=unit, title=f"step {last:.0f}")


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

    from pyro_nf.plotting import plot_pairs, save_figure, tile_images

    if data.kind != "image":  # the features' names on the axes; every pair for 3 <= D <= 8
        return plot_pairs({"samples": x}, path, columns=_labels(data), title=title)
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    levels = data.preprocess.n_levels  # type: ignore[union-attr]
    per_row = max(1, int(math.sqrt(min(len(x), 100))))
    ax.imshow(tile_images(x[: per_row * per_row].numpy(), per_row) / (levels - 1), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(title)
    return save_figure(fig, path)
