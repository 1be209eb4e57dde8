"""Process-group setup for torchrun / torch.distributed.launch / a single process, and metric reduction."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "is_distributed", "rank_and_world_size", "all_reduce_sum",
           "all_gather_objects", "barrier", "shutdown_distributed"]


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: global rank, world size, node-local rank and the device it owns."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(local_rank_arg: Optional[int]) -> DistContext:
    """Join the process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU).

    The GPU is chosen by LOCAL_RANK (set by both launchers; `--local_rank` as a fallback), which is
    right on multi-node jobs where the global rank exceeds the GPUs of one node.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True when this process is in a joined process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> Tuple[int, int]:
    """(rank, world size) of this process in the joined group; (0, 1) for a single process."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (a no-op copy for a single process)."""
    tensor = tensor.clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> List[Any]:
    """Every process's `obj`, indexed by rank (a collective: all ranks must call it); [obj] for one process."""
    if not is_distributed():
        return [obj]
    objects: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if is_distributed():
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group if one was joined."""
    if is_distributed():
        dist.destroy_process_group()
