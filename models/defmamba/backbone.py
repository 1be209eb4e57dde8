"""DefMamba as a dense-prediction backbone (Mask R-CNN, UperNet): the release's detection/segmentation backbone.

State-dict names follow it: the classification keys without `classifier.*`, plus `outnorm{i}.{weight,bias}`
(LayerNorm over channels) for every returned stage i. The mechanics are shared with the other families
(models/backbone.py).
"""
from __future__ import annotations

from ..backbone import BackboneLoadReport, DenseBackbone
from .defmamba import DefMamba

__all__ = ["DefMambaBackbone", "BackboneLoadReport"]


class DefMambaBackbone(DenseBackbone, DefMamba):
    """Features of stages `out_indices` before their downsampling, each normalised by `outnorm{i}`, NCHW.

    Stage i has embed_dim * 2**i channels and stride 4 * 2**i. All other arguments are DefMamba's.
    """
