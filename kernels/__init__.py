"""Custom kernels of DefMamba: the CUDA selective-scan extension and Triton kernels."""
