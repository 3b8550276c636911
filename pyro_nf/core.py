"""The one-pass transform contract shared by every pyro_nf transform.

Pyro asks a transform for ``y = t(x)`` and ``t.log_abs_det_jacobian(x, y)`` as
two calls. A pyro_nf transform instead implements two fused methods that
return the value and the log-determinant together:

.. code-block:: text

    forward_and_log_det(x) -> (y, log|det dy/dx|)     # base -> data
    inverse_and_log_det(y) -> (x, log|det dy/dx|)     # same sign: the forward map's log-det at x

:class:`FlowTransform` derives Pyro's ``__call__``, ``_inv_call``, ``_call``,
``_inverse`` and ``log_abs_det_jacobian`` from them, in this one place. It keeps
the last pair it computed together with its log-det, so that
``TransformedDistribution.log_prob`` and ``rsample`` followed by ``log_prob``
cost one pass each. A kept value is served at most once for the log-det, and
never after the parameters (or the context) changed, so users never need
``clear_cache()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import torch
from pyro.distributions import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from pyro_nf.checks import check_tensor, validation_enabled

Direction = Literal["forward", "inverse", "both"]


def _versions(sources: Iterable[nn.Module | Tensor | None]) -> list[object]:
    """``id`` and version counter of every parameter and buffer of ``sources`` (modules or tensors), in order.

    Walks the modules' own dictionaries rather than ``parameters()`` and ``buffers()``: a deep
    Glow has some 550 tensors in 70 leaf modules, and this walk costs a tenth of theirs.
    """
    out: list[object] = []
    append = out.append
    for source in sources:
        if source is None:
            continue
        if isinstance(source, Tensor):
            append(id(source))
            append(source._version)
            continue
        stack = [source]
        while stack:
            module = stack.pop()
            for table in (module._parameters, module._buffers):
                for t in table.values():
                    if t is not None:
                        append(id(t))
                        append(t._version)
            stack.extend(m for m in module._modules.values() if m is not None)
    return out


class _Kept(NamedTuple):
    x: Tensor
    y: Tensor
    log_det: Tensor
    stamp: tuple[object, ...]


class FlowTransform(Transform):
    """Base class of every pyro_nf transform: one pass gives value and log-det.

    Subclasses implement :meth:`_forward_and_log_det` and :meth:`_inverse_and_log_det`
    (the math, on inputs already checked) and set :attr:`parallel` to the direction that
    costs one network pass (``"forward"``, ``"inverse"`` or ``"both"``); the log-det of a
    pair this transform did not compute is recomputed in that direction. The public
    :meth:`forward_and_log_det` and :meth:`inverse_and_log_det` check their input, then
    call them; composites call their parts' unchecked methods, so an input is checked once
    however deep the stack. ``input_shape`` (the event shape of the domain) enables the
    shape check; shape-changing subclasses also override ``forward_shape`` and
    ``inverse_shape``.
    """

    bijective = True
    domain: constraints.Constraint = constraints.real_vector
    codomain: constraints.Constraint = constraints.real_vector
    parallel: Direction = "both"
    input_shape: tuple[int, ...] | None = None

    def __init__(self, cache_size: int = 1) -> None:
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size: expected 0 or 1, got {cache_size!r}")
        super().__init__(cache_size=cache_size)
        self._kept: _Kept | None = None

    # -- the two methods subclasses implement ---------------------------------
    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map base to data: ``y = f(x)`` and ``log|det df/dx|`` (batch shape); ``x`` is already checked."""
        raise NotImplementedError

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to base: ``x = f^{-1}(y)`` and ``log|det df/dx|`` at that ``x``; ``y`` is already checked."""
        raise NotImplementedError

    # -- the fused methods users call -----------------------------------------
    def forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map base to data: return ``y = f(x)`` and ``log|det df/dx|`` (batch shape), in one pass."""
        self._check(x, f"{type(self).__name__} input", inverse=False)
        return self._forward_and_log_det(x)

    def inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to base: return ``x = f^{-1}(y)`` and ``log|det df/dx|`` at that ``x``, in one pass."""
        self._check(y, f"{type(self).__name__} inverse input", inverse=True)
        return self._inverse_and_log_det(y)

    @property
    def sign(self) -> int:
        """The sign of ``det df/dx``: +1 (orientation preserving) unless a subclass says otherwise."""
        return 1

    # -- what the stamp depends on ---------------------------------------------
    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        """Modules and tensors whose in-place changes invalidate a kept value."""
        return (self,) if isinstance(self, nn.Module) else ()

    def _stamp(self) -> tuple[object, ...] | None:
        try:
            versions = _versions(self._stamp_sources())
        except RuntimeError:  # inference tensors carry no version counter
            return None
        versions.append(torch.is_grad_enabled())
        return tuple(versions)

    # -- input checks -------------------------------------------------------------
    def _reference_tensor(self) -> Tensor | None:
        for source in self._stamp_sources():
            if isinstance(source, nn.Module):
                for t in source.parameters():
                    return t
                for t in source.buffers():
                    if t.dtype.is_floating_point:
                        return t
        return None

    def _check(self, value: Tensor, name: str, inverse: bool) -> None:
        if not validation_enabled():
            return
        shape = self.input_shape
        if shape is not None and inverse:
            shape = tuple(self.forward_shape(shape))
        check_tensor(value, name=name, event_shape=shape, like=self._reference_tensor())

    # -- Pyro's interface, derived once -----------------------------------------
    def _keep(self, x: Tensor, y: Tensor, log_det: Tensor) -> None:
        if self._cache_size:
            stamp = self._stamp()
            self._kept = None if stamp is None else _Kept(x, y, log_det, stamp)

    def _valid_kept(self) -> _Kept | None:
        kept = self._kept
        if kept is not None and kept.stamp != self._stamp():
            self._kept = kept = None
        return kept

    def __call__(self, x: Tensor) -> Tensor:
        kept = self._valid_kept() if self._cache_size else None
        if kept is not None and x is kept.x:
            return kept.y
        y, log_det = self.forward_and_log_det(x)
        self._keep(x, y, log_det)
        return y

    def _inv_call(self, y: Tensor) -> Tensor:
        kept = self._valid_kept() if self._cache_size else None
        if kept is not None and y is kept.y:
            return kept.x
        x, log_det = self.inverse_and_log_det(y)
        self._keep(x, y, log_det)
        return x

    def _call(self, x: Tensor) -> Tensor:
        return self._forward_and_log_det(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self._inverse_and_log_det(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log|det dy/dx|`` summed over the event dims; served once from the kept pair."""
        kept = self._valid_kept() if self._cache_size else None
        if kept is not None and x is kept.x and y is kept.y:
            self._kept = None
            return kept.log_det
        if self.parallel == "inverse":
            return self.inverse_and_log_det(y)[1]
        return self.forward_and_log_det(x)[1]

    def clear_cache(self) -> None:
        """Drop the kept pair (never needed for correctness; frees memory)."""
        self._kept = None

    @property
    def inv(self) -> Transform:
        """The inverse as a :class:`FlowTransform` (a ``TransformModule`` keeping the parameters)."""
        inv = self._inv() if self._inv is not None else None
        if inv is None:
            inv = InverseTransformModule(self)
            self._inv = weakref.ref(inv)  # type: ignore[assignment]
        return inv

    def with_cache(self, cache_size: int = 1) -> Transform:
        if cache_size != self._cache_size:
            raise ValueError(
                f"{type(self).__name__}.with_cache: pyro_nf transforms keep their own cache; "
                f"build the transform with cache_size={cache_size} instead"
            )
        return self

    def __getstate__(self) -> dict[str, object]:
        state = super().__getstate__()
        state["_kept"] = None
        for name in ("_forward_and_log_det", "_inverse_and_log_det"):  # compiled methods (pyro_nf.compiled)
            state.pop(name, None)
        return state


class FlowTransformModule(FlowTransform, TransformModule):
    """A :class:`FlowTransform` that owns learnable parameters (an ``nn.Module``)."""

    def __hash__(self) -> int:
        return TransformModule.__hash__(self)


class InverseTransformModule(FlowTransformModule):
    """The inverse of a pyro_nf transform, itself a ``TransformModule``.

    Unlike Pyro's ``.inv``, its parameters stay visible to ``parameters()``,
    ``pyro.module`` and ``ComposeTransformModule``::

        >>> from pyro_nf.transforms import maf
        >>> flow = maf(3, hidden_dims=[8])
        >>> inverse = InverseTransformModule(flow)
        >>> len(list(inverse.parameters())) == len(list(flow.parameters()))
        True
    """

    def __init__(self, base: FlowTransform) -> None:
        if not isinstance(base, FlowTransform):
            raise TypeError(f"InverseTransformModule: expected a FlowTransform, got {type(base).__name__}")
        super().__init__(cache_size=base._cache_size)
        self.base = base
        base._inv = weakref.ref(self)  # type: ignore[assignment]
        self.domain = base.codomain
        self.codomain = base.domain
        self.parallel = {"forward": "inverse", "inverse": "forward"}.get(base.parallel, "both")  # type: ignore[assignment]
        if base.input_shape is not None:
            self.input_shape = tuple(base.forward_shape(base.input_shape))

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        return self.base._stamp_sources()

    # Pyro's interface goes through the base, so both share one kept pair.
    def __call__(self, x: Tensor) -> Tensor:
        return self.base._inv_call(x)

    def _inv_call(self, y: Tensor) -> Tensor:
        return self.base(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return -self.base.log_abs_det_jacobian(y, x)

    def clear_cache(self) -> None:
        self.base.clear_cache()

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_det = self.base._inverse_and_log_det(x)
        return y, -log_det

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, log_det = self.base._forward_and_log_det(y)
        return x, -log_det

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        return torch.Size(self.base.inverse_shape(shape))

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        return torch.Size(self.base.forward_shape(shape))

    @property
    def inv(self) -> Transform:
        return self.base

    @property
    def sign(self) -> int:
        return self.base.sign


def fused_forward(t: Transform, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(t(x), log|det dt/dx|)`` in one pass for a pyro_nf transform, in two calls for any other.

    The input is not checked again: composites and density models check it once, where it enters.
    """
    if isinstance(t, FlowTransform):
        return t._forward_and_log_det(x)
    y = t._call(x)
    return y, t.log_abs_det_jacobian(x, y)


def fused_inverse(t: Transform, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(t^{-1}(y), log|det dt/dx|)`` in one pass for a pyro_nf transform, in two calls for any other."""
    if isinstance(t, FlowTransform):
        return t._inverse_and_log_det(y)
    x = t._inverse(y)
    return x, t.log_abs_det_jacobian(x, y)


def _sum_event(log_det: Tensor, extra_dims: int) -> Tensor:
    return log_det.sum(tuple(range(-extra_dims, 0))) if extra_dims > 0 else log_det


def _common_direction(directions: Iterable[Direction]) -> Direction:
    """The direction in which a whole stack is parallel (forward when the parts disagree)."""
    distinct = set(directions) - {"both"}
    if not distinct:
        return "both"
    return distinct.pop() if len(distinct) == 1 else "forward"


class FlowStack(FlowTransformModule):
    """A stack of transforms applied in order (``parts[0]`` first, base to data).

    The fused methods chain the parts' fused methods, so one call is one pass
    through each part. Plain Pyro/torch transforms may be mixed in; their
    log-dets are summed over the stack's event dims.

        >>> import torch
        >>> from pyro_nf.transforms import maf
        >>> stack = FlowStack([maf(2, num_transforms=1), maf(2, num_transforms=1)])
        >>> y, log_det = stack.forward_and_log_det(torch.zeros(5, 2))
        >>> log_det.shape
        torch.Size([5])
    """

    def __init__(self, parts: Sequence[Transform], cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        parts = list(parts)
        for i, part in enumerate(parts):
            if not isinstance(part, Transform):
                raise TypeError(f"FlowStack: part {i} is a {type(part).__name__}, expected a Transform")
            if isinstance(part, nn.Module):
                self.add_module(str(i), part)
        self.parts = parts
        event_dim = max((p.domain.event_dim for p in parts), default=1)
        self.domain = constraints.independent(constraints.real, event_dim)
        self.codomain = constraints.independent(constraints.real, event_dim)
        self.parallel = _common_direction(getattr(p, "parallel", "both") for p in parts)
        first = parts[0] if parts else None
        self.input_shape = getattr(first, "input_shape", None)

    def _stamp_sources(self) -> tuple[nn.Module | Tensor | None, ...]:
        sources: list[nn.Module | Tensor | None] = []
        for part in self.parts:
            if isinstance(part, FlowTransform):
                sources.extend(part._stamp_sources())
            elif isinstance(part, nn.Module):
                sources.append(part)
        return tuple(sources)

    def _forward_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        event_dim = self.domain.event_dim
        total: Tensor | None = None
        for part in self.parts:
            x, log_det = fused_forward(part, x)
            log_det = _sum_event(log_det, event_dim - part.domain.event_dim)
            total = log_det if total is None else total + log_det
        if total is None:
            total = x.new_zeros(x.shape[: x.dim() - event_dim])
        return x, total

    def _inverse_and_log_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        event_dim = self.domain.event_dim
        total: Tensor | None = None
        for part in reversed(self.parts):
            y, log_det = fused_inverse(part, y)
            log_det = _sum_event(log_det, event_dim - part.domain.event_dim)
            total = log_det if total is None else total + log_det
        if total is None:
            total = y.new_zeros(y.shape[: y.dim() - event_dim])
        return y, total

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        for part in self.parts:
            shape = part.forward_shape(shape)
        return torch.Size(shape)

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        for part in reversed(self.parts):
            shape = part.inverse_shape(shape)
        return torch.Size(shape)

    @property
    def sign(self) -> int:
        """The product of the parts' signs."""
        sign = 1
        for i, part in enumerate(self.parts):
            try:
                sign *= int(part.sign)
            except NotImplementedError:
                raise NotImplementedError(
                    f"FlowStack.sign: part {i} ({type(part).__name__}) defines no sign of its Jacobian determinant"
                ) from None
        return sign

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, index: int) -> Transform:
        return self.parts[index]
