"""Pure-PyTorch selective scan: the readable specification of the S6 scan and the CPU implementation.

Shapes and math are those of `models.ops.scan` (the front end that chooses an implementation).
The scan keeps no autograd graph: its backward recomputes the states and runs the adjoint recurrence.
Its peak memory is bounded by MEMORY_BUDGET_MB (env DEFMAMBA_SCAN_MEMORY_MB), whatever the batch.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import accumulation_dtype, to_accumulation

__all__ = ["MEMORY_BUDGET_MB", "scan_backward", "scan_forward", "selective_scan_reference"]


def _budget_from_env() -> float:
    raw = os.environ.get("DEFMAMBA_SCAN_MEMORY_MB", "1024")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"DEFMAMBA_SCAN_MEMORY_MB must be a number of MiB (0 = no blocking), got {raw!r}") from None


# Working memory of one scan call (forward or backward), in MiB: its results (y; du, ddelta, dB, dC) plus
# the (rows, L, N) temporaries of one block of (batch x channel) rows, blocks sized to fit. When the results
# alone exceed it, blocks are single channels. 0 processes all rows at once. Read at every call.
MEMORY_BUDGET_MB = _budget_from_env()
# (rows, L, N) tensors alive at once at the backward's peak (the forward needs fewer), measured.
_LIVE_TENSORS = 18


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


def _expand_groups(x: Tensor, dim: int, chans: slice) -> Tensor:
    """(batch, G, N, L) -> (batch, channels `chans` of `dim`, L, N): each channel sees its group's B or C."""
    group_of = torch.arange(chans.start, chans.stop, device=x.device) // (dim // x.shape[1])
    return x.transpose(2, 3).index_select(1, group_of)


def _add_groups(out: Tensor, x: Tensor, chans: slice, dim: int) -> None:
    """out (batch, G, N, L) += x (batch, channels `chans`, L, N) summed per group: adjoint of `_expand_groups`."""
    group_of = torch.arange(chans.start, chans.stop, device=x.device) // (dim // out.shape[1])
    out.index_add_(1, group_of, x.transpose(2, 3))


def _row_blocks(bsz: int, dim: int, length: int, nstate: int, itemsize: int,
                results: int) -> Iterator[Tuple[slice, slice]]:
    """(batch rows, channels) blocks covering (bsz, dim) such that the call's `results` full-size
    (batch, D, L) outputs plus one block's temporaries fit MEMORY_BUDGET_MB.

    Whole batch rows when at least one fits, else channel ranges of one batch row (at least one channel).
    """
    budget = MEMORY_BUDGET_MB * 2 ** 20 - results * bsz * dim * length * itemsize
    rows = int(budget // (_LIVE_TENSORS * length * nstate * itemsize)) if MEMORY_BUDGET_MB > 0 else bsz * dim
    if rows >= dim:
        step = rows // dim
        for b0 in range(0, bsz, step):
            yield slice(b0, min(b0 + step, bsz)), slice(0, dim)
    else:
        step = max(rows, 1)
        for b0 in range(bsz):
            for d0 in range(0, dim, step):
                yield slice(b0, b0 + 1), slice(d0, min(d0 + step, dim))


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


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """y (batch, D, L) in fp32 (fp64 for fp64 inputs), computed over blocks of (batch, channel) rows.

    Rows are independent, so the blocking of `_row_blocks` bounds the peak memory and never changes the math.
    """
    bsz, dim, length = u.shape
    y = torch.empty(bsz, dim, length, dtype=accumulation_dtype(u.dtype), device=u.device)
    for rows, chans in _row_blocks(bsz, dim, length, A.shape[1], y.element_size(), results=1):
        y[rows, chans] = _forward_rows(u[rows, chans], delta[rows, chans], A[chans], B[rows], C[rows],
                                       _pick(D, chans), _pick(delta_bias, chans), delta_softplus, chans, dim)
    return y


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  delta_bias: Optional[Tensor], delta_softplus: bool, dy: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias), each in its input's dtype (None for an absent D / bias).

    The states are recomputed block by block and the adjoint recurrence is run backwards in time.
    """
    bsz, dim, length = u.shape
    acc = accumulation_dtype(u.dtype)
    du, ddelta = torch.empty(u.shape, dtype=acc, device=u.device), torch.empty(u.shape, dtype=acc, device=u.device)
    dA = torch.zeros(A.shape, dtype=acc, device=A.device)
    dB, dC = (torch.zeros(B.shape, dtype=acc, device=B.device) for _ in range(2))
    dD = torch.zeros(dim, dtype=acc, device=u.device) if D is not None else None
    for rows, chans in _row_blocks(bsz, dim, length, A.shape[1], du.element_size(), results=3):
        du[rows, chans], ddelta[rows, chans], dA_rows, dD_rows = _backward_rows(
            dy[rows, chans], u[rows, chans], delta[rows, chans], A[chans], B[rows], C[rows], _pick(D, chans),
            _pick(delta_bias, chans), delta_softplus, chans, dim, dB[rows], dC[rows])
        dA[chans] += dA_rows
        if dD is not None:
            dD[chans] += dD_rows
    dbias = ddelta.sum((0, 2)) if delta_bias is not None else None
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if dD is None else dD.to(D.dtype), None if dbias is None else dbias.to(delta_bias.dtype))


class _ReferenceScan(torch.autograd.Function):
    """Autograd wrapper of `scan_forward` / `scan_backward` (works on every device)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        return scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        return scan_backward(u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, dy) + (None,)


def _pick(t: Optional[Tensor], chans: slice) -> Optional[Tensor]:
    return None if t is None else t[chans]


def _forward_rows(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  delta_bias: Optional[Tensor], delta_softplus: bool, chans: slice, dim: int) -> Tensor:
    """y of the channels `chans` (of `dim`) for a block of rows; u, delta, A, D, bias already sliced."""
    Bg = _expand_groups(to_accumulation(B), dim, chans)
    Cg = _expand_groups(to_accumulation(C), dim, chans)
    _, _, a, b = _discretize(u, delta, A, Bg, delta_bias, delta_softplus)
    del Bg
    h = _linear_scan(a, b)
    del a, b
    y = torch.einsum("bdln,bdln->bdl", h, Cg)
    if D is not None:
        y = y + to_accumulation(D)[:, None] * to_accumulation(u)
    return y


def _backward_rows(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   delta_bias: Optional[Tensor], delta_softplus: bool, chans: slice, dim: int, dB: Tensor,
                   dC: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(du, ddelta, dA, dD) of a block of rows; dB and dC (the block's batch rows) are accumulated in place."""
    dy = to_accumulation(dy)
    uf = to_accumulation(u)
    Af = to_accumulation(A)
    Bg = _expand_groups(to_accumulation(B), dim, chans)
    Cg = _expand_groups(to_accumulation(C), dim, chans)
    pre, dt, a, b = _discretize(u, delta, A, Bg, delta_bias, delta_softplus)
    h = _linear_scan(a, b)
    del b
    _add_groups(dC, dy.unsqueeze(-1) * h, chans, dim)
    # adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1}, run as a forward scan on flipped time
    a_next = torch.cat([a[:, :, 1:], torch.zeros_like(a[:, :, :1])], 2).flip(2)
    g = _linear_scan(a_next, (dy.unsqueeze(-1) * Cg).flip(2)).flip(2)
    del a_next, Cg
    h_prev = torch.cat([torch.zeros_like(h[:, :, :1]), h[:, :, :-1]], 2)
    del h
    da = g * h_prev * a  # d/d(dt A) of a = exp(dt A)
    del h_prev, a

    gB = (g * Bg).sum(-1)
    del Bg
    du = dt * gB
    ddt = uf * gB + (da * Af[:, None, :]).sum(-1)
    _add_groups(dB, g * (dt * uf).unsqueeze(-1), chans, dim)
    del g
    dA = (da * dt.unsqueeze(-1)).sum((0, 2))
    dD = None
    if D is not None:
        du = du + to_accumulation(D)[:, None] * dy
        dD = (dy * uf).sum((0, 2))
    ddelta = ddt * torch.sigmoid(pre) if delta_softplus else ddt
    return du, ddelta, dA, dD


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = True) -> Tensor:
    """The pure-PyTorch scan, whatever the device (used by tests and benchmarks as the baseline)."""
    return _ReferenceScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
