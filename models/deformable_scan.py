"""Deformable scanning (paper Sec. 3.3, Fig. 3): the token sequence of the DSSM's deformable branch.

    offsets  = OffsetNetwork(x)                                   (B, 3, H, W)
    pos      = ref(H, W) + tanh(offsets[:, :2]) / (H - 1, W - 1)  point offset, about +-1/2 pixel
    path     = path_ref(N) + tanh(offsets[:, 2])                  index offset
    features = sample(x, pos) + sample(rpe_table, (key - pos) / 2)
    sequence, perm = sort(features by path)

Reference grids follow the release's constants (spec official.md Sec. 3.2), with one deliberate
deviation: they are built in float32 whatever the input dtype. The release builds them in the input
dtype, and under fp16 autocast the 3136 stage-1 token positions collapse onto 2116 distinct values,
which leaves the scan order among the ties arbitrary.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from timm.layers import trunc_normal_

from .deformable_sequence import deformable_sequence
from .offset_network import OffsetNetwork

__all__ = ["DeformableScan"]

RPE_TABLE_SIZE = 7


def _span(size: int) -> int:
    """Denominator of the release's "/(size - 1) * 2 - 1" normalisation, kept finite for size 1."""
    return max(size - 1, 1)


def _normalise(coords: Tensor, size: int) -> Tensor:
    return coords / _span(size) * 2 - 1


def reference_points(height: int, width: int, device: torch.device) -> Tensor:
    """(H, W, 2) normalised (y, x) reference points at pixel (i + 0.5, j + 0.5), as in the release."""
    ys = _normalise(torch.linspace(0.5, height - 0.5, height, device=device), height)
    xs = _normalise(torch.linspace(0.5, width - 0.5, width, device=device), width)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)


def key_points(height: int, width: int, device: torch.device) -> Tensor:
    """(H, W, 2) key grid of the offset bias: linspace(0, size, size), normalised like the references."""
    ys = _normalise(torch.linspace(0, height, height, device=device), height)
    xs = _normalise(torch.linspace(0, width, width, device=device), width)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)


def path_reference(length: int, device: torch.device) -> Tensor:
    """(N,) normalised reference positions of the raster-ordered tokens on the 1-D scan path."""
    return _normalise(torch.linspace(0.5, length - 0.5, length, device=device), length)


class DeformableScan(nn.Module):
    """Deformed, re-ordered token sequence of features (B, C, H, W) -> (seq (B, C, H*W) fp32, perm (B, H*W))."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        """
        Args:
            dim: channels C of the scanned features.
            kernel_size: depthwise kernel of the offset network for this stage.
        """
        super().__init__()
        self.rpe_table = nn.Parameter(torch.empty(dim, RPE_TABLE_SIZE, RPE_TABLE_SIZE))
        self.conv_offset = OffsetNetwork(dim, kernel_size)
        trunc_normal_(self.rpe_table, std=0.01)

    def forward(self, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """(seq, perm); seq in out_dtype (e.g. the dtype the scan reads), None: fp32 (fp64 for fp64 x)."""
        batch, _, height, width = x.shape
        raw = self.conv_offset(x).float()
        point_offset = torch.tanh(raw[:, :2]).permute(0, 2, 3, 1)
        point_offset = point_offset / point_offset.new_tensor([_span(height), _span(width)])
        pos = reference_points(height, width, x.device) + point_offset               # (B, H, W, 2)
        path = path_reference(height * width, x.device) + torch.tanh(raw[:, 2]).flatten(1)
        disp = (key_points(height, width, x.device) - pos) * 0.5
        return deformable_sequence(x, pos, self.rpe_table, disp, path, out_dtype=out_dtype)
