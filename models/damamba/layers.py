"""Small layers of DAMamba with the release's parameter names: a channels-first LayerNorm and ResDWC."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelLayerNorm", "ResDWC"]

# every LayerNorm of the DAMamba release uses this eps
LN_EPS = 1e-6


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map; the wrapped `norm` gives the release's key names."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResDWC(nn.Module):
    """Residual depthwise 3x3 conv, x + dwconv(x), computed as one conv whose kernel is weight + conv_constant.

    `conv_constant` holds the identity kernel (centre 1). The release stores it as a frozen parameter; here it
    is a persistent buffer under the same state_dict key, so release checkpoints load strictly while every
    parameter trains (timm's and fvcore's parameter counts leave its 9 values out). A loaded value is used as is.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        identity = torch.zeros(1, 1, 3, 3)
        identity[0, 0, 1, 1] = 1.0
        self.register_buffer("conv_constant", identity)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.conv.weight + self.conv_constant
        return F.conv2d(x, weight, self.conv.bias, padding=1, groups=self.conv.groups)
