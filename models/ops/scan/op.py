"""The selective scan as torch.library custom ops, one pair for every backend.

    defmamba::selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend) -> (y, saved)
    defmamba::selective_scan_backward(u, delta, A, B, C, D, delta_bias, dy, saved, delta_softplus, backend)
        -> (du, ddelta, dA, dB, dC, dD, ddelta_bias)

torch.compile sees two opaque ops with fake (shape-only) implementations, so a DefMamba traces without
graph breaks at the scan whichever backend runs it; autograd is registered on the forward op. `backend`
is a `models.ops.backends.Backend` value chosen by the front end (__init__.py), which also checks
the shapes. `saved` is what that backend's backward needs, so no (batch, D, L, N) tensor is kept:

    cuda    the extension's fp32 tile states (batch, D, ceil(L/64) - 1, 16 or 64)
    triton  the state at the start of every chunk but the first (batch, D, chunks - 1, N)
    torch   nothing (an empty tensor): the backward op recomputes the forward

dD and ddelta_bias are unspecified when D and delta_bias are None (autograd returns None for them).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..backends import Backend
from ..precision import accumulation_dtype
from .cuda import cuda_scan_backward, cuda_scan_forward, cuda_state_shape
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


@torch.library.custom_op("defmamba::selective_scan", mutates_args=())
def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      delta_bias: Optional[Tensor], delta_softplus: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """y (batch, D, L) in fp32 (fp64 for fp64 inputs), and what `backend`'s backward needs."""
    args = (u, delta, A, B, C, D, delta_bias, delta_softplus)
    chosen = Backend(backend)
    if chosen is Backend.CUDA:
        return cuda_scan_forward(*args)
    if chosen is Backend.TRITON:
        return _triton().scan_forward(*args)
    y = scan_forward(*args).contiguous()
    shape, dtype = _saved_spec(chosen, u, A)
    return y, u.new_empty(shape, dtype=dtype)


@selective_scan_op.register_fake
def _(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
      delta_bias: Optional[Tensor], delta_softplus: bool, backend: str) -> Tuple[Tensor, Tensor]:
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
                               backend: str) -> Grads:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias), contiguous, each in its input's dtype."""
    args = (u, delta, A, B, C, D, delta_bias, delta_softplus)
    chosen = Backend(backend)
    if chosen is Backend.CUDA:
        grads = cuda_scan_backward(*args, dy, saved)
    elif chosen is Backend.TRITON:
        grads = _triton().scan_backward(*args, dy, saved)
    else:
        grads = scan_backward(*args, dy)
    du, ddelta, dA, dB, dC, dD, dbias = grads
    dD, dbias = _optional_grad(dD, D, u), _optional_grad(dbias, delta_bias, u)
    return tuple(g.contiguous() for g in (du, ddelta, dA, dB, dC, dD, dbias))


@selective_scan_backward_op.register_fake
def _(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
      dy: Tensor, saved: Tensor, delta_softplus: bool, backend: str) -> Grads:
    empty = lambda like: torch.empty(like.shape, dtype=like.dtype, device=like.device)  # noqa: E731
    return (empty(u), empty(delta), empty(A), empty(B), empty(C),
            _optional_grad(None, D, u), _optional_grad(None, delta_bias, u))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    u, delta, A, B, C, D, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _backward(ctx: Any, dy: Tensor, _dsaved: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    u, delta, A, B, C, D, delta_bias, saved = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias = selective_scan_backward_op(
        u, delta, A, B, C, D, delta_bias, dy, saved, ctx.delta_softplus, ctx.backend)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None,
            None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
