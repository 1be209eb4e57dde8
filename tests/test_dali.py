"""DATA.LOADER dali on DALI's CPU backend: RandAugment rules and pixels against timm's, the loaders against the
default loader (same files, order, val pixels), random-resized-crop geometry, flips, erasing, seeding, errors."""
from __future__ import annotations

import random
from pathlib import Path
from typing import List
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import auto_augment as timm_aa

import data
from config import ConfigError, _validate, get_default_config

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.auto_aug.core import signed_bin  # noqa: E402

from data.dali_augment import (BINS_PER_LEVEL, FILL, LEVEL_TO_PARAM, RandAugmentPolicy, _level_bins,  # noqa: E402
                               build_suite, parse_rand_augment, rand_augment)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour field with a few edges (uint8 HWC): resampling kernels differ little on it."""
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)).copy()
    image[height // 3: height // 2, width // 4: width // 2] = rng.integers(0, 256, 3)
    return image


def textured_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """smooth_image in the grey levels 40..210 with pixel noise: every op has something to change."""
    image = smooth_image(rng, height, width) * (170 / 255) + 40 + rng.normal(0, 12, (height, width, 3))
    return image.clip(0, 255).round().astype(np.uint8)


def run_graph(graph, batch: int, **kwargs) -> List[np.ndarray]:
    pipe = pipeline_def(enable_conditionals=True)(graph)(batch_size=batch, num_threads=1, device_id=None,
                                                        seed=kwargs.pop("seed", 7), **kwargs)
    pipe.build()
    return [np.array(t) for t in pipe.run()[0]]


def feed(images: List[np.ndarray]):
    return fn.external_source(source=lambda: images, batch=True, layout="HWC")


# --- RandAugment: the policy and its rules against timm's own ------------------------------------------------

def test_rules_cover_timm_policies_and_parse_matches_timm():
    assert set(LEVEL_TO_PARAM) == set(timm_aa._RAND_INCREASING_TRANSFORMS) | set(timm_aa._RAND_TRANSFORMS)
    policy = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert policy == RandAugmentPolicy(tuple(timm_aa._RAND_INCREASING_TRANSFORMS), 2, 0.5, 9.0, 0.5, 10.0)
    assert parse_rand_augment("rand-m7-n3-p0.8-mmax12").names == tuple(timm_aa._RAND_TRANSFORMS)
    other = parse_rand_augment("rand-m7-n3-p0.8-mmax12")
    assert (other.layers, other.prob, other.magnitude, other.magnitude_max, other.bins) == (3, 0.8, 7.0, 12.0, 121)
    assert parse_rand_augment("rand-m9-mstd101").magnitude_std == float("inf")
    for bad in ("v0", "rand-m9-tweights"):
        with pytest.raises(ValueError, match="DATA.LOADER dali"):
            parse_rand_augment(bad)


def _timm_arg(name: str, level: float, negate: bool):
    with mock.patch.object(random, "random", return_value=1.0 if negate else 0.0):  # timm negates if > 0.5
        return timm_aa.LEVEL_TO_ARG[name](level, {"translate_pct": 0.45})


@pytest.mark.parametrize("name", sorted(LEVEL_TO_PARAM))
def test_level_rules_equal_timm(name: str):
    """Each op's argument at every level bin (and both signs) is timm's level_to_arg of that level."""
    _op, negated, to_param = LEVEL_TO_PARAM[name]
    if to_param is None:
        assert timm_aa.LEVEL_TO_ARG[name] is None
        return
    smooth = np.array(ImageFilter.SMOOTH.filterargs[3], dtype=np.float64).reshape(3, 3) / 13
    ident = np.zeros((3, 3))
    ident[1, 1] = 1
    for level in np.arange(0, 101) / BINS_PER_LEVEL:
        for sign in ((1, -1) if negated else (1,)):
            ours, (theirs,) = to_param(sign * level), _timm_arg(name, level, sign < 0)
            if name.startswith("Posterize"):  # a mask that keeps `theirs` most significant bits
                assert int(ours) == (((1 << theirs) - 1) << (8 - theirs)), (level, theirs)
            elif name.startswith("Sharpness"):  # PIL: blend(smoothed, image, factor)
                np.testing.assert_allclose(ours, (1 - theirs) * smooth + theirs * ident, atol=1e-6)
            elif name.startswith(("Shear", "Translate")):
                axis = 0 if name[-1] == "X" or name.endswith("XRel") else 1
                assert ours[axis] == pytest.approx(theirs) and ours[1 - axis] == 0
            else:
                assert float(ours) == pytest.approx(theirs), (level, sign)


# DALI pixels vs timm's PIL op at level 7, positive sign: exact for the bit/LUT ops, close for the rest
PIXEL_TOLERANCE = {"Invert": 0, "PosterizeIncreasing": 0, "Posterize": 0, "SolarizeIncreasing": 0, "Solarize": 0,
                   "SolarizeAdd": 0, "AutoContrast": 1, "BrightnessIncreasing": 1, "ColorIncreasing": 2,
                   "ContrastIncreasing": 2, "SharpnessIncreasing": 2, "Equalize": 12, "Rotate": 6, "ShearX": 6,
                   "ShearY": 6, "TranslateXRel": 3, "TranslateYRel": 3}


@pytest.mark.parametrize("name", sorted(PIXEL_TOLERANCE))
def test_op_pixels_match_timm(name: str):
    rng = np.random.default_rng(0)
    images = [textured_image(rng, 40, 48) for _ in range(2)]
    level = 7.0
    (aug,) = build_suite([name], 101)

    def graph():
        bins = signed_bin(int(level * BINS_PER_LEVEL), random_sign=fn.random.coin_flip(probability=0.0,
                                                                                       dtype=types.INT32))
        return aug(feed(images), magnitude_bin=bins, num_magnitude_bins=101, shape=[40, 48], fill_value=FILL,
                   interp_type=types.INTERP_LINEAR)
    ours = run_graph(graph, 2)
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=level,
                           hparams={"img_mean": (int(FILL),) * 3, "interpolation": Image.BILINEAR})
    for image, got in zip(images, ours):
        errors = []
        for draw in (0.0, 1.0):  # timm's sign (which direction is "+" differs between PIL and DALI)
            with mock.patch.object(random, "random", return_value=draw):
                want = np.asarray(op(Image.fromarray(image)), dtype=np.int16)
            errors.append(np.mean(np.abs(got.astype(np.int16) - want)))
        assert min(errors) <= PIXEL_TOLERANCE[name], (name, errors)
    # the op did something: a tolerance looser than the op's own change would not test it
    changed = np.mean(np.abs(ours[0].astype(np.int16) - images[0]))
    assert changed > 2 * PIXEL_TOLERANCE[name], (name, changed)


def test_level_noise_is_timms():
    """Per-image levels: N(m, mstd) clipped to [0, mmax] on the 0.1 grid; uniform on [0, m] for mstd inf."""
    policy = parse_rand_augment("rand-m9-mstd0.5-inc1")
    (bins,) = [run_graph(lambda: _level_bins(policy), 4000)]
    levels = np.array(bins, dtype=np.float64).ravel() / BINS_PER_LEVEL
    assert abs(levels.mean() - 9) < 0.05 and abs(levels.std() - 0.5) < 0.05 and levels.max() <= 10
    assert np.mean(levels == 10) == pytest.approx(0.023, abs=0.01)  # P(N(9, 0.5) >= 9.95)
    uniform = np.array(run_graph(lambda: _level_bins(parse_rand_augment("rand-m8-mstd101")), 4000)).ravel() / 10
    assert uniform.min() >= 0 and uniform.max() <= 8 and abs(uniform.mean() - 4) < 0.15
    assert _level_bins(parse_rand_augment("rand-m9")) == 90


@pytest.mark.parametrize("layers,prob,inverted", [(1, 1.0, 1.0), (2, 1.0, 0.0), (1, 0.0, 0.0), (1, 0.5, 0.5)])
def test_layers_and_probability(layers: int, prob: float, inverted: float):
    """With Invert as the only op: n layers each invert with probability p (two inversions cancel)."""
    rng = np.random.default_rng(1)
    images = [smooth_image(rng, 8, 8) for _ in range(400)]
    policy = RandAugmentPolicy(("Invert",), layers, prob, 9.0, 0.0, 10.0)
    out = run_graph(lambda: rand_augment(feed(images), policy, (8, 8)), 400)
    flipped = [np.array_equal(o, 255 - i) for o, i in zip(out, images)]
    same = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f or s for f, s in zip(flipped, same))
    assert np.mean(flipped) == pytest.approx(inverted, abs=0.08)


# --- the loaders ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with 3 classes of smooth PNGs of varied sizes."""
    root = tmp_path_factory.mktemp("dali_folder")
    rng = np.random.default_rng(2)
    sizes = [(40, 52), (64, 48), (37, 37), (90, 30)]
    for split, count in (("train", 8), ("val", 5)):
        for label in range(3):
            (root / split / str(label)).mkdir(parents=True)
            for i in range(count):
                height, width = sizes[(i + label) % len(sizes)]
                Image.fromarray(smooth_image(rng, height, width)).save(root / split / str(label) / f"{i}.png")
    return root


def config_for(**opts):
    config = get_default_config()
    config.defrost()
    config.MODEL.NUM_CLASSES = 3
    config.DATA.IMG_SIZE = 32
    config.DATA.BATCH_SIZE = 4
    config.DATA.NUM_WORKERS = 0
    config.DATA.PIN_MEMORY = False
    for key, value in opts.items():
        node = config
        *path, leaf = key.split("__")
        for part in path:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return config


def batches(loader) -> List[tuple]:
    return [(images.clone(), targets.clone()) for images, targets in loader]


@pytest.mark.parametrize("crop,interpolation", [(True, "bicubic"), (False, "bilinear")])
def test_val_loader_equals_default_loader(folder: Path, crop: bool, interpolation: str):
    """Same images, order, shards and padding as the torch loader; pixels within resampling differences."""
    for rank in range(2):
        loaders = {}
        for kind in ("torch", "dali"):
            config = config_for(DATA__LOADER=kind, DATA__INTERPOLATION=interpolation, TEST__CROP=crop)
            loaders[kind] = batches(data.build_loaders(config, folder, rank, 2, need_train=False).val)
        assert [t.tolist() for _, t in loaders["torch"]] == [t.tolist() for _, t in loaders["dali"]]
        for (want, _), (got, _) in zip(loaders["torch"], loaders["dali"]):
            assert got.shape == want.shape and got.dtype == torch.float32
            diff = (got - want).abs()
            assert diff.mean() < 0.01 and torch.quantile(diff.flatten(), 0.99) < 0.1, (diff.mean(), diff.max())


def test_val_pixel_check_catches_a_shifted_crop(folder: Path):
    """The tolerance above is tight enough to see a crop 1 pixel off or a missing normalisation."""
    config = config_for(DATA__LOADER="dali", TEST__CROP=False)
    (got, _), *_ = batches(data.build_loaders(config, folder, 0, 1, need_train=False).val)
    want, _ = next(iter(data.build_loaders(config_for(TEST__CROP=False), folder, 0, 1, need_train=False).val))
    assert (torch.roll(got, 1, dims=3) - want).abs().mean() > 0.05
    assert ((got * STD + MEAN) - want).abs().mean() > 0.05


def test_train_loader_order_seeding_and_erasing(folder: Path):
    config = config_for(DATA__LOADER="dali", AUG__REPROB=0.0, AUG__MIXUP=0.0, AUG__CUTMIX=0.0)
    loader = data.build_loaders(config, folder, 1, 2, need_train=True).train
    assert len(loader) == 12 // 4
    data.set_epoch(loader, 3, seed=5, rank=1)
    first = batches(loader)
    expected = [loader.samples[i][1] for i in list(loader.sampler)[:12]]
    assert sum((t.tolist() for _, t in first), []) == expected
    data.set_epoch(loader, 3, seed=5, rank=1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, batches(loader)))
    data.set_epoch(loader, 4, seed=5, rank=1)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, batches(loader)))
    # random erasing (probability 1) changes every image of the same draws, in one rectangle
    erasing = data.build_loaders(config_for(DATA__LOADER="dali", AUG__REPROB=1.0), folder, 1, 2, True).train
    data.set_epoch(erasing, 3, seed=5, rank=1)
    for (plain, _), (erased, _) in zip(first, batches(erasing)):
        changed = (plain != erased).any(1)
        assert changed.flatten(1).any(1).all()
        rows, cols = changed.any(2), changed.any(1)
        assert torch.equal(changed, rows[:, :, None] & cols[:, None, :])


@pytest.fixture(scope="module")
def coordinates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One class of 240x180 images whose red channel is x and green channel is y (scaled to 0..255)."""
    root = tmp_path_factory.mktemp("dali_coordinates")
    x = np.linspace(0, 255, 240)[None, :].repeat(180, 0)
    y = np.linspace(0, 255, 180)[:, None].repeat(240, 1)
    image = np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8)
    for split in ("train", "val"):
        (root / split / "0").mkdir(parents=True)
        for i in range(48):
            Image.fromarray(image).save(root / split / "0" / f"{i}.png")
    return root


def crops(root: Path, **opts) -> torch.Tensor:
    config = config_for(DATA__LOADER="dali", MODEL__NUM_CLASSES=1, DATA__BATCH_SIZE=48, AUG__AUTO_AUGMENT="",
                        AUG__REPROB=0.0, AUG__COLOR_JITTER=0.0, **opts)
    loader = data.build_loaders(config, root, 0, 1, need_train=True).train
    data.set_epoch(loader, 0, seed=0, rank=0)
    (images, _), = batches(loader)
    return (images * STD + MEAN) * 255


def test_random_resized_crop_geometry(coordinates: Path):
    """The crops cover an area fraction in AUG.SCALE with an aspect ratio in [3/4, 4/3], inside the image."""
    pixels = crops(coordinates, AUG__HFLIP=0.0, AUG__SCALE=(0.08, 1.0))
    x = pixels[:, 0] * 239 / 255   # source column of each output pixel
    y = pixels[:, 1] * 179 / 255
    # output pixels sample the crop at (j + 0.5) / 32 of its width: the span of 31 pixel steps is 31/32 of it
    width = (x[:, :, -1] - x[:, :, 0]).mean(1) * 32 / 31
    height = (y[:, -1, :] - y[:, 0, :]).mean(1) * 32 / 31
    area, ratio = width * height / (240 * 180), width / height
    assert (area > 0.08 - 0.02).all() and (area < 1 + 0.02).all(), area
    assert (ratio > 3 / 4 - 0.05).all() and (ratio < 4 / 3 + 0.05).all(), ratio
    assert area.std() > 0.1
    assert (x.amin((1, 2)) > -1).all() and (x.amax((1, 2)) < 240).all()
    mild = crops(coordinates, AUG__HFLIP=0.0, AUG__SCALE=(0.7, 1.0))
    mild_area = ((mild[:, 0, :, -1] - mild[:, 0, :, 0]).mean(1) * 239 / 255 * 32 / 31) * \
                ((mild[:, 1, -1, :] - mild[:, 1, 0, :]).mean(1) * 179 / 255 * 32 / 31) / (240 * 180)
    assert (mild_area > 0.7 - 0.03).all()


@pytest.mark.parametrize("hflip,fraction", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_horizontal_flip(coordinates: Path, hflip: float, fraction: float):
    pixels = crops(coordinates, AUG__HFLIP=hflip, AUG__SCALE=(0.5, 1.0))
    flipped = (pixels[:, 0, :, -1] < pixels[:, 0, :, 0]).float().mean(1)
    assert set(flipped.tolist()) <= {0.0, 1.0}
    assert flipped.mean().item() == pytest.approx(fraction, abs=0.25 if 0 < fraction < 1 else 0)


def test_config_and_data_errors(folder: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match="DATA.LOADER must be one of torch, dali"):
        _validate(config_for(DATA__LOADER="nvjpeg"))
    with pytest.raises(ConfigError, match="DATA.SKIP_CORRUPT needs DATA.LOADER torch"):
        _validate(config_for(DATA__LOADER="dali", DATA__SKIP_CORRUPT=True))
    with pytest.raises(data.DataError, match="runs RandAugment .'rand-...'. only"):
        data.build_loaders(config_for(DATA__LOADER="dali", AUG__AUTO_AUGMENT="v0"), folder, 0, 1, need_train=True)
    monkeypatch.setattr("data.build.dali_available", lambda: False)
    with pytest.raises(data.DataError, match="pip install -r requirements-dali.txt"):
        data.build_loaders(config_for(DATA__LOADER="dali"), folder, 0, 1, need_train=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path needs a CUDA GPU (benchmarks/gpu_suite.sh)")
def test_gpu_loaders_match_the_cpu_backend(folder: Path):
    """On a GPU DALI decodes and augments there: batches land on the device, equal to its CPU backend's (val)
    and in the same order (train)."""
    device = torch.device("cuda", torch.cuda.current_device())
    config = config_for(DATA__LOADER="dali")
    cpu = data.build_loaders(config, folder, 0, 1, need_train=True)
    gpu = data.build_loaders(config, folder, 0, 1, need_train=True, device=device)
    for (want, want_t), (got, got_t) in zip(batches(cpu.val), batches(gpu.val)):
        assert got.device == device and got_t.device == device
        assert torch.equal(got_t.cpu(), want_t) and (got.cpu() - want).abs().mean() < 0.01
    for loader in (cpu.train, gpu.train):
        data.set_epoch(loader, 1, seed=0, rank=0)
    assert [t.tolist() for _, t in batches(cpu.train)] == [t.cpu().tolist() for _, t in batches(gpu.train)]
