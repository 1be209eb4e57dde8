"""Triton backend of DAMamba's adaptive sampling: host side of the kernels in kernels/triton/adaptive.py.

`plan_forward` / `plan_backward` build the launches without running them, so the configurations the models
use can be compiled ahead of time on a machine without a GPU (benchmarks/kernel_analysis.py). Autograd and
the backend choice live in op.py and __init__.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..launch import Launch
from ..precision import common_accumulation_dtype

__all__ = ["adaptive_forward", "adaptive_backward", "plan_forward", "plan_backward"]

# 64 pixels per program, a group's channels (16 in DAMamba) 8 at a time at 8 warps: two tile values per thread
# and array, as the deformable kernels (models/ops/deform/triton.py). At 4 warps (four values) the backward took
# 88 registers on sm_90; at 8 it takes <= 62 (>= 32 resident warps per SM).
BLOCK_C = 8
BLOCK_N = 64
NUM_WARPS = 8


def _kernels():
    from kernels.triton import adaptive
    return adaptive


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dense(x: Tensor) -> Tensor:
    """x as is when contiguous or channels-last, else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _common(x: Tensor, offsets: Tensor):
    batch, channels, height, width = x.shape
    groups = offsets.shape[-1] // 2
    grid = (batch * groups, -(-(height * width) // BLOCK_N))
    acc = common_accumulation_dtype(x, offsets)
    meta = dict(ACC=_tl_dtype(acc), BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return grid, (channels, groups, height, width), meta, acc


def plan_forward(x: Tensor, offsets: Tensor) -> Tuple[Launch, Tensor]:
    """The forward launch and its output (B, C, H, W), contiguous, in the accumulation dtype."""
    x = _dense(x)
    grid, sizes, meta, acc = _common(x, offsets)
    out = torch.empty(x.shape, dtype=acc, device=x.device)
    args = (x, offsets.contiguous(), out, *sizes, *x.stride())
    return Launch(_kernels().adaptive_sample_fwd_kernel, grid, args, meta), out


def adaptive_forward(x: Tensor, offsets: Tensor) -> Tensor:
    """x (B, C, H, W) sampled per group at its pixel offsets (B, H, W, 2G) -> (B, C, H, W) fp32 (fp64)."""
    launch, out = plan_forward(x, offsets)
    launch.launch()
    return out


def plan_backward(dout: Tensor, x: Tensor, offsets: Tensor, need_x: bool, need_offsets: bool
                  ) -> Tuple[Launch, Tuple[Optional[Tensor], Optional[Tensor]]]:
    """The backward launch and the buffers it fills: dx (x's strides) and doffsets (B, H, W, 2G), in the
    accumulation dtype; None where not needed."""
    x = _dense(x)
    grid, sizes, meta, acc = _common(x, offsets)
    dx = torch.zeros_like(x, dtype=acc) if need_x else None  # same strides as x
    doffsets = torch.zeros(offsets.shape, dtype=acc, device=x.device) if need_offsets else None
    # dx is not written when NEED_X is False: any pointer stands in for it
    args = (dout.contiguous(), x, offsets.contiguous(), x if dx is None else dx, doffsets, *sizes, *x.stride())
    launch = Launch(_kernels().adaptive_sample_bwd_kernel, grid, args,
                    dict(NEED_X=need_x, NEED_OFF=need_offsets, **meta))
    return launch, (dx, doffsets)


def adaptive_backward(dout: Tensor, x: Tensor, offsets: Tensor, need_x: bool, need_offsets: bool
                      ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dx, doffsets) in the accumulation dtype; None where not needed."""
    launch, grads = plan_backward(dout, x, offsets, need_x, need_offsets)
    launch.launch()
    return grads
