"""VMamba v2 (Liu et al., NeurIPS 2024): the model, its SS2D cross-scan mixer and its channels-first layers."""
from .backbone import VMambaBackbone
from .ss2d import SS2D, cross_merge, cross_scan
from .vmamba import VMamba, VSSBlock, VSSStage, vmamba_base, vmamba_small, vmamba_tiny

__all__ = ["VMamba", "VSSBlock", "VSSStage", "VMambaBackbone", "SS2D", "cross_scan", "cross_merge", "vmamba_tiny",
           "vmamba_small", "vmamba_base"]
