"""Preprocessing of discrete images for flows: n-bit reduction, dequantization, scaling, logit.

Images come as integers ``x`` in ``{0, ..., K - 1}`` (``K = n_levels``, 256 for
8-bit images, 17 for the scikit-learn digits). A flow models a continuous
density, so the data are

1. optionally reduced to ``n`` bits (Glow's 5-bit CelebA-HQ): :func:`reduce_bits`;
2. *dequantized* with uniform noise and scaled to the unit cube,
   ``y = (x + u) / K`` with ``u ~ U[0, 1)^D`` (:func:`dequantize`);
3. mapped to the flow's space by a bijection whose log-det enters the density:
   either a shift, ``y = z + 1/2`` (Glow; Pyro's
   ``AffineTransform(0.5, 1.0, event_dim=3)``, log-det 0), or RealNVP's logit
   transform :class:`Logit`.

Put the step-3 transform *after* the flow in the transform list, so the
model's ``log_prob`` is the density of ``y`` on ``[0, 1)^D`` with every log-det
counted; :func:`pyro_nf.metrics.bits_per_dim` turns it into bits per dimension
of the discrete data (``-log P(x) <= -log p(y) + D log K`` on average over ``u``).

Example::

    >>> import pyro.distributions as dist
    >>> from torch.distributions import AffineTransform
    >>> from pyro_nf.metrics import bits_per_dim
    >>> from pyro_nf.transforms import glow
    >>> x = torch.randint(0, 17, (4, 1, 8, 8))
    >>> flow = glow((1, 8, 8), levels=2, depth=1, hidden_channels=8)
    >>> base = dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3)
    >>> model = dist.TransformedDistribution(base, [flow, AffineTransform(0.5, 1.0, event_dim=3)])
    >>> bits_per_dim(model.log_prob(dequantize(x, 17)), (1, 8, 8), 17).shape
    torch.Size([4])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import constraints

from pyro_nf.checks import validation_enabled
from pyro_nf.core import FlowTransformModule

__all__ = [
    "reduce_bits",
    "dequantize",
    "logit",
    "Logit",
    "quantize",
]


def _check_levels(x: Tensor, n_levels: int, name: str) -> None:
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels: expected an int >= 2, got {n_levels!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: expected integer pixel values, got dtype {x.dtype}")
    if x.numel() and validation_enabled():
        if x.dtype.is_floating_point and not bool((x == x.round()).all()):
            raise ValueError(f"{name}: expected integer pixel values, got non-integer floats")
        low, high = x.min().item(), x.max().item()
        if low < 0 or high > n_levels - 1:
            raise ValueError(
                f"{name}: expected values in 0 .. {n_levels - 1} (n_levels = {n_levels}), got {low} .. {high}"
            )


def reduce_bits(x: Tensor, n_bits: int, from_bits: int = 8) -> Tensor:
    """Glow's n-bit reduction: ``floor(x / 2^(from_bits - n_bits))``, values in ``0 .. 2^n_bits - 1``.

    Example::

        >>> reduce_bits(torch.tensor([0, 7, 8, 255]), 5).tolist()
        [0, 0, 1, 31]
    """
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= from_bits:
        raise ValueError(f"n_bits: expected an int in 1 .. {from_bits}, got {n_bits!r}")
    _check_levels(x, 2**from_bits, "x")
    return torch.div(x, 2 ** (from_bits - n_bits), rounding_mode="floor")


def dequantize(x: Tensor, n_levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization to the unit cube: ``(x + u) / n_levels`` with ``u ~ U[0, 1)``.

    Args:
        x: integer pixel values in ``0 .. n_levels - 1`` (any integer or float dtype).
        n_levels: number of levels ``K``.
        generator: optional random generator for the noise.

    Returns:
        A float tensor (the default dtype, or ``x``'s float dtype) in ``[0, 1)``.

    Example::

        >>> y = dequantize(torch.tensor([0, 16]), 17)
        >>> bool((y[0] >= 0) & (y[0] < 1 / 17)), bool((y[1] >= 16 / 17) & (y[1] < 1))
        (True, True)
    """
    _check_levels(x, n_levels, "x")
    dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
    noise = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    return (x.to(dtype) + noise) / n_levels


def quantize(y: Tensor, n_levels: int) -> Tensor:
    """Back from the unit cube to integer levels: ``clamp(floor(y K), 0, K - 1)`` (for showing samples).

    Example::

        >>> quantize(torch.tensor([-0.1, 0.5, 1.2]), 17).tolist()
        [0, 8, 16]
    """
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels: expected an int >= 2, got {n_levels!r}")
    return (y * n_levels).floor().clamp(0, n_levels - 1).long()


class Logit(FlowTransformModule):
    """RealNVP's logit transform, as the last transform of a flow (base to data).

    The data ``y`` in ``[0, 1]`` are mapped to the real line by
    ``z = logit(alpha + (1 - 2 alpha) y)`` (the inverse); the forward map is
    ``y = (sigmoid(z) - alpha) / (1 - 2 alpha)`` with

    .. math::

        \\log|\\det \\partial y / \\partial z| = \\sum \\big(\\log\\sigma(z) + \\log\\sigma(-z)\\big)
            - D \\log(1 - 2\\alpha).

    ``alpha`` keeps the logit away from 0 and 1 (0.05 for CIFAR-10 in the paper,
    1e-6 for MNIST in MAF).

    Args:
        input_shape: the event shape (``(C, H, W)`` for images).
        alpha: the margin, in ``[0, 0.5)``.

    Example::

        >>> t = Logit((1, 2, 2), alpha=0.05)
        >>> y = torch.rand(3, 1, 2, 2)
        >>> torch.allclose(t(t.inv(y)), y, atol=1e-6)
        True
    """

    parallel = "both"

    def __init__(self, input_shape: Sequence[int], alpha: float = 0.05, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        shape = tuple(input_shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"input_shape: expected a non-empty shape of positive ints, got {input_shape!r}")
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha: expected a number in [0, 0.5), got {alpha!r}")
        self.input_shape = shape
        self.alpha = float(alpha)
        self.domain = constraints.independent(constraints.real, len(shape))
        self.codomain = constraints.independent(constraints.real, len(shape))
        self.register_buffer("_reference", torch.zeros(0), persistent=False)

    def _sum(self, v: Tensor) -> Tensor:
        return v.flatten(-len(self.input_shape)).sum(-1)  # type: ignore[arg-type]

    def _log_det(self, z: Tensor) -> Tensor:
        d = math.prod(self.input_shape)  # type: ignore[arg-type]
        return self._sum(F.logsigmoid(z) + F.logsigmoid(-z)) - d * math.log1p(-2 * self.alpha)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha), self._log_det(x)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * y
        if validation_enabled() and bool(((s <= 0) | (s >= 1)).any()):
            raise ValueError(
                f"Logit inverse input: expected values in ({-self.alpha / (1 - 2 * self.alpha):.4g}, "
                f"{(1 - self.alpha) / (1 - 2 * self.alpha):.4g}) (data scaled to [0, 1]), "
                f"got {y.min().item():.4g} .. {y.max().item():.4g}"
            )
        z = torch.logit(s)
        return z, self._log_det(z)


def logit(input_shape: Sequence[int], alpha: float = 0.05) -> Logit:
    """A :class:`Logit` transform over events of shape ``input_shape``."""
    return Logit(input_shape, alpha)
