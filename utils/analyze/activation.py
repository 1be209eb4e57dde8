"""Activation maps at query tokens (DefMamba paper, Fig. 4): which tokens a block's mixer reads for a query.

Fig. 4 shows, for chosen query positions, the response of the last block of stage 2 computed "using the method
outlined in VMamba", which reads the SSM as a data-dependent linear map y = M x over the tokens and shows the
row of M of the query token. The model-agnostic form of that row used here is the Jacobian of the block's
token mixer (DSSM, DASSM, SS2D, ...): for query token q the map over tokens p is

    A_q(p) = sum over input channels of | d (sum over output channels of y_q) / d x_p |

with x the mixer's input and y its output. For a mixer that is linear in x this is
|M[q, p]| (times the channel count), i.e. VMamba's map; for the real mixers it also counts how the scan's
parameters (and DefMamba's deformable points and order) depend on the tokens. The query's own token always
dominates (the skip term D x_q and the scan's current step), so a map is divided by its largest value over the
*other* tokens and the query's own entry is clipped to 1: the picture shows where else the mixer reads.
Queries are given as fractions (y, x) of the image height and width, so the same queries apply to models of
different strides.

The mixer is found by convention: `model.stage_modules()[stage].blocks[block]` holds it in the attribute named
by `model.mixer_name`, and its tensors are in `model.output_fmt` layout (every family here follows it).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .inputs import AnalysisError

__all__ = ["token_mixer", "query_tokens", "activation_maps"]


class _Captured(Exception):
    """Raised by the hook once the mixer has run: the rest of the network is not needed."""


def token_mixer(model: nn.Module, stage: int, block: int) -> nn.Module:
    """The token mixer of 0-based `block` (negative counts from the end) of 0-based `stage`."""
    if not hasattr(model, "stage_modules") or not hasattr(model, "mixer_name"):
        raise AnalysisError(f"{type(model).__name__} does not expose stage_modules() and mixer_name "
                            "(models.base.StagedModel families do)")
    stages = model.stage_modules()
    if not 0 <= stage < len(stages):
        raise AnalysisError(f"stage {stage + 1} does not exist: the model has stages 1 to {len(stages)}")
    blocks = stages[stage].blocks
    if not -len(blocks) <= block < len(blocks):
        raise AnalysisError(f"stage {stage + 1} has {len(blocks)} blocks; block {block} does not exist")
    return getattr(blocks[block], model.mixer_name)


def query_tokens(queries: Sequence[Tuple[float, float]], height: int, width: int) -> List[Tuple[int, int]]:
    """Token (row, column) of each fractional (y, x) query on a height x width token grid."""
    tokens = []
    for fy, fx in queries:
        if not (0 <= fy <= 1 and 0 <= fx <= 1):
            raise AnalysisError(f"query ({fy}, {fx}) is outside the image: use fractions in [0, 1]")
        tokens.append((min(int(fy * height), height - 1), min(int(fx * width), width - 1)))
    return tokens


def activation_maps(model: nn.Module, image: Tensor, stage: int, block: int,
                    queries: Sequence[Tuple[float, float]]) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """Maps (Q, h, w) in [0, 1] of the mixer of (stage, block) for one (3, H, W) image, and the query tokens.

    Each map is scaled by its largest response to a token other than the query (the query's own is clipped
    to 1); on a 1 x 1 grid the map is the single token's response scaled to 1."""
    mixer = token_mixer(model, stage, block)
    seen = {}

    def before(module: nn.Module, args: tuple) -> tuple:
        # the mixer's input becomes a leaf, so the gradient stops here and is the Jacobian's row
        seen["x"] = args[0].detach().requires_grad_(True)
        return (seen["x"],) + tuple(args[1:])

    def after(module: nn.Module, args: tuple, output: Tensor) -> None:
        seen["y"] = output
        raise _Captured

    hooks = [mixer.register_forward_pre_hook(before), mixer.register_forward_hook(after)]
    try:
        with torch.enable_grad():
            model(image[None])
    except _Captured:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    if "y" not in seen:
        raise AnalysisError(f"stage {stage + 1} block {block}'s mixer did not run in the forward pass")
    x, y = seen["x"], seen["y"]
    channels_first = model.output_fmt == "NCHW"
    y_hwc = y.permute(0, 2, 3, 1) if channels_first else y
    height, width = y_hwc.shape[1:3]
    tokens = query_tokens(queries, height, width)
    maps = []
    for i, j in tokens:
        grad, = torch.autograd.grad(y_hwc[0, i, j].sum(), x, retain_graph=True)
        grad_hwc = grad.permute(0, 2, 3, 1) if channels_first else grad
        response = grad_hwc[0].abs().sum(-1).double()
        others = response.clone()
        if others.numel() > 1:
            others[i, j] = 0
        peak = others.max()
        maps.append((response / peak).clamp(max=1) if peak > 0 else response.clamp(max=1))
    return torch.stack(maps), tokens
