"""What every model family shares: the timm interface of a hierarchical backbone and its registration helpers.

A family subclasses `StagedModel`, builds its stem, stages and `PoolHead` under the release's names, and
defines `forward_stem` and `forward_stage`; the base gives it timm's whole model API (forward_features /
forward_head, forward_intermediates and prune_intermediate_layers for `features_only`, reset_classifier,
grad checkpointing, the optional SSM no-decay group, loading a local checkpoint for `pretrained=True`).
`default_cfg` and `create_variant` are the registration side (`@register_model` functions).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
from torch import Tensor, nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Format, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from .checkpoint import CheckpointError, load_pretrained
from .layers import PoolHead

__all__ = ["StagedModel", "EmbeddedStagesModel", "default_cfg", "create_variant"]

ModelT = TypeVar("ModelT", bound="StagedModel")


class StagedModel(nn.Module):
    """A stem, stages of decreasing resolution and a PoolHead, with timm's model interface.

    Subclasses set `num_classes`, `in_chans`, `num_features`, `head_hidden_size`, `feature_info` (one entry per
    stage, the module whose output `forward_stage` reports), build their modules, call `self.apply(self._init_weights)`
    and implement `forward_stem`, `forward_stage` and `stage_modules`. Each stage keeps its blocks in `.blocks`
    and each block its token mixer in the attribute `mixer_name`, with tensors in `output_fmt` layout
    (utils.analyze finds the mixers this way).
    """

    output_fmt: str = "NCHW"   # layout of forward_features and of every stage output
    head_name: str = "head"    # attribute holding the PoolHead (the release's name)
    mixer_name: str = "op"     # attribute of every block holding its token mixer (read by utils.analyze)
    init_convs: bool = False   # also initialise convolutions (fan-out normal), as DAMamba's release does

    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_stage(self, index: int, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Stage `index` on x: (its reported feature map in `output_fmt`, the input of the next stage)."""
        raise NotImplementedError

    def stage_modules(self) -> nn.ModuleList:
        """The stages, in order (each with a `use_checkpoint` flag)."""
        raise NotImplementedError

    def prune_stages(self, keep: int) -> None:
        """Keep the first `keep` stages and only what their reported features need."""
        del self.stage_modules()[keep:]

    @property
    def num_stages(self) -> int:
        return len(self.stage_modules())

    def _init_weights(self, m: nn.Module) -> None:
        # the mixers initialise their raw SSM parameters themselves
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and self.init_convs:
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def ssm_no_weight_decay(self) -> set[str]:
        """Names of every mixer's SSM parameters (A_logs, Ds, dt_projs_bias, ...): the optional no-decay group."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "ssm_parameters"):
                names.update(f"{prefix}.{name}" for name in module.ssm_parameters())
        return names

    def load_pretrained(self, path: str) -> None:
        """timm's hook for pretrained=True (custom_load): strict load of a local release or trainer file."""
        load_pretrained(self, path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stage_modules():
            stage.use_checkpoint = enable

    @property
    def pool_head(self) -> PoolHead:
        return getattr(self, self.head_name)

    def get_classifier(self) -> nn.Module:
        return self.pool_head.linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New linear layer for `num_classes` (0: none); global_pool "avg", or "" to return the unpooled map.

        The layer is created on the model's device, in its dtype and train/eval mode."""
        self.num_classes = num_classes
        like = next(self.parameters())
        self.pool_head.reset(num_classes, global_pool, device=like.device, dtype=like.dtype)
        self.pool_head.linear.train(self.training)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> last-stage feature map in `output_fmt`, before the head."""
        x = self.forward_stem(x)
        for i in range(self.num_stages):
            _, x = self.forward_stage(i, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.pool_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Per-stage feature maps (those of `feature_info`) for dense prediction, timm's feature-getter API.

        Args:
            indices: stage indices to return, or an int n for the last n stages; default all.
            norm: unused (the families' stage outputs are those of their releases' dense backbones).
            stop_early: stop after the last requested stage (only with intermediates_only).
            output_fmt: "NCHW" or "NHWC".
            intermediates_only: return only the list of features.

        Returns:
            The features, or (forward_features output, features).
        """
        if output_fmt not in ("NCHW", "NHWC"):  # a str or timm's Format
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        want = Format(output_fmt).value
        wanted, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early and intermediates_only else self.num_stages - 1
        features = []
        x = self.forward_stem(x)
        for i in range(last + 1):
            feat, x = self.forward_stage(i, x)
            if i in wanted:
                features.append(_to_format(feat, self.output_fmt, want))
        if intermediates_only:
            return features
        return x, features

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what the features of `indices` do not need: later stages, the head (`prune_head`) and the head's
        norm (`prune_norm`); forward_features then ends at the last of them. What `features_only` models keep."""
        wanted, max_index = feature_take_indices(self.num_stages, indices)
        self.prune_stages(max_index + 1)
        if prune_norm:
            self.pool_head.norm = None
        if prune_head:
            self.reset_classifier(0, "")
        return wanted


class EmbeddedStagesModel(StagedModel):
    """A StagedModel whose stem is `patch_embed` and whose stages `layers` are DownsampledStages (models/layers.py):
    each reports its blocks' output, before its downsampling to the next stage (DefMamba's and VMamba's layout)."""

    def stage_modules(self) -> nn.ModuleList:
        return self.layers

    def prune_stages(self, keep: int) -> None:
        super().prune_stages(keep)
        self.layers[-1].downsample = nn.Identity()  # the features are taken before it

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)

    def forward_stage(self, index: int, x: Tensor) -> Tuple[Tensor, Tensor]:
        stage = self.layers[index]
        feat = stage.forward_blocks(x)
        return feat, stage.downsample(feat)


def _to_format(x: Tensor, have: str, want: str) -> Tensor:
    if have == want:
        return x
    return x.permute(0, 3, 1, 2) if want == "NCHW" else x.permute(0, 2, 3, 1)


def default_cfg(**kwargs: Any) -> Dict[str, Any]:
    """timm pretrained_cfg of an ImageNet-1K model at 224 px; no hub weights (see `create_variant`)."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, custom_load=True, **kwargs)


def create_variant(cls: Type[ModelT], variant: str, pretrained: bool, **kwargs: Any) -> ModelT:
    """timm's build_model_with_cfg for `variant`; pretrained=True loads the local file given as
    pretrained_cfg_overlay=dict(file=...) through `cls.load_pretrained` (official weights are not on a hub).

    timm's factory arguments `device` and `dtype` place every parameter and buffer (e.g. device="meta" builds
    the model without allocating it)."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not overlay.get("file"):
        raise CheckpointError(f"{variant} has no downloadable weights: download an official checkpoint (README) and "
                              "pass pretrained_cfg_overlay=dict(file='<path>.pth') with pretrained=True, or call "
                              "models.load_pretrained(model, '<path>.pth')")
    if overlay:
        # timm resets custom_load when a file is given; keep it so the file goes through load_pretrained
        kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(cls, variant, pretrained,
                                     feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)
    return model if dtype is None else model.to(dtype)
