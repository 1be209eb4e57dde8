"""Effective receptive field (ERF) of a stage: how strongly each input pixel moves the stage's central output.

The measure of Ding et al. (RepLKNet, CVPR 2022), which VMamba and the adaptive-scan papers use for their ERF
figures: per image, the score is the sum over channels of ReLU(feature) at the central position (h // 2,
w // 2) of the stage's output map; the ReLU of its gradient with respect to the input image, summed over the
colour channels, is the image's contribution map; the maps are averaged over the images. Pictures show
log10(map + 1) divided by its maximum, and the area ratio at a threshold t is the area of the smallest square
centred on the input centre whose share of that scaled map exceeds t, over the image area (clipped at the
borders).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn

from .inputs import AnalysisError

__all__ = ["THRESHOLDS", "AreaRatio", "stage_features", "contribution_map", "log_scaled", "area_ratio",
           "area_ratios"]

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


@dataclass
class AreaRatio:
    threshold: float
    side: int        # side of the centred square, in input pixels (before clipping at the borders)
    ratio: float     # its clipped area over the image area

    def as_dict(self) -> Dict[str, float]:
        return {"threshold": self.threshold, "side": self.side, "ratio": self.ratio}


def stage_features(model: nn.Module, stage: int) -> Callable[[Tensor], Tensor]:
    """x -> the NCHW output map of 0-based `stage` (timm's forward_intermediates, so any family works)."""
    stages = len(model.feature_info)
    if not 0 <= stage < stages:
        raise AnalysisError(f"stage {stage + 1} does not exist: the model has stages 1 to {stages}")

    def features(x: Tensor) -> Tensor:
        return model.forward_intermediates(x, indices=[stage], intermediates_only=True, stop_early=True,
                                           output_fmt="NCHW")[0]
    return features


def contribution_map(features: Callable[[Tensor], Tensor], images: Sequence[Tensor], batch_size: int = 8) -> Tensor:
    """Mean over `images` ((3, H, W) each) of the input-gradient map of the central output, (H, W) in fp64."""
    total = None
    for start in range(0, len(images), batch_size):
        x = torch.stack(list(images[start:start + batch_size])).requires_grad_(True)
        feat = features(x)
        h, w = feat.shape[-2:]
        score = feat[:, :, h // 2, w // 2].relu().sum()
        if not score.requires_grad:
            raise AnalysisError("the stage output does not depend on the input")
        grad, = torch.autograd.grad(score, x)
        part = grad.relu().sum(dim=(0, 1)).double()
        total = part if total is None else total + part
    return total / len(images)


def log_scaled(erf: Tensor) -> Tensor:
    """log10(erf + 1) divided by its maximum (all zeros stay zeros)."""
    scaled = torch.log10(erf.double() + 1)
    peak = scaled.max()
    return scaled / peak if peak > 0 else scaled


def area_ratio(scaled: Tensor, threshold: float) -> AreaRatio:
    """The smallest square centred at (H // 2, W // 2) holding more than `threshold` of `scaled`'s total."""
    if not 0 < threshold < 1:
        raise AnalysisError(f"area-ratio thresholds must lie in (0, 1), got {threshold}")
    height, width = scaled.shape
    total = float(scaled.sum())
    if total <= 0:
        raise AnalysisError("the contribution map is all zeros: the central output ignores the input")
    cy, cx = height // 2, width // 2
    # square of side 2r + 1; r = max(H, W) covers the whole image, whose share is 1 > threshold
    for r in range(max(height, width) + 1):
        box = scaled[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1]
        if float(box.sum()) > threshold * total:
            return AreaRatio(threshold, 2 * r + 1, box.numel() / (height * width))
    raise AssertionError("unreachable: the whole image holds the whole total")


def area_ratios(scaled: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> List[AreaRatio]:
    return [area_ratio(scaled, t) for t in thresholds]
