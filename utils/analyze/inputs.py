"""What the analysis commands read: model specs (config or timm name, optional checkpoint) and images.

A model spec is `[LABEL=]MODEL[@CHECKPOINT]`:

    configs/demo.yaml@output/defmamba_demo/default/best.pth      a trainer config and its checkpoint
    raster=configs/demo_raster.yaml@runs/raster/best.pth          the same, labelled "raster" in figures
    defmamba_tiny                                                 a registered timm name, random weights

Images are the embedded MNIST-5k validation digits (the default) or the files of an ImageFolder tree, put
through the model's validation transform (its config's, or timm's default for a bare timm name).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

__all__ = ["AnalysisError", "LoadedModel", "load_model", "digit_images", "folder_images", "load_images",
           "displayable"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class AnalysisError(ValueError):
    """Bad input to an analysis command; its message is the one line the command prints."""


@dataclass
class LoadedModel:
    """A model in eval mode with the transform its images need, the label figures show and its name (the
    config's MODEL.NAME or the timm name: what official figures are keyed by)."""
    label: str
    model: nn.Module
    transform: Callable[[Image.Image], Tensor]
    img_size: int
    name: str = ""


def load_model(spec: str, img_size: Optional[int] = None, use_ema: bool = False) -> LoadedModel:
    """The model of `spec` ([LABEL=]CONFIG.yaml|TIMM_NAME[@CHECKPOINT]); `img_size` overrides the config's."""
    label, eq, rest = spec.partition("=")
    if not eq:
        label, rest = "", spec
    target, _, checkpoint = rest.partition("@")
    if not target:
        raise AnalysisError(f"model spec {spec!r} names no model (expected [LABEL=]CONFIG.yaml|NAME[@CHECKPOINT])")
    from config import ConfigError, get_default_config, load_yaml_config
    from data.transforms import build_transform
    from models import CheckpointError, build_model, load_pretrained

    try:
        if target.endswith((".yaml", ".yml")):
            config = get_default_config()
            load_yaml_config(config, Path(target))
            if img_size:
                config.defrost()
                config.DATA.IMG_SIZE = img_size
                config.freeze()
            model = build_model(config)
            transform, size, name = build_transform(config, is_train=False), config.DATA.IMG_SIZE, config.MODEL.NAME
        else:
            model, transform, size = _timm_model(target, img_size)
            name = target
        if checkpoint:
            load_pretrained(model, checkpoint, use_ema=use_ema)
    except (ConfigError, CheckpointError, OSError) as err:
        raise AnalysisError(str(err)) from err
    return LoadedModel(label or name, model.eval(), transform, size, name)


def _timm_model(name: str, img_size: Optional[int]):
    import timm
    from timm.data import create_transform, resolve_data_config

    import models  # noqa: F401  (registers the project's timm names)

    if not timm.is_model(name):
        raise AnalysisError(f"{name!r} is neither a config YAML nor a registered timm model")
    model = timm.create_model(name)
    data_cfg = resolve_data_config({}, model=model)
    if img_size:
        data_cfg["input_size"] = (data_cfg["input_size"][0], img_size, img_size)
    return model, create_transform(**data_cfg), data_cfg["input_size"][-1]


def digit_images(count: int) -> List[Image.Image]:
    """`count` MNIST-5k validation digits (rows 400-499 of each class), classes taken in turn, as 32 px RGB."""
    from data.mnist5k import TRAIN_PER_CLASS, VAL_PER_CLASS, csv_path

    if not 1 <= count <= 10 * VAL_PER_CLASS:
        raise AnalysisError(f"the embedded digits have {10 * VAL_PER_CLASS} validation images; asked for {count}")
    per_class = TRAIN_PER_CLASS + VAL_PER_CLASS
    wanted = {c * per_class + TRAIN_PER_CLASS + i // 10: i for i, c in ((i, i % 10) for i in range(count))}
    found = {}
    with gzip.open(csv_path(), "rt") as f:
        for row, line in enumerate(f):
            if row in wanted:
                pixels = np.array(line.split(",")[:784], dtype=np.uint8).reshape(28, 28)
                found[wanted[row]] = Image.fromarray(np.pad(pixels, 2)).convert("RGB")
    return [found[i] for i in range(count)]


def folder_images(root: str, count: int) -> List[Image.Image]:
    """The first `count` images (sorted paths) under `root`, e.g. an ImageFolder split."""
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise AnalysisError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return [Image.open(p).convert("RGB") for p in paths[:count]]


def load_images(data_path: Optional[str], count: int) -> List[Image.Image]:
    """Images from `data_path` (a folder or one file), else the embedded digits."""
    if count < 1:
        raise AnalysisError(f"--images must be at least 1, got {count}")
    if data_path is None:
        return digit_images(count)
    if Path(data_path).is_file():
        return [Image.open(data_path).convert("RGB")]
    if not Path(data_path).is_dir():
        raise AnalysisError(f"{data_path} is neither an image nor a folder")
    return folder_images(data_path, count)


def displayable(image: Tensor) -> np.ndarray:
    """A normalised (3, H, W) model input as the (H, W, 3) uint8 picture the model saw."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return ((image.detach().cpu().float() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
