"""Train and val image transforms (timm for training, the release's resize + center crop for val)."""
from __future__ import annotations

from typing import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms
from yacs.config import CfgNode

__all__ = ["build_transform", "VAL_CROP_RATIO"]

# The val resize scales the short side to IMG_SIZE / VAL_CROP_RATIO (256 px for 224) before cropping.
VAL_CROP_RATIO = 224 / 256


def build_transform(config: CfgNode, is_train: bool) -> Callable:
    """The PIL -> normalised tensor transform for the train or val split."""
    img_size = config.DATA.IMG_SIZE
    if is_train:
        aug = config.AUG
        return create_transform(
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
        )
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
