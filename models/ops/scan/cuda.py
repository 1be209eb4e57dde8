"""The compiled CUDA selective-scan extension `defmamba_scan_cuda` (kernels/selective_scan), as plain functions.

Autograd and torch.compile support come from the custom op in op.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

__all__ = ["cuda_extension_available", "cuda_extension_error", "cuda_unavailable", "cuda_state_shape",
           "cuda_scan_forward", "cuda_scan_backward"]

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


def cuda_unavailable(device_type: str) -> Optional[str]:
    """Why the extension cannot run `device_type` tensors (None when it can)."""
    if _ext is None:
        return f"the defmamba_scan_cuda extension is not installed ({_ext_import_error})"
    if device_type != "cuda":
        return f"the CUDA extension needs CUDA tensors, got {device_type}"
    return None


def cuda_state_shape(batch: int, dim: int, length: int, nstate: int) -> Tuple[int, int, int, int]:
    """Shape of the fp32 tile states the extension's forward returns (contract in its README)."""
    tiles = -(-length // 64)
    return batch, dim, max(tiles - 1, 0), 16 if nstate <= 16 else 64


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def cuda_scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      delta_bias: Optional[Tensor], delta_softplus: bool) -> Tuple[Tensor, Tensor]:
    """(y in fp32, tile states for `cuda_scan_backward`)."""
    u, delta, B, C = (_last_dim_contiguous(t) for t in (u, delta, B, C))
    y, states = _ext.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, True)
    return y, states


def cuda_scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       delta_bias: Optional[Tensor], delta_softplus: bool, dy: Tensor, states: Tensor
                       ) -> Tuple[Optional[Tensor], ...]:
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias); dD / ddelta_bias are None when D / delta_bias are."""
    u, delta, B, C, dy = (_last_dim_contiguous(t) for t in (u, delta, B, C, dy))
    grads = _ext.bwd(u, delta, A, B, C, D, delta_bias, dy, states, delta_softplus)
    return tuple(grads[:5]) + (grads[5] if D is not None else None, grads[6] if delta_bias is not None else None)
