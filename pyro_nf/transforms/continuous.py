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

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pyro.distributions import ConditionalTransformModule
from torch import Tensor, nn
from torch.distributions import constraints
from torchdiffeq import odeint, odeint_adjoint

from pyro_nf.core import FlowStack, FlowTransform, FlowTransformModule, check_context
from pyro_nf.nn.odefunc import (
    NOISES,
    TRACES,
    Activation,
    AugmentedDynamics,
    ConvODENet,
    Noise,
    ODENet,
    Trace,
    sample_noise,
)
from pyro_nf.transforms.multiscale import (
    check_image_shape,
    check_squeezable,
    level_shapes,
    multiscale_level,
    squeezed_shape,
)

ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun3", "rk4")
SOLVERS: tuple[str, ...] = ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS
EXACT_TRACE_MAX_DIM = 16
"""With ``eval_trace="auto"``, evaluation mode uses the exact trace up to this event size."""

EvalTrace = Literal["auto", "exact", "hutchinson"]
AdjointNorm = Literal["seminorm", "mixed"]
VectorField = ODENet | ConvODENet
VECTOR_FIELDS: tuple[type[nn.Module], ...] = (ODENet, ConvODENet)
"""The vector fields an FFJORD transform accepts: over vectors ``(D,)`` or over images ``(C, H, W)``."""


def _check_field(net: object) -> None:
    if not isinstance(net, VECTOR_FIELDS):
        raise TypeError(f"net: expected an ODENet or a ConvODENet, got {type(net).__name__}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class ODEOptions:
    """The solver and trace options of an FFJORD transform, validated in one place.

    Args:
        trace: training-mode trace, ``"hutchinson"`` or ``"exact"``.
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``.
        solver: a torchdiffeq method: adaptive ``"dopri5"``, ``"dopri8"``, ``"bosh3"``,
            ``"fehlberg2"``, ``"adaptive_heun"`` or fixed-grid ``"euler"``, ``"midpoint"``,
            ``"heun3"``, ``"rk4"``.
        rtol, atol: tolerances of adaptive solvers.
        step_size: step of fixed-grid solvers (default 0.25); not allowed with adaptive ones.
        adjoint: gradients by the adjoint method (``odeint_adjoint``) instead of backpropagation
            through the solver.
        adjoint_norm: error control of the adjoint solve: ``"seminorm"`` (default: the state and
            its adjoint, not the parameter gradients) or ``"mixed"`` (everything).
        eval_trace: evaluation-mode trace: ``"auto"`` (exact up to ``D = 16``, else Hutchinson),
            ``"exact"`` or ``"hutchinson"``.
        eval_solver, eval_rtol, eval_atol, eval_step_size: evaluation-mode solver settings
            (None: as in training).
        kinetic_energy, jacobian_norm: RNODE weights ``λ_K``, ``λ_J`` (>= 0); when either is
            positive the training-mode solve integrates both quantities.
        max_num_steps: cap on the steps of an adaptive solve (None: no cap).

    Example::

        >>> ODEOptions(solver="rk4", step_size=0.1).resolve(training=True, dim=2).solver
        'rk4'
        >>> ODEOptions(solver="rk45")
        Traceback (most recent call last):
        ...
        ValueError: solver: expected one of ['dopri5', 'dopri8', ..., 'rk4'], got 'rk45'
    """

    trace: Trace = "hutchinson"
    noise: Noise = "rademacher"
    solver: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    adjoint: bool = True
    adjoint_norm: AdjointNorm = "seminorm"
    eval_trace: EvalTrace = "auto"
    eval_solver: str | None = None
    eval_rtol: float | None = None
    eval_atol: float | None = None
    eval_step_size: float | None = None
    kinetic_energy: float = 0.0
    jacobian_norm: float = 0.0
    max_num_steps: int | None = None

    def __post_init__(self) -> None:
        _choice("trace", self.trace, TRACES)
        _choice("noise", self.noise, NOISES)
        _choice("eval_trace", self.eval_trace, ("auto", *TRACES))
        _choice("adjoint_norm", self.adjoint_norm, ("seminorm", "mixed"))
        for name in ("adjoint",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for prefix in ("", "eval_"):
            solver = getattr(self, prefix + "solver")
            if solver is not None or not prefix:
                _choice(prefix + "solver", solver, SOLVERS)
            for name in ("rtol", "atol", "step_size"):
                value = getattr(self, prefix + name)
                if value is not None and (not _is_number(value) or value <= 0):
                    raise ValueError(f"{prefix + name}: expected a positive number, got {value!r}")
            settings = self.resolve(training=not prefix, dim=1)
            given_step = getattr(self, prefix + "step_size")
            if settings.solver in ADAPTIVE_SOLVERS and given_step is not None:
                raise ValueError(
                    f"{prefix}step_size: applies to fixed-grid solvers {list(FIXED_GRID_SOLVERS)}, "
                    f"got step_size={given_step!r} with the adaptive solver {settings.solver!r}"
                )
        for name in ("kinetic_energy", "jacobian_norm"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name}: expected a non-negative number (an RNODE weight), got {value!r}")
        if self.max_num_steps is not None and (
            not isinstance(self.max_num_steps, int) or isinstance(self.max_num_steps, bool) or self.max_num_steps < 1
        ):
            raise ValueError(f"max_num_steps: expected a positive int or None, got {self.max_num_steps!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ODEOptions:
        """Build options from keyword arguments; an unknown name is a ValueError listing the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(f"unknown FFJORD option(s) {unknown}; expected some of {known}")
        return cls(**kwargs)

    @property
    def regularize(self) -> bool:
        """Whether training-mode solves integrate the RNODE quantities."""
        return self.kinetic_energy > 0 or self.jacobian_norm > 0

    def resolve(self, training: bool, dim: int) -> _Settings:
        """The settings of one solve in training or evaluation mode for event size ``dim``."""
        trace: str
        if training:
            solver, rtol, atol, step, trace = self.solver, self.rtol, self.atol, self.step_size, self.trace
        else:
            solver = self.eval_solver or self.solver
            rtol = self.eval_rtol if self.eval_rtol is not None else self.rtol
            atol = self.eval_atol if self.eval_atol is not None else self.atol
            step = self.eval_step_size if self.eval_step_size is not None else self.step_size
            trace = self.eval_trace
            if trace == "auto":
                trace = "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"
        if solver in FIXED_GRID_SOLVERS and step is None:
            step = 0.25
        if solver in ADAPTIVE_SOLVERS:
            step = None
        return _Settings(solver, float(rtol), float(atol), step, trace)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class _Settings:
    solver: str
    rtol: float
    atol: float
    step_size: float | None
    trace: Trace


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


def _state_norm(state: tuple[Tensor, ...]) -> Tensor:
    """Error norm over ``z`` and the log-det only: the RNODE integrals do not steer the step size."""
    return torch.maximum(_rms(state[0]), _rms(state[1]))


class EndTime(nn.Module):
    """The integration time ``t1 > 0``: a buffer, or a learned parameter ``t1 = s²``."""

    def __init__(self, t1: float = 1.0, trainable: bool = False) -> None:
        super().__init__()
        if not _is_number(t1) or t1 <= 0:
            raise ValueError(f"t1: expected a positive number, got {t1!r}")
        if not isinstance(trainable, bool):
            raise ValueError(f"train_t1: expected True or False, got {trainable!r}")
        self.trainable = trainable
        if trainable:
            self.sqrt_t1 = nn.Parameter(torch.tensor(math.sqrt(t1)))
        else:
            self.register_buffer("t1", torch.tensor(float(t1)))

    def forward(self) -> Tensor:
        if self.trainable:
            return self.sqrt_t1.square()
        t1: Tensor = self.t1  # type: ignore[assignment]
        return t1


class _SolveRecord:
    """What the last solves measured: NFE and the RNODE integrals."""

    def __init__(self) -> None:
        self.nfe: int = 0
        self.nfe_forward: int = 0
        self.nfe_inverse: int = 0
        self.dynamics: AugmentedDynamics | None = None
        self.solve_calls: int = 0
        self.adjoint: bool = False
        self.kinetic_energy: Tensor | None = None
        self.jacobian_norm: Tensor | None = None


class SolveStatistics:
    """Read-only access to what the last ODE solve measured (mixed into the FFJORD classes)."""

    _record: _SolveRecord
    options: ODEOptions

    @property
    def nfe(self) -> int:
        """Function evaluations of the last solve (either direction)."""
        return self._record.nfe

    @property
    def nfe_forward(self) -> int:
        """Function evaluations of the last base-to-data solve (``forward_and_log_det``, sampling)."""
        return self._record.nfe_forward

    @property
    def nfe_inverse(self) -> int:
        """Function evaluations of the last data-to-base solve (``inverse_and_log_det``, ``log_prob``)."""
        return self._record.nfe_inverse

    @property
    def nfe_adjoint(self) -> int:
        """Function evaluations of the adjoint solve run by the backward pass through the last solve.

        Zero before that backward pass, and with ``adjoint=False`` (then the backward pass goes
        through the solver's operations instead of solving an ODE).
        """
        record = self._record
        if record.dynamics is None or not record.adjoint:
            return 0
        return record.dynamics.calls - record.solve_calls

    @property
    def kinetic_energy(self) -> Tensor | None:
        """Per-sample ``∫‖f‖² dt`` of the last solve (batch shape), or None if it was not integrated."""
        return self._record.kinetic_energy

    @property
    def jacobian_norm(self) -> Tensor | None:
        """Per-sample ``∫‖∂f/∂z‖_F² dt`` (estimate) of the last solve, or None if it was not integrated."""
        return self._record.jacobian_norm

    def regularization(self) -> Tensor:
        """RNODE's penalty of the last solve: ``λ_K · mean ∫‖f‖² + λ_J · mean ∫‖J‖_F²``.

        A differentiable scalar to add to the loss (zero when the last solve did
        not integrate the RNODE quantities: evaluation mode, or both weights zero).
        """
        record = self._record
        if record.kinetic_energy is None or record.jacobian_norm is None:
            return torch.zeros(())
        return (
            self.options.kinetic_energy * record.kinetic_energy.mean()
            + self.options.jacobian_norm * record.jacobian_norm.mean()
        )


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

    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve(x, forward=True)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
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

        options: dict[str, Any]
        adjoint_options: dict[str, Any]
        if settings.step_size is not None:
            options = {"step_size": settings.step_size}
            adjoint_options = dict(options)
        else:
            options = {"norm": _state_norm}
            if self.options.max_num_steps is not None:
                options["max_num_steps"] = self.options.max_num_steps
            adjoint_options = {k: v for k, v in options.items() if k != "norm"}
            if self.options.adjoint_norm == "seminorm":
                adjoint_options["norm"] = "seminorm"
        use_adjoint = self.options.adjoint and torch.is_grad_enabled()
        solve_kwargs = {"rtol": settings.rtol, "atol": settings.atol, "method": settings.solver, "options": options}
        if use_adjoint:
            params: list[Tensor] = [p for p in self.net.parameters() if p.requires_grad]
            if context is not None and context.requires_grad:
                params.append(context)
            solution = odeint_adjoint(
                dynamics,
                state,
                times,
                adjoint_params=tuple(params),
                adjoint_options=adjoint_options,
                **solve_kwargs,
            )
        else:
            solution = odeint(dynamics, state, times, **solve_kwargs)

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

    def flow_matching_loss(
        self,
        x: Tensor,
        *,
        path: Literal["linear", "cosine"] = "linear",
        coupling: Literal["independent", "ot"] = "independent",
        sigma_min: float = 0.0,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The flow-matching loss of the data ``x``: see :func:`~pyro_nf.transforms.flow_matching_loss`."""
        from pyro_nf.transforms.flow_matching import flow_matching_loss  # that module builds on this one

        return flow_matching_loss(
            self, x, path=path, coupling=coupling, sigma_min=sigma_min, x0=x0, generator=generator
        )


class ConditionalFFJORD(SolveStatistics, ConditionalTransformModule):
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
        self.end_time = EndTime(t1, train_t1)
        self.options = options or ODEOptions()
        self._record = _SolveRecord()

    def condition(self, context: Tensor) -> ConditionedFFJORD:
        check_context(context, self.net.context_dim, next(self.net.parameters()))
        return ConditionedFFJORD(self.net, self.end_time, self.options, context, self._record)

    def flow_matching_loss(
        self,
        x: Tensor,
        context: Tensor,
        *,
        path: Literal["linear", "cosine"] = "linear",
        coupling: Literal["independent", "ot"] = "independent",
        sigma_min: float = 0.0,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The flow-matching loss of ``x`` given ``context``: see :func:`~pyro_nf.transforms.flow_matching_loss`."""
        from pyro_nf.transforms.flow_matching import flow_matching_loss  # that module builds on this one

        return flow_matching_loss(
            self, x, context, path=path, coupling=coupling, sigma_min=sigma_min, x0=x0, generator=generator
        )

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_record"] = _SolveRecord()
        return state


def default_ffjord_hidden_dims(input_dim: int) -> list[int]:
    """Three hidden layers of ``max(64, 4 D)`` units (FFJORD's 2D toy network is 3 x 64)."""
    return [max(64, 4 * input_dim)] * 3


def _build(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None,
    activation: Activation,
    zero_init: bool,
    solver_kwargs: dict[str, Any],
) -> tuple[ODENet, ODEOptions]:
    if not isinstance(input_dim, int) or isinstance(input_dim, bool) or input_dim < 1:
        raise ValueError(f"input_dim: expected a positive int, got {input_dim!r}")
    hidden = list(hidden_dims) if hidden_dims is not None else default_ffjord_hidden_dims(input_dim)
    options = ODEOptions.from_kwargs(**solver_kwargs)
    return ODENet(input_dim, hidden, context_dim, activation, zero_init), options


def ffjord(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    trace: Trace = "hutchinson",
    noise: Noise = "rademacher",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t1: float = 1.0,
    train_t1: bool = False,
    adjoint: bool = True,
    activation: Activation = "softplus",
    zero_init: bool = True,
    **options: Any,
) -> FFJORD:
    """FFJORD: a continuous normalizing flow over vectors, one ODE solve per direction.

    Args:
        input_dim: the event size D.
        hidden_dims: hidden widths of the vector field (default ``[max(64, 4 D)] * 3``).
        trace: training-mode trace estimator, ``"hutchinson"`` or ``"exact"``.
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``.
        solver: torchdiffeq method (see :class:`ODEOptions`); ``"rk4"`` with ``step_size`` for RNODE-style training.
        rtol, atol: tolerances of adaptive solvers.
        t1: integration time.
        train_t1: learn ``t1``.
        adjoint: gradients by the adjoint method (default) or through the solver.
        activation: ``"softplus"``, ``"tanh"``, ``"elu"`` or ``"silu"``.
        zero_init: start the vector field's last layer at zero (the flow starts at the identity).
        **options: further :class:`ODEOptions`: ``step_size``, ``adjoint_norm``, ``eval_trace``,
            ``eval_solver``, ``eval_rtol``, ``eval_atol``, ``eval_step_size``, ``kinetic_energy``,
            ``jacobian_norm``, ``max_num_steps``.

    Example::

        >>> import pyro.distributions as dist
        >>> flow = ffjord(2, [16, 16], kinetic_energy=0.01, jacobian_norm=0.01)
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
        >>> loss = -d.log_prob(torch.randn(16, 2)).mean() + flow.regularization()
        >>> loss.backward()
        >>> flow.nfe_inverse > 0 and flow.nfe_adjoint > 0
        True
    """
    net, opts = _build(
        input_dim,
        0,
        hidden_dims,
        activation,
        zero_init,
        dict(trace=trace, noise=noise, solver=solver, rtol=rtol, atol=atol, adjoint=adjoint, **options),
    )
    return FFJORD(net, t1, train_t1, opts)


def conditional_ffjord(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    trace: Trace = "hutchinson",
    noise: Noise = "rademacher",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t1: float = 1.0,
    train_t1: bool = False,
    adjoint: bool = True,
    activation: Activation = "softplus",
    zero_init: bool = True,
    **options: Any,
) -> ConditionalFFJORD:
    """FFJORD whose vector field also reads a context; same options as :func:`ffjord`.

    Example::

        >>> flow = conditional_ffjord(2, 4, [16])
        >>> t = flow.condition(torch.randn(5, 4))
        >>> y = t(torch.randn(5, 2))
        >>> y.shape, flow.nfe == t.nfe
        (torch.Size([5, 2]), True)
    """
    if not isinstance(context_dim, int) or isinstance(context_dim, bool) or context_dim < 1:
        raise ValueError(f"context_dim: expected a positive int, got {context_dim!r}")
    net, opts = _build(
        input_dim,
        context_dim,
        hidden_dims,
        activation,
        zero_init,
        dict(trace=trace, noise=noise, solver=solver, rtol=rtol, atol=atol, adjoint=adjoint, **options),
    )
    return ConditionalFFJORD(net, t1, train_t1, opts)


def ffjord_multiscale(
    input_shape: Sequence[int],
    num_scales: int = 2,
    blocks_per_scale: int = 2,
    hidden_channels: int | Sequence[int] = 64,
    trace: Trace = "hutchinson",
    *,
    t1: float = 1.0,
    train_t1: bool = False,
    activation: Activation = "softplus",
    zero_init: bool = True,
    kernel_size: int = 3,
    **ode_options: Any,
) -> FlowStack:
    """FFJORD's multiscale image CNF (the "ODENVP" of its image experiments) as one bijection over ``(C, H, W)``.

    In the data-to-noise direction each scale ``s`` integrates ``blocks_per_scale``
    CNF blocks over the current tensor, squeezes it
    (``(C, H, W) -> (4C, H/2, W/2)``), integrates ``blocks_per_scale`` more CNF blocks
    and factors out half of the channels, which are standard Normal noise from then on;
    the last scale has its CNF blocks only (no squeeze, no factor-out). Every block is an
    :class:`FFJORD` transform whose field is a :class:`~pyro_nf.nn.odefunc.ConvODENet`
    (3x3 concat-squash convolutions). With blocks ``k = 1 .. K`` the log-density is

    .. math::

        \\log p(x) = \\log \\mathcal{N}(z; 0, I)
        - \\sum_{k=1}^{K} \\int_0^{t_1} \\operatorname{Tr}\\frac{\\partial f_k}{\\partial z_k}(z_k(t), t)\\,dt ,

    where ``z`` is the concatenation of every factored-out half and the last scale's
    output (the squeezes and the factor-outs are permutations: log-det 0). As in
    :func:`~pyro_nf.transforms.multiscale.realnvp_multiscale` the factored-out channels are
    carried through unchanged and each scale undoes its squeeze, so the base is a standard
    Normal of the image's shape::

        TransformedDistribution(Normal(0, 1).expand(shape).to_event(3), [ffjord_multiscale(shape)])

    Preprocessing (dequantization, the logit of the paper's ``alpha = 0.05``) is left to
    :mod:`pyro_nf.transforms.preprocess`. Each block solves its own ODE; statistics are per
    block (``sum(m.nfe for m in flow.modules() if isinstance(m, FFJORD))`` is the NFE of a
    pass, ``sum(m.regularization() ...)`` the RNODE penalty).

    Args:
        input_shape: the image shape ``(C, H, W)``; H and W divisible by ``2 ** (num_scales - 1)``.
        num_scales: number of scales (``num_scales - 1`` squeezes and factor-outs).
        blocks_per_scale: CNF blocks before and after each squeeze (2 in the paper).
        hidden_channels: hidden widths of every field: an int ``h`` gives ``[h, h, h]`` (the
            paper's 64, 64, 64), or a list of widths.
        trace: training-mode trace, ``"hutchinson"`` or ``"exact"`` (``C H W`` vector-Jacobian
            products per evaluation: for tiny images only).
        t1, train_t1: integration time of every block, learned or not.
        activation, zero_init: see :class:`~pyro_nf.nn.odefunc.ConvODENet`; with ``zero_init`` the
            whole flow starts at the identity.
        kernel_size: odd kernel size of the convolutions.
        **ode_options: further :class:`ODEOptions` (``noise``, ``solver``, ``rtol``, ``atol``,
            ``adjoint``, ``eval_trace``, ``kinetic_energy``, ...), shared by every block.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> flow = ffjord_multiscale((1, 4, 4), 2, 1, [4], "exact", zero_init=False, rtol=1e-7, atol=1e-7)
        >>> sum(isinstance(m, FFJORD) for m in flow.modules())  # 1 block, squeeze, 1 block, factor out; 1 block
        3
        >>> x = torch.randn(2, 1, 4, 4)
        >>> y, log_det = flow.forward_and_log_det(x)
        >>> x_back, log_det_back = flow.inverse_and_log_det(y)
        >>> bool(torch.allclose(x_back, x, atol=1e-4)), bool(torch.allclose(log_det_back, log_det, atol=1e-4))
        (True, True)
        >>> ffjord_multiscale((1, 6, 6), num_scales=3)
        Traceback (most recent call last):
        ...
        ValueError: ffjord_multiscale: input_shape (1, 6, 6) does not fit num_scales = 3: ...

    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019, section 4.2 and appendix; Dinh et al., "Density
    estimation using Real NVP", ICLR 2017 (the multiscale architecture).
    """
    shape = check_image_shape(input_shape)
    for value, name in ((num_scales, "num_scales"), (blocks_per_scale, "blocks_per_scale")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(hidden_channels, bool):
        raise ValueError(f"hidden_channels: expected a positive int or a list of them, got {hidden_channels!r}")
    hidden = [hidden_channels] * 3 if isinstance(hidden_channels, int) else list(hidden_channels)
    check_squeezable(shape, num_scales - 1, "ffjord_multiscale", f"num_scales = {num_scales}")
    options = ODEOptions.from_kwargs(trace=trace, **ode_options)

    def blocks(s: tuple[int, int, int]) -> list[FFJORD]:
        return [
            FFJORD(ConvODENet(s, hidden, 0, activation, zero_init, kernel_size), t1, train_t1, options)
            for _ in range(blocks_per_scale)
        ]

    shapes = level_shapes(shape, num_scales)
    inner: FlowTransform | None = None
    for i in reversed(range(num_scales)):
        s = shapes[i]
        last = i == num_scales - 1
        after = [] if last else blocks(squeezed_shape(s))
        inner = FlowStack(multiscale_level(s, blocks(s), after, None if last else inner, None, squeeze=not last))
    if not isinstance(inner, FlowStack):  # num_scales >= 1, so the loop ran
        raise RuntimeError("ffjord_multiscale: no scale was built")
    return inner
