"""The Triton adaptive sampling as torch.library custom ops:

    defmamba::adaptive_sample(x, offsets) -> out (B, C, H, W) fp32 (fp64 for fp64)
    defmamba::adaptive_sample_backward(dout, x, offsets, need_x, need_offsets) -> (dx, doffsets)

torch.compile sees opaque ops with fake (shape-only) implementations, so a DAMamba traces with
`fullgraph=True` on this backend too. Autograd is registered on the forward op; the gradients come back in
the inputs' dtypes. The torch backend stays the autograd Function of reference.py (which fvcore counts as
the point offset, utils/flops.py).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..precision import common_accumulation_dtype

__all__ = ["adaptive_sample_op"]


def _triton():
    from . import triton as triton_sampling  # imported on first use: it imports triton
    return triton_sampling


@torch.library.custom_op("defmamba::adaptive_sample", mutates_args=())
def adaptive_sample_op(x: Tensor, offsets: Tensor) -> Tensor:
    """x (B, C, H, W) sampled per group at the pixel offsets (B, H, W, 2G); see the front end (__init__.py)."""
    return _triton().adaptive_forward(x, offsets)


@adaptive_sample_op.register_fake
def _sample_fake(x, offsets):
    return x.new_empty(x.shape, dtype=common_accumulation_dtype(x, offsets))


@torch.library.custom_op("defmamba::adaptive_sample_backward", mutates_args=())
def _sample_backward_op(dout: Tensor, x: Tensor, offsets: Tensor, need_x: bool, need_offsets: bool
                        ) -> Tuple[Tensor, Tensor]:
    """(dx, doffsets) in the inputs' dtypes, contiguous; a gradient that is not needed is an empty tensor."""
    grads = _triton().adaptive_backward(dout, x, offsets, need_x, need_offsets)
    return tuple(dout.new_empty(0) if grad is None
                 else grad.to(dtype=t.dtype, memory_format=torch.contiguous_format)
                 for grad, t in zip(grads, (x, offsets)))


@_sample_backward_op.register_fake
def _sample_backward_fake(dout, x, offsets, need_x, need_offsets):
    return tuple(t.new_empty(t.shape) if need else dout.new_empty(0)
                 for t, need in zip((x, offsets), (need_x, need_offsets)))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout: Tensor):
    x, offsets = ctx.saved_tensors
    needs = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    grads = _sample_backward_op(dout, x, offsets, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


adaptive_sample_op.register_autograd(_backward, setup_context=_setup_context)
