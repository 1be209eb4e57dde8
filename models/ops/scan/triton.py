"""Triton backend of the selective scan: host side of the kernels in kernels/triton/selective_scan.py.

Tiling, launch and the second (deterministic) reduction pass of the partial gradients; the kernel design
(work split, chunked recompute, memory, determinism) is described with the kernels. Triton compiles them at
their first launch on a GPU; under TRITON_INTERPRET=1 they run CPU tensors (fp64 too, for tests).

u comes in pieces along D (each a whole number of B/C groups, L-contiguous or token-major; the same tensor
may be several pieces), and groups in `reversed_groups` are scanned backward in time: both are read and
written in place, with one launch per piece and direction (`launch_parts`; reversed ones with the kernels'
REVERSE variant, token-major pieces with U_TOKENS). `plan_forward` / `plan_backward` build a launch without
running it, so the launch configurations the models use can be compiled ahead of time and inspected on a
machine without a GPU (benchmarks/kernel_analysis.py).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton import selective_scan as kernels

from ..launch import Launch
from ..backends import triton_interpreting

__all__ = ["scan_forward", "scan_backward", "plan_forward", "plan_backward", "launch_parts", "Part", "state_shape",
           "tiling", "Tiling"]

# Steps per chunk: the backward issues 4 row loads/stores per state and chunk, so N = 16 wants 128 steps to stay
# under one memory instruction per step; one state is cheap, and longer chunks store fewer states.
MAX_CHUNK = {False: 128, True: 256}          # keyed by N == 1
TILE = 2048                                   # (channels x steps) values per tile
PER_THREAD = 4                                # tile values per thread and array: bounds the registers (<= 128)
MIN_BLOCK_D = 16                              # below this, B/C rows are re-read by too many channel blocks


class Tiling(NamedTuple):
    block_d: int
    block_n: int
    chunk: int
    num_warps: int


def tiling(per_group: int, nstate: int, length: int) -> Tiling:
    """Channels per program, padded states, steps per chunk and warps (derived on the CPU, not GPU-tuned)."""
    odd = length % 2 == 1
    # odd L: rows are not vector-aligned, so a thread holds one step per row and the scan runs across lanes;
    # one warp's width of steps keeps it inside a warp, half the values per thread keep the registers
    chunk = min(32 if odd else MAX_CHUNK[nstate == 1], triton.next_power_of_2(length))
    tile, per_thread = (TILE // 2, PER_THREAD // 2) if odd else (TILE, PER_THREAD)
    block_d = min(triton.next_power_of_2(per_group), max(1, tile // chunk))
    padded = lambda bd: triton.cdiv(per_group, bd) * bd  # noqa: E731
    while block_d > MIN_BLOCK_D and padded(block_d // 2) < padded(block_d):
        block_d //= 2  # e.g. 48 channels: three blocks of 16, not one of 64 with 16 idle
    warps = max(1, min(16, block_d * chunk // (32 * per_thread)))
    return Tiling(block_d, triton.next_power_of_2(nstate), chunk, warps)


def state_shape(batch: int, dim: int, length: int, nstate: int) -> Tuple[int, int, int, int]:
    """Shape of the `states` tensor that `scan_forward` returns and `scan_backward` takes: the state at the
    start of every chunk but the first (which is zero)."""
    return batch, dim, triton.cdiv(length, tiling(1, nstate, length).chunk) - 1, nstate


def _accumulation(u: Tensor):
    return (torch.float64, tl.float64) if u.dtype == torch.float64 else (torch.float32, tl.float32)


def _steps_contiguous(x: Tensor) -> Tensor:
    """The kernels read along L with stride 1 (views such as torch.split of the x projection already do)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def row_alignment(*rows: Tensor) -> int:
    """Largest power of two, at most 8, dividing the element offset of every (batch, channel) row start of
    `rows` (and so of the contiguous (batch, D, L) outputs, whose rows start at multiples of L)."""
    value = 0
    for x in rows:
        value = math.gcd(value, x.storage_offset(), *x.stride()[:-1], x.shape[-1])
    return math.gcd(value, 8) if value else 8


class Part(NamedTuple):
    """What one launch scans: the B/C groups `groups` (None: all of them) of the piece `u` of u, whose first
    channel is `first`, in one direction."""
    u: Tensor
    first: int
    groups: Optional[List[int]]
    reverse: bool


def launch_parts(pieces: Sequence[Tensor], groups: int, reversed_groups: Sequence[int] = ()) -> List[Part]:
    """One launch per piece of u and direction: a single one for u in one piece scanned forward in time."""
    per_group = sum(p.shape[1] for p in pieces) // groups
    backward, parts, first = set(reversed_groups), [], 0
    for piece in pieces:
        span = range(first // per_group, (first + piece.shape[1]) // per_group)
        for reverse in (False, True):
            chosen = [g for g in span if (g in backward) == reverse]
            if chosen:
                parts.append(Part(piece, first, None if len(chosen) == groups else chosen, reverse))
        first += piece.shape[1]
    return parts


def _group_selection(groups: int, chosen: Optional[Sequence[int]]) -> Tuple[int, int]:
    """(NG, group_mask) of the kernels: the number of groups a launch scans and their bit mask."""
    if chosen is None or len(chosen) == groups:
        return groups, 0
    if max(chosen) >= 62:
        raise ValueError(f"a launch over a subset of groups needs group indices < 62, got {max(chosen)}")
    return len(chosen), sum(1 << g for g in chosen)


def _u_layout(u: Tensor) -> Tuple[Tensor, bool]:
    """The piece as the kernels read it, and whether it is token-major (channels contiguous: read as it lies)."""
    if u.stride(-1) != 1 and u.stride(1) == 1:
        return u, True
    return _steps_contiguous(u), False


def _common(part: Part, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            delta_bias: Optional[Tensor], delta_softplus: bool, *more_rows: Tensor):
    (u, tokens), (delta, B, C) = _u_layout(part.u), (_steps_contiguous(x) for x in (delta, B, C))
    batch, dim, length = delta.shape
    groups, nstate = B.shape[1], A.shape[1]
    launch_groups, group_mask = _group_selection(groups, part.groups)
    tiles = tiling(dim // groups, nstate, length)
    nchunk = triton.cdiv(length, tiles.chunk)
    torch_acc, tl_acc = _accumulation(u)
    meta = dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), ACC=tl_acc,
                BLOCK_D=tiles.block_d, BLOCK_N=tiles.block_n, CHUNK=tiles.chunk,
                ALIGN=row_alignment(*([] if tokens else [u]), delta, *more_rows), REVERSE=part.reverse,
                U_TOKENS=tokens, num_warps=tiles.num_warps)
    nblock = triton.cdiv(dim // groups, tiles.block_d)
    sizes = (length, groups, dim // groups, nstate, nchunk)
    strides = (u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), A.stride(0),
               *B.stride()[:3], *C.stride()[:3])
    return (u, delta, B, C), (batch * launch_groups, nblock), sizes, (launch_groups, group_mask, part.first), \
        strides, meta, torch_acc


def plan_forward(part: Part, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 delta_bias: Optional[Tensor], delta_softplus: bool,
                 out: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Launch, Tensor, Tensor]:
    """The forward launch of `part`, and its outputs y (batch, D, L) in the accumulation dtype and the chunk
    states (allocated, or `out` = (y, states) of another part's launch)."""
    (u, delta, B, C), grid, sizes, selection, strides, meta, torch_acc = _common(
        part, delta, A, B, C, D, delta_bias, delta_softplus)
    y, states = out if out is not None else (
        torch.empty(delta.shape, device=u.device, dtype=torch_acc),
        torch.empty(state_shape(*delta.shape, A.shape[1]), device=u.device, dtype=torch_acc))
    args = (u, delta, A, B, C, D, delta_bias, y, states, *sizes, *selection, *strides)
    return Launch(kernels.scan_fwd_kernel, grid, args, meta), y, states


def plan_backward(part: Part, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  delta_bias: Optional[Tensor], delta_softplus: bool, dy: Tensor, states: Tensor,
                  out: Optional[Tuple[Tensor, ...]] = None) -> Tuple[Launch, Tuple[Tensor, ...]]:
    """The backward launch of `part` and the buffers it fills (allocated, or `out`, those of another part's
    launch): du (batch, D, L) for the whole of u, ddelta, and the partials of dA, dB, dC, dD, dbias."""
    dy = _steps_contiguous(dy)
    (u, delta, B, C), grid, sizes, selection, strides, meta, torch_acc = _common(
        part, delta, A, B, C, D, delta_bias, delta_softplus, dy)
    batch, dim, length = delta.shape
    groups, nblock = B.shape[1], grid[1]
    dev = u.device
    length_, groups_, per_group, nstate, nchunk = sizes
    args = lambda *buffers: (u, delta, A, B, C, D, delta_bias, dy, states, *buffers,  # noqa: E731
                             length_, groups_, per_group, nstate, nchunk, nblock, *selection, *strides,
                             dy.stride(0), dy.stride(1))
    if out is not None:
        return Launch(kernels.scan_bwd_kernel, grid, args(*out), meta), out
    du = torch.empty(delta.shape, device=dev, dtype=u.dtype)
    ddelta = torch.empty(delta.shape, device=dev, dtype=delta.dtype)
    dA = torch.empty(batch, dim, A.shape[1], device=dev, dtype=torch_acc)
    # one channel block per group: its rows are the whole sum, written in B's / C's dtype
    parts = (1, B.dtype, C.dtype) if nblock == 1 else (nblock, torch_acc, torch_acc)
    dB = torch.empty(batch, groups, parts[0], A.shape[1], length, device=dev, dtype=parts[1])
    dC = torch.empty(batch, groups, parts[0], A.shape[1], length, device=dev, dtype=parts[2])
    dD = torch.empty(batch, dim, device=dev, dtype=torch_acc)
    dbias = torch.empty_like(dD)
    buffers = (du, ddelta, dA, dB, dC, dD, dbias)
    return Launch(kernels.scan_bwd_kernel, grid, args(*buffers), meta), buffers


def scan_forward(u: Sequence[Tensor], delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 delta_bias: Optional[Tensor], delta_softplus: bool, reversed_groups: Sequence[int] = ()
                 ) -> Tuple[Tensor, Tensor]:
    """y (batch, D, L) in the accumulation dtype, and the chunk start states for `scan_backward`; u is given
    in pieces along D (read where they are)."""
    out = None
    for part in launch_parts(u, B.shape[1], reversed_groups):
        launch, y, states = plan_forward(part, delta, A, B, C, D, delta_bias, delta_softplus, out)
        launch.launch()
        out = y, states
    return out


def scan_backward(u: Sequence[Tensor], delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  delta_bias: Optional[Tensor], delta_softplus: bool, dy: Tensor, states: Tensor,
                  reversed_groups: Sequence[int] = ()) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype (du (batch, D, L) for the whole of
    u; dD, ddelta_bias in the accumulation dtype when D, delta_bias are None)."""
    out = None
    for part in launch_parts(u, B.shape[1], reversed_groups):
        launch, out = plan_backward(part, delta, A, B, C, D, delta_bias, delta_softplus, dy, states, out)
        launch.launch()
    du, ddelta, dA, dB, dC, dD, dbias = out
    acc = dA.dtype
    # second pass: add the per-block / per-batch partials in a fixed order (deterministic)
    dB = dB.sum(2).to(B.dtype) if dB.shape[2] > 1 else dB.squeeze(2)
    dC = dC.sum(2).to(C.dtype) if dC.shape[2] > 1 else dC.squeeze(2)
    return (du, ddelta, dA.sum(0).to(A.dtype), dB, dC, dD.sum(0).to(D.dtype if D is not None else acc),
            dbias.sum(0).to(delta_bias.dtype if delta_bias is not None else acc))


def _scan_by_doubling(self, input):
    """Triton's interpreter folds a tl.associative_scan with a user combine one element at a time in Python
    (about 2,000 combine calls for one (16, 128) tile). This computes the same inclusive scan by recursive
    doubling (x_i <- x_{i-s} . x_i for s = 1, 2, 4, ..., log2(steps) combine calls on whole arrays); the
    combine is associative, so only the rounding order changes, as it does on the GPU's tree scan."""
    axis = self.axis
    data = [np.moveaxis(x.handle.data, axis, 0) for x in input]
    length, shift = data[0].shape[0], 1
    while shift < length:
        # block shapes must stay powers of two: combine all positions with a shifted copy, keep i >= shift
        left = [self.to_tensor(np.concatenate([x[:shift], x[:-shift]]), t.dtype) for x, t in zip(data, input)]
        res = self.combine_fn.fn(*left, *(self.to_tensor(x, t.dtype) for x, t in zip(data, input)))
        res = res if isinstance(res, tuple) else (res,)
        data = [np.concatenate([x[:shift], np.broadcast_to(r.handle.data, x.shape)[shift:]]) for x, r in zip(data, res)]
        shift *= 2
    return [self.to_tensor(np.moveaxis(x, 0, axis), t.dtype) for x, t in zip(data, input)]


if triton_interpreting():
    from triton.runtime import interpreter as _interpreter

    if hasattr(getattr(_interpreter, "ScanOps", None), "generic_scan"):
        _interpreter.ScanOps.generic_scan = _scan_by_doubling
