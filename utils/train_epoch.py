"""One training epoch: Mixup, autocast forward, MESA, accumulated backward, clipped AMP step, schedule, EMA."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

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
from .distributed import all_reduce_sum
from .meters import format_seconds, memory_mb

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
    """Means over the epoch on this process (the loss is averaged over all processes per iteration)."""

    loss: float
    grad_norm: float
    lr: float
    images_per_s: float
    seconds: float


def updates_per_epoch(batches: int, accumulation_steps: int) -> int:
    """Optimizer updates per epoch; the last batches that cannot fill an update are not used."""
    return batches // accumulation_steps


_STOPPED = "stopped before the update, the last checkpoint is left intact"


def _check_finite(loss: torch.Tensor, epoch: int, idx: int, batches: int) -> float:
    # Reduced over processes so that every rank stops together instead of hanging in the next all-reduce.
    world_loss = all_reduce_sum(loss.detach().float().reshape(1))
    if torch.distributed.is_initialized():
        world_loss /= torch.distributed.get_world_size()
    value = world_loss.item()
    if not math.isfinite(value):
        raise NonFiniteError(f"loss is {value} at epoch {epoch} iteration {idx + 1}/{batches}; {_STOPPED}")
    return value


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
    """Train `epoch` (0-based); the LR of update u (global count) is set by scheduler.step_update(u)."""
    steps = parts.accumulation_steps
    updates = updates_per_epoch(len(parts.loader), steps)
    batches = updates * steps
    parts.model.train()
    parts.optimizer.zero_grad(set_to_none=True)
    loss_meter, norm_meter, time_meter, mesa_meter = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
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
        # DDP would all-reduce gradients on every backward; only the last micro-batch of an update needs it.
        sync = contextlib.nullcontext() if is_update or not isinstance(parts.model, DistributedDataParallel) \
            else parts.model.no_sync()
        with sync:
            with parts.amp.autocast():
                logits = parts.model(images)
            loss = parts.criterion(logits.float(), targets)
            if mesa_on:
                distill = mesa_loss(logits, parts.ema.module, images, parts.amp)
                mesa_meter.update(distill.item(), targets.shape[0])
                loss = loss + parts.mesa * distill
            loss_value = _check_finite(loss, epoch, idx, batches)
            parts.stepper.backward(loss / steps)
        if is_update:
            update = epoch * updates + idx // steps
            parts.scheduler.step_update(update)
            norm = parts.stepper.clip(parts.optimizer, parts.module.parameters())
            if not math.isfinite(norm) and not parts.stepper.skips_overflow:
                raise NonFiniteError(f"gradient norm is {norm} at epoch {epoch} iteration {idx + 1}/{batches}; "
                                     f"{_STOPPED}")
            parts.stepper.apply(parts.optimizer)
            norm_meter.update(norm)
            parts.optimizer.zero_grad(set_to_none=True)
            if parts.ema is not None:
                parts.ema.update(parts.module)
        loss_meter.update(loss_value, targets.shape[0])
        images_seen += targets.shape[0]
        time_meter.update(time.time() - end)
        end = time.time()
        lr = parts.optimizer.param_groups[0]["lr"]
        if idx % parts.print_freq == 0 or idx == batches - 1:
            eta = time_meter.avg * (batches - idx - 1)
            parts.logger.info(
                "Train: [%d/%d][%d/%d] eta %s lr %.3e wd %.4f time %.3f (%.3f) loss %.4f (%.4f) "
                "grad_norm %.4f (%.4f) loss_scale %.0f mem %.0fMB%s",
                epoch, parts.epochs, idx, batches, format_seconds(eta), lr,
                parts.optimizer.param_groups[0]["weight_decay"], time_meter.val, time_meter.avg,
                loss_meter.val, loss_meter.avg, norm_meter.val, norm_meter.avg, parts.stepper.loss_scale,
                memory_mb(parts.device),
                f" mesa {mesa_meter.val:.4f} ({mesa_meter.avg:.4f})" if mesa_on else "")
            if parts.writer is not None:
                step = epoch * batches + idx
                parts.writer.add_scalar("train/loss", loss_value, step)
                parts.writer.add_scalar("train/lr", lr, step)
                parts.writer.add_scalar("train/grad_norm", norm_meter.val, step)
    seconds = time.time() - start
    return EpochStats(loss=loss_meter.avg, grad_norm=norm_meter.avg, lr=parts.optimizer.param_groups[0]["lr"],
                      images_per_s=images_seen / max(seconds, 1e-9), seconds=seconds)
