"""VMamba v2 as a dense-prediction backbone (Mask R-CNN, UperNet), in the layout of the release's backbone.

State-dict names: the classification keys without `classifier.*`, plus `outnorm{i}.{weight,bias}` (LayerNorm2d
over channels) for every returned stage i. The mechanics are shared with the other families (models/backbone.py).
"""
from __future__ import annotations

from ..backbone import DenseBackbone
from .vmamba import VMamba

__all__ = ["VMambaBackbone"]


class VMambaBackbone(DenseBackbone, VMamba):
    """Features of stages `out_indices`, each normalised by `outnorm{i}`, NCHW.

    Stage i has embed_dim * 2**i channels and stride 4 * 2**i. All other arguments are VMamba's.
    """
