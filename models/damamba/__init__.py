"""DAMamba (Li et al. 2025): the model, its DASSM mixer and its layers."""
from .damamba import DABlock, DAMamba, DAStage, damamba_base, damamba_small, damamba_tiny
