"""Fixed token orders of the DSSM's scan branches (paper Sec. 3.3 and the branch ablation, Table 4).

An order of an H x W grid is a permutation `order` of the raster indices 0..H*W-1: step n of the scan
visits token order[n], so a branch's sequence is `raster[..., order]` and its output goes back to raster
order through the inverse permutation.

- raster:     row by row, left to right (the forward branch, FB).
- reversed:   the raster order backwards (the backward branch, BB).
- continuous: rows alternate direction (boustrophedon / snake), so consecutive tokens are always spatial
              neighbours (PlainMamba's continuous 2-D scan, the paper's "CB").
- local:      the grid is cut into window x window tiles visited in raster order, each scanned in raster
              order inside (LocalMamba's local scan, the paper's "LB"); tiles at the right and bottom edges
              are smaller when the window does not divide H or W.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["raster_order", "reversed_order", "continuous_order", "local_order", "inverse_order"]


def raster_order(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H*W,) int64: 0, 1, ..., H*W-1."""
    return torch.arange(height * width, device=device)


def reversed_order(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H*W,) int64: H*W-1, ..., 1, 0."""
    return torch.arange(height * width - 1, -1, -1, device=device)


def continuous_order(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H*W,) int64 snake order: even rows left to right, odd rows right to left."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    cols = torch.where(rows % 2 == 1, width - 1 - cols, cols)
    return (rows * width + cols).flatten()


def local_order(height: int, width: int, window: int, device: torch.device | None = None) -> Tensor:
    """(H*W,) int64 windowed raster order with window x window tiles (see the module docstring)."""
    if window < 1:
        raise ValueError(f"local scan window must be >= 1, got {window}")
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    tiles_per_row = -(-width // window)
    tile = (rows // window) * tiles_per_row + cols // window
    # raster index breaks the ties inside a tile, so one sort of (tile, raster) gives the order
    key = (tile * (height * width) + rows * width + cols).flatten()
    return torch.argsort(key)


def inverse_order(order: Tensor) -> Tensor:
    """Inverse permutation(s) along the last dim: inverse[..., order[..., n]] = n."""
    steps = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, steps)
