"""The incremental solve of a MADE's autoregressive system, with its hand-written backward pass.

MAF sampling and IAF density of arbitrary data solve ``x_i = solve(given_i, params_i(x_<i))``
for every position ``i`` of the MADE's order, where ``params_i`` are the MADE's outputs for
``i``. Solved by ``D`` full network passes this costs ``D`` times a pass; solved
incrementally, the hidden units of degree ``k`` are computed once, when position ``k`` of
the solution is known, so the whole solve costs the arithmetic of one (masked) network
pass plus ``D`` small steps (see :meth:`pyro_nf.nn.MADE.sequential` for the math).

:class:`IncrementalSequential` is the part of :class:`~pyro_nf.nn.MADE` that does this:
the degree structure, the forward pass written into buffers without autograd, and the
backward pass that solves the transposed triangular system in reverse, incrementally,
then reads the layers' gradients from its cotangents and the activations the forward
pass kept. :class:`_IncrementalSolve` ties the two into one autograd function.

The solve must be element-wise (as a MADE needs anyway): any element-wise map whose
inverse is element-wise (affine, rational-quadratic spline, ...) plugs in through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["IncrementalSequential", "Structure"]


class Structure(NamedTuple):
    """The degree blocks of a MADE: input order, its inverse, unit counts per hidden degree."""

    order: Tensor  # input indices sorted by degree
    inverse: Tensor  # position of each input in the order
    bounds: list[list[int]]  # bounds[l][k]: units of degree < k in hidden layer l (k = 0..D)


class _BufferRows:
    """Rows (units or positions, each a row of ``n`` values) known so far in one layer.

    Every block is copied once into a preallocated ``(total, n)`` buffer; reads are row slices.
    """

    def __init__(self, total: int, like: Tensor) -> None:
        self.buffer = like.new_empty(total, like.shape[1])
        self.count = 0

    def append(self, block: Tensor) -> None:
        self.buffer[self.count : self.count + block.shape[0]].copy_(block)
        self.count += block.shape[0]

    def rows(self, lo: int, hi: int) -> Tensor:
        return self.buffer[lo:hi]


class _Pass(NamedTuple):
    """The incremental pass in the order layout: solution rows, output rows, pre-activations."""

    x: Tensor  # (D, n): position j of the order in row j
    out: Tensor  # (D * P, n): row j * P + p is parameter p of position j
    pre: list[Tensor]  # per hidden layer, (H_l, n) pre-activations (kept for the backward pass only)
    acts: list[Tensor]  # per hidden layer, (H_l, n) activations (kept for the backward pass only)


class IncrementalSequential(nn.Module):
    """The incremental solve of :meth:`MADE.sequential <pyro_nf.nn.MADE.sequential>`; the MADE builds on it.

    It reads the MADE's degree buffers, layers and activations (declared below) and
    keeps a cache of the degree structure in the module's ``__dict__``.
    """

    input_dim: int
    num_params: int
    hidden_dims: list[int]
    residual: bool
    degrees: Tensor
    input_layer: nn.Linear
    context_layer: nn.Linear | None
    hidden_layers: nn.ModuleList
    output_layer: nn.Linear
    activations: nn.ModuleList

    def _hidden(self) -> list[nn.Linear]:
        return [cast(nn.Linear, layer) for layer in self.hidden_layers]

    def _structure(self) -> Structure:
        """The degree blocks (the MADE computes them from its degree buffers)."""
        raise NotImplementedError

    def _sequential_incremental(
        self, given: Tensor, solve: Callable[..., Tensor], context: Tensor | None, chunk: int | None
    ) -> tuple[Tensor, Tensor]:
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
        D, P = self.input_dim, self.num_params
        shape = given.shape
        flat = given.reshape(-1, D)
        params = tuple(self.parameters())
        inputs = (flat, *params) if context is None else (flat, context, *params)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            x, out = _IncrementalSolve.apply(self, solve, chunk, shape[:-1], flat, context, *params)
        else:
            with torch.no_grad():
                x, out = self._natural(self._incremental_pass(flat, solve, context, chunk, shape[:-1]))
        return x.reshape(shape), out.reshape(*shape[:-1], P * D)

    def _chunk_size(self, chunk: int | None) -> int:
        return chunk if chunk is not None else max(1, round(math.sqrt(self.input_dim)))

    def _natural(self, result: _Pass) -> tuple[Tensor, Tensor]:
        """The pass's solution ``(n, D)`` and outputs ``(n, P * D)`` in the input layout."""
        D, P = self.input_dim, self.num_params
        inverse = self._structure().inverse
        n = result.x.shape[1]
        out = result.out.view(D, P, n).index_select(0, inverse).permute(2, 1, 0).reshape(n, P * D)
        return result.x.index_select(0, inverse).t(), out

    def _order_weights(self) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        """Input weights with columns in the order, hidden weights, output weights and biases with
        rows in the order (position-major: row ``j * P + p`` is parameter ``p`` of position ``j``)."""
        D, P = self.input_dim, self.num_params
        order = self._structure().order
        w_in = self.input_layer.weight.index_select(1, order)
        hidden = [layer.weight for layer in self._hidden()]
        w_out = self.output_layer.weight.view(P, D, -1).index_select(1, order).transpose(0, 1).reshape(D * P, -1)
        b_out = self.output_layer.bias.view(P, D).index_select(1, order).t().reshape(D * P, 1)
        return w_in, hidden, w_out, b_out

    def _incremental_pass(
        self,
        flat: Tensor,
        solve: Callable[..., Tensor],
        context: Tensor | None,
        chunk: int | None,
        batch_shape: torch.Size,
        keep: bool = False,
    ) -> _Pass:
        # Runs without autograd. Step k = 0..D: (a) for k >= 1, the outputs of position k - 1
        # (they read the last layer's units of degree < k) and x at that position; (b) for
        # k < D, the units of degree k in every layer (layer 0 reads positions < k, layer l + 1
        # the units of degree <= k of layer l). Steps are grouped in chunks of G: at the start of
        # a chunk [c, c + G) one matmul per layer gives every target of the chunk its part from
        # sources of degree < c (all known by then), and each step adds the part from the
        # chunk's own sources only, so a step reads O(G) units instead of the whole known prefix.
        # Everything is feature-major, (features, n): a block of units is a block of rows.
        D, P = self.input_dim, self.num_params
        s = self._structure()
        bounds = s.bounds  # bounds[l][k]: units of degree < k in hidden layer l
        num_layers = len(self.hidden_dims)
        G = self._chunk_size(chunk)
        starts = list(range(0, D + 1, G))
        n = flat.shape[0]

        def hidden_sizes(b: list[int]) -> tuple[list[int], list[int]]:
            per_chunk = [b[min(c + G, D)] - b[min(c, D)] for c in starts]
            per_degree = [b[k + 1] - b[k] for k in range(D)]
            return per_chunk, per_degree

        base: Tensor = self.input_layer.bias.unsqueeze(-1)
        if self.context_layer is not None and context is not None:
            base = (self.input_layer.bias + self.context_layer(context)).expand(*batch_shape, -1).reshape(n, -1).t()
        w_in, hidden, w_out, b_out = self._order_weights()
        weights = [w_in, *hidden]
        biases = [base] + [layer.bias.unsqueeze(-1) for layer in self._hidden()]
        w_chunk, w_step, b_chunk = [], [], []
        for i in range(num_layers):
            per_chunk, per_degree = hidden_sizes(bounds[i])
            w_chunk.append(weights[i].split(per_chunk))
            w_step.append(weights[i].split(per_degree))
            b_chunk.append(biases[i].split(per_chunk))
        out_chunk_sizes = [P * (min(c + G, D + 1) - max(c, 1)) for c in starts]
        wo_chunk = w_out.split(out_chunk_sizes)
        wo_step = w_out.split(P)
        bo_chunk = b_out.split(out_chunk_sizes)
        rows = flat.t().index_select(0, s.order).split(1)  # the given side, one (1, n) row per position

        acts = [act.forward for act in self.activations]
        x_rows = _BufferRows(D, rows[0])  # the solution, positions in the order
        units = [_BufferRows(w, rows[0]) for w in self.hidden_dims]  # activations, units in degree order
        pre = [_BufferRows(w, rows[0]) for w in self.hidden_dims] if keep else []
        out_rows = flat.new_empty(D * P, n)
        for ci, c in enumerate(starts):
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
                    out_rows[(k - 1) * P : k * P].copy_(out)
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
                    if keep:
                        pre[i].append(h)
                    units[i].append(acts[i](h))
        return _Pass(x_rows.buffer, out_rows, [p.buffer for p in pre], [u.buffer for u in units] if keep else [])

    def _incremental_backward(
        self,
        flat: Tensor,
        result: _Pass,
        solve: Callable[..., Tensor],
        chunk: int | None,
        grad_x: Tensor | None,
        grad_out: Tensor | None,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Cotangents of the given side, of the MADE output and of the pre-activations, in one reverse pass.

        With ``s_g, s_p`` the element-wise partials of ``solve`` and ``M`` the MADE, the
        solution's cotangent solves the triangular system ``x̄ = L_x + (∂M/∂x)^T p̄``,
        ``p̄ = L_p + s_p x̄``. Position ``j`` of ``x̄`` is final once the units of degree
        ``> j`` have passed their cotangents down, so the system is solved in reverse order,
        block by block, as the transpose of the forward pass (chunked the same way). Returns
        ``(ḡ, p̄)`` in the input layout and the pre-activations' cotangents ``h̄_l`` (units
        in degree order, ``(H_l, n)``), from which :meth:`_weight_grads` reads the
        parameters' gradients.
        """
        D, P = self.input_dim, self.num_params
        s = self._structure()
        bounds = s.bounds
        num_layers = len(self.hidden_dims)
        G = self._chunk_size(chunk)
        n = flat.shape[0]
        # the element-wise partials of the solve and of the activations, each in one batched call
        with torch.enable_grad():
            given_rows = flat.detach().t().index_select(0, s.order).requires_grad_()
            out_rows = result.out.detach().view(D, P, n).requires_grad_()
            x = solve(given_rows, *out_rows.unbind(1))
            s_g, s_p = torch.autograd.grad(x, (given_rows, out_rows), torch.ones_like(x))
            slopes = []
            for act, pre in zip(self.activations, result.pre):
                pre = pre.detach().requires_grad_()
                a = act(pre * 1.0)  # a copy: an in-place activation must not write into the leaf
                slopes.append(torch.autograd.grad(a, pre, torch.ones_like(a))[0])
        s_p = s_p.reshape(D * P, n)
        xbar = grad_x.t().index_select(0, s.order) if grad_x is not None else flat.new_zeros(D, n)
        if grad_out is not None:
            pbar = grad_out.reshape(n, P, D).index_select(2, s.order).permute(2, 1, 0).reshape(D * P, n)
        else:
            pbar = flat.new_zeros(D * P, n)
        w_in, hidden, w_out, _ = self._order_weights()
        abar = [flat.new_zeros(w, n) for w in self.hidden_dims]  # cotangents of the activations
        hbar = [flat.new_empty(w, n) for w in self.hidden_dims]  # cotangents of the pre-activations
        # per-position and per-degree views, made once (a step then slices only along its prefix)
        degree_sizes = [[b[k + 1] - b[k] for k in range(D)] for b in bounds]
        abar_k = [a.split(sizes) for a, sizes in zip(abar, degree_sizes)]
        hbar_k = [h.split(sizes) for h, sizes in zip(hbar, degree_sizes)]
        slope_k = [g.split(sizes) for g, sizes in zip(slopes, degree_sizes)]
        w_hidden_k = [w.split(sizes) for w, sizes in zip(hidden, degree_sizes[1:])]  # rows: targets of degree k
        w_in_k = w_in.split(degree_sizes[0])
        w_out_j, pbar_j, s_p_j, xbar_j = w_out.split(P), pbar.split(P), s_p.split(P), xbar.split(1)
        last = bounds[-1]
        for c in reversed(range(0, D, G)):
            end = min(c + G, D)
            for j in range(end - 1, c - 1, -1):
                pbar_j[j].addcmul_(s_p_j[j], xbar_j[j])  # position j is final: its output's cotangent
                if last[j + 1] > last[c]:  # to the last layer's units of degree in [c, j]
                    abar[-1][last[c] : last[j + 1]].addmm_(w_out_j[j][:, last[c] : last[j + 1]].t(), pbar_j[j])
                for i in reversed(range(num_layers)):  # the units of degree j, top down
                    if not degree_sizes[i][j]:
                        continue
                    block = torch.mul(abar_k[i][j], slope_k[i][j], out=hbar_k[i][j])
                    if self.residual and i < num_layers - 1:
                        block.add_(hbar_k[i + 1][j])
                    if i > 0:  # to the units of degree in [c, j] one layer down
                        lo, hi = bounds[i - 1][c], bounds[i - 1][j + 1]
                        if hi > lo:
                            abar[i - 1][lo:hi].addmm_(w_hidden_k[i - 1][j][:, lo:hi].t(), block)
                    elif j > c:  # to the positions in [c, j - 1]
                        xbar[c:j].addmm_(w_in_k[j][:, c:j].t(), block)
            if c == 0:
                continue
            # the chunk's parts to sources of degree < c, in one matmul per layer
            r = slice(c * P, end * P)
            if last[c]:
                abar[-1][: last[c]].addmm_(w_out[r, : last[c]].t(), pbar[r])
            for i in reversed(range(num_layers)):
                b = bounds[i]
                if b[end] == b[c]:
                    continue
                block = hbar[i][b[c] : b[end]]
                if i > 0:
                    k = bounds[i - 1][c]
                    if k:
                        abar[i - 1][:k].addmm_(hidden[i - 1][b[c] : b[end], :k].t(), block)
                else:
                    xbar[:c].addmm_(w_in[b[c] : b[end], :c].t(), block)
        gbar_natural, pbar_natural = self._natural(_Pass(s_g * xbar, pbar, [], []))
        return gbar_natural, pbar_natural, hbar

    def _weight_grads(
        self, x: Tensor, context: Tensor | None, result: _Pass, pbar: Tensor, hbar: list[Tensor]
    ) -> tuple[dict[int, Tensor], Tensor | None] | None:
        """The layers' gradients from the backward pass's cotangents and the forward pass's activations.

        A layer ``y = (W ⊙ M) a + b`` with output cotangent ``ȳ`` (``(out, n)``) has
        ``W̄ = (ȳ aᵀ) ⊙ M`` and ``b̄ = ȳ 1``; the pre-activations' cotangents ``h̄_l`` are
        the hidden layers' output cotangents (also with residual blocks), ``p̄`` the output
        layer's, so no second network pass is needed. ``context`` is the flattened ``(n, C)``
        context or ``None``. Returns the parameters' gradients keyed by ``id`` and the
        context's gradient (or ``None``), or ``None`` if the MADE has parameters this does
        not cover (a parametrised activation): those take the parallel pass.
        """
        layers = [self.input_layer, *self._hidden(), self.output_layer]
        covered = {id(p) for layer in layers for p in (layer.weight, layer.bias)}
        if self.context_layer is not None:
            covered.add(id(self.context_layer.weight))
        if any(id(p) not in covered for p in self.parameters()):
            return None
        inputs = [x.t(), *result.acts]  # each layer's input, feature-major
        cotangents = [*hbar, pbar.t()]
        grads: dict[int, Tensor] = {}
        for layer, a, ybar in zip(layers, inputs, cotangents):
            grads[id(layer.weight)] = torch.mm(ybar, a.t()).mul_(_mask(layer))
            grads[id(layer.bias)] = ybar.sum(1)
        grad_context = None
        if self.context_layer is not None and context is not None:
            grads[id(self.context_layer.weight)] = torch.mm(hbar[0], context)
            grad_context = torch.mm(hbar[0].t(), self.context_layer.weight)
        return grads, grad_context


def _mask(layer: nn.Linear) -> Tensor:
    """The 0/1 mask of a masked layer (a buffer of :class:`~pyro_nf.nn.MaskedLinear`)."""
    mask = layer.get_buffer("mask")
    return mask


@dataclass
class _Saved:
    """What the forward pass of :class:`_IncrementalSolve` leaves for its backward pass."""

    made: IncrementalSequential
    solve: Callable[..., Tensor]
    chunk: int | None
    batch_shape: torch.Size
    result: _Pass


class _SolveContext(FunctionCtx):
    """The autograd context of :class:`_IncrementalSolve`, with the attributes it sets and reads."""

    saved: _Saved
    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]

    def save_for_backward(self, *tensors: Tensor | None) -> None: ...


class _IncrementalSolve(torch.autograd.Function):
    """:meth:`MADE.sequential <pyro_nf.nn.MADE.sequential>`'s incremental pass with a hand-written backward pass.

    The forward pass runs without autograd, writing into buffers; the backward pass solves
    the transposed triangular system incrementally
    (:meth:`IncrementalSequential._incremental_backward`) and reads the parameters' and the
    context's gradients from its cotangents and the forward pass's activations
    (:meth:`IncrementalSequential._weight_grads`). Not twice differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: _SolveContext,
        made: IncrementalSequential,
        solve: Callable[..., Tensor],
        chunk: int | None,
        batch_shape: torch.Size,
        flat: Tensor,
        context: Tensor | None,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        result = made._incremental_pass(flat, solve, context, chunk, batch_shape, keep=True)
        ctx.saved = _Saved(made, solve, chunk, batch_shape, result)
        x, out = made._natural(result)
        ctx.save_for_backward(flat, context, x, *params)
        return x, out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: _SolveContext, grad_x: Tensor | None, grad_out: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved
        made = saved.made
        flat, context, x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gbar, pbar, hbar = made._incremental_backward(flat, saved.result, saved.solve, saved.chunk, grad_x, grad_out)
        wanted = [t for t, need in zip((context, *params), needs[5:]) if need and t is not None]
        grads: dict[int, Tensor | None] = {}
        if wanted:
            with torch.enable_grad():  # the fallback below differentiates through this
                ctx_flat = None
                if context is not None:
                    ctx_flat = context.expand(*saved.batch_shape, context.shape[-1]).reshape(-1, context.shape[-1])
            direct = made._weight_grads(x, ctx_flat, saved.result, pbar, hbar)
            if direct is not None:
                grads = dict(direct[0])
                if context is not None and direct[1] is not None:
                    grad_context = direct[1].reshape(*saved.batch_shape, -1)
                    grads[id(context)] = grad_context.sum_to_size(context.shape)
            else:  # p̄'s vector-Jacobian product with one parallel MADE pass at the solution
                with torch.enable_grad():
                    out = made(x.detach(), ctx_flat)  # the solution as a constant: its own graph is this pass
                    found = torch.autograd.grad(out, wanted, pbar, allow_unused=True)
                grads = {id(t): g for t, g in zip(wanted, found)}
        return (
            None,
            None,
            None,
            None,
            gbar if needs[4] else None,
            grads.get(id(context)) if context is not None and needs[5] else None,
            *(grads.get(id(p)) if need else None for p, need in zip(params, needs[6:])),
        )
