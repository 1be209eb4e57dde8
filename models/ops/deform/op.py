"""The deformable sequence as torch.library custom ops, one pair for every backend.

    defmamba::deformable_sequence(x, pos, table, disp, path, out_dtype, backend) -> (seq, perm)
    defmamba::deformable_sequence_backward(dseq, x, pos, table, disp, path, perm, need_*, backend)
        -> (dx, dpos, dtable, ddisp, dpath)

torch.compile sees opaque ops with fake (shape-only) implementations, so a DefMamba traces with
`fullgraph=True` whichever backend runs, and fvcore sees one node to count. Autograd is registered on the
forward op. `backend` is a `models.ops.backends.Backend` value chosen by the front end (__init__.py), which
also checks the shapes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import Backend
from .reference import deformable_sequence_reference, deformable_sequence_reference_backward

__all__ = ["deformable_sequence_op"]


def _triton():
    from . import triton as triton_sequence  # imported on first use: it imports triton
    return triton_sequence


def _order(path: Optional[Tensor], batch: int, length: int, device: torch.device) -> Tensor:
    if path is None:
        return torch.arange(length, device=device).expand(batch, length).contiguous()
    return torch.argsort(path, dim=-1, stable=True)


def _no_autocast(x: Tensor) -> torch.autocast:
    """The ops run their own precision (fp32 / fp64 sums): autocast must not turn the table resize into bf16."""
    return torch.autocast(x.device.type, enabled=False)


@torch.library.custom_op("defmamba::deformable_sequence", mutates_args=())
def deformable_sequence_op(x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                           path: Optional[Tensor], out_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor]:
    """(seq (B, C, H*W) in out_dtype, perm (B, H*W)); see the front end (__init__.py) for the arguments."""
    batch, _, height, width = x.shape
    with _no_autocast(x):
        if backend == Backend.TRITON.value:
            perm = _order(path, batch, height * width, x.device)
            return _triton().deformable_sequence_forward(x, pos, table, disp, perm, out_dtype), perm
        seq, perm = deformable_sequence_reference(x, pos, table, disp, path)
    return seq.to(out_dtype).contiguous(), perm.contiguous()


@deformable_sequence_op.register_fake
def _sequence_fake(x, pos, table, disp, path, out_dtype, backend):
    batch, channels, height, width = x.shape
    return (x.new_empty(batch, channels, height * width, dtype=out_dtype),
            x.new_empty(batch, height * width, dtype=torch.long))


@torch.library.custom_op("defmamba::deformable_sequence_backward", mutates_args=())
def _sequence_backward_op(dseq: Tensor, x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                          path: Optional[Tensor], perm: Tensor, need_x: bool, need_pos: bool, need_table: bool,
                          need_disp: bool, need_path: bool, backend: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dpos, dtable, ddisp, dpath); a gradient that is not needed comes back as an empty tensor."""
    needs = (need_x, need_pos, need_table, need_disp, need_path)
    implementation = (_triton().deformable_sequence_backward if backend == Backend.TRITON.value
                      else deformable_sequence_reference_backward)
    with _no_autocast(x):
        grads = implementation(dseq, x, pos, table, disp, perm, *needs)
    return tuple(dseq.new_empty(0) if grad is None
                 else grad.reshape(t.shape).to(dtype=t.dtype, memory_format=torch.contiguous_format)
                 for grad, t in zip(grads, (x, pos, table, disp, path)))


@_sequence_backward_op.register_fake
def _sequence_backward_fake(dseq, x, pos, table, disp, path, perm, need_x, need_pos, need_table, need_disp,
                            need_path, backend):
    needs = (need_x, need_pos, need_table, need_disp, need_path)
    # contiguous whatever the inputs' strides, like the real implementations
    return tuple(t.new_empty(t.shape) if need and t is not None else dseq.new_empty(0)
                 for t, need in zip((x, pos, table, disp, path), needs))


def _setup_context(ctx, inputs, output) -> None:
    x, pos, table, disp, path, _out_dtype, backend = inputs
    ctx.save_for_backward(x, pos, table, disp, path, output[1])
    ctx.backend = backend


def _backward(ctx, dseq: Tensor, _dperm: Optional[Tensor]):
    x, pos, table, disp, path, perm = ctx.saved_tensors
    needs = tuple(bool(ctx.needs_input_grad[i]) and t is not None
                  for i, t in enumerate((x, pos, table, disp, path)))
    grads = _sequence_backward_op(dseq, x, pos, table, disp, path, perm, *needs, ctx.backend)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


deformable_sequence_op.register_autograd(_backward, setup_context=_setup_context)
