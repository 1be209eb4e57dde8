"""Triton kernels (run compiled on GPUs, or on CPU tensors under TRITON_INTERPRET=1); hosts in models/ops/*/triton.py."""
