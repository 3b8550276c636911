"""Conditioner networks for coupling layers.

One multilayer perceptron serves every vector coupling layer: it maps the
kept half of the input (and an optional context, added after the first linear
map so that it broadcasts against the batch) to the parameters of the
transformed half. Its last layer starts at zero, so a coupling layer starts
at the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from pyro_nf.checks import check_activation_class, check_positive_ints


def default_hidden_dims(input_dim: int) -> list[int]:
    """The default widths of a vector flow's networks: two hidden layers of ``max(64, 4 D)`` units."""
    return [max(64, 4 * input_dim)] * 2


def activate(act: nn.Module, h: Tensor) -> Tensor:
    """Apply ``act`` to a freshly computed pre-activation ``h``, in place when it is a ReLU.

    Only call it on a tensor nothing else reads afterwards (a linear layer's output): the
    in-place ReLU saves one full-size buffer per hidden layer, which is a third of a wide
    MADE's forward pass on CPU. Under ``torch.jit.trace`` (Pyro's ``JitTrace_ELBO``) it is
    applied out of place: the traced graph may hand the layer's output over as a view of a
    parameter, which autograd refuses to overwrite.
    """
    if type(act) is nn.ReLU and not torch.jit.is_tracing():
        return torch.relu_(h)
    return act(h)


class MLP(nn.Module):
    """``in_dim (+ context_dim) -> hidden_dims -> out_dim`` with a zero-initialised head.

    Example::

        >>> import torch
        >>> net = MLP(3, [16, 16], 4)
        >>> net(torch.randn(5, 3)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        context_dim: int = 0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init_output: bool = True,
    ) -> None:
        super().__init__()
        hidden_dims = check_positive_ints(hidden_dims, "hidden_dims")
        check_activation_class(activation)
        self.context_dim = context_dim
        # With nothing to read (a coupling layer over D = 1), the first layer is a learned bias.
        self.input_layer = nn.Linear(in_dim, hidden_dims[0]) if in_dim else None
        self.input_bias = None if in_dim else nn.Parameter(torch.zeros(hidden_dims[0]))
        self.context_layer = nn.Linear(context_dim, hidden_dims[0], bias=False) if context_dim else None
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden_dims, hidden_dims[1:]))
        self.output_layer = nn.Linear(hidden_dims[-1], out_dim)
        self.activations = nn.ModuleList(activation() for _ in hidden_dims)
        if zero_init_output:
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.input_layer is not None:
            h = self.input_layer(x)
        else:
            h = self.input_bias.expand(*x.shape[:-1], self.input_bias.shape[0]).clone()
        if self.context_layer is not None:
            if context is None:
                raise ValueError(f"MLP: expected a context of size {self.context_dim}, got None")
            h = h + self.context_layer(context)
        for act, layer in zip(self.activations, self.hidden_layers):
            h = layer(activate(act, h))
        return self.output_layer(activate(self.activations[-1], h))
