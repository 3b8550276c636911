"""Figures for 2D density models, training curves and grids of images, written as PNG files.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` rendered by the
Agg canvas: nothing touches ``pyplot``'s global state or needs a display, so
these work on headless machines and inside a user's interactive session alike.
Files are written atomically (a temporary file in the same folder, then
:func:`os.replace`), so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

__all__ = ["plot_curves", "plot_density_2d", "plot_image_grids", "plot_pairs", "save_figure", "tile_images"]

_Bounds = tuple[tuple[float, float], tuple[float, float]]
PANEL_INCHES = 4.0
"""Width and height of one panel, in inches."""
DPI = 100
"""Resolution of the PNG files; a ``k``-panel figure is ``k * 400`` by 400 pixels."""


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` with Agg and write it to ``path`` as a PNG, atomically; return the path.

    The folder is created if needed; the image goes to a temporary file in the
    same folder, then :func:`os.replace` puts it in place. The file gets the mode the
    umask allows (``0644`` under the usual ``022``), like any file ``open`` creates.

    Example::

        >>> import tempfile
        >>> from matplotlib.figure import Figure
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_figure(Figure(figsize=(2, 2)), f"{folder}/sub/empty.png").name
        'empty.png'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file beside ``path``, open for writing, with the mode the umask gives (as ``open`` does).

    :func:`tempfile.mkstemp` would make it ``0600``, so a figure in a shared run folder would be
    readable by its owner only.
    """
    for _ in range(100):
        tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")


def _points(name: str, x: Tensor | np.ndarray, width: int | None = 2) -> np.ndarray:
    """Validate a non-empty ``(n, width)`` set of points (any width for None); return it as float64 NumPy."""
    shape = f"(n, {width or 'D'})"
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a Tensor or ndarray of shape {shape}, got {type(x).__name__}")
    if x.ndim != 2 or (width is not None and x.shape[1] != width) or (width is None and len(x) == 0):
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
    return x.astype(np.float64)


def _check_bounds(bounds: _Bounds) -> _Bounds:
    try:
        (x0, x1), (y0, y1) = bounds
        x0, x1, y0, y1 = float(x0), float(x1), float(y0), float(y1)
    except (TypeError, ValueError):
        raise ValueError(f"bounds: expected ((xmin, xmax), (ymin, ymax)), got {bounds!r}") from None
    if not (x0 < x1 and y0 < y1) or not all(map(math.isfinite, (x0, x1, y0, y1))):
        raise ValueError(f"bounds: expected finite ((xmin, xmax), (ymin, ymax)) with min < max, got {bounds!r}")
    return (x0, x1), (y0, y1)


def _log_prob_fn(model: nn.Module | Callable[[Tensor], Tensor]) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The log-density function of ``model`` and a tensor whose device and dtype it expects."""
    like = torch.empty(0)
    if isinstance(model, nn.Module):
        tensor: Tensor | None = next(model.parameters(), None)
        if tensor is None:
            tensor = next(model.buffers(), None)
        if tensor is not None and tensor.is_floating_point():
            like = tensor
    fn = getattr(model, "log_prob", None)
    if callable(fn):
        return fn, like
    if callable(model):
        return model, like
    raise TypeError(f"model_or_log_prob_fn: expected a model with log_prob or a callable, got {type(model).__name__}")


def _scatter(ax: Axes, points: np.ndarray, bounds: _Bounds, title: str) -> None:
    n = len(points)
    alpha = float(min(1.0, max(0.15, 2000.0 / max(n, 1))))  # dense clouds stay readable, sparse ones solid
    ax.scatter(points[:, 0], points[:, 1], s=2.0, alpha=alpha, color="#1f3b73", linewidths=0, rasterized=True)
    ax.set_title(f"{title} (n={n})")
    _frame(ax, bounds)


def _frame(ax: Axes, bounds: _Bounds) -> None:
    ax.set_xlim(*bounds[0])
    ax.set_ylim(*bounds[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_density_2d(
    model_or_log_prob_fn: nn.Module | Callable[[Tensor], Tensor],
    data: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    path: str | os.PathLike[str],
    *,
    bounds: _Bounds = ((-4.0, 4.0), (-4.0, 4.0)),
    resolution: int = 200,
    batch_size: int = 10_000,
    labels: tuple[str, str] | None = None,
) -> Path:
    """Write a three-panel PNG: the data, the model's density ``p(x)`` as a heat map, and its samples.

    The density panel shows ``exp(log p(x))`` on a ``resolution x resolution`` grid
    of cell centres over ``bounds``, evaluated without gradients in chunks of
    ``batch_size`` on the model's device and dtype; a module is evaluated in
    eval mode and handed back in the mode it came in. The title reports the grid
    estimate of the probability mass inside the box,
    ``sum_cells p(x_cell) * cell_area``, which is close to 1 for a good fit whose
    data lie inside the box.

    Args:
        model_or_log_prob_fn: a model with ``log_prob`` (e.g. :class:`pyro_nf.FlowModel`)
            or a function mapping ``(m, 2)`` points to ``(m,)`` log-densities.
        data: the training or test points, shape ``(n, 2)``.
        samples: the model's samples, shape ``(k, 2)``.
        path: the PNG file to write; its folder is created if needed.
        bounds: ``((xmin, xmax), (ymin, ymax))`` of all three panels.
        resolution: grid cells per axis of the heat map (at least 2).
        batch_size: points per ``log_prob`` call.
        labels: names of the two coordinates (a CSV's column names), written on the axes.

    Returns:
        The path written. The image is ``1200 x 400`` pixels.

    Example::

        >>> import tempfile, torch
        >>> from torch.distributions import MultivariateNormal
        >>> gauss = MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = plot_density_2d(gauss, gauss.sample((500,)), gauss.sample((500,)),
        ...                           f"{folder}/fig.png", resolution=50)
        ...     out.name
        'fig.png'
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution: expected an int >= 2, got {resolution!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    (x0, x1), (y0, y1) = bounds = _check_bounds(bounds)
    data_np, samples_np = _points("data", data), _points("samples", samples)
    log_prob, like = _log_prob_fn(model_or_log_prob_fn)

    dx, dy = (x1 - x0) / resolution, (y1 - y0) / resolution
    xs = torch.linspace(x0 + dx / 2, x1 - dx / 2, resolution, dtype=torch.float64)
    ys = torch.linspace(y0 + dy / 2, y1 - dy / 2, resolution, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)
    grid = grid.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    module = model_or_log_prob_fn if isinstance(model_or_log_prob_fn, nn.Module) else None
    was_training = module is not None and module.training
    try:
        if module is not None:
            module.eval()  # batch-norm layers use their running averages and keep them
        with torch.no_grad():
            chunks = [log_prob(chunk).reshape(-1) for chunk in grid.split(batch_size)]
    finally:
        if module is not None:
            module.train(was_training)
    log_p = torch.cat(chunks).detach().cpu().to(torch.float64)
    if log_p.numel() != resolution * resolution:
        raise ValueError(
            f"model_or_log_prob_fn: expected one log-density per point ({resolution * resolution}), "
            f"got {log_p.numel()} values"
        )
    density = torch.exp(torch.nan_to_num(log_p, nan=-math.inf)).reshape(resolution, resolution).numpy()
    mass = float(density.sum() * dx * dy)

    fig = Figure(figsize=(3 * PANEL_INCHES, PANEL_INCHES), layout="constrained")
    ax_data, ax_density, ax_samples = fig.subplots(1, 3)
    _scatter(ax_data, data_np, bounds, "data")
    ax_density.imshow(density, origin="lower", extent=(x0, x1, y0, y1), cmap="magma", interpolation="nearest")
    ax_density.set_title(f"learned density (mass in box {mass:.3f})")
    _frame(ax_density, bounds)
    _scatter(ax_samples, samples_np, bounds, "samples")
    if labels is not None:
        for ax in (ax_data, ax_density, ax_samples):
            ax.set_xlabel(labels[0])
        ax_data.set_ylabel(labels[1])
    return save_figure(fig, path)


def plot_curves(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    steps: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    xlabel: str = "step",
    ylabel: str = "NLL (nats)",
    title: str | None = None,
) -> Path:
    """Write a PNG of training and validation curves, one line per entry of ``history``.

    Args:
        history: a name (``"train"``, ``"test"``, ...) to its values, in order.
        path: the PNG file to write; its folder is created if needed.
        steps: the x positions shared by all curves (each curve then has
            ``len(steps)`` values), or a name to the x positions of that curve
            (curves logged at different intervals); by default each curve is drawn
            against ``1, 2, ..., len(values)``.
        xlabel: the x-axis label.
        ylabel: the y-axis label.
        title: the figure's title.

    Returns:
        The path written. The image is ``600 x 400`` pixels.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = plot_curves({"train": [3.0, 2.0, 1.5], "test": [3.1, 2.2, 1.7]}, f"{folder}/c.png")
        ...     out.name
        'c.png'
    """
    if not isinstance(history, Mapping) or not history:
        raise ValueError(f"history: expected a non-empty mapping of name to values, got {history!r}")
    curves = {}
    for name, values in history.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"history[{name!r}]: expected a non-empty list of numbers, got shape {arr.shape}")
        at = steps.get(name) if isinstance(steps, Mapping) else steps
        if at is not None and arr.size != len(at):
            raise ValueError(f"history[{name!r}]: expected {len(at)} values (one per step), got {arr.size}")
        curves[name] = (np.asarray(at, dtype=np.float64) if at is not None else np.arange(1.0, arr.size + 1), arr)

    fig = Figure(figsize=(1.5 * PANEL_INCHES, PANEL_INCHES), layout="constrained")
    ax = fig.subplots()
    for name, (x, arr) in curves.items():
        ax.plot(x, arr, label=name, marker="." if arr.size < 50 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_pairs(
    panels: Mapping[str, Tensor | np.ndarray],
    path: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    max_features: int = 8,
    title: str | None = None,
) -> Path:
    """Write a corner plot of point sets of ``D`` features, overlaid: every pair below the diagonal, histograms on it.

    Typically the data against a model's samples. Every set is cut to the size of the
    smallest, so equal densities look equally dense; sets with ``D > max_features`` show
    their first ``max_features`` features (the title says so). ``D = 1`` is one histogram.

    Args:
        panels: a name (``"data"``, ``"samples"``) to its points, shape ``(n, D)``, all with the same ``D``.
        path: the PNG file to write; its folder is created if needed.
        columns: the names of the ``D`` features (a CSV's header); default ``feature 1 .. D``.
        max_features: the most features drawn.
        title: the figure's title (the point count and any cut are added).

    Returns:
        The path written (``160 k`` pixels square for ``k`` features drawn, at least 400).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = plot_pairs({"data": np.random.randn(50, 3), "samples": np.random.randn(80, 3)},
        ...                      f"{folder}/pairs.png", columns=["a", "b", "c"])
        ...     out.name
        'pairs.png'
    """
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError(f"panels: expected a non-empty mapping of name to (n, D) points, got {panels!r}")
    _positive_int("max_features", max_features)
    sets = {name: _points(f"panels[{name!r}]", points, None) for name, points in panels.items()}
    dims = {points.shape[1] for points in sets.values()}
    if len(dims) != 1:
        raise ValueError(f"panels: expected the same number of features in every set, got {sorted(dims)}")
    dim = dims.pop()
    names = [f"feature {i + 1}" for i in range(dim)] if columns is None else [str(c) for c in columns]
    if len(names) != dim:
        raise ValueError(f"columns: expected {dim} names, got {len(names)}")
    n = min(len(points) for points in sets.values())
    k = min(dim, max_features)
    fig = Figure(figsize=(max(PANEL_INCHES, 1.6 * k),) * 2, layout="constrained")
    axes = fig.subplots(k, k, squeeze=False)
    colors, alpha = ("#1f3b73", "#c0392b", "#27ae60", "#8e44ad"), float(min(0.8, max(0.05, 500.0 / n)))
    for i in range(k):
        for j in range(k):
            ax = axes[i][j]
            if j > i:
                ax.set_visible(False)
                continue
            for c, (name, points) in enumerate(sets.items()):
                color = colors[c % len(colors)]  # the same colour for a set in every panel
                if i == j:
                    ax.hist(points[:n, i], bins=40, histtype="step", color=color, density=True, label=name)
                else:
                    ax.scatter(points[:n, j], points[:n, i], s=1.0, alpha=alpha, color=color, linewidths=0)
            ax.tick_params(labelsize=6)
            if i == k - 1:
                ax.set_xlabel(names[j])
            if j == 0 and i > 0:
                ax.set_ylabel(names[i])
    axes[0][0].legend(fontsize=7)
    heading = f"{title} ({n} points each)" if title is not None else f"{n} points each"
    if k < dim:
        heading += f", the first {k} of {dim} features"
    fig.suptitle(heading)
    return save_figure(fig, path)


def _images(name: str, images: Tensor | np.ndarray) -> np.ndarray:
    """Validate a ``(N, C, H, W)`` batch of images and return it as a NumPy array."""
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    elif not isinstance(images, np.ndarray):
        raise TypeError(f"{name}: expected a Tensor or ndarray of shape (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: expected shape (N, C, H, W), got {tuple(images.shape)}")
    return images


def _positive_int(name: str, value: int, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")


def tile_images(images: Tensor | np.ndarray, per_row: int) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images into one canvas, ``per_row`` to a row, one pixel apart.

    The gaps and the empty cells of the last row take the largest pixel value
    (at least 0). A one-channel canvas is ``(rows * (H + 1), per_row * (W + 1))``;
    otherwise the channels come last, as :meth:`matplotlib.axes.Axes.imshow` wants.

    Args:
        images: the images, shape ``(N, C, H, W)``.
        per_row: images per row of the canvas.

    Returns:
        The canvas, a float64 array.

    Example::

        >>> tile_images(np.zeros((5, 1, 2, 2)), per_row=4).shape
        (6, 12)
    """
    images = _images("images", images)
    _positive_int("per_row", per_row)
    n, c, h, w = images.shape
    rows = math.ceil(n / per_row)
    canvas = np.ones((rows * (h + 1), per_row * (w + 1), c)) * images.max(initial=0)
    for i, image in enumerate(images):
        r, col = divmod(i, per_row)
        canvas[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image.transpose(1, 2, 0)
    return canvas[..., 0] if c == 1 else canvas


def plot_image_grids(
    panels: Mapping[str, Tensor | np.ndarray],
    path: str | os.PathLike[str],
    *,
    n_levels: int = 256,
    per_row: int = 8,
) -> Path:
    """Write a PNG of image grids side by side, one titled panel per entry of ``panels``.

    Typically the data beside a flow's samples at several temperatures (the base
    noise scaled by ``T``, as in the Glow paper). Each panel tiles its images
    with :func:`tile_images` and shows pixel levels ``0 .. n_levels - 1`` in grey,
    black to white.

    Args:
        panels: a title to its images, shape ``(N, C, H, W)``, in pixel levels.
        path: the PNG file to write; its folder is created if needed.
        n_levels: the number of pixel levels (256 for 8-bit images).
        per_row: images per row of each grid.

    Returns:
        The path written. The image is ``300 * len(panels)`` by 330 pixels.

    Example::

        >>> import tempfile
        >>> images = torch.randint(0, 17, (16, 1, 8, 8)).float()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = plot_image_grids({"data": images, "T = 1": images}, f"{folder}/g.png", n_levels=17, per_row=4)
        ...     out.name
        'g.png'
    """
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError(f"panels: expected a non-empty mapping of title to images, got {panels!r}")
    _positive_int("n_levels", n_levels, least=2)
    _positive_int("per_row", per_row)
    grids = {title: tile_images(_images(f"panels[{title!r}]", images), per_row) for title, images in panels.items()}
    fig = Figure(figsize=(3 * len(grids), 3.3), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (title, grid) in zip(axes, grids.items()):
        ax.imshow(grid / (n_levels - 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    return save_figure(fig, path)
