"""SS2D: VMamba v2's 2-D selective-scan mixer (forward type v05_noz), channels-first, four cross-scan directions.

    u   = SiLU(dwconv3x3(in_proj(x)))                  in_proj: 1x1, no bias, no z half, no gate
    xs  = cross_scan(u)                                the 4 directions k0..k3 (below), (B, 4, D, L)
    ys  = S6 scan of every direction, d_state 1        one selective_scan_fn call, one B/C group per direction
    y   = cross_merge(ys)                              the adjoint of cross_scan: a plain sum
    out = out_proj(LN2d(y))                            out_proj: 1x1, no bias

Directions over an H x W map: k0 row-major (token h*W + w), k1 column-major (token w*H + h), k2 = k0 reversed,
k3 = k1 reversed. Parameter names and shapes are the release's, so its checkpoints load strictly.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import register_notrace_module

from ..ops.precision import to_accumulation
from ..ops.scan import selective_scan_fn
from ..ssm_init import init_ssm_parameters
from .layers import LayerNorm2d, Linear2d

__all__ = ["SS2D", "cross_scan", "cross_merge", "DIRECTIONS"]

# scan directions of the cross scan (k0..k3)
DIRECTIONS = 4


def cross_scan(u: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): row-major, column-major, and both reversed."""
    rows = u.flatten(2)
    cols = u.transpose(2, 3).flatten(2)
    xs = torch.stack([rows, cols], 1)
    return torch.cat([xs, xs.flip(-1)], 1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, D, H*W) in the four scan orders -> (B, D, H, W): their sum, each back in place (cross_scan's adjoint)."""
    batch, _, dim, _ = ys.shape
    y = ys[:, :2] + ys[:, 2:].flip(-1)
    cols = y[:, 1].view(batch, dim, width, height).transpose(2, 3)
    return y[:, 0].view(batch, dim, height, width) + cols


@register_notrace_module  # a leaf for torch.fx: the scan's shape checks and the merge read the input's shape
class SS2D(nn.Module):
    """Four-direction selective-scan mixer on channels-first maps, (B, C, H, W) -> (B, C, H, W).

    Overridable steps (subclasses, e.g. Mamba-Adaptor, rely on these names and shapes; D = d_inner,
    N = d_state, L = H*W, K = 4 directions):

    - `forward(x)`: in_proj -> conv2d (depthwise) -> SiLU -> `self.ssm(u)` -> out_norm -> cast to x.dtype
      -> out_proj.
    - `ssm(u)`: (B, D, H, W) -> (B, D, H, W) =
      `cross_merge(self.scan(xs, *self.project(xs)), H, W)` with `xs = cross_scan(u)` (B, K, D, L);
      `cross_scan` / `cross_merge` are module-level functions of this file.
    - `project(xs)` -> (delta, Bs, Cs): delta (B, K, D, L) before the bias and softplus, Bs and Cs (B, K, N, L),
      from x_proj_weight[k] and dt_projs_weight[k] of direction k.
    - `scan(xs, delta, Bs, Cs)` -> (B, K, D, L) in fp32 (fp64 for fp64 inputs): one `selective_scan_fn`
      call over (B, K*D, L) with A = -exp(A_logs), skip Ds, delta bias dt_projs_bias (flattened index
      k*D + c) and softplus; every (batch, direction, channel) sequence starts from h = 0.
    """

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, dt_rank: int = 0,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        """
        Args:
            dim: model width C.
            d_state: SSM state size N (1 in the release).
            ssm_ratio: d_inner / C.
            dt_rank: rank R of the dt projection; 0 means ceil(C / 16).
            dt_min, dt_max, dt_init_floor: range of the initial step sizes (Mamba's dt initialisation).
        """
        super().__init__()
        d_inner = int(ssm_ratio * dim)
        if d_inner < 1:
            raise ValueError(f"ssm_ratio {ssm_ratio} leaves no inner channels for width {dim}")
        rank = dt_rank or math.ceil(dim / 16)
        k = DIRECTIONS
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        # per-direction projections as raw parameters (the release's names, shapes and order)
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))

        self.out_norm = LayerNorm2d(d_inner)
        self.in_proj = Linear2d(dim, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=False)
        self.out_proj = Linear2d(d_inner, dim, bias=False)
        init_ssm_parameters(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                            dt_min, dt_max, dt_init_floor)

    def ssm_parameters(self) -> Tuple[str, ...]:
        """Names (relative to this module) of the SSM parameters one may exempt from weight decay."""
        return ("A_logs", "Ds", "dt_projs_bias")

    def project(self, xs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """xs (B, K, D, L) -> delta (B, K, D, L) before bias and softplus, Bs and Cs (B, K, N, L)."""
        # a batched (R + 2N, D) @ (D, L) per direction reads xs as it lies (einsum would keep a transposed copy
        # of it for the weight's gradient)
        x_dbl = torch.matmul(self.x_proj_weight.to(xs.dtype), xs)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        return torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight), Bs, Cs

    def scan(self, xs: Tensor, delta: Tensor, Bs: Tensor, Cs: Tensor) -> Tensor:
        """One selective scan of every direction: (B, K, D, L) inputs -> (B, K, D, L) outputs (fp32 or fp64)."""
        batch, k, d, length = xs.shape
        ys = selective_scan_fn(
            xs.reshape(batch, k * d, length), delta.reshape(batch, k * d, length),
            -torch.exp(to_accumulation(self.A_logs)), Bs, Cs, to_accumulation(self.Ds),
            to_accumulation(self.dt_projs_bias).flatten(), delta_softplus=True,
        )
        return ys.view(batch, k, d, length)

    def ssm(self, u: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, D, H, W): cross scan, projections, scan, cross merge."""
        height, width = u.shape[-2:]
        xs = cross_scan(u)
        return cross_merge(self.scan(xs, *self.project(xs)), height, width)

    def forward(self, x: Tensor) -> Tensor:
        u = F.silu(self.conv2d(self.in_proj(x)))
        y = self.ssm(u)
        # the norm runs in its parameters' dtype (fp32 under AMP, as the release's fp32 scan output)
        y = self.out_norm(y.to(self.out_norm.weight.dtype)).to(x.dtype)
        return self.out_proj(y)
