"""The one validation vocabulary of pyro_nf: the switch, tensor and context checks, option checks.

Every check raises a :class:`ValueError` or :class:`TypeError` whose message names what
was expected and what came. The tensor checks run while validation is on: pyro_nf's own
switch (:func:`set_validation`, the finer one) and Pyro's (``pyro.enable_validation``)
must both be on. The check of finite values reads a value back to the host (one device
synchronisation), so it is also skipped while a function is being compiled
(``torch.compile``), traced (``torch.jit.trace``) or captured in a CUDA graph; the checks
of type, dtype, device and shape cost nothing on the device and always run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import pyro.distributions
import torch
from torch import Tensor

__all__ = [
    "check_activation_class",
    "check_choice",
    "check_context",
    "check_image_shape",
    "check_non_negative_int",
    "check_options",
    "check_positive_int",
    "check_positive_ints",
    "check_tensor",
    "set_validation",
    "validation",
    "validation_enabled",
]

_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Turn the input checks of every pyro_nf transform on (default) or off.

    The checks (shape, dtype, device, finite values) cost one device synchronisation
    per call on a GPU; switch them off in tuned training loops. ``pyro.enable_validation(False)``
    turns them off as well; this switch is the finer one (pyro_nf's checks only).
    """
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    """Whether pyro_nf transforms check their inputs: both pyro_nf's switch and Pyro's are on.

    Example::

        >>> import pyro
        >>> pyro.enable_validation(False)
        >>> validation_enabled()
        False
        >>> pyro.enable_validation(True)
        >>> validation_enabled()
        True
    """
    return _VALIDATE and pyro.distributions.is_validation_enabled()


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager that sets :func:`set_validation` and restores it afterwards."""
    old = _VALIDATE
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(old)


def _host_reads_allowed() -> bool:
    """False while compiling, tracing or capturing a CUDA graph, where reading a value back is not allowed."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_tensor(
    value: object,
    *,
    name: str,
    event_shape: Sequence[int] | None = None,
    like: Tensor | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Check that ``value`` is a finite floating tensor that fits a transform.

    Raises :class:`TypeError` for a non-tensor, an integer or boolean tensor or a
    floating dtype other than that of ``like``; :class:`ValueError` for a wrong
    trailing (event) shape, a tensor on another device than ``like``, or NaN / inf
    entries. Every message names what was expected and what came.

    Example::

        >>> check_tensor(torch.zeros(3, 2), name="x", event_shape=(3,))
        Traceback (most recent call last):
        ...
        ValueError: x: expected a tensor whose trailing (event) shape is (3,), got shape (3, 2)
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(
            f"{name}: expected a floating-point tensor, got dtype {value.dtype}; convert it with .float() or .double()"
        )
    if like is not None:
        if value.device != like.device:
            raise ValueError(
                f"{name}: expected a tensor on device {like.device} (where the transform's "
                f"parameters are), got one on {value.device}; move it with .to({str(like.device)!r})"
            )
        if value.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype} (the transform's parameter dtype), got {value.dtype}")
    if event_shape is not None:
        event_shape = tuple(event_shape)
        n = len(event_shape)
        got = tuple(value.shape[value.dim() - n :]) if value.dim() >= n else tuple(value.shape)
        if value.dim() < n or got != event_shape:
            raise ValueError(
                f"{name}: expected a tensor whose trailing (event) shape is {event_shape}, "
                f"got shape {tuple(value.shape)}"
            )
    if check_finite and value.device.type != "meta" and _host_reads_allowed() and not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or infinite entries")
    return value


def check_context(context: object, context_dim: int, like: Tensor | None) -> None:
    """Validate a context tensor of shape ``(..., context_dim)`` (unless validation is off)."""
    if validation_enabled():
        check_tensor(context, name="context", event_shape=(context_dim,), like=like)


def check_positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ``ValueError`` naming ``name``.

    Example::

        >>> check_positive_int(True, "num_transforms")
        Traceback (most recent call last):
        ...
        ValueError: num_transforms: expected a positive int, got True
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_positive_ints(values: object, name: str) -> list[int]:
    """``values`` as a list if it is a non-empty sequence of ints >= 1 (not bools); else a ``ValueError``.

    Example::

        >>> check_positive_ints([64, True], "hidden_dims")
        Traceback (most recent call last):
        ...
        ValueError: hidden_dims: expected a non-empty list of positive ints, got [64, True]
    """
    items = list(values) if isinstance(values, (list, tuple, torch.Size)) else None
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"{name}: expected a non-empty list of positive ints, got {values!r}")
    return items


def check_activation_class(activation: object, name: str = "activation") -> None:
    """A ``TypeError`` unless ``activation`` makes a fresh module when called, such as ``torch.nn.ReLU``.

    Example::

        >>> check_activation_class("relu")
        Traceback (most recent call last):
        ...
        TypeError: activation: expected a module class such as torch.nn.ReLU (one per layer), got the string 'relu'
    """
    expected = f"{name}: expected a module class such as torch.nn.ReLU (one per layer), got"
    if isinstance(activation, str):
        raise TypeError(f"{expected} the string {activation!r}")
    if isinstance(activation, torch.nn.Module) or not callable(activation):
        instance = "an instance of " if isinstance(activation, torch.nn.Module) else ""
        raise TypeError(f"{expected} {instance}{type(activation).__name__}")


def check_non_negative_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 0 (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return value


def check_choice(value: object, choices: Sequence[object], name: str) -> None:
    """A ``ValueError`` listing ``choices`` unless ``value`` is one of them.

    Example::

        >>> check_choice("rk45", ("dopri5", "rk4"), "solver")
        Traceback (most recent call last):
        ...
        ValueError: solver: expected one of ['dopri5', 'rk4'], got 'rk45'
    """
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_image_shape(shape: object, name: str = "input_shape") -> tuple[int, int, int]:
    """Check that ``shape`` is an image event shape ``(C, H, W)`` of positive ints and return it as a tuple."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3:
        raise ValueError(f"{name}: expected an image shape (C, H, W) of three positive ints, got {shape!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name}: expected an image shape (C, H, W) of three positive ints, got {tuple(shape)!r}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def check_options(factory: str, options: Mapping[str, object], spec: type) -> None:
    """A ``TypeError`` naming ``factory`` and the options it takes unless every key of ``options`` is in ``spec``.

    ``spec`` is the ``TypedDict`` of the factory's keyword options (its annotations are the names).

    Example::

        >>> from typing import TypedDict
        >>> class Options(TypedDict, total=False):
        ...     depth: int
        >>> check_options("flow", {"deph": 4}, Options)
        Traceback (most recent call last):
        ...
        TypeError: flow: unknown option(s) ['deph']; expected any of ['depth']
    """
    known = set(spec.__required_keys__) | set(spec.__optional_keys__)  # type: ignore[attr-defined]
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{factory}: unknown option(s) {unknown}; expected any of {sorted(known)}")
