"""`DATA.LOADER dali`: decode and augment with NVIDIA DALI (on the GPU when the run has one, else its CPU backend).

The files and their order are the default loader's: the same ImageFolder listing and DistributedSampler
(shuffle by SEED + epoch, val shards padded), passed to DALI's file reader as an explicit list, so both
loaders see the same images in the same order on every rank. Per image, as the default recipe
(data/transforms.py; the two are compared side by side in docs/training.md):

    train  decode + random-resized crop (nvJPEG's ROI decode on a GPU), resize, RandAugment (data/dali_augment.py)
           or colour jitter, flip, normalise to CHW fp32; then timm's RandomErasing on the batch, on the device
    val    decode, resize (the short side to IMG_SIZE / VAL_CROP_RATIO), center crop (or resize to the square),
           normalise

Mixup/CutMix and label smoothing run in the trainer as for the default loader. Exact resume: each train epoch
builds its pipeline with a seed drawn from (SEED, rank, epoch), so an epoch's augmentation does not depend on
how many epochs this process ran before.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DistributedSampler
from yacs.config import CfgNode

from .transforms import VAL_CROP_RATIO

if TYPE_CHECKING:  # dali_augment imports DALI, which this module imports only when a pipeline is built
    from .dali_augment import RandAugmentPolicy

__all__ = ["DALI_INSTALL_HINT", "DaliLoader", "dali_available"]

DALI_INSTALL_HINT = "pip install -r requirements-dali.txt"
_READER = "reader"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _interp(name: str):
    from nvidia.dali import types
    return {"bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}.get(name, types.INTERP_LINEAR)


def _pipeline(files: List[str], labels: List[int], config: CfgNode, is_train: bool, batch: int,
              device_id: Optional[int], seed: int, policy: Optional[RandAugmentPolicy]):
    """The DALI pipeline of one pass over `files` (in that order), built and ready to run; `policy`: the train
    split's RandAugment, or None."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    from .dali_augment import rand_augment

    size, aug = config.DATA.IMG_SIZE, config.AUG
    decoder = "cpu" if device_id is None else "mixed"
    interp = _interp(config.DATA.INTERPOLATION)

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded, targets = fn.readers.file(files=files, labels=labels, random_shuffle=False, name=_READER,
                                           pad_last_batch=not is_train)
        mirror = 0
        if is_train:
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   random_area=list(aug.SCALE), random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, size=[size, size], interp_type=interp)
            if policy is not None:
                images = rand_augment(images, policy, (size, size))
            elif aug.COLOR_JITTER > 0:  # timm's ColorJitter(b, c, s) with one strength (it drops it under RandAugment)
                jitter = [max(0.0, 1 - aug.COLOR_JITTER), 1 + aug.COLOR_JITTER]
                images = fn.color_twist(images, brightness=fn.random.uniform(range=jitter),
                                        contrast=fn.random.uniform(range=jitter),
                                        saturation=fn.random.uniform(range=jitter))
            if aug.HFLIP > 0:
                mirror = fn.random.coin_flip(probability=aug.HFLIP)
            crop = None
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            if config.TEST.CROP:
                # torchvision's Resize(int): the short side to `short`, the long one to floor(short * long / short_side)
                short = int(size / VAL_CROP_RATIO)
                shape = images.shape(dtype=types.INT32)
                side = dmath.min(shape[0], shape[1])
                images = fn.resize(images, size=fn.cast(fn.stack((short * shape[0]) // side, (short * shape[1]) // side),
                                                        dtype=types.FLOAT), interp_type=interp)
                crop = (size, size)
            else:
                images = fn.resize(images, size=[size, size], interp_type=interp)
                crop = None
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=crop,
                                          mean=[255 * m for m in IMAGENET_DEFAULT_MEAN],
                                          std=[255 * s for s in IMAGENET_DEFAULT_STD], mirror=mirror)
        return images, targets if device_id is None else targets.gpu()

    pipe = graph(batch_size=batch, num_threads=max(1, config.DATA.NUM_WORKERS), device_id=device_id, seed=seed)
    pipe.build()
    return pipe


class DaliLoader:
    """Batches (images (B, 3, S, S) fp32 on the run's device, targets (B,) int64) of one split, decoded by DALI.

    `sampler` orders and shards the files as for the default loader; train drops the last partial batch, val
    keeps it. Call `set_epoch` before each train epoch.
    """

    def __init__(self, config: CfgNode, samples: Sequence[Tuple[str, int]], sampler: DistributedSampler,
                 is_train: bool, device: torch.device) -> None:
        self.config, self.samples, self.sampler, self.is_train = config, list(samples), sampler, is_train
        self.batch_size = config.DATA.BATCH_SIZE
        self.device = device
        self.device_id = None if device.type != "cuda" else \
            (device.index if device.index is not None else torch.cuda.current_device())
        self.seed = int(config.SEED) % 2 ** 31
        aug = config.AUG
        self.erasing = RandomErasing(aug.REPROB, mode=aug.REMODE, max_count=aug.RECOUNT, device=str(device)) \
            if is_train and aug.REPROB > 0 else None
        self._val_batches = self._train_batches = None
        self.policy = None
        if is_train and aug.AUTO_AUGMENT:  # parsed once; unsupported policies fail here, before anything runs
            from .dali_augment import parse_rand_augment
            self.policy = parse_rand_augment(aug.AUTO_AUGMENT)

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.is_train else math.ceil(count / self.batch_size)

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Shuffle as the default loader does for `epoch`, seed DALI's augmentation with `seed` (data.set_epoch
        draws it from SEED, rank and epoch) and build the epoch's pipeline."""
        self.sampler.set_epoch(epoch)
        self.seed = seed % 2 ** 31
        self._train_batches = self._batches()  # built now, so that the epoch's first batch does not wait for it

    def _build(self):
        indices = list(self.sampler)[:len(self) * self.batch_size]
        files = [self.samples[i][0] for i in indices]
        labels = [self.samples[i][1] for i in indices]
        return _pipeline(files, labels, self.config, self.is_train, self.batch_size, self.device_id, self.seed,
                         self.policy)

    def _batches(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.DROP if self.is_train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([self._build()], ["images", "targets"], reader_name=_READER,
                                   last_batch_policy=policy, auto_reset=True)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        # a train epoch gets a pipeline of its own (its order and seed); val reuses one, reset after each pass
        if self.is_train:
            batches = self._train_batches if self._train_batches is not None else self._batches()
            self._train_batches = None
        else:
            if self._val_batches is None:
                self._val_batches = self._batches()
            batches = self._val_batches
        for out in batches:
            images, targets = out[0]["images"], out[0]["targets"].view(-1).long()
            if self.erasing is not None:
                images = self.erasing(images)
            yield images, targets
