"""Training checkpoints: atomic writes, retention, auto-resume discovery, and restoring a run's state.

Layout of a checkpoint (a dict, loadable with torch.load(weights_only=True)):
    model, model_ema (if EMA is on), optimizer, lr_scheduler, scaler, epoch (last completed, 0-based),
    max_accuracy, max_accuracy_ema (best val top-1 of the model / the EMA so far), config (YAML text),
    rng (one entry per process: the Python, NumPy, torch CPU and CUDA generator states at the end of the
    epoch, so that a resumed run draws the same random numbers as an uninterrupted one).
The release's files have the same entries except that `config` is a pickled yacs node and the EMA best
is misspelt `max_accuray_ema`; both are read.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from models import CheckpointError, load_pretrained, read_checkpoint
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from .amp import GradStepper
from .distributed import all_gather_objects, rank_and_world_size

__all__ = ["BEST_NAME", "BEST_EMA_NAME", "epoch_checkpoint_name", "read_checkpoint", "save_atomic",
           "copy_atomic", "epoch_checkpoints", "prune_epoch_checkpoints", "remove_stale_temporaries",
           "training_state", "gather_rng_states", "best_accuracies", "ResumeState", "restore_run"]

BEST_NAME = "best.pth"
BEST_EMA_NAME = "best_ema.pth"
_EPOCH_FILE = re.compile(r"^ckpt_epoch_(\d+)\.pth$")


def epoch_checkpoint_name(epoch: int) -> str:
    return f"ckpt_epoch_{epoch}.pth"


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file in the same folder, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Dict[str, Any], path: Path) -> None:
    """torch.save `obj` to `path` atomically."""
    _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` atomically."""
    _write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def epoch_checkpoints(output_dir: Path) -> List[Path]:
    """ckpt_epoch_<N>.pth files in `output_dir`, oldest epoch first (by N, not by file time)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_epoch_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest epoch checkpoints (best*.pth are separate files and stay)."""
    for path in epoch_checkpoints(output_dir)[:-keep]:
        path.unlink(missing_ok=True)


def _rng_state() -> Dict[str, Any]:
    """This process's generator states, in types that torch.load(weights_only=True) reads back."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every process's generator states, indexed by rank (a collective: all ranks must call it)."""
    return all_gather_objects(_rng_state())


def training_state(model: nn.Module, ema: Optional[ModelEmaV3], optimizer: torch.optim.Optimizer,
                   scheduler: CosineLRScheduler, stepper: GradStepper, epoch: int, max_accuracy: float,
                   max_accuracy_ema: float, config_text: str,
                   rng: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The checkpoint dict after `epoch` (layout in the module docstring); `rng` from gather_rng_states."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": scheduler.state_dict(), "scaler": stepper.state_dict(), "epoch": epoch,
             "max_accuracy": max_accuracy, "max_accuracy_ema": max_accuracy_ema, "config": config_text}
    if rng is not None:
        state["rng"] = rng
    if ema is not None:
        state["model_ema"] = ema.module.state_dict()
    return state


def remove_stale_temporaries(output_dir: Path) -> None:
    """Delete temporary files left by a run killed while saving (call before this run saves anything)."""
    for path in output_dir.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)


def _ema_best(checkpoint: Dict[str, Any]) -> float:
    return float(checkpoint.get("max_accuracy_ema", checkpoint.get("max_accuray_ema", 0.0)))


def best_accuracies(output_dir: Path, logger: logging.Logger) -> Tuple[Optional[float], Optional[float]]:
    """The val top-1 that best.pth and best_ema.pth were saved for (None where a file is absent or unreadable).

    The best metric is read from the best files themselves, not from the checkpoint a run resumes from:
    that one may be older than the best (e.g. when a newer, better epoch's checkpoint was cut short).
    """
    found: List[Optional[float]] = []
    for name, metric in ((BEST_NAME, lambda c: float(c.get("max_accuracy", 0.0))), (BEST_EMA_NAME, _ema_best)):
        path = output_dir / name
        value = None
        if path.is_file():
            try:
                value = metric(read_checkpoint(path))
            except CheckpointError as err:
                logger.warning("%s; it will be replaced by the next best epoch", err)
        found.append(value)
    return found[0], found[1]


@dataclass
class ResumeState:
    """Where a restored run continues."""

    start_epoch: int
    max_accuracy: float
    max_accuracy_ema: float


def restore_run(path: Path, checkpoint: Dict[str, Any], model: nn.Module, ema: Optional[ModelEmaV3],
                optimizer: torch.optim.Optimizer, scheduler: CosineLRScheduler, stepper: GradStepper,
                logger: logging.Logger) -> ResumeState:
    """Load every part present in `checkpoint` (read from `path`) into the run; weights strictly.

    Parts absent from the file (e.g. a weights-only release file) keep their fresh state and are logged.
    """
    load_pretrained(model, str(path), use_ema=False, checkpoint=checkpoint)
    if ema is not None:
        if "model_ema" in checkpoint:
            load_pretrained(ema.module, str(path), use_ema=True, checkpoint=checkpoint)
        else:
            ema.module.load_state_dict(model.state_dict())
            logger.info("%s has no model_ema: EMA starts from the model weights", path)
    restored, missing = [], []
    planned = (scheduler.t_initial, scheduler.warmup_t)
    for key, target in (("optimizer", optimizer), ("lr_scheduler", scheduler)):
        if key in checkpoint:
            try:
                target.load_state_dict(checkpoint[key])
            except (ValueError, KeyError, RuntimeError) as err:
                raise CheckpointError(f"checkpoint {path}: {key} state does not fit this run "
                                      f"({' '.join(str(err).split())})") from None
            restored.append(key)
        else:
            missing.append(key)
    if (scheduler.t_initial, scheduler.warmup_t) != planned:
        logger.warning("the LR schedule of %s (%d cosine + %d warm-up updates) differs from this config's "
                       "(%d + %d); the checkpoint's schedule is kept", path, scheduler.t_initial,
                       scheduler.warmup_t, *planned)
    rank, world_size = rank_and_world_size()
    if len(checkpoint.get("rng", [])) == world_size:
        _set_rng_state(checkpoint["rng"][rank])
        restored.append("RNG states")
    elif "rng" in checkpoint:
        missing.append(f"RNG states for {world_size} processes (it has {len(checkpoint['rng'])})")
    else:
        missing.append("RNG states")
    # A disabled GradScaler saves {}: only an fp16 run restores a saved scale.
    if checkpoint.get("scaler") and stepper.scaler.is_enabled():
        stepper.load_state_dict(checkpoint["scaler"])
        restored.append("scaler")
    has_epoch = "epoch" in checkpoint
    state = ResumeState(
        start_epoch=int(checkpoint["epoch"]) + 1 if has_epoch else 0,
        max_accuracy=float(checkpoint.get("max_accuracy", 0.0)),
        max_accuracy_ema=_ema_best(checkpoint),
    )
    if not has_epoch:
        missing.append("epoch")
    logger.info("restored from %s: weights%s, %s; continuing at epoch %d (best acc@1 %.2f, EMA %.2f)%s",
                path, " + EMA" if ema is not None else "", ", ".join(restored) or "no training state",
                state.start_epoch, state.max_accuracy, state.max_accuracy_ema,
                f"; not in file: {', '.join(missing)}" if missing else "")
    return state
