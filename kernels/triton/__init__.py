"""Triton kernels of DefMamba (run compiled on GPUs, or on CPU tensors under TRITON_INTERPRET=1)."""
