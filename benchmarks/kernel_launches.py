"""The launches of the Triton kernels at the models' shapes, built with meta tensors through the same host code
that runs them and never run: every scan launch of every stage (models/ops/scan/triton.py; B and C views of one
x projection as in the mixers, u in the mixers' pieces, one launch per piece and direction), the
bilinear-sampling kernels (models/ops/deform/triton.py, models/ops/adaptive/triton.py) and the DSSM's branch
merge (models/ops/merge/triton.py). benchmarks/kernel_analysis.py compiles them ahead of time.
"""
from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Tuple

import torch

MODELS = ("defmamba_tiny", "defmamba_small", "damamba_tiny")


class StageShape(NamedTuple):
    model: str
    stage: int
    branches: int      # B/C groups G (DefMamba: 3 scan branches; DAMamba: 1)
    channels: int      # channels per group
    nstate: int
    rank: int          # dt rank: rows of the x projection before B
    length: int
    offset_groups: int = 0  # DAMamba's adaptive sampling: offset groups G (0: none; DefMamba samples all channels)


def stage_shapes(model: str, img_size: int = 224) -> List[StageShape]:
    """One entry per stage: the scan shape its mixers call (read from the model built on the meta device)."""
    import timm
    import models  # noqa: F401  registers the families with timm
    from models.damamba.dassm import DASSM
    from models.defmamba.dssm import DSSM
    net = timm.create_model(model, device="meta")
    shapes, seen = [], set()
    for name, module in net.named_modules():
        if isinstance(module, DSSM):
            key, groups = (module.num_branches, module.d_inner, module.d_state, module.dt_rank), 0
        elif isinstance(module, DASSM):
            key = (1, module.dim, module.d_state, module.dt_rank)
            groups = 0 if module.da_scan is None else module.da_scan.offset.out_features // 2
        else:
            continue
        if key not in seen:  # widths double per stage: a new key is the next stage
            seen.add(key)
            side = img_size // 4 // 2 ** len(shapes)
            shapes.append(StageShape(model, len(shapes), *key, side * side, groups))
    return shapes


def scan_inputs(shape: StageShape, batch: int, dtype: torch.dtype, device="meta"):
    """(u, delta, A, B, C, D, delta_bias) laid out as the mixers pass them: B, C split from one projection."""
    g, p, n, r, length = shape.branches, shape.channels, shape.nstate, shape.rank, shape.length
    e = lambda *s, dt=dtype: torch.empty(*s, device=device, dtype=dt)  # noqa: E731
    x_dbl = e(batch, g, r + 2 * n, length)
    B, C = x_dbl[:, :, r:r + n], x_dbl[:, :, r + n:]
    f32 = torch.float32
    return e(batch, g * p, length), e(batch, g * p, length), e(g * p, n, dt=f32), B, C, e(g * p, dt=f32), \
        e(g * p, dt=f32)


# the B/C groups a model's scan runs backward in time, in place (DefMamba's backward branch: dssm.py)
REVERSED_GROUPS = {"defmamba": (1,)}


def mixer_pieces(shape: StageShape, u: torch.Tensor) -> List[torch.Tensor]:
    """u as the mixer passes it to the Triton scan: DefMamba's DSSM gives the raster sequence twice (forward and
    backward branch; token-major, as its channels-last conv leaves it) and the deformable sequence, three
    (batch, D, L) pieces; the others u in one piece."""
    if not shape.model.startswith("defmamba"):
        return [u]
    batch, length = u.shape[0], u.shape[2]
    raster = torch.empty(batch, length, shape.channels, device=u.device, dtype=u.dtype).transpose(1, 2)
    deformed = torch.empty(batch, shape.channels, length, device=u.device, dtype=u.dtype)
    return [raster, raster, deformed]


def model_launches(models=MODELS, batch: int = 128, dtypes=(torch.float16, torch.bfloat16, torch.float32)
                   ) -> Iterator[Tuple[StageShape, torch.dtype, str, object]]:
    """(stage, dtype, 'forward' | 'backward', Launch) for every scan launch at every stage of every model, built
    but not run: one per piece of u and direction (models/ops/scan/triton.py, launch_parts)."""
    from models.ops.scan import triton as host
    for model in models:
        reversed_groups = REVERSED_GROUPS.get(model.split("_")[0], ())
        for shape in stage_shapes(model):
            for dtype in dtypes:
                u, *args = scan_inputs(shape, batch, dtype)
                parts = host.launch_parts(mixer_pieces(shape, u), shape.branches, reversed_groups)
                out = None
                for part in parts:
                    fwd, y, states = host.plan_forward(part, *args, True, out)
                    out = y, states
                    yield shape, dtype, "forward", fwd
                buffers = None
                for part in parts:
                    bwd, buffers = host.plan_backward(part, *args, True, torch.empty_like(y), states, buffers)
                    yield shape, dtype, "backward", bwd


def merge_launches(models=MODELS, batch: int = 128, dtypes=(torch.float16, torch.bfloat16, torch.float32)
                   ) -> Iterator[Tuple[StageShape, torch.dtype, str, object]]:
    """(stage, dtype, kernel name, Launch) of the DSSM's fused branch merge (DefMamba): the scan's fp32 outputs
    (B, K, D, L), int64 inverse orders, the gate z as the in_proj output's second half in the AMP dtype, the
    output and the saved mean in fp32 (training)."""
    from models.ops.merge import triton as merge
    for model in models:
        if not model.startswith("defmamba"):
            continue
        for shape in stage_shapes(model):
            k, d, length = shape.branches, shape.channels, shape.length
            for dtype in dtypes:
                e = lambda *s, dt=torch.float32: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
                ys, inverse = e(batch, k, d, length), e(batch, k, length, dt=torch.long)
                gate = e(batch, length, 2 * d, dt=dtype)[..., d:]
                fwd, out = merge.plan_forward(ys, inverse, gate, torch.float32, e(batch, length, d))
                yield shape, dtype, fwd.kernel.__name__, fwd
                bwd, _ = merge.plan_backward(torch.empty_like(out), inverse, gate, e(batch, length, d))
                yield shape, dtype, bwd.kernel.__name__, bwd


def sampling_launches(models=MODELS, batch: int = 128, dtypes=(torch.float16, torch.bfloat16, torch.float32)
                      ) -> Iterator[Tuple[StageShape, torch.dtype, str, object]]:
    """(stage, dtype, label kernel name, Launch) of the bilinear-sampling kernels at every stage, built but not run:
    DefMamba's deformable sequence (x channels-last (B, D, H, W) as the DSSM's conv writes it, fp32 points,
    offset-bias table and path; the sequence and its gradient in the scan's dtype) and DAMamba's adaptive sampling
    (u (B, C, H, W), offsets (B, H, W, 2G) from the offset Linear, both in the AMP dtype)."""
    from models.ops.adaptive import triton as adaptive
    from models.ops.deform import triton as deform
    f32 = torch.float32
    for model in models:
        for shape in stage_shapes(model):
            side = math.isqrt(shape.length)
            for dtype in dtypes:
                e = lambda *s, dt=dtype: torch.empty(*s, device="meta", dtype=dt)  # noqa: E731
                if model.startswith("defmamba"):
                    x = e(batch, side, side, shape.channels).permute(0, 3, 1, 2)
                    pos, disp = e(batch, side, side, 2, dt=f32), e(batch, side, side, 2, dt=f32)
                    table = e(shape.channels, 7, 7, dt=f32)
                    perm = e(batch, shape.length, dt=torch.long)
                    fwd, seq = deform.plan_forward(x, pos, table, disp, perm, dtype)
                    yield shape, dtype, fwd.kernel.__name__, fwd
                    bwd, _, _ = deform.plan_backward(torch.empty_like(seq), x, pos, table, disp, perm, *[True] * 5)
                    for part, launch in zip(("x", "table"), bwd):
                        yield shape, dtype, f"{launch.kernel.__name__}({part})", launch
                elif shape.offset_groups:
                    x, offsets = e(batch, shape.channels, side, side), e(batch, side, side, 2 * shape.offset_groups)
                    fwd, out = adaptive.plan_forward(x, offsets)
                    yield shape, dtype, fwd.kernel.__name__, fwd
                    bwd, _ = adaptive.plan_backward(torch.empty_like(out), x, offsets, True, True)
                    yield shape, dtype, bwd.kernel.__name__, bwd
