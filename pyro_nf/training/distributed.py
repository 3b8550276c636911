"""Several processes under ``torchrun``: the device of each process, resolved once, and the process group.

The device is resolved first (``auto`` is CUDA when torch sees a GPU; under ``torchrun``
``cuda`` is the process's local GPU), and the process group's backend follows it: NCCL for
CUDA, gloo for the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import Tensor

from pyro_nf.training.config import ConfigError

__all__ = ["DistributedContext", "resolve_device"]


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` that ``--device`` names; ``cuda`` becomes ``cuda:local_rank`` under ``torchrun``.

    Example::

        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank}"
    return torch.device(device)


@dataclass
class DistributedContext:
    """The process group of a ``torchrun`` launch (a single process when ``WORLD_SIZE`` is 1 or unset)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: str) -> DistributedContext:
        """Resolve ``device`` for this process and join the process group ``torchrun`` describes."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(device=resolve_device(device))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        resolved = resolve_device(device, local_rank)
        owns = False
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
            owns = True
        return cls(rank, world_size, local_rank, owns, resolved)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files."""
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over all processes."""
        if self.world_size > 1:
            value = value.clone()
            torch_dist.all_reduce(value)
            value /= self.world_size
        return value

    def close(self) -> None:
        """Leave the process group if this context joined it."""
        if self.owns_group:
            torch_dist.destroy_process_group()
