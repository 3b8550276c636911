"""Element-wise maps: the one-dimensional bijections that coupling and autoregressive layers apply.

A coupling or autoregressive layer computes, for every element ``x_i`` of the part it
transforms, raw parameters ``theta_i`` from a network (of the kept half, or of the
elements before ``i``) and applies a monotonic one-dimensional map

.. math::

    y_i = g(x_i; \\theta_i), \\qquad
    \\log|\\det \\partial y / \\partial x| = \\textstyle\\sum_i \\log g'(x_i; \\theta_i).

The layer (the *skeleton*, :mod:`pyro_nf.transforms.coupling` and
:mod:`pyro_nf.transforms.autoregressive`) owns the network and the bookkeeping; the
map owns only the arithmetic of ``g``, its inverse and its log-derivative, so a new
family of flows is a new map. Every map follows :class:`ElementwiseMap`:

- ``num_params``: the number ``P`` of raw parameters per element;
- ``forward(x, params)`` and ``inverse(y, params)``: ``params`` is a sequence of ``P``
  tensors whose shapes broadcast against the input's (a tuple, or a tensor of shape
  ``(P, *s)``: parameter ``p`` of every element is ``params[p]``); both return the output
  and ``log g'`` element-wise (at the input of ``g``, so the two directions return the
  same value for one pair);
- all raw parameters zero give the identity, so layers with zero-initialised network
  heads start at the identity;
- ``volume_preserving``: ``log g' = 0`` for every input (the additive map), which lets a
  layer skip the sum.

The maps here are :class:`AffineMap` (RealNVP, MAF, IAF, Glow) and :class:`AdditiveMap`
(NICE, Glow's additive coupling); :mod:`pyro_nf.transforms.rational_quadratic` holds the
rational-quadratic spline of neural spline flows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

import torch.nn.functional as F
from torch import Tensor

from pyro_nf.checks import check_choice

__all__ = [
    "ElementwiseMap",
    "AffineMap",
    "AffineOptions",
    "AdditiveMap",
    "Params",
    "LOG_SCALE_BOUND",
    "check_scale",
    "shift_and_log_scale",
    "affine_map",
]

Scale = Literal["softclamp", "gate"]
SCALES: tuple[Scale, ...] = ("softclamp", "gate")
Params = Sequence[Tensor] | Tensor
"""The raw parameters of an element-wise map: ``params[p]`` is parameter ``p`` of every element."""
LOG_SCALE_BOUND = 3.0
"""The default bound ``B`` of the soft clamp ``alpha = B tanh(b / B)`` of every affine layer."""


@runtime_checkable
class ElementwiseMap(Protocol):
    """A monotonic element-wise bijection ``y = g(x; theta)`` with ``P`` raw parameters per element."""

    @property
    def num_params(self) -> int:
        """``P``, the raw parameters per element (read-only: the maps are frozen dataclasses)."""
        ...

    @property
    def volume_preserving(self) -> bool:
        """Whether ``log g' = 0`` for every input."""
        ...

    def forward(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """``(g(x; theta), log g'(x; theta))``, element-wise; ``params[p]`` is raw parameter ``p``."""
        ...

    def inverse(self, y: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """``(x, log g'(x; theta))`` with ``x = g^{-1}(y; theta)``, element-wise."""
        ...


def check_scale(scale: object, bound: object) -> None:
    """Validate the affine scale options (``ValueError`` naming the choices)."""
    check_choice(scale, SCALES, "scale")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ValueError(f"log_scale_bound: expected a positive number, got {bound!r}")


def shift_and_log_scale(a: Tensor, b: Tensor, scale: Scale, bound: float) -> tuple[Tensor, Tensor]:
    """Turn raw conditioner outputs ``(a, b)`` into ``(mu, alpha)`` for ``y = x * exp(alpha) + mu``.

    - ``"softclamp"``: ``mu = a``, ``alpha = B tanh(b / B)``. Smooth, centred at 0, free to
      expand or to contract up to ``exp(±B)`` per layer.
    - ``"gate"``: the gated update of the IAF paper (and Glow's scale),
      ``y = s x + (1 - s) a`` with ``s = sigmoid(b + 2)``: ``alpha = log s``,
      ``mu = (1 - s) a``. It can only contract in the forward direction.

    Example::

        >>> import torch
        >>> mu, alpha = shift_and_log_scale(torch.zeros(2), torch.tensor([0.0, 100.0]), "softclamp", 3.0)
        >>> alpha.tolist()
        [0.0, 3.0]
    """
    if scale == "softclamp":
        return a, bound * (b / bound).tanh()
    log_s = F.logsigmoid(b + 2.0)
    return (1.0 - log_s.exp()) * a, log_s


@dataclass(frozen=True)
class AffineMap:
    """``y = x * exp(alpha) + mu`` with ``(mu, alpha)`` from two raw parameters (see :func:`shift_and_log_scale`).

    ``log g' = alpha``. Raw parameters ``(0, 0)`` give the identity with the soft clamp; with
    ``scale="gate"`` they give ``y = sigmoid(2) x``.

    Example::

        >>> import torch
        >>> g = AffineMap()
        >>> y, ladj = g.forward(torch.tensor([1.0, 2.0]), torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
        >>> y.tolist(), ladj.tolist()
        ([1.5, 2.5], [0.0, 0.0])
        >>> g.inverse(y, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))[0].tolist()
        [1.0, 2.0]
    """

    scale: Scale = "softclamp"
    log_scale_bound: float = LOG_SCALE_BOUND
    num_params: int = 2
    volume_preserving: bool = False

    def __post_init__(self) -> None:
        check_scale(self.scale, self.log_scale_bound)

    def shift_and_log_scale(self, params: Params) -> tuple[Tensor, Tensor]:
        """``(mu, alpha)`` from the two raw parameters."""
        return shift_and_log_scale(params[0], params[1], self.scale, self.log_scale_bound)

    def forward(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        mu, alpha = self.shift_and_log_scale(params)
        return x * alpha.exp() + mu, alpha

    def inverse(self, y: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        mu, alpha = self.shift_and_log_scale(params)
        return (y - mu) * (-alpha).exp(), alpha


class AffineOptions(TypedDict, total=False):
    """The keyword options of every factory whose layers apply an :class:`AffineMap`."""

    scale: Scale
    log_scale_bound: float


def affine_map(options: Mapping[str, Any]) -> tuple[AffineMap, dict[str, Any]]:
    """The :class:`AffineMap` that ``options`` name (``scale``, ``log_scale_bound``), and the other options.

    Example::

        >>> g, rest = affine_map({"scale": "gate", "mask": "half"})
        >>> g.scale, rest
        ('gate', {'mask': 'half'})
    """
    rest = dict(options)
    return AffineMap(rest.pop("scale", "softclamp"), rest.pop("log_scale_bound", LOG_SCALE_BOUND)), rest


@dataclass(frozen=True)
class AdditiveMap:
    """``y = x + mu``, one raw parameter per element; volume preserving (NICE, Glow's additive coupling).

    Example::

        >>> import torch
        >>> AdditiveMap().forward(torch.tensor([1.0]), torch.tensor([[2.0]]))[0].tolist()
        [3.0]
    """

    num_params: int = 1
    volume_preserving: bool = True

    def forward(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        return x + params[0], params[0].new_zeros(())

    def inverse(self, y: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        return y - params[0], params[0].new_zeros(())
