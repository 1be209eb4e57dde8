"""Mamba-Adaptor (Xie et al., CVPR 2025, arXiv:2505.12685) on VMamba v2: a labelled reconstruction.

No public code exists; the modules follow the published description and every unknown is a documented,
switchable choice (docs/mamba_adaptor.md). The backbone is VMamba v2 (models/vmamba); in the chosen stages
every SS2D is an AdaptorSS2D, whose `ssm` step adds

    Adaptor-T (adaptor_t.py)  hidden states h of the d_state-1 scan augmented at K learned locations per
                              channel group, y = C h' + D u per direction, then the cross merge;
    Adaptor-S (adaptor_s.py)  multi-scale dilated depthwise convolutions on the merged (B, D, H, W) output,
                              before out_norm.

With both adaptors off the model is VMamba v2 (same keys, same outputs for the same weights).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor
from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model

from ..base import create_variant, default_cfg
from ..ops.precision import to_accumulation
from ..vmamba.ss2d import SS2D, cross_merge, cross_scan
from ..vmamba.vmamba import VMamba
from .adaptor_s import AdaptorS
from .adaptor_t import AdaptorT, hidden_states

__all__ = ["AdaptorSS2D", "MambaAdaptor", "mamba_adaptor_b1", "mamba_adaptor_b2"]


@register_notrace_module  # a leaf for torch.fx, like SS2D
class AdaptorSS2D(SS2D):
    """SS2D with Adaptor-T on the hidden states and Adaptor-S on the merged output (either may be None)."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, dt_rank: int = 0,
                 adaptor_t: Optional[Dict[str, Any]] = None, adaptor_s: Optional[Dict[str, Any]] = None) -> None:
        """
        Args:
            dim, d_state, ssm_ratio, dt_rank: as SS2D.
            adaptor_t: AdaptorT arguments (besides the width), or None for no Adaptor-T.
            adaptor_s: AdaptorS arguments (besides the width), or None for no Adaptor-S.
        """
        super().__init__(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank)
        if adaptor_t is not None and d_state != 1:
            raise ValueError(f"Adaptor-T reads the hidden states of a d_state-1 scan, got d_state {d_state}")
        self.adaptor_t = AdaptorT(self.d_inner, **adaptor_t) if adaptor_t is not None else None
        self.adaptor_s = AdaptorS(self.d_inner, **adaptor_s) if adaptor_s is not None else None

    def ssm(self, u: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, D, H, W): SS2D's ssm with h augmented before y = C h + D u, then Adaptor-S."""
        height, width = u.shape[-2:]
        xs = cross_scan(u)
        delta, Bs, Cs = self.project(xs)
        if self.adaptor_t is None:
            ys = self.scan(xs, delta, Bs, Cs)
        else:
            batch, k, d, length = xs.shape
            h = hidden_states(xs, delta, -torch.exp(to_accumulation(self.A_logs)), Bs,
                              to_accumulation(self.dt_projs_bias).flatten())
            h = self.adaptor_t(h, xs, u)
            # y = C h' + D u per direction (C shared by the direction's channels; Ds index k*D + c)
            ys = Cs.to(h.dtype) * h + to_accumulation(self.Ds).view(1, k, d, 1) * xs.to(h.dtype)
        y = cross_merge(ys, height, width)
        return y if self.adaptor_s is None else self.adaptor_s(y)


def _stage_size(img_size: int, index: int) -> int:
    """Side of stage `index`'s map: the patch embed and every downsampling are 3x3/2 convs with padding 1."""
    return math.ceil(img_size / 2 ** (index + 2)) if index == 0 else math.ceil(_stage_size(img_size, index - 1) / 2)


class MambaAdaptor(VMamba):
    """VMamba v2 whose SS2D mixers in the chosen stages carry Adaptor-T and / or Adaptor-S."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, embed_dim: int = 48,
                 depths: Sequence[int] = (2, 2, 8, 2), d_state: int = 1, dt_rank: int = 0, ssm_ratio: float = 1.0,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 use_checkpoint: bool = False, global_pool: str = "avg",
                 adaptor_t: bool = True, t_stages: Sequence[int] = (0, 1, 2, 3), t_points: int = 4,
                 t_groups: int = 4, t_coords: int = 2, t_interpolate: bool = True, t_dynamic: bool = True,
                 t_source: str = "token", t_per_direction: bool = False, t_residual: bool = True,
                 adaptor_s: bool = True, s_stages: Sequence[int] = (0, 1, 2, 3),
                 s_kernel_sizes: Sequence[int] = (3, 3, 3), s_dilations: Sequence[int] = (1, 2, 3),
                 s_fusion: str = "sum", s_residual: bool = True, img_size: int = 224) -> None:
        """
        Args:
            num_classes ... global_pool: as VMamba.
            adaptor_t: Adaptor-T on (in `t_stages`, 0-based).
            t_points, t_groups: K locations per token and S channel groups.
            t_coords: 1 (positions along each scan sequence) or 2 (pixel coordinates).
            t_interpolate: fractional locations with (bi)linear interpolation; False: nearest token.
            t_dynamic: predicted locations; False: learned per-position tables.
            t_source: input of the predictor, "token" or "state".
            t_per_direction: separate predictors / tables per scan direction.
            t_residual: h + sum of the sampled states; False: the sum only.
            adaptor_s: Adaptor-S on (in `s_stages`).
            s_kernel_sizes, s_dilations, s_fusion, s_residual: the Adaptor-S branches (see AdaptorS).
            img_size: training resolution; sizes the static tables of t_dynamic=False.
        """
        for name, stages in (("t_stages", t_stages), ("s_stages", s_stages)):
            if any(not 0 <= s < len(depths) for s in stages):
                raise ValueError(f"{name} {list(stages)} name stages outside 0..{len(depths) - 1}")
        mixers = []
        for i in range(len(depths)):
            side = _stage_size(img_size, i)
            t_args = dict(points=t_points, groups=t_groups, coords=t_coords, interpolate=t_interpolate,
                          dynamic=t_dynamic, source=t_source, per_direction=t_per_direction, residual=t_residual,
                          static_size=(side, side)) if adaptor_t and i in t_stages else None
            s_args = dict(kernel_sizes=tuple(s_kernel_sizes), dilations=tuple(s_dilations), fusion=s_fusion,
                          residual=s_residual) if adaptor_s and i in s_stages else None
            # a stage without adaptors keeps VMamba's plain SS2D (same keys)
            mixers.append(SS2D if t_args is None and s_args is None
                          else partial(AdaptorSS2D, adaptor_t=t_args, adaptor_s=s_args))
        super().__init__(num_classes=num_classes, in_chans=in_chans, embed_dim=embed_dim, depths=depths,
                         d_state=d_state, dt_rank=dt_rank, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio,
                         drop_rate=drop_rate, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                         global_pool=global_pool, mixer_layers=mixers)


# No hub weights (create_variant): a trained file loads through pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    name: default_cfg(interpolation="bicubic", first_conv="patch_embed.0", classifier="classifier.head")
    for name in ("mamba_adaptor_b1", "mamba_adaptor_b2")})

# Widths / depths are ours (unpublished), chosen to land on the paper's params and FLOPs (docs/mamba_adaptor.md).
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "mamba_adaptor_b1": dict(embed_dim=48, depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.1),
    "mamba_adaptor_b2": dict(embed_dim=96, depths=(2, 2, 9, 2), ssm_ratio=1.0, drop_path_rate=0.2),
}


@register_model
def mamba_adaptor_b1(pretrained: bool = False, **kwargs: Any) -> MambaAdaptor:
    """Mamba-Adaptor-b1: VMamba v2 C = 48, depths 2-2-8-2, both adaptors in every stage."""
    return create_variant(MambaAdaptor, "mamba_adaptor_b1", pretrained, **{**MODEL_ARGS["mamba_adaptor_b1"], **kwargs})


@register_model
def mamba_adaptor_b2(pretrained: bool = False, **kwargs: Any) -> MambaAdaptor:
    """Mamba-Adaptor-b2: VMamba v2 C = 96, depths 2-2-9-2, both adaptors in every stage."""
    return create_variant(MambaAdaptor, "mamba_adaptor_b2", pretrained, **{**MODEL_ARGS["mamba_adaptor_b2"], **kwargs})
