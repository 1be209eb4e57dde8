"""Front end of the deformable branch's token sequence (paper Sec. 3.3): one call from features to sorted sequence.

    features[b, c, n] = sample(x, pos)[b, c, n] (+ sample(table, disp)[b, c, n] when a table is given)
    perm[b]           = stable ascending argsort of path[b]      (raster order 0..N-1 when path is None)
    seq[b, c, n]      = features[b, c, perm[b, n]]

with the gradients of the paper's autograd Functions in this package (point_offset.py, offset_bias.py and
index_offset.py, on the bilinear sampling of bilinear.py), including the averaged-gradient surrogate for `path`.

Backends (switch "deform" of models.ops.backends: DEFMAMBA_DEFORM_BACKEND, or set_backend / use_backend), one
file each in this package:
    reference.py  torch   the composition of those Functions: the readable specification;
    triton.py     triton  host side of the fused forward kernel and the adjoint kernel (kernels/triton/deformable.py);
    auto: triton for CUDA tensors when Triton imports, torch otherwise.
Both run inside one torch.library custom op, `defmamba::deformable_sequence` (op.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import Backend, register_operation, resolve, triton_check
from ..precision import common_accumulation_dtype
from .op import deformable_sequence_op
from .reference import deformable_sequence_reference

__all__ = ["deformable_sequence", "deformable_sequence_reference", "choose_backend"]

SEQUENCE = "deformable sequence"
register_operation(SEQUENCE, "deform", ((Backend.TRITON, triton_check("kernels.triton.deformable")),))


def choose_backend(x: Tensor) -> Backend:
    """The backend that runs the deformable sequence of features `x` (BackendUnavailable if a forced one cannot)."""
    return resolve(SEQUENCE, x.device.type)


def _check_inputs(x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                  path: Optional[Tensor]) -> None:
    if (table is None) != (disp is None):
        raise ValueError("table and disp must be given together")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W); got {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    grid = (batch, height, width, 2)
    if tuple(pos.shape) != grid:
        raise ValueError(f"pos must be (B, H, W, 2) = {grid}; got {tuple(pos.shape)}")
    if disp is not None and tuple(disp.shape) != grid:
        raise ValueError(f"disp must be (B, H, W, 2) = {grid}; got {tuple(disp.shape)}")
    if table is not None and (table.dim() != 3 or table.shape[0] != channels):
        raise ValueError(f"table must be (C={channels}, h, w); got {tuple(table.shape)}")
    if path is not None and tuple(path.shape) != (batch, height * width):
        raise ValueError(f"path must be (B, H*W) = {(batch, height * width)}; got {tuple(path.shape)}")


def deformable_sequence(x: Tensor, pos: Tensor, table: Optional[Tensor] = None, disp: Optional[Tensor] = None,
                        path: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None
                        ) -> Tuple[Tensor, Tensor]:
    """Deformed, re-ordered token sequence.

    Args:
        x: features (B, C, H, W), any float dtype.
        pos: deformed sampling points (B, H, W, 2), normalised (y, x), align-corners, zeros outside.
        table: offset-bias table (C, h, w) resized to (H, W) inside, or None for no offset bias.
        disp: normalised (y, x) displacements (B, H, W, 2) at which the resized table is sampled.
        path: per-token positions on the 1-D scan path (B, H*W) whose ascending order is the scan order,
            or None to keep the raster order.
        out_dtype: dtype of seq (e.g. the one the scan reads); None: fp32 (fp64 for fp64 inputs).
            Sums are accumulated in that fp32 / fp64 precision and rounded once.

    Returns:
        seq (B, C, H*W) and perm (B, H*W) int64, seq[:, :, n] = features[:, :, perm[:, n]].
    """
    _check_inputs(x, pos, table, disp, path)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point dtype; got {out_dtype}")
    acc = common_accumulation_dtype(x, pos, table, disp)
    return deformable_sequence_op(x, pos, table, disp, path, out_dtype or acc, choose_backend(x).value)
