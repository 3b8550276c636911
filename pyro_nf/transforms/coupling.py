"""Coupling layers: one skeleton (split, condition, transform element-wise, merge), and RealNVP for vectors.

The input splits into a kept part ``x_a`` and a transformed part ``x_b``; a network of
the kept part (and of a context) gives the raw parameters of an element-wise map ``g``
(:mod:`pyro_nf.transforms.elementwise`):

.. math::

    y_a = x_a, \\qquad y_b = g(x_b; \\theta(x_a)), \\qquad
    \\log|\\det \\partial y / \\partial x| = \\textstyle\\sum \\log g'(x_b; \\theta(x_a)).

Both directions cost one network pass. :class:`ConditionedCoupling` is that skeleton; the
split decides what is kept (a :class:`CouplingSplit` of a vector here, the channel and
checkerboard splits of :mod:`pyro_nf.transforms.image_coupling` for images) and the map
what is done to the rest (affine for RealNVP, additive for NICE, the rational-quadratic
spline for neural spline flows).

RealNVP for vectors (:func:`realnvp`) alternates which part is kept: ``mask="half"``
splits into contiguous halves (even layers keep the first ``floor(D/2)`` entries, odd
layers the last ``floor(D/2)``), ``mask="alternate"`` keeps the even-indexed entries in
even layers and the odd-indexed ones in odd layers (the checkerboard of the RealNVP paper,
for vectors). With ``D = 1`` the kept part is empty and the layer is a learned
element-wise map.

Dinh et al., "Density estimation using Real NVP", ICLR 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict

import torch
from torch import Tensor, nn
from torch.distributions import constraints

from pyro_nf.checks import check_choice, check_options, check_positive_int
from pyro_nf.conditional import ConditionalFlowStack, ConditionalFlowTransformModule
from pyro_nf.core import FlowStack, FlowTransform, FlowTransformModule
from pyro_nf.nn.nets import MLP, default_hidden_dims
from pyro_nf.transforms.elementwise import (
    LOG_SCALE_BOUND,
    AffineMap,
    AffineOptions,
    ElementwiseMap,
    Params,
    Scale,
    affine_map,
)
from pyro_nf.transforms.normalization import ActNorm, BatchNorm

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["coupling_mask", "affine_coupling", "realnvp", "conditional_realnvp"]  # the factories first
__all__ += ["Split", "CouplingSplit", "ConditionedCoupling", "Coupling", "ConditionalCoupling"]
__all__ += ["ConditionedAffineCoupling", "AffineCoupling", "ConditionalAffineCoupling"]
__all__ += ["CouplingOptions", "AffineCouplingOptions", "split_indices", "contiguous_split", "coupling_stack"]

Mask = Literal["half", "alternate"]
MASKS: tuple[Mask, ...] = ("half", "alternate")


class Split(Protocol):
    """Which part of the input a coupling layer keeps, and how the network's output lays out the parameters."""

    input_shape: tuple[int, ...]
    event_dims: int

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(network input, the part the map transforms)``."""
        ...

    def params(self, raw: Tensor, num_params: int) -> Params:
        """The map's ``P`` raw parameters, each shaped like the transformed part, from the network's output."""
        ...

    def join(self, x_a: Tensor, x_b: Tensor, y_b: Tensor) -> Tensor:
        """The output from the kept part, the transformed part and its image."""
        ...

    def log_det(self, ladj: Tensor) -> Tensor:
        """The element-wise ``log g'`` summed over the event (of the entries the layer moves)."""
        ...


def coupling_mask(input_dim: int, layer: int, mask: Mask = "half") -> Tensor:
    """Boolean mask of the kept entries of coupling layer number ``layer``."""
    check_choice(mask, MASKS, "mask")
    index = torch.arange(input_dim)
    if mask == "half":
        return index < input_dim // 2 if layer % 2 == 0 else index >= input_dim - input_dim // 2
    if input_dim == 1:
        return torch.zeros(1, dtype=torch.bool)
    return index % 2 == layer % 2


def split_indices(kept: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of the kept entries, of the moved ones, and the permutation that restores the order."""
    kept_index = kept.nonzero().flatten()
    moved_index = (~kept).nonzero().flatten()
    return kept_index, moved_index, torch.cat([kept_index, moved_index]).argsort()


def contiguous_split(kept: Tensor) -> tuple[bool, int] | None:
    """``(kept_first, num_kept)`` when the kept entries are one block at the start or the end, else None.

    Such a split (the ``"half"`` masks) is done with slices and one concatenation instead of three
    gathers, whose backward passes are scatters.
    """
    num_kept = int(kept.sum())
    if bool(kept[:num_kept].all()):
        return True, num_kept
    if bool(kept[kept.numel() - num_kept :].all()):
        return False, num_kept
    return None


class CouplingSplit(nn.Module):
    """Which entries of a vector a coupling layer keeps, worked out once from its boolean mask.

    The index buffers follow ``.to(device)`` and ``state_dict``; a contiguous split uses slices.

    Example::

        >>> split = CouplingSplit(coupling_mask(5, 0))
        >>> kept, moved = split.split(torch.arange(5.0))
        >>> kept.tolist(), moved.tolist(), split.join(kept, moved, moved).tolist()
        ([0.0, 1.0], [2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    """

    event_dims = 1
    kept_index: Tensor
    moved_index: Tensor
    restore_index: Tensor

    def __init__(self, kept: Tensor) -> None:
        super().__init__()
        for name, index in zip(("kept_index", "moved_index", "restore_index"), split_indices(kept)):
            self.register_buffer(name, index)
        self.input_dim = kept.numel()
        self.input_shape: tuple[int, ...] = (self.input_dim,)
        self.block = contiguous_split(kept)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_kept, x_moved)``."""
        block = self.block
        if block is None:
            return x.index_select(-1, self.kept_index), x.index_select(-1, self.moved_index)
        cut = block[1] if block[0] else x.shape[-1] - block[1]
        first, last = x[..., :cut], x[..., cut:]
        return (first, last) if block[0] else (last, first)

    def params(self, raw: Tensor, num_params: int) -> Tensor:
        """The network's output ``(..., P * D_b)`` as the map's parameters ``(P, ..., D_b)``: a view, no copy."""
        return raw.unflatten(-1, (num_params, -1)).movedim(-2, 0)

    def join(self, x_a: Tensor, x_b: Tensor, y_b: Tensor) -> Tensor:
        """The inverse of :meth:`split` (the kept part broadcast to the batch of ``y_b``)."""
        y_a = x_a.expand(*y_b.shape[:-1], x_a.shape[-1])
        block = self.block
        if block is None:
            return torch.cat([y_a, y_b], -1).index_select(-1, self.restore_index)
        return torch.cat([y_a, y_b] if block[0] else [y_b, y_a], -1)

    def log_det(self, ladj: Tensor) -> Tensor:
        return ladj.sum(-1)


class ConditionedCoupling(FlowTransform):
    """The math of a coupling layer, given its network, split, element-wise map and an optional context.

    Args:
        net: the conditioner, called as ``net(x_a)`` (``net(x_a, context)`` with a context); its
            output is laid out by the split into the map's ``P`` raw parameters.
        split: what is kept (see :class:`Split`).
        elementwise: the element-wise map (see :mod:`pyro_nf.transforms.elementwise`).
        context: the context ``(..., context_dim)`` or None.
        cache_size: 1 to keep the last pair computed (see :class:`~pyro_nf.core.FlowTransform`), or 0.
    """

    parallel = "both"

    def __init__(
        self,
        net: nn.Module,
        split: Split,
        elementwise: ElementwiseMap,
        context: Tensor | None = None,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if not isinstance(elementwise, ElementwiseMap):
            raise TypeError(f"elementwise: expected an element-wise map, got {type(elementwise).__name__}")
        self.net = net
        self.split = split
        self.elementwise = elementwise
        self.context = context
        self.input_shape = tuple(split.input_shape)
        if split.event_dims != 1:
            self.domain = self.codomain = constraints.independent(constraints.real, split.event_dims)

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return (self.net, self.context)

    def _couple(self, x: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        x_a, x_b = self.split.split(x)
        raw = self.net(x_a) if self.context is None else self.net(x_a, self.context)
        if raw.dtype != x.dtype:  # a network under autocast (bf16): the map and its log-det in x's precision
            raw = raw.to(x.dtype)
        params = self.split.params(raw, self.elementwise.num_params)
        g = self.elementwise.forward if forward else self.elementwise.inverse
        y_b, ladj = g(x_b, params)
        y = self.split.join(x_a, x_b, y_b)
        if self.elementwise.volume_preserving:  # zeros that stay in the graph, so backward() runs on a kept pair
            return y, (params[0].flatten()[:1] * 0).sum().expand(y.shape[: y.dim() - self.split.event_dims])
        return y, self.split.log_det(ladj)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, forward=True)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(y, forward=False)


class Coupling(ConditionedCoupling, FlowTransformModule):
    """A learnable coupling layer with any element-wise map (its network and split are submodules)."""

    def __init__(self, net: nn.Module, split: Split, elementwise: ElementwiseMap, cache_size: int = 1) -> None:
        super().__init__(net, split, elementwise, None, cache_size)


class ConditionalCoupling(ConditionalFlowTransformModule):
    """A coupling layer whose network also reads a context; ``.condition(context)`` gives the layer."""

    def __init__(self, net: nn.Module, split: Split, elementwise: ElementwiseMap, context_dim: int) -> None:
        super().__init__()
        self.net = net
        self.split = split
        self.elementwise = elementwise
        self.context_dim = check_positive_int(context_dim, "context_dim")

    def _condition(self, context: Tensor) -> ConditionedCoupling:
        return ConditionedCoupling(self.net, self.split, self.elementwise, context)


class ConditionedAffineCoupling(ConditionedCoupling):
    """An affine coupling layer at one context: :class:`ConditionedCoupling` with an :class:`AffineMap`."""

    def __init__(
        self,
        net: nn.Module,
        split: CouplingSplit,
        context: Tensor | None = None,
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        cache_size: int = 1,
    ) -> None:
        super().__init__(net, split, AffineMap(scale, log_scale_bound), context, cache_size)


class AffineCoupling(Coupling):
    """A learnable affine coupling layer keeping the entries where ``kept`` is True.

    Example::

        >>> layer = AffineCoupling(MLP(2, [32], 4), coupling_mask(4, 0))
        >>> y, log_det = layer.forward_and_log_det(torch.randn(3, 4))
        >>> log_det.tolist()  # the network starts at zero: the identity
        [0.0, 0.0, 0.0]
    """

    def __init__(
        self,
        net: nn.Module,
        kept: Tensor,
        scale: Scale = "softclamp",
        log_scale_bound: float = LOG_SCALE_BOUND,
        cache_size: int = 1,
    ) -> None:
        super().__init__(net, CouplingSplit(kept), AffineMap(scale, log_scale_bound), cache_size)


class ConditionalAffineCoupling(ConditionalCoupling):
    """An affine coupling layer whose network also reads a context."""

    def __init__(
        self, net: MLP, kept: Tensor, scale: Scale = "softclamp", log_scale_bound: float = LOG_SCALE_BOUND
    ) -> None:
        super().__init__(net, CouplingSplit(kept), AffineMap(scale, log_scale_bound), net.context_dim)


def affine_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    layer: int = 0,
    mask: Mask = "half",
    activation: Callable[[], nn.Module] = nn.ReLU,
    scale: Scale = "softclamp",
    log_scale_bound: float = LOG_SCALE_BOUND,
) -> AffineCoupling:
    """One :class:`AffineCoupling` over ``(input_dim,)`` with its network built to fit (``layer`` picks the mask).

    Example::

        >>> affine_coupling(4, [16], layer=1)(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    kept = coupling_mask(input_dim, layer, mask)
    num_kept = int(kept.sum())
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    net = MLP(num_kept, hidden, 2 * (input_dim - num_kept), 0, activation)
    return AffineCoupling(net, kept, scale, log_scale_bound)


def coupling_stack(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None,
    num_transforms: int,
    elementwise: ElementwiseMap,
    *,
    mask: Mask = "half",
    batch_norm: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    actnorm: bool = False,
) -> list[nn.Module]:
    """The layers of a vector coupling flow with any element-wise map (used by :func:`realnvp` and the spline flows).

    With ``actnorm`` an :class:`~pyro_nf.transforms.normalization.ActNorm` is the last part (the first data meet).
    """
    check_positive_int(input_dim, "input_dim")
    check_positive_int(num_transforms, "num_transforms")
    if context_dim:
        check_positive_int(context_dim, "context_dim")
    elif input_dim < 2:
        raise ValueError(
            f"input_dim: a coupling flow splits its input in two and needs input_dim >= 2, got {input_dim}; "
            "for one dimension use maf (or a conditional coupling flow, whose layers read the context)"
        )
    check_choice(mask, MASKS, "mask")
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    parts: list[nn.Module] = []
    for i in range(num_transforms):
        if batch_norm and i > 0:
            parts.append(BatchNorm(input_dim))
        split = CouplingSplit(coupling_mask(input_dim, i, mask))
        num_kept = split.kept_index.numel()
        net = MLP(num_kept, hidden, elementwise.num_params * (input_dim - num_kept), context_dim, activation)
        if context_dim:
            parts.append(ConditionalCoupling(net, split, elementwise, context_dim))
        else:
            parts.append(Coupling(net, split, elementwise))
    if actnorm:
        parts.append(ActNorm(input_dim))
    return parts


class CouplingOptions(TypedDict, total=False):
    """Keyword options of every vector coupling factory (see :func:`realnvp`)."""

    mask: Mask
    batch_norm: bool
    activation: Callable[[], nn.Module]
    actnorm: bool


class AffineCouplingOptions(CouplingOptions, AffineOptions, total=False):
    """Keyword options of :func:`realnvp` and :func:`conditional_realnvp`."""


def _affine_stack(
    factory: str,
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None,
    num_transforms: int,
    options: AffineCouplingOptions,
) -> list[nn.Module]:
    check_options(factory, options, AffineCouplingOptions)
    elementwise, rest = affine_map(options)
    return coupling_stack(input_dim, context_dim, hidden_dims, num_transforms, elementwise, **rest)


def realnvp(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 6,
    **options: Unpack[AffineCouplingOptions],
) -> FlowStack:
    """RealNVP for vectors: ``num_transforms`` affine couplings with alternating masks.

    Both ``log_prob`` and sampling cost one network pass per layer.

    Args:
        input_dim: the event size D.
        hidden_dims: hidden widths of each coupling network (default ``[max(64, 4 D)] * 2``).
        num_transforms: number of coupling layers (even, so every entry is moved equally often).
        mask: ``"half"`` (default) or ``"alternate"`` (see :func:`coupling_mask`).
        batch_norm: a :class:`BatchNorm` between layers, as in the RealNVP paper (default False).
        activation: the networks' nonlinearity class (default ``nn.ReLU``).
        scale: ``"softclamp"`` (default) or ``"gate"``.
        log_scale_bound: bound of the soft clamp on the log-scale (default 3).
        actnorm: an :class:`~pyro_nf.transforms.normalization.ActNorm` first on the data side,
            initialised from the first training batch (default False; see :func:`~pyro_nf.transforms.maf`).

    Example::

        >>> flow = realnvp(4, hidden_dims=[32])
        >>> x = torch.randn(6, 4)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-6)
        True
    """
    return FlowStack(_affine_stack("realnvp", input_dim, 0, hidden_dims, num_transforms, options))  # type: ignore[arg-type]


def conditional_realnvp(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 6,
    **options: Unpack[AffineCouplingOptions],
) -> ConditionalFlowStack:
    """RealNVP whose coupling networks also read a context; same options as :func:`realnvp`.

    Example::

        >>> flow = conditional_realnvp(4, 2, hidden_dims=[32])
        >>> flow.condition(torch.randn(2))(torch.randn(6, 4)).shape
        torch.Size([6, 4])
    """
    check_positive_int(context_dim, "context_dim")
    parts = _affine_stack("conditional_realnvp", input_dim, context_dim, hidden_dims, num_transforms, options)
    return ConditionalFlowStack(parts)  # type: ignore[arg-type]
