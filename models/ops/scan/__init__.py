"""Selective scan (S6) front end: checks the shapes, picks a backend, runs the custom op.

Layout (Mamba / VMamba convention, one B/C group per scan branch):

    u, delta      (batch, D, L)        fp32, fp16 or bf16 (fp64 runs in fp64, for tests)
    A             (D, N)               fp32
    B, C          (batch, G, N, L)     D % G == 0; channel d reads group d // (D // G)
    D_skip, bias  (D,)                 fp32, optional

    dt_t = softplus(delta_t + bias)          (if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0
    y_t  = <C_t, h_t> + D_skip * u_t         returned in fp32 (fp64 for fp64 inputs)

The B/C groups listed in `reversed_groups` scan backward in time instead (t = L-1 down to 0, h_L = 0,
direction.py), their inputs and outputs staying in step order: the DSSM's backward branch on the raster
sequence itself, with no reversed copy (read in place by the Triton kernels).

u may also be given in pieces along D, a sequence of (batch, D_i, L) tensors of one dtype, each a whole
number of groups: the scan is that of their concatenation, which the Triton kernels never build (they read
each piece where it is). A tensor may be several pieces (the DSSM's forward and backward branches are both
the raster sequence); its gradient is then the sum of theirs.

Backends (switch "scan" of models.ops.backends: DEFMAMBA_SCAN_BACKEND, or set_backend / use_backend), one
file each in this package:

    reference.py  torch   the pure-PyTorch scan, the readable specification
    triton.py     triton  host side of the Triton kernels (kernels/triton/selective_scan.py): compiled at first
                          use on a GPU; on the CPU only in Triton's interpreter (TRITON_INTERPRET=1 first)
    cuda.py       cuda    the compiled extension (kernels/selective_scan)
    auto: cuda when installed and the tensors are on a GPU, else triton on a GPU, else torch

Every backend runs through the custom op "defmamba::selective_scan" (op.py), so torch.compile traces the
scan without graph breaks; a compiled model keeps the backend it was traced with.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

from torch import Tensor

from ..backends import Backend, register_operation, resolve, triton_check
from .cuda import cuda_extension_available, cuda_unavailable
from .direction import check_reversed_groups
from .op import selective_scan_op
from .reference import selective_scan_reference

__all__ = ["selective_scan_fn", "selective_scan_reference", "resolve_scan_backend", "reverses_in_place",
           "cuda_extension_available"]

SCAN = "selective scan"
# auto's order of preference on CUDA tensors
register_operation(SCAN, "scan", ((Backend.CUDA, cuda_unavailable),
                                  (Backend.TRITON, triton_check("kernels.triton.selective_scan"))),
                   slow_hint="install triton or build kernels/selective_scan")


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


def _check_pieces(pieces: List[Tensor], delta: Tensor, groups: int) -> None:
    """u in pieces: (batch, D_i, L) tensors of one dtype and device, whole groups, D_i adding up to delta's D."""
    if any(p.dim() != 3 or p.shape[0] != delta.shape[0] or p.shape[2] != delta.shape[2] for p in pieces):
        raise ValueError(f"u in pieces must be (batch, D_i, L) tensors with delta's batch and L {tuple(delta.shape)}; "
                         f"got {[tuple(p.shape) for p in pieces]}")
    widths, per_group = [p.shape[1] for p in pieces], delta.shape[1] // groups
    if sum(widths) != delta.shape[1] or any(w % per_group for w in widths):
        raise ValueError(f"the pieces of u must add up to D={delta.shape[1]} in whole B/C groups of {per_group} "
                         f"channels; got widths {widths}")
    if len({(p.dtype, p.device) for p in pieces}) > 1:
        raise ValueError("the pieces of u must share one dtype and device; got "
                         f"{sorted({f'{p.dtype} on {p.device}' for p in pieces})}")


def resolve_scan_backend(device_type: str) -> Backend:
    """The backend that runs a scan on `device_type` tensors now (BackendUnavailable if a forced one cannot)."""
    return resolve(SCAN, device_type)


def reverses_in_place(device_type: str) -> bool:
    """Whether the scan on `device_type` tensors reads reversed groups in place (Triton); the other backends
    flip copies of their inputs and outputs, so a caller with a reversed copy of its own at hand may pass that."""
    return resolve(SCAN, device_type) is Backend.TRITON


def selective_scan_fn(u: Union[Tensor, Sequence[Tensor]], delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = True,
                      reversed_groups: Sequence[int] = ()) -> Tensor:
    """Selective scan y = S6(u; delta, A, B, C, D) in fp32, u one tensor or pieces along D; see the module
    docstring for shapes, pieces, directions and backends."""
    pieces = [u] if isinstance(u, Tensor) else list(u)
    if not pieces:
        raise ValueError("u in pieces needs at least one piece")
    _check_shapes(pieces[0] if len(pieces) == 1 else delta, delta, A, B, C, D, delta_bias)
    if len(pieces) > 1:
        _check_pieces(pieces, delta, B.shape[1])
    check_reversed_groups(reversed_groups, B.shape[1])
    y, _ = selective_scan_op(pieces, delta, A, B, C, D, delta_bias, delta_softplus,
                             [int(g) for g in reversed_groups], resolve(SCAN, delta.device.type).value)
    return y
