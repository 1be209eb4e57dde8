"""Selective scan (S6) forward and backward kernels in Triton: compiled on a GPU at first use, no build step.

Device code only; the host side (tiling, launch, the partial-sum reduction) is models/ops/scan/triton.py.
Contract: that of `models.ops.scan.selective_scan_fn` (u, delta (batch, D, L); A (D, N); B, C
(batch, G, N, L); optional D, delta_bias (D,)). Arithmetic in fp32, or fp64 for fp64 inputs (so the
kernels can be checked against float64 references in Triton's CPU interpreter, TRITON_INTERPRET=1).

Work split: one program per (batch, group, block of BLOCK_D channels of that group), holding the
(BLOCK_D, N) state in registers and walking time step by step (the recurrence is sequential; the
parallelism is over batch x channels).

Memory stays O(inputs): time is cut into chunks of CHUNK = min(64, L) steps and the forward stores
only the state at the start of every chunk, `states` (batch, D, chunks, N). The backward visits the
chunks last to first: it recomputes the chunk's states from the stored start state into a small
per-program scratch buffer (chunk + 1 states), then runs the adjoint recurrence backwards through it.

Determinism: no atomics. dB/dC are written as per-channel-block partial sums (batch, G, blocks, N, L)
and dA/dD/ddelta_bias as per-batch partials (batch, D[, N]); each partial is written by exactly one
program and they are added up with `torch.sum`, so results are bitwise reproducible.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["scan_fwd_kernel", "scan_bwd_kernel"]


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, states_ptr,
    L, G, per_group, N, nchunk,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    b = pid_bg // G
    g = pid_bg % G
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = g * per_group + ch
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dim = G * per_group

    # padded channels/states read A = 0, B = C = u = 0: their state stays 0 and they add nothing
    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=mask_dn, other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(ACC)
    Dskip = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(ACC)

    u_row = u_ptr + b * su_b + d * su_d
    delta_row = delta_ptr + b * sdl_b + d * sdl_d
    B_row = B_ptr + b * sB_b + g * sB_g + n * sB_n
    C_row = C_ptr + b * sC_b + g * sC_g + n * sC_n
    y_row = y_ptr + (b * dim + d) * L
    state_ptrs = states_ptr + ((b * dim + d[:, None]) * nchunk) * N + n[None, :]

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    for c in range(nchunk):
        tl.store(state_ptrs + c * N, h.to(states_ptr.dtype.element_ty), mask=mask_dn)
        for s in range(CHUNK):
            t = c * CHUNK + s
            valid = t < L
            dt = tl.load(delta_row + t * sdl_l, mask=mask_d & valid, other=0.0).to(ACC) + bias
            if SOFTPLUS:
                # log(1 + e^x) keeping the digits of small e^x (Goldberg's log1p; no portable tl.log1p)
                x = tl.exp(tl.minimum(dt, 20.0))
                w = 1.0 + x
                dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, x, tl.log(w) * (x / (w - 1.0))))
            u = tl.load(u_row + t * su_l, mask=mask_d & valid, other=0.0).to(ACC)
            Bt = tl.load(B_row + t * sB_l, mask=mask_n & valid, other=0.0).to(ACC)
            Ct = tl.load(C_row + t * sC_l, mask=mask_n & valid, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dskip * u
            tl.store(y_row + t, y.to(y_ptr.dtype.element_ty), mask=mask_d & valid)


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, states_ptr, scratch_h_ptr, scratch_dt_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    L, G, per_group, N, nchunk, nblock,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sdy_b, sdy_d, sdy_l,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_blk = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    ch = pid_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = g * per_group + ch
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dim = G * per_group

    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=mask_dn, other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(ACC)
    Dskip = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(ACC)

    u_row = u_ptr + b * su_b + d * su_d
    delta_row = delta_ptr + b * sdl_b + d * sdl_d
    dy_row = dy_ptr + b * sdy_b + d * sdy_d
    B_row = B_ptr + b * sB_b + g * sB_g + n * sB_n
    C_row = C_ptr + b * sC_b + g * sC_g + n * sC_n
    out_row = (b * dim + d) * L                      # du, ddelta: contiguous (batch, D, L)
    part_row = ((pid_bg * nblock + pid_blk) * N + n) * L  # dB, dC partials: (batch, G, nblock, N, L)
    state_ptrs = states_ptr + ((b * dim + d[:, None]) * nchunk) * N + n[None, :]
    program = pid_bg * nblock + pid_blk
    scratch_h = scratch_h_ptr + program * (CHUNK + 1) * BLOCK_D * BLOCK_N \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    scratch_dt = scratch_dt_ptr + program * 2 * CHUNK * BLOCK_D + tl.arange(0, BLOCK_D)

    q = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)  # a_{t+1} g_{t+1}: the adjoint flowing back into step t
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dD = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias = tl.zeros((BLOCK_D,), dtype=ACC)
    for i in range(nchunk):
        c = nchunk - 1 - i
        # recompute the chunk into the scratch: slot s + 1 holds h_{c*CHUNK + s} (slot 0 the start state),
        # with dt and d dt / d delta of each step
        h = tl.load(state_ptrs + c * N, mask=mask_dn, other=0.0).to(ACC)
        tl.store(scratch_h, h)
        for s in range(CHUNK):
            t = c * CHUNK + s
            valid = t < L
            pre = tl.load(delta_row + t * sdl_l, mask=mask_d & valid, other=0.0).to(ACC) + bias
            if SOFTPLUS:
                x = tl.exp(tl.minimum(pre, 20.0))
                w = 1.0 + x
                dt = tl.where(pre > 20.0, pre, tl.where(w == 1.0, x, tl.log(w) * (x / (w - 1.0))))
                tl.store(scratch_dt + (CHUNK + s) * BLOCK_D, 1.0 / (1.0 + tl.exp(-pre)))  # softplus' = sigmoid
            else:
                dt = pre
            u = tl.load(u_row + t * su_l, mask=mask_d & valid, other=0.0).to(ACC)
            Bt = tl.load(B_row + t * sB_l, mask=mask_n & valid, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch_h + (s + 1) * BLOCK_D * BLOCK_N, h)
            tl.store(scratch_dt + s * BLOCK_D, dt)
        tl.debug_barrier()
        # adjoint, last step first: g_t = dy_t C_t + a_{t+1} g_{t+1}. Steps past L have dy = C = 0, so g = 0.
        for j in range(CHUNK):
            s = CHUNK - 1 - j
            t = c * CHUNK + s
            valid = t < L
            dt = tl.load(scratch_dt + s * BLOCK_D)
            u = tl.load(u_row + t * su_l, mask=mask_d & valid, other=0.0).to(ACC)
            dy = tl.load(dy_row + t * sdy_l, mask=mask_d & valid, other=0.0).to(ACC)
            Bt = tl.load(B_row + t * sB_l, mask=mask_n & valid, other=0.0).to(ACC)
            Ct = tl.load(C_row + t * sC_l, mask=mask_n & valid, other=0.0).to(ACC)
            h = tl.load(scratch_h + (s + 1) * BLOCK_D * BLOCK_N)
            h_prev = tl.load(scratch_h + s * BLOCK_D * BLOCK_N)
            a = tl.exp(dt[:, None] * A)
            gr = dy[:, None] * Ct[None, :] + q
            da = gr * a * h_prev                     # d loss / d (dt A)
            gB = tl.sum(gr * Bt[None, :], axis=1)
            du = dt * gB + Dskip * dy
            ddt = u * gB + tl.sum(da * A, axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.load(scratch_dt + (CHUNK + s) * BLOCK_D)
            dA += da * dt[:, None]
            dD += dy * u
            dbias += ddt
            tl.store(du_ptr + out_row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d & valid)
            tl.store(ddelta_ptr + out_row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d & valid)
            tl.store(dB_ptr + part_row + t, tl.sum(gr * (dt * u)[:, None], axis=0), mask=mask_n & valid)
            tl.store(dC_ptr + part_row + t, tl.sum(h * dy[:, None], axis=0), mask=mask_n & valid)
            q = a * gr
        tl.debug_barrier()  # the next chunk rewrites the scratch

    tl.store(dA_ptr + (b * dim + d[:, None]) * N + n[None, :], dA, mask=mask_dn)
    tl.store(dD_ptr + b * dim + d, dD, mask=mask_d)
    tl.store(dbias_ptr + b * dim + d, dbias, mask=mask_d)
