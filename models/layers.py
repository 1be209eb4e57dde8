"""Small layers shared by the DefMamba and DAMamba model files: layout permutes and checkpointed blocks."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = ["ToChannelsLast", "ToChannelsFirst", "run_blocks"]


class ToChannelsLast(nn.Module):
    """(B, C, H, W) -> (B, H, W, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """(B, H, W, C) -> (B, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


def run_blocks(blocks: Iterable[nn.Module], x: Tensor, use_checkpoint: bool) -> Tensor:
    """Apply `blocks` in order; with `use_checkpoint`, each is recomputed in the backward to save memory."""
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x
