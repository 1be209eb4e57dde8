"""Inference throughput (images/s) of a model at a fixed batch: warm-up, then timed forwards with sync."""
from __future__ import annotations

import time

import torch
from torch import nn

from .amp import AmpPolicy

__all__ = ["WARMUP_ITERS", "TIMED_ITERS", "CPU_WARMUP_ITERS", "CPU_TIMED_ITERS", "measure_throughput",
           "format_rate"]

# As in the release: 50 untimed forwards (autotuning, caches), then 30 timed ones.
WARMUP_ITERS = 50
TIMED_ITERS = 30
# On a CPU there is nothing to autotune, and one DefMamba-T forward at batch 128 takes minutes.
CPU_WARMUP_ITERS = 1
CPU_TIMED_ITERS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughput(model: nn.Module, batch_size: int, img_size: int, in_chans: int, amp: AmpPolicy,
                       device: torch.device) -> float:
    """Images per second of `model.eval()` on random input of the given batch, under `amp`."""
    model.eval()
    warmup, timed = (CPU_WARMUP_ITERS, CPU_TIMED_ITERS) if device.type == "cpu" else (WARMUP_ITERS, TIMED_ITERS)
    images = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    with amp.autocast():
        for _ in range(warmup):
            model(images)
        _sync(device)
        start = time.perf_counter()
        for _ in range(timed):
            model(images)
        _sync(device)
    return timed * batch_size / (time.perf_counter() - start)


def format_rate(images_per_s: float) -> str:
    """A rate for the log: whole numbers from 100 up, else three significant digits (45.2, 0.421, 0.00312)."""
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"
