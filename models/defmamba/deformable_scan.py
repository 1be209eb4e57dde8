"""Deformable scanning (paper Sec. 3.3, Fig. 3): the token sequence of the DSSM's deformable branch.

    offsets  = DeformableOffsetNetwork(x)                         (B, 3, H, W)
    pos      = ref(H, W) + tanh(offsets[:, :2]) / (H - 1, W - 1)  point offset, about +-1/2 pixel
    path     = path_ref(N) + tanh(offsets[:, 2])                  index offset
    features = sample(x, pos) + sample(rpe_table, (key - pos) / 2)
    sequence, perm = sort(features by path)

Ablation switches (paper Table 5), each dropping the parameters it makes unused:
- point offset (DP) off: features are read at the reference points (pos = ref);
- index offset (DT) off: the sequence keeps the raster order (no sort);
- offset bias (OB) off: no rpe_table, nothing is added to the sampled features;
- channel attention (CA) off: the offset network has no attention gate.
With DP and DT both off there is no offset network at all.

Reference grids follow the release's constants (each function below states its grid), with one deliberate
deviation: they are built in float32 whatever the input dtype. The release builds them in the input
dtype, and under fp16 autocast the 3136 stage-1 token positions collapse onto 2116 distinct values,
which leaves the scan order among the ties arbitrary.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from timm.layers import trunc_normal_

from ..ops.deform import deformable_sequence
from .offset_network import DeformableOffsetNetwork

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

    def __init__(self, dim: int, kernel_size: int, point_offset: bool = True, index_offset: bool = True,
                 offset_bias: bool = True, channel_attention: bool = True) -> None:
        """
        Args:
            dim: channels C of the scanned features.
            kernel_size: depthwise kernel of the offset network for this stage.
            point_offset: learn per-token sampling offsets (DP).
            index_offset: learn the scan order (DT).
            offset_bias: add the offset-bias compensation (OB).
            channel_attention: channel attention inside the offset network (CA).
        """
        super().__init__()
        self.point_offset, self.index_offset = point_offset, index_offset
        # registration order (rpe_table, then conv_offset) is the release's state_dict order
        self.rpe_table = nn.Parameter(torch.empty(dim, RPE_TABLE_SIZE, RPE_TABLE_SIZE)) if offset_bias else None
        maps = 2 * point_offset + index_offset
        self.conv_offset = DeformableOffsetNetwork(dim, kernel_size, maps, channel_attention) if maps else None
        if self.rpe_table is not None:
            trunc_normal_(self.rpe_table, std=0.01)

    def sampling(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Deformed points pos (B, H, W, 2), normalised (y, x), and path positions (B, H*W) or None (DT off)."""
        batch, _, height, width = x.shape
        pos = reference_points(height, width, x.device).expand(batch, height, width, 2)
        if self.conv_offset is None:
            return pos, None
        raw = self.conv_offset(x).float()
        path = None
        if self.point_offset:
            point_offset = torch.tanh(raw[:, :2]).permute(0, 2, 3, 1)
            pos = pos + point_offset / point_offset.new_tensor([_span(height), _span(width)])
        if self.index_offset:
            path = path_reference(height * width, x.device) + torch.tanh(raw[:, -1]).flatten(1)
        return pos, path

    def forward(self, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """(seq, perm); seq in out_dtype (e.g. the dtype the scan reads), None: fp32 (fp64 for fp64 x)."""
        pos, path = self.sampling(x)
        if self.rpe_table is None:
            return deformable_sequence(x, pos, None, None, path, out_dtype=out_dtype)
        disp = (key_points(x.shape[2], x.shape[3], x.device) - pos) * 0.5
        return deformable_sequence(x, pos, self.rpe_table, disp, path, out_dtype=out_dtype)
