"""Branch merge of the DSSM front end: every scan branch back to raster order, their mean, then the gate.

    ys        (B, K, D, L)   the scan output of K branches, fp32 (fp64 runs in fp64, for tests)
    inverse   (B, K, L)      int64; row (b, k) a permutation of 0..L-1: branch k's output for token l is at
                             step inverse[b, k, l] (the inverse of the branch's token order)
    gate      (B, L, D)      optional, any float dtype and strides
    out[b, l, d] = (1/K) sum_k ys[b, k, d, inverse[b, k, l]]   (* silu(gate[b, l, d]))   in out_dtype

silu is rounded to the gate's dtype and the product taken in ys' dtype, as `y * F.silu(z)` does, so the
result is the release's gather, sum, scale and gate to fp32 rounding, in one pass that reads every branch
output once and writes the tokens once, channels last (what out_proj reads).

Backends (switch "merge" of models.ops.backends: DEFMAMBA_MERGE_BACKEND, or set_backend / use_backend), one
file each in this package:
    reference.py  torch   the PyTorch composition: the readable specification;
    triton.py     triton  host side of one kernel per direction (kernels/triton/merge.py);
    auto: triton for CUDA tensors when Triton imports, torch otherwise.
Both run inside one torch.library custom op, `defmamba::merge_branches` (op.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import Backend, register_operation, resolve, triton_check
from .op import merge_branches_op
from .reference import merge_branches_reference

__all__ = ["merge_branches", "merge_branches_reference", "choose_backend"]

MERGE = "branch merge"
register_operation(MERGE, "merge", ((Backend.TRITON, triton_check("kernels.triton.merge")),))


def choose_backend(ys: Tensor) -> Backend:
    """The backend that merges `ys` (BackendUnavailable if a forced one cannot)."""
    return resolve(MERGE, ys.device.type)


def _check_inputs(ys: Tensor, inverse: Tensor, gate: Optional[Tensor]) -> None:
    if ys.dim() != 4 or not ys.is_floating_point():
        raise ValueError(f"ys must be a floating-point (B, K, D, L) tensor; got {ys.dtype} {tuple(ys.shape)}")
    batch, branches, dim, length = ys.shape
    if inverse.dtype != torch.long or tuple(inverse.shape) != (batch, branches, length):
        raise ValueError(f"inverse must be int64 (B, K, L) = {(batch, branches, length)}; "
                         f"got {inverse.dtype} {tuple(inverse.shape)}")
    if gate is not None and (tuple(gate.shape) != (batch, length, dim) or not gate.is_floating_point()):
        raise ValueError(f"gate must be a floating-point (B, L, D) = {(batch, length, dim)} tensor; "
                         f"got {gate.dtype} {tuple(gate.shape)}")


def merge_branches(ys: Tensor, inverse: Tensor, gate: Optional[Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Merged, gated tokens (B, L, D) in out_dtype (default: ys' dtype); see the module docstring."""
    _check_inputs(ys, inverse, gate)
    # the Triton backward needs the un-gated mean for the gate's gradient; inference does not store it
    save_mean = gate is not None and torch.is_grad_enabled() and (ys.requires_grad or gate.requires_grad)
    out, _ = merge_branches_op(ys, inverse, gate, out_dtype or ys.dtype, save_mean, choose_backend(ys).value)
    return out
