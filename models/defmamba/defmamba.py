"""DefMamba: Deformable Visual State Space Model (Liu et al., CVPR 2025).

A 4-stage hierarchical backbone of Deformable Mamba (DM) blocks:

    PatchEmbed (stride 4) -> [DMStage: DM blocks at C_i, then 3x3/2 conv downsample] x 4 -> LN, pool, head

Tensors between modules are channels-last (B, H, W, C). Module names and parameter shapes follow the
official release, so its ImageNet checkpoints load strictly (see models/checkpoint.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..checkpoint import CheckpointError, load_pretrained
from .dssm import DSSM
from ..layers import ToChannelsFirst, ToChannelsLast, run_blocks

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


class DMStage(nn.Module):
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

    def forward_blocks(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, x, self.use_checkpoint)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.forward_blocks(x))


class ClassifierHead(nn.Module):
    """LN -> global average pool -> linear, on NHWC features (names classifier.{norm,head})."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x).mean((1, 2))
        return x if pre_logits else self.head(self.drop(x))


class DefMamba(nn.Module):
    """DefMamba classifier / backbone (timm-style: forward_features, forward_head, forward_intermediates)."""

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
            global_pool: only "avg" is supported (kept for timm's create_model interface).
            fb_bb, third_branch, local_window: scan branches of every DSSM (paper Table 4; see DSSM);
                the defaults are the released model (forward + backward + deformable).
            point_offset, index_offset, offset_bias, channel_attention: parts of the deformable branch
                (paper Table 5: DP, DT, OB, CA; see DeformableScan); all on in the released model.
        """
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"DefMamba only supports global_pool='avg', got {global_pool!r}")
        if len(offset_kernels) != len(depths):
            raise ValueError(f"need one offset kernel per stage: {len(depths)} stages, got {list(offset_kernels)}")
        self.num_classes = num_classes
        self.num_stages = len(depths)
        dims = [embed_dim * 2 ** i for i in range(self.num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        branch_kwargs = dict(fb_bb=fb_bb, third_branch=third_branch, local_window=local_window,
                             point_offset=point_offset, index_offset=index_offset, offset_bias=offset_bias,
                             channel_attention=channel_attention)

        self.patch_embed = patch_embed(in_chans, embed_dim)
        self.layers = nn.ModuleList()
        self.feature_info: List[Dict[str, Any]] = []
        start = 0
        for i, depth in enumerate(depths):
            last = i == self.num_stages - 1
            self.layers.append(DMStage(
                dims[i], None if last else dims[i + 1], depth, offset_kernels[i], rates[start:start + depth],
                use_checkpoint=use_checkpoint, d_state=d_state, dt_rank=dt_rank, ssm_ratio=ssm_ratio,
                mlp_ratio=mlp_ratio, **branch_kwargs))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"layers.{i}"))
            start += depth
        self.classifier = ClassifierHead(dims[-1], num_classes, drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Linear/LayerNorm modules only: the DSSM initialises its raw SSM parameters itself
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def ssm_no_weight_decay(self) -> set[str]:
        """Names of A_logs, Ds, dt_projs_bias and rpe_table parameters (the optional no-decay group)."""
        names = set()
        for prefix, module in self.named_modules():
            if isinstance(module, DSSM):
                names.update(f"{prefix}.{name}" for name in module.ssm_parameters())
        return names

    def load_pretrained(self, path: str) -> None:
        """timm's hook for pretrained=True (custom_load): strict load of a local release or trainer file."""
        load_pretrained(self, path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.use_checkpoint = enable

    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> last-stage features (B, H/32, W/32, C_last), channels-last."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Per-stage outputs (before downsampling) for dense prediction, timm's feature-getter API.

        Args:
            indices: stage indices to return, or an int n for the last n stages; default all.
            norm: unused (the release's backbone adds its own output norms in the detection heads).
            stop_early: stop after the last requested stage (only with intermediates_only).
            output_fmt: "NCHW" or "NHWC".
            intermediates_only: return only the list of features.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        wanted, max_index = feature_take_indices(self.num_stages, indices)
        x = self.patch_embed(x)
        features = []
        last_needed = max_index if stop_early and intermediates_only else self.num_stages - 1
        for i, stage in enumerate(self.layers[:last_needed + 1]):
            feat = stage.forward_blocks(x)
            if i in wanted:
                features.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
            x = stage.downsample(feat)
        if intermediates_only:
            return features
        return x, features


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="patch_embed.0", classifier="classifier.head", custom_load=True, **kwargs)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> DefMamba:
    """pretrained=True loads the local file given as pretrained_cfg_overlay=dict(file=...) (no hub weights)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not overlay.get("file"):
        raise CheckpointError(f"{variant} has no downloadable weights: download an official checkpoint (README, "
                              "'Official checkpoints') and pass pretrained_cfg_overlay=dict(file='<path>.pth') "
                              "with pretrained=True, or call models.load_pretrained(model, '<path>.pth')")
    if overlay:
        # timm resets custom_load when a file is given; keep it so the file goes through DefMamba.load_pretrained
        kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    return build_model_with_cfg(DefMamba, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


# No hub weights: official checkpoints are loaded from a local file (see _create).
default_cfgs = generate_default_cfgs({name: _cfg() for name in ("defmamba_tiny", "defmamba_small", "defmamba_base")})

# Official variants (spec official.md Sec. 2.1). Drop-path rates are the release's training values.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "defmamba_tiny": dict(embed_dim=48, depths=(2, 2, 5, 2), drop_path_rate=0.2),
    "defmamba_small": dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    "defmamba_base": dict(embed_dim=96, depths=(2, 3, 16, 2), drop_path_rate=0.4),
}


@register_model
def defmamba_tiny(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-T: C = 48, depths 2-2-5-2 (7.55M params)."""
    return _create("defmamba_tiny", pretrained, **{**MODEL_ARGS["defmamba_tiny"], **kwargs})


@register_model
def defmamba_small(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-S: C = 96, depths 2-2-6-2 (30.2M params)."""
    return _create("defmamba_small", pretrained, **{**MODEL_ARGS["defmamba_small"], **kwargs})


@register_model
def defmamba_base(pretrained: bool = False, **kwargs: Any) -> DefMamba:
    """DefMamba-B: C = 96, depths 2-3-16-2 (48.6M params)."""
    return _create("defmamba_base", pretrained, **{**MODEL_ARGS["defmamba_base"], **kwargs})
