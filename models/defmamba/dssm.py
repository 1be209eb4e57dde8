"""Deformable State Space Model (DSSM, paper Sec. 3.3, Fig. 3a): the token mixer of a DM block.

    x, z = in_proj(x)                        (no bias)
    x    = SiLU(depthwise 3x3 conv(x))
    K branches over the same features, scanned by ONE selective-scan call with one B/C group each:
        forward raster order, backward raster order (FB-BB), and a third branch: the deformable order
        (DB, see deformable_scan.py), or for the ablations none, a continuous (CB) or a local (LB) order
    y    = mean of the K branch outputs, each back in raster order
    out  = out_proj(y * SiLU(z))             (no bias, no output norm, as in the release)

The default (FB-BB + DB, K = 3) is the released model; parameter names and shapes follow the release so its
checkpoints load strictly. The scan takes its input in pieces, one per branch, and the Triton scan reads them
where they are: the forward and backward branches are both the raster sequence as it is, the backward one
scanned from its end (the scan's `reversed_groups`), so nothing is copied, gathered or concatenated for them
and both come out in raster order. The other scan backends concatenate the pieces when they run and would flip
copies for a reversed group, so there the backward branch is one reversed copy instead, as in the release. A
continuous or local order is a permutation of the raster tokens (scan_orders.py): one gather. The merge back to
raster order, the mean and the gate are one fused operation (models/ops/merge) reading each branch output once.
"""
from __future__ import annotations

import enum
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import register_notrace_module

from .deformable_scan import DeformableScan
from .scan_orders import continuous_order, inverse_order, local_order, reversed_order
from ..ops.merge import merge_branches
from ..ops.scan import reverses_in_place, selective_scan_fn
from ..ssm_init import init_ssm_parameters

__all__ = ["DSSM", "ThirdBranch", "THIRD_BRANCHES"]


class ThirdBranch(str, enum.Enum):
    """The scan branch next to the forward/backward pair (paper Table 4)."""
    DEFORMABLE = "db"
    NONE = "none"
    CONTINUOUS = "cb"
    LOCAL = "lb"


# values of the third_branch argument (and of MODEL.DEFMAMBA.THIRD_BRANCH)
THIRD_BRANCHES = tuple(b.value for b in ThirdBranch)


@register_notrace_module  # a leaf for torch.fx: the token orders and the sort depend on the input's shape
class DSSM(nn.Module):
    """K-branch selective-scan mixer on channels-last features (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, kernel_size: int, d_state: int = 16, dt_rank: int = 0, ssm_ratio: float = 1.0,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, fb_bb: bool = True,
                 third_branch: Union[str, ThirdBranch] = ThirdBranch.DEFORMABLE, local_window: int = 7,
                 point_offset: bool = True, index_offset: bool = True, offset_bias: bool = True,
                 channel_attention: bool = True) -> None:
        """
        Args:
            dim: model width C.
            kernel_size: depthwise kernel of the deformable branch's offset network.
            d_state: SSM state size N.
            dt_rank: rank R of the dt projection; 0 means ceil(C / 16).
            ssm_ratio: d_inner / C.
            dt_min, dt_max, dt_init_floor: range of the initial step sizes (Mamba's dt initialisation).
            fb_bb: scan the forward and backward raster branches.
            third_branch: "db" (deformable), "none", "cb" (continuous) or "lb" (local).
            local_window: tile size of the local order ("lb").
            point_offset, index_offset, offset_bias, channel_attention: parts of the deformable branch
                (DP, DT, OB, CA; see deformable_scan.py), used only with third_branch "db".
        """
        super().__init__()
        try:
            self.third_branch = ThirdBranch(third_branch)
        except ValueError:
            raise ValueError(f"third_branch must be one of {list(THIRD_BRANCHES)}, "
                             f"got {third_branch!r}") from None
        if not fb_bb and self.third_branch is ThirdBranch.NONE:
            raise ValueError("a DSSM needs at least one scan branch: fb_bb=False needs a third branch")
        if local_window < 1:
            raise ValueError(f"local_window must be >= 1, got {local_window}")
        self.fb_bb, self.local_window = fb_bb, local_window
        d_inner = int(ssm_ratio * dim)
        rank = dt_rank or math.ceil(dim / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        deformable = self.third_branch is ThirdBranch.DEFORMABLE
        self.num_fixed = 2 * fb_bb + (self.third_branch in (ThirdBranch.CONTINUOUS, ThirdBranch.LOCAL))
        k = self.num_branches = self.num_fixed + deformable

        # per-branch projections stacked as raw parameters (the release's layout and names)
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.DS = DeformableScan(d_inner, kernel_size, point_offset, index_offset, offset_bias,
                                 channel_attention) if deformable else None
        init_ssm_parameters(self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds,
                            dt_min, dt_max, dt_init_floor)

    def ssm_parameters(self) -> Tuple[str, ...]:
        """Names (relative to this module) of the SSM parameters one may exempt from weight decay."""
        names = ("A_logs", "Ds", "dt_projs_bias")
        return names + ("DS.rpe_table",) if self.DS is not None and self.DS.rpe_table is not None else names

    def third_order(self, height: int, width: int, device: torch.device) -> Optional[Tensor]:
        """(H*W,) token order of a continuous / local third branch, or None (deformable or no third branch)."""
        if self.third_branch is ThirdBranch.CONTINUOUS:
            return continuous_order(height, width, device)
        if self.third_branch is ThirdBranch.LOCAL:
            return local_order(height, width, self.local_window, device)
        return None

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        length, k, d = height * width, self.num_branches, self.d_inner
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv2d(u.permute(0, 3, 1, 2)))                     # (B, D, H, W)

        # scan input: one (B, D, L) piece per branch, never concatenated (the scan reads pieces where they are),
        # and where each branch's output for token l is (B, K, L): the raster sequence for the forward and the
        # backward branch (scanned from its end, or a reversed copy), a gathered order, the deformable one
        raster = u.flatten(2)
        pieces: List[Tensor] = []
        inverses: List[Tensor] = []
        in_place = self.fb_bb and reverses_in_place(u.device.type)
        if self.fb_bb:
            pieces += [raster, raster if in_place else raster.flip(-1)]
            steps = torch.arange(length, device=u.device)
            backward = steps if in_place else reversed_order(height, width, u.device)
            inverses.append(torch.stack([steps, backward]).expand(batch, 2, length))
        order = self.third_order(height, width, u.device)
        if order is not None:
            pieces.append(raster.gather(2, order.expand(batch, d, length)))
            inverses.append(inverse_order(order).expand(batch, 1, length))
        if self.DS is not None:
            deformed, perm = self.DS(u, out_dtype=raster.dtype)  # written in the dtype the scan reads
            pieces.append(deformed)
            inverses.append(inverse_order(perm)[:, None])

        # each branch's x projection from its own piece, a batched (R + 2N, D) @ (D, L) that reads the piece as it
        # lies (an einsum kept a transposed copy for the weight's gradient); only the small (B, K, R + 2N, L)
        # result is stacked
        x_dbl = torch.stack([torch.bmm(w.to(p.dtype).expand(batch, -1, -1), p)
                             for p, w in zip(pieces, self.x_proj_weight)], 1)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = selective_scan_fn(
            pieces, dts.reshape(batch, k * d, length), -torch.exp(self.A_logs.float()), Bs, Cs,
            self.Ds.float(), self.dt_projs_bias.float().flatten(), delta_softplus=True,
            reversed_groups=(1,) if in_place else (),  # the backward branch
        ).view(batch, k, d, length)

        # every branch back to raster order, their mean and the gate: one pass, tokens channels last
        inverse = inverses[0] if len(inverses) == 1 else torch.cat(inverses, 1)       # (B, K, L)
        y = merge_branches(ys, inverse, z.reshape(batch, length, d), out_dtype=x.dtype)
        return self.out_proj(y.view(batch, height, width, d))
