"""Front end of the deformable branch's token sequence (paper Sec. 3.3): one call from features to sorted sequence.

    features[b, c, n] = sample(x, pos)[b, c, n] (+ sample(table, disp)[b, c, n] when a table is given)
    perm[b]           = stable ascending argsort of path[b]      (raster order 0..N-1 when path is None)
    seq[b, c, n]      = features[b, c, perm[b, n]]

with the gradients of the autograd Functions in point_offset.py, offset_bias.py and index_offset.py
(including the averaged-gradient surrogate for `path`). This file chooses the implementation; the
pure-PyTorch composition below is the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .index_offset import sort_tokens
from .offset_bias import offset_bias
from .point_offset import sample_at_points

__all__ = ["deformable_sequence", "deformable_sequence_reference"]


def deformable_sequence_reference(x: Tensor, pos: Tensor, table: Optional[Tensor] = None,
                                  disp: Optional[Tensor] = None, path: Optional[Tensor] = None
                                  ) -> Tuple[Tensor, Tensor]:
    """Pure-PyTorch deformable sequence (see the module docstring); returns (seq (B, C, N) fp32, perm (B, N))."""
    features = sample_at_points(x, pos)
    if table is not None:
        features = features + offset_bias(table, disp)
    features = features.flatten(2)
    if path is None:
        batch, _, length = features.shape
        return features, torch.arange(length, device=x.device).expand(batch, length)
    return sort_tokens(features, path)


def deformable_sequence(x: Tensor, pos: Tensor, table: Optional[Tensor] = None, disp: Optional[Tensor] = None,
                        path: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Deformed, re-ordered token sequence.

    Args:
        x: features (B, C, H, W), any float dtype.
        pos: deformed sampling points (B, H, W, 2), normalised (y, x), align-corners, zeros outside.
        table: offset-bias table (C, h, w) resized to (H, W) inside, or None for no offset bias.
        disp: normalised (y, x) displacements (B, H, W, 2) at which the resized table is sampled.
        path: per-token positions on the 1-D scan path (B, H*W) whose ascending order is the scan order,
            or None to keep the raster order.

    Returns:
        seq (B, C, H*W) in fp32 (fp64 for fp64 inputs) and perm (B, H*W) int64, seq[:, :, n] = features[:, :, perm[:, n]].
    """
    if (table is None) != (disp is None):
        raise ValueError("table and disp must be given together")
    return deformable_sequence_reference(x, pos, table, disp, path)
