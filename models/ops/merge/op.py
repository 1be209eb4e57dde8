"""The branch merge as torch.library custom ops, one pair for every backend.

    defmamba::merge_branches(ys, inverse, gate, out_dtype, save_mean, backend) -> (out, mean)
    defmamba::merge_branches_backward(dout, ys, inverse, gate, mean, backend) -> (dys, dgate)

torch.compile sees opaque ops with fake (shape-only) implementations; autograd is registered on the forward
op. `backend` is a `models.ops.backends.Backend` value chosen by the front end (__init__.py), which also checks
the shapes. `mean` is what the backward needs for the gate's gradient, so ys (K times larger) is not kept:

    triton  the un-gated mean (B, L, D) when a gate is given and save_mean, else empty
    torch   nothing (empty): the backward op keeps ys and recomputes the mean

`mean` always has ys' dtype, which tells the backward the dtype of dys.

dgate is an empty tensor when there is no gate.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..backends import Backend
from .reference import merge_branches_reference, merge_branches_reference_backward

__all__ = ["merge_branches_op"]


def _triton():
    from . import triton as triton_merge  # imported on first use: it imports triton
    return triton_merge


def _saved(ys: Tensor, gate: Optional[Tensor], save_mean: bool, backend: str) -> Tensor:
    batch, _, dim, length = ys.shape
    keep = backend == Backend.TRITON.value and gate is not None and save_mean
    return ys.new_empty((batch, length, dim) if keep else (0,))


@torch.library.custom_op("defmamba::merge_branches", mutates_args=())
def merge_branches_op(ys: Tensor, inverse: Tensor, gate: Optional[Tensor], out_dtype: torch.dtype,
                      save_mean: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(out (B, L, D) in out_dtype, what the backward needs); see the front end for the arguments."""
    if backend == Backend.TRITON.value:
        return _triton().merge_forward(ys, inverse, gate, out_dtype, _saved(ys, gate, save_mean, backend))
    return merge_branches_reference(ys, inverse, gate, out_dtype).contiguous(), _saved(ys, gate, save_mean, backend)


@merge_branches_op.register_fake
def _(ys: Tensor, inverse: Tensor, gate: Optional[Tensor], out_dtype: torch.dtype, save_mean: bool,
      backend: str) -> Tuple[Tensor, Tensor]:
    batch, _, dim, length = ys.shape
    return ys.new_empty(batch, length, dim, dtype=out_dtype), _saved(ys, gate, save_mean, backend)


@torch.library.custom_op("defmamba::merge_branches_backward", mutates_args=())
def merge_branches_backward_op(dout: Tensor, ys: Optional[Tensor], inverse: Tensor, gate: Optional[Tensor],
                               mean: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """(dys (B, K, D, L) in mean's dtype (that of ys), dgate (B, L, D) in the gate's dtype, or empty without a
    gate). ys is needed by the torch backend only."""
    if backend == Backend.TRITON.value:
        return _triton().merge_backward(dout, inverse, gate, mean)
    dys, dgate = merge_branches_reference_backward(dout, ys, inverse, gate)
    return dys.contiguous(), dgate.contiguous() if dgate is not None else mean.new_empty(0)


@merge_branches_backward_op.register_fake
def _(dout: Tensor, ys: Optional[Tensor], inverse: Tensor, gate: Optional[Tensor], mean: Tensor,
      backend: str) -> Tuple[Tensor, Tensor]:
    batch, length, dim = dout.shape
    dys = dout.new_empty(batch, inverse.shape[1], dim, length, dtype=mean.dtype)
    return dys, (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if gate is not None
                 else mean.new_empty(0))


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    ys, inverse, gate, _out_dtype, _save_mean, backend = inputs
    # the torch backward recomputes from ys; the Triton one needs only the mean (which has ys' dtype)
    ctx.save_for_backward(ys if backend != Backend.TRITON.value else None, inverse, gate, output[1])
    ctx.backend = backend


def _backward(ctx: Any, dout: Tensor, _dmean: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    ys, inverse, gate, mean = ctx.saved_tensors
    dys, dgate = merge_branches_backward_op(dout.contiguous(), ys, inverse, gate, mean, ctx.backend)
    return dys, None, dgate if gate is not None else None, None, None, None


merge_branches_op.register_autograd(_backward, setup_context=_setup_context)
