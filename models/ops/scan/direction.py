"""Scan direction per B/C group: groups in `reversed_groups` run backward in time, t = L-1 down to 0,

    h_t = exp(dt_t A) h_{t+1} + dt_t B_t u_t,   h_L = 0,   y_t = <C_t, h_t> + D u_t,

which is the forward scan of the group's steps in reverse order, with y put back in step order. That is how
the backends without a reversed kernel (torch, cuda) run it: `flip_groups` copies the reversed groups'
steps in reverse order before the scan and the results (y; du, ddelta, dB, dC) back after it. The Triton
kernels read and write such groups in place instead (kernels/triton/selective_scan.py).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

__all__ = ["flip_groups", "check_reversed_groups"]


def check_reversed_groups(reversed_groups: Sequence[int], groups: int) -> None:
    """ValueError unless reversed_groups are distinct indices of the `groups` B/C groups."""
    if any(not 0 <= g < groups for g in reversed_groups) or len(set(reversed_groups)) != len(reversed_groups):
        raise ValueError(f"reversed_groups must be distinct B/C group indices in [0, {groups}); "
                         f"got {list(reversed_groups)}")


def flip_groups(x: Tensor, reversed_groups: Sequence[int], groups: int) -> Tensor:
    """x (batch, groups * P, L) or (batch, groups, N, L) with the steps of the given groups of dim 1 reversed
    (a copy; x itself when there are none). Flipping twice gives x back."""
    if not reversed_groups:
        return x
    grouped = x.reshape(x.shape[0], groups, -1, x.shape[-1])
    flipped = grouped.clone()
    for g in reversed_groups:  # python indices: no index tensor to copy to the device
        flipped[:, g] = grouped[:, g].flip(-1)
    return flipped.view(x.shape)
