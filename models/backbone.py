"""A family as a dense-prediction backbone (Mask R-CNN, UperNet): stage outputs, each through its own LayerNorm.

The releases' detection/segmentation backbones (DefMamba's, VMamba's) keep the classification keys without
the head and add `outnorm{i}.{weight,bias}` for every returned stage i; `DenseBackbone` gives any
`models.base.StagedModel` family that shape (`class XBackbone(DenseBackbone, X)`). Needs no mm* package; the
MMDetection/MMSegmentation registration lives in the top-level `dense` package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from torch import Tensor, nn
from timm.layers import LayerNorm2d

from .checkpoint import check_state_dict, read_state_dict

__all__ = ["DenseBackbone", "BackboneLoadReport"]


@dataclass
class BackboneLoadReport:
    """What `load_imagenet` did not take over one to one from the checkpoint."""
    path: str
    loaded: int                   # number of tensors copied into the backbone
    skipped_head: List[str]       # checkpoint keys of the classification head, not used
    initialised_norms: List[str]  # backbone keys absent from the checkpoint: the new output norms

    def __str__(self) -> str:
        return (f"loaded {self.loaded} tensors from {self.path}; skipped the classification head "
                f"({', '.join(self.skipped_head) or 'none'}); kept the initial values of "
                f"{', '.join(self.initialised_norms) or 'no keys'}")


class DenseBackbone:
    """Mixin before a StagedModel family: features of stages `out_indices`, each normalised by `outnorm{i}`, NCHW.

    Stage i's channels and stride are those of the family's feature_info[i]; the head is removed (the releases'
    backbones have no head keys). The output norms normalise over channels in the family's layout (LayerNorm on
    channels-last maps, LayerNorm2d on channels-first ones), so their keys are the same in both.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: Optional[str] = None,
                 **kwargs: Any) -> None:
        """
        Args:
            out_indices: stages to return, in increasing order.
            pretrained: ImageNet checkpoint loaded by `init_weights()` (not at construction, so that a
                detector restored from its own checkpoint never needs this file).
            kwargs: the family's arguments (embed_dim, depths, drop_path_rate, ...); num_classes is not accepted.
        """
        if "num_classes" in kwargs:
            raise ValueError(f"{type(self).__name__} has no classifier: do not pass num_classes")
        super().__init__(num_classes=0, **kwargs)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) \
                or not all(0 <= i < self.num_stages for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..{self.num_stages - 1}, "
                             f"got {list(out_indices)}")
        delattr(self, self.head_name)
        self.out_indices = out_indices
        self.pretrained = pretrained
        norm = nn.LayerNorm if self.output_fmt == "NHWC" else LayerNorm2d
        for i in out_indices:
            # eps 1e-5 in both layouts, as the releases' norms
            self.add_module(f"outnorm{i}", norm(self.feature_info[i]["num_chs"], eps=1e-5))
        self.feature_info = [self.feature_info[i] for i in out_indices]

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned feature maps (the FPN / UperNet `in_channels`)."""
        return [info["num_chs"] for info in self.feature_info]

    def forward(self, x: Tensor) -> List[Tensor]:
        """(B, C_in, H, W) -> one (B, C_i, H / r_i, W / r_i) map per index in out_indices (r_i: the stride)."""
        features = self.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                              output_fmt=self.output_fmt, intermediates_only=True)
        maps = [getattr(self, f"outnorm{i}")(feat) for i, feat in zip(self.out_indices, features)]
        return [m.permute(0, 3, 1, 2).contiguous() for m in maps] if self.output_fmt == "NHWC" else maps

    def init_weights(self) -> Optional[BackboneLoadReport]:
        """Load `pretrained` if set (the hook MMEngine calls after building a detector/segmentor)."""
        return self.load_imagenet(self.pretrained) if self.pretrained else None

    def load_imagenet(self, path: str, use_ema: bool = False) -> BackboneLoadReport:
        """Load a classification checkpoint strictly except for the head and the output norms.

        Head keys are skipped and `outnorm*` keys absent from the file keep their values; any other missing,
        unexpected or mis-shaped key raises CheckpointError (nothing is loaded then).
        """
        head = f"{self.head_name}."
        state = read_state_dict(path, use_ema=use_ema)
        skipped = [k for k in state if k.startswith(head)]
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        norms = check_state_dict(self, state, path, optional_missing=lambda key: key.startswith("outnorm"))
        self.load_state_dict(state, strict=False)
        return BackboneLoadReport(str(path), len(state), skipped, norms)
