"""DefMamba as a dense-prediction backbone (Mask R-CNN, UperNet): the stage outputs, each through its own LayerNorm.

State-dict names follow the release's detection/segmentation backbone: the classification keys without
`classifier.*`, plus `outnorm{i}.{weight,bias}` for every returned stage i. Needs no mm* package; the
MMDetection/MMSegmentation registration lives in the top-level `dense` package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from torch import Tensor, nn

from ..checkpoint import check_state_dict, read_state_dict
from .defmamba import DefMamba

__all__ = ["DefMambaBackbone", "BackboneLoadReport"]

_HEAD_PREFIX = "classifier."


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


class DefMambaBackbone(DefMamba):
    """Features of stages `out_indices` before their downsampling, each normalised by `outnorm{i}`, NCHW.

    Stage i has embed_dim * 2**i channels and stride 4 * 2**i. All other arguments are DefMamba's.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: Optional[str] = None,
                 **kwargs: Any) -> None:
        """
        Args:
            out_indices: stages to return, in increasing order.
            pretrained: ImageNet checkpoint loaded by `init_weights()` (not at construction, so that a
                detector restored from its own checkpoint never needs this file).
            kwargs: DefMamba arguments (embed_dim, depths, drop_path_rate, ...); num_classes is not accepted.
        """
        if "num_classes" in kwargs:
            raise ValueError("DefMambaBackbone has no classifier: do not pass num_classes")
        super().__init__(num_classes=0, **kwargs)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) \
                or not all(0 <= i < self.num_stages for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..{self.num_stages - 1}, "
                             f"got {list(out_indices)}")
        del self.classifier  # the release's backbone has no head keys
        self.out_indices = out_indices
        self.pretrained = pretrained
        for i in out_indices:
            self.add_module(f"outnorm{i}", nn.LayerNorm(self.feature_info[i]["num_chs"]))
        self.feature_info = [self.feature_info[i] for i in out_indices]

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned feature maps (the FPN / UperNet `in_channels`)."""
        return [info["num_chs"] for info in self.feature_info]

    def forward(self, x: Tensor) -> List[Tensor]:  # type: ignore[override]
        """(B, C_in, H, W) -> one (B, C_i, H / 2**(i+2), W / 2**(i+2)) map per index in out_indices."""
        features = self.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                              output_fmt="NHWC", intermediates_only=True)
        return [getattr(self, f"outnorm{i}")(feat).permute(0, 3, 1, 2).contiguous()
                for i, feat in zip(self.out_indices, features)]

    def init_weights(self) -> Optional[BackboneLoadReport]:
        """Load `pretrained` if set (the hook MMEngine calls after building a detector/segmentor)."""
        return self.load_imagenet(self.pretrained) if self.pretrained else None

    def load_imagenet(self, path: str, use_ema: bool = False) -> BackboneLoadReport:
        """Load a classification checkpoint strictly except for the head and the output norms.

        `classifier.*` keys are skipped and `outnorm*` keys absent from the file keep their values; any other
        missing, unexpected or mis-shaped key raises CheckpointError (nothing is loaded then).
        """
        state = read_state_dict(path, use_ema=use_ema)
        skipped = [k for k in state if k.startswith(_HEAD_PREFIX)]
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIX)}
        norms = check_state_dict(self, state, path, optional_missing=lambda key: key.startswith("outnorm"))
        self.load_state_dict(state, strict=False)
        return BackboneLoadReport(str(path), len(state), skipped, norms)
