"""DefMamba (Liu et al., CVPR 2025): the model, its DSSM mixer, the deformable scan and the dense backbone."""
from .backbone import BackboneLoadReport, DefMambaBackbone
from .defmamba import DefMamba, DMBlock, DMStage, defmamba_base, defmamba_small, defmamba_tiny

__all__ = ["DefMamba", "DMBlock", "DMStage", "DefMambaBackbone", "BackboneLoadReport", "defmamba_tiny",
           "defmamba_small", "defmamba_base"]
