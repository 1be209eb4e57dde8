"""Offset network of the deformable branch (paper Sec. 3.3, Fig. 3b; ablation "CA").

depthwise k x k conv -> channel attention (SE-style, from the globally pooled input) -> LayerNorm over
channels -> GELU -> 1x1 conv without bias -> the offset maps: [dy, dx] point offsets and the token-index
offset (3 maps in the release; fewer when an ablation switches a kind of offset off).
Submodule names follow the official release (`conv1`, `ca`, `ln`, `gelu`, `conv2`) so its checkpoints load.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DeformableOffsetNetwork"]


class DeformableOffsetNetwork(nn.Module):
    """Predicts raw (pre-tanh) offsets (B, out_channels, H, W) from features (B, C, H, W)."""

    def __init__(self, dim: int, kernel_size: int, out_channels: int = 3, channel_attention: bool = True) -> None:
        """
        Args:
            dim: channels C of the scanned features (the DSSM's d_inner).
            kernel_size: depthwise kernel K of this stage (9, 7, 5, 3 in the release).
            out_channels: offset maps predicted (3 = dy, dx, index offset).
            channel_attention: gate the conv output with SE-style channel attention (ablation "CA");
                False creates no attention parameters.
        """
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        if channel_attention:
            # the release uses C // 16 hidden units; at least one keeps tiny test models valid
            hidden = max(dim // 16, 1)
            self.ca = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Sigmoid())
        else:
            self.ca = None
        self.ln = nn.LayerNorm(dim)
        self.gelu = nn.GELU()
        self.conv2 = nn.Conv2d(dim, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x).permute(0, 2, 3, 1)                      # channels-last for the norm
        if self.ca is not None:
            h = h * self.ca(x.mean((2, 3)))[:, None, None, :]      # gate from the pooled input, (B, C)
        h = self.gelu(self.ln(h))
        return self.conv2(h.permute(0, 3, 1, 2))
