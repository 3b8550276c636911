"""Flow matching: train FFJORD's vector fields by regression, without solving the ODE; keep the exact likelihood.

A continuous normalizing flow trained by maximum likelihood solves an ODE (and its
adjoint) at every step. Flow matching fits the same field by regression instead: pair
base noise ``x0 ~ N(0, I)`` with a data point ``x1``, pick a path between them, and
regress the field on the path's velocity at a random time. With local time ``s`` in
``[0, 1]`` and the linear (conditional optimal transport) path of Lipman et al.,

.. math::

    x_s = (1 - (1 - \\sigma_{\\min}) s)\\, x_0 + s\\, x_1, \\qquad
    u_s = \\frac{dx_s}{ds} = x_1 - (1 - \\sigma_{\\min})\\, x_0, \\qquad
    \\mathcal{L}(\\theta) = \\mathbb{E}_{s, x_0, x_1}
    \\big\\lVert t_1 f_\\theta(x_s, t_1 s) - u_s \\big\\rVert^2 .

The minimiser is the marginal field ``t_1 f*(x, t_1 s) = E[u_s | x_s = x]``, whose flow
from ``t = 0`` to ``t = t_1`` carries ``N(0, I)`` to the data (``N(0, σ_min² I)`` around it
when ``σ_min > 0``). The field's own time is ``t = t_1 s``, so its velocity is the path's
scaled by ``1 / t_1`` (hence the factor ``t_1`` above: the loss is measured in local time
and its value does not depend on ``t_1``). Nothing about the transform changes: it is the
same FFJORD, and ``log_prob`` (with the exact trace in evaluation mode at small ``D``),
sampling, NFE counting and fine-tuning by maximum likelihood work as before.

- ``path="linear"`` (above; ``σ_min = 0`` is rectified flow's straight line) or
  ``path="cosine"``: ``x_s = cos(π s / 2) x0 + sin(π s / 2) x1`` (the trigonometric
  interpolant of Albergo & Vanden-Eijnden, which keeps unit variance between whitened
  endpoints; ``σ_min`` must be 0).
- ``coupling="independent"``: ``x0`` and ``x1`` independent. ``coupling="ot"``: minibatch
  optimal transport (Tong et al.): within the batch, ``x0`` is re-paired with the data by
  the exact assignment minimising the total squared Euclidean distance (SciPy's
  ``linear_sum_assignment``), which straightens the learned paths. With a context, pairs
  are formed only among rows of equal context (``x0`` given the context must stay
  ``N(0, I)``): a context unique to each row leaves the independent pairing.
- A learned ``t1`` (``train_t1=True``) is not trained by flow matching: the minimiser's
  flow map is the same for every ``t1`` (a change of ``t1`` is a change of time units),
  so ``t1`` enters the loss detached and keeps its value; maximum-likelihood fine-tuning
  trains it.

**Stacks of CNF blocks** (:func:`~pyro_nf.transforms.continuous_multiscale.ffjord_multiscale`, or any
:class:`~pyro_nf.core.FlowStack` of FFJORD blocks, :class:`~pyro_nf.transforms.multiscale.Squeeze`
and its inverse, and :class:`~pyro_nf.transforms.multiscale.FactorOut` without a learned prior).
The squeezes and the factor-out splits only move entries, so every entry of every block's
input is one coordinate ``i`` of the data tensor, and block ``k`` (in base-to-data order) acts on
a set ``S_k`` of data coordinates: all of them for the outer blocks, the kept channels for the
blocks inside a factor-out (the factored-out channels are left unchanged there). The path:

1. Coordinate ``i`` is acted on by ``n_i`` blocks. Its *progress* ``p_i`` goes from 0 to 1 in
   equal steps of ``1 / n_i``, one per block that acts on it, linearly in that block's local
   time ``s``, and stays put while other blocks run: entering block ``k`` after ``c_{ik}`` of its
   blocks, ``p_i = (c_{ik} + s) / n_i``.
2. Each coordinate follows the one-block path in its progress:
   ``x_i = (1 - (1 - σ_min) p_i) x0_i + p_i x1_i`` (or the cosine one), so block ``k``'s target
   velocity is ``u_i = (x1_i - (1 - σ_min) x0_i) / n_i`` on ``S_k``.
3. Block ``k``'s input and target are these coordinates in the block's layout: the
   data-space tensors pushed back through the squeezes and splits that lie between the
   block and the data (computed once as an index map by walking the stack,
   :func:`block_segments`). Block ``k``'s field is regressed on its own segment, at its own
   time ``s`` per sample; the loss is the sum over the blocks.

Run with these exact (conditional) velocities, the blocks carry ``x0`` to ``x1`` (each
coordinate's progress sums to one; the tests integrate them through the real stack).
The regression gives each block ``E[u_{S_k} | x_{S_k}]``, the best field that sees only its
own coordinates; that is the marginal field of the whole state when every coordinate outside
``S_k`` is still untouched base noise, independent of the rest. So the construction needs
the blocks' sets to grow along the base-to-data order (``S_j ⊆ S_k`` for ``j < k``, as in a
multiscale CNF, whose inner blocks come first from the base), a standard Normal base and the
independent coupling when some block sees only part of the data; other stacks get a
``ValueError`` naming the problem, as does any other part (a learned prior coupling, an
ActNorm, a coupling layer: parts with parameters that no field's regression would train).

Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023. Liu et al., "Flow
Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow", ICLR 2023.
Albergo & Vanden-Eijnden, "Building Normalizing Flows with Stochastic Interpolants", ICLR
2023. Tong et al., "Improving and generalizing flow-based generative models with minibatch
optimal transport", TMLR 2024.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from pyro.distributions import ConditionalTransformModule
from torch import Tensor
from torch.distributions import Transform

from pyro_nf.checks import check_choice, check_tensor, validation_enabled
from pyro_nf.core import FlowStack, InverseTransformModule
from pyro_nf.transforms.multiscale import FactorOut, Squeeze
from pyro_nf.transforms.ode import SolveStatistics

if TYPE_CHECKING:
    from pyro_nf.transforms.continuous import ConditionedFFJORD

__all__ = ["block_segments", "flow_matching_loss", "ot_pairing", "BlockSegment", "FlowMatchingOptions"]

Path = Literal["linear", "cosine"]
Coupling = Literal["independent", "ot"]
PATHS: tuple[Path, ...] = ("linear", "cosine")
COUPLINGS: tuple[Coupling, ...] = ("independent", "ot")


class FlowMatchingOptions(TypedDict, total=False):
    """The keyword options of :func:`flow_matching_loss`, which the FFJORD methods pass on."""

    path: Path
    coupling: Coupling
    sigma_min: float
    x0: Tensor | None
    generator: torch.Generator | None


@dataclasses.dataclass(frozen=True)
class BlockSegment:
    """One CNF block of a stack and its segment of the flow-matching path.

    ``block`` is the FFJORD transform (its field is regressed on this segment); ``index``
    gives, for every entry of the block's input (the block's event shape), the flat index of
    the data coordinate it holds; ``start`` is each entry's progress along its path when the
    block starts (event shape), and ``rate`` its progress per unit of the block's local time
    ``s`` (``1 / n_i``).
    """

    block: ConditionedFFJORD
    index: Tensor
    start: Tensor
    rate: Tensor


def _is_cnf(part: object) -> bool:
    """Whether ``part`` is an FFJORD transform (a conditioned or learnable CNF block): one ODE solve."""
    return isinstance(part, SolveStatistics) and isinstance(part, Transform)


def _unsupported(part: object) -> ValueError:
    return ValueError(
        "flow matching: expected a stack of FFJORD blocks, FlowStack, Squeeze, its inverse and FactorOut "
        f"without a learned prior, got a part of type {type(part).__name__}; parts other than the CNF blocks "
        "must be parameter-free rearrangements of the entries, so that the path through them is known"
    )


def _walk(part: Transform, index: Tensor, found: list[tuple[ConditionedFFJORD, Tensor]]) -> Tensor:
    """Map the data-coordinate ``index`` at ``part``'s output (data side) to its input (base side).

    CNF blocks leave the layout as it is and are recorded with the layout they act on (in
    data-to-base order); the squeezes and splits rearrange it.
    """
    if _is_cnf(part):
        if tuple(index.shape) != tuple(part.net.event_shape):
            raise ValueError(
                f"flow matching: an FFJORD block over {tuple(part.net.event_shape)} receives entries of shape "
                f"{tuple(index.shape)} in this stack"
            )
        found.append((part, index))
        return index
    if isinstance(part, FlowStack):
        for inner in reversed(part.parts):
            index = _walk(inner, index, found)
        return index
    if isinstance(part, FactorOut):
        if part.prior is not None:
            raise ValueError(
                "flow matching: a FactorOut with a learned prior (an affine coupling with parameters) is not "
                "supported: no field's regression would train it; build the factor-out without a prior"
            )
        c = part.channels
        kept = _walk(part.inner, index[:c], found)
        return torch.cat([kept, index[c:]], 0)
    if isinstance(part, Squeeze):
        return part._inverse_and_log_det(index)[0]
    if isinstance(part, InverseTransformModule) and isinstance(part.base, Squeeze):
        return part.base._forward_and_log_det(index)[0]
    raise _unsupported(part)


def _data_shape(flow: Transform) -> tuple[int, ...]:
    if _is_cnf(flow):
        return tuple(flow.net.event_shape)
    if isinstance(flow, FlowStack) and flow.input_shape is not None:
        return tuple(flow.forward_shape(flow.input_shape))
    if isinstance(flow, FlowStack):
        raise ValueError("flow matching: the stack's first part does not say its input_shape")
    raise _unsupported(flow)


def block_segments(flow: Transform, device: torch.device | str | None = None) -> list[BlockSegment]:
    """The CNF blocks of ``flow`` in base-to-data order, each with its segment of the flow-matching path.

    Walks the stack from the data back to the base (through :class:`~pyro_nf.core.FlowStack`
    parts, :class:`~pyro_nf.transforms.multiscale.FactorOut` inner flows, squeezes and their
    inverses), keeping for each FFJORD block the data coordinate held by each entry of its input.
    Each coordinate ``i`` acted on by ``n_i`` blocks progresses by ``1 / n_i`` in each (see the
    module's docstring).

    Raises:
        ValueError: a part other than those, a factor-out with a learned prior, or blocks whose sets
            of coordinates do not grow along the base-to-data order.

    Example::

        >>> from pyro_nf.transforms import ffjord_multiscale
        >>> flow = ffjord_multiscale((1, 4, 4), levels=1, blocks_per_scale=1, hidden_channels=[4])
        >>> [tuple(s.index.shape) for s in block_segments(flow)]  # inner block first (base side)
        [(2, 2, 2), (4, 2, 2), (1, 4, 4)]
        >>> [round(float(s.rate.min()), 3) for s in block_segments(flow)]  # kept entries: 3 blocks
        [0.333, 0.333, 0.333]
    """
    shape = _data_shape(flow)
    size = math.prod(shape)
    found: list[tuple[ConditionedFFJORD, Tensor]] = []
    base = _walk(flow, torch.arange(size, device=device).reshape(shape), found)
    if tuple(base.shape) != shape or not torch.equal(base.reshape(-1).sort().values, torch.arange(size, device=device)):
        raise ValueError("flow matching: the stack's parts do not rearrange the data's entries one to one")
    if not found:
        raise ValueError("flow matching: the flow has no FFJORD block to train")
    found.reverse()  # base-to-data order
    flat = [index.reshape(-1) for _, index in found]
    counts = torch.bincount(torch.cat(flat), minlength=size)
    done = torch.zeros(size, dtype=torch.long, device=base.device)
    segments = []
    for k, ((block, index), entries) in enumerate(zip(found, flat)):
        outside = done > 0
        outside[entries] = False
        if bool(outside.any()):
            raise ValueError(
                f"flow matching: block {k} (base-to-data order) does not see {int(outside.sum())} data coordinates "
                "that earlier blocks already moved; the path splits into per-block regressions only when every "
                "block sees all coordinates moved before it (inner blocks of a multiscale CNF come first from the "
                "base)"
            )
        n = counts[entries].to(torch.get_default_dtype())
        start, rate = (done[entries] / n).reshape(index.shape), (1 / n).reshape(index.shape)
        segments.append(BlockSegment(block, index, start, rate))
        done[entries] += 1
    return segments


def _linear_sum_assignment() -> Callable[..., Any]:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:
        raise ImportError(
            "coupling='ot' needs SciPy's scipy.optimize.linear_sum_assignment: pip install scipy "
            "(or pip install 'pyro-nf[ot]')"
        ) from error
    return linear_sum_assignment  # type: ignore[no-any-return]


def ot_pairing(x0: Tensor, x1: Tensor, groups: Tensor | None = None) -> Tensor:
    """The permutation ``perm`` of the batch minimising ``Σ_n ‖x0[perm[n]] - x1[n]‖²``: exact minibatch OT.

    The assignment problem on the ``N x N`` squared Euclidean costs is solved exactly by
    SciPy's ``linear_sum_assignment`` (on the CPU, in float64; ``O(N³)``, a few milliseconds at
    ``N = 512``). With ``groups`` (an integer label per row), rows are paired only within their
    group.

    Args:
        x0: base samples ``(N, ...)``.
        x1: data ``(N, ...)``, the same shape.
        groups: ``(N,)`` labels, or None for one group.

    Returns:
        ``perm`` (``(N,)``, on ``x0``'s device): ``x0[perm]`` is the noise paired with ``x1``.

    Example::

        >>> x1 = torch.tensor([[0.0], [10.0], [5.0]])
        >>> ot_pairing(torch.tensor([[9.0], [4.0], [1.0]]), x1).tolist()
        [2, 0, 1]

    Tong et al., "Improving and generalizing flow-based generative models with minibatch optimal
    transport", TMLR 2024.
    """
    if not isinstance(x0, Tensor) or not isinstance(x1, Tensor) or x0.shape != x1.shape or x0.dim() < 1:
        raise ValueError(
            "ot_pairing: expected x0 and x1 of the same shape (N, ...), got "
            f"{tuple(getattr(x0, 'shape', ()))} and {tuple(getattr(x1, 'shape', ()))}"
        )
    n = x0.shape[0]
    if groups is not None and (groups.shape != (n,) or groups.dtype.is_floating_point):
        raise ValueError(
            f"ot_pairing: expected integer groups of shape ({n},), got {groups.dtype} of shape {tuple(groups.shape)}"
        )
    assign = _linear_sum_assignment()
    a = x0.detach().reshape(n, -1).to("cpu", torch.float64)
    b = x1.detach().reshape(n, -1).to("cpu", torch.float64)
    perm = torch.arange(n)
    members_list = [perm] if groups is None else [(groups.cpu() == g).nonzero()[:, 0] for g in groups.unique()]
    for members in members_list:
        if members.numel() < 2:
            continue
        # ‖a_i - b_j‖² = ‖a_i‖² + ‖b_j‖² - 2 a_i·b_j, and the squared norms add the same to every
        # permutation's total: minimising the squared distances is maximising the inner products
        rows, cols = assign((-(a[members] @ b[members].T)).numpy())
        perm[members[torch.as_tensor(cols)]] = members[torch.as_tensor(rows)]
    return perm.to(x0.device)


def _interpolate(x0: Tensor, x1: Tensor, progress: Tensor, path: Path, sigma_min: float) -> tuple[Tensor, Tensor]:
    """The path's point at ``progress`` and its derivative with respect to the progress."""
    if path == "linear":
        return (1 - (1 - sigma_min) * progress) * x0 + progress * x1, x1 - (1 - sigma_min) * x0
    angle = (math.pi / 2) * progress
    cos, sin = angle.cos(), angle.sin()
    return cos * x0 + sin * x1, (math.pi / 2) * (cos * x1 - sin * x0)


def _context_rows(context: Tensor, batch: torch.Size) -> Tensor:
    """The context of every sample, ``(N, context_dim)``, from a context that broadcasts to the batch shape."""
    try:
        shape: torch.Size | None = torch.broadcast_shapes(batch, context.shape[:-1])
    except RuntimeError:
        shape = None
    if shape != batch:
        raise ValueError(
            f"context: its batch shape {tuple(context.shape[:-1])} does not broadcast to x's, {tuple(batch)}"
        )
    return context.expand(*batch, context.shape[-1]).reshape(batch.numel(), -1)


def _conditioned(flow: object, context: Tensor | None) -> Transform:
    if isinstance(flow, ConditionalTransformModule):
        if context is None:
            raise ValueError(f"flow matching: a {type(flow).__name__} needs a context, got None")
        return flow.condition(context)
    if context is not None:
        raise ValueError(
            f"flow matching: a {type(flow).__name__} takes no context (its blocks carry any context they have), "
            "got one; pass a conditional flow to condition it"
        )
    if not isinstance(flow, Transform):
        raise TypeError(f"flow: expected an FFJORD transform or a FlowStack of them, got {type(flow).__name__}")
    return flow


def flow_matching_loss(
    flow: Transform | ConditionalTransformModule,
    x: Tensor,
    context: Tensor | None = None,
    *,
    path: Path = "linear",
    coupling: Coupling = "independent",
    sigma_min: float = 0.0,
    x0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The flow-matching loss of a batch of data for an FFJORD transform or a stack of FFJORD blocks.

    For a single block, ``mean_n ‖t_1 f(x_s, t_1 s) - u_s‖²`` with one uniform time ``s`` per
    sample on the chosen path between the noise ``x0`` and the data ``x`` (see the module's
    docstring); for a stack, the sum of every block's loss on its segment of the path. One field
    evaluation per block and no ODE solve: ``loss.backward()`` and an optimizer step train the
    fields, and the transform's ``log_prob`` stays the exact CNF likelihood.

    Args:
        flow: an :class:`~pyro_nf.transforms.continuous.FFJORD` (or any conditioned FFJORD), a
            :class:`~pyro_nf.transforms.continuous.ConditionalFFJORD` (with ``context``), or a
            :class:`~pyro_nf.core.FlowStack` of FFJORD blocks, squeezes and factor-outs such as
            :func:`~pyro_nf.transforms.continuous_multiscale.ffjord_multiscale` (or a conditional stack, with
            ``context``).
        x: data ``(..., *event)``.
        context: the context ``(..., context_dim)`` of a conditional flow (broadcast against ``x``'s
            batch shape), else None.
        path: ``"linear"`` (Lipman et al.'s conditional OT path) or ``"cosine"``.
        coupling: ``"independent"`` or ``"ot"`` (exact minibatch optimal transport; needs SciPy).
        sigma_min: the linear path's end width ``σ_min`` in ``[0, 1)`` (0: the path ends at the data).
        x0: base noise paired with ``x``, shaped like ``x`` (default: standard Normal draws, the base
            of pyro_nf's flows; a stack whose blocks see only part of the data needs independent
            standard Normal entries).
        generator: the random generator of the noise and of the times.

    Returns:
        The scalar loss (differentiable with respect to the fields' parameters; a learned ``t1``
        gets no gradient).

    Example::

        >>> import pyro.distributions as dist
        >>> from pyro_nf.transforms import ffjord
        >>> flow = ffjord(2, [32, 32])
        >>> optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
        >>> x = torch.randn(256, 2) * 0.5 + 2.0
        >>> for _ in range(20):
        ...     optimizer.zero_grad()
        ...     loss = flow_matching_loss(flow, x)  # no ODE solve
        ...     loss.backward()
        ...     optimizer.step()
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> flow = flow.eval()  # exact trace, one solve
        >>> bool(dist.TransformedDistribution(base, [flow]).log_prob(x).mean() > base.log_prob(x).mean())
        True
    """
    check_choice(path, PATHS, "path")
    check_choice(coupling, COUPLINGS, "coupling")
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)) or not 0 <= sigma_min < 1:
        raise ValueError(f"sigma_min: expected a number in [0, 1), got {sigma_min!r}")
    if path == "cosine" and sigma_min != 0:
        raise ValueError(f"sigma_min: the cosine path ends at the data, expected sigma_min = 0, got {sigma_min!r}")
    conditioned = _conditioned(flow, context)
    shape = _data_shape(conditioned)
    segments = block_segments(conditioned, device=x.device if isinstance(x, Tensor) else None)
    like = next(segments[0].block.net.parameters())
    finite = validation_enabled()  # the finite-value check reads a value back from the device
    x = check_tensor(x, name="x", event_shape=shape, like=like, check_finite=finite)
    batch = x.shape[: x.dim() - len(shape)]
    n = batch.numel()
    if n < 1:
        raise ValueError(f"x: expected at least one sample, got shape {tuple(x.shape)}")
    x1 = x.reshape(n, -1)
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        x0 = check_tensor(x0, name="x0", like=like, check_finite=finite)
        if x0.shape != x.shape:
            raise ValueError(f"x0: expected the shape of x, {tuple(x.shape)}, got {tuple(x0.shape)}")
        x0 = x0.reshape(n, -1)

    contexts = [None if s.block.context is None else _context_rows(s.block.context, batch) for s in segments]

    if coupling == "ot":
        partial = [k for k, s in enumerate(segments) if s.index.numel() < x1.shape[1]]
        if partial:
            raise ValueError(
                f"coupling='ot': block {partial[0]} (base-to-data order) sees only part of the data; its field "
                "cannot see the factored-out noise, which OT pairing makes depend on the data: use "
                "coupling='independent' for this stack"
            )
        given = [c for c in contexts if c is not None]
        groups = torch.unique(torch.cat(given, -1), dim=0, return_inverse=True)[1] if given else None
        x0 = x0[ot_pairing(x0, x1, groups)]

    loss = x.new_zeros(())
    for segment, c in zip(segments, contexts):
        block = segment.block
        entries = segment.index.reshape(-1)
        s = torch.rand(n, generator=generator, device=x.device, dtype=x.dtype)
        start, rate = segment.start.reshape(-1).to(x), segment.rate.reshape(-1).to(x)
        xs, velocity = _interpolate(x0[:, entries], x1[:, entries], start + s[:, None] * rate, path, sigma_min)
        t1 = block.end_time().detach().to(x)
        field = block.net(t1 * s, xs.reshape(n, *block.net.event_shape), c)
        loss = loss + (t1 * field.reshape(n, -1) - rate * velocity).square().sum(-1).mean()
    return loss
