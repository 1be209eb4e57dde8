"""Triton backend of the deformable sequence: host side of the kernels in kernels/triton/deformable.py.

The host resizes the offset-bias table (a fixed linear map, Ry @ T @ Rx^T as in offset_bias.py), sorts the
index-offset path, and launches one fused kernel that writes each token's sampled features (point offset
plus offset bias) straight into its slot of the sorted sequence. The backward kernel returns dx, dpos,
d resized table (mapped back to the 7 x 7 table by the adjoint of the resize), ddisp and the channel means
that make the index-offset surrogate. Autograd and the backend choice live in op.py and __init__.py.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..precision import common_accumulation_dtype
from .offset_bias import resize_table, resize_table_backward

__all__ = ["deformable_sequence_forward", "deformable_sequence_backward"]

# a program owns 64 sequence slots (so per-token sums need no atomics) and loops over channels 32 at a time
BLOCK_C = 32
BLOCK_N = 64

def _kernels():
    from kernels.triton import deformable
    return deformable


def _dense(x: Tensor) -> Tensor:
    """x as is when contiguous or channels-last (the DSSM's conv output on GPUs), else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _launch_args(x: Tensor) -> Tuple[Tuple[int, int], Tuple]:
    """Grid (batch, slot tiles) and the size and stride arguments shared by both kernels."""
    batch, channels, height, width = x.shape
    grid = (batch, -(-(height * width) // BLOCK_N))
    # pixel <- normalised coordinate scale of the align-corners convention
    return grid, (channels, height, width, 0.5 * (height - 1), 0.5 * (width - 1), *x.stride())


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def deformable_sequence_forward(x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                                perm: Tensor, out_dtype: torch.dtype) -> Tensor:
    """seq (B, C, H*W) in out_dtype; perm (B, H*W) is the token order (see kernels/triton/deformable.py)."""
    batch, channels, height, width = x.shape
    acc = common_accumulation_dtype(x, pos, table, disp)
    resized = None
    if table is not None:
        resized = resize_table(table, (height, width), acc)[0].contiguous()
    seq = torch.empty(batch, channels, height * width, dtype=out_dtype, device=x.device)
    x = _dense(x)
    grid, sizes = _launch_args(x)
    _kernels().deformable_sequence_fwd_kernel[grid](
        x, pos.contiguous(), resized, None if disp is None else disp.contiguous(),
        perm.contiguous(), seq, *sizes,
        HAS_TABLE=table is not None, ACC=_tl_dtype(acc), BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N)
    return seq


def deformable_sequence_backward(dseq: Tensor, x: Tensor, pos: Tensor, table: Optional[Tensor],
                                 disp: Optional[Tensor], perm: Tensor, need_x: bool, need_pos: bool,
                                 need_table: bool, need_disp: bool, need_path: bool
                                 ) -> Tuple[Optional[Tensor], ...]:
    """(dx, dpos, dtable, ddisp, dpath) in the accumulation dtype (dpos, ddisp as (B, N, 2)); None where not needed."""
    batch, channels, height, width = x.shape
    length = height * width
    acc = common_accumulation_dtype(x, pos, table, disp)
    has_table = table is not None
    need_table, need_disp = need_table and has_table, need_disp and has_table
    new = functools.partial(torch.zeros, dtype=acc, device=x.device)
    resized = ry = rx = None
    if has_table:
        resized, ry, rx = resize_table(table, (height, width), acc)
        resized = resized.contiguous()
    x = _dense(x)
    dx = torch.zeros_like(x, dtype=acc) if need_x else None  # same strides as x
    dpos = new(batch, length, 2) if need_pos else None
    dres = new(channels, height, width) if need_table else None
    ddisp = new(batch, length, 2) if need_disp else None
    mean_slot = new(batch, length) if need_path else None
    mean_token = new(batch, length) if need_path else None
    grid, sizes = _launch_args(x)
    _kernels().deformable_sequence_bwd_kernel[grid](
        dseq.contiguous(), x, pos.contiguous(), resized,
        None if disp is None else disp.contiguous(), perm.contiguous(),
        dx, dpos, dres, ddisp, mean_slot, mean_token, *sizes,
        HAS_TABLE=has_table, NEED_X=need_x, NEED_POS=need_pos, NEED_TABLE=need_table, NEED_DISP=need_disp,
        NEED_PATH=need_path, ACC=_tl_dtype(acc), BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N)
    dtable = None if dres is None else resize_table_backward(dres, ry, rx)
    dpath = None if mean_slot is None else mean_slot - mean_token
    return dx, dpos, dtable, ddisp, dpath
