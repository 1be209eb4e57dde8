"""Dynamic adaptive sampling of DAMamba (Li et al. 2025, Sec. 3): every token reads its features at a learned
offset before the scan.

For channel group g (channels g*S .. g*S + S - 1, S = channels per group) the offsets are in feature-map
pixels, (dx, dy) = (off[..., 2g], off[..., 2g + 1]), unbounded, and

    out[b, c, i, j] = bilinear sample of x[b, c] at (y, x) = (i + dy, j + dx)

with pixel (i, j) at integer coordinates and zeros outside the map, i.e.
`F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)` with the grid
x = (2 (j + dx) + 1) / W - 1, y = (2 (i + dy) + 1) / H - 1. The sample of (i, j) stays at (i, j).

Backends (switch "deform" of models.ops.backends, shared with the deformable sequence: DEFMAMBA_DEFORM_BACKEND,
or set_backend / use_backend), one file each in this package:
    reference.py  torch   the point-offset sampling of ops/deform at pixel positions: the readable specification;
    triton.py     triton  host side of one kernel per direction (kernels/triton/adaptive.py), run through the
                          custom op `defmamba::adaptive_sample` (op.py);
    auto: triton for CUDA tensors when Triton imports, torch otherwise.
"""
from __future__ import annotations

from torch import Tensor

from ..backends import Backend, register_operation, resolve, triton_check
from .op import adaptive_sample_op
from .reference import adaptive_sample_reference, pixel_offsets_to_positions

__all__ = ["adaptive_sample", "pixel_offsets_to_positions"]

ADAPTIVE = "adaptive sampling"
register_operation(ADAPTIVE, "deform", ((Backend.TRITON, triton_check("kernels.triton.adaptive")),))


def adaptive_sample(x: Tensor, offsets: Tensor) -> Tensor:
    """Sample x (B, C, H, W) per channel group at its pixel offsets (B, H, W, 2G) -> (B, C, H, W).

    Channel c belongs to group c // (C // G). The result is fp32 (fp64 for fp64 input); gradients flow to
    x and to the offsets (ordinary bilinear gradients).
    """
    batch, channels, height, width = x.shape
    if offsets.dim() != 4 or offsets.shape[:3] != (batch, height, width) or offsets.shape[3] % 2:
        raise ValueError(f"offsets must be (B={batch}, H={height}, W={width}, 2G); got {tuple(offsets.shape)}")
    groups = offsets.shape[3] // 2
    if groups == 0 or channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} offset groups")
    if resolve(ADAPTIVE, x.device.type) is Backend.TRITON:
        return adaptive_sample_op(x, offsets)
    return adaptive_sample_reference(x, offsets)
