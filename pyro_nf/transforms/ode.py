"""The settings and the record of an ODE solve: solver options, the integration time, solve statistics.

:class:`ODEOptions` holds every option of a continuous flow's solves (solver, tolerances,
trace estimator, adjoint, RNODE weights), validated in one place; :class:`EndTime` is the
integration time ``t1`` (a buffer, or learned); :class:`SolveStatistics` gives read-only
access to what the last solve measured (function evaluations, RNODE integrals), mixed into
the FFJORD classes of :mod:`pyro_nf.transforms.continuous`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from pyro_nf.checks import check_choice
from pyro_nf.nn.divergence import NOISES, TRACES, AugmentedDynamics, Noise, Trace

__all__ = [
    "ODEOptions",
    "EndTime",
    "SolveStatistics",
    "SolverOptions",
    "EXACT_TRACE_MAX_DIM",
    "split_solver_options",
]

ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun3", "rk4")
SOLVERS: tuple[str, ...] = ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS
EXACT_TRACE_MAX_DIM = 16
"""With ``eval_trace="auto"``, evaluation mode uses the exact trace up to this event size."""


EvalTrace = Literal["auto", "exact", "hutchinson"]
AdjointNorm = Literal["seminorm", "mixed"]


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
        check_choice(self.trace, TRACES, "trace")
        check_choice(self.noise, NOISES, "noise")
        check_choice(self.eval_trace, ("auto", *TRACES), "eval_trace")
        check_choice(self.adjoint_norm, ("seminorm", "mixed"), "adjoint_norm")
        for name in ("adjoint",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for prefix in ("", "eval_"):
            solver = getattr(self, prefix + "solver")
            if solver is not None or not prefix:
                check_choice(solver, SOLVERS, prefix + "solver")
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

    def integrate(
        self,
        dynamics: AugmentedDynamics,
        state: tuple[Tensor, ...],
        times: Tensor,
        settings: _Settings,
        adjoint_params: Sequence[Tensor] | None,
    ) -> tuple[Tensor, ...]:
        """Solve ``dynamics`` from ``state`` over ``times`` with these options and ``settings``.

        With ``adjoint_params`` (the tensors whose gradients the adjoint solve computes) the
        solve is :func:`torchdiffeq.odeint_adjoint`, else :func:`torchdiffeq.odeint`. Adaptive
        solvers control the error of ``z`` and the log-det only (:func:`_state_norm`); the
        adjoint solve uses the seminorm unless ``adjoint_norm="mixed"``.
        """
        if torch.jit.is_tracing():
            raise RuntimeError(
                "a continuous flow cannot be traced (torch.jit.trace, Pyro's JitTrace_ELBO and "
                "JitTraceMeanField_ELBO): its ODE solve takes as many steps as the error control asks "
                "and its divergence calls torch.autograd.grad, neither of which a trace records; "
                "use Trace_ELBO / TraceMeanField_ELBO with it, or a MAF, IAF or RealNVP under JIT"
            )
        options: dict[str, Any]
        adjoint_options: dict[str, Any]
        if settings.step_size is not None:
            options = {"step_size": settings.step_size}
            adjoint_options = dict(options)
        else:
            options = {"norm": _state_norm}
            if self.max_num_steps is not None:
                options["max_num_steps"] = self.max_num_steps
            adjoint_options = {k: v for k, v in options.items() if k != "norm"}
            if self.adjoint_norm == "seminorm":
                adjoint_options["norm"] = "seminorm"
        kwargs = {"rtol": settings.rtol, "atol": settings.atol, "method": settings.solver, "options": options}
        if adjoint_params is None:
            return odeint(dynamics, state, times, **kwargs)  # type: ignore[no-any-return]
        return odeint_adjoint(  # type: ignore[no-any-return]
            dynamics, state, times, adjoint_params=tuple(adjoint_params), adjoint_options=adjoint_options, **kwargs
        )

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


class SolverOptions(TypedDict, total=False):
    """The solver options of every FFJORD factory (the fields of :class:`~pyro_nf.transforms.ode.ODEOptions`)."""

    trace: Trace
    noise: Noise
    solver: str
    rtol: float
    atol: float
    step_size: float | None
    adjoint: bool
    adjoint_norm: AdjointNorm
    eval_trace: EvalTrace
    eval_solver: str | None
    eval_rtol: float | None
    eval_atol: float | None
    eval_step_size: float | None
    kinetic_energy: float
    jacobian_norm: float
    max_num_steps: int | None


def split_solver_options(options: dict[str, Any], own: type) -> tuple[dict[str, Any], ODEOptions]:
    """The factory's own options (the keys of ``own`` beyond the solver's), and :class:`ODEOptions` from the rest.

    An unknown name reaches :meth:`ODEOptions.from_kwargs`, whose ``ValueError`` lists the known ones.
    """
    own_keys = set(own.__optional_keys__) - set(SolverOptions.__optional_keys__)  # type: ignore[attr-defined]
    rest = {k: v for k, v in options.items() if k in own_keys}
    return rest, ODEOptions.from_kwargs(**{k: v for k, v in options.items() if k not in own_keys})
