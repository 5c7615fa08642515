"""Data-parallel training across processes started by `torchrun` (NCCL on GPUs, gloo on CPUs).

Every process sees the same global batches (same sampler, same seed) and trains on its share of each;
DistributedDataParallel averages the gradients of the trainable tensors only (frozen ones are not
registered), weighted so the result equals a single process on the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scpeft_cli.console import console


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This process's rows of a global batch, and the weight that makes its mean loss exact."""
        if not self.enabled:
            return batch, 1.0
        n = len(batch["gene_ids"])
        rows = torch.arange(self.rank, n, self.world_size)
        local = {key: value[rows] for key, value in batch.items()}
        return local, len(rows) * self.world_size / n


def process_group(device_type: str) -> ProcessGroup:
    """Join the group that torchrun describes in the environment (a single process otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ProcessGroup()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    group = ProcessGroup(rank=dist.get_rank(), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not group.is_main:
        console.quiet = True  # one process speaks for the group
    return group


def leave(group: ProcessGroup) -> None:
    if group.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
