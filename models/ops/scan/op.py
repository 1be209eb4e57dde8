"""The selective scan as torch.library custom ops, one pair for every backend.

    defmamba::selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, reversed_groups, backend)
        -> (y, saved)
    defmamba::selective_scan_backward(u, delta, A, B, C, D, delta_bias, dy, saved, delta_softplus,
                                      reversed_groups, backend) -> (du, ddelta, dA, dB, dC, dD, ddelta_bias)

torch.compile sees two opaque ops with fake (shape-only) implementations, so a DefMamba traces without
graph breaks at the scan whichever backend runs it; autograd is registered on the forward op. `backend`
is a `models.ops.backends.Backend` value chosen by the front end (__init__.py), which also checks
the shapes. `saved` is what that backend's backward needs, so no (batch, D, L, N) tensor is kept:

    cuda    the extension's fp32 tile states (batch, D, ceil(L/64) - 1, 16 or 64)
    triton  the state at the start of every chunk but the first (batch, D, chunks - 1, N)
    torch   nothing (an empty tensor): the backward op recomputes the forward

dD and ddelta_bias are unspecified when D and delta_bias are None (autograd returns None for them).
The B/C groups in `reversed_groups` scan backward in time (direction.py): read in place by the Triton
kernels, flipped around the scan for the torch and cuda backends.
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


def _saved_spec(backend: Backend, u: Tensor, A: Tensor) -> Tuple[Tuple[int, ...], torch.dtype]:
    batch, dim, length = u.shape
    if backend is Backend.CUDA:
        return cuda_state_shape(batch, dim, length, A.shape[1]), torch.float32
    if backend is Backend.TRITON:
        return _triton().state_shape(batch, dim, length, A.shape[1]), accumulation_dtype(u.dtype)
    return (0,), accumulation_dtype(u.dtype)


def _flipped(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, reversed_groups: List[int]):
    """u, delta, B, C with the reversed groups' steps in scan order (backends without a reversed kernel)."""
    groups = B.shape[1]
    return tuple(flip_groups(x, reversed_groups, groups) for x in (u, delta, B, C))


@torch.library.custom_op("defmamba::selective_scan", mutates_args=())
def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
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
        shape, dtype = _saved_spec(chosen, u, A)
        saved = u.new_empty(shape, dtype=dtype)
    return flip_groups(y, reversed_groups, B.shape[1]).contiguous(), saved


@selective_scan_op.register_fake
def _(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
      delta_bias: Optional[Tensor], delta_softplus: bool, reversed_groups: List[int],
      backend: str) -> Tuple[Tensor, Tensor]:
    shape, dtype = _saved_spec(Backend(backend), u, A)
    return u.new_empty(u.shape, dtype=accumulation_dtype(u.dtype)), u.new_empty(shape, dtype=dtype)


def _optional_grad(grad: Optional[Tensor], like: Optional[Tensor], u: Tensor) -> Tensor:
    """The op always returns a tensor; (D,) zeros stand for the gradient of an absent D / delta_bias."""
    if grad is not None:
        return grad
    return u.new_zeros(u.shape[1], dtype=like.dtype if like is not None else accumulation_dtype(u.dtype))


@torch.library.custom_op("defmamba::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                               delta_bias: Optional[Tensor], dy: Tensor, saved: Tensor, delta_softplus: bool,
                               reversed_groups: List[int], backend: str) -> Grads:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias), contiguous, each in its input's dtype."""
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
    dD, dbias = _optional_grad(dD, D, u), _optional_grad(dbias, delta_bias, u)
    return tuple(g.contiguous() for g in (du, ddelta, dA, dB, dC, dD, dbias))


@selective_scan_backward_op.register_fake
def _(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
      dy: Tensor, saved: Tensor, delta_softplus: bool, reversed_groups: List[int], backend: str) -> Grads:
    empty = lambda like: torch.empty(like.shape, dtype=like.dtype, device=like.device)  # noqa: E731
    return (empty(u), empty(delta), empty(A), empty(B), empty(C),
            _optional_grad(None, D, u), _optional_grad(None, delta_bias, u))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    u, delta, A, B, C, D, delta_bias, delta_softplus, reversed_groups, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.delta_softplus, ctx.reversed_groups, ctx.backend = delta_softplus, reversed_groups, backend


def _backward(ctx: Any, dy: Tensor, _dsaved: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    u, delta, A, B, C, D, delta_bias, saved = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias = selective_scan_backward_op(
        u, delta, A, B, C, D, delta_bias, dy, saved, ctx.delta_softplus, ctx.reversed_groups, ctx.backend)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None,
            None, None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
