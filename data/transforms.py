"""Train and val image transforms (timm for training, the release's resize + center crop for val)."""
from __future__ import annotations

from typing import Callable

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms
from yacs.config import CfgNode

__all__ = ["build_transform", "VAL_CROP_RATIO"]

# The val resize scales the short side to IMG_SIZE / VAL_CROP_RATIO (256 px for 224) before cropping.
VAL_CROP_RATIO = 224 / 256


def _zero_bits_is_black(posterize: Callable) -> Callable:
    """timm's posterize, defined at 0 bits kept: a black image (what the bit mask gives, and Pillow < 13 returned).

    timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which RandAugment's magnitude noise reaches
    (rand-m9-mstd0.5: about 2 % of its draws), and Pillow 13 refuses 0 bits, which would stop a run."""
    def op(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
        return Image.new(img.mode, img.size) if bits_to_keep < 1 else posterize(img, bits_to_keep, **kwargs)
    return op


def _define_zero_bit_posterize(transform: Callable) -> Callable:
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = _zero_bits_is_black(op.aug_fn)
    return transform


def build_transform(config: CfgNode, is_train: bool) -> Callable:
    """The PIL -> normalised tensor transform for the train or val split."""
    img_size = config.DATA.IMG_SIZE
    if is_train:
        aug = config.AUG
        return _define_zero_bit_posterize(create_transform(
            input_size=img_size,
            is_training=True,
            scale=tuple(aug.SCALE),
            hflip=aug.HFLIP,
            # timm adds ColorJitter for any float, 0 included; None leaves it out
            color_jitter=aug.COLOR_JITTER or None,
            auto_augment=aug.AUTO_AUGMENT or None,
            interpolation=config.DATA.INTERPOLATION,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
        ))
    interpolation = str_to_interp_mode(config.DATA.INTERPOLATION)
    if config.TEST.CROP:
        resize = [transforms.Resize(int(img_size / VAL_CROP_RATIO), interpolation=interpolation),
                  transforms.CenterCrop(img_size)]
    else:
        resize = [transforms.Resize((img_size, img_size), interpolation=interpolation)]
    return transforms.Compose(resize + [
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
