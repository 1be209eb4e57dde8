"""Datasets, distributed samplers, loaders and Mixup for training and evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, DistributedSampler
from yacs.config import CfgNode

from .dali_loader import DALI_INSTALL_HINT, DaliLoader, dali_available
from .image_folder import CheckedImageFolder
from .mnist5k import default_mnist5k_root, ensure_mnist5k
from .transforms import build_transform

__all__ = ["DataError", "Loaders", "resolve_data_root", "build_mixup", "build_loaders", "set_epoch"]


class DataError(ValueError):
    """Unusable input data (missing folder, wrong class count, too few images); one-line message."""


# DATA.LOADER: 'torch' = DataLoader workers with PIL + timm transforms; 'dali' = NVIDIA DALI (data/dali_loader.py)
LOADERS = ("torch", "dali")


@dataclass
class Loaders:
    """The val loader always; the train loader only when training (DataLoader, or DaliLoader for DATA.LOADER dali)."""

    val: Union[DataLoader, DaliLoader]
    train: Optional[Union[DataLoader, DaliLoader]] = None


def resolve_data_root(config: CfgNode, need_train: bool) -> Path:
    """The ImageFolder root for the config, checked (and for 'mnist5k' materialised) before any run state
    is touched. Raises DataError naming the path."""
    splits = ("train", "val") if need_train else ("val",)
    if config.DATA.DATASET == "mnist5k":
        root = Path(config.DATA.DATA_PATH) if config.DATA.DATA_PATH else default_mnist5k_root()
        ensure_mnist5k(root)
    else:
        if not config.DATA.DATA_PATH:
            raise DataError("no data path: pass --data-path <imagenet root> (holding train/ and val/), "
                            "or try the embedded dataset with --cfg configs/demo.yaml")
        root = Path(config.DATA.DATA_PATH)
    if not root.is_dir():
        raise DataError(f"data path {root} does not exist (expected {root}/train and {root}/val)")
    for split in splits:
        if not (root / split).is_dir():
            raise DataError(f"data path {root} has no {split}/ folder (expected {root}/train and {root}/val)")
    return root


def _dataset(config: CfgNode, folder: Path, is_train: bool) -> CheckedImageFolder:
    # DALI reads the listed files itself: the dataset only lists and checks them
    transform = build_transform(config, is_train) if config.DATA.LOADER == "torch" else None
    try:
        dataset = CheckedImageFolder(str(folder), transform=transform,
                                     skip_corrupt=config.DATA.SKIP_CORRUPT)
    except FileNotFoundError as err:  # ImageFolder: no class folders or no image files
        raise DataError(f"{folder}: {str(err).splitlines()[0]}") from None
    if len(dataset.classes) != config.MODEL.NUM_CLASSES:
        raise DataError(f"{folder} has {len(dataset.classes)} class folders but MODEL.NUM_CLASSES is "
                        f"{config.MODEL.NUM_CLASSES}")
    return dataset


def build_mixup(config: CfgNode) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both alphas are 0."""
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0:
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, prob=aug.MIXUP_PROB,
                 switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def _loader(config: CfgNode, dataset: CheckedImageFolder, sampler: DistributedSampler,
            is_train: bool, device: torch.device) -> Union[DataLoader, DaliLoader]:
    if config.DATA.LOADER == "dali":
        try:
            return DaliLoader(config, dataset.samples, sampler, is_train, device)
        except ValueError as err:  # a RandAugment policy the DALI graph cannot run
            raise DataError(str(err)) from None
    workers = config.DATA.NUM_WORKERS
    # pinning needs a GPU; without one torch would warn on every loader
    pin = config.DATA.PIN_MEMORY and torch.cuda.is_available()
    # Train workers start afresh every epoch, seeded by set_epoch, so that an epoch's augmentation does not
    # depend on how many epochs this process ran before (exact resume); val has no randomness to keep. Each
    # loader has its own generator, so iterating never draws from the process's torch generator.
    return DataLoader(dataset, batch_size=config.DATA.BATCH_SIZE, sampler=sampler, num_workers=workers,
                      pin_memory=pin, drop_last=is_train, persistent_workers=workers > 0 and not is_train,
                      generator=torch.Generator())


def set_epoch(loader: Union[DataLoader, DaliLoader], epoch: int, seed: int, rank: int) -> None:
    """Make the train loader's shuffle and its workers' seeds functions of (seed, rank, epoch) only.

    The sampler shuffles by seed + epoch; the workers' torch/random/NumPy seeds come from the loader's
    generator, replaced here by one seeded from (seed, rank, epoch). Without workers the augmentation draws
    from the process's generators, which checkpoints save and restore. A DaliLoader's pipeline gets the same seed.
    """
    stream = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    if isinstance(loader, DaliLoader):
        loader.set_epoch(epoch, stream)
        return
    loader.sampler.set_epoch(epoch)
    loader.generator = torch.Generator().manual_seed(stream)


def build_loaders(config: CfgNode, root: Path, rank: int, world_size: int, need_train: bool,
                  device: torch.device = torch.device("cpu")) -> Loaders:
    """Loaders sharded over `world_size` processes with DistributedSampler (also for a single process, so
    the shuffle order depends only on SEED and the epoch; call set_epoch before each epoch). The val shards
    are padded to equal length by repeating the first images, as in the release: up to world_size - 1
    images are counted twice. DATA.LOADER dali decodes on `device` (its CPU backend for a CPU device)."""
    if config.DATA.LOADER == "dali" and not dali_available():
        raise DataError(f"DATA.LOADER dali needs NVIDIA DALI: {DALI_INSTALL_HINT}")
    val_set = _dataset(config, root / "val", is_train=False)
    val_sampler = DistributedSampler(val_set, num_replicas=world_size, rank=rank, shuffle=False)
    loaders = Loaders(val=_loader(config, val_set, val_sampler, False, device))
    if need_train:
        train_set = _dataset(config, root / "train", is_train=True)
        per_rank = len(train_set) // world_size
        if per_rank < config.DATA.BATCH_SIZE * config.TRAIN.ACCUMULATION_STEPS:
            raise DataError(f"{root / 'train'} has {len(train_set)} images: fewer than one optimizer step "
                            f"({config.DATA.BATCH_SIZE} x {config.TRAIN.ACCUMULATION_STEPS} accumulation "
                            f"steps) per process for {world_size} process(es)")
        train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=config.SEED)
        loaders.train = _loader(config, train_set, train_sampler, True, device)
    return loaders
