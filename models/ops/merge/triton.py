"""Triton backend of the branch merge: host side of the kernels in kernels/triton/merge.py.

Tiling and launch; the kernel design is described with the kernels. Triton compiles them at their first
launch on a GPU; under TRITON_INTERPRET=1 they run CPU tensors (fp64 too, for tests). `plan_forward` /
`plan_backward` build a launch without running it (for ahead-of-time compilation, benchmarks/kernel_analysis.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton import merge as kernels

from ..launch import Launch
from ..precision import common_accumulation_dtype

__all__ = ["merge_forward", "merge_backward", "plan_forward", "plan_backward"]

TILE = 2048        # (channels x tokens) values per program: 8 per thread and array at 8 warps
MAX_BLOCK_D = 32   # channels per program (with 64 tokens)
MIN_BLOCK_D = 16
NUM_WARPS = 8      # <= 64 registers, no spills, 32 warps per SM (sm_80 / sm_90, compiled ahead of time)


def _layout(batch: int, dim: int, length: int, inverse: Tensor, gate: Optional[Tensor], *acc_of: Optional[Tensor]):
    """Grid, the shared size/stride arguments and meta-parameters; inverse with unit stride along the steps
    (and the gate along the channels)."""
    inverse = inverse if inverse.stride(-1) == 1 else inverse.contiguous()
    if gate is not None and gate.stride(-1) != 1:
        gate = gate.contiguous()
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(dim))
    padded = lambda bd: triton.cdiv(dim, bd) * bd  # noqa: E731
    while block_d > MIN_BLOCK_D and padded(block_d // 2) < padded(block_d):
        block_d //= 2  # e.g. 48 channels: three tiles of 16, not two of 32 with 16 idle
    block_l = TILE // block_d
    grid = (batch, triton.cdiv(length, block_l), triton.cdiv(dim, block_d))
    strides = gate.stride()[:2] if gate is not None else (0, 0)
    acc = tl.float64 if common_accumulation_dtype(*acc_of, gate) == torch.float64 else tl.float32
    meta = dict(HAS_GATE=gate is not None, ACC=acc, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return inverse, gate, grid, (inverse.shape[1], dim, length, *inverse.stride()[:2], *strides), meta


def plan_forward(ys: Tensor, inverse: Tensor, gate: Optional[Tensor], out_dtype: torch.dtype, mean: Tensor
                 ) -> Tuple[Launch, Tensor]:
    """The forward launch and its output (B, L, D); `mean` is filled too when it is not empty."""
    ys = ys.contiguous()
    batch, _, dim, length = ys.shape
    inverse, gate, grid, sizes, meta = _layout(batch, dim, length, inverse, gate, ys)
    out = torch.empty(batch, length, dim, dtype=out_dtype, device=ys.device)
    meta["SAVE_MEAN"] = mean.numel() > 0
    args = (ys, inverse, gate, out, mean, *sizes)
    return Launch(kernels.merge_fwd_kernel, grid, args, meta), out


def plan_backward(dout: Tensor, inverse: Tensor, gate: Optional[Tensor], mean: Tensor
                  ) -> Tuple[Launch, Tuple[Tensor, Tensor]]:
    """The backward launch and the gradients it fills: dys (B, K, D, L) in mean's dtype, dgate (or empty)."""
    dout = dout.contiguous()
    batch, length, dim = dout.shape
    inverse, gate_, grid, sizes, meta = _layout(batch, dim, length, inverse, gate, mean, dout)
    dys = torch.empty(batch, inverse.shape[1], dim, length, dtype=mean.dtype, device=dout.device)
    dgate = (torch.empty(batch, length, dim, dtype=gate.dtype, device=dout.device) if gate is not None
             else mean.new_empty(0))
    args = (dout, inverse, gate_, mean, dys, dgate, *sizes)
    return Launch(kernels.merge_bwd_kernel, grid, args, meta), (dys, dgate)


def merge_forward(ys: Tensor, inverse: Tensor, gate: Optional[Tensor], out_dtype: torch.dtype, mean: Tensor
                  ) -> Tuple[Tensor, Tensor]:
    """(out (B, L, D) in out_dtype, mean as given: the un-gated mean when it is not empty)."""
    launch, out = plan_forward(ys, inverse, gate, out_dtype, mean)
    launch.launch()
    return out, mean


def merge_backward(dout: Tensor, inverse: Tensor, gate: Optional[Tensor], mean: Tensor) -> Tuple[Tensor, Tensor]:
    """(dys (B, K, D, L), dgate (B, L, D) in the gate's dtype, or empty without a gate)."""
    launch, grads = plan_backward(dout, inverse, gate, mean)
    launch.launch()
    return grads
