"""DefMamba models: `build_model(config)` for the trainer, timm names `defmamba_{tiny,small,base}`."""
from __future__ import annotations

from typing import Any

from .checkpoint import CheckpointError, load_pretrained, read_checkpoint, read_state_dict
from .defmamba import DefMamba, DMBlock, DMStage, defmamba_base, defmamba_small, defmamba_tiny
from .selective_scan import selective_scan_fn

__all__ = ["build_model", "DefMamba", "DMBlock", "DMStage", "defmamba_tiny", "defmamba_small", "defmamba_base",
           "CheckpointError", "load_pretrained", "read_checkpoint", "read_state_dict", "selective_scan_fn"]


def build_model(config: Any) -> DefMamba:
    """A DefMamba from the yacs config (keys MODEL.* and TRAIN.USE_CHECKPOINT; see config.py)."""
    m = config.MODEL.DEFMAMBA
    return DefMamba(
        num_classes=config.MODEL.NUM_CLASSES, in_chans=m.IN_CHANS, embed_dim=m.EMBED_DIM, depths=tuple(m.DEPTHS),
        d_state=m.D_STATE, dt_rank=m.DT_RANK, ssm_ratio=m.SSM_RATIO, mlp_ratio=m.MLP_RATIO,
        offset_kernels=tuple(m.OFFSET_KERNELS), drop_path_rate=config.MODEL.DROP_PATH_RATE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT, fb_bb=m.FB_BB, third_branch=m.THIRD_BRANCH,
        local_window=m.LOCAL_WINDOW, point_offset=m.POINT_OFFSET, index_offset=m.INDEX_OFFSET,
        offset_bias=m.OFFSET_BIAS, channel_attention=m.CHANNEL_ATTENTION,
    )
