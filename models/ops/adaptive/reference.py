"""PyTorch backend of DAMamba's adaptive sampling: the readable specification.

The sampling is the project's point-offset operation (ops/deform/point_offset.py), whose positions are
normalised (y, x) pairs with align-corners semantics; pixel positions map onto it exactly as
y_norm = 2 y / (H - 1) - 1. A map one pixel high or wide has no such mapping (H - 1 = 0), so it is padded
with a zero row/column first: out-of-range neighbours are zero anyway, so values and gradients are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..deform.point_offset import sample_at_points
from ..precision import to_accumulation

__all__ = ["adaptive_sample_reference", "pixel_offsets_to_positions"]


def pixel_offsets_to_positions(offsets: Tensor, height: int, width: int) -> Tensor:
    """(B, H, W, G, 2) pixel offsets (dx, dy) -> (B, G, H, W, 2) normalised (y, x) align-corners positions.

    `height` / `width` are the sizes of the map that is sampled (at least 2 each; it may be larger than
    the H x W grid of sample points by the padding of `adaptive_sample_reference`).
    """
    offsets = to_accumulation(offsets)  # fp16 pixel positions would be coarse at stage-1 resolution
    out_h, out_w = offsets.shape[1:3]
    rows = torch.arange(out_h, device=offsets.device, dtype=offsets.dtype).view(1, -1, 1, 1)
    cols = torch.arange(out_w, device=offsets.device, dtype=offsets.dtype).view(1, 1, -1, 1)
    y = (rows + offsets[..., 1]) * (2.0 / (height - 1)) - 1.0
    x = (cols + offsets[..., 0]) * (2.0 / (width - 1)) - 1.0
    return torch.stack([y, x], -1).permute(0, 3, 1, 2, 4)


def adaptive_sample_reference(x: Tensor, offsets: Tensor) -> Tensor:
    """Sample x (B, C, H, W) per channel group at its pixel offsets (B, H, W, 2G) -> (B, C, H, W) fp32
    (fp64 for fp64 input), through the point-offset Function (gradients to x and the offsets)."""
    batch, channels, height, width = x.shape
    groups = offsets.shape[3] // 2
    # one zero row/column so that H - 1 and W - 1 are positive (see the module docstring)
    pad_h, pad_w = int(height == 1), int(width == 1)
    src = F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
    pos = pixel_offsets_to_positions(offsets.reshape(batch, height, width, groups, 2), height + pad_h, width + pad_w)
    out = sample_at_points(src.reshape(batch * groups, channels // groups, height + pad_h, width + pad_w),
                           pos.reshape(batch * groups, height, width, 2))
    return out.view(batch, channels, height, width)
