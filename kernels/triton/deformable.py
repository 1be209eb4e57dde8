"""Triton kernels of the deformable branch's token sequence (fused point offset + offset bias + index-offset sort).

For batch b, sequence slot n and channel c, with token t = perm[b, n]:

    seq[b, c, n] = sample(x[b, c], pos[b, t]) + sample(table[c], disp[b, t])

`sample` is bilinear with the conventions of models/ops/deform/bilinear.py: normalised (y, x) coordinates,
align-corners (-1 / +1 are the centres of the first / last pixel), zeros outside the image; a non-finite
coordinate reads the clamped neighbour with a NaN weight so NaN reaches the loss. `table` is the offset-bias
table already resized to the feature resolution (a fixed linear map applied on the host); x is read through
its strides (contiguous or channels-last), dx shares them. All arithmetic is in ACC (fp32, or fp64 for fp64
callers); `seq` is stored in its own dtype (the one the scan reads).

The backward is one adjoint kernel, `deformable_sample_bwd_kernel`, launched once per sampled source (x at pos,
then the table at disp) over the same (batch, slot) tiles; it loops over channels and produces

    dsrc    grad * weight scattered with atomics into 4 neighbours per slot (order not fixed on a GPU)
    dpoint  channel-summed products of the gradient and the neighbour values (a program owns its tokens:
            plain stores)
    mean    (first launch) mean_c dseq[b, :, n], stored at slot n and at token perm[b, n]; the host forms the
            index-offset surrogate dpath = mean_at_slot - mean_at_token (see models/ops/deform/index_offset.py)

Two launches instead of one fused pass keep one stencil live per program: the fused backward held both
stencils, their weight derivatives and eight accumulators through the channel loop (255 registers at
4 warps on sm_90). The weight derivatives are recomputed from the reloaded point after the loop for the same
reason. The table is shared by the batch; its gradient goes to per-batch partials dsrc[b] (batch stride
C*H*W), so a program's atomics only meet those of the other slot tiles of its own batch element (neighbouring
tokens), never the whole batch's, and the host sums the partials over the batch in a fixed order (one
torch.sum), which also makes the batch reduction deterministic. The price is one (B, C, H*W) ACC buffer,
the size of dx.

Device code only: the host side lives in models/ops/deform/triton.py. Launch: grid (B, cdiv(N, BLOCK_N)).
The stencil helpers (`point_stencil`, `corner_slopes`, `gather`, `scatter_and_reduce`) take pixel coordinates
and are shared with DAMamba's adaptive sampling (kernels/triton/adaptive.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["deformable_sequence_fwd_kernel", "deformable_sample_bwd_kernel", "point_stencil", "corner_slopes",
           "gather", "scatter_and_reduce", "store_point_grad"]


@triton.jit
def _axis(q, size):
    """One axis at pixel coordinate q (ACC): fraction, validity and clamped index of the two neighbours."""
    q0 = tl.floor(q)
    frac = q - q0
    q1 = q0 + 1
    valid0 = ((q0 >= 0) & (q0 <= size - 1)).to(q.dtype)
    valid1 = ((q1 >= 0) & (q1 <= size - 1)).to(q.dtype)
    # NaN -> 0 before clamping (as nan_to_num); +-inf clamp to the border
    q0 = tl.where(q0 != q0, 0.0, q0)
    q1 = tl.where(q1 != q1, 0.0, q1)
    i0 = tl.minimum(tl.maximum(q0, 0.0), size - 1.0).to(tl.int32)
    i1 = tl.minimum(tl.maximum(q1, 0.0), size - 1.0).to(tl.int32)
    return frac, valid0, valid1, i0, i1


@triton.jit
def point_stencil(qy, qx, height, width, stride_h, stride_w):
    """Neighbour offsets (y * stride_h + x * stride_w) and bilinear weights at pixel coordinates (qy, qx)."""
    fy, vy0, vy1, y0, y1 = _axis(qy, height)
    fx, vx0, vx1, x0, x1 = _axis(qx, width)
    gy, gx = 1 - fy, 1 - fx
    y0, y1, x0, x1 = y0 * stride_h, y1 * stride_h, x0 * stride_w, x1 * stride_w
    return (y0 + x0, y0 + x1, y1 + x0, y1 + x1,
            gy * gx * vy0 * vx0, gy * fx * vy0 * vx1, fy * gx * vy1 * vx0, fy * fx * vy1 * vx1)


@triton.jit
def corner_slopes(qy, qx, height, width):
    """d weight / d qy and d weight / d qx of the four neighbours (signs: lower neighbour -1, upper +1)."""
    fy, vy0, vy1, _y0, _y1 = _axis(qy, height)
    fx, vx0, vx1, _x0, _x1 = _axis(qx, width)
    gy, gx = 1 - fy, 1 - fx
    v00, v01, v10, v11 = vy0 * vx0, vy0 * vx1, vy1 * vx0, vy1 * vx1
    return (-gx * v00, -fx * v01, gx * v10, fx * v11,
            -gy * v00, gy * v01, -fy * v10, fy * v11)


@triton.jit
def _normalised_point(ptr, row, smask, scale_y, scale_x, ACC: tl.constexpr):
    """Pixel coordinates of the normalised (y, x) points ptr[row] (align corners: q = (p + 1) * (size - 1) / 2)."""
    py = tl.load(ptr + row * 2, mask=smask, other=0.0).to(ACC)
    px = tl.load(ptr + row * 2 + 1, mask=smask, other=0.0).to(ACC)
    return (py + 1) * scale_y, (px + 1) * scale_x


@triton.jit
def gather(base, i00, i01, i10, i11, w00, w01, w10, w11, mask, ACC: tl.constexpr):
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
    qy, qx = _normalised_point(pos_ptr, row, smask, scale_y, scale_x, ACC)
    i00, i01, i10, i11, w00, w01, w10, w11 = point_stencil(qy, qx, height, width, stride_h, stride_w)
    if HAS_TABLE:
        ty, tx = _normalised_point(disp_ptr, row, smask, scale_y, scale_x, ACC)
        j00, j01, j10, j11, u00, u01, u10, u11 = point_stencil(ty, tx, height, width, width, 1)
    for c0 in range(0, channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        mask = (ch < channels)[:, None] & smask[None, :]
        value = gather(x_ptr + b * stride_b + ch[:, None] * stride_c, i00, i01, i10, i11,
                       w00, w01, w10, w11, mask, ACC)
        if HAS_TABLE:
            value += gather(table_ptr + ch[:, None] * length, j00, j01, j10, j11, u00, u01, u10, u11, mask, ACC)
        out = seq_ptr + (b * channels + ch[:, None]) * length + slots[None, :]
        tl.store(out, value.to(seq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scatter_and_reduce(base, dbase, grad, i00, i01, i10, i11, w00, w01, w10, w11, mask,
                       NEED_SRC: tl.constexpr, NEED_POINT: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Scatter grad * weight into the source gradient; return this tile's channel sums of grad * neighbour."""
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
    if NEED_POINT:
        gv00 = tl.sum(grad * tl.load(base + i00[None, :], mask=mask, other=0.0).to(ACC), 0)
        gv01 = tl.sum(grad * tl.load(base + i01[None, :], mask=mask, other=0.0).to(ACC), 0)
        gv10 = tl.sum(grad * tl.load(base + i10[None, :], mask=mask, other=0.0).to(ACC), 0)
        gv11 = tl.sum(grad * tl.load(base + i11[None, :], mask=mask, other=0.0).to(ACC), 0)
    return gv00, gv01, gv10, gv11


@triton.jit
def store_point_grad(ptr_y, ptr_x, smask, qy, qx, height, width, gv00, gv01, gv10, gv11, scale_y, scale_x):
    """d point (y, x) = sum over neighbours of (channel-summed grad * value) * d weight, times the scales
    of the point -> pixel map; the slopes are recomputed here so they are not live during the channel loop."""
    dy00, dy01, dy10, dy11, dx00, dx01, dx10, dx11 = corner_slopes(qy, qx, height, width)
    dpy = gv00 * dy00 + gv01 * dy01 + gv10 * dy10 + gv11 * dy11
    dpx = gv00 * dx00 + gv01 * dx01 + gv10 * dx10 + gv11 * dx11
    tl.store(ptr_y, (dpy * scale_y).to(ptr_y.dtype.element_ty), mask=smask)
    tl.store(ptr_x, (dpx * scale_x).to(ptr_x.dtype.element_ty), mask=smask)


@triton.jit
def deformable_sample_bwd_kernel(
        dseq_ptr, src_ptr, point_ptr, perm_ptr, dsrc_ptr, dpoint_ptr, mean_slot_ptr, mean_token_ptr,
        channels, height, width, scale_y, scale_x, src_stride_b, dsrc_stride_b, stride_c, stride_h, stride_w,
        NEED_SRC: tl.constexpr, NEED_POINT: tl.constexpr, NEED_PATH: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adjoint of one sample term of the forward: src (B or shared, C, H, W) read through src_stride_b (0 for
    the table) and the channel / pixel strides, which dsrc shares but for its batch stride; dsrc a zero-filled
    ACC buffer, dpoint (B, N, 2)."""
    b = tl.program_id(0).to(tl.int64)
    length = height * width
    slots = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    smask = slots < length
    token = tl.load(perm_ptr + b * length + slots, mask=smask, other=0)
    row = b * length + token
    qy, qx = _normalised_point(point_ptr, row, smask, scale_y, scale_x, ACC)
    i00, i01, i10, i11, w00, w01, w10, w11 = point_stencil(qy, qx, height, width, stride_h, stride_w)
    g00 = tl.full([BLOCK_N], 0.0, ACC)
    g01 = tl.full([BLOCK_N], 0.0, ACC)
    g10 = tl.full([BLOCK_N], 0.0, ACC)
    g11 = tl.full([BLOCK_N], 0.0, ACC)
    gsum = tl.full([BLOCK_N], 0.0, ACC)
    for c0 in range(0, channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        mask = (ch < channels)[:, None] & smask[None, :]
        grad = tl.load(dseq_ptr + (b * channels + ch[:, None]) * length + slots[None, :], mask=mask,
                       other=0.0).to(ACC)
        a00, a01, a10, a11 = scatter_and_reduce(src_ptr + b * src_stride_b + ch[:, None] * stride_c,
                                                dsrc_ptr + b * dsrc_stride_b + ch[:, None] * stride_c, grad,
                                                i00, i01, i10, i11, w00, w01, w10, w11, mask,
                                                NEED_SRC, NEED_POINT, ACC, BLOCK_N)
        g00 += a00
        g01 += a01
        g10 += a10
        g11 += a11
        if NEED_PATH:
            gsum += tl.sum(grad, 0)
    if NEED_POINT:
        qy, qx = _normalised_point(point_ptr, row, smask, scale_y, scale_x, ACC)
        store_point_grad(dpoint_ptr + row * 2, dpoint_ptr + row * 2 + 1, smask, qy, qx, height, width,
                         g00, g01, g10, g11, scale_y, scale_x)
    if NEED_PATH:
        mean = gsum / channels
        tl.store(mean_slot_ptr + b * length + slots, mean, mask=smask)
        tl.store(mean_token_ptr + row, mean, mask=smask)
