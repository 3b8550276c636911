"""Metrics for density models: bits per dimension of discrete images.

For discrete data ``x`` in ``{0, ..., K - 1}^D`` dequantized to
``y = (x + u) / K`` on the unit cube, the density ``p(y)`` of a model on
``[0, 1)^D`` (every preprocessing log-det included, see
:mod:`pyro_nf.transforms.preprocess`) bounds the discrete likelihood,
``-log P(x) <= E_u[-log p(y) + D log K]``. The papers (RealNVP, Glow, MAF,
FFJORD) report that bound per dimension in bits:

.. math::

    \\text{bits/dim} = \\frac{-\\log p(y) + D \\log K}{D \\log 2}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def _num_dims(event: int | Sequence[int]) -> int:
    if isinstance(event, int) and not isinstance(event, bool):
        dims = event
    elif isinstance(event, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in event):
        dims = math.prod(event)
    else:
        raise ValueError(f"event: expected the number of dimensions D or the event shape, got {event!r}")
    if dims < 1:
        raise ValueError(f"event: expected at least one dimension, got {event!r}")
    return dims


def bits_per_dim(log_prob: Tensor, event: int | Sequence[int], n_levels: int) -> Tensor:
    """Bits per dimension ``(-log p(y) + D log K) / (D log 2)`` from log-densities on the unit cube.

    Args:
        log_prob: ``log p(y)`` (nats) of dequantized data ``y = (x + u) / K`` in ``[0, 1)^D``,
            any shape (one value per image).
        event: ``D``, or the event shape (``(C, H, W)``) whose product is ``D``.
        n_levels: number of discrete levels ``K`` of the raw data (256 for 8 bits).

    Example: the uniform density on the unit cube gives ``log2 K`` bits::

        >>> import torch
        >>> bits_per_dim(torch.zeros(2), (3, 32, 32), 256).tolist()
        [8.0, 8.0]
    """
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels: expected an int >= 2, got {n_levels!r}")
    if not isinstance(log_prob, Tensor):
        raise TypeError(f"log_prob: expected a torch.Tensor, got {type(log_prob).__name__}")
    d = _num_dims(event)
    return (-log_prob + d * math.log(n_levels)) / (d * math.log(2.0))
