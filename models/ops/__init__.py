"""The operations that have several implementations, one package each, the same file names in every one:

    scan/      selective scan (S6) of DefMamba and DAMamba         switch "scan"
    deform/    DefMamba's deformable sequence (point offset, offset bias, index offset)   switch "deform"
    adaptive/  DAMamba's dynamic adaptive sampling                 switch "deform"
    merge/     the DSSM's branch merge (inverse orders, mean, gate)  switch "merge"

    __init__.py   the front end: checks the arguments, asks backends.resolve, calls the implementation
    reference.py  the pure-PyTorch implementation, also the readable specification
    triton.py     host side of the Triton kernels in kernels/triton/ (launch, tiling)
    cuda.py       the compiled CUDA extension (kernels/selective_scan/)
    op.py         the torch.library custom op (fake implementation + autograd) every backend runs inside

backends.py chooses the backend of every operation; precision.py fixes the accumulation dtype; launch.py is the
kernel-launch record the Triton hosts build (benchmarks/kernel_analysis.py compiles them ahead of time).
Dependencies run one way: model families -> ops -> kernels.
"""
from .adaptive import adaptive_sample
from .backends import Backend, BackendUnavailable, get_backend, set_backend, use_backend
from .deform import deformable_sequence
from .merge import merge_branches
from .scan import selective_scan_fn

__all__ = ["adaptive_sample", "deformable_sequence", "merge_branches", "selective_scan_fn", "Backend",
           "BackendUnavailable", "get_backend", "set_backend", "use_backend"]
