"""The 2D toy densities: shapes, determinism, errors, and each dataset's defining geometry."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_nf.data import TOY_DATASETS, sample_toy

N = 5000


def draw(name: str, n: int = N, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return sample_toy(name, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_balanced(labels: torch.Tensor, k: int) -> None:
    """Each of ``k`` equiprobable components holds its share of points (within 5 binomial sds)."""
    counts = torch.bincount(labels, minlength=k).double()
    n = labels.numel()
    sd = math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert counts.numel() == k
    assert (counts - n / k).abs().max() < 5 * sd, counts.tolist()


def test_names() -> None:
    assert set(TOY_DATASETS) == {"moons", "circles", "8gaussians", "pinwheel", "2spirals", "checkerboard", "rings"}


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_scale(name: str, dtype: torch.dtype) -> None:
    x = sample_toy(name, 2000, generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert x.shape == (2000, 2) and x.dtype == dtype
    assert torch.isfinite(x).all()
    # FFJORD's scale: everything fits the [-4, 4]^2 plotting box (up to noise tails), centred near 0.
    assert x.abs().max() < 4.6
    assert x.mean(0).abs().max() < 0.4
    assert ((x.std(0) > 0.9) & (x.std(0) < 2.5)).all()
    assert sample_toy(name, 1).shape == (1, 2)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_deterministic_given_generator(name: str) -> None:
    a, b, c = draw(name, 300, seed=3), draw(name, 300, seed=3), draw(name, 300, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # Same generator state, other dtype: the same points up to float32 rounding.
    torch.testing.assert_close(draw(name, 300, seed=3, dtype=torch.float32), a.float())
    # Without a generator it draws from torch's global one, so manual_seed makes it reproducible.
    torch.manual_seed(7)
    d = sample_toy(name, 50)
    torch.manual_seed(7)
    assert torch.equal(d, sample_toy(name, 50))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"moons, circles, 8gaussians.*got 'swissroll'"):
        sample_toy("swissroll", 10)
    for n in (0, -3):
        with pytest.raises(ValueError, match=f"positive number of points, got {n}"):
            sample_toy("moons", n)
    with pytest.raises(TypeError, match="n: expected an int, got float"):
        sample_toy("moons", 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        sample_toy("moons", 10, dtype=torch.int64)
    with pytest.raises(TypeError, match="generator"):
        sample_toy("moons", 10, generator=0)  # type: ignore[arg-type]


def test_moons_two_half_circles() -> None:
    u = (draw("moons") - torch.tensor([-1.0, -0.2], dtype=torch.float64)) / 2  # undo FFJORD's affine map
    t = torch.linspace(0, math.pi, 2000, dtype=torch.float64)
    upper = torch.stack([torch.cos(t), torch.sin(t)], -1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)
    dist = torch.stack([torch.cdist(u, upper).min(1).values, torch.cdist(u, lower).min(1).values], -1)
    nearest, which = dist.min(1)
    assert_balanced(which, 2)
    # Noise 0.1 per coordinate: the distance to the curve is |N(0, 0.1^2)| away from the arc ends.
    assert nearest.max() < 0.5
    assert 0.06 < nearest.median() < 0.075  # the median of |N(0, 0.1^2)| is 0.0674


def test_circles_two_radii() -> None:
    r = draw("circles").norm(dim=-1)
    outer = r > 2.25
    assert_balanced(outer.long(), 2)
    assert abs(r[outer].median() - 3.0) < 0.05 and abs(r[~outer].median() - 1.5) < 0.05
    residual = torch.where(outer, r - 3.0, r - 1.5)
    assert abs(residual.std() - 0.24) < 0.02  # Gaussian noise 3 * 0.08 across the circles


def test_eight_gaussians_modes() -> None:
    x = draw("8gaussians")
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centers = (4 / math.sqrt(2)) * torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    which = torch.cdist(x, centers).argmin(1)
    assert_balanced(which, 8)
    residual = x - centers[which]
    expected_std = torch.full((2,), 0.5 / math.sqrt(2), dtype=torch.float64)
    torch.testing.assert_close(residual.std(0), expected_std, atol=0.015, rtol=0)
    assert residual.mean(0).abs().max() < 0.03


def test_pinwheel_five_curved_arms() -> None:
    x = draw("pinwheel")
    r, phi = x.norm(dim=-1), torch.atan2(x[:, 1], x[:, 0])
    # A point on arm k at radius r sits at angle -(2 pi k / 5 + 0.25 exp(r / 2)) up to the tangential noise.
    unwound = phi + 0.25 * torch.exp(r / 2)
    assert torch.exp(5j * unwound).mean().real > 0.75  # zero for a rotation-invariant density
    arm = torch.round(-unwound / (2 * math.pi / 5)).long().remainder(5)
    assert_balanced(arm, 5)
    assert abs(r.median() - 2.0) < 0.1  # radial part N(1, 0.3^2), scaled by 2


def test_two_spirals_winding() -> None:
    x = draw("2spirals")
    r, phi = x.norm(dim=-1), torch.atan2(x[:, 1], x[:, 0])
    # Arm points (-t cos t, t sin t) / 3 and their mirror images: angle = -t (mod pi) with t = 3 r.
    assert torch.exp(2j * (phi + 3 * r)).mean().real > 0.5  # zero for a rotation-invariant density
    assert abs(r.max() - math.pi) < 0.6  # 1.5 turns: t up to 3 pi, radius up to about pi
    torch.testing.assert_close(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.08, rtol=0)


def test_checkerboard_squares() -> None:
    x = draw("checkerboard")
    assert (x >= -4).all() and (x < 4).all()
    cell = torch.floor(x / 2).long()
    assert ((cell[:, 0] + cell[:, 1]).remainder(2) == 0).all()  # only the "black" squares
    black = ((cell[:, 0] + 2) * 4 + (cell[:, 1] + 2)) // 2  # 8 black squares -> 0..7
    assert_balanced(black, 8)
    # Uniform inside each square: offsets within a square have mean 1 and variance 4/12.
    offset = x - 2 * cell
    torch.testing.assert_close(offset.mean(0), torch.ones(2, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(offset.var(0), torch.full((2,), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0)


def test_rings_four_radii() -> None:
    r = draw("rings").norm(dim=-1)
    radii = torch.tensor([0.75, 1.5, 2.25, 3.0], dtype=torch.float64)
    which = (r[:, None] - radii).abs().argmin(1)
    assert_balanced(which, 4)
    residual = r - radii[which]
    assert abs(residual.std() - 0.08) < 0.01  # Gaussian noise 0.08: the radial residual is about N(0, 0.08^2)
    assert residual.abs().max() < 0.375  # every point is nearer its own ring than the midpoint to the next
