"""FFJORD: continuous normalizing flows solved with torchdiffeq.

The transform integrates a learned vector field from ``t = 0`` (base) to
``t = t1`` (data), carrying the change of log-density as an extra state:

.. math::

    \\frac{dz}{dt} = f(z, t), \\qquad
    \\frac{da}{dt} = \\operatorname{Tr}\\frac{\\partial f}{\\partial z}, \\qquad
    \\log\\left|\\det \\frac{\\partial z(t_1)}{\\partial z(0)}\\right| = a(t_1) - a(0),

so ``log p(x) = log p_Z(z(0)) - ∫₀^{t₁} Tr(∂f/∂z) dt``. Both directions are
one ODE solve (``parallel = "both"``): :meth:`ConditionedFFJORD.forward_and_log_det`
solves from ``0`` to ``t1``, :meth:`~ConditionedFFJORD.inverse_and_log_det`
from ``t1`` back to ``0``; ``TransformedDistribution.log_prob`` and
``rsample`` followed by ``log_prob`` cost one solve each.

Trace: Hutchinson's estimator (Rademacher or Gaussian noise, fixed for one
solve) in training, the exact trace (``D`` vector-Jacobian products) in
evaluation mode at small ``D`` (``eval_trace="auto"``). Evaluation mode may use
its own solver and tolerances. Gradients come from the adjoint method
(``odeint_adjoint``, memory independent of the number of steps, with the
network parameters and the context passed explicitly) or, with
``adjoint=False``, by backpropagating through the solver.

RNODE regularisation (``kinetic_energy=λ_K``, ``jacobian_norm=λ_J``): in
training mode the solve also integrates ``∫‖f‖² dt`` and ``∫‖∂f/∂z‖_F² dt``
(the latter from the same vector-Jacobian product as the trace). Those two
states are left out of the solver's error control (a custom norm, and the
adjoint seminorm on the way back). After a solve,
:meth:`~ConditionedFFJORD.regularization` returns
``λ_K · mean ∫‖f‖² + λ_J · mean ∫‖J‖_F²``: add it to a loss, or inside a Pyro
guide with ``pyro.factor("rnode", flow.regularization(), has_rsample=True)``
(``pyro.factor("rnode", -flow.regularization())`` in a model).

The number of function evaluations (NFE) of the last solve is :attr:`nfe`
(of the last solve in each direction :attr:`nfe_forward`, :attr:`nfe_inverse`;
of the adjoint solve of the last backward pass :attr:`nfe_adjoint`).

Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable
Reversible Generative Models", ICLR 2019. Finlay et al., "How to train your
neural ODE: the world of Jacobian and kinetic regularization", ICML 2020.
Kidger et al., "'Hey, that's not an ODE': Faster ODE Adjoints via Seminorms", ICML 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributions import constraints

from pyro_nf.checks import check_positive_int
from pyro_nf.conditional import ConditionalFlowTransformModule
from pyro_nf.core import FlowTransform, FlowTransformModule
from pyro_nf.nn.divergence import AugmentedDynamics, sample_noise
from pyro_nf.nn.odefunc import Activation, ConvODENet, ODENet
from pyro_nf.transforms.flow_matching import FlowMatchingOptions, flow_matching_loss
from pyro_nf.transforms.ode import (
    EndTime,
    ODEOptions,
    SolverOptions,
    SolveStatistics,
    _SolveRecord,
    split_solver_options,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ffjord",
    "conditional_ffjord",
    "ConditionedFFJORD",
    "FFJORD",
    "ConditionalFFJORD",
    "FFJORDOptions",
    "VECTOR_FIELDS",
    "default_ffjord_hidden_dims",
]

VectorField = ODENet | ConvODENet
VECTOR_FIELDS: tuple[type[nn.Module], ...] = (ODENet, ConvODENet)
"""The vector fields an FFJORD transform accepts: over vectors ``(D,)`` or over images ``(C, H, W)``."""


def _check_field(net: object) -> None:
    if not isinstance(net, VECTOR_FIELDS):
        raise TypeError(f"net: expected an ODENet or a ConvODENet, got {type(net).__name__}")


class ConditionedFFJORD(SolveStatistics, FlowTransform):
    """The math of an FFJORD transform: one ODE solve per direction, given a vector field and a context.

    The event shape is the field's: ``(D,)`` for an :class:`~pyro_nf.nn.odefunc.ODENet`,
    ``(C, H, W)`` for a :class:`~pyro_nf.nn.odefunc.ConvODENet` (event dim 3; the
    exact trace then runs over all ``C H W`` entries).

    Args:
        net: the vector field (an :class:`~pyro_nf.nn.odefunc.ODENet` or a
            :class:`~pyro_nf.nn.odefunc.ConvODENet`).
        end_time: the :class:`EndTime` module giving ``t1``.
        options: the :class:`ODEOptions`.
        context: the context ``(..., context_dim)`` of a conditional field, or None.
    """

    parallel = "both"

    def __init__(
        self,
        net: VectorField,
        end_time: EndTime,
        options: ODEOptions,
        context: Tensor | None = None,
        record: _SolveRecord | None = None,
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if not isinstance(options, ODEOptions):
            raise TypeError(f"options: expected ODEOptions, got {type(options).__name__}")
        self.net = net
        self.end_time = end_time
        self.options = options
        self.context = context
        self._record = record if record is not None else _SolveRecord()
        self.input_shape = tuple(net.event_shape)
        if len(self.input_shape) > 1:
            self.domain = constraints.independent(constraints.real, len(self.input_shape))
            self.codomain = constraints.independent(constraints.real, len(self.input_shape))

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return (self.net, self.end_time, self.context)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve(x, forward=True)

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve(y, forward=False)

    def _solve(self, value: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        event = tuple(self.net.event_shape)
        event_dims = len(event)
        training = self.net.training
        settings = self.options.resolve(training, self.net.input_dim)
        batch = value.shape[: value.dim() - event_dims]
        context = self.context
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
            context = context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])
        z = value.expand(*batch, *event).reshape(-1, *event)
        regularize = training and self.options.regularize and torch.is_grad_enabled()
        noise = sample_noise(self.options.noise, z) if settings.trace == "hutchinson" else None
        dynamics = AugmentedDynamics(self.net, settings.trace, noise, context, regularize, event_dims)

        end = self.end_time().to(z)
        start = torch.zeros_like(end)
        times = torch.stack([start, end] if forward else [end, start])
        zeros = z.new_zeros(z.shape[0])
        state = (z, zeros, zeros, zeros) if regularize else (z, zeros)

        use_adjoint = self.options.adjoint and torch.is_grad_enabled()
        params: list[Tensor] = []
        if use_adjoint:
            params = [p for p in self.net.parameters() if p.requires_grad]
            if context is not None and context.requires_grad:
                params.append(context)
        solution = self.options.integrate(dynamics, state, times, settings, params if use_adjoint else None)

        record = self._record
        record.nfe = record.solve_calls = dynamics.calls
        record.dynamics = dynamics
        record.adjoint = use_adjoint
        if forward:
            record.nfe_forward = dynamics.calls
        else:
            record.nfe_inverse = dynamics.calls
        sign = 1.0 if forward else -1.0
        if regularize:
            record.kinetic_energy = sign * solution[2][-1].reshape(batch)
            record.jacobian_norm = sign * solution[3][-1].reshape(batch)
        else:
            record.kinetic_energy = record.jacobian_norm = None
        out = solution[0][-1].reshape(*batch, *event)
        log_det = sign * solution[1][-1].reshape(batch)
        return out, log_det

    def __getstate__(self) -> dict[str, object]:
        state = super().__getstate__()
        state["_record"] = _SolveRecord()
        return state


class FFJORD(ConditionedFFJORD, FlowTransformModule):
    """A learnable continuous normalizing flow (a ``TransformModule``).

    Args:
        net: the vector field without context: an :class:`~pyro_nf.nn.odefunc.ODENet` (event shape
            ``(D,)``) or a :class:`~pyro_nf.nn.odefunc.ConvODENet` (event shape ``(C, H, W)``).
        t1: integration time.
        train_t1: learn ``t1``.
        options: the :class:`ODEOptions` (default: ``ODEOptions()``).

    Example::

        >>> _ = torch.manual_seed(0)
        >>> flow = FFJORD(ODENet(2, [16], zero_init=False), options=ODEOptions(trace="exact"))
        >>> x = torch.randn(5, 2)
        >>> y, log_det = flow.forward_and_log_det(x)
        >>> x_back, log_det_back = flow.inverse_and_log_det(y)
        >>> bool(torch.allclose(x_back, x, atol=1e-3)), bool(torch.allclose(log_det, log_det_back, atol=1e-3))
        (True, True)
        >>> flow.nfe > 0
        True
    """

    def __init__(
        self,
        net: VectorField,
        t1: float = 1.0,
        train_t1: bool = False,
        options: ODEOptions | None = None,
        cache_size: int = 1,
    ) -> None:
        _check_field(net)
        if net.context_dim:
            raise ValueError(
                f"net: expected a vector field without context (context_dim=0), got context_dim={net.context_dim}; "
                "use ConditionalFFJORD"
            )
        super().__init__(net, EndTime(t1, train_t1), options or ODEOptions(), None, None, cache_size)

    def flow_matching_loss(self, x: Tensor, **options: Unpack[FlowMatchingOptions]) -> Tensor:
        """The flow-matching loss of the data ``x``: see :func:`~pyro_nf.transforms.flow_matching_loss`."""
        return flow_matching_loss(self, x, **options)


class ConditionalFFJORD(SolveStatistics, ConditionalFlowTransformModule):
    """A continuous normalizing flow whose vector field reads a context; ``.condition(context)`` gives the transform.

    The context enters every concat-squash layer's gate and shift. Statistics
    (NFE, RNODE integrals) of the last solve of any conditioned transform are
    readable here too.

    Example::

        >>> flow = ConditionalFFJORD(ODENet(2, [16], context_dim=3))
        >>> flow.condition(torch.randn(3))(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self, net: VectorField, t1: float = 1.0, train_t1: bool = False, options: ODEOptions | None = None
    ) -> None:
        super().__init__()
        _check_field(net)
        if net.context_dim < 1:
            raise ValueError("ConditionalFFJORD: the vector field needs context_dim >= 1")
        self.net = net
        self.context_dim = net.context_dim
        self.end_time = EndTime(t1, train_t1)
        self.options = options or ODEOptions()
        self._record = _SolveRecord()

    def _condition(self, context: Tensor) -> ConditionedFFJORD:
        return ConditionedFFJORD(self.net, self.end_time, self.options, context, self._record)

    def flow_matching_loss(self, x: Tensor, context: Tensor, **options: Unpack[FlowMatchingOptions]) -> Tensor:
        """The flow-matching loss of ``x`` given ``context``: see :func:`~pyro_nf.transforms.flow_matching_loss`."""
        return flow_matching_loss(self, x, context, **options)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_record"] = _SolveRecord()
        return state


def default_ffjord_hidden_dims(input_dim: int) -> list[int]:
    """Three hidden layers of ``max(64, 4 D)`` units (FFJORD's 2D toy network is 3 x 64)."""
    return [max(64, 4 * input_dim)] * 3


class FFJORDOptions(SolverOptions, total=False):
    """Keyword options of :func:`ffjord` and :func:`conditional_ffjord`."""

    t1: float
    train_t1: bool
    activation: Activation
    zero_init: bool


def _field(input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None, options: dict[str, Any]):  # type: ignore[no-untyped-def]
    check_positive_int(input_dim, "input_dim")
    rest, ode_options = split_solver_options(options, FFJORDOptions)
    hidden = list(hidden_dims) if hidden_dims is not None else default_ffjord_hidden_dims(input_dim)
    net = ODENet(input_dim, hidden, context_dim, rest.get("activation", "softplus"), rest.get("zero_init", True))
    return net, rest.get("t1", 1.0), rest.get("train_t1", False), ode_options


def ffjord(input_dim: int, hidden_dims: Sequence[int] | None = None, **options: Unpack[FFJORDOptions]) -> FFJORD:
    """FFJORD: a continuous normalizing flow over vectors, one ODE solve per direction.

    Args:
        input_dim: the event size D.
        hidden_dims: hidden widths of the vector field (default ``[max(64, 4 D)] * 3``).
        trace: training-mode trace estimator, ``"hutchinson"`` (default) or ``"exact"``.
        noise: Hutchinson noise, ``"rademacher"`` (default) or ``"gaussian"``.
        solver: torchdiffeq method (default ``"dopri5"``, see :class:`~pyro_nf.transforms.ode.ODEOptions`);
            ``"rk4"`` with ``step_size`` for RNODE-style training.
        rtol, atol: tolerances of adaptive solvers (default 1e-5).
        t1: integration time (default 1).
        train_t1: learn ``t1`` (default False).
        adjoint: gradients by the adjoint method (default) or through the solver.
        activation: ``"softplus"`` (default), ``"tanh"``, ``"elu"`` or ``"silu"``.
        zero_init: start the vector field's last layer at zero (default True: the flow starts at the identity).
        options: further :class:`~pyro_nf.transforms.ode.ODEOptions` (``step_size``, ``adjoint_norm``,
            ``eval_trace``, ``eval_solver``, ``eval_rtol``, ``eval_atol``, ``eval_step_size``,
            ``kinetic_energy``, ``jacobian_norm``, ``max_num_steps``).

    Example::

        >>> import pyro.distributions as dist
        >>> flow = ffjord(2, [16, 16], kinetic_energy=0.01, jacobian_norm=0.01)
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
        >>> loss = -d.log_prob(torch.randn(16, 2)).mean() + flow.regularization()
        >>> loss.backward()
        >>> flow.nfe_inverse > 0 and flow.nfe_adjoint > 0
        True
    """
    net, t1, train_t1, ode_options = _field(input_dim, 0, hidden_dims, dict(options))
    return FFJORD(net, t1, train_t1, ode_options)


def conditional_ffjord(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None, **options: Unpack[FFJORDOptions]
) -> ConditionalFFJORD:
    """FFJORD whose vector field also reads a context; same options as :func:`ffjord`.

    Example::

        >>> flow = conditional_ffjord(2, 4, [16])
        >>> t = flow.condition(torch.randn(5, 4))
        >>> y = t(torch.randn(5, 2))
        >>> y.shape, flow.nfe == t.nfe
        (torch.Size([5, 2]), True)
    """
    check_positive_int(context_dim, "context_dim")
    net, t1, train_t1, ode_options = _field(input_dim, context_dim, hidden_dims, dict(options))
    return ConditionalFFJORD(net, t1, train_t1, ode_options)
