"""DAMamba: Vision State Space Model with Dynamic Adaptive Scan (Li et al. 2025, arXiv:2502.12627).

A 4-stage hierarchical backbone, channels-first (B, C, H, W) throughout:

    stem (4 convs, stride 4) -> [DAStage: (3x3/2 conv + BN downsample,) DAMamba blocks; LN] x 4 -> pool, head

The token mixer is DASSM (dassm.py), whose learned per-pixel offsets move every token's sampling point
before one raster-order scan (models/ops/adaptive). Module names and parameter shapes follow the official
release, so its ImageNet checkpoints load strictly (models/checkpoint.py). Three switches, all on by default,
give the rows of the module ablation (the DAMamba slides' Table 5, on DAMamba-F; docs/ablations.md):
`adaptive_scan` (offsets and sampling, else the raster scan), `conv_pos_embed` (the block's ResDWC, else none)
and `conv_ffn` (the ResDWC inside the FFN, else a plain fc1-GELU-fc2 MLP).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from ..base import StagedModel, create_variant, default_cfg
from ..layers import PoolHead, run_blocks
from .dassm import DASSM
from .layers import ChannelLayerNorm, ResDWC

__all__ = ["DAMamba", "DABlock", "DAStage", "damamba_femto", "damamba_tiny", "damamba_small", "damamba_base"]


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
    """fc1 (1x1) -> GELU -> ResDWC 3x3 -> fc2 (1x1), channels-first; conv=False: the plain MLP fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, conv: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()
        self.conv = ResDWC(hidden) if conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.conv(self.act(self.fc1(x))))


class DABlock(nn.Module):
    """DAMamba block: x + dwconv(x); x + DropPath(g1 * DASSM(LN(x))); x + DropPath(g2 * FFN(BN(x)))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, head_dim: int = 16, adaptive_scan: bool = True,
                 conv_pos_embed: bool = True, conv_ffn: bool = True) -> None:
        """
        Args:
            dim: channels C.
            mlp_ratio: FFN hidden width int(mlp_ratio * C).
            drop_path: stochastic-depth rate of this block.
            layer_scale: initial value of the per-channel scales g1, g2, or None for no layer scale.
            head_dim: channels per offset group of the DASSM.
            adaptive_scan: the DASSM's offsets and sampling (False: raster scan).
            conv_pos_embed: the conv position encoding x + dwconv(x) at the start (False: none).
            conv_ffn: the ResDWC inside the FFN (False: plain MLP).
        """
        super().__init__()
        # definition order = the release's state_dict order
        self.token_mixer = DASSM(dim, head_dim=head_dim, adaptive_scan=adaptive_scan)
        self.norm1 = ChannelLayerNorm(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvFFN(dim, int(mlp_ratio * dim), conv=conv_ffn)
        self.pos_embed = ResDWC(dim) if conv_pos_embed else nn.Identity()
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


class DAMamba(StagedModel):
    """DAMamba classifier / backbone with timm's model interface (see models/base.py)."""

    output_fmt = "NCHW"
    mixer_name = "token_mixer"
    head_name = "head"
    init_convs = True

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dims: Sequence[int] = (80, 160, 320, 512),
                 depths: Sequence[int] = (3, 4, 12, 5), mlp_ratios: Sequence[float] = (4, 4, 3, 3),
                 layer_scale_stages: Sequence[int] = (), layer_scale_init: float = 1e-6, head_dim: int = 16,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.15, use_checkpoint: bool = False,
                 global_pool: str = "avg", adaptive_scan: bool = True, conv_pos_embed: bool = True,
                 conv_ffn: bool = True) -> None:
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
            global_pool: "avg", or "" for a head that returns the unpooled map (with num_classes=0).
            adaptive_scan, conv_pos_embed, conv_ffn: the module-ablation switches of every block (see DABlock);
                all True is the released architecture.
        """
        super().__init__()
        if not len(dims) == len(depths) == len(mlp_ratios):
            raise ValueError(f"dims, depths and mlp_ratios need one entry per stage; got {list(dims)}, "
                             f"{list(depths)}, {list(mlp_ratios)}")
        if any(s < 0 or s >= len(depths) for s in layer_scale_stages):
            raise ValueError(f"layer_scale_stages {list(layer_scale_stages)} name stages outside 0..{len(depths) - 1}")
        self.num_classes, self.in_chans = num_classes, in_chans
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
                layer_scale=layer_scale_init if i in layer_scale_stages else None, adaptive_scan=adaptive_scan,
                conv_pos_embed=conv_pos_embed, conv_ffn=conv_ffn))
            # the release's per-stage output norms are top-level modules norm1..norm4
            self.add_module(f"norm{i + 1}", ChannelLayerNorm(dims[i]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"norm{i + 1}"))
            start += depth
        self.head = PoolHead(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self._init_weights)

    def stage_modules(self) -> nn.ModuleList:
        return self.stages

    def prune_stages(self, keep: int) -> None:
        for i in range(keep, self.num_stages):  # the output norms of the dropped stages
            delattr(self, f"norm{i + 1}")
        super().prune_stages(keep)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward_stage(self, index: int, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.stage_norm(index)(self.stages[index](x))
        return x, x

    def stage_norm(self, index: int) -> ChannelLayerNorm:
        """The LayerNorm applied after stage `index` (0-based), named norm{index + 1}."""
        return getattr(self, f"norm{index + 1}")


# No hub weights: official checkpoints are loaded from a local file (models.base.create_variant).
default_cfgs = generate_default_cfgs({
    name: default_cfg(interpolation="bicubic", first_conv="stem.0", classifier="head.fc")
    for name in ("damamba_femto", "damamba_tiny", "damamba_small", "damamba_base")})

# The official variants: widths, depths, MLP ratios, layer-scale stages and the drop-path rates the release
# trains them with on ImageNet-1K. F is not in the release: widths and depths are the DAMamba slides'; MLP
# ratios, head_dim and no layer scale are T's, drop path 0.1 continues the release's trend (T 0.15 < S 0.4 < B 0.5)
# to a model of 16 blocks (T: 24) and a fifth of T's parameters.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "damamba_femto": dict(dims=(48, 96, 192, 256), depths=(2, 2, 10, 2), mlp_ratios=(4, 4, 3, 3),
                          drop_path_rate=0.1),
    "damamba_tiny": dict(dims=(80, 160, 320, 512), depths=(3, 4, 12, 5), mlp_ratios=(4, 4, 3, 3),
                         drop_path_rate=0.15),
    "damamba_small": dict(dims=(96, 192, 384, 512), depths=(4, 8, 20, 6), mlp_ratios=(4, 4, 3, 3),
                          layer_scale_stages=(2, 3), drop_path_rate=0.4),
    "damamba_base": dict(dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), mlp_ratios=(4, 4, 3, 4),
                         layer_scale_stages=(2, 3), drop_path_rate=0.5),
}


@register_model
def damamba_femto(pretrained: bool = False, **kwargs: Any) -> DAMamba:
    """DAMamba-F (the slides'; no released weights): dims 48-96-192-256, depths 2-2-10-2 (5,518,932 params
    counted as the release counts T/S/B, 5,518,644 trainable)."""
    return create_variant(DAMamba, "damamba_femto", pretrained, **{**MODEL_ARGS["damamba_femto"], **kwargs})


@register_model
def damamba_tiny(pretrained: bool = False, **kwargs: Any) -> DAMamba:
    """DAMamba-T: dims 80-160-320-512, depths 3-4-12-5 (25,440,302 params)."""
    return create_variant(DAMamba, "damamba_tiny", pretrained, **{**MODEL_ARGS["damamba_tiny"], **kwargs})


@register_model
def damamba_small(pretrained: bool = False, **kwargs: Any) -> DAMamba:
    """DAMamba-S: dims 96-192-384-512, depths 4-8-20-6, layer scale in stages 2-3 (44,992,564 params)."""
    return create_variant(DAMamba, "damamba_small", pretrained, **{**MODEL_ARGS["damamba_small"], **kwargs})


@register_model
def damamba_base(pretrained: bool = False, **kwargs: Any) -> DAMamba:
    """DAMamba-B: dims 112-224-448-640, depths 4-8-25-8, layer scale in stages 2-3 (85,714,298 params)."""
    return create_variant(DAMamba, "damamba_base", pretrained, **{**MODEL_ARGS["damamba_base"], **kwargs})
