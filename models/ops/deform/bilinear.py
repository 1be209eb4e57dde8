"""Bilinear sampling primitives shared by the point-offset and offset-bias operations.

Positions are normalised (y, x) pairs in [-1, 1] with align-corners semantics (-1 is the centre of the
first pixel, +1 the centre of the last) and zero padding outside the image, i.e. the convention of
`F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=True)` except that the last
dimension is ordered (y, x). Written out with gathers so the backward can be hand-written.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..precision import to_accumulation


class Corners(NamedTuple):
    """The four neighbours of every sample point, flattened over the image."""
    index: List[Tensor]   # 4 x (B, P) int64 indices into H*W (clamped; see `valid`)
    weight: List[Tensor]  # 4 x (B, P) bilinear weights, zero where the neighbour is outside
    dwy: List[Tensor]     # 4 x (B, P) d weight / d y_pixel
    dwx: List[Tensor]     # 4 x (B, P) d weight / d x_pixel


def _corners(pos: Tensor, height: int, width: int) -> Corners:
    """Neighbour indices and weights for `pos` (B, P, 2) in normalised (y, x) coordinates."""
    py = (to_accumulation(pos[..., 0]) + 1) * (0.5 * (height - 1))
    px = (to_accumulation(pos[..., 1]) + 1) * (0.5 * (width - 1))
    y0, x0 = py.floor(), px.floor()
    fy, fx = py - y0, px - x0
    index, weight, dwy, dwx = [], [], [], []
    for oy in (0, 1):
        yy = y0 + oy
        wy = fy if oy else 1 - fy
        sy = 1.0 if oy else -1.0
        for ox in (0, 1):
            xx = x0 + ox
            wx = fx if ox else 1 - fx
            sx = 1.0 if ox else -1.0
            valid = ((yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)).float()
            # non-finite positions (a diverged run) read pixel 0 with a NaN weight, so NaN reaches the loss
            index.append((yy.nan_to_num(0.0).clamp(0, height - 1) * width
                          + xx.nan_to_num(0.0).clamp(0, width - 1)).long())
            weight.append(wy * wx * valid)
            dwy.append(sy * wx * valid)
            dwx.append(sx * wy * valid)
    return Corners(index, weight, dwy, dwx)


def _gather(src: Tensor, index: Tensor, batch: int) -> Tensor:
    """src (Bs, C, H*W) with Bs in {1, batch}; index (batch, P) -> (batch, C, P)."""
    channels = src.shape[1]
    return src.expand(batch, channels, -1).gather(2, index.unsqueeze(1).expand(-1, channels, -1))


def bilinear_sample(src: Tensor, pos: Tensor) -> Tensor:
    """Sample src (Bs, C, H, W) at pos (B, P, 2) -> (B, C, P) in fp32 (fp64 for fp64 input); Bs may be 1 (shared source)."""
    height, width = src.shape[-2:]
    flat = to_accumulation(src.flatten(2))
    corners = _corners(pos, height, width)
    out = None
    for idx, w in zip(corners.index, corners.weight):
        term = _gather(flat, idx, pos.shape[0]) * w.unsqueeze(1)
        out = term if out is None else out + term
    return out


def bilinear_sample_backward(src: Tensor, pos: Tensor, grad: Tensor, need_src: bool, need_pos: bool
                             ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Adjoint of `bilinear_sample`: gradients for src (same shape, fp32) and pos (B, P, 2, fp32)."""
    batch = pos.shape[0]
    height, width = src.shape[-2:]
    channels = src.shape[1]
    grad = to_accumulation(grad)
    flat = to_accumulation(src.flatten(2))
    corners = _corners(pos, height, width)
    dsrc = grad.new_zeros(batch, channels, height * width) if need_src else None
    dpy = dpx = None
    for idx, w, wy, wx in zip(corners.index, corners.weight, corners.dwy, corners.dwx):
        if need_src:
            dsrc.scatter_add_(2, idx.unsqueeze(1).expand(-1, channels, -1), grad * w.unsqueeze(1))
        if need_pos:
            # channel-summed product of the incoming gradient and the neighbour's value
            gv = (grad * _gather(flat, idx, batch)).sum(1)
            dpy = gv * wy if dpy is None else dpy + gv * wy
            dpx = gv * wx if dpx is None else dpx + gv * wx
    if need_src:
        if src.shape[0] == 1 and batch > 1:
            dsrc = dsrc.sum(0, keepdim=True)
        dsrc = dsrc.view(src.shape[0], channels, height, width)
    dpos = None
    if need_pos:
        # chain rule through the pixel <- normalised coordinate map
        dpos = torch.stack([dpy * (0.5 * (height - 1)), dpx * (0.5 * (width - 1))], -1)
    return dsrc, dpos
