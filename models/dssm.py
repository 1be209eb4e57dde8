"""Deformable State Space Model (DSSM, paper Sec. 3.3, Fig. 3a): the token mixer of a DM block.

    x, z = in_proj(x)                        (no bias)
    x    = SiLU(depthwise 3x3 conv(x))
    three branches over the same features, scanned by ONE selective-scan call with one B/C group each:
        forward raster order, backward raster order, deformable order (see deformable_scan.py)
    y    = mean of the three branch outputs, each back in raster order
    out  = out_proj(y * SiLU(z))             (no bias, no output norm, as in the release)

Parameter names and shapes follow the official release so its checkpoints load strictly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deformable_scan import DeformableScan
from .index_offset import unsort_tokens
from .selective_scan import selective_scan_fn

__all__ = ["DSSM"]

NUM_BRANCHES = 3  # forward, backward, deformable


class DSSM(nn.Module):
    """Three-branch selective-scan mixer on channels-last features (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, kernel_size: int, d_state: int = 16, dt_rank: int = 0, ssm_ratio: float = 1.0,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        """
        Args:
            dim: model width C.
            kernel_size: depthwise kernel of the deformable branch's offset network.
            d_state: SSM state size N.
            dt_rank: rank R of the dt projection; 0 means ceil(C / 16).
            ssm_ratio: d_inner / C.
            dt_min, dt_max, dt_init_floor: range of the initial step sizes (Mamba's dt initialisation).
        """
        super().__init__()
        d_inner = int(ssm_ratio * dim)
        rank = dt_rank or math.ceil(dim / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        k = NUM_BRANCHES

        # per-branch projections stacked as raw parameters (the release's layout and names)
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.DS = DeformableScan(d_inner, kernel_size)
        self._init_ssm(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        bound = self.d_inner ** -0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)      # nn.Linear's default for each branch
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        # initial step sizes log-uniform in [dt_min, dt_max]; the bias stores softplus^-1(dt)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A[n] = -(n + 1)
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def ssm_parameters(self) -> tuple[str, ...]:
        """Names (relative to this module) of the SSM parameters one may exempt from weight decay."""
        return ("A_logs", "Ds", "dt_projs_bias", "DS.rpe_table")

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        length, k, d = height * width, NUM_BRANCHES, self.d_inner
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv2d(u.permute(0, 3, 1, 2)))                     # (B, D, H, W)

        raster = u.flatten(2)
        deformed, perm = self.DS(u)
        xs = torch.stack([raster, raster.flip(-1), deformed.to(raster.dtype)], 1)  # (B, 3, D, L)

        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = selective_scan_fn(
            xs.reshape(batch, k * d, length), dts.reshape(batch, k * d, length),
            -torch.exp(self.A_logs.float()), Bs, Cs,
            self.Ds.float(), self.dt_projs_bias.float().flatten(), delta_softplus=True,
        ).view(batch, k, d, length)
        y = (ys[:, 0] + ys[:, 1].flip(-1) + unsort_tokens(ys[:, 2], perm)) / k
        y = y.view(batch, d, height, width).permute(0, 2, 3, 1)
        return self.out_proj((y * F.silu(z)).to(x.dtype))
