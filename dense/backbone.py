"""`DefMambaBackbone` in the MMDetection and MMSegmentation MODELS registries (those of the two installed)."""
from __future__ import annotations

import importlib
import importlib.util
from typing import List, Optional

from mmengine.logging import print_log

from models.defmamba.backbone import BackboneLoadReport
from models.defmamba.backbone import DefMambaBackbone as _Backbone

__all__ = ["DefMambaBackbone", "registered_in"]


class DefMambaBackbone(_Backbone):
    """models.defmamba.backbone.DefMambaBackbone that reports its ImageNet loading in the MMEngine log.

    Config keys: out_indices, pretrained (ImageNet checkpoint path, loaded by init_weights), and DefMamba's
    embed_dim, depths, drop_path_rate, d_state, dt_rank, ssm_ratio, mlp_ratio, offset_kernels, use_checkpoint.
    """

    def init_weights(self) -> Optional[BackboneLoadReport]:
        report = super().init_weights()
        if report is not None:
            print_log(f"DefMambaBackbone: {report}", logger="current")
        return report


def _register() -> List[str]:
    scopes = []
    for scope, package in (("mmdet", "mmdet"), ("mmseg", "mmseg")):
        if importlib.util.find_spec(package) is None:
            continue
        registry = importlib.import_module(f"{package}.registry").MODELS
        registry.register_module(name="DefMambaBackbone", module=DefMambaBackbone, force=True)
        scopes.append(scope)
    return scopes


registered_in: List[str] = _register()
