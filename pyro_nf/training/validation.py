"""Checks of single training options shared by the configuration and the engine: the device name, the objective."""

from __future__ import annotations

import torch

from pyro_nf.training.errors import ConfigError

__all__ = ["FLOW_MATCHING_FLOWS", "OBJECTIVES", "check_device_name", "validate_objective"]

OBJECTIVES = ("likelihood", "flow-matching")
"""What ``--objective`` accepts: maximum likelihood (every flow) or flow matching (the CNFs)."""

FLOW_MATCHING_FLOWS = ("ffjord", "ffjord-multiscale")
"""The flows flow matching trains (CNFs: a vector field regressed on a path)."""


def check_device_name(device: object, flag: str = "--device") -> str:
    """``device`` if it names a device ``--device`` accepts (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    Whether the device exists on this machine is checked when it is resolved
    (:func:`~pyro_nf.training.distributed.resolve_device`).

    Example::

        >>> check_device_name("cpu:5")
        Traceback (most recent call last):
        ...
        pyro_nf.training.errors.ConfigError: --device: expected auto, cpu, cuda, cuda:N or mps, got 'cpu:5'
    """
    message = f"{flag}: expected auto, cpu, cuda, cuda:N or mps, got {device!r}"
    if not isinstance(device, str):
        raise ConfigError(message)
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(message) from None
    if parsed.type not in ("cpu", "cuda", "mps") or (parsed.type != "cuda" and parsed.index not in (None, 0)):
        raise ConfigError(message)
    return device


def validate_objective(
    flow: str, objective: str, path: str | None, coupling: str | None, sigma_min: float | None
) -> None:
    """A :class:`ConfigError` unless the objective (and, for flow matching, its options) fits the flow."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective != "flow-matching":
        return
    if flow not in FLOW_MATCHING_FLOWS:
        raise ConfigError(
            f"--objective flow-matching trains continuous flows ({', '.join(FLOW_MATCHING_FLOWS)}), not {flow}; "
            "use --objective likelihood"
        )
    if path not in ("linear", "cosine"):
        raise ConfigError(f"--fm-path: expected linear or cosine, got {path!r}")
    if coupling not in ("independent", "ot"):
        raise ConfigError(f"--fm-coupling: expected independent or ot, got {coupling!r}")
    sigma = sigma_min
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < 1:
        raise ConfigError(f"--fm-sigma-min: expected a number in [0, 1), got {sigma!r}")
    if path == "cosine" and sigma != 0:
        raise ConfigError(f"--fm-sigma-min: the cosine path ends at the data, expected 0, got {sigma!r}")
