"""Offset bias (paper Sec. 3.3, ablation "OB"): a learnable relative-position table for the offsets.

The release keeps a small (C, 7, 7) table per block, resizes it bilinearly (align_corners=False) to the
stage resolution H x W, and samples it bilinearly (align corners, zeros outside) at the halved
displacement between each token's key-grid point and its deformed position; the result is added to the
point-offset features. Resizing is a fixed linear map, written here as two small interpolation matrices
so the backward to the table is exact and cheap: T_resized = Ry @ T @ Rx^T.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .bilinear import bilinear_sample, bilinear_sample_backward
from ..precision import accumulation_dtype

__all__ = ["OffsetBias", "offset_bias", "resize_matrix", "resize_table", "resize_table_backward"]


def resize_matrix(out_size: int, in_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(out_size, in_size) matrix of 1-D bilinear resizing with align_corners=False (PyTorch rule)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    mat.index_put_((rows, lo), 1 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat.to(dtype=dtype, device=device)


def resize_table(table: Tensor, size: Tuple[int, int], dtype: Optional[torch.dtype] = None
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """(resized (C, H, W), Ry, Rx): the table resized to `size` as Ry @ T @ Rx^T, in `dtype` (default: the
    table's accumulation dtype)."""
    dtype = dtype or accumulation_dtype(table.dtype)
    ry = resize_matrix(size[0], table.shape[-2], dtype, table.device)
    rx = resize_matrix(size[1], table.shape[-1], dtype, table.device)
    return ry @ table.to(dtype) @ rx.t(), ry, rx


def resize_table_backward(dresized: Tensor, ry: Tensor, rx: Tensor) -> Tensor:
    """Adjoint of `resize_table`: the gradient of the (C, h, w) table from that of the resized one."""
    return ry.t() @ dresized.to(ry.dtype) @ rx


class OffsetBias(torch.autograd.Function):
    """table (C, h, w), disp (B, H, W, 2) normalised (y, x) -> bias (B, C, H, W), fp32 (fp64 for fp64)."""

    @staticmethod
    def forward(ctx, table: Tensor, disp: Tensor) -> Tensor:
        batch, height, width = disp.shape[:3]
        resized, ry, rx = resize_table(table, (height, width))
        flat_disp = disp.reshape(batch, height * width, 2)
        out = bilinear_sample(resized.unsqueeze(0), flat_disp)
        ctx.save_for_backward(table, resized, ry, rx, flat_disp)
        ctx.disp_shape = disp.shape
        return out.view(batch, table.shape[0], height, width)

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, resized, ry, rx, flat_disp = ctx.saved_tensors
        dres, ddisp = bilinear_sample_backward(resized.unsqueeze(0), flat_disp, grad.flatten(2),
                                               ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dtable = None
        if dres is not None:
            dtable = resize_table_backward(dres[0], ry, rx).to(table.dtype)
        return dtable, None if ddisp is None else ddisp.view(ctx.disp_shape).to(flat_disp.dtype)


def offset_bias(table: Tensor, disp: Tensor) -> Tensor:
    """Functional form of `OffsetBias`."""
    return OffsetBias.apply(table, disp)
