"""Triton kernels of the DSSM's branch merge: K scan branches back to raster order, their mean, the gate.

For batch b, token l and channel d (contract of `models.ops.merge.merge_branches`):

    mean[b, l, d] = (1/K) sum_k ys[b, k, d, inverse[b, k, l]]
    out[b, l, d]  = mean[b, l, d] * silu(gate[b, l, d])          (without a gate: out = mean)

silu is rounded to the gate's dtype before the product, as `y * F.silu(z)` on a half-precision z does.
The backward is the adjoint: the gather by `inverse` becomes a store at the same steps. Each (b, k) row of
`inverse` is a permutation, so every step of dys is written exactly once: no atomics, no zero fill, and the
result is deterministic.

    dys[b, k, d, inverse[b, k, l]] = (1/K) dout[b, l, d] * silu(gate[b, l, d])
    dgate[b, l, d] = dout * mean * silu'(gate),  silu'(z) = sig(z) (1 + z (1 - sig(z)))

Work split: one program per (batch, tile of BLOCK_L tokens, tile of BLOCK_D channels); it reads each branch's
(BLOCK_D, BLOCK_L) tile once and writes its tokens once, channels last. Tiles are (channels, tokens) with the
tokens last: the addresses of a gathered load are data, so Triton cannot see their contiguity and lays the
lanes out along the last dim, which are the steps, contiguous in ys wherever the order keeps neighbours
together (the forward and backward branches: exactly). The channels-last side is the transposed layout
(Triton converts through shared memory); it moves 1/K of the branch side's bytes. ys and dys are contiguous
(B, K, D, L); out, mean, dout and dgate contiguous (B, L, D); inverse is read through its batch and branch
strides, the gate through its batch and token strides (channels contiguous, so its loads are coalesced too).
Arithmetic in ACC (fp32, or fp64 for fp64 callers, so the kernels can be checked against float64 references
in Triton's CPU interpreter). Device code only: the host side is models/ops/merge/triton.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["merge_fwd_kernel", "merge_bwd_kernel"]

# sizes and strides vary with the feature map: not specialised (one compiled kernel per dtype and tiling)
_RUNTIME_INTS = ["K", "D", "L", "si_b", "si_k", "sg_b", "sg_l"]


@triton.jit
def _tiles(BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, D, L):
    b = tl.program_id(0).to(tl.int64)
    tok = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ch = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = tok < L
    mask = (ch < D)[:, None] & mask_l[None, :]
    return b, tok, ch, mask_l, mask


@triton.jit
def _gate(gate_ptr, b, tok, ch, mask, sg_b, sg_l, ACC: tl.constexpr):
    # z, sigmoid(z), silu(z) rounded to the gate's dtype
    z = tl.load(gate_ptr + b * sg_b + tok[None, :] * sg_l + ch[:, None], mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z, sig, (z * sig).to(gate_ptr.dtype.element_ty).to(ACC)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def merge_fwd_kernel(
    ys_ptr, inv_ptr, gate_ptr, out_ptr, mean_ptr,
    K, D, L, si_b, si_k, sg_b, sg_l,
    HAS_GATE: tl.constexpr, SAVE_MEAN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, tok, ch, mask_l, mask = _tiles(BLOCK_L, BLOCK_D, D, L)
    total = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
    for k in range(K):
        step = tl.load(inv_ptr + b * si_b + k * si_k + tok, mask=mask_l, other=0)
        row = ((b * K + k) * D + ch[:, None]) * L
        total += tl.load(ys_ptr + row + step[None, :], mask=mask, other=0.0).to(ACC)
    mean = total / K  # sum then scale: the rounding of the reference's `.sum(1) / K`
    token = (b * L + tok[None, :]) * D + ch[:, None]
    if SAVE_MEAN:
        tl.store(mean_ptr + token, mean.to(mean_ptr.dtype.element_ty), mask=mask)
    out = mean
    if HAS_GATE:
        _, _, silu = _gate(gate_ptr, b, tok, ch, mask, sg_b, sg_l, ACC)
        out = mean * silu
    tl.store(out_ptr + token, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def merge_bwd_kernel(
    dout_ptr, inv_ptr, gate_ptr, mean_ptr, dys_ptr, dgate_ptr,
    K, D, L, si_b, si_k, sg_b, sg_l,
    HAS_GATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, tok, ch, mask_l, mask = _tiles(BLOCK_L, BLOCK_D, D, L)
    token = (b * L + tok[None, :]) * D + ch[:, None]
    grad = tl.load(dout_ptr + token, mask=mask, other=0.0).to(ACC)
    if HAS_GATE:
        z, sig, silu = _gate(gate_ptr, b, tok, ch, mask, sg_b, sg_l, ACC)
        mean = tl.load(mean_ptr + token, mask=mask, other=0.0).to(ACC)
        # d silu rounded to the gate's dtype first, as autograd hands it to silu's backward
        dsilu = (grad * mean).to(dgate_ptr.dtype.element_ty).to(ACC)
        dgate = dsilu * sig * (1.0 + z * (1.0 - sig))
        tl.store(dgate_ptr + token, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
        grad = grad * silu
    grad = grad / K
    for k in range(K):
        step = tl.load(inv_ptr + b * si_b + k * si_k + tok, mask=mask_l, other=0)
        row = ((b * K + k) * D + ch[:, None]) * L
        tl.store(dys_ptr + row + step[None, :], grad.to(dys_ptr.dtype.element_ty), mask=mask)
