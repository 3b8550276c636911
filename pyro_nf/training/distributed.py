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

from pyro_nf.training.errors import ConfigError
from pyro_nf.training.validation import check_device_name

__all__ = ["DistributedContext", "resolve_device"]


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` that ``--device`` names; ``cuda`` becomes ``cuda:local_rank`` under ``torchrun``.

    Example::

        >>> resolve_device("cpu")
        device(type='cpu')
    """
    check_device_name(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank}"
        index, count = torch.device(device).index, torch.cuda.device_count()
        if index is not None and index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine; use --device cpu")
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

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (one small all-reduce when there are several)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process: a process that failed tells the others, which then stop too."""
        return not self.any_true(not ok)

    def close(self, wait: bool = True) -> None:
        """Leave the process group if this context joined it; with ``wait``, all processes together.

        The barrier first: a process that tore gloo down while another still used it could abort the other
        at exit ("terminate called without an active exception"). A process that failed leaves without it
        (``wait=False``), since the others may never reach it.
        """
        if self.owns_group:
            if wait:
                torch_dist.barrier()
            torch_dist.destroy_process_group()
