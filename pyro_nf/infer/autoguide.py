"""Flow guides for any Pyro model: :class:`AutoFlow`.

:class:`AutoFlow` is an :class:`~pyro.infer.autoguide.AutoContinuous` guide:
every latent site is mapped to the unconstrained space and packed into one
vector ``z`` of size ``D``, whose posterior is

.. math::

    \\varepsilon \\sim \\mathcal N(0, I_D), \\qquad
    z = \\mu + \\sigma \\odot f(\\varepsilon), \\qquad
    \\log q(z) = \\log \\mathcal N(\\varepsilon; 0, I)
        - \\log|\\det \\partial f / \\partial \\varepsilon| - \\textstyle\\sum_i \\log \\sigma_i,

with ``f`` a pyro_nf flow (IAF by default) and a learnable location ``mu``
(initialised by ``init_loc_fn``, as in :class:`~pyro.infer.autoguide.AutoNormal`)
and scale ``sigma`` (initialised to ``init_scale``). Every pyro_nf flow starts at
the identity, so the guide starts as a diagonal Normal around the initial
location, and the flow's networks always see standardised inputs.

The defaults keep the first optimizer steps safe. Adam moves every weight of a layer's
output by about the learning rate at first, all in the direction the entropy term
pushes, so a layer's log-scale moves by ``lr`` times the sum of its ``H`` hidden
activations (about 1.3 nats a step at ``lr = 0.05``, ``H = 64``) and ``L`` layers by
``L`` times that. Started at ``sigma = 0.1`` (as ``AutoNormal`` starts) with the
factories' bound of 3 nats a layer, the guide overshot to ``exp(15)`` times the
right width within two steps, and a ``LogNormal`` site overflowed. So ``sigma``
starts at 1 (the flow then mostly contracts, which cannot overflow) and each affine
layer is bounded to ``exp(±1)`` (``log_scale_bound=1``); ``sigma`` carries the
overall scale. Both can be set (``init_scale=``, ``log_scale_bound=``).

The flow, the location and the scale are created on the device and in the
dtype of the model's latent values, so a float64 model (or one on a GPU) gets a
float64 (GPU) guide with no further step.

Any function of the latent size that returns a flow can stand in for a name, so
``AutoFlow(model, partial(iaf, hidden_dims=[64, 64]))`` takes the place of Pyro's
``AutoNormalizingFlow(model, partial(iaf, hidden_dims=[64, 64]))``, which the factories
also plug into unchanged. Two things differ: ``AutoNormalizingFlow`` builds the flow at
torch's default dtype (float32 for a float64 model, where ``AutoFlow`` follows the model),
and it fails under Pyro's ``JitTrace_ELBO`` (pyro-ppl/pyro#3132: its ``_prototype_tensor``
is a second name for the flow's first parameter), where ``AutoFlow`` runs.

Kucukelbir et al., "Automatic Differentiation Variational Inference", JMLR 2017.
Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.checks import check_positive_ints
from pyro_nf.registry import flow_factory

__all__ = [
    "AutoFlow",
    "FlowBuilder",
]

FlowName = Literal["iaf", "maf", "realnvp", "ffjord", "nsf", "nsf-coupling"]
FlowBuilder = Callable[..., Transform]
"""A function of the latent size (and the keyword options) that returns the flow."""

GUIDE_INIT_SCALE = 1.0
"""The default initial ``sigma``: the guide starts as wide as a standard Normal prior (as Pyro's
``AutoNormalizingFlow`` does), so the flow mostly has to contract, which cannot overflow."""

GUIDE_LOG_SCALE_BOUND = 1.0
"""The default soft-clamp bound of each affine layer of an :class:`AutoFlow` (the factories' is 3):
at most ``exp(±1)`` per layer, ``exp(±L)`` for ``L`` layers; ``sigma`` carries the overall scale."""

GUIDE_BOUNDED_FLOWS = ("iaf", "maf", "realnvp")
"""The named flows whose layers take ``log_scale_bound`` (affine maps)."""


class AutoFlow(AutoContinuous):
    """A normalizing-flow guide over all latent sites of a model, with sensible defaults.

    ``q(z) = Affine(mu, sigma) o flow`` applied to standard Normal noise, in the
    unconstrained space of the packed latent vector (see the module docstring).

    Args:
        model: a Pyro model with continuous latent sites.
        flow: ``"iaf"`` (default: sampling and the density of its own samples in
            one network pass per layer, what SVI asks of a guide), ``"maf"``
            (sampling sequential in D), ``"realnvp"`` (both directions in one
            pass), ``"ffjord"`` (a continuous flow), ``"nsf"`` (a neural spline flow; give
            ``parallel="forward"`` to sample in one pass) or ``"nsf-coupling"``; any vector flow of
            :data:`pyro_nf.registry.FLOWS`; or a function ``flow(latent_dim, **options)`` returning a flow
            over vectors of that size (``partial(iaf, hidden_dims=[64, 64])``, what ``AutoNormalizingFlow`` takes).
        hidden_dims: hidden widths of each layer's network (the factory's default when None).
        num_transforms: number of flow layers (the factory's default when None).
        init_loc_fn: per-site initialisation of the location (see :mod:`pyro.infer.autoguide.initialization`).
        init_scale: initial value of every entry of ``sigma`` (default 1, see the module docstring).
        **flow_options: further keyword options of the flow factory
            (e.g. ``permutation="random"``, ``residual=True``); ``log_scale_bound`` is 1 for
            ``"iaf"``, ``"maf"`` and ``"realnvp"`` unless given.

    Example::

        >>> import pyro
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     a = pyro.sample("a", dist.Normal(0.0, 1.0))
        ...     pyro.sample("b", dist.Normal(a**2, 0.5), obs=torch.tensor(1.0))
        >>> guide = AutoFlow(model, "iaf", hidden_dims=[16], num_transforms=2)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> loss = svi.step()
        >>> guide.get_posterior().rsample((5,)).shape
        torch.Size([5, 1])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        flow: FlowName | FlowBuilder = "iaf",
        hidden_dims: Sequence[int] | None = None,
        num_transforms: int | None = None,
        *,
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = GUIDE_INIT_SCALE,
        **flow_options: Any,
    ) -> None:
        if isinstance(flow, str) and flow in GUIDE_BOUNDED_FLOWS:
            flow_options.setdefault("log_scale_bound", GUIDE_LOG_SCALE_BOUND)
        self._flow_fn = flow_factory(flow) if isinstance(flow, str) else flow
        if not callable(self._flow_fn):
            raise TypeError(f"flow: expected a flow name or a function of the latent size, got {type(flow).__name__}")
        if hidden_dims is not None:
            hidden_dims = check_positive_ints(hidden_dims, "hidden_dims")
        if num_transforms is not None and (not isinstance(num_transforms, int) or num_transforms < 1):
            raise ValueError(f"num_transforms: expected a positive int or None, got {num_transforms!r}")
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale: expected a positive number, got {init_scale!r}")
        self.flow_name = flow if isinstance(flow, str) else _builder_name(flow)
        self._hidden_dims = hidden_dims
        self._num_transforms = num_transforms
        self._flow_options = flow_options
        self._init_scale = float(init_scale)
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc().detach()
        options = dict(self._flow_options)
        if self._hidden_dims is not None:
            options["hidden_dims"] = self._hidden_dims
        if self._num_transforms is not None:
            options["num_transforms"] = self._num_transforms
        flow = self._flow_fn(self.latent_dim, **options)
        if not isinstance(flow, nn.Module) or not isinstance(flow, Transform):
            raise TypeError(f"AutoFlow: the {self.flow_name!r} factory returned a {type(flow).__name__}, not a flow")
        # the guide lives where the model's latent values live
        self.flow = flow.to(device=loc.device, dtype=loc.dtype)
        self.loc = nn.Parameter(loc)
        self.scale = PyroParam(torch.full_like(loc, self._init_scale), constraints.softplus_positive)

    def get_base_dist(self) -> dist.TorchDistribution:
        """Standard Normal noise of size ``latent_dim`` on the guide's device and dtype."""
        zero = self.loc.new_zeros(self.latent_dim)
        return dist.Normal(zero, torch.ones_like(zero)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        """The flow followed by the learnable element-wise affine map ``mu + sigma * .``."""
        return dist.transforms.ComposeTransform([self.flow, self._affine()])

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TorchDistribution:
        """``TransformedDistribution(Normal(0, I), [flow, affine])`` over the packed latent vector."""
        return dist.TransformedDistribution(self.get_base_dist(), [self.flow, self._affine()])

    def _affine(self) -> AffineTransform:
        # cache_size=1 hands the flow its own output back on the inverse, so the
        # log-density of the guide's samples costs no second (sequential) pass
        return AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "AutoFlow has no closed-form median or quantiles; estimate them from samples of get_posterior()"
        )


def _builder_name(builder: FlowBuilder) -> str:
    """A readable name of a flow-building function (a ``partial`` names its function)."""
    inner = getattr(builder, "func", builder)
    return str(getattr(inner, "__name__", type(inner).__name__))
