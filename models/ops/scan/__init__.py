"""Selective scan (S6) front end: checks the shapes, picks a backend, runs the custom op.

Layout (Mamba / VMamba convention, one B/C group per scan branch):

    u, delta      (batch, D, L)        fp32, fp16 or bf16 (fp64 runs in fp64, for tests)
    A             (D, N)               fp32
    B, C          (batch, G, N, L)     D % G == 0; channel d reads group d // (D // G)
    D_skip, bias  (D,)                 fp32, optional

    dt_t = softplus(delta_t + bias)          (if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0
    y_t  = <C_t, h_t> + D_skip * u_t         returned in fp32 (fp64 for fp64 inputs)

Backends (models.backends.get_backend("scan"): DEFMAMBA_SCAN_BACKEND or set_backend / use_backend):

    cuda    the compiled extension (kernels/selective_scan, selective_scan_cuda.py)
    triton  the Triton kernels (kernels/triton/selective_scan.py): compiled at first use on a GPU;
            on the CPU only in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)
    torch   the pure-PyTorch reference (selective_scan_torch.py), the readable specification
    auto    cuda when installed and the tensors are on a GPU, else triton on a GPU, else torch

Every backend runs through the custom op "defmamba::selective_scan" (selective_scan_op.py), so
torch.compile traces the scan without graph breaks; a compiled model keeps the backend it was traced with.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional, Set, Tuple

import torch
from torch import Tensor

from ..backends import Backend, BackendUnavailable, get_backend, triton_interpreting
from .cuda import cuda_extension_available, cuda_extension_error
from .op import selective_scan_op
from .reference import selective_scan_reference

__all__ = ["selective_scan_fn", "selective_scan_reference", "resolve_scan_backend", "cuda_extension_available"]

# a child of the trainer's "defmamba" logger (utils/logger.py), so the choice reaches its console and files
_logger = logging.getLogger("defmamba.scan")
_announced: Set[Tuple[Backend, Backend, str]] = set()


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


def _triton_missing(device_type: str) -> Optional[str]:
    """Why the Triton kernels cannot run on `device_type` tensors (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if device_type != "cpu":
        return f"Triton kernels need CUDA tensors, got {device_type}"
    if not triton_interpreting():
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
    from kernels.triton.selective_scan import kernels_interpreted
    if not kernels_interpreted():
        return "TRITON_INTERPRET=1 was set after the Triton scan kernels were compiled for the GPU"
    return None


def _unavailable(backend: Backend, device_type: str) -> Optional[str]:
    """Why a forced `backend` cannot run on `device_type` tensors (None when it can)."""
    if backend is Backend.CUDA:
        if not cuda_extension_available():
            return f"the defmamba_scan_cuda extension is not installed ({cuda_extension_error()})"
        if device_type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got {device_type}"
    elif backend is Backend.TRITON:
        return _triton_missing(device_type)
    return None


def resolve_scan_backend(device_type: str) -> Backend:
    """The backend that runs a scan on `device_type` tensors now; raises BackendUnavailable if a forced
    backend cannot. The first use of each choice is logged (under torch.compile: once, while tracing)."""
    return Backend(_resolve(device_type))


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing (it logs) and keeps the result
def _resolve(device_type: str) -> str:
    requested = get_backend("scan")
    if requested is Backend.AUTO:
        if device_type == "cuda" and cuda_extension_available():
            chosen = Backend.CUDA
        elif device_type == "cuda" and _triton_missing(device_type) is None:
            chosen = Backend.TRITON
        else:
            chosen = Backend.TORCH
    else:
        reason = _unavailable(requested, device_type)
        if reason is not None:
            raise BackendUnavailable(f"scan backend {requested.value!r} cannot run: {reason}")
        chosen = requested
    key = (requested, chosen, device_type)
    if key not in _announced:
        _announced.add(key)
        slow = chosen is Backend.TORCH and device_type == "cuda"
        _logger.log(logging.WARNING if slow else logging.INFO, "selective scan on %s tensors: backend %s "
                    "(requested %s)%s", device_type, chosen.value, requested.value,
                    " (slow on a GPU: install triton or build kernels/selective_scan)" if slow else "")
    return chosen.value


def selective_scan_fn(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                      delta_bias: Optional[Tensor] = None, delta_softplus: bool = True) -> Tensor:
    """Selective scan y = S6(u; delta, A, B, C, D) in fp32; see the module docstring for shapes and backends."""
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    y, _ = selective_scan_op(u, delta, A, B, C, D, delta_bias, delta_softplus, _resolve(u.device.type))
    return y
