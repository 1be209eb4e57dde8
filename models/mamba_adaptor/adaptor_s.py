"""Adaptor-S: multi-scale dilated depthwise convolutions on the merged SSM output (Mamba-Adaptor, Xie et al. 2025).

Reconstruction (no public code; see docs/mamba_adaptor.md). The merged (B, D, H, W) output of the cross
scan, before SS2D's out_norm, passes through parallel depthwise branches of kernel k_b and dilation d_b
(padding d_b (k_b - 1) / 2 keeps the size), giving the flattened sequence the image's locality:

    fusion "sum":   y + sum_b dwconv_b(y)                every branch sees every channel
    fusion "split": y + concat_b dwconv_b(y_b)           the channels split into one chunk per branch

(without `residual`, the branches' result alone).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor, nn

__all__ = ["AdaptorS", "FUSIONS"]

FUSIONS = ("sum", "split")


class AdaptorS(nn.Module):
    """Parallel dilated depthwise convolutions, fused by sum or channel split, (B, D, H, W) -> (B, D, H, W)."""

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (3, 3, 3), dilations: Sequence[int] = (1, 2, 3),
                 fusion: str = "sum", residual: bool = True) -> None:
        """
        Args:
            dim: channels D of the SSM output.
            kernel_sizes: odd kernel size of each branch.
            dilations: dilation of each branch (one per kernel size).
            fusion: "sum" or "split" (see the module docstring).
            residual: add the input to the fused branches.
        """
        super().__init__()
        if not kernel_sizes or len(kernel_sizes) != len(dilations):
            raise ValueError(f"Adaptor-S needs one dilation per kernel size, got kernels {list(kernel_sizes)} "
                             f"and dilations {list(dilations)}")
        if any(k < 1 or k % 2 == 0 for k in kernel_sizes) or any(d < 1 for d in dilations):
            raise ValueError(f"Adaptor-S kernel sizes must be odd and dilations >= 1, got {list(kernel_sizes)}, "
                             f"{list(dilations)}")
        if fusion not in FUSIONS:
            raise ValueError(f"Adaptor-S fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if fusion == "split" and dim < len(kernel_sizes):
            raise ValueError(f"Adaptor-S cannot split {dim} channels into {len(kernel_sizes)} branches")
        self.fusion, self.residual = fusion, residual
        # "split": near-equal chunks, the first ones one channel larger
        n = len(kernel_sizes)
        self.splits: List[int] = [dim // n + (i < dim % n) for i in range(n)] if fusion == "split" else [dim] * n
        self.branches = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=d * (k - 1) // 2, dilation=d, groups=c)
            for c, k, d in zip(self.splits, kernel_sizes, dilations))

    def forward(self, y: Tensor) -> Tensor:
        y = y.to(self.branches[0].weight.dtype)
        if self.fusion == "sum":
            out = sum(conv(y) for conv in self.branches)
        else:
            out = torch.cat([conv(part) for conv, part in zip(self.branches, y.split(self.splits, dim=1))], 1)
        return y + out if self.residual else out
