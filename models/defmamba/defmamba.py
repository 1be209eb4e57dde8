"""DefMamba: Deformable Visual State Space Model (Liu et al., CVPR 2025).

A 4-stage hierarchical backbone of Deformable Mamba (DM) blocks:

    PatchEmbed (stride 4) -> [DMStage: DM blocks at C_i, then 3x3/2 conv downsample] x 4 -> LN, pool, head

Tensors between modules are channels-last (B, H, W, C), so forward_features and the stage outputs are NHWC
(`output_fmt`). Module names and parameter shapes follow the official release, so its ImageNet checkpoints
load strictly (see models/checkpoint.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model

from ..base import EmbeddedStagesModel, create_variant, default_cfg
from ..layers import DownsampledStage, PoolHead, ToChannelsFirst, ToChannelsLast
from .dssm import DSSM

__all__ = ["DefMamba", "DMBlock", "DMStage", "defmamba_tiny", "defmamba_small", "defmamba_base"]


def patch_embed(in_chans: int, dim: int) -> nn.Sequential:
    """Stride-4 stem: 3x3/2 conv, LN, GELU, 3x3/2 conv, LN; NCHW in, NHWC out.

    The permutes are modules so that parameter indices match the release (patch_embed.{0,2,5,7}).
    """
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), ToChannelsLast(), nn.LayerNorm(dim // 2),
        ToChannelsFirst(), nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), ToChannelsLast(), nn.LayerNorm(dim),
    )


def downsample(dim: int, out_dim: int) -> nn.Sequential:
    """3x3/2 conv + LN between stages, NHWC in and out (parameter indices downsample.{1,3})."""
    return nn.Sequential(ToChannelsFirst(), nn.Conv2d(dim, out_dim, 3, stride=2, padding=1), ToChannelsLast(),
                         nn.LayerNorm(out_dim))


class DMBlock(nn.Module):
    """Deformable Mamba block: x + DropPath(DSSM(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0, mlp_ratio: float = 4.0,
                 d_state: int = 16, dt_rank: int = 0, ssm_ratio: float = 1.0, **branch_kwargs: Any) -> None:
        """
        Args:
            dim: channels C.
            kernel_size: offset-network depthwise kernel of this stage.
            drop_path: stochastic-depth rate of this block.
            mlp_ratio: hidden width of the FFN relative to C.
            d_state, dt_rank, ssm_ratio: SSM sizes (see DSSM).
            branch_kwargs: scan-branch and deformable-part switches of the DSSM (ablations; see DSSM).
        """
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = DSSM(dim, kernel_size, d_state=d_state, dt_rank=dt_rank, ssm_ratio=ssm_ratio, **branch_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DMStage(DownsampledStage):
    """DM blocks at one resolution, followed by the downsampling to the next stage (if any)."""

    def __init__(self, dim: int, out_dim: Optional[int], depth: int, kernel_size: int,
                 drop_path: Sequence[float], use_checkpoint: bool = False, **block_kwargs: Any) -> None:
        """
        Args:
            dim: channels of this stage.
            out_dim: channels of the next stage, or None for the last stage (no downsampling).
            depth: number of DM blocks.
            kernel_size: offset-network kernel of this stage.
            drop_path: per-block stochastic-depth rates.
            use_checkpoint: recompute each block in the backward pass to save activation memory.
            block_kwargs: forwarded to DMBlock.
        """
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.Sequential(*[DMBlock(dim, kernel_size, drop_path=drop_path[i], **block_kwargs)
                                      for i in range(depth)])
        self.downsample = downsample(dim, out_dim) if out_dim is not None else nn.Identity()


class DefMamba(EmbeddedStagesModel):
    """DefMamba classifier / backbone with timm's model interface (see models/base.py)."""

    output_fmt = "NHWC"
    head_name = "classifier"

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), d_state: int = 16, dt_rank: int = 0,
                 ssm_ratio: float = 1.0, mlp_ratio: float = 4.0, offset_kernels: Sequence[int] = (9, 7, 5, 3),
                 drop_rate: float = 0.0, drop_path_rate: float = 0.1, use_checkpoint: bool = False,
                 global_pool: str = "avg", fb_bb: bool = True, third_branch: str = "db", local_window: int = 7,
                 point_offset: bool = True, index_offset: bool = True, offset_bias: bool = True,
                 channel_attention: bool = True) -> None:
        """
        Args:
            num_classes: classifier outputs (0: no head, forward returns pooled features).
            in_chans: input image channels.
            embed_dim: channels of stage 1; stage i has embed_dim * 2**i.
            depths: DM blocks per stage.
            d_state: SSM state size N.
            dt_rank: rank of the dt projection, 0 for ceil(C / 16).
            ssm_ratio: d_inner / C of the DSSM.
            mlp_ratio: FFN hidden width / C.
            offset_kernels: offset-network depthwise kernel per stage.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, linearly increasing over all blocks up to this value.
            use_checkpoint: activation checkpointing of every block.
            global_pool: "avg", or "" for a head that returns the normalised unpooled map (with num_classes=0).
            fb_bb, third_branch, local_window: scan branches of every DSSM (paper Table 4; see DSSM);
                the defaults are the released model (forward + backward + deformable).
            point_offset, index_offset, offset_bias, channel_attention: parts of the deformable branch
                (paper Table 5: DP, DT, OB, CA; see DeformableScan); all on in the released model.
        """
        super().__init__()
        if len(offset_kernels) != len(depths):
            raise ValueError(f"need one offset kernel per stage: {len(depths)} stages, got {list(offset_kernels)}")
        self.num_classes, self.in_chans = num_classes, in_chans
        num_stages = len(depths)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: buildable on meta
        branch_kwargs = dict(fb_bb=fb_bb, third_branch=third_branch, local_window=local_window,
                             point_offset=point_offset, index_offset=index_offset, offset_bias=offset_bias,
                             channel_attention=channel_attention)

        self.patch_embed = patch_embed(in_chans, embed_dim)
        self.layers = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        start = 0
        for i, depth in enumerate(depths):
            last = i == num_stages - 1
            self.layers.append(DMStage(
                dims[i], None if last else dims[i + 1], depth, offset_kernels[i], rates[start:start + depth],
                use_checkpoint=use_checkpoint, d_state=d_state, dt_rank=dt_rank, ssm_ratio=ssm_ratio,
                mlp_ratio=mlp_ratio, **branch_kwargs))
            # the blocks' output, before the downsampling to the next stage
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"layers.{i}.blocks"))
            start += depth
        self.classifier = PoolHead(dims[-1], num_classes, global_pool, drop_rate, channels_last=True,
                                   norm=nn.LayerNorm(dims[-1]), fc_name="head")
        self.apply(self._init_weights)


# No hub weights: official checkpoints are loaded from a local file (models.base.create_variant).
default_cfgs = generate_default_cfgs({
    name: default_cfg(interpolation="bilinear", first_conv="patch_embed.0", classifier="classifier.head")
    for name in ("defmamba_tiny", "defmamba_small", "defmamba_base")})

# The official variants: widths, depths and the drop-path rates the release trains them with.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "defmamba_tiny": dict(embed_dim=48, depths=(2, 2, 5, 2), drop_path_rate=0.2),
    "defmamba_small": dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    "defmamba_base": dict(embed_dim=96, depths=(2, 3, 16, 2), drop_path_rate=0.4),
}


@register_model
def defmamba_tiny(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-T: C = 48, depths 2-2-5-2 (7.55M params)."""
    return create_variant(DefMamba, "defmamba_tiny", pretrained, **{**MODEL_ARGS["defmamba_tiny"], **kwargs})


@register_model
def defmamba_small(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-S: C = 96, depths 2-2-6-2 (30.2M params)."""
    return create_variant(DefMamba, "defmamba_small", pretrained, **{**MODEL_ARGS["defmamba_small"], **kwargs})


@register_model
def defmamba_base(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-B: C = 96, depths 2-3-16-2 (48.6M params)."""
    return create_variant(DefMamba, "defmamba_base", pretrained, **{**MODEL_ARGS["defmamba_base"], **kwargs})
