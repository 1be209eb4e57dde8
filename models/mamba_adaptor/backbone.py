"""Mamba-Adaptor as a dense-prediction backbone (Mask R-CNN, UperNet), in the layout of VMamba's release backbone.

No release exists to copy a layout from; the backbone is VMamba's (models/vmamba/backbone.py) with the adaptors
in place: the classification keys without `classifier.*`, plus `outnorm{i}.{weight,bias}` (LayerNorm2d over
channels) for every returned stage i. The mechanics are shared with the other families (models/backbone.py).
"""
from __future__ import annotations

from ..backbone import DenseBackbone
from .mamba_adaptor import MambaAdaptor

__all__ = ["MambaAdaptorBackbone"]


class MambaAdaptorBackbone(DenseBackbone, MambaAdaptor):
    """Features of stages `out_indices`, each normalised by `outnorm{i}`, NCHW.

    Stage i has embed_dim * 2**i channels and stride 4 * 2**i. All other arguments are MambaAdaptor's; its
    `img_size` (the classification resolution) only sizes the static Adaptor-T tables (t_dynamic=False), which
    are resized to every detection / segmentation map.
    """
