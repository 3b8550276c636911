"""Density models users can hold: a base distribution and a flow in one ``nn.Module``.

:class:`FlowModel` owns a standard Normal base (its location and scale are
buffers) and a flow, so ``.to(device)``, ``.double()``, ``state_dict`` and
``pyro.module`` cover everything. It computes ``log_prob`` and
``sample_and_log_prob`` in one pass of the flow, and hands Pyro a
``TransformedDistribution`` for ``pyro.sample``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.checks import check_context, check_tensor, validation_enabled
from pyro_nf.conditional import ConditionalFlowTransformModule, condition_checked
from pyro_nf.core import fused_forward, fused_inverse

_Shape = Sequence[int] | torch.Size


def _sample_shape(sample_shape: _Shape) -> torch.Size:
    """``sample_shape`` as a ``torch.Size``; a ``ValueError`` for a negative size."""
    shape = torch.Size(sample_shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"sample_shape: expected sizes >= 0, got {tuple(shape)}")
    return shape


class _FlowDensity:
    """Density methods shared by the plain and the conditioned model (one flow pass each)."""

    flow: Transform

    def _base(self) -> dist.TorchDistribution:
        raise NotImplementedError

    _check: Callable[[Tensor], None]
    _event_shape: torch.Size
    _batch_shape: torch.Size = torch.Size()

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` for data of shape ``batch_shape + event_shape``; an empty batch gives an empty tensor."""
        self._check(x)
        batch = x.shape[: x.dim() - len(self._event_shape)]
        if batch.numel() == 0:
            return x.new_zeros(torch.broadcast_shapes(batch, self._batch_shape))
        z, log_det = fused_inverse(self.flow, x)
        return self._base().log_prob(z) - log_det

    def rsample(self, sample_shape: _Shape = ()) -> Tensor:
        """Reparameterized samples of shape ``sample_shape + batch_shape + event_shape``."""
        return fused_forward(self.flow, self._base().rsample(_sample_shape(sample_shape)))[0]

    def sample(self, sample_shape: _Shape = (), temperature: float = 1.0) -> Tensor:
        """Samples without gradients; ``temperature`` (a finite number >= 0) scales the base noise."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
        with torch.no_grad():
            z = self._base().sample(_sample_shape(sample_shape)) * temperature
            return fused_forward(self.flow, z)[0]

    def sample_and_log_prob(self, sample_shape: _Shape = ()) -> tuple[Tensor, Tensor]:
        """Reparameterized samples and their ``log p``, in one pass."""
        base = self._base()
        z = base.rsample(_sample_shape(sample_shape))
        if z.numel() == 0:  # no samples: nothing for the flow to map
            return z.clone(), z.new_zeros(z.shape[: z.dim() - len(self._event_shape)])
        x, log_det = fused_forward(self.flow, z)
        return x, base.log_prob(z) - log_det

    @property
    def distribution(self) -> dist.TransformedDistribution:
        """The model as a Pyro ``TransformedDistribution``, for ``pyro.sample``."""
        return dist.TransformedDistribution(self._base(), [self.flow])


class _StandardNormalBase(nn.Module):
    """A standard Normal over ``event_shape`` whose parameters are buffers."""

    def __init__(self, event_shape: _Shape) -> None:
        super().__init__()
        event_shape = tuple(int(s) for s in event_shape)
        if not event_shape or any(s < 1 for s in event_shape):
            raise ValueError(f"event_shape: expected a non-empty shape of positive sizes, got {event_shape}")
        self.event_shape = self._event_shape = torch.Size(event_shape)
        self.register_buffer("loc", torch.zeros(event_shape))
        self.register_buffer("scale", torch.ones(event_shape))

    @property
    def base_dist(self) -> dist.TorchDistribution:
        """The base distribution ``Normal(0, 1)`` over the event shape, on the model's device and dtype.

        While compiling, its argument and sample checks are off (they read values back): ``torch.compile`` of a
        whole model then makes one graph whatever the state of Pyro's validation switch.
        """
        validate = False if torch.compiler.is_compiling() else None
        return dist.Normal(self.loc, self.scale, validate_args=validate).to_event(len(self.event_shape))

    def _check(self, x: Tensor) -> None:
        if validation_enabled():
            check_tensor(x, name="data", event_shape=self.event_shape, like=self.loc)


def _check_flow_shape(flow: object, event_shape: torch.Size) -> None:
    """A ``ValueError`` when the flow states the event shape it works on and that is not ``event_shape``."""
    shape = getattr(flow, "input_shape", None)
    if shape is not None and tuple(shape) != tuple(event_shape):
        raise ValueError(
            f"event_shape: the flow works on events of shape {tuple(shape)}, but the model's event_shape is "
            f"{tuple(event_shape)}; build the flow for {tuple(event_shape)} or give event_shape={tuple(shape)}"
        )
    event_dim = getattr(getattr(flow, "domain", None), "event_dim", 0)
    if event_dim > len(event_shape):
        raise ValueError(
            f"event_shape: the flow acts on {event_dim}-dimensional events, but event_shape {tuple(event_shape)} "
            f"has {len(event_shape)} dimension(s)"
        )


class FlowModel(_FlowDensity, _StandardNormalBase):
    """A normalizing-flow density: ``x = flow(z)``, ``z ~ Normal(0, 1)`` over ``event_shape``.

    ``log p(x) = log N(flow^{-1}(x)) - log|det d flow / dz|``, computed in one pass.

    Args:
        flow: any transform (a pyro_nf factory's result, or a Pyro transform).
        event_shape: the event shape of the data, e.g. ``(8,)`` or ``(1, 8, 8)``.

    Example::

        >>> from pyro_nf.transforms import maf
        >>> model = FlowModel(maf(2, hidden_dims=[16]), (2,))
        >>> x, log_p = model.sample_and_log_prob((5,))
        >>> torch.allclose(model.log_prob(x), log_p, atol=1e-5)
        True
    """

    def __init__(self, flow: Transform, event_shape: _Shape) -> None:
        super().__init__(event_shape)
        if not isinstance(flow, Transform):
            raise TypeError(f"flow: expected a Transform, got {type(flow).__name__}")
        _check_flow_shape(flow, self.event_shape)
        self.flow = flow

    def _base(self) -> dist.TorchDistribution:
        return self.base_dist

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`log_prob`, so that ``model(x)`` is the log-density."""
        return self.log_prob(x)


class ConditionalFlowModel(_StandardNormalBase):
    """A conditional flow density ``p(x | c)``; ``.condition(c)`` gives the density at ``c``.

    Example::

        >>> from pyro_nf.transforms import conditional_maf
        >>> model = ConditionalFlowModel(conditional_maf(2, 3, hidden_dims=[16]), (2,), context_dim=3)
        >>> model.log_prob(torch.randn(4, 2), torch.randn(4, 3)).shape
        torch.Size([4])
        >>> model.condition(torch.randn(4, 3)).sample((10,)).shape
        torch.Size([10, 4, 2])
    """

    def __init__(self, flow: ConditionalTransform, event_shape: _Shape, context_dim: int) -> None:
        super().__init__(event_shape)
        if not isinstance(flow, ConditionalTransform):
            raise TypeError(f"flow: expected a ConditionalTransform, got {type(flow).__name__}")
        if isinstance(flow, ConditionalFlowTransformModule):  # conditioning stores the context: cheap
            like = next(flow.parameters(), None)
            probe = torch.zeros(context_dim) if like is None else like.new_zeros(context_dim)
            _check_flow_shape(flow.condition(probe), self.event_shape)
        self.flow = flow
        self.context_dim = context_dim

    def condition(self, context: Tensor) -> ConditionedFlowModel:
        """The density given ``context`` of shape ``batch_shape + (context_dim,)``."""
        check_context(context, self.context_dim, self.loc)
        return ConditionedFlowModel(self, condition_checked(self.flow, context), context.shape[:-1])

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``log p(x | context)``."""
        return self.condition(context).log_prob(x)

    def log_prob(self, x: Tensor, context: Tensor) -> Tensor:
        """``log p(x | context)``."""
        return self.condition(context).log_prob(x)


class ConditionedFlowModel(_FlowDensity):
    """A :class:`ConditionalFlowModel` at a fixed context, with batch shape that of the context."""

    def __init__(self, model: ConditionalFlowModel, flow: Transform, batch_shape: _Shape) -> None:
        self.model = model
        self.flow = flow
        self.batch_shape = self._batch_shape = torch.Size(batch_shape)
        self._event_shape = model.event_shape

    def _base(self) -> dist.TorchDistribution:
        return self.model.base_dist.expand(self.batch_shape)

    def _check(self, x: Tensor) -> None:
        self.model._check(x)
        if validation_enabled() and isinstance(x, Tensor):
            batch = x.shape[: x.dim() - len(self._event_shape)]
            try:
                torch.broadcast_shapes(batch, self.batch_shape)
            except RuntimeError:
                raise ValueError(
                    f"data: batch shape {tuple(batch)} does not broadcast with the context's batch shape "
                    f"{tuple(self.batch_shape)}; give one context per sample, or one for all"
                ) from None
