"""The model families, one folder each (defmamba/, damamba/, vmamba/), on the shared timm base (base.py, layers.py),
the ops they run (ops/) and strict checkpoint loading (checkpoint.py).

`build_model(config)` for the trainer; timm names `defmamba_{tiny,small,base}`,
`damamba_{femto,tiny,small,base}`, `vmamba_{tiny,small,base}` and `mamba_adaptor_{b1,b2}` (registered on import).
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from .checkpoint import CheckpointError, load_pretrained, read_checkpoint, read_state_dict
from .damamba import DABlock, DAMamba, DAStage, damamba_base, damamba_femto, damamba_small, damamba_tiny
from .defmamba import (BackboneLoadReport, DefMamba, DefMambaBackbone, DMBlock, DMStage, defmamba_base,
                       defmamba_small, defmamba_tiny)
from .defmamba.dssm import THIRD_BRANCHES
from .ops import selective_scan_fn
from .vmamba import VMamba, VMambaBackbone, VSSBlock, VSSStage, vmamba_base, vmamba_small, vmamba_tiny
from .mamba_adaptor import MambaAdaptor, MambaAdaptorBackbone, mamba_adaptor_b1, mamba_adaptor_b2

__all__ = ["MODEL_TYPES", "THIRD_BRANCHES", "build_model", "input_channels", "DefMamba", "DMBlock", "DMStage",
           "defmamba_tiny", "defmamba_small", "defmamba_base", "DAMamba", "DABlock", "DAStage", "damamba_femto",
           "damamba_tiny", "damamba_small", "damamba_base", "DefMambaBackbone", "BackboneLoadReport",
           "CheckpointError", "load_pretrained", "read_checkpoint", "read_state_dict", "selective_scan_fn", "VMamba",
           "VMambaBackbone", "VSSBlock", "VSSStage", "vmamba_tiny", "vmamba_small", "vmamba_base", "MambaAdaptor",
           "MambaAdaptorBackbone", "mamba_adaptor_b1", "mamba_adaptor_b2"]

# values of MODEL.TYPE (config.py reads them from here)
MODEL_TYPES = ("defmamba", "damamba", "vmamba", "mamba_adaptor")


def input_channels(config: Any) -> int:
    """Image channels the model built from `config` expects."""
    if config.MODEL.TYPE == "vmamba":
        return config.MODEL.VMAMBA.IN_CHANS
    if config.MODEL.TYPE == "mamba_adaptor":
        return config.MODEL.MAMBA_ADAPTOR.IN_CHANS
    return config.MODEL.DAMAMBA.IN_CHANS if config.MODEL.TYPE == "damamba" else config.MODEL.DEFMAMBA.IN_CHANS


def _vmamba_args(config: Any, m: Any) -> Dict[str, Any]:
    """The VMamba backbone keywords from its config section `m` (MODEL.VMAMBA or MODEL.MAMBA_ADAPTOR)."""
    return dict(num_classes=config.MODEL.NUM_CLASSES, in_chans=m.IN_CHANS, embed_dim=m.EMBED_DIM,
                depths=tuple(m.DEPTHS), d_state=m.D_STATE, dt_rank=m.DT_RANK, ssm_ratio=m.SSM_RATIO,
                mlp_ratio=m.MLP_RATIO, drop_path_rate=config.MODEL.DROP_PATH_RATE,
                use_checkpoint=config.TRAIN.USE_CHECKPOINT)


def build_model(config: Any) -> nn.Module:
    """The model of MODEL.TYPE from the yacs config (keys MODEL.*, TRAIN.USE_CHECKPOINT; see config.py)."""
    if config.MODEL.TYPE == "damamba":
        m = config.MODEL.DAMAMBA
        return DAMamba(
            num_classes=config.MODEL.NUM_CLASSES, in_chans=m.IN_CHANS, dims=tuple(m.DIMS), depths=tuple(m.DEPTHS),
            mlp_ratios=tuple(m.MLP_RATIOS), layer_scale_stages=tuple(m.LAYER_SCALE_STAGES),
            layer_scale_init=m.LAYER_SCALE_INIT, head_dim=m.HEAD_DIM, drop_path_rate=config.MODEL.DROP_PATH_RATE,
            use_checkpoint=config.TRAIN.USE_CHECKPOINT, adaptive_scan=m.ADAPTIVE_SCAN,
            conv_pos_embed=m.CONV_POS_EMBED, conv_ffn=m.CONV_FFN,
        )
    if config.MODEL.TYPE == "vmamba":
        return VMamba(**_vmamba_args(config, config.MODEL.VMAMBA))
    if config.MODEL.TYPE == "mamba_adaptor":
        m = config.MODEL.MAMBA_ADAPTOR
        return MambaAdaptor(
            **_vmamba_args(config, m), adaptor_t=m.ADAPTOR_T, t_stages=tuple(m.T_STAGES), t_points=m.T_POINTS,
            t_groups=m.T_GROUPS, t_coords=m.T_COORDS, t_interpolate=m.T_INTERPOLATE, t_dynamic=m.T_DYNAMIC,
            t_source=m.T_SOURCE, t_per_direction=m.T_PER_DIRECTION, t_residual=m.T_RESIDUAL, adaptor_s=m.ADAPTOR_S,
            s_stages=tuple(m.S_STAGES), s_kernel_sizes=tuple(m.S_KERNEL_SIZES), s_dilations=tuple(m.S_DILATIONS),
            s_fusion=m.S_FUSION, s_residual=m.S_RESIDUAL, img_size=config.DATA.IMG_SIZE,
        )
    if config.MODEL.TYPE != "defmamba":
        raise ValueError(f"MODEL.TYPE must be one of {', '.join(MODEL_TYPES)}, got {config.MODEL.TYPE!r}")
    m = config.MODEL.DEFMAMBA
    return DefMamba(
        num_classes=config.MODEL.NUM_CLASSES, in_chans=m.IN_CHANS, embed_dim=m.EMBED_DIM, depths=tuple(m.DEPTHS),
        d_state=m.D_STATE, dt_rank=m.DT_RANK, ssm_ratio=m.SSM_RATIO, mlp_ratio=m.MLP_RATIO,
        offset_kernels=tuple(m.OFFSET_KERNELS), drop_path_rate=config.MODEL.DROP_PATH_RATE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT, fb_bb=m.FB_BB, third_branch=m.THIRD_BRANCH,
        local_window=m.LOCAL_WINDOW, point_offset=m.POINT_OFFSET, index_offset=m.INDEX_OFFSET,
        offset_bias=m.OFFSET_BIAS, channel_attention=m.CHANNEL_ATTENTION,
    )
