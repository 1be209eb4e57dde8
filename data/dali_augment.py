"""timm's RandAugment (`AUG.AUTO_AUGMENT` "rand-m9-mstd0.5-inc1" and its variants) as a DALI graph.

The policy is timm's, parsed by timm itself (`rand_augment_transform`): n layers per image; each layer picks one
of timm's 15 ops uniformly (with replacement) and applies it with probability p, at a level drawn per image
and layer from N(m, mstd) (uniform on [0, m] for mstd > 100) clipped to [0, mmax or 10]. The level -> argument
rules below are timm's (tests/test_dali.py checks them against timm's own); DALI supplies the pixel operations
(`nvidia.dali.auto_aug.augmentations`) and looks each argument up by level bin, so drawn levels are rounded to
0.1. Where DALI's pixels differ from PIL's (equalize's histogram formula, bilinear resampling and one grey fill
for the geometric ops, sharpness at the 1-pixel border) docs/training.md says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as ops
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from timm.data.auto_augment import rand_augment_transform

__all__ = ["RandAugmentPolicy", "parse_rand_augment", "LEVEL_TO_PARAM", "build_suite", "rand_augment",
           "BINS_PER_LEVEL", "FILL"]

BINS_PER_LEVEL = 10
# DALI's warps take one fill value for all channels: the mean of timm's per-channel fill (124, 116, 104)
FILL = 115.0


def _posterize_mask(bits: int) -> np.ndarray:
    """uint8 mask that keeps the `bits` most significant bits (0 bits: a black image, as data/transforms.py)."""
    return np.array(0xFF ^ (0xFF >> bits) if bits > 0 else 0, dtype=np.uint8)


# equalize and sharpness through DALI's current operators (its auto_aug module still calls their deprecated
# fn.experimental aliases, which warn on every pipeline build)
@augmentation
def _equalize(data, _):
    return fn.equalize(data)


@augmentation(mag_range=(0, 0.9), param_device="auto")
def _sharpen(data, kernel):
    return fn.filter(data, kernel)


# timm op name -> (DALI augmentation, randomly negated, signed level -> DALI parameter); None: no level
_Rule = Tuple[Callable, bool, Optional[Callable[[float], object]]]
LEVEL_TO_PARAM: Dict[str, _Rule] = {
    "AutoContrast": (ops.auto_contrast, False, None),
    "Equalize": (_equalize, False, None),
    "Invert": (ops.invert, False, None),
    "Rotate": (ops.rotate, True, lambda level: 30.0 * level / 10),
    "ShearX": (ops.shear_x, True, lambda level: [0.3 * level / 10, 0.0]),
    "ShearY": (ops.shear_y, True, lambda level: [0.0, 0.3 * level / 10]),
    "TranslateXRel": (ops.translate_x, True, lambda level: [0.45 * level / 10, 0.0]),
    "TranslateYRel": (ops.translate_y, True, lambda level: [0.0, 0.45 * level / 10]),
    "PosterizeIncreasing": (ops.posterize, False, lambda level: _posterize_mask(4 - int(level / 10 * 4))),
    "Posterize": (ops.posterize, False, lambda level: _posterize_mask(int(level / 10 * 4))),
    "SolarizeIncreasing": (ops.solarize, False, lambda level: np.float32(256 - min(256, int(level / 10 * 256)))),
    "Solarize": (ops.solarize, False, lambda level: np.float32(min(256, int(level / 10 * 256)))),
    "SolarizeAdd": (ops.solarize_add, False, lambda level: np.uint8(min(128, int(level / 10 * 110)))),
}


def _increasing(level: float) -> float:
    return float(max(0.1, 1 + 0.9 * level / 10))  # timm's "...Increasing" enhance factor: 1 +- 0.9 level / 10


def _plain(level: float) -> float:
    return float(0.1 + 1.8 * level / 10)


def _sharpness(factor: Callable[[float], float]) -> Callable[[float], np.ndarray]:
    return lambda level: ops.sharpness_kernel(factor(level) - 1)  # DALI's kernel takes factor - 1


LEVEL_TO_PARAM.update({
    "ColorIncreasing": (ops.color, True, _increasing), "Color": (ops.color, False, _plain),
    "ContrastIncreasing": (ops.contrast, True, _increasing), "Contrast": (ops.contrast, False, _plain),
    "BrightnessIncreasing": (ops.brightness, True, _increasing), "Brightness": (ops.brightness, False, _plain),
    "SharpnessIncreasing": (_sharpen, True, _sharpness(_increasing)),
    "Sharpness": (_sharpen, False, _sharpness(_plain)),
})


@dataclass(frozen=True)
class RandAugmentPolicy:
    """timm's RandAugment settings: op names, layers n, per-layer probability p, magnitude m, its noise, bound."""

    names: Tuple[str, ...]
    layers: int
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float

    @property
    def bins(self) -> int:
        return int(round(self.magnitude_max * BINS_PER_LEVEL)) + 1


def parse_rand_augment(spec: str) -> RandAugmentPolicy:
    """The policy of a timm "rand-..." string, read from the transform timm builds for it; ValueError (one
    line) for what this graph cannot run (other auto-augment families, weighted op choice)."""
    if not spec.startswith("rand"):
        raise ValueError(f"DATA.LOADER dali runs RandAugment ('rand-...') only, got AUG.AUTO_AUGMENT {spec!r}")
    transform = rand_augment_transform(spec, {})
    if transform.choice_weights is not None:
        raise ValueError(f"DATA.LOADER dali picks RandAugment ops uniformly; AUG.AUTO_AUGMENT {spec!r} weights them")
    first = transform.ops[0]
    unknown = sorted({op.name for op in transform.ops} - set(LEVEL_TO_PARAM))
    if unknown:
        raise ValueError(f"DATA.LOADER dali has no RandAugment op {', '.join(unknown)} (AUG.AUTO_AUGMENT {spec!r})")
    return RandAugmentPolicy(names=tuple(op.name for op in transform.ops), layers=transform.num_layers,
                             prob=first.prob, magnitude=float(first.magnitude),
                             magnitude_std=float(first.magnitude_std),
                             magnitude_max=float(first.magnitude_max or 10))


def build_suite(names: Sequence[str], bins: int) -> list:
    """DALI augmentations for timm's ops, their magnitudes being timm levels 0, 0.1, ... (`bins` of them)."""
    levels = np.arange(bins, dtype=np.float64) / BINS_PER_LEVEL
    suite = []
    for name in names:
        op, negate, to_param = LEVEL_TO_PARAM[name]
        suite.append(op if to_param is None else
                     op.augmentation(mag_range=levels, randomly_negate=negate, mag_to_param=to_param, name=name))
    return suite


def _level_bins(policy: RandAugmentPolicy):
    """Per-image level bins of one layer: timm's magnitude noise, clipped, rounded to the bin grid."""
    if policy.magnitude_std == 0:
        return int(round(min(policy.magnitude, policy.magnitude_max) * BINS_PER_LEVEL))
    if policy.magnitude_std == float("inf"):
        level = fn.random.uniform(range=[0.0, policy.magnitude])
    else:
        level = fn.random.normal(mean=policy.magnitude, stddev=policy.magnitude_std)
    level = dmath.clamp(level, 0.0, policy.magnitude_max)
    return fn.cast(level * BINS_PER_LEVEL, dtype=types.INT32)  # DALI's cast rounds to nearest


def rand_augment(images, policy: RandAugmentPolicy, size: Tuple[int, int]):
    """Apply `policy` to uint8 HWC `images` of `size` (H, W); needs a pipeline with enable_conditionals."""
    suite = [ops.identity] + build_suite(policy.names, policy.bins)
    for _ in range(policy.layers):
        choice = fn.random.uniform(values=list(range(1, len(suite))), dtype=types.INT32)
        if policy.prob < 1:  # index 0, the identity, where the layer's coin says "skip"
            choice = choice * fn.random.coin_flip(probability=policy.prob, dtype=types.INT32)
        images = select(suite, choice, images, magnitude_bin=signed_bin(_level_bins(policy)),
                        num_magnitude_bins=policy.bins, shape=list(size), fill_value=FILL,
                        interp_type=types.INTERP_LINEAR)
    return images
