"""The element-wise affine map shared by autoregressive and coupling layers.

A conditioner network gives raw values ``(a, b)`` per element; they become a
shift ``mu`` and a log-scale ``alpha`` and the map is ``y = x * exp(alpha) + mu``.
Two ways to keep the scale stable:

- ``"softclamp"`` (default): ``alpha = B * tanh(b / B)``. Smooth, centred at 0,
  and free to expand or to contract up to ``exp(±B)`` per layer.
- ``"gate"``: the gated update of the IAF paper, ``y = s * x + (1 - s) * a`` with
  ``s = sigmoid(b + 2)``, i.e. ``alpha = log s`` and ``mu = (1 - s) * a``. It can
  only contract in the forward direction; prefer ``"softclamp"`` for densities.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Scale = Literal["softclamp", "gate"]
SCALES: tuple[Scale, ...] = ("softclamp", "gate")


def check_scale(scale: str, bound: float) -> None:
    """Validate the scale options (``ValueError`` naming the choices)."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    if not bound > 0:
        raise ValueError(f"log_scale_bound: expected a positive number, got {bound!r}")


def shift_and_log_scale(a: Tensor, b: Tensor, scale: Scale, bound: float) -> tuple[Tensor, Tensor]:
    """Turn raw conditioner outputs into ``(mu, alpha)`` for ``y = x * exp(alpha) + mu``."""
    if scale == "softclamp":
        return a, bound * (b / bound).tanh()
    log_s = F.logsigmoid(b + 2.0)
    return (1.0 - log_s.exp()) * a, log_s
