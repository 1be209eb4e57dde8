"""Triton backend of the selective scan: host side of the kernels in kernels/triton/selective_scan.py.

Tiling, chunking and the second (deterministic) reduction pass of the partial gradients; the kernel design
(work split, chunked recompute, memory, determinism) is described with the kernels. Triton compiles them at
their first launch on a GPU; under TRITON_INTERPRET=1 they run CPU tensors (fp64 too, for tests).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton import selective_scan as kernels

__all__ = ["scan_forward", "scan_backward", "state_shape", "chunk_length"]

MAX_CHUNK = 64  # steps between stored states: states cost N / MAX_CHUNK of an fp32 copy of u


def chunk_length(length: int) -> int:
    """Steps per chunk for a sequence of `length` (short sequences are one chunk)."""
    return max(1, min(MAX_CHUNK, length))


def state_shape(batch: int, dim: int, length: int, nstate: int) -> Tuple[int, int, int, int]:
    """Shape of the `states` tensor that `scan_forward` returns and `scan_backward` takes."""
    return batch, dim, triton.cdiv(length, chunk_length(length)), nstate


def _accumulation(u: Tensor):
    return (torch.float64, tl.float64) if u.dtype == torch.float64 else (torch.float32, tl.float32)


def _tiling(per_group: int, nstate: int) -> Tuple[int, int]:
    """(BLOCK_D, BLOCK_N): a (channels x states) register tile of at most 256 values (untuned on GPUs)."""
    block_n = triton.next_power_of_2(nstate)
    block_d = max(1, min(triton.next_power_of_2(per_group), 256 // block_n))
    return block_d, block_n


def _flags(D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, acc) -> dict:
    return dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), ACC=acc)


class _Launch(NamedTuple):
    """Sizes, dtypes and tiling shared by the forward and backward launches."""
    batch: int
    dim: int
    length: int
    groups: int
    per_group: int
    nstate: int
    torch_acc: torch.dtype
    tl_acc: Any
    block_d: int
    block_n: int
    chunk: int


def _launch(u: Tensor, A: Tensor, B: Tensor) -> _Launch:
    batch, dim, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    per_group = dim // groups
    return _Launch(batch, dim, length, groups, per_group, nstate, *_accumulation(u), *_tiling(per_group, nstate),
                   chunk_length(length))


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 delta_bias: Optional[Tensor], delta_softplus: bool) -> Tuple[Tensor, Tensor]:
    """y (batch, D, L) in the accumulation dtype, and the chunk start states for `scan_backward`."""
    batch, dim, length, groups, per_group, nstate, torch_acc, tl_acc, block_d, block_n, chunk = _launch(u, A, B)
    y = torch.empty(batch, dim, length, device=u.device, dtype=torch_acc)
    states = torch.empty(state_shape(batch, dim, length, nstate), device=u.device, dtype=torch_acc)
    grid = (batch * groups, triton.cdiv(per_group, block_d))
    kernels.scan_fwd_kernel[grid](
        u, delta, A, B, C, D, delta_bias, y, states,
        length, groups, per_group, nstate, states.shape[2],
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        **_flags(D, delta_bias, delta_softplus, tl_acc), BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
    )
    return y, states


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  delta_bias: Optional[Tensor], delta_softplus: bool, dy: Tensor, states: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype (dD, ddelta_bias in
    the accumulation dtype when D, delta_bias are None)."""
    batch, dim, length, groups, per_group, nstate, torch_acc, tl_acc, block_d, block_n, chunk = _launch(u, A, B)
    nblock = triton.cdiv(per_group, block_d)
    grid = (batch * groups, nblock)
    dev = u.device
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
    dA = torch.empty(batch, dim, nstate, device=dev, dtype=torch_acc)
    dB = torch.empty(batch, groups, nblock, nstate, length, device=dev, dtype=torch_acc)
    dC = torch.empty_like(dB)
    dD = torch.empty(batch, dim, device=dev, dtype=torch_acc)
    dbias = torch.empty_like(dD)
    programs = batch * groups * nblock
    scratch_h = torch.empty(programs, chunk + 1, block_d, block_n, device=dev, dtype=torch_acc)
    scratch_dt = torch.empty(programs, 2, chunk, block_d, device=dev, dtype=torch_acc)
    kernels.scan_bwd_kernel[grid](
        u, delta, A, B, C, D, delta_bias, dy, states, scratch_h, scratch_dt,
        du, ddelta, dA, dB, dC, dD, dbias,
        length, groups, per_group, nstate, states.shape[2], nblock,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *dy.stride(),
        **_flags(D, delta_bias, delta_softplus, tl_acc), BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
    )
    # second pass: add the per-block / per-batch partials in a fixed order (deterministic)
    dA = dA.sum(0).to(A.dtype)
    dB = dB.sum(2).to(B.dtype)
    dC = dC.sum(2).to(C.dtype)
    dD = dD.sum(0).to(D.dtype if D is not None else torch_acc)
    dbias = dbias.sum(0).to(delta_bias.dtype if delta_bias is not None else torch_acc)
    return du, ddelta, dA, dB, dC, dD, dbias
