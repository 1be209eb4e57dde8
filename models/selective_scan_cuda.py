"""Autograd wrapper of the compiled CUDA selective-scan extension `defmamba_scan_cuda` (kernels/selective_scan)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["CudaScan", "cuda_extension_available", "cuda_extension_error"]

try:  # built by `pip install --no-build-isolation kernels/selective_scan`
    import defmamba_scan_cuda as _ext
except ImportError as _err:
    _ext = None
    _ext_import_error = str(_err)
else:
    _ext_import_error = ""


def cuda_extension_available() -> bool:
    """True when the compiled extension `defmamba_scan_cuda` could be imported."""
    return _ext is not None


def cuda_extension_error() -> str:
    """Why the extension could not be imported ("" when it was)."""
    return _ext_import_error


class CudaScan(torch.autograd.Function):
    """Autograd wrapper around the `defmamba_scan_cuda` extension (contract in its README)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
        u, delta, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta, B, C))
        out, states = _ext.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, True)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
        ctx.delta_softplus = delta_softplus
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        du, ddelta, dA, dB, dC, dD, dbias = _ext.bwd(u, delta, A, B, C, D, delta_bias, dy, states,
                                                     ctx.delta_softplus)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None,
                dbias if delta_bias is not None else None, None)
