"""Selective scan (S6) forward and backward kernels in Triton: compiled on a GPU at first use, no build step.

Device code only; the host side (tiling, launch, the partial-sum reduction) is models/ops/scan/triton.py.
Contract: that of `models.ops.scan.selective_scan_fn` (u, delta (batch, D, L); A (D, N); B, C
(batch, G, N, L); optional D, delta_bias (D,)), with L contiguous (stride 1) in delta, B, C and dy. A launch
reads u from one piece (u_ptr: channels u_d0 onwards of u, strides su_b, su_d, su_l), so u given in pieces is
read where the pieces are, never concatenated; a piece is L-contiguous or token-major (U_TOKENS: channels
contiguous, as a channels-last convolution leaves them).
Arithmetic in fp32, or fp64 for fp64 inputs (so the kernels can be checked against float64 references in
Triton's CPU interpreter, TRITON_INTERPRET=1).

Work split: one program per (batch, group, block of BLOCK_D channels of that group). Time is cut into
chunks of CHUNK steps; a program walks its chunks in order and, per chunk, loads (BLOCK_D, CHUNK) tiles of
u, delta (and dy) and (CHUNK,) rows of B and C, all contiguous along L. For every state n it runs the
recurrence h_t = a_t h_{t-1} + b_t over the chunk's (BLOCK_D, CHUNK) tile with `tl.associative_scan`,
starting from the chunk's start state, which it carries in registers as a (BLOCK_D, BLOCK_N) tile.
A state is a column of that tile: read and written with a select and a row sum, so no register tile is
ever indexed.

Direction: a launch scans the groups of `group_mask` (NG of them), all forward in time or, with REVERSE, all
backward (t = L-1 down to 0: the DSSM's backward branch read in place, no reversed copy). A reversed scan
walks the chunks from the end and runs each tile's scans in the other direction, so its tiles are the same
ascending, contiguous loads and its outputs land at the steps they belong to.

Forward: y is written once per chunk; the state at the start of every chunk but the first is stored,
`states` (batch, D, chunks - 1, N). Backward: chunks last to first; each is recomputed from its stored
start state and the adjoint g_t = dy_t C_t + a_{t+1} g_{t+1} runs as a reverse associative scan over the
same tile, carrying q = a g across chunks; nothing is written per time step except the gradients.

Determinism: no atomics. dB/dC are sums over a group's channels: each channel block writes its own rows
(straight into dB/dC when a group is one block, else fp32 partials (batch, G, blocks, N, L) that the host
adds up in a fixed order), dA/dD/ddelta_bias are per-batch partials; results are bitwise reproducible.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["scan_fwd_kernel", "scan_bwd_kernel"]

# Sizes and strides are not specialised by the JIT (that would compile one kernel per sequence length); the
# host passes ALIGN instead, the largest power of two (<= 16 bytes) dividing every (batch, D, L) row start, so
# that Triton can vectorise the row loads and give each thread ALIGN consecutive steps of the tile: the scan is
# then mostly sequential in registers and only log2(lanes) shuffle steps deep.
_RUNTIME_INTS = ["L", "G", "per_group", "N", "nchunk", "nblock", "NG", "group_mask", "u_d0", "su_b", "su_d",
                 "su_l", "sdl_b", "sdl_d", "sA_d", "sB_b", "sB_g", "sB_n", "sC_b", "sC_g", "sC_n", "sdy_b", "sdy_d"]
_UNALIGNED = ["B_ptr", "C_ptr"]  # views of the x projection at any offset


@triton.jit
def _softplus(x):
    # log(1 + e^x) keeping the digits of small e^x (Goldberg's log1p; no portable tl.log1p)
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    return tl.where(x > 20.0, x, tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0))))


@triton.jit
def _recurrence(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adjoint(f2, p2, s2, f1, p1, s1):
    # reverse scan (Triton passes the later segment first). A segment [i, j) is (a_i, prod a_{i+1..j-1},
    # sum_k prod a_{i+1..k} x_k): then g_i = s + p a_j g_j, the recurrence g_t = x_t + a_{t+1} g_{t+1}
    w = p1 * f2
    return f1, w * p2, s1 + w * s2


@triton.jit
def _load_tile(ptr, row, t, mask, ACC: tl.constexpr):
    return tl.load(ptr + row[:, None] + t[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _u_row(b, d, u_d0, su_b, su_d, ALIGN: tl.constexpr, U_TOKENS: tl.constexpr):
    # u_ptr: the piece of u from channel u_d0 on
    row = b * su_b + (d - u_d0) * su_d
    if not U_TOKENS:
        row = tl.multiple_of(row, ALIGN)
    return row


@triton.jit
def _load_u(ptr, row, t, su_l, mask, ACC: tl.constexpr, U_TOKENS: tl.constexpr):
    # a token-major piece (channels contiguous, steps su_l apart: the channels-last conv output of a DSSM) is read
    # as it lies, coalesced along the channels; Triton moves the tile to the layout of the others
    if U_TOKENS:
        return tl.load(ptr + row[:, None] + t[None, :].to(tl.int64) * su_l, mask=mask, other=0.0).to(ACC)
    return _load_tile(ptr, row, t, mask, ACC)


@triton.jit
def _group(j, NG, G, group_mask):
    # the j-th set bit of group_mask: the groups of this launch (all of them when NG == G)
    g = j
    if NG < G:
        seen = 0
        for i in range(G):
            bit = ((group_mask >> i) & 1).to(tl.int32)
            g = tl.where((bit == 1) & (seen == j), i, g)
            seen += bit
    return g


@triton.jit
def _chunk_start(c, L, CHUNK: tl.constexpr, ALIGN: tl.constexpr, REVERSE: tl.constexpr):
    # first memory step of the c-th chunk in scan order; a reversed scan's chunks end at L, L - CHUNK, ...,
    # so its tiles stay ascending, contiguous loads (ALIGN divides L, hence the start)
    start = c * CHUNK
    if REVERSE:
        start = tl.multiple_of(L - (c + 1) * CHUNK, ALIGN)
    return start


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_UNALIGNED)
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, states_ptr,
    L, G, per_group, N, nchunk, NG, group_mask, u_d0,
    su_b, su_d, su_l, sdl_b, sdl_d, sA_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ALIGN: tl.constexpr,
    REVERSE: tl.constexpr, U_TOKENS: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    b = (pid_bg // NG).to(tl.int64)
    g = _group(pid_bg % NG, NG, G, group_mask)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = g * per_group + ch
    n = tl.arange(0, BLOCK_N)
    mask_dn = mask_d[:, None] & (n < N)[None, :]
    steps = tl.arange(0, CHUNK)
    last = (steps == (0 if REVERSE else CHUNK - 1))[None, :]  # the chunk's last step in scan order
    SINGLE: tl.constexpr = BLOCK_N == 1  # DAMamba, VMamba: the state selects below fold away
    dim = G * per_group

    # padded channels/states read A = 0, u = B = C = 0: their state stays 0 and they add nothing
    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :], mask=mask_dn, other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(ACC)
    Dskip = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(ACC)

    u_row = _u_row(b, d, u_d0, su_b, su_d, ALIGN, U_TOKENS)
    delta_row = tl.multiple_of(b * sdl_b + d * sdl_d, ALIGN)
    y_row = tl.multiple_of((b * dim + d) * L, ALIGN)
    B_row = B_ptr + b * sB_b + g * sB_g
    C_row = C_ptr + b * sC_b + g * sC_g
    state_ptrs = states_ptr + (b * dim + d[:, None]) * (nchunk - 1) * N + n[None, :]

    H = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    for c in range(nchunk):
        t = _chunk_start(c, L, CHUNK, ALIGN, REVERSE) + steps
        mask_t = (t >= 0) & (t < L)
        mask = mask_d[:, None] & mask_t[None, :]
        u = _load_u(u_ptr, u_row, t, su_l, mask, ACC, U_TOKENS)
        dt = _load_tile(delta_ptr, delta_row, t, mask, ACC) + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(mask, dt, 0.0)  # steps past L: a = 1, b = 0 keep the state
        dtu = dt * u
        y = Dskip[:, None] * u
        for i in range(N):
            sel = ((n == i) | SINGLE)[None, :]
            B_i = tl.load(B_row + i * sB_n + t, mask=mask_t, other=0.0).to(ACC)
            C_i = tl.load(C_row + i * sC_n + t, mask=mask_t, other=0.0).to(ACC)
            a = tl.exp(dt * tl.sum(tl.where(sel, A, 0.0), axis=1)[:, None])
            pa, pb = tl.associative_scan((a, dtu * B_i[None, :]), 1, _recurrence, reverse=REVERSE)
            h = pa * tl.sum(tl.where(sel, H, 0.0), axis=1)[:, None] + pb
            y += h * C_i[None, :]
            H = tl.where(sel, tl.sum(tl.where(last, h, 0.0), axis=1)[:, None], H)
        tl.store(y_ptr + y_row[:, None] + t[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(state_ptrs + c * N, H.to(states_ptr.dtype.element_ty), mask=mask_dn & (c + 1 < nchunk))


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_UNALIGNED)
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, states_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    L, G, per_group, N, nchunk, nblock, NG, group_mask, u_d0,
    su_b, su_d, su_l, sdl_b, sdl_d, sA_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sdy_b, sdy_d,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ALIGN: tl.constexpr,
    REVERSE: tl.constexpr, U_TOKENS: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_blk = tl.program_id(1)
    b = (pid_bg // NG).to(tl.int64)
    g = _group(pid_bg % NG, NG, G, group_mask)
    ch = pid_blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = g * per_group + ch
    n = tl.arange(0, BLOCK_N)
    mask_dn = mask_d[:, None] & (n < N)[None, :]
    steps = tl.arange(0, CHUNK)
    first = (steps == (CHUNK - 1 if REVERSE else 0))[None, :]  # the chunk's first step in scan order
    SINGLE: tl.constexpr = BLOCK_N == 1
    dim = G * per_group

    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :], mask=mask_dn, other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(ACC)
    Dskip = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dskip = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(ACC)

    u_row = _u_row(b, d, u_d0, su_b, su_d, ALIGN, U_TOKENS)
    delta_row = tl.multiple_of(b * sdl_b + d * sdl_d, ALIGN)
    dy_row = tl.multiple_of(b * sdy_b + d * sdy_d, ALIGN)
    out_row = tl.multiple_of((b * dim + d) * L, ALIGN)            # du, ddelta: contiguous (batch, D, L)
    part_row = ((b * G + g) * nblock + pid_blk) * N * L            # dB, dC rows: (batch, G, nblock, N, L)
    B_row = B_ptr + b * sB_b + g * sB_g
    C_row = C_ptr + b * sC_b + g * sC_g
    state_ptrs = states_ptr + (b * dim + d[:, None]) * (nchunk - 1) * N + n[None, :]

    Q = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)   # a_t g_t at the first step of the chunk after this one
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dD = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias = tl.zeros((BLOCK_D,), dtype=ACC)
    for k in range(nchunk):
        c = nchunk - 1 - k
        t = _chunk_start(c, L, CHUNK, ALIGN, REVERSE) + steps
        mask_t = (t >= 0) & (t < L)
        mask = mask_d[:, None] & mask_t[None, :]
        H0 = tl.load(state_ptrs + (c - 1) * N, mask=mask_dn & (c > 0), other=0.0).to(ACC)
        u = _load_u(u_ptr, u_row, t, su_l, mask, ACC, U_TOKENS)
        dy = _load_tile(dy_ptr, dy_row, t, mask, ACC)
        dt = _load_tile(delta_ptr, delta_row, t, mask, ACC) + bias[:, None]
        slope = tl.full(dt.shape, 1.0, ACC)            # d dt / d delta
        if SOFTPLUS:
            slope = 1.0 / (1.0 + tl.exp(-dt))          # softplus' = sigmoid
            dt = _softplus(dt)
        dt = tl.where(mask, dt, 0.0)
        dtu = dt * u
        gB = tl.zeros((BLOCK_D, CHUNK), dtype=ACC)    # sum_n g B: d/d(dt u)
        gA = tl.zeros((BLOCK_D, CHUNK), dtype=ACC)    # sum_n A d/d(dt A)
        for i in range(N):
            sel = ((n == i) | SINGLE)[None, :]
            A_i = tl.sum(tl.where(sel, A, 0.0), axis=1)[:, None]
            B_i = tl.load(B_row + i * sB_n + t, mask=mask_t, other=0.0).to(ACC)[None, :]
            C_i = tl.load(C_row + i * sC_n + t, mask=mask_t, other=0.0).to(ACC)[None, :]
            # recompute the chunk's states from its start state
            a = tl.exp(dt * A_i)
            bb = dtu * B_i
            pa, pb = tl.associative_scan((a, bb), 1, _recurrence, reverse=REVERSE)
            h = pa * tl.sum(tl.where(sel, H0, 0.0), axis=1)[:, None] + pb
            # adjoint from the carry q = a g of the next chunk's first step
            _, p, s = tl.associative_scan((a, tl.full(a.shape, 1.0, ACC), dy * C_i), 1, _adjoint,
                                          reverse=not REVERSE)
            gr = s + p * tl.sum(tl.where(sel, Q, 0.0), axis=1)[:, None]
            Q = tl.where(sel, tl.sum(tl.where(first, a * gr, 0.0), axis=1)[:, None], Q)
            da = gr * (h - bb)                        # d loss / d(dt A) = g a h_{t-1}, and a h_{t-1} = h - b
            dA += tl.where(sel, tl.sum(da * dt, axis=1)[:, None], 0.0)
            gB += gr * B_i
            gA += da * A_i
            row = part_row + i * L + t
            tl.store(dB_ptr + row, tl.sum(gr * dtu, axis=0).to(dB_ptr.dtype.element_ty), mask=mask_t)
            tl.store(dC_ptr + row, tl.sum(h * dy, axis=0).to(dC_ptr.dtype.element_ty), mask=mask_t)
        du = dt * gB + Dskip[:, None] * dy
        ddt = tl.where(mask, (u * gB + gA) * slope, 0.0)
        tl.store(du_ptr + out_row[:, None] + t[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + out_row[:, None] + t[None, :], ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        dD += tl.sum(dy * u, axis=1)
        dbias += tl.sum(ddt, axis=1)

    tl.store(dA_ptr + (b * dim + d[:, None]) * N + n[None, :], dA, mask=mask_dn)
    tl.store(dD_ptr + b * dim + d, dD, mask=mask_d)
    tl.store(dbias_ptr + b * dim + d, dbias, mask=mask_d)
