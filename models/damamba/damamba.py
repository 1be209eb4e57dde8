"""DAMamba: Vision State Space Model with Dynamic Adaptive Scan (Li et al. 2025, arXiv:2502.12627).

A 4-stage hierarchical backbone, channels-first (B, C, H, W) throughout:

    stem (4 convs, stride 4) -> [DAStage: (3x3/2 conv + BN downsample,) DAMamba blocks; LN] x 4 -> pool, head

The token mixer is DASSM (models/dassm.py), whose learned per-pixel offsets move every token's sampling
point before one raster-order scan (models/adaptive_sampling.py). Module names and parameter shapes follow
the official release, so its ImageNet checkpoints load strictly (models/checkpoint.py); spec damamba.md.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .layers import ChannelLayerNorm, ResDWC
from .dassm import DASSM
from ..layers import run_blocks

__all__ = ["DAMamba", "DABlock", "DAStage", "damamba_tiny", "damamba_small", "damamba_base"]


def stem(in_chans: int, dim: int) -> nn.Sequential:
    """Stride-4 stem: conv3x3/2-BN-GELU, conv3x3-BN-GELU, conv3x3/2-BN-GELU, conv3x3-BN (names stem.{0..10})."""
    half = dim // 2
    layers: List[nn.Module] = []
    for cin, cout, stride, act in ((in_chans, half, 2, True), (half, half, 1, True), (half, dim, 2, True),
                                   (dim, dim, 1, False)):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ConvFFN(nn.Module):
    """fc1 (1x1) -> GELU -> ResDWC 3x3 -> fc2 (1x1), channels-first."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()
        self.conv = ResDWC(hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.conv(self.act(self.fc1(x))))


class DABlock(nn.Module):
    """DAMamba block: x + dwconv(x); x + DropPath(g1 * DASSM(LN(x))); x + DropPath(g2 * FFN(BN(x)))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, head_dim: int = 16) -> None:
        """
        Args:
            dim: channels C.
            mlp_ratio: FFN hidden width int(mlp_ratio * C).
            drop_path: stochastic-depth rate of this block.
            layer_scale: initial value of the per-channel scales g1, g2, or None for no layer scale.
            head_dim: channels per offset group of the DASSM.
        """
        super().__init__()
        # definition order = the release's state_dict order
        self.token_mixer = DASSM(dim, head_dim=head_dim)
        self.norm1 = ChannelLayerNorm(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvFFN(dim, int(mlp_ratio * dim))
        self.pos_embed = ResDWC(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos_embed(x)
        mixed = self.token_mixer(self.norm1(x))
        if self.layer_scale:
            mixed = self.layer_scale_1.view(1, -1, 1, 1) * mixed
        x = x + self.drop_path(mixed)
        ffn = self.mlp(self.norm2(x))
        if self.layer_scale:
            ffn = self.layer_scale_2.view(1, -1, 1, 1) * ffn
        return x + self.drop_path(ffn)


class DAStage(nn.Module):
    """Optional 3x3/2 conv + BN downsampling from the previous stage, then DAMamba blocks at one resolution."""

    def __init__(self, in_dim: Optional[int], dim: int, depth: int, drop_path: Sequence[float],
                 use_checkpoint: bool = False, **block_kwargs: Any) -> None:
        """
        Args:
            in_dim: channels of the previous stage, or None for the first stage (no downsampling).
            dim: channels of this stage.
            depth: number of blocks.
            drop_path: per-block stochastic-depth rates.
            use_checkpoint: recompute each block in the backward pass to save activation memory.
            block_kwargs: forwarded to DABlock.
        """
        super().__init__()
        self.use_checkpoint = use_checkpoint
        if in_dim is not None:
            self.downsample = nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[DABlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, self.downsample(x), self.use_checkpoint)


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> linear (names head.fc.*)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(self.drop(x))


class DAMamba(nn.Module):
    """DAMamba classifier / backbone (timm-style: forward_features, forward_head, forward_intermediates)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dims: Sequence[int] = (80, 160, 320, 512),
                 depths: Sequence[int] = (3, 4, 12, 5), mlp_ratios: Sequence[float] = (4, 4, 3, 3),
                 layer_scale_stages: Sequence[int] = (), layer_scale_init: float = 1e-6, head_dim: int = 16,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.15, use_checkpoint: bool = False,
                 global_pool: str = "avg") -> None:
        """
        Args:
            num_classes: classifier outputs (0: no head, forward returns pooled features).
            in_chans: input image channels.
            dims: channels per stage (each a multiple of head_dim).
            depths: blocks per stage.
            mlp_ratios: FFN hidden width / C per stage.
            layer_scale_stages: 0-based stages whose blocks have layer scales (the release: (2, 3) for S and B).
            layer_scale_init: initial value of those scales.
            head_dim: channels per offset group of the DASSM (16 in the release).
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, linearly increasing over all blocks up to this value.
            use_checkpoint: activation checkpointing of every block.
            global_pool: only "avg" is supported (kept for timm's create_model interface).
        """
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"DAMamba only supports global_pool='avg', got {global_pool!r}")
        if not len(dims) == len(depths) == len(mlp_ratios):
            raise ValueError(f"dims, depths and mlp_ratios need one entry per stage; got {list(dims)}, "
                             f"{list(depths)}, {list(mlp_ratios)}")
        if any(s < 0 or s >= len(depths) for s in layer_scale_stages):
            raise ValueError(f"layer_scale_stages {list(layer_scale_stages)} name stages outside 0..{len(depths) - 1}")
        self.num_classes = num_classes
        self.num_stages = len(depths)
        self.num_features = self.head_hidden_size = dims[-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: buildable on meta

        self.stem = stem(in_chans, dims[0])
        self.stages = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        start = 0
        for i, depth in enumerate(depths):
            self.stages.append(DAStage(
                dims[i - 1] if i > 0 else None, dims[i], depth, rates[start:start + depth],
                use_checkpoint=use_checkpoint, mlp_ratio=mlp_ratios[i], head_dim=head_dim,
                layer_scale=layer_scale_init if i in layer_scale_stages else None))
            # the release's per-stage output norms are top-level modules norm1..norm4
            self.add_module(f"norm{i + 1}", ChannelLayerNorm(dims[i]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"norm{i + 1}"))
            start += depth
        self.head = ClassifierHead(dims[-1], num_classes, drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # conv/linear/norm modules only: DASSM initialises its raw SSM parameters itself
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def stage_norm(self, index: int) -> ChannelLayerNorm:
        """The LayerNorm applied after stage `index` (0-based), named norm{index + 1}."""
        return getattr(self, f"norm{index + 1}")

    def ssm_no_weight_decay(self) -> set[str]:
        """Names of the A_logs, Ds and dt_projs_bias parameters (the optional no-decay group)."""
        names = set()
        for prefix, module in self.named_modules():
            if isinstance(module, DASSM):
                names.update(f"{prefix}.{name}" for name in module.ssm_parameters())
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.use_checkpoint = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> normalised last-stage features (B, C_last, H/32, W/32)."""
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = self.stage_norm(i)(stage(x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Per-stage outputs after their norm{i+1} (the release's detection backbone), timm's feature-getter API.

        Args:
            indices: stage indices to return, or an int n for the last n stages; default all.
            norm: unused (the stage outputs are always normalised, as in the release).
            stop_early: stop after the last requested stage (only with intermediates_only).
            output_fmt: "NCHW" or "NHWC".
            intermediates_only: return only the list of features.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        wanted, max_index = feature_take_indices(self.num_stages, indices)
        x = self.stem(x)
        features = []
        last_needed = max_index if stop_early and intermediates_only else self.num_stages - 1
        for i, stage in enumerate(self.stages[:last_needed + 1]):
            x = self.stage_norm(i)(stage(x))
            if i in wanted:
                features.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return features
        return x, features


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="stem.0", classifier="head.fc", **kwargs)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> DAMamba:
    return build_model_with_cfg(DAMamba, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


# No hub weights: official checkpoints are loaded from a file with models.load_pretrained.
default_cfgs = generate_default_cfgs({name: _cfg() for name in ("damamba_tiny", "damamba_small", "damamba_base")})

# Official variants (spec damamba.md Sec. 1). Drop-path rates are the release's ImageNet training values.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "damamba_tiny": dict(dims=(80, 160, 320, 512), depths=(3, 4, 12, 5), mlp_ratios=(4, 4, 3, 3),
                         drop_path_rate=0.15),
    "damamba_small": dict(dims=(96, 192, 384, 512), depths=(4, 8, 20, 6), mlp_ratios=(4, 4, 3, 3),
                          layer_scale_stages=(2, 3), drop_path_rate=0.4),
    "damamba_base": dict(dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), mlp_ratios=(4, 4, 3, 4),
                         layer_scale_stages=(2, 3), drop_path_rate=0.5),
}


@register_model
def damamba_tiny(pretrained: bool = False, **kwargs: Any) -> DAMamba:
    """DAMamba-T: dims 80-160-320-512, depths 3-4-12-5 (25,440,302 params)."""
    return _create("damamba_tiny", pretrained, **{**MODEL_ARGS["damamba_tiny"], **kwargs})


@register_model
def damamba_small(pretrained: bool = False, **kwargs: Any) -> DAMamba:
    """DAMamba-S: dims 96-192-384-512, depths 4-8-20-6, layer scale in stages 2-3 (44,992,564 params)."""
    return _create("damamba_small", pretrained, **{**MODEL_ARGS["damamba_small"], **kwargs})


@register_model
def damamba_base(pretrained: bool = False, **kwargs: Any) -> DAMamba:
    """DAMamba-B: dims 112-224-448-640, depths 4-8-25-8, layer scale in stages 2-3 (85,714,298 params)."""
    return _create("damamba_base", pretrained, **{**MODEL_ARGS["damamba_base"], **kwargs})
