"""Mamba-Adaptor (Xie et al., CVPR 2025), a reconstruction on VMamba v2: Adaptor-T, Adaptor-S, model, dense backbone."""
from .adaptor_s import FUSIONS, AdaptorS
from .adaptor_t import SOURCES, AdaptorT
from .backbone import MambaAdaptorBackbone
from .mamba_adaptor import AdaptorSS2D, MambaAdaptor, mamba_adaptor_b1, mamba_adaptor_b2

__all__ = ["AdaptorT", "AdaptorS", "SOURCES", "FUSIONS", "AdaptorSS2D", "MambaAdaptor", "MambaAdaptorBackbone",
           "mamba_adaptor_b1", "mamba_adaptor_b2"]
