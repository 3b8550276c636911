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
- :class:`ConcatSquashConv2d` and :class:`ConvODENet`: the same over images
  ``(C, H, W)``, a convolution gated and shifted per channel by the time
  (FFJORD's multiscale image CNF).
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
from torch.nn import functional as F

Activation = Literal["softplus", "tanh", "elu", "silu"]
Noise = Literal["rademacher", "gaussian"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}
NOISES: tuple[str, ...] = ("rademacher", "gaussian")


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
        hidden_dims = list(hidden_dims)
        if not isinstance(input_dim, int) or isinstance(input_dim, bool) or input_dim < 1:
            raise ValueError(f"input_dim: expected a positive int, got {input_dim!r}")
        if not hidden_dims or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims: expected a non-empty list of positive ints, got {hidden_dims!r}")
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
        from pyro_nf.transforms.multiscale import check_image_shape  # the transforms build on this module

        shape = check_image_shape(input_shape)
        hidden = list(hidden_channels)
        if not hidden or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
            raise ValueError(f"hidden_channels: expected a non-empty list of positive ints, got {hidden!r}")
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


EXACT_TRACE_CHUNK_ELEMENTS = 2**22
"""Largest number of gradient entries ``k N D`` one batched product of :func:`divergence_exact` computes."""


def divergence_exact(f: Tensor, z: Tensor, create_graph: bool, event_dims: int = 1) -> tuple[Tensor, Tensor]:
    """The exact trace of ``∂f/∂z`` and the squared Frobenius norm, from ``D`` vector-Jacobian products.

    ``f`` and ``z`` have shape ``(N, D)`` (or ``(N, *event)`` with ``event_dims``
    event dimensions, e.g. an image ``(N, C, H, W)`` with ``event_dims=3`` and
    ``D = C H W``), and sample ``n`` of ``f`` depends on sample ``n`` of ``z``
    only, so the VJP with the ``i``-th unit vector gives the ``i``-th Jacobian
    row of every sample at once. The ``D`` products run batched
    (``is_grads_batched``), in chunks of at most :data:`EXACT_TRACE_CHUNK_ELEMENTS`
    gradient entries.

    Returns:
        ``(Tr J, ‖J‖_F²)``, each of shape ``(N,)``.

    Example::

        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> f = z * torch.tensor([1.0, 2.0, 3.0])
        >>> trace, frob = divergence_exact(f, z, create_graph=False)
        >>> trace.tolist(), frob.tolist()
        ([6.0, 6.0, 6.0, 6.0], [14.0, 14.0, 14.0, 14.0])
    """
    _check_event_dims(event_dims, f)
    batch, event = f.shape[: f.dim() - event_dims], f.shape[f.dim() - event_dims :]
    dim = event.numel()
    trace = f.new_zeros(batch)
    frob = f.new_zeros(batch)
    units = torch.eye(dim, dtype=f.dtype, device=f.device).reshape(dim, *(1 for _ in batch), *event)
    chunk = max(1, min(dim, EXACT_TRACE_CHUNK_ELEMENTS // max(1, f.numel())))
    for start in range(0, dim, chunk):
        stop = min(dim, start + chunk)
        grads = units[start:stop].expand(stop - start, *f.shape)
        (rows,) = torch.autograd.grad(
            f, z, grads, create_graph=create_graph, retain_graph=True, is_grads_batched=True
        )  # rows[k] is Jacobian row start + k of every sample
        rows = rows.flatten(-event_dims)
        trace = trace + rows[..., start:stop].diagonal(dim1=0, dim2=-1).sum(-1)
        frob = frob + rows.square().sum(-1).sum(0)
    return trace, frob


def _check_event_dims(event_dims: int, f: Tensor) -> None:
    if isinstance(event_dims, bool) or not isinstance(event_dims, int) or not 1 <= event_dims <= f.dim():
        raise ValueError(f"event_dims: expected an int in 1 .. {f.dim()} (the state's dims), got {event_dims!r}")


def divergence_hutchinson(
    f: Tensor, z: Tensor, noise: Tensor, create_graph: bool, event_dims: int = 1
) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate ``eᵀ (∂f/∂z) e`` of the trace, and ``‖eᵀ ∂f/∂z‖²`` of the squared Frobenius norm.

    One vector-Jacobian product serves both; both are unbiased when
    ``E[e eᵀ] = I`` (Rademacher or standard Gaussian ``e``). The products sum
    over the last ``event_dims`` dimensions (3 for images ``(N, C, H, W)``).

    Returns:
        ``(trace estimate, Frobenius² estimate)``, each of shape ``(N,)``.

    Example::

        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> f = 2.0 * z
        >>> trace, _ = divergence_hutchinson(f, z, sample_noise("rademacher", z), create_graph=False)
        >>> trace.tolist()  # exact for a multiple of the identity and Rademacher noise
        [6.0, 6.0, 6.0, 6.0]
    """
    _check_event_dims(event_dims, f)
    (vjp,) = torch.autograd.grad(f, z, noise, create_graph=create_graph, retain_graph=True)
    return (vjp * noise).flatten(-event_dims).sum(-1), vjp.square().flatten(-event_dims).sum(-1)


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
        noise: the probe vectors, shaped like the state ``z`` (required for Hutchinson).
        context: the context ``(N, C)`` or None.
        regularize: also integrate the RNODE quantities.
        event_dims: event dimensions of the state ``z``: 1 for ``(N, D)``, 3 for images ``(N, C, H, W)``.

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
        event_dims: int = 1,
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
        self.event_dims = event_dims
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
                trace, frob = divergence_exact(f, z, create_graph, self.event_dims)
            else:
                assert self.noise is not None
                trace, frob = divergence_hutchinson(f, z, self.noise, create_graph, self.event_dims)
        if not create_graph:
            f, trace, frob = f.detach(), trace.detach(), frob.detach()
        if not self.regularize:
            return f, trace
        return f, trace, f.square().flatten(-self.event_dims).sum(-1), frob
