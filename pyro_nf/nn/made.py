"""MADE: the masked autoencoder that makes a network autoregressive.

Each input ``x_i`` gets a degree ``d_i`` (its position in the order); each
hidden unit a degree ``m`` in ``1..D-1``. A hidden unit sees inputs with
``d_i <= m``, and the outputs for ``x_i`` see hidden units with ``m < d_i``,
so output ``i`` depends on ``x_<i`` (in the order) only. Hidden degrees are
assigned in sorted, contiguous blocks, so the units of degree ``k`` form one
slice of every hidden layer. Context inputs (``context_dim > 0``) reach every
hidden unit of the first layer through an unmasked linear map that is added,
so a context broadcasts against the batch.

Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Order = Literal["natural", "reversed", "random"]


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer)."""

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def input_degrees(
    input_dim: int, order: Order | Sequence[int] | Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Degrees ``1..D`` of the inputs for a named order or an explicit permutation."""
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(1, input_dim + 1)
        if order == "reversed":
            return torch.arange(input_dim, 0, -1)
        if order == "random":
            return torch.randperm(input_dim, generator=generator) + 1
        raise ValueError(f"order: expected 'natural', 'reversed', 'random' or a permutation, got {order!r}")
    degrees = torch.as_tensor(order, dtype=torch.long).flatten()
    if degrees.numel() != input_dim or not torch.equal(degrees.sort().values, torch.arange(degrees.numel())):
        raise ValueError(f"order: expected a permutation of 0..{input_dim - 1}, got {degrees.tolist()}")
    return degrees + 1


def hidden_degrees(width: int, input_dim: int) -> Tensor:
    """Sorted degrees in ``1..D-1`` spread evenly over ``width`` units (all 0 when D = 1)."""
    if input_dim == 1:
        return torch.zeros(width, dtype=torch.long)
    return 1 + torch.arange(width) * (input_dim - 1) // width


class MADE(nn.Module):
    """An autoregressive network ``R^D -> R^{P x D}`` (``P = num_params`` outputs per input).

    The output is laid out in ``P`` contiguous blocks of ``D``:
    ``out[..., p * D + i]`` is parameter ``p`` of input ``i``, and depends only on
    inputs that come before ``i`` in the order (and on the context).

    Args:
        input_dim: D, the number of autoregressive inputs.
        hidden_dims: widths of the hidden layers (each at least ``D - 1`` is sensible).
        num_params: parameters per input (2 for an affine map).
        context_dim: size of the context vector (0 for none).
        order: ``"natural"``, ``"reversed"``, ``"random"`` or a permutation of ``0..D-1``
            giving each input's position in the order.
        residual: pre-activation residual connections between the hidden layers
            (all hidden widths must then be equal).
        activation: the nonlinearity class, instantiated once per layer.
        zero_init_output: start the output layer at zero (a flow then starts at the identity).
        generator: random source for ``order="random"``.

    Example::

        >>> made = MADE(3, [16, 16], num_params=2)
        >>> made(torch.randn(5, 3)).shape
        torch.Size([5, 6])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        num_params: int = 2,
        context_dim: int = 0,
        order: Order | Sequence[int] | Tensor = "natural",
        residual: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init_output: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim: expected a positive int, got {input_dim!r}")
        if not hidden_dims or any(not isinstance(h, int) or h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims: expected a non-empty list of positive ints, got {hidden_dims!r}")
        if residual and len(set(hidden_dims)) != 1:
            raise ValueError(f"hidden_dims: residual=True needs equal widths, got {hidden_dims}")
        if context_dim < 0:
            raise ValueError(f"context_dim: expected >= 0, got {context_dim}")
        self.input_dim = input_dim
        self.hidden_dims = hidden_dims
        self.num_params = num_params
        self.context_dim = context_dim
        self.residual = residual

        degrees_in = input_degrees(input_dim, order, generator)
        self.register_buffer("degrees", degrees_in)
        degrees = [hidden_degrees(h, input_dim) for h in hidden_dims]
        for i, d in enumerate(degrees):
            self.register_buffer(f"hidden_degrees_{i}", d)

        self.input_layer = MaskedLinear((degrees[0][:, None] >= degrees_in[None, :]).float())
        self.context_layer = nn.Linear(context_dim, hidden_dims[0], bias=False) if context_dim else None
        self.hidden_layers = nn.ModuleList(
            MaskedLinear((d_out[:, None] >= d_in[None, :]).float()) for d_in, d_out in zip(degrees, degrees[1:])
        )
        out_mask = (degrees_in.repeat(num_params)[:, None] > degrees[-1][None, :]).float()
        self.output_layer = MaskedLinear(out_mask)
        self.activations = nn.ModuleList(activation() for _ in hidden_dims)
        if zero_init_output:
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.input_layer(x)
        if self.context_layer is not None:
            if context is None:
                raise ValueError(f"MADE: expected a context of size {self.context_dim}, got None")
            h = h + self.context_layer(context)
        for act, layer in zip(self.activations, self.hidden_layers):
            h = h + layer(act(h)) if self.residual else layer(act(h))
        return self.output_layer(self.activations[-1](h))
