"""Validation: loss, top-1 and top-5 accuracy over the (sharded) val set, reduced over all processes."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader

from .amp import AmpPolicy
from .distributed import all_reduce_sum

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracies in percent (acc5 is top-min(5, classes)), mean cross-entropy, images counted (all processes)."""

    acc1: float
    acc5: float
    loss: float
    images: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, amp: AmpPolicy, device: torch.device, logger: logging.Logger,
             print_freq: int, label: str = "model") -> EvalResult:
    """Evaluate `model` on `loader`; sums over images (not per-process means) are reduced over processes."""
    model.eval()
    # loss sum, top-1 hits, top-k hits, images
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    start = time.time()
    for idx, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with amp.autocast():
            logits = model(images)
        logits = logits.float()
        top_k = min(5, logits.shape[1])
        acc1, acck = accuracy(logits, targets, topk=(1, top_k))
        batch = targets.numel()
        # summed on the device: nothing is read back between log steps, so the GPU never waits for the host
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               acc1.double() * batch / 100, acck.double() * batch / 100,
                               torch.tensor(batch, dtype=torch.float64, device=device)])
        if idx % print_freq == 0:
            logger.info("Test (%s): [%d/%d] loss %.4f acc@1 %.2f acc@5 %.2f", label, idx, len(loader),
                        totals[0] / totals[3], 100 * totals[1] / totals[3], 100 * totals[2] / totals[3])
    loss_sum, hits1, hitsk, count = all_reduce_sum(totals).tolist()
    result = EvalResult(acc1=100 * hits1 / count, acc5=100 * hitsk / count, loss=loss_sum / count,
                        images=int(count))
    logger.info("Val (%s): acc@1 %.3f acc@5 %.3f loss %.4f on %d images in %.1fs", label, result.acc1,
                result.acc5, result.loss, result.images, time.time() - start)
    return result
