"""Learning rates scaled to the total batch, and the per-iteration cosine schedule with linear warm-up."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.scheduler import CosineLRScheduler
from yacs.config import CfgNode

__all__ = ["REFERENCE_BATCH", "ScaledLRs", "scaled_lrs", "build_scheduler"]

# TRAIN.BASE_LR / WARMUP_LR / MIN_LR are quoted for this total batch.
REFERENCE_BATCH = 512


@dataclass(frozen=True)
class ScaledLRs:
    """The three learning rates after linear scaling to the run's total batch."""

    base: float
    warmup: float
    minimum: float
    total_batch: int


def scaled_lrs(config: CfgNode, world_size: int) -> ScaledLRs:
    """BASE/WARMUP/MIN LR x total batch / 512, total batch = BATCH_SIZE x world size x ACCUMULATION_STEPS."""
    total = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS
    factor = total / REFERENCE_BATCH
    train = config.TRAIN
    return ScaledLRs(train.BASE_LR * factor, train.WARMUP_LR * factor, train.MIN_LR * factor, total)


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, lrs: ScaledLRs,
                    updates_per_epoch: int) -> CosineLRScheduler:
    """timm cosine schedule counted in optimizer updates: WARMUP_EPOCHS of linear warm-up from the warm-up
    LR, then one cosine from the base LR down to the min LR at the end of TRAIN.EPOCHS.

    Drive it with `step_update(global_update_index)` before each update.
    """
    warmup = config.TRAIN.WARMUP_EPOCHS * updates_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=(config.TRAIN.EPOCHS - config.TRAIN.WARMUP_EPOCHS) * updates_per_epoch,
        lr_min=lrs.minimum,
        warmup_lr_init=lrs.warmup,
        warmup_t=warmup,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
