"""Divergence estimators and the right-hand side of a continuous normalizing flow's solve.

Along a solve of ``dz/dt = f(z, t)`` the log-density changes by ``-Tr(∂f/∂z)``:

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

from typing import Literal

import torch
from torch import Tensor, nn

Noise = Literal["rademacher", "gaussian"]
NOISES: tuple[str, ...] = ("rademacher", "gaussian")


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
        >>> from pyro_nf.nn.odefunc import ODENet
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
