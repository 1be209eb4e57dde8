"""Small measurements shared by the loops: memory in use and a readable duration."""
from __future__ import annotations

import datetime
import resource

import torch

__all__ = ["memory_mb", "format_seconds"]


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or the process's peak resident memory on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))
