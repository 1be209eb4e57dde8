"""Selective scan (S6) front end: the CUDA extension when it can run, a pure-PyTorch scan otherwise.

Layout (Mamba / VMamba convention, one B/C group per scan branch):

    u, delta      (batch, D, L)        any float dtype
    A             (D, N)               fp32
    B, C          (batch, G, N, L)     D % G == 0; channel d reads group d // (D // G)
    D_skip, bias  (D,)                 fp32, optional

    dt_t = softplus(delta_t + bias)          (if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0
    y_t  = <C_t, h_t> + D_skip * u_t         returned in fp32 (fp64 for fp64 inputs)

Implementations, one file each: selective_scan_torch.py (pure PyTorch, the readable reference) and
selective_scan_cuda.py (the compiled extension of kernels/selective_scan).
"""
from __future__ import annotations

import logging
from typing import Optional

from torch import Tensor

from .selective_scan_cuda import CudaScan, cuda_extension_available, cuda_extension_error
from .selective_scan_torch import _ReferenceScan, selective_scan_reference

__all__ = ["selective_scan_fn", "selective_scan_reference", "cuda_extension_available"]

_logger = logging.getLogger(__name__)

_fallback_announced = False


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  delta_bias: Optional[Tensor]) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, D, L); got {tuple(u.shape)} and {tuple(delta.shape)}")
    bsz, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N); got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape != C.shape or B.shape[0] != bsz or B.shape[2] != A.shape[1] or B.shape[3] != length:
        raise ValueError(f"B and C must be (batch={bsz}, G, N={A.shape[1]}, L={length}); "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    if dim % B.shape[1]:
        raise ValueError(f"D={dim} is not divisible by the number of B/C groups G={B.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be ({dim},); got {tuple(t.shape)}")


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                      delta_bias: Optional[Tensor] = None, delta_softplus: bool = True) -> Tensor:
    """Selective scan y = S6(u; delta, A, B, C, D) in fp32; see the module docstring for shapes.

    CUDA tensors go to the compiled extension when it is installed; everything else (and CUDA when
    the extension is missing, announced once in the log) runs the pure-PyTorch reference.
    """
    global _fallback_announced
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    if u.is_cuda:
        if cuda_extension_available():
            return CudaScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
        if not _fallback_announced:
            _fallback_announced = True
            _logger.warning("CUDA selective-scan extension not available (%s); using the pure-PyTorch "
                            "reference scan, which is much slower. Build it with "
                            "`pip install --no-build-isolation kernels/selective_scan`.", cuda_extension_error())
    return _ReferenceScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
