"""Autoregressive layers: one skeleton with a pluggable element-wise map, and MAF and IAF.

An autoregressive layer applies an element-wise map ``g`` (:mod:`pyro_nf.transforms.elementwise`)
whose raw parameters for element ``i`` come from a :class:`~pyro_nf.nn.MADE`, so they depend
only on the elements before ``i`` in the MADE's order. The two directions differ in which
side the MADE reads (forward maps base ``z`` to data ``x``, as in Pyro):

- **MAF** (``parallel="inverse"``): ``x_i = g(z_i; theta_i(x_<i))``. The density of any
  data, ``z_i = g^{-1}(x_i; theta_i(x_<i))``, is one MADE pass; sampling is sequential.
  Use it as a density model.
- **IAF** (``parallel="forward"``): ``x_i = g(z_i; theta_i(z_<i))``. Sampling, and the
  density of its own samples, are one pass; the density of arbitrary data is sequential.
  Use it as a variational posterior (a guide).

In both, ``log|det dx/dz| = sum_i log g'(z_i; theta_i)``. With the affine map
``g(z; mu, alpha) = z exp(alpha) + mu`` these are the MAF and IAF of the papers.

The sequential direction (MAF sampling, IAF density of arbitrary data) runs
incrementally by default (``sequential="incremental"``, see
:meth:`pyro_nf.nn.MADE.sequential`): the MADE's hidden units are computed once,
degree block by degree block, as the solution fills in, so it costs the
arithmetic of one network pass plus ``D`` small steps instead of ``D`` passes, for any
element-wise map. ``sequential="reference"`` runs the plain ``D`` passes (same numbers).

Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017.
Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypedDict, get_args

import torch
from torch import Tensor, nn

from pyro_nf.checks import check_choice, check_options, check_positive_int
from pyro_nf.conditional import ConditionalFlowStack, ConditionalFlowTransformModule
from pyro_nf.core import FlowStack, FlowTransform, FlowTransformModule
from pyro_nf.nn.made import MADE, Order, Permutation, SequentialMethod, check_sequential_method, stack_orders
from pyro_nf.nn.nets import default_hidden_dims
from pyro_nf.transforms.elementwise import LOG_SCALE_BOUND, AffineMap, AffineOptions, ElementwiseMap, Scale, affine_map
from pyro_nf.transforms.normalization import ActNorm, BatchNorm

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["affine_autoregressive", "maf", "iaf", "conditional_maf", "conditional_iaf"]  # the factories first
__all__ += ["ConditionedAutoregressive", "Autoregressive", "ConditionalAutoregressive"]
__all__ += ["ConditionedAffineAutoregressive", "AffineAutoregressive", "ConditionalAffineAutoregressive"]
__all__ += ["AutoregressiveOptions", "AffineAutoregressiveOptions", "autoregressive_stack"]

Parallel = Literal["forward", "inverse"]
PARALLEL: tuple[Parallel, ...] = get_args(Parallel)


class ConditionedAutoregressive(FlowTransform):
    """The math of one autoregressive layer, given a MADE, an element-wise map and an optional context.

    Args:
        made: a :class:`MADE` with ``num_params`` equal to the map's.
        elementwise: the element-wise map (see :mod:`pyro_nf.transforms.elementwise`).
        parallel: ``"inverse"`` for a MAF layer, ``"forward"`` for an IAF layer.
        context: the context tensor (``(..., context_dim)``) or None.
        cache_size: 1 to keep the last pair computed (see :class:`~pyro_nf.core.FlowTransform`), or 0.
        sequential: how the sequential direction is solved: ``"incremental"`` (one network
            pass of work, default) or ``"reference"`` (``D`` MADE passes).
    """

    def __init__(
        self,
        made: MADE,
        elementwise: ElementwiseMap,
        parallel: Parallel = "inverse",
        context: Tensor | None = None,
        cache_size: int = 1,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__(cache_size=cache_size)
        check_choice(parallel, PARALLEL, "parallel")
        check_sequential_method(sequential)
        if not isinstance(elementwise, ElementwiseMap):
            raise TypeError(f"elementwise: expected an element-wise map, got {type(elementwise).__name__}")
        if made.num_params != elementwise.num_params:
            raise ValueError(
                f"made: expected num_params = {elementwise.num_params} (the element-wise map's), got {made.num_params}"
            )
        self.made = made
        self.elementwise = elementwise
        self.parallel = parallel
        self.context = context
        self.sequential = sequential
        self.input_shape = (made.input_dim,)

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return (self.made, self.context)

    def _params(self, inputs: Tensor) -> Tensor:
        return self._layout(self.made(inputs, self.context))

    def _layout(self, raw: Tensor) -> Tensor:
        """The MADE's output ``(..., P * D)`` as the map's parameters ``(P, ..., D)``: a view, no copy."""
        return raw.unflatten(-1, (self.made.num_params, self.made.input_dim)).movedim(-2, 0)

    def _broadcast(self, v: Tensor) -> Tensor:
        """Expand ``v`` to the batch shape it shares with the context."""
        if self.context is None:
            return v
        batch = torch.broadcast_shapes(v.shape[:-1], self.context.shape[:-1])
        return v.expand(*batch, v.shape[-1])

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._broadcast(x)
        if self.parallel == "forward":
            y, ladj = self.elementwise.forward(x, self._params(x))
            return y, ladj.sum(-1)
        return self._sequential(x, forward=True)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y = self._broadcast(y)
        if self.parallel == "inverse":
            x, ladj = self.elementwise.inverse(y, self._params(y))
            return x, ladj.sum(-1)
        return self._sequential(y, forward=False)

    def _sequential(self, given: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        """Solve the sequential direction with :meth:`MADE.sequential <pyro_nf.nn.MADE.sequential>`.

        ``forward`` solves ``x_i = g(z_i; theta_i(x_<i))`` for ``x`` given ``z`` (MAF sampling),
        otherwise ``z_i = g^{-1}(x_i; theta_i(z_<i))`` for ``z`` given ``x`` (IAF density).
        ``self.sequential`` picks the incremental pass or the ``D``-pass reference. The
        log-det is the map's at the solution's parameters.
        """
        g = self.elementwise.forward if forward else self.elementwise.inverse

        def solve(known: Tensor, *params: Tensor) -> Tensor:
            return g(known, params)[0]

        out, raw = self.made.sequential(given, solve, self.context, self.sequential)
        params = self._layout(raw)
        base = given if forward else out  # the map's input, at which log g' is taken
        side = out if forward else given
        _, ladj = self.elementwise.forward(base, params) if forward else self.elementwise.inverse(side, params)
        return out, ladj.sum(-1)


class Autoregressive(ConditionedAutoregressive, FlowTransformModule):
    """A learnable autoregressive layer with any element-wise map."""

    def __init__(
        self,
        made: MADE,
        elementwise: ElementwiseMap,
        parallel: Parallel = "inverse",
        cache_size: int = 1,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__(made, elementwise, parallel, None, cache_size, sequential)


class ConditionalAutoregressive(ConditionalFlowTransformModule):
    """An autoregressive layer whose MADE also reads a context; ``.condition(context)`` gives the layer."""

    def __init__(
        self,
        made: MADE,
        elementwise: ElementwiseMap,
        parallel: Parallel = "inverse",
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__()
        if made.context_dim < 1:
            raise ValueError(f"{type(self).__name__}: the MADE needs context_dim >= 1, got {made.context_dim}")
        check_choice(parallel, PARALLEL, "parallel")
        check_sequential_method(sequential)
        self.made = made
        self.elementwise = elementwise
        self.parallel = parallel
        self.sequential = sequential
        self.context_dim = made.context_dim

    def _condition(self, context: Tensor) -> ConditionedAutoregressive:
        return ConditionedAutoregressive(
            self.made, self.elementwise, self.parallel, context, sequential=self.sequential
        )


class ConditionedAffineAutoregressive(ConditionedAutoregressive):
    """One affine autoregressive layer at a context: :class:`ConditionedAutoregressive` with an :class:`AffineMap`."""

    def __init__(
        self,
        made: MADE,
        parallel: Parallel = "inverse",
        context: Tensor | None = None,
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        cache_size: int = 1,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__(made, AffineMap(scale, log_scale_bound), parallel, context, cache_size, sequential)


class AffineAutoregressive(Autoregressive):
    """One learnable MAF (``parallel="inverse"``) or IAF (``parallel="forward"``) layer.

    Example::

        >>> layer = AffineAutoregressive(MADE(4, [32, 32]), parallel="inverse")
        >>> z, log_det = layer.inverse_and_log_det(torch.randn(10, 4))
        >>> log_det.shape
        torch.Size([10])
    """

    def __init__(
        self,
        made: MADE,
        parallel: Parallel = "inverse",
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        cache_size: int = 1,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__(made, AffineMap(scale, log_scale_bound), parallel, cache_size, sequential)


class ConditionalAffineAutoregressive(ConditionalAutoregressive):
    """A MAF/IAF layer whose MADE also reads a context; ``.condition(context)`` gives the layer."""

    def __init__(
        self,
        made: MADE,
        parallel: Parallel = "inverse",
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__(made, AffineMap(scale, log_scale_bound), parallel, sequential)


def affine_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    parallel: Parallel = "inverse",
    order: Order = "natural",
    residual: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    scale: Scale = "softclamp",
    log_scale_bound: float = LOG_SCALE_BOUND,
    sequential: SequentialMethod = "incremental",
) -> AffineAutoregressive:
    """One :class:`AffineAutoregressive` layer (a MAF layer, or with ``parallel="forward"`` an IAF layer).

    Example::

        >>> affine_autoregressive(3, [16], parallel="forward")(torch.randn(2, 3)).shape
        torch.Size([2, 3])
    """
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    made = MADE(input_dim, hidden, 2, 0, order, residual, activation)
    return AffineAutoregressive(made, parallel, scale, log_scale_bound, sequential=sequential)


def autoregressive_stack(
    input_dim: int,
    context_dim: int,
    parallel: Parallel,
    hidden_dims: Sequence[int] | None,
    num_transforms: int,
    elementwise: ElementwiseMap,
    *,
    permutation: str = "reversed",
    batch_norm: bool = False,
    residual: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    seed: int = 0,
    sequential: SequentialMethod = "incremental",
    actnorm: bool = False,
) -> list[nn.Module]:
    """The layers of an autoregressive flow with any element-wise map (MAF, IAF and the spline flows).

    The permutation between layers is folded into each MADE's input order (``"reversed"``
    alternates natural and reversed orders, ``"random"`` draws orders from ``seed``), which
    is the same model without a gather. With ``actnorm`` an
    :class:`~pyro_nf.transforms.normalization.ActNorm` is the last part (the first data meet).
    """
    check_positive_int(input_dim, "input_dim")
    check_positive_int(num_transforms, "num_transforms")
    if context_dim:
        check_positive_int(context_dim, "context_dim")
    check_sequential_method(sequential)
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    parts: list[nn.Module] = []
    for i, order in enumerate(stack_orders(input_dim, num_transforms, permutation, seed)):
        if batch_norm and i > 0:
            parts.append(BatchNorm(input_dim))
        made = MADE(input_dim, hidden, elementwise.num_params, context_dim, order, residual, activation)
        if context_dim:
            parts.append(ConditionalAutoregressive(made, elementwise, parallel, sequential))
        else:
            parts.append(Autoregressive(made, elementwise, parallel, sequential=sequential))
    if actnorm:
        parts.append(ActNorm(input_dim))
    return parts


class AutoregressiveOptions(TypedDict, total=False):
    """Keyword options of every autoregressive factory (see :func:`maf`)."""

    permutation: Permutation
    batch_norm: bool
    residual: bool
    activation: Callable[[], nn.Module]
    seed: int
    sequential: SequentialMethod
    actnorm: bool


class AffineAutoregressiveOptions(AutoregressiveOptions, AffineOptions, total=False):
    """Keyword options of :func:`maf`, :func:`iaf` and their conditional forms."""


def _affine_stack(
    factory: str,
    input_dim: int,
    context_dim: int,
    parallel: Parallel,
    hidden_dims: Sequence[int] | None,
    num_transforms: int,
    options: AffineAutoregressiveOptions,
) -> list[nn.Module]:
    check_options(factory, options, AffineAutoregressiveOptions)
    elementwise, rest = affine_map(options)
    return autoregressive_stack(input_dim, context_dim, parallel, hidden_dims, num_transforms, elementwise, **rest)


def maf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AffineAutoregressiveOptions],
) -> FlowStack:
    """A Masked Autoregressive Flow: ``num_transforms`` MAF layers, one :class:`FlowStack`.

    ``log_prob`` of any data costs one MADE pass per layer; sampling is sequential in
    ``D`` but, with the default ``sequential="incremental"``, costs the arithmetic of
    one pass plus ``D`` small steps.

    Args:
        input_dim: the event size D.
        hidden_dims: hidden widths of each MADE (default ``[max(64, 4 D)] * 2``).
        num_transforms: number of MAF layers.
        permutation: ``"reversed"`` (default: alternate natural and reversed orders), ``"random"``
            or ``"none"``, folded into each MADE's order (``"reverse"`` is a deprecated spelling).
        batch_norm: a :class:`BatchNorm` between layers, as in the MAF paper (default False).
        residual: residual connections inside each MADE (default False).
        activation: the MADE's nonlinearity class (default ``nn.ReLU``).
        scale: ``"softclamp"`` (default) or ``"gate"``
            (see :func:`~pyro_nf.transforms.elementwise.shift_and_log_scale`).
        log_scale_bound: bound of the soft clamp on the log-scale (default 3).
        seed: seed for random orders (default 0).
        sequential: how sampling (the sequential direction) is computed: ``"incremental"``
            (default; one network pass of work plus ``D`` small steps, see
            :meth:`pyro_nf.nn.MADE.sequential`) or ``"reference"`` (``D`` full MADE passes).
        actnorm: an :class:`~pyro_nf.transforms.normalization.ActNorm` first on the data side,
            initialised from the first training batch (default False): the flow then learns at the
            same scale whatever the units of the data, and keeps float32 precision in both
            directions (``docs/families/precision.md``). Use it to fit data that are not
            standardised.

    Example::

        >>> import pyro.distributions as dist
        >>> flow = maf(2, hidden_dims=[32, 32])
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
        >>> d.log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
    """
    return FlowStack(_affine_stack("maf", input_dim, 0, "inverse", hidden_dims, num_transforms, options))  # type: ignore[arg-type]


def iaf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AffineAutoregressiveOptions],
) -> FlowStack:
    """An Inverse Autoregressive Flow: sampling (and ``log_prob`` of its own samples) in one pass.

    Same options as :func:`maf`. The density of arbitrary data is sequential in ``D``;
    with the default ``sequential="incremental"`` it costs the arithmetic of one MADE
    pass plus ``D`` small steps per layer (``"reference"``: ``D`` passes), so an IAF can
    also be trained on data.

    Example::

        >>> from functools import partial
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> guide = AutoNormalizingFlow(lambda: None, partial(iaf, hidden_dims=[16]))
    """
    return FlowStack(_affine_stack("iaf", input_dim, 0, "forward", hidden_dims, num_transforms, options))  # type: ignore[arg-type]


def conditional_maf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AffineAutoregressiveOptions],
) -> ConditionalFlowStack:
    """A MAF whose every MADE reads a context; ``.condition(context)`` gives a :class:`FlowStack`.

    Same options as :func:`maf`.

    Example::

        >>> flow = conditional_maf(2, 3, hidden_dims=[16])
        >>> flow.condition(torch.randn(3)).inverse_and_log_det(torch.randn(5, 2))[1].shape
        torch.Size([5])
    """
    check_positive_int(context_dim, "context_dim")
    parts = _affine_stack("conditional_maf", input_dim, context_dim, "inverse", hidden_dims, num_transforms, options)
    return ConditionalFlowStack(parts)  # type: ignore[arg-type]


def conditional_iaf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AffineAutoregressiveOptions],
) -> ConditionalFlowStack:
    """An IAF whose every MADE reads a context, as in amortized VAE posteriors (Kingma et al. 2016).

    Same options as :func:`maf`.

    Example::

        >>> flow = conditional_iaf(2, 3, hidden_dims=[16])
        >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """
    check_positive_int(context_dim, "context_dim")
    parts = _affine_stack("conditional_iaf", input_dim, context_dim, "forward", hidden_dims, num_transforms, options)
    return ConditionalFlowStack(parts)  # type: ignore[arg-type]
