"""AdamW with the release's weight-decay groups."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from yacs.config import CfgNode

__all__ = ["weight_decay_groups", "build_optimizer"]


def weight_decay_groups(model: nn.Module, weight_decay: float, exempt_ssm: bool) -> List[Dict]:
    """Two param groups: decayed, and not decayed.

    As in the release, only 1-D tensors and names ending in ".bias" are exempt, so A_logs,
    dt_projs_bias (2-D, "_bias") and rpe_table are decayed. `exempt_ssm` (TRAIN.SSM_NO_WEIGHT_DECAY)
    also exempts the names in `model.ssm_no_weight_decay()` (A_logs, Ds, dt_projs_bias, rpe_table).
    """
    ssm_names = set(model.ssm_no_weight_decay()) if exempt_ssm else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in ssm_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config: CfgNode, model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW over `model` (the unwrapped module) at the (already batch-scaled) base `lr`."""
    groups = weight_decay_groups(model, config.TRAIN.WEIGHT_DECAY, config.TRAIN.SSM_NO_WEIGHT_DECAY)
    opt = config.TRAIN.OPTIMIZER
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(opt.BETAS), eps=opt.EPS)
