"""The backbones (`DefMambaBackbone`, `VMambaBackbone`, `MambaAdaptorBackbone`) in the MMDetection and
MMSegmentation MODELS registries (those of the two installed)."""
from __future__ import annotations

import importlib
import importlib.util
from typing import List, Optional

from mmengine.logging import print_log

from models.backbone import BackboneLoadReport
from models.defmamba.backbone import DefMambaBackbone as _DefMambaBackbone
from models.mamba_adaptor.backbone import MambaAdaptorBackbone as _MambaAdaptorBackbone
from models.vmamba.backbone import VMambaBackbone as _VMambaBackbone

__all__ = ["DefMambaBackbone", "VMambaBackbone", "MambaAdaptorBackbone", "registered_in"]


class _LoggedLoading:
    """Mixin: report the ImageNet loading of `init_weights` in the MMEngine log."""

    def init_weights(self) -> Optional[BackboneLoadReport]:
        report = super().init_weights()
        if report is not None:
            print_log(f"{type(self).__name__}: {report}", logger="current")
        return report


class DefMambaBackbone(_LoggedLoading, _DefMambaBackbone):
    """models.defmamba.backbone.DefMambaBackbone that reports its ImageNet loading in the MMEngine log.

    Config keys: out_indices, pretrained (ImageNet checkpoint path, loaded by init_weights), and DefMamba's
    embed_dim, depths, drop_path_rate, d_state, dt_rank, ssm_ratio, mlp_ratio, offset_kernels, use_checkpoint.
    """


class VMambaBackbone(_LoggedLoading, _VMambaBackbone):
    """models.vmamba.backbone.VMambaBackbone that reports its ImageNet loading in the MMEngine log.

    Config keys: out_indices, pretrained, and VMamba's embed_dim, depths, drop_path_rate, d_state, dt_rank,
    ssm_ratio, mlp_ratio, use_checkpoint.
    """


class MambaAdaptorBackbone(_LoggedLoading, _MambaAdaptorBackbone):
    """models.mamba_adaptor.backbone.MambaAdaptorBackbone that reports its ImageNet loading in the MMEngine log.

    Config keys: out_indices, pretrained, VMamba's keys (as VMambaBackbone) and MambaAdaptor's adaptor switches
    (adaptor_t, t_stages, t_points, ..., adaptor_s, s_stages, s_kernel_sizes, ..., img_size).
    """


def _register() -> List[str]:
    scopes = []
    for scope, package in (("mmdet", "mmdet"), ("mmseg", "mmseg")):
        if importlib.util.find_spec(package) is None:
            continue
        registry = importlib.import_module(f"{package}.registry").MODELS
        for backbone in (DefMambaBackbone, VMambaBackbone, MambaAdaptorBackbone):
            registry.register_module(name=backbone.__name__, module=backbone, force=True)
        scopes.append(scope)
    return scopes


registered_in: List[str] = _register()
