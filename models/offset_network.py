"""Offset network of the deformable branch (paper Sec. 3.3, Fig. 3b; ablation "CA").

depthwise k x k conv -> channel attention (SE-style, from the globally pooled input) -> LayerNorm over
channels -> GELU -> 1x1 conv without bias -> 3 maps: [dy, dx] point offsets and the token-index offset.
Submodule names follow the official release (`conv1`, `ca`, `ln`, `gelu`, `conv2`) so its checkpoints load.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["OffsetNetwork"]


class OffsetNetwork(nn.Module):
    """Predicts raw (pre-tanh) offsets (B, 3, H, W) from features (B, C, H, W)."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        """
        Args:
            dim: channels C of the scanned features (the DSSM's d_inner).
            kernel_size: depthwise kernel K of this stage (9, 7, 5, 3 in the release).
        """
        super().__init__()
        # the release uses C // 16 hidden units; at least one keeps tiny test models valid
        hidden = max(dim // 16, 1)
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.ca = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Sigmoid())
        self.ln = nn.LayerNorm(dim)
        self.gelu = nn.GELU()
        self.conv2 = nn.Conv2d(dim, 3, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.ca(x.mean((2, 3)))                                  # (B, C)
        h = self.conv1(x).permute(0, 2, 3, 1) * gate[:, None, None, :]  # channels-last for the norm
        h = self.gelu(self.ln(h))
        return self.conv2(h.permute(0, 3, 1, 2))
