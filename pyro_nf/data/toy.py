"""Procedural 2D toy densities, as used in the FFJORD paper's figures.

Each dataset is a fixed density on the plane, sampled i.i.d. in torch (no
scikit-learn at run time): mixture components are drawn at random per point,
so any ``n`` gives an honest sample rather than a fixed layout. Scales follow
the FFJORD reference code, so every dataset lies within about ``[-4, 4]^2``
with per-coordinate standard deviations between about 1 and 2.5, and the
same plotting box fits them all.

- ``moons``: two interleaved half circles (``sklearn.datasets.make_moons`` with
  noise 0.1), scaled by 2 and shifted by ``(-1, -0.2)``.
- ``circles``: two concentric circles of radii 3 and 1.5, Gaussian noise 0.24.
- ``8gaussians``: eight Gaussians of std ``0.5 / sqrt(2)`` at radius ``4 / sqrt(2)``
  on the axes and diagonals.
- ``pinwheel``: five curved arms; radial part ``N(1, 0.3^2)``, tangential part
  ``N(0, 0.1^2)``, rotated by ``0.25 exp(radial)``, scaled by 2.
- ``2spirals``: two interleaved spirals of 1.5 turns, Gaussian noise 0.1.
- ``checkerboard``: uniform on the eight "black" squares of side 2 of a 4 x 4 board
  covering ``[-4, 4]^2`` (squares with ``floor(x/2) + floor(y/2)`` even).
- ``rings``: four concentric circles of radii 3, 2.25, 1.5 and 0.75, Gaussian noise 0.08.

Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019 (datasets from its ``lib/toy_data.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TOY_DATASETS", "sample_toy"]

_Sampler = Callable[[int, torch.Generator | None, torch.device], Tensor]
_F64 = torch.float64


def _uniform(n: int, g: torch.Generator | None, device: torch.device, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g, dtype=_F64, device=device)


def _normal(n: int, g: torch.Generator | None, device: torch.device, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=g, dtype=_F64, device=device)


def _labels(n: int, k: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    """Equiprobable component labels in ``{0, ..., k-1}``."""
    return torch.randint(k, (n,), generator=g, device=device)


def _moons(n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    angle = math.pi * _uniform(n, g, device)
    upper = _labels(n, 2, g, device) == 0
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], dim=-1) + 0.1 * _normal(n, g, device, 2)
    return 2.0 * points + torch.tensor([-1.0, -0.2], dtype=_F64, device=device)


def _circles(n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    angle = 2.0 * math.pi * _uniform(n, g, device)
    radius = torch.where(_labels(n, 2, g, device) == 0, 1.0, 0.5).to(_F64)
    points = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return 3.0 * (points + 0.08 * _normal(n, g, device, 2))


def _eight_gaussians(n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    angle = (math.pi / 4.0) * _labels(n, 8, g, device).to(_F64)
    centers = 4.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return (centers + 0.5 * _normal(n, g, device, 2)) / math.sqrt(2.0)


def _pinwheel(n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    arms, rate = 5, 0.25
    feats = _normal(n, g, device, 2) * torch.tensor([0.3, 0.1], dtype=_F64, device=device)
    feats[:, 0] += 1.0
    angle = (2.0 * math.pi / arms) * _labels(n, arms, g, device).to(_F64) + rate * torch.exp(feats[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Row vector times the rotation [[cos, -sin], [sin, cos]].
    x = feats[:, 0] * cos + feats[:, 1] * sin
    y = -feats[:, 0] * sin + feats[:, 1] * cos
    return 2.0 * torch.stack([x, y], dim=-1)


def _two_spirals(n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    t = torch.sqrt(_uniform(n, g, device)) * (3.0 * math.pi)  # 540 degrees
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=-1) + 0.5 * _uniform(n, g, device, 2)
    sign = torch.where(_labels(n, 2, g, device) == 0, 1.0, -1.0).to(_F64)
    return sign[:, None] * arm / 3.0 + 0.1 * _normal(n, g, device, 2)


def _checkerboard(n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    x1 = 4.0 * _uniform(n, g, device) - 2.0
    x2 = _uniform(n, g, device) - 2.0 * _labels(n, 2, g, device).to(_F64) + torch.floor(x1).remainder(2.0)
    return 2.0 * torch.stack([x1, x2], dim=-1)


def _rings(n: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    angle = 2.0 * math.pi * _uniform(n, g, device)
    radius = 0.25 * (_labels(n, 4, g, device) + 1).to(_F64)
    points = 3.0 * radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return points + 0.08 * _normal(n, g, device, 2)


_SAMPLERS: dict[str, _Sampler] = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
}

TOY_DATASETS: tuple[str, ...] = tuple(_SAMPLERS)
"""The names :func:`sample_toy` accepts."""


def sample_toy(
    name: str,
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` i.i.d. points from the 2D toy density ``name``.

    Points are computed in float64 and cast to ``dtype``, so one generator state
    gives the same points (up to rounding) in every floating dtype. They are
    made on the generator's device (the CPU when ``generator`` is None, which
    draws from torch's global generator).

    Args:
        name: one of :data:`TOY_DATASETS`.
        n: number of points, at least 1.
        generator: the random generator; the same state gives the same points.
        dtype: a floating-point dtype of the result.

    Returns:
        A tensor of shape ``(n, 2)``.

    Raises:
        ValueError: for an unknown ``name`` or ``n < 1``.
        TypeError: for a non-integer ``n`` or a non-floating ``dtype``.

    Example::

        >>> x = sample_toy("moons", 500, generator=torch.Generator().manual_seed(0))
        >>> x.shape, x.dtype
        (torch.Size([500, 2]), torch.float32)
        >>> torch.equal(x, sample_toy("moons", 500, generator=torch.Generator().manual_seed(0)))
        True
    """
    if name not in _SAMPLERS:
        raise ValueError(f"name: expected one of {', '.join(TOY_DATASETS)}; got {name!r}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected a positive number of points, got {n}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else torch.device("cpu")
    return _SAMPLERS[name](n, generator, device).to(dtype)
