"""MADE: the masked autoencoder that makes a network autoregressive.

Each input ``x_i`` gets a degree ``d_i`` (its position in the order); each
hidden unit a degree ``m`` in ``1..D-1``. A hidden unit sees inputs with
``d_i <= m``, and the outputs for ``x_i`` see hidden units with ``m < d_i``,
so output ``i`` depends on ``x_<i`` (in the order) only. Hidden degrees are
assigned in sorted, contiguous blocks, so the units of degree ``k`` form one
slice of every hidden layer. Context inputs (``context_dim > 0``) reach every
hidden unit of the first layer through an unmasked linear map that is added,
so a context broadcasts against the batch.

:meth:`MADE.sequential` solves the autoregressive system ``x_i = f(given_i,
MADE(x)_i)`` (MAF sampling, IAF density of arbitrary data) incrementally: the
units of degree ``k`` are computed once, when position ``k`` of the solution is
known, so the whole solve costs one network pass of arithmetic instead of ``D``
(the solver and its backward pass are in :mod:`pyro_nf.nn.incremental`).

Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_nf.checks import check_activation_class, check_choice, check_positive_int, check_positive_ints
from pyro_nf.nn.incremental import IncrementalSequential, Structure
from pyro_nf.nn.nets import activate

Order = Literal["natural", "reversed", "random"]
Permutation = Literal["reversed", "random", "none"]
PERMUTATIONS: tuple[Permutation, ...] = ("reversed", "random", "none")
SequentialMethod = Literal["incremental", "reference"]
SEQUENTIAL_METHODS: tuple[SequentialMethod, ...] = ("incremental", "reference")


def check_sequential_method(method: object) -> None:
    """Validate the ``sequential`` option (``ValueError`` naming the choices)."""
    if method not in SEQUENTIAL_METHODS:
        raise ValueError(f"sequential: expected one of {SEQUENTIAL_METHODS}, got {method!r}")


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer)."""

    mask: Tensor

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


class MADE(IncrementalSequential):
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
        check_positive_int(input_dim, "input_dim")
        hidden_dims = check_positive_ints(hidden_dims, "hidden_dims")
        check_activation_class(activation)
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
            # a residual block reads h again, so only the plain path may overwrite it
            h = h + layer(act(h)) if self.residual else layer(activate(act, h))
        return self.output_layer(activate(self.activations[-1], h))

    def _structure(self) -> Structure:
        """Degree blocks as Python ints (cached; rebuilt when the degree buffers change)."""
        buffers = [self.degrees, *(getattr(self, f"hidden_degrees_{i}") for i in range(len(self.hidden_dims)))]
        try:
            key: tuple[object, ...] | None = tuple((id(b), b._version, b.device) for b in buffers)
        except RuntimeError:  # inference tensors carry no version counter
            key = None
        cached = self.__dict__.get("_structure_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        degrees_in, *degrees_hidden = (b.cpu() for b in buffers)
        order = degrees_in.argsort()
        bounds = []
        for i, d in enumerate(degrees_hidden):
            if bool((d[1:] < d[:-1]).any()) or bool((d < 0).any()) or bool((d >= self.input_dim).any()):
                raise ValueError(
                    f"MADE.sequential: expected hidden_degrees_{i} sorted in 0..{self.input_dim - 1}, got {d.tolist()}"
                )
            counts = torch.bincount(d, minlength=self.input_dim).tolist()
            bounds.append([sum(counts[:k]) for k in range(self.input_dim + 1)])
        device = buffers[0].device
        structure = Structure(order.to(device), order.argsort().to(device), bounds)
        self.__dict__["_structure_cache"] = (key, structure)
        return structure

    # -- the sequential direction ----------------------------------------------------
    def sequential(
        self,
        given: Tensor,
        solve: Callable[..., Tensor],
        context: Tensor | None = None,
        method: SequentialMethod = "incremental",
        chunk: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Solve the autoregressive system ``x_i = solve(given_i, params_i(x_<i))`` for all ``i``.

        ``params_i`` are the MADE's ``P`` outputs for input ``i`` (they depend on the
        inputs before ``i`` in the order only), so the system is triangular and is
        solved position by position in the order. This is MAF sampling and IAF
        density of arbitrary data.

        ``method="reference"`` runs ``D`` full MADE passes (after pass ``k`` the
        first ``k`` positions are final). ``method="incremental"`` (default) runs the
        network once, in pieces: hidden units are sorted by degree in contiguous
        blocks, and once the positions ``1..k`` are known, exactly the units of
        degree ``k`` become computable in every layer. Step ``k`` computes the
        outputs of position ``k`` from the hidden units of degree ``< k``, solves
        for ``x`` at position ``k``, then the degree-``k`` block of each layer as a
        small matmul of the already known prefix of the layer below,

        .. math::

            h_{l+1}[B_k] = W_l[B_k, :e_k]\\,\\sigma(h_l[:, :e_k]) + b_l[B_k]\\;(+\\,h_l[B_k]
            \\text{ if residual}),

        where ``B_k`` is the degree-``k`` slice and ``e_k`` the number of units of
        degree ``<= k``. Every weight entry is used once, so the whole direction
        costs the arithmetic of one (masked) network pass plus ``D`` small steps,
        instead of ``D`` passes. Steps are grouped in chunks of ``G`` (about
        ``sqrt(D)``): at the start of a chunk one matmul per layer gives all of the
        chunk's units their part from the units known by then, and each step adds
        the part from inside the chunk only, so a step reads ``O(G)`` units instead
        of the whole known prefix. The pass writes into buffers, without autograd.

        Gradients come from a hand-written backward pass: the solution's cotangent
        solves the transposed triangular system ``x̄ = L_x + (∂MADE/∂x)^T p̄``,
        ``p̄ = L_p + (∂solve/∂params) x̄``, in reverse order and incrementally (the
        transpose of the forward pass, chunked the same way). That pass leaves every
        layer's output cotangent, so the parameters' and the context's gradients are
        one outer product per layer with the activations the forward pass kept (no
        second network pass). Both methods give the same numbers and
        gradients up to float rounding; the incremental one is not twice
        differentiable. ``solve`` and the activations must be element-wise (as a
        MADE needs anyway). Under ``torch.jit.trace`` (Pyro's ``JitTrace_ELBO``, a traced
        module) the reference method is used, whose graph the tracer can record and save.

        Args:
            given: ``(..., D)``, the known side (base noise for MAF sampling, data
                for IAF density).
            solve: ``solve(given, *params)`` maps the known side and the ``P`` parameters
                of the same positions (``P + 1`` tensors of one shape) to the solved ``x``
                there; element-wise.
            context: the context (its batch shape broadcasts against ``given``'s)
                or None.
            method: ``"incremental"`` or ``"reference"``.
            chunk: steps per chunk of the incremental pass (default
                ``round(sqrt(D))``; any positive value gives the same result).

        Returns:
            ``(x, params)``: the solution ``(..., D)`` and the MADE output at it,
            ``(..., P * D)`` laid out as in :meth:`forward`.

        Example::

            >>> made = MADE(4, [32, 32], num_params=1, zero_init_output=False)
            >>> given = torch.randn(6, 4)
            >>> x, params = made.sequential(given, lambda g, p: g - p)
            >>> torch.allclose(x, given - made(x), atol=1e-6)
            True
        """
        check_sequential_method(method)
        if self.context_layer is not None:
            if context is None:
                raise ValueError(f"MADE: expected a context of size {self.context_dim}, got None")
            batch = torch.broadcast_shapes(given.shape[:-1], context.shape[:-1])
            given = given.expand(*batch, self.input_dim)
        else:
            context = None
        if method == "reference" or torch.jit.is_tracing():
            # a traced graph can neither replay nor save the incremental pass's Python autograd
            # function; the D-pass solve is plain tensor code, recorded with its gradients
            return self._sequential_reference(given, solve, context)
        return self._sequential_incremental(given, solve, context, chunk)

    def _sequential_reference(
        self, given: Tensor, solve: Callable[..., Tensor], context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        shape = given.shape
        flat = given.reshape(-1, self.input_dim)
        x = torch.zeros_like(flat)
        params = flat.new_zeros(flat.shape[0], self.num_params * self.input_dim)
        ctx = None if context is None else context.expand(*shape[:-1], -1).reshape(flat.shape[0], -1)
        for _ in range(self.input_dim):
            params = self(x, ctx)
            x = solve(flat, *params.view(-1, self.num_params, self.input_dim).unbind(1))
        return x.reshape(shape), params.reshape(*shape[:-1], -1)


def _permutation(permutation: str) -> Permutation:
    if permutation == "reverse":
        warnings.warn(
            "permutation='reverse' is deprecated; use permutation='reversed' (the spelling of MADE's order)",
            DeprecationWarning,
            stacklevel=6,
        )
        return "reversed"
    check_choice(permutation, PERMUTATIONS, "permutation")
    return permutation  # type: ignore[return-value]


def stack_orders(input_dim: int, num_transforms: int, permutation: str, seed: int = 0) -> list[Order | Tensor]:
    """The input orders of the MADEs of a stack: the permutation between layers folded into each MADE.

    ``"reversed"`` alternates natural and reversed orders, ``"random"`` draws orders from ``seed``,
    ``"none"`` keeps the natural order (``"reverse"`` is a deprecated spelling of ``"reversed"``).

    Example::

        >>> stack_orders(3, 3, "reversed")
        ['natural', 'reversed', 'natural']
    """
    permutation = _permutation(permutation)
    if permutation == "none":
        return ["natural"] * num_transforms
    if permutation == "reversed":
        return ["natural" if i % 2 == 0 else "reversed" for i in range(num_transforms)]
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(input_dim, generator=generator) for _ in range(num_transforms)]
