"""One training epoch: Mixup, autocast forward, MESA, accumulated backward, clipped AMP step, schedule, EMA."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import AverageMeter, ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from .amp import AmpPolicy, GradStepper
from .meters import DeviceMeter, format_seconds, memory_mb, read_meters

__all__ = ["NonFiniteError", "TrainParts", "EpochStats", "updates_per_epoch", "mesa_loss", "train_one_epoch"]


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the message names the epoch and iteration."""


@dataclass
class TrainParts:
    """Everything an epoch needs. `model` may be DDP-wrapped; `module` is the bare model behind it."""

    model: nn.Module
    module: nn.Module
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    stepper: GradStepper
    amp: AmpPolicy
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mixup: Optional[Mixup]
    ema: Optional[ModelEmaV3]
    device: torch.device
    accumulation_steps: int
    epochs: int
    print_freq: int
    logger: logging.Logger
    writer: Optional[SummaryWriter]
    # MESA self-distillation: weight (0 = off) and first epoch (0-based); the teacher is `ema`
    mesa: float = 0.0
    mesa_start_epoch: int = 0

    def mesa_active(self, epoch: int) -> bool:
        return self.mesa > 0 and self.ema is not None and epoch >= self.mesa_start_epoch


@dataclass(frozen=True)
class EpochStats:
    """Means over the epoch's iterations and over all processes (loss, grad norm); LR and speed of this one."""

    loss: float
    grad_norm: float
    lr: float
    images_per_s: float
    seconds: float


def updates_per_epoch(batches: int, accumulation_steps: int) -> int:
    """Optimizer updates per epoch; the last batches that cannot fill an update are not used."""
    return batches // accumulation_steps


class _NonFiniteWatch:
    """First iteration (and its value) at which the loss / the grad norm was NaN or inf, kept on the device.

    Observing launches tiny kernels and reads nothing, so the steps between log steps never wait for the
    GPU; `check` reads the record at a log step (in the same gather as the meters, one collective under DDP)
    and raises on every rank together.
    """

    KINDS = ("loss", "gradient norm")

    def __init__(self, device: torch.device) -> None:
        # per kind: (iteration, value); an infinite iteration means "all finite so far"
        self.state = torch.full((2 * len(self.KINDS),), math.inf, dtype=torch.float64, device=device)

    def observe(self, kind: int, value: torch.Tensor, idx: int) -> None:
        value = value.detach().to(torch.float64)
        at, seen = self.state[2 * kind:2 * kind + 2].unbind()
        first = torch.isinf(at) & ~torch.isfinite(value)
        seen.copy_(torch.where(first, value, seen))
        at.copy_(torch.where(first, idx, at))

    @classmethod
    def check(cls, rows: Sequence[Sequence[float]], epoch: int, idx: int, batches: int) -> None:
        """Raise NonFiniteError for the earliest record over all processes' `rows` (loss first on ties)."""
        found = [(row[2 * kind], kind, row[2 * kind + 1]) for row in rows for kind in range(len(cls.KINDS))
                 if math.isfinite(row[2 * kind])]
        if not found:
            return
        at, kind, value = min(found)
        where = "before the update" if int(at) == idx else \
            f"at iteration {idx + 1}, the next log step, with no checkpoint written since"
        raise NonFiniteError(f"{cls.KINDS[kind]} is {value} at epoch {epoch} iteration {int(at) + 1}/{batches}; "
                             f"stopped {where}, the last checkpoint is left intact")


_soft_target_ce = SoftTargetCrossEntropy()


def mesa_loss(logits: torch.Tensor, teacher: nn.Module, images: torch.Tensor, amp: AmpPolicy) -> torch.Tensor:
    """MESA term: soft-target cross-entropy of the student logits against softmax(teacher logits).

    The teacher (the EMA model, in eval mode) runs without a graph under the run's autocast dtype, on the
    same (mixed) images as the student.
    """
    with torch.no_grad(), amp.autocast():
        teacher_logits = teacher(images)
    return _soft_target_ce(logits.float(), teacher_logits.float().softmax(-1))


def train_one_epoch(parts: TrainParts, epoch: int) -> EpochStats:
    """Train `epoch` (0-based); the LR of update u (global count) is set by scheduler.step_update(u).

    Nothing is read from the device between log steps (every PRINT_FREQ iterations and the last one): the
    meters and the NaN/inf watch accumulate there, and each log step reads them in one gather. Under fp16
    the GradScaler's own overflow check is the only other sync of an update.
    """
    steps = parts.accumulation_steps
    updates = updates_per_epoch(len(parts.loader), steps)
    batches = updates * steps
    parts.model.train()
    parts.optimizer.zero_grad(set_to_none=True)
    loss_meter, norm_meter, mesa_meter = (DeviceMeter(parts.device) for _ in range(3))
    watch = _NonFiniteWatch(parts.device)
    time_meter = AverageMeter()
    mesa_on = parts.mesa_active(epoch)
    images_seen = 0
    start = end = time.time()
    for idx, (images, targets) in enumerate(parts.loader):
        if idx >= batches:
            break
        images = images.to(parts.device, non_blocking=True)
        targets = targets.to(parts.device, non_blocking=True)
        if parts.mixup is not None:
            images, targets = parts.mixup(images, targets)
        is_update = (idx + 1) % steps == 0
        log_step = idx % parts.print_freq == 0 or idx == batches - 1
        # DDP would all-reduce gradients on every backward; only the last micro-batch of an update needs it.
        sync = contextlib.nullcontext() if is_update or not isinstance(parts.model, DistributedDataParallel) \
            else parts.model.no_sync()
        with sync:
            with parts.amp.autocast():
                logits = parts.model(images)
            loss = parts.criterion(logits.float(), targets)
            if mesa_on:
                distill = mesa_loss(logits, parts.ema.module, images, parts.amp)
                mesa_meter.update(distill, targets.shape[0])
                loss = loss + parts.mesa * distill
            watch.observe(0, loss, idx)
            parts.stepper.backward(loss / steps)
        loss_meter.update(loss, targets.shape[0])
        if is_update:
            parts.scheduler.step_update(epoch * updates + idx // steps)
            norm = parts.stepper.clip(parts.optimizer, parts.module.parameters())
            if parts.stepper.skips_overflow:  # fp16: an inf norm is an overflow the scaler skips
                norm_meter.update(norm, keep=torch.isfinite(norm))
            else:
                watch.observe(1, norm, idx)
                norm_meter.update(norm)
        if log_step:  # read before the update, so a NaN found here never reaches the weights
            (loss_now, norm_now, mesa_now), rows = read_meters((loss_meter, norm_meter, mesa_meter), watch.state)
            _NonFiniteWatch.check(rows, epoch, idx, batches)
        if is_update:
            parts.stepper.apply(parts.optimizer)
            parts.optimizer.zero_grad(set_to_none=True)
            if parts.ema is not None:
                parts.ema.update(parts.module)
        images_seen += targets.shape[0]
        time_meter.update(time.time() - end)
        end = time.time()
        if log_step:
            lr = parts.optimizer.param_groups[0]["lr"]
            eta = time_meter.avg * (batches - idx - 1)
            parts.logger.info(
                "Train: [%d/%d][%d/%d] eta %s lr %.3e wd %.4f time %.3f (%.3f) loss %.4f (%.4f) "
                "grad_norm %.4f (%.4f) loss_scale %.0f mem %.0fMB%s",
                epoch, parts.epochs, idx, batches, format_seconds(eta), lr,
                parts.optimizer.param_groups[0]["weight_decay"], time_meter.val, time_meter.avg,
                loss_now.val, loss_now.avg, norm_now.val, norm_now.avg, parts.stepper.loss_scale,
                memory_mb(parts.device), f" mesa {mesa_now.val:.4f} ({mesa_now.avg:.4f})" if mesa_on else "")
            if parts.writer is not None:
                step = epoch * batches + idx
                parts.writer.add_scalar("train/loss", loss_now.val, step)
                parts.writer.add_scalar("train/lr", lr, step)
                parts.writer.add_scalar("train/grad_norm", norm_now.val, step)
    seconds = time.time() - start
    # the last iteration is a log step: loss_now / norm_now hold the epoch's means
    return EpochStats(loss=loss_now.avg, grad_norm=norm_now.avg, lr=parts.optimizer.param_groups[0]["lr"],
                      images_per_s=images_seen / max(seconds, 1e-9), seconds=seconds)
