"""Vector fields for continuous normalizing flows: concat-squash layers over vectors and images.

A continuous normalizing flow integrates ``dz/dt = f(z, t)`` and, alongside,
the change of log-density (the instantaneous change of variables):

.. math::

    \\frac{d \\log p(z(t))}{dt} = -\\operatorname{Tr}\\frac{\\partial f}{\\partial z}(z(t), t).

This module holds the vector fields; the divergence estimators and the right-hand side
of a solve are in :mod:`pyro_nf.nn.divergence`.

- :class:`ConcatSquashLinear` and :class:`ODENet`: the time-conditioned
  vector field ``f``, built from concat-squash layers
  ``Linear(x) * sigmoid(W_g [t, c] + b_g) + W_b [t, c]`` (``c`` an optional
  context, for conditional flows).
- :class:`ConcatSquashConv2d` and :class:`ConvODENet`: the same over images
  ``(C, H, W)``, a convolution gated and shifted per channel by the time
  (FFJORD's multiscale image CNF).

Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable
Reversible Generative Models", ICLR 2019. Finlay et al., "How to train your
neural ODE: the world of Jacobian and kinetic regularization", ICML 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_nf.checks import check_image_shape, check_positive_int, check_positive_ints

Activation = Literal["softplus", "tanh", "elu", "silu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


def check_activation(activation: str) -> None:
    """Raise a ValueError listing the choices unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")


def time_and_context(t: Tensor, like: Tensor, context: Tensor | None, context_dim: int, who: str) -> Tensor:
    """The input ``h = [t, c]`` of the time gates and shifts: ``(1,)``, or ``(..., 1 + C)`` with a context.

    ``t`` is one time for the whole batch (a single number, as an ODE solver passes it) or a
    time per sample of batch shape ``(...)`` (flow matching evaluates the field at a time per
    sample), which gives ``h`` of shape ``(..., 1 [+ C])``. ``t`` goes to the dtype and device of
    ``like``; a context of ``context_dim > 0`` features is required (``who`` names the caller in
    the error) and its batch shape broadcasts against the times'.

    Example::

        >>> time_and_context(torch.tensor(0.5), torch.zeros(3), torch.ones(4, 2), 2, "net").shape
        torch.Size([4, 3])
        >>> time_and_context(torch.rand(4), torch.zeros(3), None, 0, "net").shape
        torch.Size([4, 1])
    """
    h = t.reshape(1).to(like) if t.numel() == 1 else t.to(like)[..., None]
    if not context_dim:
        return h
    if context is None:
        raise ValueError(f"{who}: expected a context of size {context_dim}, got None")
    batch = torch.broadcast_shapes(h.shape[:-1], context.shape[:-1])
    return torch.cat([h.expand(*batch, 1), context.expand(*batch, context_dim)], -1)


class ConcatSquashLinear(nn.Module):
    """A linear layer whose output is gated and shifted by the time (and a context).

    .. math::

        y = (W x + b) \\odot \\sigma(W_g h + b_g) + W_b h, \\qquad h = [t, c].

    Args:
        in_features: size of ``x``.
        out_features: size of ``y``.
        context_dim: size of the context ``c`` (0 for none).

    Example::

        >>> layer = ConcatSquashLinear(3, 8)
        >>> layer(torch.tensor(0.5), torch.randn(4, 3)).shape
        torch.Size([4, 8])
    """

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1 + context_dim, out_features)
        self.shift = nn.Linear(1 + context_dim, out_features, bias=False)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = time_and_context(t, x, context, self.context_dim, "ConcatSquashLinear")
        return torch.addcmul(self.shift(h), self.linear(x), torch.sigmoid(self.gate(h)))

    def zero_(self) -> ConcatSquashLinear:
        """Set the linear map and the shift to zero, so the layer outputs zero."""
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
            self.shift.weight.zero_()
        return self


class ODENet(nn.Module):
    """The vector field ``f(z, t[, c])``: concat-squash layers with a smooth activation.

    ``input_dim -> hidden_dims -> input_dim``, every layer a
    :class:`ConcatSquashLinear` reading the time (and the context). With
    ``zero_init=True`` the last layer starts at zero, so the flow starts at the
    identity (and the solver at its cheapest).

    One evaluation computes ``h = [t, c]`` once and every layer's gate and shift
    in one affine map (:meth:`gates_and_shifts`). Without a context the gate and
    the shift are the same for the whole batch, so they fold into the layer's
    weights, ``(W x + b) ⊙ g + s = (g ⊙ W) x + (b ⊙ g + s)``, at the cost of
    operations on the weights only: over the batch, an evaluation (and its
    backward passes) costs what a plain MLP of the same widths costs. The
    parameters are those of the :class:`ConcatSquashLinear` layers. A time per
    sample (``t`` of the batch shape, as flow matching evaluates the field) gives
    a gate and a shift per sample, like a context does.

    Args:
        input_dim: the event size D.
        hidden_dims: the hidden widths (a non-empty list).
        context_dim: size of the context (0 for an unconditional field).
        activation: one of ``"softplus"`` (default), ``"tanh"``, ``"elu"``, ``"silu"``; smooth, so
            the adaptive solver sees a smooth field.
        zero_init: start the last layer at zero.

    Example::

        >>> net = ODENet(2, [16, 16])
        >>> net(torch.tensor(0.0), torch.randn(5, 2)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        context_dim: int = 0,
        activation: Activation = "softplus",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(input_dim, "input_dim")
        hidden_dims = check_positive_ints(hidden_dims, "hidden_dims")
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim: expected a non-negative int, got {context_dim!r}")
        check_activation(activation)
        self.input_dim = input_dim
        self.event_shape: tuple[int, ...] = (input_dim,)
        self.context_dim = context_dim
        dims = [input_dim, *hidden_dims, input_dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b, context_dim) for a, b in zip(dims, dims[1:]))
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in hidden_dims)
        if zero_init:
            last: ConcatSquashLinear = self.layers[-1]  # type: ignore[assignment]
            last.zero_()

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        layers: list[ConcatSquashLinear] = list(self.layers)  # type: ignore[arg-type]
        h = time_and_context(t, z, context, self.context_dim, "ODENet")
        gates, shifts = self.gates_and_shifts(h)
        x = z
        for i, (layer, gate, shift) in enumerate(zip(layers, gates, shifts)):
            weight, bias = layer.linear.weight, layer.linear.bias
            if gate.dim() == 1:  # one gate for the batch: (W x + b) g + s = (g W) x + (b g + s)
                x = F.linear(x, weight * gate[:, None], torch.addcmul(shift, bias, gate))
            else:  # a gate per sample (a context with a batch shape)
                x = torch.addcmul(shift, F.linear(x, weight, bias), gate)
            if i < len(self.activations):
                x = self.activations[i](x)
        return x

    def gates_and_shifts(self, h: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Every layer's gate ``σ(W_g h + b_g)`` and shift ``W_b h`` from one affine map of ``h = [t, c]``.

        The layers' gate and shift weights are stacked (in this call, so gradients reach each layer's
        parameters) into one matrix: one linear map and one sigmoid serve all layers, where computing
        them layer by layer costs two linear maps, a sigmoid and the time's reshaping per layer.

        Returns:
            ``(gates, shifts)``, one tensor of shape ``(..., out_features)`` per layer (``(out_features,)``
            without a context).
        """
        layers: list[ConcatSquashLinear] = list(self.layers)  # type: ignore[arg-type]
        gate_weight = [layer.gate.weight for layer in layers]
        shift_weight = [layer.shift.weight for layer in layers]
        gate_bias = [layer.gate.bias for layer in layers]
        sizes = [w.shape[0] for w in gate_weight]
        width = sum(sizes)
        weight = torch.cat([*gate_weight, *shift_weight])
        bias = torch.cat([*gate_bias, gate_bias[0].new_zeros(width)])
        gate, shift = F.linear(h, weight, bias).split(width, -1)
        return torch.sigmoid(gate).split(sizes, -1), shift.split(sizes, -1)


class ConcatSquashConv2d(nn.Module):
    """A convolution whose output is gated and shifted per channel by the time (and a context).

    .. math::

        y_{o,:,:} = (W * x + b)_{o,:,:} \\, \\sigma(W_g h + b_g)_o + (W_b h)_o, \\qquad h = [t, c],

    where ``*`` is a 2D convolution (``kernel_size`` x ``kernel_size``, stride 1,
    "same" padding, so ``H`` and ``W`` are kept) and the gate and the shift are
    one number per output channel, broadcast over the pixels.

    Args:
        in_channels: channels of ``x``.
        out_channels: channels of ``y``.
        kernel_size: an odd kernel size (3 in FFJORD).
        context_dim: size of the context ``c`` (0 for none).

    Example::

        >>> layer = ConcatSquashConv2d(2, 8)
        >>> layer(torch.tensor(0.5), torch.randn(4, 2, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, context_dim: int = 0) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected a positive odd int (the image size is kept), got {kernel_size!r}")
        self.context_dim = context_dim
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Linear(1 + context_dim, out_channels)
        self.shift = nn.Linear(1 + context_dim, out_channels, bias=False)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = time_and_context(t, x, context, self.context_dim, "ConcatSquashConv2d")
        gate = torch.sigmoid(self.gate(h))[..., None, None]
        shift = self.shift(h)[..., None, None]
        return self.conv(x) * gate + shift

    def zero_(self) -> ConcatSquashConv2d:
        """Set the convolution and the shift to zero, so the layer outputs zero."""
        with torch.no_grad():
            self.conv.weight.zero_()
            if self.conv.bias is not None:
                self.conv.bias.zero_()
            self.shift.weight.zero_()
        return self


class ConvODENet(nn.Module):
    """The vector field ``f(z, t[, c])`` over images: concat-squash convolutions with a smooth activation.

    ``C -> hidden_channels -> C`` channels, every layer a :class:`ConcatSquashConv2d`
    reading the time (and the context), the image size kept throughout. This is
    the field of FFJORD's multiscale image CNF. With ``zero_init=True`` the last
    layer starts at zero, so the flow starts at the identity.

    Args:
        input_shape: the image shape ``(C, H, W)`` of the state (the field itself works at any
            ``H, W``; the shape fixes the event shape of the transform).
        hidden_channels: the hidden widths (a non-empty list).
        context_dim: size of the context (0 for an unconditional field).
        activation: one of ``"softplus"`` (default), ``"tanh"``, ``"elu"``, ``"silu"``.
        zero_init: start the last layer at zero.
        kernel_size: odd kernel size of every convolution.

    Example::

        >>> net = ConvODENet((1, 4, 4), [8, 8])
        >>> net(torch.tensor(0.0), torch.randn(5, 1, 4, 4)).abs().max().item()
        0.0
        >>> net.event_shape, net.input_dim
        ((1, 4, 4), 16)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_channels: Sequence[int],
        context_dim: int = 0,
        activation: Activation = "softplus",
        zero_init: bool = True,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        shape = check_image_shape(input_shape)
        hidden = check_positive_ints(hidden_channels, "hidden_channels")
        if not isinstance(context_dim, int) or isinstance(context_dim, bool) or context_dim < 0:
            raise ValueError(f"context_dim: expected a non-negative int, got {context_dim!r}")
        check_activation(activation)
        self.event_shape: tuple[int, ...] = shape
        self.input_dim = shape[0] * shape[1] * shape[2]
        self.context_dim = context_dim
        channels = [shape[0], *hidden, shape[0]]
        self.layers = nn.ModuleList(
            ConcatSquashConv2d(a, b, kernel_size, context_dim) for a, b in zip(channels, channels[1:])
        )
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in hidden)
        if zero_init:
            last: ConcatSquashConv2d = self.layers[-1]  # type: ignore[assignment]
            last.zero_()

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        h = z
        for layer, act in zip(self.layers, self.activations):
            h = act(layer(t, h, context))
        return self.layers[-1](t, h, context)
