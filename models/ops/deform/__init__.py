"""Front end of the deformable branch's token sequence (paper Sec. 3.3): one call from features to sorted sequence.

    features[b, c, n] = sample(x, pos)[b, c, n] (+ sample(table, disp)[b, c, n] when a table is given)
    perm[b]           = stable ascending argsort of path[b]      (raster order 0..N-1 when path is None)
    seq[b, c, n]      = features[b, c, perm[b, n]]

with the gradients of the autograd Functions in point_offset.py, offset_bias.py and index_offset.py
(including the averaged-gradient surrogate for `path`).

Two implementations, chosen per call by `models.backends.get_backend("deform")` (DEFMAMBA_DEFORM_BACKEND):
    torch   the composition of those Functions below (`deformable_sequence_reference`): the readable spec;
    triton  one fused kernel per direction (deformable_sequence_triton.py, kernels/triton/deformable.py);
    auto    triton for CUDA tensors when Triton imports, torch otherwise.
Both run inside one torch.library custom op, `defmamba::deformable_sequence`, with a fake (meta)
implementation and autograd, so `torch.compile(fullgraph=True)` traces models that use it and fvcore sees
one node to count.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import Backend, BackendUnavailable, get_backend, triton_interpreting
from .bilinear import bilinear_sample_backward
from .triton import (deformable_sequence_backward, deformable_sequence_forward,
                                         kernels_interpreted, triton_import_error)
from .index_offset import sort_tokens
from .offset_bias import offset_bias, resize_table, resize_table_backward
from .point_offset import sample_at_points
from ..precision import common_accumulation_dtype, to_accumulation

__all__ = ["deformable_sequence", "deformable_sequence_reference", "choose_backend"]


def deformable_sequence_reference(x: Tensor, pos: Tensor, table: Optional[Tensor] = None,
                                  disp: Optional[Tensor] = None, path: Optional[Tensor] = None
                                  ) -> Tuple[Tensor, Tensor]:
    """Pure-PyTorch deformable sequence (see the module docstring); returns (seq (B, C, N) fp32, perm (B, N))."""
    features = sample_at_points(x, pos)
    if table is not None:
        features = features + offset_bias(table, disp)
    features = features.flatten(2)
    if path is None:
        batch, _, length = features.shape
        return features, torch.arange(length, device=x.device).expand(batch, length)
    return sort_tokens(features, path)


def choose_backend(x: Tensor) -> Backend:
    """TORCH or TRITON for features `x` under the requested backend; BackendUnavailable when forced and impossible."""
    requested = get_backend("deform")
    if requested is Backend.AUTO:
        return Backend.TRITON if x.is_cuda and triton_import_error() is None else Backend.TORCH
    if requested is Backend.CUDA:
        raise BackendUnavailable("DEFMAMBA_DEFORM_BACKEND=cuda: the deformable sequence has no CUDA-extension "
                                 "backend; use auto, triton or torch")
    if requested is Backend.TRITON:
        if triton_import_error() is not None:
            raise BackendUnavailable(f"DEFMAMBA_DEFORM_BACKEND=triton: Triton kernels unavailable "
                                     f"({triton_import_error()})")
        if not x.is_cuda and not (triton_interpreting() and kernels_interpreted()):
            raise BackendUnavailable(f"DEFMAMBA_DEFORM_BACKEND=triton: {x.device.type} tensors need a CUDA device "
                                     f"or TRITON_INTERPRET=1 set before the kernels are first used")
    return requested


def _order(path: Optional[Tensor], batch: int, length: int, device: torch.device) -> Tensor:
    if path is None:
        return torch.arange(length, device=device).expand(batch, length).contiguous()
    return torch.argsort(path, dim=-1, stable=True)


def _no_autocast(x: Tensor) -> torch.autocast:
    """The ops run their own precision (fp32 / fp64 sums): autocast must not turn the table resize into bf16."""
    return torch.autocast(x.device.type, enabled=False)


@torch.library.custom_op("defmamba::deformable_sequence", mutates_args=())
def _sequence_op(x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor], path: Optional[Tensor],
                 out_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor]:
    batch, _, height, width = x.shape
    with _no_autocast(x):
        if backend == Backend.TRITON.value:
            perm = _order(path, batch, height * width, x.device)
            return deformable_sequence_forward(x, pos, table, disp, perm, out_dtype), perm
        seq, perm = deformable_sequence_reference(x, pos, table, disp, path)
    return seq.to(out_dtype).contiguous(), perm.contiguous()


@_sequence_op.register_fake
def _sequence_fake(x, pos, table, disp, path, out_dtype, backend):
    batch, channels, height, width = x.shape
    return (x.new_empty(batch, channels, height * width, dtype=out_dtype),
            x.new_empty(batch, height * width, dtype=torch.long))


def _reference_backward(dseq: Tensor, x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                        perm: Tensor, need_x: bool, need_pos: bool, need_table: bool, need_disp: bool,
                        need_path: bool) -> Tuple[Optional[Tensor], ...]:
    """Adjoint of `deformable_sequence_reference`, built from the pieces its autograd Functions use.

    (A custom op's implementation runs below autograd, so it cannot differentiate the Functions themselves;
    the tests check this adjoint against them.)
    """
    batch, _, height, width = x.shape
    dseq = to_accumulation(dseq)
    # IndexOffsetSort: exact scatter back to token order, channel-averaged surrogate for the path
    dfeat = torch.empty_like(dseq).scatter_(2, perm.unsqueeze(1).expand_as(dseq), dseq)
    dpath = (dseq - dfeat).mean(1) if need_path else None
    dx = dpos = dtable = ddisp = None
    if need_x or need_pos:  # PointOffsetSample
        dx, dpos = bilinear_sample_backward(x, pos.reshape(batch, -1, 2), dfeat, need_x, need_pos)
    if table is not None and (need_table or need_disp):  # OffsetBias: sample the resized table, resize adjoint
        resized, ry, rx = resize_table(table, (height, width))
        dres, ddisp = bilinear_sample_backward(resized.unsqueeze(0), disp.reshape(batch, -1, 2), dfeat,
                                               need_table, need_disp)
        dtable = None if dres is None else resize_table_backward(dres[0], ry, rx)
    return dx, dpos, dtable, ddisp, dpath


@torch.library.custom_op("defmamba::deformable_sequence_backward", mutates_args=())
def _sequence_backward_op(dseq: Tensor, x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                          path: Optional[Tensor], perm: Tensor, need_x: bool, need_pos: bool, need_table: bool,
                          need_disp: bool, need_path: bool, backend: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dpos, dtable, ddisp, dpath); a gradient that is not needed comes back as an empty tensor."""
    needs = (need_x, need_pos, need_table, need_disp, need_path)
    implementation = deformable_sequence_backward if backend == Backend.TRITON.value else _reference_backward
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


_sequence_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x: Tensor, pos: Tensor, table: Optional[Tensor], disp: Optional[Tensor],
                  path: Optional[Tensor]) -> None:
    if (table is None) != (disp is None):
        raise ValueError("table and disp must be given together")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W); got {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    grid = (batch, height, width, 2)
    if tuple(pos.shape) != grid:
        raise ValueError(f"pos must be (B, H, W, 2) = {grid}; got {tuple(pos.shape)}")
    if disp is not None and tuple(disp.shape) != grid:
        raise ValueError(f"disp must be (B, H, W, 2) = {grid}; got {tuple(disp.shape)}")
    if table is not None and (table.dim() != 3 or table.shape[0] != channels):
        raise ValueError(f"table must be (C={channels}, h, w); got {tuple(table.shape)}")
    if path is not None and tuple(path.shape) != (batch, height * width):
        raise ValueError(f"path must be (B, H*W) = {(batch, height * width)}; got {tuple(path.shape)}")


def deformable_sequence(x: Tensor, pos: Tensor, table: Optional[Tensor] = None, disp: Optional[Tensor] = None,
                        path: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None
                        ) -> Tuple[Tensor, Tensor]:
    """Deformed, re-ordered token sequence.

    Args:
        x: features (B, C, H, W), any float dtype.
        pos: deformed sampling points (B, H, W, 2), normalised (y, x), align-corners, zeros outside.
        table: offset-bias table (C, h, w) resized to (H, W) inside, or None for no offset bias.
        disp: normalised (y, x) displacements (B, H, W, 2) at which the resized table is sampled.
        path: per-token positions on the 1-D scan path (B, H*W) whose ascending order is the scan order,
            or None to keep the raster order.
        out_dtype: dtype of seq (e.g. the one the scan reads); None: fp32 (fp64 for fp64 inputs).
            Sums are accumulated in that fp32 / fp64 precision and rounded once.

    Returns:
        seq (B, C, H*W) and perm (B, H*W) int64, seq[:, :, n] = features[:, :, perm[:, n]].
    """
    _check_inputs(x, pos, table, disp, path)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point dtype; got {out_dtype}")
    acc = common_accumulation_dtype(x, pos, table, disp)
    backend = choose_backend(x)
    return torch.ops.defmamba.deformable_sequence(x, pos, table, disp, path, out_dtype or acc, backend.value)
