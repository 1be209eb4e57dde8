"""The selective scan as torch.library custom ops, one pair for every backend.

    defmamba::selective_scan(u[], delta, A, B, C, D, delta_bias, delta_softplus, reversed_groups, backend)
        -> (y, saved)
    defmamba::selective_scan_backward(u[], delta, A, B, C, D, delta_bias, dy, saved, delta_softplus,
                                      reversed_groups, backend) -> (du, ddelta, dA, dB, dC, dD, ddelta_bias)

u is a list of pieces along D (usually one); du is one (batch, D, L) tensor, handed to the pieces as views.

torch.compile sees two opaque ops with fake (shape-only) implementations, so a DefMamba traces without
graph breaks at the scan whichever backend runs it; autograd is registered on the forward op. `backend`
is a `models.ops.backends.Backend` value chosen by the front end (__init__.py), which also checks
the shapes. `saved` is what that backend's backward needs, so no (batch, D, L, N) tensor is kept:

    cuda    the extension's fp32 tile states (batch, D, ceil(L/64) - 1, 16 or 64)
    triton  the state at the start of every chunk but the first (batch, D, chunks - 1, N)
    torch   nothing (an empty tensor): the backward op recomputes the forward

dD and ddelta_bias are unspecified when D and delta_bias are None (autograd returns None for them).
The B/C groups in `reversed_groups` scan backward in time (direction.py). The Triton kernels read the pieces
and the reversed groups in place; the torch and cuda backends concatenate the pieces whenever they run (in
the forward and again in the backward: only the pieces are saved) and flip the reversed groups around the scan.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from ..backends import Backend
from ..precision import accumulation_dtype
from .cuda import cuda_scan_backward, cuda_scan_forward, cuda_state_shape
from .direction import flip_groups
from .reference import scan_backward, scan_forward

__all__ = ["selective_scan_op"]

Grads = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _triton():
    from . import triton as triton_scan  # imported on first use: it imports triton
    return triton_scan


def _saved_spec(backend: Backend, u: List[Tensor], delta: Tensor, A: Tensor) -> Tuple[Tuple[int, ...], torch.dtype]:
    batch, dim, length = delta.shape
    acc = accumulation_dtype(u[0].dtype)
    if backend is Backend.CUDA:
        return cuda_state_shape(batch, dim, length, A.shape[1]), torch.float32
    if backend is Backend.TRITON:
        return _triton().state_shape(batch, dim, length, A.shape[1]), acc
    return (0,), acc


def _flipped(u: List[Tensor], delta: Tensor, B: Tensor, C: Tensor, reversed_groups: List[int]):
    """u in one tensor, delta, B, C with the reversed groups' steps in scan order (backends without a
    reversed kernel or pieces)."""
    whole = u[0] if len(u) == 1 else torch.cat(u, 1)
    groups = B.shape[1]
    return tuple(flip_groups(x, reversed_groups, groups) for x in (whole, delta, B, C))


@torch.library.custom_op("defmamba::selective_scan", mutates_args=())
def selective_scan_op(u: List[Tensor], delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      delta_bias: Optional[Tensor], delta_softplus: bool, reversed_groups: List[int],
                      backend: str) -> Tuple[Tensor, Tensor]:
    """y (batch, D, L) in fp32 (fp64 for fp64 inputs), and what `backend`'s backward needs."""
    chosen = Backend(backend)
    if chosen is Backend.TRITON:
        return _triton().scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, reversed_groups)
    fu, fdelta, fB, fC = _flipped(u, delta, B, C, reversed_groups)
    args = (fu, fdelta, A, fB, fC, D, delta_bias, delta_softplus)
    if chosen is Backend.CUDA:
        y, saved = cuda_scan_forward(*args)
    else:
        y = scan_forward(*args)
        shape, dtype = _saved_spec(chosen, u, delta, A)
        saved = delta.new_empty(shape, dtype=dtype)
    return flip_groups(y, reversed_groups, B.shape[1]).contiguous(), saved


@selective_scan_op.register_fake
def _(u: List[Tensor], delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
      delta_bias: Optional[Tensor], delta_softplus: bool, reversed_groups: List[int],
      backend: str) -> Tuple[Tensor, Tensor]:
    shape, dtype = _saved_spec(Backend(backend), u, delta, A)
    return delta.new_empty(delta.shape, dtype=accumulation_dtype(u[0].dtype)), delta.new_empty(shape, dtype=dtype)


def _optional_grad(grad: Optional[Tensor], like: Optional[Tensor], u: List[Tensor], delta: Tensor) -> Tensor:
    """The op always returns a tensor; (D,) zeros stand for the gradient of an absent D / delta_bias."""
    if grad is not None:
        return grad
    return delta.new_zeros(delta.shape[1], dtype=like.dtype if like is not None else accumulation_dtype(u[0].dtype))


@torch.library.custom_op("defmamba::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(u: List[Tensor], delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor], delta_bias: Optional[Tensor], dy: Tensor, saved: Tensor,
                               delta_softplus: bool, reversed_groups: List[int], backend: str) -> Grads:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias), contiguous, each in its input's dtype (du (batch, D, L) for
    the whole of u)."""
    chosen = Backend(backend)
    if chosen is Backend.TRITON:
        du, ddelta, dA, dB, dC, dD, dbias = _triton().scan_backward(u, delta, A, B, C, D, delta_bias, delta_softplus,
                                                                    dy, saved, reversed_groups)
    else:
        groups = B.shape[1]
        fu, fdelta, fB, fC = _flipped(u, delta, B, C, reversed_groups)
        args = (fu, fdelta, A, fB, fC, D, delta_bias, delta_softplus, flip_groups(dy, reversed_groups, groups))
        grads = cuda_scan_backward(*args, saved) if chosen is Backend.CUDA else scan_backward(*args)
        du, ddelta, dA, dB, dC, dD, dbias = grads
        du, ddelta, dB, dC = (flip_groups(g, reversed_groups, groups) for g in (du, ddelta, dB, dC))
    dD, dbias = _optional_grad(dD, D, u, delta), _optional_grad(dbias, delta_bias, u, delta)
    return tuple(g.contiguous() for g in (du, ddelta, dA, dB, dC, dD, dbias))


@selective_scan_backward_op.register_fake
def _(u: List[Tensor], delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
      delta_bias: Optional[Tensor], dy: Tensor, saved: Tensor, delta_softplus: bool, reversed_groups: List[int],
      backend: str) -> Grads:
    empty = lambda like, dtype: torch.empty(like.shape, dtype=dtype, device=like.device)  # noqa: E731
    return (empty(delta, u[0].dtype), empty(delta, delta.dtype), empty(A, A.dtype), empty(B, B.dtype),
            empty(C, C.dtype), _optional_grad(None, D, u, delta), _optional_grad(None, delta_bias, u, delta))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    u, delta, A, B, C, D, delta_bias, delta_softplus, reversed_groups, backend = inputs
    ctx.save_for_backward(*u, delta, A, B, C, D, delta_bias, output[1])
    ctx.pieces, ctx.delta_softplus, ctx.reversed_groups, ctx.backend = len(u), delta_softplus, reversed_groups, \
        backend


def _backward(ctx: Any, dy: Tensor, _dsaved: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    saved_tensors = ctx.saved_tensors
    u, (delta, A, B, C, D, delta_bias, saved) = list(saved_tensors[:ctx.pieces]), saved_tensors[ctx.pieces:]
    du, ddelta, dA, dB, dC, dD, dbias = selective_scan_backward_op(
        u, delta, A, B, C, D, delta_bias, dy, saved, ctx.delta_softplus, ctx.reversed_groups, ctx.backend)
    # each piece's gradient is a view of du; a tensor given as several pieces gets their sum from autograd
    du_pieces = list(du.split([x.shape[1] for x in u], 1)) if len(u) > 1 else [du]
    # the structure must mirror the inputs': torch reads an empty reversed_groups as an (empty) tensor list
    return (du_pieces, ddelta, dA, dB, dC, dD if D is not None else None,
            dbias if delta_bias is not None else None, None, None if ctx.reversed_groups else [], None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
