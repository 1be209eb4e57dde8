"""Adaptor-T: memory augmentation of the SSM hidden states at learned locations (Mamba-Adaptor, Xie et al. 2025).

Reconstruction (no public code; see docs/mamba_adaptor.md for which choices are the paper's). With d_state 1
every (direction, channel, token) has one hidden value h, recovered from the scan front end by scanning with
C = 1 and no skip (`hidden_states`). For each token i, direction k and channel group s (S groups, like heads):

    p_{i,1..K} = ref_i + offsets,  c_{i,1..K} = softmax(logits)      offsets/logits: predicted or learned
    h'_i      = h_i + sum_k c_k h(p_k)        (residual; sum only without it)
    y_i       = C_i h'_i + D u_i

Locations are 1-D positions along the direction's own scan sequence or 2-D pixel coordinates in the image;
fractional ones are read by linear / bilinear interpolation (nearest token without it); outside the map
reads 0.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.scan import selective_scan_fn
from ..vmamba.ss2d import DIRECTIONS, cross_scan

__all__ = ["AdaptorT", "SOURCES", "aggregate", "hidden_states", "uncross"]

# inputs of the dynamic location predictor: the scanned token u, or the direction's hidden state h
SOURCES = ("token", "state")


def hidden_states(xs: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, delta_bias: Tensor) -> Tensor:
    """Hidden states (B, K, D, L) of a d_state-1 scan: the scan's output with C = 1 and no skip term.

    xs, delta (B, K, D, L); A (K*D, 1); Bs (B, K, 1, L); delta_bias (K*D,). Returns fp32 (fp64 for fp64)."""
    if Bs.shape[2] != 1:
        raise ValueError(f"hidden states can be read from the scan only with d_state 1, got {Bs.shape[2]}")
    batch, k, d, length = xs.shape
    h = selective_scan_fn(xs.reshape(batch, k * d, length), delta.reshape(batch, k * d, length), A, Bs,
                          torch.ones_like(Bs), None, delta_bias, delta_softplus=True)
    return h.view(batch, k, d, length)


def uncross(ts: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, C, H*W) in the four scan orders -> (B, 4, C, H, W): each direction back in image layout.

    cross_merge(ts) is the sum of this over the directions."""
    batch, _, dim, _ = ts.shape
    ts = torch.cat([ts[:, :2], ts[:, 2:].flip(-1)], 1)
    rows = ts[:, 0::2].reshape(batch, 2, dim, height, width)
    cols = ts[:, 1::2].reshape(batch, 2, dim, width, height).transpose(-1, -2)
    return torch.stack([rows[:, 0], cols[:, 0], rows[:, 1], cols[:, 1]], 1)


def aggregate(source: Tensor, loc: Tensor, weights: Tensor, interpolate: bool = True) -> Tensor:
    """Weighted sum of `source` read at K locations per query, per group.

    Args:
        source: (N, S, Dg, H, W) maps (H = 1 for sequences).
        loc: (N, S, K, L, 2) locations (y, x) in pixels of the map, one set per query l.
        weights: (N, S, K, L) coefficients.
        interpolate: bilinear interpolation of fractional locations; False reads the nearest pixel.

    Returns:
        (N, S, Dg, L): out[n, s, :, l] = sum_k weights[n, s, k, l] * source[n, s, :, loc[n, s, k, l]],
        where pixels outside the map read 0.
    """
    n, s, dg, height, width = source.shape
    k, length = loc.shape[2:4]
    # pixel -> grid_sample's normalised coordinate (align_corners=False: pixel centres, defined for size 1)
    grid = torch.stack(((2 * loc[..., 1] + 1) / width - 1, (2 * loc[..., 0] + 1) / height - 1), -1)
    sampled = F.grid_sample(source.reshape(n * s, dg, height, width), grid.reshape(n * s, k, length, 2),
                            mode="bilinear" if interpolate else "nearest", padding_mode="zeros", align_corners=False)
    out = torch.einsum("ndkl,nkl->ndl", sampled, weights.reshape(n * s, k, length))
    return out.reshape(n, s, dg, length)


def _reference_points(coords: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, 4, coords, L): each token's own location in every direction (its sequence index, or its (y, x))."""
    length = height * width
    if coords == 1:
        return torch.arange(length, device=device, dtype=dtype).expand(1, DIRECTIONS, 1, length)
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return cross_scan(torch.stack([ys, xs])[None])


def _initial_offsets(groups: int, points: int, coords: int) -> Tensor:
    """(S, K, coords) start pattern: point k of group s at k+1 tokens from the query, groups spread in angle
    (2-D: direction 2*pi*s/S) or alternating ahead / behind in the scan (1-D)."""
    dist = torch.arange(1, points + 1, dtype=torch.float32).view(1, points, 1)
    if coords == 1:
        sign = torch.tensor([1.0 if s % 2 == 0 else -1.0 for s in range(groups)]).view(groups, 1, 1)
        return sign * dist
    angle = torch.arange(groups, dtype=torch.float32) * (2 * math.pi / groups)
    return torch.stack([angle.sin(), angle.cos()], -1).view(groups, 1, 2) * dist


class AdaptorT(nn.Module):
    """Adds to every hidden state a softmax-weighted sum of the hidden states at K locations per group."""

    def __init__(self, dim: int, points: int = 4, groups: int = 4, coords: int = 2, interpolate: bool = True,
                 dynamic: bool = True, source: str = "token", per_direction: bool = False, residual: bool = True,
                 static_size: Optional[Tuple[int, int]] = None) -> None:
        """
        Args:
            dim: SSM channels D (d_inner); a multiple of `groups`.
            points: K locations per token and group.
            groups: S channel groups, each with its own locations and coefficients.
            coords: 1 (positions along the direction's scan sequence) or 2 (pixel coordinates).
            interpolate: fractional locations read by (bi)linear interpolation; False rounds to the nearest token.
            dynamic: locations and coefficients predicted per token by a linear layer (from `source`); False
                learns them per position as a table (`static_size`, resized bilinearly to other map sizes).
            source: input of the dynamic predictor, "token" (the scanned u, one prediction per pixel for all
                directions) or "state" (each direction's hidden state).
            per_direction: separate predictor weights / tables for the four directions.
            residual: h + sum (the paper's general update); False keeps the sum only.
            static_size: (H, W) of the static table (the stage's map at the training resolution).
        """
        super().__init__()
        if dim % groups:
            raise ValueError(f"Adaptor-T: SSM width {dim} is not divisible by {groups} groups")
        if coords not in (1, 2) or points < 1:
            raise ValueError(f"Adaptor-T needs coords 1 or 2 and points >= 1, got coords={coords}, points={points}")
        if source not in SOURCES:
            raise ValueError(f"Adaptor-T source must be one of {', '.join(SOURCES)}, got {source!r}")
        if not dynamic and static_size is None:
            raise ValueError("static Adaptor-T locations need static_size (the stage's map size)")
        self.dim, self.points, self.groups, self.coords = dim, points, groups, coords
        self.interpolate, self.dynamic, self.source = interpolate, dynamic, source
        self.per_direction, self.residual = per_direction, residual
        heads = DIRECTIONS if per_direction else 1
        # predicted / learned channels per head: S*K*coords offsets, then S*K logits (uniform at the start)
        start = torch.cat([_initial_offsets(groups, points, coords).flatten(), torch.zeros(groups * points)])
        self.width = start.numel()
        if dynamic:
            # zero weights: training starts from the fixed pattern, as deformable attention's offsets do
            self.weight = nn.Parameter(torch.zeros(heads, self.width, dim))
            self.bias = nn.Parameter(start.repeat(heads, 1))
        else:
            self.table = nn.Parameter(start.view(1, -1, 1, 1).repeat(heads, 1, *static_size))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, points={self.points}, groups={self.groups}, coords={self.coords}, "
                f"interpolate={self.interpolate}, dynamic={self.dynamic}, source={self.source}, "
                f"per_direction={self.per_direction}, residual={self.residual}")

    def predict(self, h: Tensor, xs: Tensor, u: Tensor) -> Tensor:
        """Offsets and logits (B or 1, 4, width, L) of every direction's tokens, in scan order."""
        height, width = u.shape[-2:]
        if not self.dynamic:
            table = self.table
            if table.shape[-2:] != (height, width):
                table = F.interpolate(table, size=(height, width), mode="bilinear", align_corners=False)
            return self._per_direction(cross_scan(table.reshape(1, -1, height, width)))
        if self.source == "token" and not self.per_direction:
            # one prediction per pixel serves all four directions: predict in image layout, then cross-scan
            m = torch.einsum("bdhw,qd->bqhw", u, self.weight[0]) + self.bias[0].view(1, -1, 1, 1)
            return cross_scan(m)
        src = (xs if self.source == "token" else h).to(self.weight.dtype)
        weight = self.weight.expand(DIRECTIONS, -1, -1)
        return torch.einsum("bkdl,kqd->bkql", src, weight) + self.bias.expand(DIRECTIONS, -1)[None, :, :, None]

    def _per_direction(self, m: Tensor) -> Tensor:
        """(1, 4, heads*width, L) cross-scanned tables -> (1, 4, width, L): direction k keeps head k (or the one)."""
        m = m.view(1, DIRECTIONS, -1, self.width, m.shape[-1])
        if not self.per_direction:
            return m[:, :, 0]
        return torch.stack([m[:, k, k] for k in range(DIRECTIONS)], 1)

    def forward(self, h: Tensor, xs: Tensor, u: Tensor) -> Tensor:
        """Augmented hidden states (B, 4, D, L), in h's dtype.

        Args:
            h: hidden states (B, 4, D, L) of the four directions (fp32 / fp64).
            xs: the scanned tokens (B, 4, D, L) = cross_scan(u).
            u: the SSM input (B, D, H, W).
        """
        batch, k, dim, length = h.shape
        height, width = u.shape[-2:]
        s, kp, c = self.groups, self.points, self.coords
        m = self.predict(h, xs, u).to(h.dtype)
        offsets = m[:, :, :s * kp * c].reshape(-1, k, s, kp, c, length)
        weights = m[:, :, s * kp * c:].reshape(-1, k, s, kp, length).softmax(dim=3)
        ref = _reference_points(c, height, width, h.device, h.dtype)       # (1, 4, c, L)
        loc = (ref[:, :, None, None] + offsets).movedim(4, -1)              # (., 4, S, K, L, c)
        if c == 1:  # a sequence is a 1 x L map: y = 0
            loc = torch.cat([torch.zeros_like(loc), loc], -1)
            source = h.reshape(batch * k, s, dim // s, 1, length)
        else:
            source = uncross(h, height, width).reshape(batch * k, s, dim // s, height, width)
        loc = loc.expand(batch, -1, -1, -1, -1, -1).reshape(batch * k, s, kp, length, 2)
        weights = weights.expand(batch, -1, -1, -1, -1).reshape(batch * k, s, kp, length)
        agg = aggregate(source, loc, weights, self.interpolate).reshape(batch, k, dim, length)
        return h + agg if self.residual else agg
