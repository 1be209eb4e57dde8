"""Images per second per loader core of the project's input pipelines, and the loader cores a GPU needs.

Writes its own ImageNet-like JPEGs (500x375, quality 90, about 100 KB: smooth colour fields, shapes, edges,
texture and noise; no data set to download), then times three pipelines through the trainer's own
pieces (`data.CheckedImageFolder`, `data.build_transform` of `--cfg`, a torch DataLoader with one worker
process per core):

- decode: open + JPEG decode + RGB conversion (what every pipeline starts with);
- train: decode + the timm training transform (random-resized crop, flip, RandAugment, normalise, random
  erasing), the recipe of configs/tiny.yaml with `--interpolation` (default bicubic);
- val: decode + resize + center crop + normalise.

Each pipeline runs `--passes` passes over the images with persistent workers; the first pass (worker
start-up, page cache) is not timed. `--loader dali` times DATA.LOADER dali's train and val pipelines instead, on
DALI's CPU backend (`--workers` threads in this process; the passes as one epoch, timed after its first 3
batches). Two rates: img/s of wall time, and img/s per CPU-second the workers used
(their run time from /proc, Linux), which is what one fully used core delivers (less affected
by other jobs on a shared machine, though their cache and memory traffic still slow it). Cores per GPU = the train img/s a GPU consumes (`--target`, default 1650:
the project's DefMamba-T target per H100; 549: the official release) / the train img/s per CPU-second; the
training process's own CPU use (collation, the step's Python) comes on top.

    python benchmarks/data_pipeline.py                         # 256 images in a temporary folder
    python benchmarks/data_pipeline.py --images 512 --workers 8 --folder /tmp/jpegs --json out.json
    python benchmarks/data_pipeline.py --loader dali --folder /tmp/jpegs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DistributedSampler

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config import get_default_config, load_yaml_config  # noqa: E402
from data import CheckedImageFolder, build_transform, set_epoch  # noqa: E402
from data.dali_loader import DaliLoader  # noqa: E402

# train img/s per GPU: the project's DefMamba-T target per H100 (issue #8) and the official release
DEFAULT_TARGETS = (1650.0, 549.0)
CLASSES = 4
# texture and noise levels (grey levels) that give about 100 KB per 500x375 picture at quality 90
TEXTURE, NOISE = 38.0, 14.0


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like picture: a smooth colour field, blurred shapes with edges, fine texture and noise."""
    coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (width, height)
        w, h = rng.uniform(0.05, 0.5, 2) * (width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    pixels = np.asarray(image, dtype=np.float32)
    texture = Image.fromarray(rng.normal(0, TEXTURE, (height // 3, width // 3)).astype(np.float32), mode="F")
    pixels += np.asarray(texture.resize((width, height), Image.Resampling.BILINEAR))[..., None]
    pixels += rng.normal(0, NOISE, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, width: int, height: int, quality: int, seed: int = 0) -> List[Path]:
    """`count` JPEGs in the ImageFolder `folder/class<k>/` (files already there are reused); returns them."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"class{i % CLASSES}" / f"{i:05d}.jpg"
        image = _image(rng, width, height)  # drawn even when reused, so file i is the same picture
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=quality)
        paths.append(path)
    return paths


def _decoded_size(image: Image.Image) -> torch.Tensor:
    """The decode-only pipeline's "transform": the decoded image is dropped, its size kept for collation."""
    return torch.tensor(image.size)


def _children_cpu_seconds() -> float:
    """CPU seconds used so far by the threads of this process's live child processes (the loader workers),
    from the scheduler's nanosecond counters (/proc/PID/task/TID/schedstat, Linux)."""
    me, total = str(os.getpid()), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] != me:  # after the name: state, ppid, ...
                continue
            total += sum(int(t.read_text().split()[0]) for t in stat.parent.glob("task/*/schedstat"))
        except OSError:  # the process ended meanwhile
            continue
    return total / 1e9


def _time_pipeline(dataset: CheckedImageFolder, workers: int, batch: int, passes: int) -> Dict[str, float]:
    """img/s over passes 2..N of a DataLoader with `workers` persistent worker processes: per second of wall
    time, and per CPU-second the workers used (what one fully used core delivers)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=True, generator=torch.Generator().manual_seed(0))
    for _ in loader:  # start-up pass
        pass
    images, start, cpu = 0, time.perf_counter(), _children_cpu_seconds()
    for _ in range(passes - 1):
        for item, _ in loader:
            images += len(item)
    wall, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu
    return {"img_s": images / wall, "img_s_per_cpu_s": images / cpu if cpu > 0 else math.nan}


class _Repeated:
    """A sampler's order `times` over, as one epoch: DALI builds one pipeline per epoch, timed here at steady state."""

    def __init__(self, sampler: DistributedSampler, times: int) -> None:
        self.sampler, self.times = sampler, times

    def __iter__(self):
        return (index for _ in range(self.times) for index in self.sampler)

    def __len__(self) -> int:
        return self.times * len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def _time_dali(loader: DaliLoader, skip: int = 3) -> Dict[str, float]:
    """img/s of a DaliLoader on the CPU (its `workers` threads run in this process) after its first `skip`
    batches (pipeline start-up and prefetching): per second of wall time and per CPU-second of this process."""
    set_epoch(loader, 0, seed=0, rank=0)
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    for item, _ in batches:
        images += len(item)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"img_s": images / wall, "img_s_per_cpu_s": images / cpu if cpu > 0 else math.nan}


def measure(folder: Path, cfg: Path, interpolation: str, workers: int, batch: int,
            passes: int, loader: str = "torch") -> Dict[str, Dict[str, float]]:
    """`_time_pipeline` of the decode, train and val pipelines on the ImageFolder at `folder`; for `loader`
    'dali', the train and val pipelines of DATA.LOADER dali on DALI's CPU backend."""
    config = get_default_config()
    load_yaml_config(config, cfg)
    config.DATA.INTERPOLATION = interpolation
    if loader == "dali":
        config.DATA.NUM_WORKERS, config.DATA.BATCH_SIZE = workers, batch
        dataset = CheckedImageFolder(str(folder))
        orders = {name: _Repeated(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=is_train), passes)
                  for name, is_train in (("train", True), ("val", False))}
        return {name: _time_dali(DaliLoader(config, dataset.samples, order, name == "train", torch.device("cpu")))
                for name, order in orders.items()}
    pipelines = {"decode": _decoded_size, "train": build_transform(config, is_train=True),
                 "val": build_transform(config, is_train=False)}
    return {name: _time_pipeline(CheckedImageFolder(str(folder), transform=transform), workers, batch, passes)
            for name, transform in pipelines.items()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where to write (or reuse) the JPEGs (default: a temp dir)")
    parser.add_argument("--images", type=_positive(int), default=256, help="number of JPEGs (default 256)")
    parser.add_argument("--size", default="500x375", help="JPEG width x height (default 500x375)")
    parser.add_argument("--quality", type=_positive(int), default=90, help="JPEG quality (default 90)")
    parser.add_argument("--workers", type=_positive(int), default=len(os.sched_getaffinity(0)),
                        help="loader worker processes (default: one per core of this process)")
    parser.add_argument("--batch", type=_positive(int), default=32, help="loader batch size (default 32)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the images, the first untimed")
    parser.add_argument("--cfg", type=Path, default=REPO / "configs" / "tiny.yaml", help="recipe (AUG.*)")
    parser.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic")
    parser.add_argument("--loader", choices=("torch", "dali"), default="torch",
                        help="DATA.LOADER to time (dali: its CPU backend, threads in this process)")
    parser.add_argument("--target", type=lambda s: [float(v) for v in s.split(",")], default=list(DEFAULT_TARGETS),
                        help="train img/s per GPU, comma-separated (default 1650,549)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size: expected WIDTHxHEIGHT, got {args.size}")
    if args.passes < 2:
        parser.error("--passes must be >= 2 (the first pass is not timed)")
    if any(t <= 0 for t in args.target):
        parser.error("--target: rates must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main process only collates; the workers use one thread each anyway
    try:
        with tempfile.TemporaryDirectory(prefix="jpegs-") as scratch:
            folder = args.folder or Path(scratch)
            paths = write_images(folder, args.images, args.width, args.height, args.quality)
            kb = sum(p.stat().st_size for p in paths) / len(paths) / 1000
            rates = measure(folder, args.cfg, args.interpolation, args.workers, args.batch, args.passes, args.loader)
    finally:  # a caller in the same process (the tests) keeps its thread count
        torch.set_num_threads(threads)
    per_core = {name: rate["img_s_per_cpu_s"] for name, rate in rates.items()}
    cores = {f"{t:g}": t / per_core["train"] for t in args.target}
    print(f"{len(paths)} JPEGs {args.width}x{args.height} q{args.quality}, mean {kb:.1f} KB; {args.workers} "
          f"worker(s) on {os.cpu_count()} core(s) ({_cpu_name()}); torch {torch.__version__}; "
          f"train recipe {args.cfg.name} with {args.interpolation}; DATA.LOADER {args.loader}")
    print("| pipeline | img/s (wall) | img/s per wall-second per worker | img/s per CPU-second |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate['img_s']:.0f} | {rate['img_s'] / args.workers:.0f} | {per_core[name]:.0f} |")
    for target, need in cores.items():
        print(f"train at {target} img/s per GPU needs {need:.1f} fully used loader cores per GPU")
    if args.json:
        args.json.write_text(json.dumps({
            "images": len(paths), "size": [args.width, args.height], "quality": args.quality, "mean_kb": kb,
            "workers": args.workers, "cores": os.cpu_count(), "cpu": _cpu_name(), "torch": torch.__version__,
            "interpolation": args.interpolation, "loader": args.loader, "cfg": str(args.cfg), "rates": rates, "img_s_per_core": per_core,
            "cores_per_gpu": cores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
