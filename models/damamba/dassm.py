"""DASSM: the token mixer of a DAMamba block (Li et al. 2025, "Dynamic Adaptive Scan", Sec. 3).

    u   = SiLU(dwconv3x3(in_proj(x)))                          in_proj: 1x1, no bias
    off = Linear_{C -> 2G}(GELU(LN(dwconv3x3(x))))             per pixel, G = C / head_dim offset groups
    u   = adaptive_sample(u, off)                              models/ops/adaptive
    y   = S6 scan of u in raster order, one pass, d_state 1, one B/C group (models/ops/scan)
    out = out_proj(LN(y))                                      out_proj: 1x1, no bias

No gate, no cross-scan directions, no sorting: the learned offsets alone adapt the scan. Parameter names and
shapes are the release's, so its checkpoints load strictly. `adaptive_scan=False` is the raster-scan baseline of
the module ablation (slides' Table 5): no offset network, every token is read where it is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import register_notrace_module

from ..ops.adaptive import adaptive_sample
from .layers import LN_EPS, ChannelLayerNorm
from ..layers import ToChannelsLast
from ..ops.precision import to_accumulation
from ..ops.scan import selective_scan_fn
from ..ssm_init import init_ssm_parameters

__all__ = ["AdaptiveOffsetNetwork", "DASSM"]


class AdaptiveOffsetNetwork(nn.Module):
    """Per-pixel offsets in pixels, (B, C, H, W) -> (B, H, W, 2G): dwconv3x3, LN, GELU, Linear (names `da_scan.*`)."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.dw_conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                                     nn.Sequential(ToChannelsLast(), nn.LayerNorm(dim, eps=LN_EPS)), nn.GELU())
        self.offset = nn.Linear(dim, 2 * groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.offset(self.dw_conv(x))


@register_notrace_module  # a leaf for torch.fx: shapes drive the sampling and the scan
class DASSM(nn.Module):
    """Dynamic-adaptive-scan selective state space mixer on channels-first maps (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, head_dim: int = 16, d_state: int = 1, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, adaptive_scan: bool = True) -> None:
        """
        Args:
            dim: channels C (the SSM width too: expand 1).
            head_dim: channels per offset group; G = C / head_dim groups of (dx, dy).
            d_state: SSM state size N (1 in the release).
            dt_min, dt_max, dt_init_floor: range of the initial step sizes (Mamba's dt initialisation).
            adaptive_scan: the offset network and the sampling (`da_scan`); False scans the raster grid.
        """
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"DASSM width {dim} is not divisible by head_dim {head_dim}")
        rank = math.ceil(dim / 16)
        self.dim, self.d_state, self.dt_rank = dim, d_state, rank
        # the release stores the projections as raw parameters: x_proj rows [0, R) dt, then B (N), then C (N)
        self.x_proj_weight = nn.Parameter(torch.empty(rank + 2 * d_state, dim))
        self.dt_projs_weight = nn.Parameter(torch.empty(dim, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(dim))
        self.A_logs = nn.Parameter(torch.empty(dim, d_state))
        self.Ds = nn.Parameter(torch.empty(dim))

        self.in_proj = nn.Conv2d(dim, dim, 1, bias=False)
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.out_norm = ChannelLayerNorm(dim)
        self.out_proj = nn.Conv2d(dim, dim, 1, bias=False)
        self.da_scan = AdaptiveOffsetNetwork(dim, dim // head_dim) if adaptive_scan else None
        init_ssm_parameters(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                            dt_min, dt_max, dt_init_floor)

    def ssm_parameters(self) -> tuple[str, ...]:
        """Names (relative to this module) of the SSM parameters one may exempt from weight decay."""
        return ("A_logs", "Ds", "dt_projs_bias")

    def forward(self, x: Tensor) -> Tensor:
        batch, dim, height, width = x.shape
        length = height * width
        u = F.silu(self.conv2d(self.in_proj(x)))
        if self.da_scan is not None:
            u = adaptive_sample(u, self.da_scan(x)).to(u.dtype)
        u = u.reshape(batch, dim, length)

        x_dbl = torch.einsum("bcl,rc->brl", u, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dts = torch.einsum("brl,cr->bcl", dts, self.dt_projs_weight)
        y = selective_scan_fn(
            u, dts, -torch.exp(to_accumulation(self.A_logs)), Bs.unsqueeze(1), Cs.unsqueeze(1),
            to_accumulation(self.Ds), to_accumulation(self.dt_projs_bias), delta_softplus=True,
        )
        return self.out_proj(self.out_norm(y.view(batch, dim, height, width).to(x.dtype)))
