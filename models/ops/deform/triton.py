"""Triton backend of the deformable sequence: host side of the kernels in kernels/triton/deformable.py.

The host resizes the offset-bias table (a fixed linear map, Ry @ T @ Rx^T as in offset_bias.py), sorts the
index-offset path, and launches one fused kernel that writes each token's sampled features (point offset
plus offset bias) straight into its slot of the sorted sequence. The backward launches the adjoint kernel
once for x at pos (dx, dpos and the channel means that make the index-offset surrogate) and once for the
resized table at disp (per-batch partials of its gradient, summed here over the batch in a fixed order and
mapped back to the 7 x 7 table by the adjoint of the resize, and ddisp). Autograd and the backend choice
live in op.py and __init__.py.

`plan_forward` / `plan_backward` build the launches without running them, so the configurations the models
use can be compiled ahead of time on a machine without a GPU (benchmarks/kernel_analysis.py).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..launch import Launch
from ..precision import common_accumulation_dtype
from .offset_bias import resize_table, resize_table_backward

__all__ = ["deformable_sequence_forward", "deformable_sequence_backward", "plan_forward", "plan_backward"]

# A program owns 64 sequence slots (so per-token sums need no atomics) and loops over channels 8 at a time at
# 8 warps: two tile values per thread and array. Registers grow with the values a thread holds (the backward
# at 8 per thread took 220 on sm_80); at 2 the largest launch takes 80 (sm_80), i.e. >= 24 resident warps per SM.
BLOCK_C = 8
BLOCK_N = 64
NUM_WARPS = 8


def _kernels():
    from kernels.triton import deformable
    return deformable


def _dense(x: Tensor) -> Tensor:
    """x as is when contiguous or channels-last (the DSSM's conv output on GPUs), else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _grid_and_sizes(x: Tensor) -> Tuple[Tuple[int, int], Tuple]:
    """Grid (batch, slot tiles) and (channels, height, width, pixel <- normalised scales) of both kernels."""
    batch, channels, height, width = x.shape
    grid = (batch, -(-(height * width) // BLOCK_N))
    return grid, (channels, height, width, 0.5 * (height - 1), 0.5 * (width - 1))


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def plan_forward(x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor], perm: Tensor,
                 out_dtype: torch.dtype) -> Tuple[Launch, Tensor]:
    """The forward launch and its output seq (B, C, H*W) in out_dtype."""
    batch, channels, height, width = x.shape
    acc = common_accumulation_dtype(x, pos, table, disp)
    resized = None
    if table is not None:
        resized = resize_table(table, (height, width), acc)[0].contiguous()
    seq = torch.empty(batch, channels, height * width, dtype=out_dtype, device=x.device)
    x = _dense(x)
    grid, sizes = _grid_and_sizes(x)
    args = (x, pos.contiguous(), resized, None if disp is None else disp.contiguous(), perm.contiguous(), seq,
            *sizes, *x.stride())
    meta = dict(HAS_TABLE=table is not None, ACC=_tl_dtype(acc), BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N,
                num_warps=NUM_WARPS)
    return Launch(_kernels().deformable_sequence_fwd_kernel, grid, args, meta), seq


def deformable_sequence_forward(x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                                perm: Tensor, out_dtype: torch.dtype) -> Tensor:
    """seq (B, C, H*W) in out_dtype; perm (B, H*W) is the token order (see kernels/triton/deformable.py)."""
    launch, seq = plan_forward(x, pos, table, disp, perm, out_dtype)
    launch.launch()
    return seq


def plan_backward(dseq: Tensor, x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                  perm: Tensor, need_x: bool, need_pos: bool, need_table: bool, need_disp: bool, need_path: bool
                  ) -> Tuple[List[Launch], Tuple[Optional[Tensor], ...], Tuple[Optional[Tensor], ...]]:
    """The adjoint launches (x at pos, then the table at disp, each only when something of it is needed),
    the buffers they fill (dx, dpos, dres per batch (B, C, H, W), ddisp, mean_slot, mean_token) and the
    resize matrices (Ry, Rx) that map the batch sum of dres back to the table."""
    batch, channels, height, width = x.shape
    length = height * width
    acc = common_accumulation_dtype(x, pos, table, disp)
    has_table = table is not None
    need_table, need_disp = need_table and has_table, need_disp and has_table
    new = functools.partial(torch.zeros, dtype=acc, device=x.device)
    x = _dense(x)
    dseq, perm = dseq.contiguous(), perm.contiguous()
    grid, sizes = _grid_and_sizes(x)
    meta = dict(ACC=_tl_dtype(acc), BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    kernel = _kernels().deformable_sample_bwd_kernel
    launches = []
    dx = torch.zeros_like(x, dtype=acc) if need_x else None  # same strides as x
    dpos = new(batch, length, 2) if need_pos else None
    mean_slot = new(batch, length) if need_path else None
    mean_token = new(batch, length) if need_path else None
    if need_x or need_pos or need_path:
        stride_b, stride_c, stride_h, stride_w = x.stride()
        # dsrc is not written when NEED_SRC is False: any pointer stands in for it
        args = (dseq, x, pos.contiguous(), perm, x if dx is None else dx, dpos, mean_slot, mean_token, *sizes,
                stride_b, stride_b, stride_c, stride_h, stride_w)
        launches.append(Launch(kernel, grid, args, dict(NEED_SRC=need_x, NEED_POINT=need_pos,
                                                        NEED_PATH=need_path, **meta)))
    dres = ddisp = ry = rx = None
    if need_table or need_disp:
        resized, ry, rx = resize_table(table, (height, width), acc)
        resized = resized.contiguous()
        dres = new(batch, channels, height, width) if need_table else None
        ddisp = new(batch, length, 2) if need_disp else None
        args = (dseq, resized, disp.contiguous(), perm, resized if dres is None else dres, ddisp, None, None,
                *sizes, 0, channels * length, length, width, 1)
        launches.append(Launch(kernel, grid, args, dict(NEED_SRC=need_table, NEED_POINT=need_disp,
                                                        NEED_PATH=False, **meta)))
    return launches, (dx, dpos, dres, ddisp, mean_slot, mean_token), (ry, rx)


def deformable_sequence_backward(dseq: Tensor, x: Tensor, pos: Tensor, table: Optional[Tensor],
                                 disp: Optional[Tensor], perm: Tensor, need_x: bool, need_pos: bool,
                                 need_table: bool, need_disp: bool, need_path: bool
                                 ) -> Tuple[Optional[Tensor], ...]:
    """(dx, dpos, dtable, ddisp, dpath) in the accumulation dtype (dpos, ddisp as (B, N, 2)); None where not needed."""
    launches, buffers, (ry, rx) = plan_backward(dseq, x, pos, table, disp, perm, need_x, need_pos, need_table,
                                                need_disp, need_path)
    for launch in launches:
        launch.launch()
    dx, dpos, dres, ddisp, mean_slot, mean_token = buffers
    dtable = None if dres is None else resize_table_backward(dres.sum(0), ry, rx)
    dpath = None if mean_slot is None else mean_slot - mean_token
    return dx, dpos, dtable, ddisp, dpath
