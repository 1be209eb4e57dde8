"""Index offset (paper Sec. 3.3, ablation "DT"): learned scan order of the deformable branch.

Every token gets a position on the 1-D path (its normalised raster index plus a learned offset); sorting
those positions gives the order in which the deformable branch scans the tokens. The sort has no
gradient; following the paper (and the release), the gradient reaching the sequence, averaged over
channels, stands in for the gradient of the token positions:

    dp[n] = mean_c(dseq[c, n] - dx[c, n])

i.e. the gradient at sequence slot n minus the gradient at spatial token n. After the scan, the DSSM puts
the branch output back into raster order through the inverse permutation (scan_orders.inverse_order).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["IndexOffsetSort", "sort_tokens"]


class IndexOffsetSort(torch.autograd.Function):
    """x (B, C, N), p (B, N) -> seq (B, C, N) with seq[:, :, n] = x[:, :, perm[n]], and perm (B, N).

    perm is the ascending (stable) argsort of p. Backward: the exact gradient for x (scatter through
    the permutation) and the channel-averaged surrogate above for p.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        perm = torch.argsort(p, dim=-1, stable=True)
        seq = x.gather(2, perm.unsqueeze(1).expand_as(x))
        ctx.save_for_backward(perm)
        ctx.p_dtype = p.dtype
        ctx.mark_non_differentiable(perm)
        return seq, perm

    @staticmethod
    def backward(ctx, dseq: Tensor, _dperm: Tensor):
        (perm,) = ctx.saved_tensors
        dx = torch.empty_like(dseq).scatter_(2, perm.unsqueeze(1).expand_as(dseq), dseq)
        dp = (dseq - dx).mean(1) if ctx.needs_input_grad[1] else None
        return dx, None if dp is None else dp.to(ctx.p_dtype)


def sort_tokens(x: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
    """Functional form of `IndexOffsetSort`."""
    return IndexOffsetSort.apply(x, p)
