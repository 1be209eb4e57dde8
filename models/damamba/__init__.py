"""DAMamba (Li et al. 2025): the model, its DASSM mixer and its layers."""
from .damamba import DABlock, DAMamba, DAStage, damamba_base, damamba_femto, damamba_small, damamba_tiny

__all__ = ["DAMamba", "DABlock", "DAStage", "damamba_femto", "damamba_tiny", "damamba_small", "damamba_base"]
