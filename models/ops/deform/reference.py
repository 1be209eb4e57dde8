"""PyTorch backend of the deformable sequence: the readable specification.

The forward is the composition of the paper's three autograd Functions (point_offset.py, offset_bias.py,
index_offset.py); the backward is their adjoint written out from the same pieces, because a custom op's
implementation runs below autograd and cannot differentiate the Functions themselves (the tests check the
two against each other).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..precision import to_accumulation
from .bilinear import bilinear_sample_backward
from .index_offset import sort_tokens
from .offset_bias import offset_bias, resize_table, resize_table_backward
from .point_offset import sample_at_points

__all__ = ["deformable_sequence_reference", "deformable_sequence_reference_backward"]


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


def deformable_sequence_reference_backward(dseq: Tensor, x: Tensor, pos: Tensor, table: Optional[Tensor],
                                           disp: Optional[Tensor], perm: Tensor, need_x: bool, need_pos: bool,
                                           need_table: bool, need_disp: bool, need_path: bool) -> Tuple[Optional[Tensor], ...]:
    """Adjoint of `deformable_sequence_reference`, built from the pieces its autograd Functions use.

    (A custom op's implementation runs below autograd, so it cannot differentiate the Functions themselves;
    the tests check this adjoint against them.)
    """
    batch, _, height, width = x.shape
    dseq = to_accumulation(dseq)
    # IndexOffsetSort: exact scatter back to token order, channel-averaged surrogate for the path
    dfeat = torch.empty_like(dseq).scatter_(2, perm.unsqueeze(1).expand_as(dseq), dseq)
    dpath = (dseq - dfeat).mean(1) if need_path else None
    dx = dpos = dtable = ddisp = None
    if need_x or need_pos:  # PointOffsetSample
        dx, dpos = bilinear_sample_backward(x, pos.reshape(batch, -1, 2), dfeat, need_x, need_pos)
    if table is not None and (need_table or need_disp):  # OffsetBias: sample the resized table, resize adjoint
        resized, ry, rx = resize_table(table, (height, width))
        dres, ddisp = bilinear_sample_backward(resized.unsqueeze(0), disp.reshape(batch, -1, 2), dfeat,
                                               need_table, need_disp)
        dtable = None if dres is None else resize_table_backward(dres[0], ry, rx)
    return dx, dpos, dtable, ddisp, dpath
