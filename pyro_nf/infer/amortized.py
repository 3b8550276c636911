"""Amortized flow posteriors for variational autoencoders.

An encoder maps a data point ``x`` to the parameters of a diagonal Gaussian and
to a context vector ``h``; a conditional flow ``f_h`` turns the Gaussian into
the posterior (Kingma et al. 2016):

.. math::

    z_0 \\sim \\mathcal N(\\mu(x), \\operatorname{diag} \\sigma^2(x)), \\qquad
    z = f_h(z_0), \\qquad
    \\log q(z \\mid x) = \\log \\mathcal N(z_0; \\mu, \\sigma^2)
        - \\log|\\det \\partial f_h / \\partial z_0|.

In a Pyro guide this is one ``pyro.sample`` site::

    def guide(x, idx):
        pyro.module("encoder", encoder)
        pyro.module("posterior", posterior)
        with pyro.plate("data", N, subsample=idx):
            loc, scale, h = encoder(x[idx])
            pyro.sample("z", posterior(loc, scale, h))

:func:`amortized_flow` builds the conditional flow by name: the pyro_nf
``conditional_iaf`` (the IAF posterior of Kingma et al.; sampling and the
density of its own samples in one pass per layer, the right direction for a
guide), ``conditional_maf`` (sampling is sequential in the latent size),
``conditional_realnvp``, ``conditional_ffjord`` (when pyro_nf's FFJORD is
installed), ``"sylvester"`` (:class:`~pyro_nf.transforms.sylvester.ConditionalSylvester`, the amortized
Householder Sylvester flow of van den Berg et al. 2018: the encoder's context
gives each data point its own ``Q``, ``R``, ``R~`` and ``b``), and Pyro's own
flows as baselines: ``"planar"`` (Pyro's ``ConditionalPlanar``, amortized as in
Rezende & Mohamed 2015) and ``"sylvester-shared"`` (Pyro's ``Sylvester``
parametrisation, whose parameters are shared by all data points: Pyro has no
amortized form).

FFJORD posteriors score their samples with the exact trace in evaluation mode
(``eval_trace="exact"``, ``D`` vector-Jacobian products per function
evaluation) whatever ``D``: an IWAE estimate needs the exact ``log q``, and a
Hutchinson estimate inside the log-sum-exp biases it.

``"sylvester-shared"`` builds :class:`~pyro_nf.transforms.sylvester.ExactSylvester`: Pyro's
Sylvester parametrisation with the exact log-determinant (Pyro's own is not exact, see
:mod:`pyro_nf.transforms.sylvester`).

Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
van den Berg et al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import pyro.distributions as dist
from pyro.distributions.conditional import ConditionalComposeTransformModule, ConditionalTransform
from pyro.distributions.transforms import conditional_planar
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.checks import check_tensor
from pyro_nf.registry import FLOWS, flow_factory
from pyro_nf.transforms.sylvester import DEFAULT_SYLVESTER_LAYERS, ExactSylvester, conditional_sylvester

__all__ = [
    "amortized_flow",
    "amortized_posterior",
    "AmortizedFlowPosterior",
    "POSTERIORS",
    "DEFAULT_PLANAR_LAYERS",
]

PosteriorName = Literal[
    "gaussian", "planar", "sylvester", "sylvester-shared", "iaf", "maf", "realnvp", "ffjord", "nsf", "nsf-coupling"
]
BASELINES: tuple[str, ...] = ("gaussian", "planar", "sylvester", "sylvester-shared")
POSTERIORS: tuple[str, ...] = (*BASELINES, *(name for name, spec in FLOWS.items() if spec.kind == "vector"))
"""The posteriors :func:`amortized_flow` builds: the baselines and every vector flow of the registry."""

#: Number of layers of the planar posterior when ``num_transforms`` is None.
DEFAULT_PLANAR_LAYERS = 8


def amortized_flow(
    kind: PosteriorName,
    latent_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int | None = None,
    **options: Any,
) -> nn.Module | None:
    """The conditional flow of an amortized posterior, by name; None for ``"gaussian"``.

    Args:
        kind: ``"gaussian"`` (no flow), ``"planar"``, ``"sylvester"`` (amortized Householder
            Sylvester, :func:`conditional_sylvester`), ``"sylvester-shared"`` (Pyro's Sylvester
            parametrisation with parameters shared by all data points, :class:`ExactSylvester`),
            ``"iaf"``, ``"maf"``, ``"realnvp"``, ``"ffjord"``, ``"nsf"`` (a neural spline flow; as a
            posterior, ``parallel="forward"`` samples in one pass) or ``"nsf-coupling"``.
        latent_dim: the latent size D.
        context_dim: the size of the encoder's context vector (unused by ``"sylvester-shared"``).
        hidden_dims: hidden widths of the flow's networks (the factory's default when None;
            for ``"planar"`` and ``"sylvester"`` the hypernetwork's, None being a linear map for
            ``"sylvester"``; unused by ``"sylvester-shared"``).
        num_transforms: number of layers (the factory's default when None; 8 planar, 4 Sylvester).
        **options: further keyword options of the pyro_nf factory (for ``"sylvester"``:
            ``num_householder``, reflections per layer, default 8; for ``"sylvester-shared"``:
            ``count_transforms``, default ``D // 2 + 1``; for ``"ffjord"`` the solver options,
            with ``eval_trace="exact"`` unless given, so that evaluation scores the exact ``log q``).

    Returns:
        a module with ``.condition(context)`` (a ``ConditionalTransformModule``), or None.

    Example::

        >>> import torch
        >>> flow = amortized_flow("iaf", 4, 8, hidden_dims=[32], num_transforms=2)
        >>> flow.condition(torch.randn(10, 8))(torch.randn(10, 4)).shape
        torch.Size([10, 4])
    """
    if not isinstance(kind, str) or kind not in POSTERIORS:
        raise ValueError(f"kind: expected one of {POSTERIORS}, got {kind!r}")
    for name, value in (("latent_dim", latent_dim), ("context_dim", context_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if num_transforms is not None and (not isinstance(num_transforms, int) or num_transforms < 1):
        raise ValueError(f"num_transforms: expected a positive int or None, got {num_transforms!r}")
    if kind == "gaussian":
        return None
    if kind == "planar":
        if options:
            raise TypeError(f"kind='planar' takes no further options, got {sorted(options)}")
        layers = num_transforms or DEFAULT_PLANAR_LAYERS
        hidden = list(hidden_dims) if hidden_dims is not None else None
        return ConditionalComposeTransformModule(
            [conditional_planar(latent_dim, context_dim, hidden) for _ in range(layers)], cache_size=1
        )
    if kind == "sylvester":
        householder = options.pop("num_householder", None)
        if options:
            raise TypeError(f"kind='sylvester' takes only num_householder, got {sorted(options)}")
        layers = num_transforms or DEFAULT_SYLVESTER_LAYERS
        return conditional_sylvester(latent_dim, context_dim, hidden_dims, layers, householder)
    if kind == "sylvester-shared":
        count = options.pop("count_transforms", latent_dim // 2 + 1)
        if options:
            raise TypeError(f"kind='sylvester-shared' takes only count_transforms, got {sorted(options)}")
        layers = num_transforms or DEFAULT_SYLVESTER_LAYERS
        return ConditionalComposeTransformModule(
            [ExactSylvester(latent_dim, count_transforms=count) for _ in range(layers)], cache_size=1
        )
    if kind == "ffjord":
        # a posterior's log-density is scored (ELBO, IWAE): the exact trace in evaluation mode, at any D
        options.setdefault("eval_trace", "exact")
    if hidden_dims is not None:
        options["hidden_dims"] = list(hidden_dims)
    if num_transforms is not None:
        options["num_transforms"] = num_transforms
    return flow_factory(kind, conditional=True)(latent_dim, context_dim, **options)


def amortized_posterior(
    loc: Tensor,
    scale: Tensor,
    flow: ConditionalTransform | Transform | None = None,
    context: Tensor | None = None,
) -> dist.TorchDistribution:
    """``TransformedDistribution(Normal(loc, scale).to_event(1), [flow.condition(context)])`` for ``pyro.sample``.

    Args:
        loc: base locations, shape ``batch_shape + (D,)``.
        scale: positive base scales, the same shape.
        flow: a conditional flow (conditioned on ``context``), a plain transform
            (used as it is) or None (the Gaussian posterior).
        context: the encoder's context, ``batch_shape + (context_dim,)``; needed by a conditional flow.

    Returns:
        a distribution with batch shape ``batch_shape`` and event shape ``(D,)``.

    Example::

        >>> import torch
        >>> from pyro_nf.transforms import conditional_iaf
        >>> flow = conditional_iaf(2, 5, hidden_dims=[16], num_transforms=2)
        >>> q = amortized_posterior(torch.zeros(3, 2), torch.ones(3, 2), flow, torch.randn(3, 5))
        >>> z = q.rsample()
        >>> q.batch_shape, q.event_shape, q.log_prob(z).shape
        (torch.Size([3]), torch.Size([2]), torch.Size([3]))
    """
    check_tensor(loc, name="loc")
    check_tensor(scale, name="scale", like=loc)
    if loc.dim() < 1 or scale.shape != loc.shape:
        raise ValueError(
            f"loc and scale: expected two tensors of one shape (..., D), "
            f"got {tuple(loc.shape)} and {tuple(scale.shape)}"
        )
    base = dist.Normal(loc, scale).to_event(1)
    if flow is None:
        return base
    if isinstance(flow, ConditionalTransform):
        if context is None:
            raise ValueError("context: expected the encoder's context tensor for a conditional flow, got None")
        check_tensor(context, name="context", like=loc)
        if context.shape[:-1] != loc.shape[:-1]:
            raise ValueError(
                f"context: expected batch shape {tuple(loc.shape[:-1])} (that of loc), got shape {tuple(context.shape)}"
            )
        transform = flow.condition(context)
    elif isinstance(flow, Transform):
        transform = flow
    else:
        raise TypeError(f"flow: expected a ConditionalTransform, a Transform or None, got {type(flow).__name__}")
    return dist.TransformedDistribution(base, [transform])


class AmortizedFlowPosterior(nn.Module):
    """The flow half of an amortized posterior ``q(z | x)``: call it with the encoder's outputs.

    ``posterior(loc, scale, context)`` returns :func:`amortized_posterior` with
    the flow built by :func:`amortized_flow`. Register it in the guide with
    ``pyro.module``.

    Args:
        kind: see :func:`amortized_flow`.
        latent_dim: the latent size D.
        context_dim: the size of the encoder's context vector.
        hidden_dims, num_transforms, options: see :func:`amortized_flow`.

    Example::

        >>> import torch
        >>> posterior = AmortizedFlowPosterior("realnvp", 2, 6, hidden_dims=[16], num_transforms=2)
        >>> q = posterior(torch.zeros(4, 2), torch.ones(4, 2), torch.randn(4, 6))
        >>> q.rsample((10,)).shape
        torch.Size([10, 4, 2])
    """

    def __init__(
        self,
        kind: PosteriorName,
        latent_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        num_transforms: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.latent_dim = latent_dim
        self.context_dim = context_dim
        self.flow = amortized_flow(kind, latent_dim, context_dim, hidden_dims, num_transforms, **options)

    def forward(self, loc: Tensor, scale: Tensor, context: Tensor | None = None) -> dist.TorchDistribution:
        """The posterior distribution given the encoder's ``loc``, ``scale`` and ``context``."""
        if loc.dim() < 1 or loc.shape[-1] != self.latent_dim:
            raise ValueError(f"loc: expected shape (..., {self.latent_dim}), got {tuple(loc.shape)}")
        if self.flow is None:
            return amortized_posterior(loc, scale)
        return amortized_posterior(loc, scale, cast(ConditionalTransform, self.flow), context)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, latent_dim={self.latent_dim}, context_dim={self.context_dim}"
