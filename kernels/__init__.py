"""Device code only: Triton kernels (triton/) and the CUDA selective-scan extension's sources (selective_scan/).

Their host side (launch configuration, tiling, reductions) is the `triton.py` / `cuda.py` backend of each
operation under models/ops/.
"""
