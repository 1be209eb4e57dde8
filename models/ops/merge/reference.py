"""Pure-PyTorch branch merge of the DSSM: the readable specification and the CPU implementation.

Shapes and math are those of `models.ops.merge` (the front end). A custom op's implementation runs below
autograd, so the backward is written out (`merge_branches_reference_backward`, recomputing the mean from ys);
the tests check it against autograd of the forward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["merge_branches_reference", "merge_branches_reference_backward"]


def merge_branches_reference(ys: Tensor, inverse: Tensor, gate: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """(B, L, D): the mean over k of ys[b, k, :, inverse[b, k, l]] (times silu(gate)), in out_dtype."""
    y = _mean(ys, inverse)
    if gate is not None:
        y = y * F.silu(gate)  # silu in the gate's dtype, the product in ys' (type promotion)
    return y.to(out_dtype)


def _mean(ys: Tensor, inverse: Tensor) -> Tensor:
    """(B, L, D) mean of the branches in raster order (sum then scale, the rounding of `.sum(1) / K`)."""
    batch, branches, dim, length = ys.shape
    y = ys.gather(3, inverse[:, :, None].expand(batch, branches, dim, length)).sum(1).div(branches)
    return y.transpose(1, 2)


def merge_branches_reference_backward(dout: Tensor, ys: Tensor, inverse: Tensor, gate: Optional[Tensor]
                                      ) -> Tuple[Tensor, Optional[Tensor]]:
    """(dys (B, K, D, L) in ys' dtype, dgate in the gate's dtype or None): the adjoint of the forward."""
    batch, branches, dim, length = ys.shape
    grad, dgate = dout, None
    if gate is not None:
        mean = _mean(ys, inverse)
        grad = dout.to(torch.result_type(mean, gate))
        # silu's gradient arrives in the gate's dtype, as autograd casts it to its input's
        dgate = torch.ops.aten.silu_backward((grad * mean).to(gate.dtype), gate)
        grad = grad * F.silu(gate)
    grad = grad.to(ys.dtype).div(branches).transpose(1, 2)[:, None].expand(batch, branches, dim, length)
    # each (b, k) row of inverse is a permutation: the scatter writes every step exactly once
    dys = torch.empty_like(ys).scatter_(3, inverse[:, :, None].expand(batch, branches, dim, length), grad)
    return dys, dgate
