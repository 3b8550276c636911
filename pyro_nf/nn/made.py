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
known, so the whole solve costs one network pass of arithmetic instead of ``D``.

Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_nf.nn.nets import activate

Order = Literal["natural", "reversed", "random"]
SequentialMethod = Literal["incremental", "reference"]
SEQUENTIAL_METHODS: tuple[SequentialMethod, ...] = ("incremental", "reference")


def check_sequential_method(method: object) -> None:
    """Validate the ``sequential`` option (``ValueError`` naming the choices)."""
    if method not in SEQUENTIAL_METHODS:
        raise ValueError(f"sequential: expected one of {SEQUENTIAL_METHODS}, got {method!r}")


class _Structure(NamedTuple):
    """The degree blocks of a MADE: input order, its inverse, unit counts per hidden degree."""

    order: Tensor  # input indices sorted by degree
    inverse: Tensor  # position of each input in the order
    bounds: list[list[int]]  # bounds[l][k]: units of degree < k in hidden layer l (k = 0..D)


class _Rows:
    """The rows (units or positions, each a row of ``n`` values) known so far in one layer.

    With autograd recording, blocks are joined out of place: those of the current chunk
    into one tensor, and the chunk into the known prefix when it ends (:meth:`flush`), so a
    step copies ``O(G)`` rows, not the whole prefix. Without autograd (sampling, evaluation)
    every block is copied once into a preallocated buffer (:class:`_BufferRows`).
    """

    def __init__(self, total: int, like: Tensor) -> None:
        self.known = self.chunk = like.new_zeros(0, like.shape[1])

    def append(self, block: Tensor) -> None:
        self.chunk = torch.cat((self.chunk, block))

    def flush(self) -> None:
        self.known = torch.cat((self.known, self.chunk))
        self.chunk = self.known[:0]

    def rows(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi``, which lie in the known prefix or in the current chunk."""
        offset = self.known.shape[0]
        part, lo, hi = (self.known, lo, hi) if hi <= offset else (self.chunk, lo - offset, hi - offset)
        return part if lo == 0 and hi == part.shape[0] else part[lo:hi]  # no slice node for a whole part


class _BufferRows(_Rows):
    def __init__(self, total: int, like: Tensor) -> None:
        self.buffer = like.new_empty(total, like.shape[1])
        self.count = 0

    def append(self, block: Tensor) -> None:
        self.buffer[self.count : self.count + block.shape[0]].copy_(block)
        self.count += block.shape[0]

    def flush(self) -> None:
        pass

    def rows(self, lo: int, hi: int) -> Tensor:
        return self.buffer[lo:hi]


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
            # a residual block reads h again, so only the plain path may overwrite it
            h = h + layer(act(h)) if self.residual else layer(activate(act, h))
        return self.output_layer(activate(self.activations[-1], h))

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
        of the whole known prefix. Both methods give the same numbers up to float
        rounding, and gradients flow through both (out-of-place operations only).

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
        if method == "reference":
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

    def _structure(self) -> _Structure:
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
        structure = _Structure(order.to(device), order.argsort().to(device), bounds)
        self.__dict__["_structure_cache"] = (key, structure)
        return structure

    def _sequential_incremental(
        self, given: Tensor, solve: Callable[..., Tensor], context: Tensor | None, chunk: int | None
    ) -> tuple[Tensor, Tensor]:
        # Step k = 0..D: (a) for k >= 1, the outputs of position k (they read the last layer's
        # units of degree < k) and x at position k; (b) for k < D, the units of degree k in
        # every layer (layer 0 reads positions <= k, layer l + 1 the units of degree <= k of
        # layer l). Steps are grouped in chunks of G: at the start of a chunk [c, c + G) one
        # matmul per layer gives every target of the chunk its part from sources of degree < c
        # (all known by then), and each step adds the part from the chunk's own sources only.
        # Each step so reads O(G) units instead of the whole known prefix.
        D, P = self.input_dim, self.num_params
        s = self._structure()
        bounds = s.bounds  # bounds[l][k]: units of degree < k in hidden layer l
        num_layers = len(self.hidden_dims)
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
        G = chunk if chunk is not None else max(1, round(math.sqrt(D)))
        starts = list(range(0, D + 1, G))
        shape = given.shape
        flat = given.reshape(-1, D)
        n = flat.shape[0]

        def hidden_sizes(b: list[int]) -> tuple[list[int], list[int]]:
            per_chunk = [b[min(c + G, D)] - b[min(c, D)] for c in starts]
            per_degree = [b[k + 1] - b[k] for k in range(D)]
            return per_chunk, per_degree

        # Everything is kept feature-major, (features, n): a block of units is then a block of
        # contiguous rows, so growing the known prefix is a plain copy, and each matmul reads
        # rows of (target, source) weight slices. Weights are split by target chunk and by target
        # degree (one autograd node per split, so the gradients accumulate in one piece).
        base: Tensor = self.input_layer.bias.unsqueeze(-1)
        if self.context_layer is not None and context is not None:
            base = (self.input_layer.bias + self.context_layer(context)).expand(*shape[:-1], -1).reshape(n, -1).t()
        weights = [self.input_layer.weight.index_select(1, s.order)]
        biases = [base]
        hidden_layers: list[MaskedLinear] = list(self.hidden_layers)  # type: ignore[arg-type]
        weights += [layer.weight for layer in hidden_layers]
        biases += [layer.bias.unsqueeze(-1) for layer in hidden_layers]
        w_chunk, w_step, b_chunk = [], [], []
        for i in range(num_layers):
            per_chunk, per_degree = hidden_sizes(bounds[i])
            w_chunk.append(weights[i].split(per_chunk))
            w_step.append(weights[i].split(per_degree))
            b_chunk.append(biases[i].split(per_chunk))
        out_chunk_sizes = [P * (min(c + G, D + 1) - max(c, 1)) for c in starts]
        # output rows in the order, position-major: row j * P + p is parameter p of position j
        w_out = self.output_layer.weight.view(P, D, -1).index_select(1, s.order).transpose(0, 1).reshape(D * P, -1)
        b_out = self.output_layer.bias.view(P, D).index_select(1, s.order).t().reshape(D * P, 1)
        wo_chunk = w_out.split(out_chunk_sizes)
        wo_step = w_out.split(P)
        bo_chunk = b_out.split(out_chunk_sizes)
        rows = flat.t().index_select(0, s.order).split(1)  # the given side, one (1, n) row per position

        acts = [act.forward for act in self.activations]
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (flat, base, w_out, *weights, *biases))
        store = _Rows if recording else _BufferRows
        x_rows = store(D, rows[0])  # the solution, positions in the order
        units = [store(w, rows[0]) for w in self.hidden_dims]  # activations, units in degree order
        outs: list[Tensor] = []
        for ci, c in enumerate(starts):
            # the chunk's parts from the known sources, split per position / per degree block
            # (split rather than slices: one autograd node each)
            end = min(c + G, D)
            known_out = bounds[-1][min(c, D)]
            out_part = torch.addmm(bo_chunk[ci], wo_chunk[ci][:, :known_out], units[-1].rows(0, known_out)).split(P)
            x0 = max(c - 1, 0)
            parts: list[Sequence[Tensor]] = []
            for i in range(num_layers):
                b = bounds[i]
                if c >= D or b[end] == b[c]:
                    parts.append([])
                    continue
                cols = x0 if i == 0 else bounds[i - 1][c]
                src = x_rows.rows(0, cols) if i == 0 else units[i - 1].rows(0, cols)
                part = torch.addmm(b_chunk[i][ci], w_chunk[i][ci][:, :cols], src)
                parts.append(part.split([b[k + 1] - b[k] for k in range(c, end)]))
            for k in range(c, min(c + G, D + 1)):
                if k > 0:
                    out = out_part[k - max(c, 1)]
                    lo = bounds[-1][c]
                    if k - 1 >= c and bounds[-1][k] > lo:
                        out = torch.addmm(out, wo_step[k - 1][:, lo : bounds[-1][k]], units[-1].rows(lo, bounds[-1][k]))
                    outs.append(out)
                    x_rows.append(solve(rows[k - 1], *out.split(1)))
                if k == D:
                    break
                h = rows[0]
                for i in range(num_layers):
                    b = bounds[i]
                    if b[k + 1] == b[k]:
                        continue  # no units of degree k in this layer
                    h_new = parts[i][k - c]
                    if i == 0:
                        w, src = w_step[0][k][:, x0:k], x_rows.rows(x0, k)
                    else:
                        lo, hi = bounds[i - 1][c], bounds[i - 1][k + 1]
                        w, src = w_step[i][k][:, lo:hi], units[i - 1].rows(lo, hi)
                    if src.shape[0]:
                        h_new = torch.addmm(h_new, w, src)
                    h = h + h_new if self.residual and i > 0 else h_new
                    units[i].append(acts[i](h))
            x_rows.flush()
            for u in units:
                u.flush()

        x = x_rows.rows(0, D).index_select(0, s.inverse).t().reshape(shape)
        params = torch.stack(outs).index_select(0, s.inverse).permute(2, 1, 0).reshape(*shape[:-1], P * D)
        return x, params
