"""PNG figures: valid files of the documented size, the density drawn the right way round, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch.distributions import MultivariateNormal

import pyro_nf
from pyro_nf.plotting import plot_curves, plot_density_2d, plot_image_grids, tile_images
from pyro_nf.transforms import maf

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def only_file(folder: Path) -> Path:
    """The folder holds exactly one file: no temporary file was left behind."""
    files = list(folder.iterdir())
    assert len(files) == 1, files
    return files[0]


def test_density_panels_size_and_orientation(tmp_path: Path) -> None:
    # A narrow Gaussian at (2, 1): the brightest heat-map pixel must be right of and above the centre.
    gauss = MultivariateNormal(torch.tensor([2.0, 1.0]), 0.1 * torch.eye(2))
    pts = gauss.sample((300,))
    out = plot_density_2d(gauss.log_prob, pts, pts, tmp_path / "fig.png", resolution=80)
    assert out == tmp_path / "fig.png" and only_file(tmp_path) == out
    img = read_png(out)
    assert img.shape == (400, 1200, 4)
    middle = img[:, 400:800, :3].mean(-1)
    left, right = img[:, :400, :3].mean(-1), img[:, 800:, :3].mean(-1)
    # The same points in the data and the sample panel: identical below the titles.
    np.testing.assert_allclose(left[40:], right[40:], atol=0.02)
    assert left[40:].min() < 0.5  # and the points were drawn
    # The heat map fills an axes box centred in its panel; find the hot spot relative to the dark box.
    dark = middle < 0.1
    rows, cols = np.nonzero(dark.mean(1) > 0.5)[0], np.nonzero(dark.mean(0) > 0.5)[0]  # skips the title's text
    top, bottom, lo, hi = rows.min(), rows.max(), cols.min(), cols.max()
    assert bottom - top > 300 and hi - lo > 300
    box = middle[top : bottom + 1, lo : hi + 1]
    r, c = np.unravel_index(np.argmax(box), box.shape)
    # x = 2 is 3/4 across [-4, 4]; y = 1 is 5/8 up, i.e. 3/8 down from the top row.
    assert abs(c / box.shape[1] - 0.75) < 0.03
    assert abs(r / box.shape[0] - 0.375) < 0.03


def test_density_of_a_flow_model(tmp_path: Path) -> None:
    model = pyro_nf.FlowModel(maf(2, hidden_dims=[8], num_transforms=2), (2,)).double()
    data = torch.randn(100, 2)
    samples = model.sample((100,))
    out = plot_density_2d(model, data.numpy(), samples, tmp_path / "sub" / "model.png", resolution=30, batch_size=64)
    assert read_png(out).shape == (400, 1200, 4)
    # Overwriting an existing file replaces it and leaves no temporary file.
    plot_density_2d(model, data, samples, out, resolution=20)
    assert only_file(tmp_path / "sub") == out


def test_model_state_untouched(tmp_path: Path) -> None:
    # Scoring the grid must not update batch-norm running averages or change the train/eval mode.
    model = pyro_nf.FlowModel(maf(2, hidden_dims=[8], num_transforms=2, batch_norm=True), (2,))
    model.log_prob(3 + torch.randn(64, 2)).mean().backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(50, 2)
    plot_density_2d(model, x, x, tmp_path / "bn.png", resolution=10)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_curves(tmp_path: Path) -> None:
    out = plot_curves({"train": [3.0, 2.5, 2.4], "test": [3.2, 2.6, 2.5]}, tmp_path / "c.png", steps=[10, 20, 30])
    assert read_png(out).shape == (400, 600, 4)
    # Curves of different lengths are fine without shared steps.
    assert read_png(plot_curves({"a": [1.0, 0.5], "b": [2.0]}, tmp_path / "d.png")).shape == (400, 600, 4)


def test_bad_arguments(tmp_path: Path) -> None:
    gauss = MultivariateNormal(torch.zeros(2), torch.eye(2))
    x = torch.randn(10, 2)
    path = tmp_path / "f.png"
    with pytest.raises(ValueError, match=r"data: expected shape \(n, 2\), got \(10, 3\)"):
        plot_density_2d(gauss, torch.randn(10, 3), x, path)
    with pytest.raises(TypeError, match="samples: expected a Tensor or ndarray"):
        plot_density_2d(gauss, x, [[0.0, 0.0]], path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution"):
        plot_density_2d(gauss, x, x, path, resolution=1)
    with pytest.raises(ValueError, match="bounds"):
        plot_density_2d(gauss, x, x, path, bounds=((1.0, -1.0), (0.0, 1.0)))
    with pytest.raises(ValueError, match="one log-density per point"):
        plot_density_2d(lambda p: p, x, x, path, resolution=4)
    with pytest.raises(TypeError, match="model_or_log_prob_fn"):
        plot_density_2d(3, x, x, path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"history\['test'\]: expected 2 values"):
        plot_curves({"train": [1.0, 2.0], "test": [1.0]}, path, steps=[1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        plot_curves({}, path)
    assert not any(tmp_path.iterdir())


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "taken.png"
    target.mkdir()  # a folder where the file should go: the final rename fails
    with pytest.raises(OSError):
        plot_curves({"train": [1.0, 0.5]}, target)
    assert only_file(tmp_path) == target and not any(target.iterdir())


def test_image_grids(tmp_path: Path) -> None:
    images = torch.zeros(5, 1, 3, 2)
    images[0, 0, 0, 0] = 16.0  # one white pixel, top left of the first image
    canvas = tile_images(images, per_row=4)
    assert canvas.shape == (2 * 4, 4 * 3)
    assert canvas[0, 0] == 16.0 and canvas[0, 1] == 0.0
    assert (canvas[3, :] == 16.0).all() and (canvas[4:, 3:] == 16.0).all()  # gutters and empty cells: the maximum
    assert tile_images(np.zeros((2, 3, 4, 4)), per_row=2).shape == (5, 10, 3)
    out = plot_image_grids({"data": images, "T = 0.5": images, "T = 1": images}, tmp_path / "g.png", n_levels=17)
    assert out == tmp_path / "g.png" and only_file(tmp_path) == out
    assert read_png(out).shape == (330, 900, 4)
    one = plot_image_grids({"data": images}, tmp_path / "one" / "g.png", n_levels=17, per_row=2)
    assert read_png(one).shape == (330, 300, 4)
    with pytest.raises(ValueError, match="panels: expected a non-empty mapping"):
        plot_image_grids({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"panels\['data'\]: expected shape \(N, C, H, W\), got \(5, 3, 2\)"):
        plot_image_grids({"data": images[:, 0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="n_levels: expected an int >= 2, got 1"):
        plot_image_grids({"data": images}, tmp_path / "x.png", n_levels=1)
    with pytest.raises(ValueError, match="per_row: expected an int >= 1, got 0"):
        tile_images(images, per_row=0)
    with pytest.raises(TypeError, match="images: expected a Tensor or ndarray"):
        tile_images([[0.0]], per_row=1)  # type: ignore[arg-type]
