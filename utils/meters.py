"""Small measurements shared by the loops: device-side running means, memory in use, a readable duration."""
from __future__ import annotations

import datetime
import resource
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .distributed import is_distributed

__all__ = ["DeviceMeter", "MeterReading", "gather_rows", "read_meters", "memory_mb", "format_seconds"]


class DeviceMeter:
    """Latest value and weighted mean of a per-step scalar tensor, kept on its device.

    `update` launches a few tiny kernels and never reads the value, so the host does not wait for the GPU;
    the numbers are read (one sync for all meters) by `read_meters` at log steps only.
    """

    def __init__(self, device: torch.device) -> None:
        self.state = torch.zeros(3, dtype=torch.float64, device=device)  # last, weighted sum, weight

    def update(self, value: torch.Tensor, n: int = 1, keep: Optional[torch.Tensor] = None) -> None:
        """Add `value` with weight `n`; where the bool tensor `keep` is False the meter is left unchanged."""
        value = value.detach().to(torch.float64)
        last, total, weight = self.state.unbind()
        if keep is None:
            last.copy_(value)
            total.add_(value, alpha=n)
            weight.add_(n)
        else:
            last.copy_(torch.where(keep, value, last))
            total.add_(torch.where(keep, value, 0.0), alpha=n)
            weight.add_(keep.to(torch.float64), alpha=n)


@dataclass(frozen=True)
class MeterReading:
    """`val`: the latest value (mean over processes); `avg`: the weighted mean over steps and processes."""

    val: float
    avg: float


def gather_rows(values: torch.Tensor) -> List[List[float]]:
    """Every process's 1-D `values` on the host, one row per rank: one sync and, with a process group,
    one collective."""
    if is_distributed():
        rows = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, values)
        return torch.stack(rows).tolist()
    return [values.tolist()]


def read_meters(meters: Sequence[DeviceMeter], extra: torch.Tensor) -> Tuple[List[MeterReading], List[List[float]]]:
    """The readings of `meters` reduced over processes, and every rank's `extra` (float64, same device),
    all in one `gather_rows` call."""
    rows = gather_rows(torch.cat([m.state for m in meters] + [extra]))
    readings = []
    for i in range(len(meters)):
        last, total, weight = ([row[3 * i + j] for row in rows] for j in range(3))
        readings.append(MeterReading(val=sum(last) / len(last), avg=sum(total) / max(sum(weight), 1e-12)))
    return readings, [row[3 * len(meters):] for row in rows]


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or the process's peak resident memory on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))
