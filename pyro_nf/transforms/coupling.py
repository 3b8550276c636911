"""Affine coupling layers for vectors (RealNVP).

The input splits into a kept part ``x_a`` and a transformed part ``x_b``:

.. math::

    y_a = x_a, \\qquad y_b = x_b \\odot \\exp(\\alpha(x_a)) + \\mu(x_a),
    \\qquad \\log|\\det \\partial y / \\partial x| = \\textstyle\\sum \\alpha(x_a).

Both directions cost one network pass. Layers alternate which part is kept:
``mask="half"`` splits into contiguous halves (even layers keep the first
``floor(D/2)`` entries, odd layers the last ``floor(D/2)``), ``mask="alternate"``
keeps the even-indexed entries in even layers and the odd-indexed ones in odd
layers (the checkerboard of the RealNVP paper, for vectors). With ``D = 1`` the
kept part is empty and the layer is a learned element-wise affine map.

Dinh et al., "Density estimation using Real NVP", ICLR 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pyro.distributions import ConditionalTransformModule
from torch import Tensor, nn

from pyro_nf.core import ConditionalFlowStack, FlowStack, FlowTransform, FlowTransformModule, check_context
from pyro_nf.nn.nets import MLP
from pyro_nf.transforms.affine import Scale, check_scale, shift_and_log_scale
from pyro_nf.transforms.autoregressive import _check_counts, default_hidden_dims
from pyro_nf.transforms.normalization import BatchNorm

Mask = Literal["half", "alternate"]


def coupling_mask(input_dim: int, layer: int, mask: Mask = "half") -> Tensor:
    """Boolean mask of the kept entries of coupling layer number ``layer``."""
    index = torch.arange(input_dim)
    if mask == "half":
        kept = index < input_dim // 2 if layer % 2 == 0 else index >= input_dim - input_dim // 2
    elif mask == "alternate":
        kept = index % 2 == layer % 2
        if input_dim == 1:
            kept = torch.zeros(1, dtype=torch.bool)
    else:
        raise ValueError(f"mask: expected 'half' or 'alternate', got {mask!r}")
    return kept


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
        >>> kept.tolist(), moved.tolist(), split.join(kept, moved).tolist()
        ([0.0, 1.0], [2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    """

    kept_index: Tensor
    moved_index: Tensor
    restore_index: Tensor

    def __init__(self, kept: Tensor) -> None:
        super().__init__()
        for name, index in zip(("kept_index", "moved_index", "restore_index"), split_indices(kept)):
            self.register_buffer(name, index)
        self.input_dim = kept.numel()
        self.block = contiguous_split(kept)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_kept, x_moved)``."""
        block = self.block
        if block is None:
            return x.index_select(-1, self.kept_index), x.index_select(-1, self.moved_index)
        cut = block[1] if block[0] else x.shape[-1] - block[1]
        first, last = x[..., :cut], x[..., cut:]
        return (first, last) if block[0] else (last, first)

    def join(self, y_kept: Tensor, y_moved: Tensor) -> Tensor:
        """The inverse of :meth:`split`."""
        block = self.block
        if block is None:
            return torch.cat([y_kept, y_moved], -1).index_select(-1, self.restore_index)
        return torch.cat([y_kept, y_moved] if block[0] else [y_moved, y_kept], -1)


class ConditionedAffineCoupling(FlowTransform):
    """The math of an affine coupling layer, given its network, split and an optional context."""

    parallel = "both"

    def __init__(
        self,
        net: nn.Module,
        split: CouplingSplit,
        context: Tensor | None = None,
        scale: Scale = "softclamp",
        log_scale_bound: float = 3.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        check_scale(scale, log_scale_bound)
        self.net = net
        self.split = split
        self.context = context
        self.scale = scale
        self.log_scale_bound = log_scale_bound
        self.input_shape = (split.input_dim,)

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return (self.net, self.context)

    def _couple(self, x: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        x_a, x_b = self.split.split(x)
        a, b = self.net(x_a, self.context).chunk(2, dim=-1)
        mu, alpha = shift_and_log_scale(a, b, self.scale, self.log_scale_bound)
        y_b = x_b * alpha.exp() + mu if forward else (x_b - mu) * (-alpha).exp()
        y_a = x_a.expand(*y_b.shape[:-1], x_a.shape[-1])
        return self.split.join(y_a, y_b), alpha.sum(-1)

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, forward=True)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(y, forward=False)


class AffineCoupling(ConditionedAffineCoupling, FlowTransformModule):
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
        log_scale_bound: float = 3.0,
        cache_size: int = 1,
    ) -> None:
        super().__init__(net, CouplingSplit(kept), None, scale, log_scale_bound, cache_size)


class ConditionalAffineCoupling(ConditionalTransformModule):
    """An affine coupling layer whose network also reads a context."""

    def __init__(self, net: MLP, kept: Tensor, scale: Scale = "softclamp", log_scale_bound: float = 3.0) -> None:
        super().__init__()
        check_scale(scale, log_scale_bound)
        self.net = net
        self.scale = scale
        self.log_scale_bound = log_scale_bound
        self.split = CouplingSplit(kept)

    def condition(self, context: Tensor) -> ConditionedAffineCoupling:
        check_context(context, self.net.context_dim, self.net.output_layer.weight)
        return ConditionedAffineCoupling(self.net, self.split, context, self.scale, self.log_scale_bound)


def _coupling_stack(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None,
    num_transforms: int,
    mask: Mask,
    batch_norm: bool,
    activation: Callable[[], nn.Module],
    scale: Scale,
    log_scale_bound: float,
) -> list[nn.Module]:
    _check_counts(input_dim, num_transforms, context_dim or None)
    hidden = list(hidden_dims) if hidden_dims is not None else default_hidden_dims(input_dim)
    parts: list[nn.Module] = []
    for i in range(num_transforms):
        if batch_norm and i > 0:
            parts.append(BatchNorm(input_dim))
        kept = coupling_mask(input_dim, i, mask)
        num_kept = int(kept.sum())
        net = MLP(num_kept, hidden, 2 * (input_dim - num_kept), context_dim, activation)
        if context_dim:
            parts.append(ConditionalAffineCoupling(net, kept, scale, log_scale_bound))
        else:
            parts.append(AffineCoupling(net, kept, scale, log_scale_bound))
    return parts


def realnvp(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 6,
    *,
    mask: Mask = "half",
    batch_norm: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    scale: Scale = "softclamp",
    log_scale_bound: float = 3.0,
) -> FlowStack:
    """RealNVP for vectors: ``num_transforms`` affine couplings with alternating masks.

    Both ``log_prob`` and sampling cost one network pass per layer.

    Args:
        input_dim: the event size D.
        hidden_dims: hidden widths of each coupling network (default ``[max(64, 4 D)] * 2``).
        num_transforms: number of coupling layers (even, so every entry is moved equally often).
        mask: ``"half"`` or ``"alternate"`` (see :func:`coupling_mask`).
        batch_norm: a :class:`BatchNorm` between layers, as in the RealNVP paper.
        activation: the networks' nonlinearity class.
        scale: ``"softclamp"`` (default) or ``"gate"``.
        log_scale_bound: bound of the soft clamp on the log-scale.

    Example::

        >>> flow = realnvp(4, hidden_dims=[32])
        >>> x = torch.randn(6, 4)
        >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-6)
        True
    """
    return FlowStack(
        _coupling_stack(input_dim, 0, hidden_dims, num_transforms, mask, batch_norm, activation, scale, log_scale_bound)
    )


def conditional_realnvp(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_transforms: int = 6,
    *,
    mask: Mask = "half",
    batch_norm: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
    scale: Scale = "softclamp",
    log_scale_bound: float = 3.0,
) -> ConditionalFlowStack:
    """RealNVP whose coupling networks also read a context; see :func:`realnvp`.

    Example::

        >>> flow = conditional_realnvp(4, 2, hidden_dims=[32])
        >>> flow.condition(torch.randn(2))(torch.randn(6, 4)).shape
        torch.Size([6, 4])
    """
    return ConditionalFlowStack(
        _coupling_stack(
            input_dim, context_dim, hidden_dims, num_transforms, mask, batch_norm, activation, scale, log_scale_bound
        )
    )
