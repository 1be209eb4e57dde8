"""Shared fixtures for the trainer tests: a tiny ImageFolder of real MNIST digits and a tiny DefMamba config."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which must be switched on
# before anything imports triton (timm does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.mnist5k import csv_path  # noqa: E402  (after the path fix above)

# 3 classes (digits 0, 1, 2): 8 train and 4 val images each -> 3 training iterations of 8 per epoch.
CLASSES = (0, 1, 2)
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 4

TINY_CONFIG = """\
MODEL:
  NAME: tiny_test
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.1
  DEFMAMBA:
    EMBED_DIM: 8
    DEPTHS: [1, 1, 1, 1]
    OFFSET_KERNELS: [3, 3, 3, 3]
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 8
  NUM_WORKERS: 0
  PIN_MEMORY: False
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  EMA:
    DECAY: 0.9
PRINT_FREQ: 1
"""


def write_digits(root: Path, classes=CLASSES, train_per_class: int = TRAIN_PER_CLASS,
                 val_per_class: int = VAL_PER_CLASS) -> Path:
    """ImageFolder `root/{train,val}/<digit>/*.png` of real MNIST digits (28x28 grey saved as RGB)."""
    with gzip.open(csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    for digit in classes:
        rows = table[table[:, -1] == digit][: train_per_class + val_per_class]
        for i, row in enumerate(rows):
            split = "train" if i < train_per_class else "val"
            folder = root / split / f"digit{digit}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(row[:-1].reshape(28, 28)).convert("RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


def run_main(args: List[str], env: Optional[Dict[str, str]] = None, launcher: Optional[List[str]] = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """Run main.py in a fresh interpreter (optionally under a launcher) from the repository root."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    command = (launcher or [sys.executable]) + ["main.py"] + args
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    """(size, mtime) of every file below `folder`, to show that a run changed nothing there."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def run_here(capsys: pytest.CaptureFixture):
    """main.main() in this interpreter (no start-up cost), returning a CompletedProcess like run_main."""
    import main as trainer

    def run(args: List[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = trainer.main(args)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["main.py"] + args, code, out, err)

    return run
