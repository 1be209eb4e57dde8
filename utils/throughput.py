"""Throughput (images/s) of a model at a fixed batch: warm-up, then timed forwards (or training steps) with sync;
the training step and the peak-memory reading every throughput measurement of the repository shares."""
from __future__ import annotations

import gc
import time
from typing import Callable, Optional

import torch
from torch import nn

from .amp import AmpPolicy, GradStepper

__all__ = ["WARMUP_ITERS", "TIMED_ITERS", "CPU_WARMUP_ITERS", "CPU_TIMED_ITERS", "measure_throughput",
           "measure_train_throughput", "train_step", "peak_memory_gib", "reset_memory", "format_rate"]

# As in the release: 50 untimed forwards (autotuning, caches), then 30 timed ones.
WARMUP_ITERS = 50
TIMED_ITERS = 30
# On a CPU there is nothing to autotune, and one DefMamba-T forward at batch 128 takes minutes.
CPU_WARMUP_ITERS = 1
CPU_TIMED_ITERS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """Peak allocated GPU memory since the last `reset_memory`, in GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    """Free what the previous measurement left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: AmpPolicy,
               clip_grad: float = 5.0, lr: float = 1e-4) -> Callable[[], None]:
    """One training step as the trainer takes it (autocast forward, cross-entropy, scaled backward, grad-norm
    clip, AdamW), as a closure over its own optimizer; the model's weights change at every call."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    stepper = GradStepper(amp, clip_grad)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        with amp.autocast():
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        stepper.backward(loss)
        stepper.clip(optimizer, params)
        stepper.apply(optimizer)
    return step


def _iterations(device: torch.device, warmup: Optional[int], timed: Optional[int]) -> tuple:
    default = (CPU_WARMUP_ITERS, CPU_TIMED_ITERS) if device.type == "cpu" else (WARMUP_ITERS, TIMED_ITERS)
    return (default[0] if warmup is None else warmup), (default[1] if timed is None else max(timed, 1))


@torch.no_grad()
def measure_throughput(model: nn.Module, batch_size: int, img_size: int, in_chans: int, amp: AmpPolicy,
                       device: torch.device, warmup: Optional[int] = None, timed: Optional[int] = None) -> float:
    """Images per second of `model.eval()` on random input of the given batch, under `amp`."""
    model.eval()
    warmup, timed = _iterations(device, warmup, timed)
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


def measure_train_throughput(model: nn.Module, batch_size: int, img_size: int, in_chans: int, amp: AmpPolicy,
                             device: torch.device, clip_grad: float = 5.0, warmup: Optional[int] = None,
                             timed: Optional[int] = None) -> float:
    """Images per second of training steps as the trainer takes them (autocast forward, cross-entropy, scaled
    backward, grad-norm clip, AdamW) on random input and labels already on `device`; no data loading, no EMA.

    The model's weights change: measure on a copy if they matter."""
    model.train()
    warmup, timed = _iterations(device, warmup, timed)
    images = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    labels = torch.randint(0, model.num_classes, (batch_size,), device=device)
    step = train_step(model, images, labels, amp, clip_grad)
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(timed):
        step()
    _sync(device)
    return timed * batch_size / (time.perf_counter() - start)


def format_rate(images_per_s: float) -> str:
    """A rate for the log: whole numbers from 100 up, else three significant digits (45.2, 0.421, 0.00312)."""
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"
