"""Masked autoregressive flows: MAF and IAF.

Both use the same layer, ``x_i = z_i * exp(alpha_i) + mu_i``, with
``(mu_i, alpha_i)`` given by a :class:`~pyro_nf.nn.MADE`; they differ in which
side the MADE reads (forward maps base ``z`` to data ``x``, as in Pyro):

- **MAF** (``parallel="inverse"``): ``(mu, alpha) = MADE(x)``. The density of
  any data, ``z = (x - mu) * exp(-alpha)``, is one MADE pass; sampling is
  sequential (``D`` passes). Use it as a density model.
- **IAF** (``parallel="forward"``): ``(mu, alpha) = MADE(z)``. Sampling, and the
  density of its own samples, are one pass; the density of arbitrary data is
  sequential. Use it as a variational posterior (a guide).

In both, ``log|det dx/dz| = sum_i alpha_i``.

The sequential direction (MAF sampling, IAF density of arbitrary data) runs
incrementally by default (``sequential="incremental"``, see
:meth:`pyro_nf.nn.MADE.sequential`): the MADE's hidden units are computed once,
degree block by degree block, as the solution fills in, so it costs the
arithmetic of one network pass plus ``D`` small steps instead of ``D`` passes.
``sequential="reference"`` runs the plain ``D`` passes (same numbers).

Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017.
Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypedDict

import torch
from pyro.distributions import ConditionalTransformModule
from torch import Tensor, nn

from pyro_nf.core import (
    ConditionalFlowStack,
    FlowStack,
    FlowTransform,
    FlowTransformModule,
    check_context,
)
from pyro_nf.nn.made import MADE, Order, SequentialMethod, check_sequential_method
from pyro_nf.transforms.affine import Scale, check_scale, shift_and_log_scale
from pyro_nf.transforms.normalization import BatchNorm

if TYPE_CHECKING:
    from typing_extensions import Unpack

Parallel = Literal["forward", "inverse"]
Permutation = Literal["reverse", "random", "none"]


class ConditionedAffineAutoregressive(FlowTransform):
    """The math of one affine autoregressive layer, given a MADE and an optional context.

    Args:
        made: a :class:`MADE` with ``num_params=2``.
        parallel: ``"inverse"`` for a MAF layer, ``"forward"`` for an IAF layer.
        context: the context tensor (``(..., context_dim)``) or None.
        scale: ``"softclamp"`` or ``"gate"`` (see :mod:`pyro_nf.transforms.affine`).
        log_scale_bound: the soft clamp's bound ``B``.
        cache_size: 1 to keep the last pair computed (see :class:`~pyro_nf.core.FlowTransform`), or 0.
        sequential: how the sequential direction is solved: ``"incremental"`` (one network
            pass of work, default) or ``"reference"`` (``D`` MADE passes).
    """

    def __init__(
        self,
        made: MADE,
        parallel: Parallel = "inverse",
        context: Tensor | None = None,
        scale: Scale = "softclamp",
        log_scale_bound: float = 3.0,
        cache_size: int = 1,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__(cache_size=cache_size)
        if parallel not in ("forward", "inverse"):
            raise ValueError(f"parallel: expected 'forward' or 'inverse', got {parallel!r}")
        check_scale(scale, log_scale_bound)
        check_sequential_method(sequential)
        self.sequential = sequential
        self.made = made
        self.parallel = parallel
        self.context = context
        self.scale = scale
        self.log_scale_bound = log_scale_bound
        self.input_shape = (made.input_dim,)

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return (self.made, self.context)

    def _params(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.made(inputs, self.context).chunk(2, dim=-1)
        return shift_and_log_scale(a, b, self.scale, self.log_scale_bound)

    def _broadcast(self, v: Tensor) -> Tensor:
        """Expand ``v`` to the batch shape it shares with the context."""
        if self.context is None:
            return v
        batch = torch.broadcast_shapes(v.shape[:-1], self.context.shape[:-1])
        return v.expand(*batch, v.shape[-1])

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._broadcast(x)
        if self.parallel == "forward":
            mu, alpha = self._params(x)
            return x * alpha.exp() + mu, alpha.sum(-1)
        return self._sequential(x, forward=True)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y = self._broadcast(y)
        if self.parallel == "inverse":
            mu, alpha = self._params(y)
            return (y - mu) * (-alpha).exp(), alpha.sum(-1)
        return self._sequential(y, forward=False)

    def _sequential(self, given: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        """Solve the sequential direction with :meth:`MADE.sequential <pyro_nf.nn.MADE.sequential>`.

        ``forward`` solves ``x_i = z_i exp(alpha_i(x_<i)) + mu_i(x_<i)`` for ``x`` given
        ``z`` (MAF sampling), otherwise ``z_i = (x_i - mu_i(z_<i)) exp(-alpha_i(z_<i))``
        for ``z`` given ``x`` (IAF density). ``self.sequential`` picks the incremental
        pass or the ``D``-pass reference.
        """
        scale, bound = self.scale, self.log_scale_bound

        def solve(g: Tensor, raw_shift: Tensor, raw_scale: Tensor) -> Tensor:
            mu, alpha = shift_and_log_scale(raw_shift, raw_scale, scale, bound)
            return g * alpha.exp() + mu if forward else (g - mu) * (-alpha).exp()

        out, params = self.made.sequential(given, solve, self.context, self.sequential)
        raw_shift, raw_scale = params.chunk(2, dim=-1)
        _, alpha = shift_and_log_scale(raw_shift, raw_scale, scale, bound)
        return out, alpha.sum(-1)


class AffineAutoregressive(ConditionedAffineAutoregressive, FlowTransformModule):
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
        log_scale_bound: float = 3.0,
        cache_size: int = 1,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__(made, parallel, None, scale, log_scale_bound, cache_size, sequential)


class ConditionalAffineAutoregressive(ConditionalTransformModule):
    """A MAF/IAF layer whose MADE also reads a context; ``.condition(context)`` gives the layer."""

    def __init__(
        self,
        made: MADE,
        parallel: Parallel = "inverse",
        scale: Scale = "softclamp",
        log_scale_bound: float = 3.0,
        sequential: SequentialMethod = "incremental",
    ) -> None:
        super().__init__()
        if made.context_dim < 1:
            raise ValueError("ConditionalAffineAutoregressive: the MADE needs context_dim >= 1")
        check_scale(scale, log_scale_bound)
        check_sequential_method(sequential)
        self.made = made
        self.parallel = parallel
        self.scale = scale
        self.log_scale_bound = log_scale_bound
        self.sequential = sequential

    def condition(self, context: Tensor) -> ConditionedAffineAutoregressive:
        check_context(context, self.made.context_dim, self.made.output_layer.weight)
        return ConditionedAffineAutoregressive(
            self.made, self.parallel, context, self.scale, self.log_scale_bound, sequential=self.sequential
        )


def default_hidden_dims(input_dim: int) -> list[int]:
    """Two hidden layers of ``max(64, 4 D)`` units."""
    return [max(64, 4 * input_dim)] * 2


def _orders(input_dim: int, num_transforms: int, permutation: Permutation, seed: int) -> list[Order | Tensor]:
    if permutation == "none":
        return ["natural"] * num_transforms
    if permutation == "reverse":
        return ["natural" if i % 2 == 0 else "reversed" for i in range(num_transforms)]
    if permutation == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.randperm(input_dim, generator=generator) for _ in range(num_transforms)]
    raise ValueError(f"permutation: expected 'reverse', 'random' or 'none', got {permutation!r}")


def _check_counts(input_dim: int, num_transforms: int, context_dim: int | None = None) -> None:
    if not isinstance(input_dim, int) or isinstance(input_dim, bool) or input_dim < 1:
        raise ValueError(f"input_dim: expected a positive int, got {input_dim!r}")
    if not isinstance(num_transforms, int) or num_transforms < 1:
        raise ValueError(f"num_transforms: expected a positive int, got {num_transforms!r}")
    if context_dim is not None and (not isinstance(context_dim, int) or context_dim < 1):
        raise ValueError(f"context_dim: expected a positive int, got {context_dim!r}")


class AutoregressiveOptions(TypedDict, total=False):
    """Keyword options shared by :func:`maf`, :func:`iaf` and their conditional forms (see :func:`maf`)."""

    permutation: Permutation
    batch_norm: bool
    residual: bool
    activation: Callable[[], nn.Module]
    scale: Scale
    log_scale_bound: float
    seed: int
    sequential: SequentialMethod


def _check_options(factory: str, options: dict[str, object]) -> None:
    unknown = sorted(set(options) - set(AutoregressiveOptions.__annotations__))
    if unknown:
        raise TypeError(
            f"{factory}: unknown option(s) {unknown}; expected any of {sorted(AutoregressiveOptions.__annotations__)}"
        )


def _autoregressive_stack(
    input_dim: int,
    context_dim: int,
    parallel: Parallel,
    hidden_dims: Sequence[int] | None,
    num_transforms: int,
    *,
    permutation: Permutation = "reverse",
    batch_norm: bool = False,
    residual: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    scale: Scale = "softclamp",
    log_scale_bound: float = 3.0,
    seed: int = 0,
    sequential: SequentialMethod = "incremental",
) -> list[nn.Module]:
    _check_counts(input_dim, num_transforms, context_dim or None)
    check_sequential_method(sequential)
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    parts: list[nn.Module] = []
    for i, order in enumerate(_orders(input_dim, num_transforms, permutation, seed)):
        if batch_norm and i > 0:
            parts.append(BatchNorm(input_dim))
        made = MADE(input_dim, hidden, 2, context_dim, order, residual, activation)
        if context_dim:
            parts.append(ConditionalAffineAutoregressive(made, parallel, scale, log_scale_bound, sequential))
        else:
            parts.append(AffineAutoregressive(made, parallel, scale, log_scale_bound, sequential=sequential))
    return parts


def maf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AutoregressiveOptions],
) -> FlowStack:
    """A Masked Autoregressive Flow: ``num_transforms`` MAF layers, one :class:`FlowStack`.

    ``log_prob`` of any data costs one MADE pass per layer; sampling is sequential in
    ``D`` but, with the default ``sequential="incremental"``, costs the arithmetic of
    one pass plus ``D`` small steps.
    The permutation between layers is folded into each MADE's input order
    (``"reverse"`` alternates natural and reversed orders, ``"random"`` draws
    orders from ``seed``), which is the same model without a gather.

    Args:
        input_dim: the event size D.
        hidden_dims: hidden widths of each MADE (default ``[max(64, 4 D)] * 2``).
        num_transforms: number of MAF layers.
        permutation: ``"reverse"``, ``"random"`` or ``"none"``.
        batch_norm: a :class:`BatchNorm` between layers, as in the MAF paper.
        residual: residual connections inside each MADE.
        activation: the MADE's nonlinearity class.
        scale: ``"softclamp"`` (default) or ``"gate"``.
        log_scale_bound: bound of the soft clamp on the log-scale.
        seed: seed for random orders.
        sequential: how sampling (the sequential direction) is computed: ``"incremental"``
            (default; one network pass of work plus ``D`` small steps, see
            :meth:`pyro_nf.nn.MADE.sequential`) or ``"reference"`` (``D`` full MADE passes).

    Example::

        >>> import pyro.distributions as dist
        >>> flow = maf(2, hidden_dims=[32, 32])
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
        >>> d.log_prob(torch.randn(7, 2)).shape
        torch.Size([7])
    """
    _check_options("maf", dict(options))
    return FlowStack(_autoregressive_stack(input_dim, 0, "inverse", hidden_dims, num_transforms, **options))


def iaf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AutoregressiveOptions],
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
    _check_options("iaf", dict(options))
    return FlowStack(_autoregressive_stack(input_dim, 0, "forward", hidden_dims, num_transforms, **options))


def conditional_maf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AutoregressiveOptions],
) -> ConditionalFlowStack:
    """A MAF whose every MADE reads a context; ``.condition(context)`` gives a :class:`FlowStack`.

    Example::

        >>> flow = conditional_maf(2, 3, hidden_dims=[16])
        >>> flow.condition(torch.randn(3)).inverse_and_log_det(torch.randn(5, 2))[1].shape
        torch.Size([5])
    """
    _check_options("conditional_maf", dict(options))
    return ConditionalFlowStack(
        _autoregressive_stack(input_dim, context_dim, "inverse", hidden_dims, num_transforms, **options)
    )


def conditional_iaf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 5,
    **options: Unpack[AutoregressiveOptions],
) -> ConditionalFlowStack:
    """An IAF whose every MADE reads a context, as in amortized VAE posteriors (Kingma et al. 2016).

    Example::

        >>> flow = conditional_iaf(2, 3, hidden_dims=[16])
        >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """
    _check_options("conditional_iaf", dict(options))
    return ConditionalFlowStack(
        _autoregressive_stack(input_dim, context_dim, "forward", hidden_dims, num_transforms, **options)
    )
