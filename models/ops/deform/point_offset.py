"""Point offset (paper Sec. 3.3, Eq. 3): features sampled bilinearly at reference points + learned offsets."""
from __future__ import annotations

import torch
from torch import Tensor

from .bilinear import bilinear_sample, bilinear_sample_backward

__all__ = ["PointOffsetSample", "sample_at_points"]


class PointOffsetSample(torch.autograd.Function):
    """x (B, C, H, W) sampled at pos (B, H', W', 2) -> (B, C, H', W'), gradients to x and pos.

    pos holds normalised (y, x) coordinates, align-corners convention, zeros outside the image.
    The result is fp32 (fp64 for fp64 inputs) whatever the dtype of x, as the release's grid_sample
    is under autocast.
    """

    @staticmethod
    def forward(ctx, x: Tensor, pos: Tensor) -> Tensor:
        batch, out_h, out_w = pos.shape[:3]
        flat_pos = pos.reshape(batch, out_h * out_w, 2)
        out = bilinear_sample(x, flat_pos)
        ctx.save_for_backward(x, flat_pos)
        ctx.pos_shape = pos.shape
        return out.view(batch, x.shape[1], out_h, out_w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, flat_pos = ctx.saved_tensors
        dx, dpos = bilinear_sample_backward(x, flat_pos, grad.flatten(2), ctx.needs_input_grad[0],
                                            ctx.needs_input_grad[1])
        return (None if dx is None else dx.to(x.dtype),
                None if dpos is None else dpos.view(ctx.pos_shape).to(flat_pos.dtype))


def sample_at_points(x: Tensor, pos: Tensor) -> Tensor:
    """Functional form of `PointOffsetSample`."""
    return PointOffsetSample.apply(x, pos)
