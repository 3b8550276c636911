"""Checks of single training options shared by the configuration and the engine: the device name, the objective,
and the training-step modes (compile, CUDA graphs, precision, memory format) with their defaults per device."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pyro_nf.training.errors import ConfigError

if TYPE_CHECKING:
    from pyro_nf.training.config import TrainConfig

__all__ = ["FLOW_MATCHING_FLOWS", "OBJECTIVES", "check_device_name", "settle_objective", "validate_objective"]
__all__ += ["CPU_STEP_DEFAULTS", "GPU_STEP_DEFAULTS", "step_modes", "validate_step_modes"]

OBJECTIVES = ("likelihood", "flow-matching")
"""What ``--objective`` accepts: maximum likelihood (every flow) or flow matching (the CNFs)."""

FLOW_MATCHING_FLOWS = ("ffjord", "ffjord-multiscale")
FLOW_MATCHING_DEFAULTS = {"fm_path": "linear", "fm_coupling": "independent", "fm_sigma_min": 0.0}
"""The flow-matching options of a flow-matching run that are not given."""
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


GPU_STEP_DEFAULTS: dict[str, Any] = {
    "compile": False,
    "cuda_graphs": False,
    "precision": "fp32",
    "channels_last": False,
}
"""The training-step modes of a run on a GPU when ``--compile``, ``--cuda-graphs``, ``--precision`` and
``--channels-last`` are not given. A mode becomes a default here once it is measured faster on a GPU and gives
the same bits/dim (``benchmarks/gpu_images.py``, ``docs/families/images.md``)."""

CPU_STEP_DEFAULTS: dict[str, Any] = {
    "compile": False,
    "cuda_graphs": False,
    "precision": "fp32",
    "channels_last": False,
}
"""The same on a CPU: every mode off. ``channels_last`` stays off until it is measured faster in the training
loop and shown to keep a run of two processes (DDP) equal to a run of one."""

_BF16_FLOWS = ("glow", "realnvp-multiscale")


def validate_step_modes(config: TrainConfig) -> None:
    for key in ("compile", "cuda_graphs", "channels_last"):
        value = getattr(config, key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"--{key.replace('_', '-')}: expected true or false, got {value!r}")
    if config.precision is not None and config.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision: expected fp32 or bf16, got {config.precision!r}")
    if config.precision == "bf16" and config.flow not in _BF16_FLOWS:
        raise ConfigError(
            f"--precision bf16 runs the coupling networks of an image flow ({', '.join(_BF16_FLOWS)}) in bfloat16, "
            f"not {config.flow}; use --precision fp32"
        )
    if config.cuda_graphs and config.flow == "ffjord":
        raise ConfigError("--cuda-graphs cannot capture ffjord: its trace estimate draws noise at every step")


def step_modes(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The training-step modes of a run on ``device``: the options given, else the device's defaults.

    Keys ``compile``, ``cuda_graphs``, ``precision`` and ``channels_last``
    (see :class:`~pyro_nf.training.config.TrainConfig`).

    Raises:
        ConfigError: ``--cuda-graphs`` on a device that is not a GPU.

    Example::

        >>> from pyro_nf.training import resolve_config
        >>> config = resolve_config({"flow": "glow", "data": "digits", "compile": True})
        >>> step_modes(config, torch.device("cpu"))
        {'compile': True, 'cuda_graphs': False, 'precision': 'fp32', 'channels_last': False}
    """
    gpu = device.type == "cuda"
    if not gpu and config.cuda_graphs:
        raise ConfigError(f"--cuda-graphs needs a CUDA device, and this run is on {device}")
    defaults = GPU_STEP_DEFAULTS if gpu else CPU_STEP_DEFAULTS
    modes = {key: defaults[key] if getattr(config, key) is None else getattr(config, key) for key in defaults}
    if config.flow == "ffjord":
        modes["cuda_graphs"] = bool(config.cuda_graphs)
    if config.flow not in _BF16_FLOWS:
        modes["precision"] = config.precision or "fp32"
    return modes


def settle_objective(config: TrainConfig, given: dict[str, Any]) -> None:
    """Fill the flow-matching options of a flow-matching run; refuse them (when given) otherwise."""
    if config.objective == "flow-matching":
        for key, default in FLOW_MATCHING_DEFAULTS.items():
            if getattr(config, key) is None:
                setattr(config, key, default)
        return
    for key in FLOW_MATCHING_DEFAULTS:
        if given.get(key) is not None:
            raise ConfigError(
                f"--{key.replace('_', '-')} applies to --objective flow-matching, not to {config.objective!r}"
            )
        setattr(config, key, None)
