"""Triton kernels of DAMamba's dynamic adaptive sampling (models/ops/adaptive), forward and backward.

For batch b, channel c of offset group g = c // S (S channels per group) and pixel n = i * W + j:

    out[b, c, n] = sample(x[b, c], (i + dy, j + dx)),   (dx, dy) = (off[b, n, 2g], off[b, n, 2g + 1])

`sample` is bilinear at pixel coordinates (pixel centres at integers: grid_sample's align_corners=False
convention once the offsets are added), zeros outside the map, a non-finite coordinate reading the clamped
neighbour with a NaN weight; the stencil helpers are those of the deformable sequence
(kernels/triton/deformable.py), which take pixel coordinates. A map one pixel high or wide needs no special
case here (the neighbour outside has weight 0).

A program owns one (batch, group) pair and BLOCK_N pixels and loops over the group's channels, BLOCK_C at a
time, so the backward's offset gradient (the channel sum over the group of grad * d sample / d offset) needs
no atomics; dx is scattered with atomics into the 4 neighbours of every pixel (within one batch element's
map: summation order not fixed on a GPU). x is read through its strides (contiguous or channels-last), dx
shares them; out / dout are contiguous (B, C, H*W); off / doff contiguous (B, H*W, 2G). Arithmetic is in
ACC (fp32, fp64 for fp64 callers). Launch: grid (B * G, cdiv(H*W, BLOCK_N)); host side
models/ops/adaptive/triton.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .deformable import gather, point_stencil, scatter_and_reduce, store_point_grad

__all__ = ["adaptive_sample_fwd_kernel", "adaptive_sample_bwd_kernel"]


@triton.jit
def _pixel_point(off_ptr, row, slots, smask, width, groups, g, ACC: tl.constexpr):
    """Pixel coordinates (i + dy, j + dx) of group g's sample points for pixels `slots` of row (b * H*W + n)."""
    base = off_ptr + row * (2 * groups) + 2 * g
    dx = tl.load(base, mask=smask, other=0.0).to(ACC)
    dy = tl.load(base + 1, mask=smask, other=0.0).to(ACC)
    return (slots // width).to(ACC) + dy, (slots % width).to(ACC) + dx


@triton.jit
def _program_stencil(off_ptr, groups, height, width, stride_h, stride_w, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch b, group g, pixels (slots, their mask, their rows b * H*W + n) and the bilinear
    stencil (neighbour offsets, weights) at group g's sample points."""
    b = (tl.program_id(0) // groups).to(tl.int64)
    g = tl.program_id(0) % groups
    slots = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    smask = slots < height * width
    row = b * (height * width) + slots
    qy, qx = _pixel_point(off_ptr, row, slots, smask, width, groups, g, ACC)
    i00, i01, i10, i11, w00, w01, w10, w11 = point_stencil(qy, qx, height, width, stride_h, stride_w)
    return b, g, slots, smask, row, i00, i01, i10, i11, w00, w01, w10, w11


@triton.jit
def adaptive_sample_fwd_kernel(
        x_ptr, off_ptr, out_ptr, channels, groups, height, width, stride_b, stride_c, stride_h, stride_w,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """out (B, C, H*W) = x (B, C, H, W) sampled per channel group at its pixel offsets."""
    (b, g, slots, smask, row, i00, i01, i10, i11,
     w00, w01, w10, w11) = _program_stencil(off_ptr, groups, height, width, stride_h, stride_w, ACC, BLOCK_N)
    per_group = channels // groups
    length = height * width
    for c0 in range(0, per_group, BLOCK_C):
        ch = g * per_group + c0 + tl.arange(0, BLOCK_C)
        mask = (c0 + tl.arange(0, BLOCK_C) < per_group)[:, None] & smask[None, :]
        value = gather(x_ptr + b * stride_b + ch[:, None] * stride_c, i00, i01, i10, i11,
                       w00, w01, w10, w11, mask, ACC)
        out = out_ptr + (b * channels + ch[:, None]) * length + slots[None, :]
        tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adaptive_sample_bwd_kernel(
        dout_ptr, x_ptr, off_ptr, dx_ptr, doff_ptr, channels, groups, height, width,
        stride_b, stride_c, stride_h, stride_w,
        NEED_X: tl.constexpr, NEED_OFF: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adjoint of the forward kernel: dx (x's strides) a zero-filled ACC buffer, doff (B, H*W, 2G)."""
    (b, g, slots, smask, row, i00, i01, i10, i11,
     w00, w01, w10, w11) = _program_stencil(off_ptr, groups, height, width, stride_h, stride_w, ACC, BLOCK_N)
    per_group = channels // groups
    length = height * width
    g00 = tl.full([BLOCK_N], 0.0, ACC)
    g01 = tl.full([BLOCK_N], 0.0, ACC)
    g10 = tl.full([BLOCK_N], 0.0, ACC)
    g11 = tl.full([BLOCK_N], 0.0, ACC)
    for c0 in range(0, per_group, BLOCK_C):
        ch = g * per_group + c0 + tl.arange(0, BLOCK_C)
        mask = (c0 + tl.arange(0, BLOCK_C) < per_group)[:, None] & smask[None, :]
        grad = tl.load(dout_ptr + (b * channels + ch[:, None]) * length + slots[None, :], mask=mask,
                       other=0.0).to(ACC)
        rows = b * stride_b + ch[:, None] * stride_c  # x and dx share strides
        a00, a01, a10, a11 = scatter_and_reduce(x_ptr + rows, dx_ptr + rows, grad, i00, i01, i10, i11,
                                                w00, w01, w10, w11, mask, NEED_X, NEED_OFF, ACC, BLOCK_N)
        g00 += a00
        g01 += a01
        g10 += a10
        g11 += a11
    if NEED_OFF:
        qy, qx = _pixel_point(off_ptr, row, slots, smask, width, groups, g, ACC)
        dbase = doff_ptr + row * (2 * groups) + 2 * g
        # offsets are in pixels: the point -> pixel map has scale 1
        store_point_grad(dbase + 1, dbase, smask, qy, qx, height, width, g00, g01, g10, g11, 1.0, 1.0)
