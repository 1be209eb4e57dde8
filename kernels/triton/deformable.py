"""Triton kernels of the deformable branch's token sequence (fused point offset + offset bias + index-offset sort).

For batch b, sequence slot n and channel c, with token t = perm[b, n]:

    seq[b, c, n] = sample(x[b, c], pos[b, t]) + sample(table[c], disp[b, t])

`sample` is bilinear with the conventions of models/ops/deform/bilinear.py: normalised (y, x) coordinates,
align-corners (-1 / +1 are the centres of the first / last pixel), zeros outside the image; a non-finite
coordinate reads the clamped neighbour with a NaN weight so NaN reaches the loss. `table` is the offset-bias
table already resized to the feature resolution (a fixed linear map applied on the host); x is read through
its strides (contiguous or channels-last), dx shares them. All arithmetic is in ACC (fp32, or fp64 for fp64
callers); `seq` is stored in its own dtype (the one the scan reads).

The backward kernel runs over the same (batch, slot) tiles, loops over channels and produces

    dx      scattered with atomics (4 neighbours per slot; summation order is not fixed on a GPU)
    dtable  gradient of the resized table, scattered with atomics, summed over the batch
    dpos, ddisp   channel-summed products of the gradient and the neighbour values (a program owns its tokens:
                  plain stores)
    mean    mean_c dseq[b, :, n], stored at slot n and at token perm[b, n]; the host forms the index-offset
            surrogate dpath = mean_at_slot - mean_at_token (see models/ops/deform/index_offset.py)

Device code only: the host side lives in models/ops/deform/triton.py. Launch: grid (B, cdiv(N, BLOCK_N)).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["deformable_sequence_fwd_kernel", "deformable_sequence_bwd_kernel"]


@triton.jit
def _axis(p, size, scale, ACC: tl.constexpr):
    """One axis of the bilinear stencil: fraction, validity and clamped index of the two neighbours."""
    q = (p.to(ACC) + 1) * scale
    q0 = tl.floor(q)
    frac = q - q0
    q1 = q0 + 1
    valid0 = ((q0 >= 0) & (q0 <= size - 1)).to(ACC)
    valid1 = ((q1 >= 0) & (q1 <= size - 1)).to(ACC)
    # NaN -> 0 before clamping (as nan_to_num); +-inf clamp to the border
    q0 = tl.where(q0 != q0, 0.0, q0)
    q1 = tl.where(q1 != q1, 0.0, q1)
    i0 = tl.minimum(tl.maximum(q0, 0.0), size - 1.0).to(tl.int32)
    i1 = tl.minimum(tl.maximum(q1, 0.0), size - 1.0).to(tl.int32)
    return frac, valid0, valid1, i0, i1


@triton.jit
def _stencil(ptr, row, smask, height, width, scale_y, scale_x, stride_h, stride_w, ACC: tl.constexpr):
    """Neighbour offsets (y * stride_h + x * stride_w), weights and weight derivatives for points ptr[row] = (y, x)."""
    py = tl.load(ptr + row * 2, mask=smask, other=0.0)
    px = tl.load(ptr + row * 2 + 1, mask=smask, other=0.0)
    fy, vy0, vy1, y0, y1 = _axis(py, height, scale_y, ACC)
    fx, vx0, vx1, x0, x1 = _axis(px, width, scale_x, ACC)
    gy, gx = 1 - fy, 1 - fx
    v00, v01, v10, v11 = vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1
    y0, y1, x0, x1 = y0 * stride_h, y1 * stride_h, x0 * stride_w, x1 * stride_w
    i00, i01, i10, i11 = y0 + x0, y0 + x1, y1 + x0, y1 + x1
    w00, w01, w10, w11 = gy * gx * v00, gy * fx * v01, fy * gx * v10, fy * fx * v11
    # d weight / d y_pixel and d x_pixel (signs: lower neighbour -1, upper +1)
    dy00, dy01, dy10, dy11 = -gx * v00, -fx * v01, gx * v10, fx * v11
    dx00, dx01, dx10, dx11 = -gy * v00, gy * v01, -fy * v10, fy * v11
    return (i00, i01, i10, i11, w00, w01, w10, w11,
            dy00, dy01, dy10, dy11, dx00, dx01, dx10, dx11)


@triton.jit
def _sample(base, i00, i01, i10, i11, w00, w01, w10, w11, mask, ACC: tl.constexpr):
    """Bilinear sum over a (BLOCK_C, BLOCK_N) tile; base holds one row pointer per channel."""
    out = tl.load(base + i00[None, :], mask=mask, other=0.0).to(ACC) * w00[None, :]
    out += tl.load(base + i01[None, :], mask=mask, other=0.0).to(ACC) * w01[None, :]
    out += tl.load(base + i10[None, :], mask=mask, other=0.0).to(ACC) * w10[None, :]
    out += tl.load(base + i11[None, :], mask=mask, other=0.0).to(ACC) * w11[None, :]
    return out


@triton.jit
def deformable_sequence_fwd_kernel(
        x_ptr, pos_ptr, table_ptr, disp_ptr, perm_ptr, seq_ptr,
        channels, height, width, scale_y, scale_x, stride_b, stride_c, stride_h, stride_w,
        HAS_TABLE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """x (B, C, H, W) with the given strides; pos/disp (B, N, 2), table (C, H*W) resized, perm (B, N) and
    seq (B, C, N) contiguous."""
    b = tl.program_id(0).to(tl.int64)
    length = height * width
    slots = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    smask = slots < length
    token = tl.load(perm_ptr + b * length + slots, mask=smask, other=0)
    row = b * length + token
    (i00, i01, i10, i11, w00, w01, w10, w11,
     _a, _b, _c, _d, _e, _f, _g, _h) = _stencil(pos_ptr, row, smask, height, width, scale_y, scale_x,
                                                stride_h, stride_w, ACC)
    if HAS_TABLE:
        (j00, j01, j10, j11, u00, u01, u10, u11,
         _a, _b, _c, _d, _e, _f, _g, _h) = _stencil(disp_ptr, row, smask, height, width, scale_y, scale_x,
                                                width, 1, ACC)
    for c0 in range(0, channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        mask = (ch < channels)[:, None] & smask[None, :]
        value = _sample(x_ptr + b * stride_b + ch[:, None] * stride_c, i00, i01, i10, i11,
                        w00, w01, w10, w11, mask, ACC)
        if HAS_TABLE:
            value += _sample(table_ptr + ch[:, None] * length, j00, j01, j10, j11,
                             u00, u01, u10, u11, mask, ACC)
        out = seq_ptr + (b * channels + ch[:, None]) * length + slots[None, :]
        tl.store(out, value.to(seq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adjoint(base, dbase, grad, i00, i01, i10, i11, w00, w01, w10, w11, mask,
             NEED_SRC: tl.constexpr, NEED_POS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scatter grad * weight into the source gradient; return this tile's contribution to d y_pixel, d x_pixel."""
    if NEED_SRC:
        tl.atomic_add(dbase + i00[None, :], grad * w00[None, :], mask=mask)
        tl.atomic_add(dbase + i01[None, :], grad * w01[None, :], mask=mask)
        tl.atomic_add(dbase + i10[None, :], grad * w10[None, :], mask=mask)
        tl.atomic_add(dbase + i11[None, :], grad * w11[None, :], mask=mask)
    # tl.full, not tl.zeros: the library's @jit helpers fail in the interpreter when triton was imported first
    gv00 = tl.full([BLOCK_N], 0.0, ACC)
    gv01 = tl.full([BLOCK_N], 0.0, ACC)
    gv10 = tl.full([BLOCK_N], 0.0, ACC)
    gv11 = tl.full([BLOCK_N], 0.0, ACC)
    if NEED_POS:
        gv00 = tl.sum(grad * tl.load(base + i00[None, :], mask=mask, other=0.0).to(ACC), 0)
        gv01 = tl.sum(grad * tl.load(base + i01[None, :], mask=mask, other=0.0).to(ACC), 0)
        gv10 = tl.sum(grad * tl.load(base + i10[None, :], mask=mask, other=0.0).to(ACC), 0)
        gv11 = tl.sum(grad * tl.load(base + i11[None, :], mask=mask, other=0.0).to(ACC), 0)
    return gv00, gv01, gv10, gv11


@triton.jit
def _store_point_grad(dptr, row, smask, gv00, gv01, gv10, gv11,
                      dy00, dy01, dy10, dy11, dx00, dx01, dx10, dx11, scale_y, scale_x):
    """d pos (y, x) = sum over neighbours of (channel-summed grad * value) * d weight, to normalised units."""
    dpy = gv00 * dy00 + gv01 * dy01 + gv10 * dy10 + gv11 * dy11
    dpx = gv00 * dx00 + gv01 * dx01 + gv10 * dx10 + gv11 * dx11
    tl.store(dptr + row * 2, (dpy * scale_y).to(dptr.dtype.element_ty), mask=smask)
    tl.store(dptr + row * 2 + 1, (dpx * scale_x).to(dptr.dtype.element_ty), mask=smask)


@triton.jit
def deformable_sequence_bwd_kernel(
        dseq_ptr, x_ptr, pos_ptr, table_ptr, disp_ptr, perm_ptr,
        dx_ptr, dpos_ptr, dtable_ptr, ddisp_ptr, mean_slot_ptr, mean_token_ptr,
        channels, height, width, scale_y, scale_x, stride_b, stride_c, stride_h, stride_w,
        HAS_TABLE: tl.constexpr, NEED_X: tl.constexpr, NEED_POS: tl.constexpr, NEED_TABLE: tl.constexpr,
        NEED_DISP: tl.constexpr, NEED_PATH: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adjoint of the forward kernel; dx (x's strides) and dtable (C, H*W) must be zero-filled ACC buffers."""
    b = tl.program_id(0).to(tl.int64)
    length = height * width
    slots = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    smask = slots < length
    token = tl.load(perm_ptr + b * length + slots, mask=smask, other=0)
    row = b * length + token
    (i00, i01, i10, i11, w00, w01, w10, w11,
     dy00, dy01, dy10, dy11, dx00, dx01, dx10, dx11) = _stencil(pos_ptr, row, smask, height, width,
                                                                 scale_y, scale_x, stride_h, stride_w, ACC)
    if HAS_TABLE:
        (j00, j01, j10, j11, u00, u01, u10, u11,
         ey00, ey01, ey10, ey11, ex00, ex01, ex10, ex11) = _stencil(disp_ptr, row, smask, height, width,
                                                                     scale_y, scale_x, width, 1, ACC)
    gx00 = tl.full([BLOCK_N], 0.0, ACC)
    gx01 = tl.full([BLOCK_N], 0.0, ACC)
    gx10 = tl.full([BLOCK_N], 0.0, ACC)
    gx11 = tl.full([BLOCK_N], 0.0, ACC)
    gt00 = tl.full([BLOCK_N], 0.0, ACC)
    gt01 = tl.full([BLOCK_N], 0.0, ACC)
    gt10 = tl.full([BLOCK_N], 0.0, ACC)
    gt11 = tl.full([BLOCK_N], 0.0, ACC)
    gsum = tl.full([BLOCK_N], 0.0, ACC)
    for c0 in range(0, channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        mask = (ch < channels)[:, None] & smask[None, :]
        grad = tl.load(dseq_ptr + (b * channels + ch[:, None]) * length + slots[None, :], mask=mask,
                       other=0.0).to(ACC)
        rows = b * stride_b + ch[:, None] * stride_c  # x and dx share strides
        a00, a01, a10, a11 = _adjoint(x_ptr + rows, dx_ptr + rows, grad, i00, i01, i10, i11,
                                      w00, w01, w10, w11, mask, NEED_X, NEED_POS, ACC, BLOCK_N)
        gx00 += a00
        gx01 += a01
        gx10 += a10
        gx11 += a11
        if HAS_TABLE:
            trows = ch[:, None] * length
            t00, t01, t10, t11 = _adjoint(table_ptr + trows, dtable_ptr + trows, grad, j00, j01, j10, j11,
                                          u00, u01, u10, u11, mask, NEED_TABLE, NEED_DISP, ACC, BLOCK_N)
            gt00 += t00
            gt01 += t01
            gt10 += t10
            gt11 += t11
        if NEED_PATH:
            gsum += tl.sum(grad, 0)
    if NEED_POS:
        _store_point_grad(dpos_ptr, row, smask, gx00, gx01, gx10, gx11,
                          dy00, dy01, dy10, dy11, dx00, dx01, dx10, dx11, scale_y, scale_x)
    if HAS_TABLE:
        if NEED_DISP:
            _store_point_grad(ddisp_ptr, row, smask, gt00, gt01, gt10, gt11,
                              ey00, ey01, ey10, ey11, ex00, ex01, ex10, ex11, scale_y, scale_x)
    if NEED_PATH:
        mean = gsum / channels
        tl.store(mean_slot_ptr + b * length + slots, mean, mask=smask)
        tl.store(mean_token_ptr + row, mean, mask=smask)
