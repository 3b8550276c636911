"""A class-conditional prior for any flow: a context-dependent affine map on the base side.

``z = mu(c) + exp(alpha(c)) ⊙ eps`` with ``eps`` standard Normal makes the base
``N(mu(c), exp(2 alpha(c)))``: one mean and log-scale per element of the event, from a
zero-initialised linear map of the context ``c`` (a one-hot class label in the Glow paper,
any vector here). Placed first in a :class:`~pyro_nf.conditional.ConditionalFlowStack` (base to
data), it conditions an unconditional flow, image or vector:
:func:`~pyro_nf.transforms.glow.conditional_glow` is Glow over this prior.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import constraints

from pyro_nf.checks import check_positive_int
from pyro_nf.conditional import ConditionalFlowTransformModule
from pyro_nf.core import FlowTransform
from pyro_nf.transforms.elementwise import LOG_SCALE_BOUND, AffineMap, Scale

__all__ = [
    "conditional_latent_affine",
    "ConditionedLatentAffine",
    "ConditionalLatentAffine",
]


class ConditionedLatentAffine(FlowTransform):
    """The base-side affine map ``z = mu(c) + exp(alpha(c)) ⊙ eps`` of :class:`ConditionalLatentAffine` at one context.

    ``(mu, alpha)`` come from one linear map of the context, element by element over
    the event; ``log|det| = sum alpha(c)``. Both directions are one element-wise map.
    """

    parallel = "both"

    def __init__(
        self,
        net: nn.Linear,
        event_shape: tuple[int, ...],
        context: Tensor,
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.net = net
        self.input_shape = event_shape
        self.context = context
        self.elementwise = AffineMap(scale, log_scale_bound)
        self.domain = self.codomain = constraints.independent(constraints.real, len(event_shape))

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return (self.net, self.context)

    def _map(self, x: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        k = len(self.input_shape)
        raw = self.net(self.context)
        if raw.dtype != x.dtype:  # a network under autocast (bf16): the prior's map in x's precision
            raw = raw.to(x.dtype)
        params = raw.unflatten(-1, (2, *self.input_shape)).unbind(-k - 1)
        y, alpha = (self.elementwise.forward if forward else self.elementwise.inverse)(x, params)
        batch = torch.broadcast_shapes(x.shape[: x.dim() - k], alpha.shape[: alpha.dim() - k])
        return y, alpha.flatten(-k).sum(-1).expand(batch)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(x, forward=True)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(y, forward=False)


class ConditionalLatentAffine(ConditionalFlowTransformModule):
    """A class-conditional prior as a transform on the base side: ``z = mu(c) + exp(alpha(c)) ⊙ eps``.

    With ``eps`` standard Normal this makes the base ``N(mu(c), exp(2 alpha(c)))``, one
    mean and log-scale per element of the event, from a linear map of the context
    ``c``. The map starts at zero, so the prior starts as the standard Normal. Placed
    first in a stack (base to data), it conditions an unconditional flow such as
    :func:`~pyro_nf.transforms.glow.glow` or :func:`~pyro_nf.transforms.autoregressive.maf`.

    Args:
        event_shape: the shape of the base noise (the image shape ``(C, H, W)`` for Glow).
        context_dim: size of the context.
        scale, log_scale_bound: how the raw scale becomes a log-scale
            (see :func:`~pyro_nf.transforms.elementwise.shift_and_log_scale`).

    Example::

        >>> prior = ConditionalLatentAffine((1, 2, 2), context_dim=3)
        >>> y, log_det = prior.condition(torch.eye(3)).forward_and_log_det(torch.randn(3, 1, 2, 2))
        >>> log_det.tolist()  # zero-initialised: the identity
        [0.0, 0.0, 0.0]
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        context_dim: int,
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
    ) -> None:
        super().__init__()
        shape = tuple(event_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"event_shape: expected a non-empty sequence of positive ints, got {event_shape!r}")
        self.context_dim = check_positive_int(context_dim, "context_dim")
        AffineMap(scale, log_scale_bound)  # checks the options
        self.event_shape = shape
        self.scale = scale
        self.log_scale_bound = log_scale_bound
        self.net = nn.Linear(context_dim, 2 * math.prod(shape))
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def _condition(self, context: Tensor) -> ConditionedLatentAffine:
        return ConditionedLatentAffine(self.net, self.event_shape, context, self.scale, self.log_scale_bound)


def conditional_latent_affine(
    event_shape: Sequence[int], context_dim: int, scale: Scale = "softclamp", log_scale_bound: float = LOG_SCALE_BOUND
) -> ConditionalLatentAffine:
    """A :class:`ConditionalLatentAffine` prior over ``event_shape`` for a context of ``context_dim`` features.

    Example::

        >>> from pyro_nf.conditional import ConditionalFlowStack
        >>> from pyro_nf.transforms import maf
        >>> flow = ConditionalFlowStack([conditional_latent_affine((2,), 3), maf(2, [8], 1)])
        >>> flow.condition(torch.randn(3))(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """
    return ConditionalLatentAffine(event_shape, context_dim, scale, log_scale_bound)
