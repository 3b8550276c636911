"""Several processes under ``torchrun``: the process group, and the device of each process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor

from pyro_nf.training.config import ConfigError

__all__ = ["DistributedContext"]


@dataclass
class DistributedContext:
    """The process group of a ``torchrun`` launch (a single process when ``WORLD_SIZE`` is 1 or unset)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str) -> DistributedContext:
        """Join the process group ``torchrun`` describes in the environment."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not torch_dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            torch_dist.init_process_group(backend=backend)
            owns = True
        return cls(rank, world_size, local_rank, owns)

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


def _resolve_device(device: str, context: DistributedContext) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if device == "cuda" and context.world_size > 1:
            device = f"cuda:{context.local_rank}"
    return torch.device(device)
