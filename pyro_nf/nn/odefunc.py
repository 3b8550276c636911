"""Vector fields and divergence estimators for continuous normalizing flows.

A continuous normalizing flow integrates ``dz/dt = f(z, t)`` and, alongside,
the change of log-density (the instantaneous change of variables):

.. math::

    \\frac{d \\log p(z(t))}{dt} = -\\operatorname{Tr}\\frac{\\partial f}{\\partial z}(z(t), t).

This module holds the three pieces of that computation:

- :class:`ConcatSquashLinear` and :class:`ODENet`: the time-conditioned
  vector field ``f``, built from concat-squash layers
  ``Linear(x) * sigmoid(W_g [t, c] + b_g) + W_b [t, c]`` (``c`` an optional
  context, for conditional flows).
- :func:`divergence_exact` (``D`` vector-Jacobian products, one per row of the
  Jacobian) and :func:`divergence_hutchinson` (one vector-Jacobian product with
  Rademacher or Gaussian noise ``e``: ``Tr J ≈ eᵀ J e``, unbiased because
  ``E[e eᵀ] = I``). Both also return the squared Jacobian Frobenius norm
  (exact, or its unbiased estimate ``‖eᵀ J‖²``) used by RNODE.
- :class:`AugmentedDynamics`: the right-hand side handed to the ODE solver
  for one solve. It carries ``(z, ∫Tr J)`` and, optionally, the RNODE
  integrals ``∫‖f‖²`` (kinetic energy) and ``∫‖J‖_F²``; it holds the
  Hutchinson noise fixed for the whole solve and counts function evaluations.

Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable
Reversible Generative Models", ICLR 2019. Finlay et al., "How to train your
neural ODE: the world of Jacobian and kinetic regularization", ICML 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

Activation = Literal["softplus", "tanh", "elu", "silu"]
Noise = Literal["rademacher", "gaussian"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}
NOISES: tuple[str, ...] = ("rademacher", "gaussian")


def check_activation(activation: str) -> None:
    """Raise a ValueError listing the choices unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")


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
        h = t.reshape(1).to(x)
        if self.context_dim:
            if context is None:
                raise ValueError(f"ConcatSquashLinear: expected a context of size {self.context_dim}, got None")
            h = torch.cat([h.expand(*context.shape[:-1], 1), context], -1)
        return self.linear(x) * torch.sigmoid(self.gate(h)) + self.shift(h)

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
        hidden_dims = list(hidden_dims)
        if not isinstance(input_dim, int) or isinstance(input_dim, bool) or input_dim < 1:
            raise ValueError(f"input_dim: expected a positive int, got {input_dim!r}")
        if not hidden_dims or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims: expected a non-empty list of positive ints, got {hidden_dims!r}")
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim: expected a non-negative int, got {context_dim!r}")
        check_activation(activation)
        self.input_dim = input_dim
        self.context_dim = context_dim
        dims = [input_dim, *hidden_dims, input_dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b, context_dim) for a, b in zip(dims, dims[1:]))
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in hidden_dims)
        if zero_init:
            last: ConcatSquashLinear = self.layers[-1]  # type: ignore[assignment]
            last.zero_()

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        h = z
        for layer, act in zip(self.layers, self.activations):
            h = act(layer(t, h, context))
        return self.layers[-1](t, h, context)


def sample_noise(kind: Noise, like: Tensor) -> Tensor:
    """Hutchinson probe vectors shaped like ``like``: Rademacher (±1) or standard Gaussian.

    Example::

        >>> e = sample_noise("rademacher", torch.zeros(3, 2))
        >>> bool(((e == 1) | (e == -1)).all())
        True
    """
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn_like(like)
    raise ValueError(f"noise: expected one of {list(NOISES)}, got {kind!r}")


def divergence_exact(f: Tensor, z: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """The exact trace of ``∂f/∂z`` and the squared Frobenius norm, from ``D`` vector-Jacobian products.

    ``f`` and ``z`` have shape ``(N, D)`` and row ``n`` of ``f`` depends on row
    ``n`` of ``z`` only, so the VJP with the ``i``-th unit vector gives the
    ``i``-th Jacobian row of every sample at once.

    Returns:
        ``(Tr J, ‖J‖_F²)``, each of shape ``(N,)``.

    Example::

        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> f = z * torch.tensor([1.0, 2.0, 3.0])
        >>> trace, frob = divergence_exact(f, z, create_graph=False)
        >>> trace.tolist(), frob.tolist()
        ([6.0, 6.0, 6.0, 6.0], [14.0, 14.0, 14.0, 14.0])
    """
    trace = f.new_zeros(f.shape[:-1])
    frob = f.new_zeros(f.shape[:-1])
    dim = f.shape[-1]
    for i in range(dim):
        (row,) = torch.autograd.grad(f[..., i].sum(), z, create_graph=create_graph, retain_graph=True)
        trace = trace + row[..., i]
        frob = frob + row.square().sum(-1)
    return trace, frob


def divergence_hutchinson(f: Tensor, z: Tensor, noise: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate ``eᵀ (∂f/∂z) e`` of the trace, and ``‖eᵀ ∂f/∂z‖²`` of the squared Frobenius norm.

    One vector-Jacobian product serves both; both are unbiased when
    ``E[e eᵀ] = I`` (Rademacher or standard Gaussian ``e``).

    Returns:
        ``(trace estimate, Frobenius² estimate)``, each of shape ``(N,)``.

    Example::

        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> f = 2.0 * z
        >>> trace, _ = divergence_hutchinson(f, z, sample_noise("rademacher", z), create_graph=False)
        >>> trace.tolist()  # exact for a multiple of the identity and Rademacher noise
        [6.0, 6.0, 6.0, 6.0]
    """
    (vjp,) = torch.autograd.grad(f, z, noise, create_graph=create_graph, retain_graph=True)
    return (vjp * noise).sum(-1), vjp.square().sum(-1)


Trace = Literal["exact", "hutchinson"]
TRACES: tuple[str, ...] = ("exact", "hutchinson")


class AugmentedDynamics:
    """The right-hand side of one CNF solve: ``(z, a[, k, j]) -> (f, Tr J[, ‖f‖², ‖J‖_F²])``.

    ``a`` accumulates ``∫ Tr(∂f/∂z) dt``, and with ``regularize=True`` ``k`` and
    ``j`` accumulate RNODE's kinetic energy ``∫‖f‖² dt`` and Jacobian norm
    ``∫‖∂f/∂z‖_F² dt`` (estimated from the same vector-Jacobian product as the
    trace). Build one per solve: it holds the Hutchinson noise fixed for the
    whole solve (and for the adjoint solve that follows it), the flattened
    context, and the number of evaluations :attr:`calls`.

    Args:
        net: the vector field, called as ``net(t, z, context)``.
        trace: ``"exact"`` or ``"hutchinson"``.
        noise: the probe vectors ``(N, D)`` (required for Hutchinson).
        context: the context ``(N, C)`` or None.
        regularize: also integrate the RNODE quantities.

    Example::

        >>> from torchdiffeq import odeint
        >>> net = ODENet(2, [8], zero_init=False)
        >>> dynamics = AugmentedDynamics(net, "exact")
        >>> z, a = odeint(dynamics, (torch.randn(5, 2), torch.zeros(5)), torch.tensor([0.0, 1.0]))
        >>> dynamics.calls > 0
        True
    """

    def __init__(
        self,
        net: nn.Module,
        trace: Trace,
        noise: Tensor | None = None,
        context: Tensor | None = None,
        regularize: bool = False,
    ) -> None:
        if trace not in TRACES:
            raise ValueError(f"trace: expected one of {list(TRACES)}, got {trace!r}")
        if trace == "hutchinson" and noise is None:
            raise ValueError("AugmentedDynamics: the Hutchinson trace needs noise, got None")
        self.net = net
        self.trace = trace
        self.noise = noise
        self.context = context
        self.regularize = regularize
        self.calls = 0

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.calls += 1
        z = state[0]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (create_graph and z.requires_grad):  # a fresh leaf, also for views made under no_grad
                z = z.detach().requires_grad_(True)
            f = self.net(t, z, self.context)
            if self.trace == "exact":
                trace, frob = divergence_exact(f, z, create_graph)
            else:
                assert self.noise is not None
                trace, frob = divergence_hutchinson(f, z, self.noise, create_graph)
        if not create_graph:
            f, trace, frob = f.detach(), trace.detach(), frob.detach()
        if not self.regularize:
            return f, trace
        return f, trace, f.square().sum(-1), frob
