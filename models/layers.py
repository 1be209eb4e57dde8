"""Layers shared by the model families: layout permutes, checkpointed blocks and the pooled classifier head."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = ["ToChannelsLast", "ToChannelsFirst", "run_blocks", "DownsampledStage", "PoolHead"]


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


class DownsampledStage(nn.Module):
    """Blocks at one resolution, then the downsampling to the next stage (DefMamba's and VMamba's stages).

    Subclasses build `blocks`, `downsample` (Identity for the last stage) and set `use_checkpoint`."""

    use_checkpoint: bool
    blocks: nn.Sequential
    downsample: nn.Module

    def forward_blocks(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, x, self.use_checkpoint)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.forward_blocks(x))


class PoolHead(nn.Module):
    """[norm] -> global average pool -> dropout -> linear, on NCHW or NHWC maps.

    `pool_type` "" keeps the map (timm's `reset_classifier(0, "")`; with classes, logits per pixel in the map's
    layout); the linear layer is registered under
    `fc_name`, the release's name for it, so checkpoints load (`linear` is the layer whatever its name).
    """

    def __init__(self, dim: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0,
                 channels_last: bool = False, norm: Optional[nn.Module] = None, fc_name: str = "fc") -> None:
        """
        Args:
            dim: channels of the feature map.
            num_classes: outputs of the linear layer (0: none).
            pool_type: "avg" or "" (no pooling).
            drop_rate: dropout before the linear layer.
            channels_last: the maps are (B, H, W, C) rather than (B, C, H, W).
            norm: module applied to the map before pooling, in the map's layout (a channels-first norm for
                NCHW maps), or None.
            fc_name: attribute name of the linear layer.
        """
        super().__init__()
        self.dim, self.channels_last, self.fc_name = dim, channels_last, fc_name
        self.norm = norm
        self.drop = nn.Dropout(drop_rate)
        self.pool_type = ""
        self.reset(num_classes, pool_type)

    @property
    def linear(self) -> nn.Module:
        return getattr(self, self.fc_name)

    def reset(self, num_classes: int, pool_type: Optional[str] = None, device: Optional[torch.device] = None,
              dtype: Optional[torch.dtype] = None) -> None:
        """A new linear layer for `num_classes` (0: identity) and, if given, a new pool type."""
        if pool_type is not None:
            if pool_type not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {pool_type!r}")
            self.pool_type = pool_type
        linear = nn.Linear(self.dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
        self.add_module(self.fc_name, linear)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.pool_type:
            x = x.mean((1, 2) if self.channels_last else (2, 3))
        if pre_logits:
            return x
        if self.pool_type or self.channels_last:
            return self.linear(self.drop(x))
        return self.linear(self.drop(x).movedim(1, -1)).movedim(-1, 1)  # no pooling: logits per pixel, NCHW
