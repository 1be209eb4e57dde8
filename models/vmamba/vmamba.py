"""VMamba v2: "VMamba: Visual State Space Model" (Liu et al., NeurIPS 2024), the v05_noz / ln2d models of its release.

A 4-stage hierarchical backbone, channels-first (B, C, H, W) from the patch embedding to the head:

    patch embed v2 (stride 4) -> [VSSStage: VSS blocks at C_i, then 3x3/2 conv + LN2d downsample] x 4
    -> classifier: LN2d, global mean, linear

The token mixer is SS2D (ss2d.py): a four-direction cross scan with d_state 1 and no gate. Module names and
parameter shapes follow the official release, so its ImageNet checkpoints load strictly (models/checkpoint.py).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from ..base import EmbeddedStagesModel, create_variant, default_cfg
from ..layers import DownsampledStage, PoolHead
from .layers import LayerNorm2d, Mlp2d
from .ss2d import SS2D

__all__ = ["VMamba", "VSSBlock", "VSSStage", "vmamba_tiny", "vmamba_small", "vmamba_base"]


def patch_embed(in_chans: int, dim: int) -> nn.Sequential:
    """Stride-4 stem v2: 3x3/2 conv, LN2d, GELU, 3x3/2 conv, LN2d (Identities keep the release's indices 0/2/5/7)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.Identity(), LayerNorm2d(dim // 2), nn.Identity(),
        nn.GELU(), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.Identity(), LayerNorm2d(dim),
    )


def downsample(dim: int, out_dim: int) -> nn.Sequential:
    """Downsample v3: 3x3/2 conv + LN2d (parameter indices 1 and 3)."""
    return nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim, 3, stride=2, padding=1), nn.Identity(),
                         LayerNorm2d(out_dim))


class VSSBlock(nn.Module):
    """VSS block: x + DropPath(SS2D(LN2d(x))), then x + DropPath(MLP(LN2d(x)))."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 4.0, d_state: int = 1,
                 ssm_ratio: float = 1.0, dt_rank: int = 0, mixer_layer: Callable[..., nn.Module] = SS2D) -> None:
        """
        Args:
            dim: channels C.
            drop_path: stochastic-depth rate of this block.
            mlp_ratio: hidden width of the MLP relative to C.
            d_state, ssm_ratio, dt_rank: SSM sizes (see SS2D).
            mixer_layer: class (or factory) of the token mixer, called as SS2D is; SS2D subclasses such as
                Mamba-Adaptor's plug in here.
        """
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = mixer_layer(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp2d(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VSSStage(DownsampledStage):
    """VSS blocks at one resolution, then the downsampling to the next stage (if any)."""

    def __init__(self, dim: int, out_dim: Optional[int], depth: int, drop_path: Sequence[float],
                 use_checkpoint: bool = False, **block_kwargs: Any) -> None:
        """
        Args:
            dim: channels of this stage.
            out_dim: channels of the next stage, or None for the last stage (no downsampling).
            depth: number of VSS blocks.
            drop_path: per-block stochastic-depth rates.
            use_checkpoint: recompute each block in the backward pass to save activation memory.
            block_kwargs: forwarded to VSSBlock.
        """
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.Sequential(*[VSSBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])
        self.downsample = downsample(dim, out_dim) if out_dim is not None else nn.Identity()


class VMamba(EmbeddedStagesModel):
    """VMamba v2 classifier / backbone with timm's model interface (see models/base.py)."""

    output_fmt = "NCHW"
    head_name = "classifier"

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 8, 2), d_state: int = 1, dt_rank: int = 0, ssm_ratio: float = 1.0,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 use_checkpoint: bool = False, global_pool: str = "avg",
                 mixer_layers: Optional[Sequence[Callable[..., nn.Module]]] = None) -> None:
        """
        Args:
            num_classes: classifier outputs (0: no head, forward returns pooled features).
            in_chans: input image channels.
            embed_dim: channels of stage 1; stage i has embed_dim * 2**i.
            depths: VSS blocks per stage.
            d_state: SSM state size N (1 in the release).
            dt_rank: rank of the dt projection, 0 for ceil(C / 16).
            ssm_ratio: d_inner / C of the SS2D.
            mlp_ratio: MLP hidden width / C.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, linearly increasing over all blocks up to this value.
            use_checkpoint: activation checkpointing of every block.
            global_pool: "avg", or "" for a head that returns the normalised unpooled map (with num_classes=0).
            mixer_layers: the token-mixer class of every stage's blocks (default SS2D everywhere; see VSSBlock).
        """
        super().__init__()
        if not depths:
            raise ValueError("VMamba needs at least one stage: depths is empty")
        self.num_classes, self.in_chans = num_classes, in_chans
        num_stages = len(depths)
        mixer_layers = [SS2D] * num_stages if mixer_layers is None else list(mixer_layers)
        if len(mixer_layers) != num_stages:
            raise ValueError(f"mixer_layers needs one entry per stage ({num_stages}), got {len(mixer_layers)}")
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: buildable on meta

        self.patch_embed = patch_embed(in_chans, embed_dim)
        self.layers = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        start = 0
        for i, depth in enumerate(depths):
            last = i == num_stages - 1
            self.layers.append(VSSStage(
                dims[i], None if last else dims[i + 1], depth, rates[start:start + depth],
                use_checkpoint=use_checkpoint, d_state=d_state, dt_rank=dt_rank, ssm_ratio=ssm_ratio,
                mlp_ratio=mlp_ratio, mixer_layer=mixer_layers[i]))
            # the blocks' output, before the downsampling to the next stage
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"layers.{i}.blocks"))
            start += depth
        self.classifier = PoolHead(dims[-1], num_classes, global_pool, drop_rate, norm=LayerNorm2d(dims[-1]),
                                   fc_name="head")
        self.apply(self._init_weights)


# No hub weights: official checkpoints are loaded from a local file (models.base.create_variant).
default_cfgs = generate_default_cfgs({
    name: default_cfg(interpolation="bicubic", first_conv="patch_embed.0", classifier="classifier.head")
    for name in ("vmamba_tiny", "vmamba_small", "vmamba_base")})

# The release's main T/S/B (vmambav2v_tiny_224, vmambav2_small_224, vmambav2_base_224) and the drop-path
# rates it trains them with on ImageNet-1K.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "vmamba_tiny": dict(embed_dim=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2),
    "vmamba_small": dict(embed_dim=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.3),
    "vmamba_base": dict(embed_dim=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.6),
}


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-T[s1l8]: C = 96, depths 2-2-8-2, ssm_ratio 1 (30,249,064 params)."""
    return create_variant(VMamba, "vmamba_tiny", pretrained, **{**MODEL_ARGS["vmamba_tiny"], **kwargs})


@register_model
def vmamba_small(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-S[s2l15]: C = 96, depths 2-2-15-2, ssm_ratio 2 (50,147,752 params)."""
    return create_variant(VMamba, "vmamba_small", pretrained, **{**MODEL_ARGS["vmamba_small"], **kwargs})


@register_model
def vmamba_base(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-B[s2l15]: C = 128, depths 2-2-15-2, ssm_ratio 2 (88,557,800 params)."""
    return create_variant(VMamba, "vmamba_base", pretrained, **{**MODEL_ARGS["vmamba_base"], **kwargs})
