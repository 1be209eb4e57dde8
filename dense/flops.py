"""Parameters and FLOPs of a detector or segmentor config, counted with utils.flops (fvcore + scan handles).

    python -m dense.flops CONFIG [--shape H W] [--scan-flops release|vmamba]

The scan convention defaults to the family's, as in utils.flops: `vmamba` for VMamba and Mamba-Adaptor
backbones (VMamba's published numbers), `release` for DefMamba.

What is counted, per image of H x W (default: the release's 1280 x 800 for detection, 512 x 2048 for
segmentation), one multiply-add = one FLOP:
- Mask R-CNN: backbone, FPN, RPN head, and the RoI heads on 1000 proposals (box head) and the first 100 of
  them (mask head), as MMDetection's `MaskRCNN._forward` runs them; proposals are fixed boxes here, since
  proposal selection (NMS) costs no FLOPs in fvcore's rules and RoIAlign is not counted.
- UperNet: backbone and decode head, as MMSegmentation's `EncoderDecoder._forward` (no auxiliary head,
  logits at 1/4 resolution).
Parameters: all of the model (auxiliary head included), as the release's figures count them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["DenseFlopModel", "dense_params", "dense_params_and_flops", "family_convention"]

DEFAULT_SHAPES = {"mmdet": (1280, 800), "mmseg": (512, 2048)}


class DenseFlopModel(nn.Module):
    """The inference path of a Mask R-CNN or UperNet on a fixed (H, W) crop of a square input.

    `utils.flops.count_flops` feeds a square zero image; the crop (free in fvcore's rules) gives H x W.
    """

    def __init__(self, model: nn.Module, scope: str, height: int, width: int, num_proposals: int = 1000) -> None:
        super().__init__()
        self.model, self.scope, self.height, self.width = model, scope, height, width
        if scope == "mmdet":
            # proposals spread over the image: their positions do not change any FLOP count
            g = torch.Generator().manual_seed(0)
            xy = torch.rand(num_proposals, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
            wh = 8 + torch.rand(num_proposals, 2, generator=g) * torch.tensor([width * 0.2, height * 0.2])
            self.register_buffer("proposals", torch.cat((xy, xy + wh), 1), persistent=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = x[:, :, :self.height, :self.width]
        if self.scope == "mmseg":
            return (self.model._forward(x),)
        from mmengine.structures import InstanceData
        feats = self.model.extract_feat(x)
        rpn_scores, rpn_deltas = self.model.rpn_head(feats)
        roi_outs = self.model.roi_head.forward(feats, [InstanceData(bboxes=self.proposals)])
        return (*rpn_scores, *rpn_deltas, *roi_outs)


def _build(config: str, overrides: Optional[dict] = None) -> Tuple[nn.Module, str]:
    import dense  # noqa: F401  (registers the backbone, mmcv ops)
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    cfg = Config.fromfile(config)
    if overrides:
        cfg.merge_from_dict(overrides)
    cfg.model.backbone.pretrained = None  # architecture only
    scope = cfg.get("default_scope")
    if scope not in DEFAULT_SHAPES:
        raise ValueError(f"config {config}: default_scope must be one of {sorted(DEFAULT_SHAPES)}, got {scope!r}")
    init_default_scope(scope)
    return MODELS.build(cfg.model).eval(), scope


def dense_params(config: str, overrides: Optional[dict] = None) -> int:
    """Trainable parameters of the whole model in `config` (auxiliary head included)."""
    from utils.flops import count_params
    return count_params(_build(config, overrides)[0])


def family_convention(config: str, overrides: Optional[dict] = None) -> str:
    """The scan-FLOP convention of the config's backbone family: `vmamba` for VMamba and Mamba-Adaptor (a VMamba
    subclass), `release` otherwise."""
    from mmengine.config import Config

    from dense import backbone as registered
    from models import VMamba

    cfg = Config.fromfile(config)
    if overrides:
        cfg.merge_from_dict(overrides)
    cls = getattr(registered, str(cfg.model.backbone.get("type")), None)
    return "vmamba" if isinstance(cls, type) and issubclass(cls, VMamba) else "release"


def dense_params_and_flops(config: str, shape: Optional[Tuple[int, int]] = None, convention: Optional[str] = None,
                           overrides: Optional[dict] = None) -> Tuple[int, float, Tuple[int, int]]:
    """(parameters, GFLOPs, (H, W)) of the model in `config` for one H x W image (convention None: the family's)."""
    from utils.flops import ScanFlopConvention, count_flops, count_params

    convention = convention or family_convention(config, overrides)
    model, scope = _build(config, overrides)
    height, width = shape or DEFAULT_SHAPES[scope]
    wrapper = DenseFlopModel(model, scope, height, width)
    with torch.no_grad():
        gflops = count_flops(wrapper, max(height, width), convention=ScanFlopConvention(convention))
    return count_params(model), gflops, (height, width)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dense.flops", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config under configs/detection or configs/segmentation")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                        help="input size (default: 1280 800 for detection, 512 2048 for segmentation)")
    parser.add_argument("--scan-flops", choices=["release", "vmamba"], default=None,
                        help="selective-scan counting convention (see utils/flops.py; default: the backbone family's)")
    parser.add_argument("--params-only", action="store_true", help="count parameters only (fast, little memory)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):
        parser.error(f"config {args.config} does not exist")
    if args.shape and min(args.shape) < 32:
        parser.error(f"--shape must be at least 32 x 32, got {args.shape}")
    if args.params_only:
        params = dense_params(args.config)
        print(f"{os.path.basename(args.config)}: params {params:,} ({params / 1e6:.1f} M)")
        return 0
    convention = args.scan_flops or family_convention(args.config)
    params, gflops, (h, w) = dense_params_and_flops(args.config, tuple(args.shape) if args.shape else None,
                                                    convention)
    print(f"{os.path.basename(args.config)}: params {params:,} ({params / 1e6:.1f} M), {gflops:.1f} GFLOPs "
          f"at {h}x{w} (scan convention: {convention})")
    return 0


if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(sys.argv[1:]))
