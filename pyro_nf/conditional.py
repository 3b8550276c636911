"""Conditional transforms: a context checked once per ``.condition()``, and stacks of conditional transforms.

A conditional flow is a Pyro ``ConditionalTransformModule``: ``.condition(context)``
gives the transform at a context. :class:`ConditionalFlowTransformModule` is the base of
every pyro_nf conditional transform: it checks the context once, where it enters, and
composites hand the checked context to their parts (:func:`condition_checked`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyro.distributions import ConditionalTransformModule
from pyro.distributions.conditional import ConditionalTransform
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.checks import check_context
from pyro_nf.core import FlowStack

__all__ = ["ConditionalFlowStack", "ConditionalFlowTransformModule", "condition_checked"]


class ConditionalFlowTransformModule(ConditionalTransformModule):
    """Base class of pyro_nf's conditional transforms: the context is checked once per :meth:`condition`.

    Subclasses set ``context_dim`` and implement :meth:`_condition`, which builds the
    transform at a context that has already been checked. Composites (a
    :class:`ConditionalFlowStack`, a :class:`~pyro_nf.ConditionalFlowModel`) check a context
    once and hand it to their parts' :meth:`_condition`, so a five-layer stack costs one
    check (one device synchronisation), not six.
    """

    context_dim: int

    def condition(self, context: Tensor) -> Transform:
        """The transform at ``context`` (shape ``(..., context_dim)``, broadcasting against the inputs)."""
        check_context(context, self.context_dim, self._reference_tensor())
        return self._condition(context)

    def _condition(self, context: Tensor) -> Transform:
        """The transform at a context that has already been checked."""
        raise NotImplementedError

    def _reference_tensor(self) -> Tensor | None:
        """A parameter (or floating buffer) whose dtype and device a context must match."""
        for t in self.parameters():
            return t
        for t in self.buffers():
            if t.dtype.is_floating_point:
                return t
        return None


def condition_checked(t: ConditionalTransform, context: Tensor) -> Transform:
    """``t.condition(context)`` for a context that has already been checked (no second check for pyro_nf's)."""
    if isinstance(t, ConditionalFlowTransformModule):
        return t._condition(context)
    return t.condition(context)


class ConditionalFlowStack(ConditionalFlowTransformModule):
    """A stack of conditional (and plain) transforms; ``.condition(context)`` gives a :class:`FlowStack`.

    Every conditional part reads the same context, so they must agree on ``context_dim``.
    """

    def __init__(self, parts: Sequence[ConditionalTransform | Transform]) -> None:
        super().__init__()
        parts = list(parts)
        dims = set()
        for i, part in enumerate(parts):
            if not isinstance(part, (ConditionalTransform, Transform)):
                raise TypeError(
                    f"ConditionalFlowStack: part {i} is a {type(part).__name__}, "
                    "expected a ConditionalTransform or a Transform"
                )
            if isinstance(part, nn.Module):
                self.add_module(str(i), part)
            if isinstance(part, ConditionalTransform) and getattr(part, "context_dim", None) is not None:
                dims.add(part.context_dim)  # type: ignore[attr-defined]
        if len(dims) > 1:
            raise ValueError(f"ConditionalFlowStack: the conditional parts read contexts of different sizes {dims}")
        self.parts = parts
        self.context_dim = dims.pop() if dims else 0

    def condition(self, context: Tensor) -> FlowStack:
        """The :class:`FlowStack` of every part at ``context`` (checked once)."""
        if self.context_dim:
            check_context(context, self.context_dim, self._reference_tensor())
        return self._condition(context)

    def _condition(self, context: Tensor) -> FlowStack:
        return FlowStack(
            [condition_checked(p, context) if isinstance(p, ConditionalTransform) else p for p in self.parts]
        )

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, index: int) -> ConditionalTransform | Transform:
        return self.parts[index]
