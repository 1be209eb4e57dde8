"""Pure-PyTorch selective scan: the readable specification of the S6 scan and the CPU implementation.

Shapes and math are those of `models.selective_scan` (the front end that chooses an implementation).
The scan keeps no autograd graph: its backward recomputes the states and runs the adjoint recurrence.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import to_accumulation

__all__ = ["selective_scan_reference"]


def _linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """Solve h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along dim 2 of (batch, D, L, N) tensors.

    Two-level chunked scan: time is cut into about sqrt(L) chunks of about sqrt(L) steps; all chunks
    advance together from a zero state (one vectorised step per chunk position), then the true chunk
    start states are chained across chunks and folded back in with the chunk-local cumulative
    products of a. That is ~2 sqrt(L) small tensor operations instead of L, and only products of the
    a's (in [0, 1] for a stable SSM) are formed, never divisions, so nothing can overflow.
    """
    bsz, dim, length, nstate = a.shape
    steps = math.isqrt(length - 1) + 1 if length > 1 else 1
    pad = (-length) % steps
    if pad:
        # identity elements: a = 1, b = 0 leave the carried state unchanged
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad), value=0.0)
    nchunk = a.shape[2] // steps
    a = a.view(bsz, dim, nchunk, steps, nstate)
    b = b.view(bsz, dim, nchunk, steps, nstate)
    h = torch.empty_like(b)
    state = h[:, :, :, 0] = b[:, :, :, 0]
    for t in range(1, steps):
        state = h[:, :, :, t] = torch.addcmul(b[:, :, :, t], a[:, :, :, t], state)
    if nchunk > 1:
        decay = torch.cumprod(a, dim=3)
        start = h.new_zeros(bsz, dim, nchunk, nstate)
        for c in range(1, nchunk):
            start[:, :, c] = torch.addcmul(h[:, :, c - 1, -1], decay[:, :, c - 1, -1], start[:, :, c - 1])
        h = torch.addcmul(h, decay, start.unsqueeze(3))
    return h.view(bsz, dim, nchunk * steps, nstate)[:, :, :length]


def _expand_groups(x: Tensor, dim: int) -> Tensor:
    """(batch, G, N, L) -> (batch, D, L, N): each channel sees its group's B or C."""
    bsz, groups, nstate, length = x.shape
    return x.transpose(2, 3).repeat_interleave(dim // groups, dim=1)


def _reduce_groups(x: Tensor, groups: int) -> Tensor:
    """(batch, D, L, N) -> (batch, G, N, L): adjoint of `_expand_groups`."""
    bsz, dim, length, nstate = x.shape
    return x.reshape(bsz, groups, dim // groups, length, nstate).sum(2).transpose(2, 3)


def _discretize(u: Tensor, delta: Tensor, A: Tensor, Bg: Tensor, delta_bias: Optional[Tensor],
                delta_softplus: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 dt, the decay a = exp(dt A) and the input term b = dt u B, all (batch, D, L[, N])."""
    pre = to_accumulation(delta)
    if delta_bias is not None:
        pre = pre + to_accumulation(delta_bias)[:, None]
    dt = F.softplus(pre) if delta_softplus else pre
    a = torch.exp(dt.unsqueeze(-1) * to_accumulation(A)[:, None, :])
    b = (dt * to_accumulation(u)).unsqueeze(-1) * Bg
    return pre, dt, a, b


class _ReferenceScan(torch.autograd.Function):
    """Pure-PyTorch selective scan with a hand-written adjoint (works on every device)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
        dim = u.shape[1]
        Bg = _expand_groups(to_accumulation(B), dim)
        Cg = _expand_groups(to_accumulation(C), dim)
        _, _, a, b = _discretize(u, delta, A, Bg, delta_bias, delta_softplus)
        h = _linear_scan(a, b)
        y = torch.einsum("bdln,bdln->bdl", h, Cg)
        if D is not None:
            y = y + to_accumulation(D)[:, None] * to_accumulation(u)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        dim, groups = u.shape[1], B.shape[1]
        dy = to_accumulation(dy)
        uf = to_accumulation(u)
        Bg = _expand_groups(to_accumulation(B), dim)
        Cg = _expand_groups(to_accumulation(C), dim)
        pre, dt, a, b = _discretize(u, delta, A, Bg, delta_bias, ctx.delta_softplus)
        h = _linear_scan(a, b)

        dC = _reduce_groups(dy.unsqueeze(-1) * h, groups)
        # adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1}, run as a forward scan on flipped time
        a_next = torch.cat([a[:, :, 1:], torch.zeros_like(a[:, :, :1])], 2)
        g = _linear_scan(a_next.flip(2), (dy.unsqueeze(-1) * Cg).flip(2)).flip(2)
        h_prev = torch.cat([torch.zeros_like(h[:, :, :1]), h[:, :, :-1]], 2)
        da = g * h_prev * a  # d/d(dt A) of a = exp(dt A)

        gB = g * Bg
        du = dt * gB.sum(-1)
        ddt = uf * gB.sum(-1) + (da * to_accumulation(A)[:, None, :]).sum(-1)
        dB = _reduce_groups(g * (dt * uf).unsqueeze(-1), groups)
        dA = (da * dt.unsqueeze(-1)).sum((0, 2))
        dD = None
        if D is not None:
            du = du + to_accumulation(D)[:, None] * dy
            dD = (dy * uf).sum((0, 2))
        ddelta = ddt * torch.sigmoid(pre) if ctx.delta_softplus else ddt
        dbias = ddelta.sum((0, 2)) if delta_bias is not None else None
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if dD is None else dD.to(D.dtype),
                None if dbias is None else dbias.to(delta_bias.dtype), None)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = True) -> Tensor:
    """The pure-PyTorch scan, whatever the device (used by tests and benchmarks as the baseline)."""
    return _ReferenceScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
