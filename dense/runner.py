"""Shared by dense/train.py and dense/test.py: command-line options, the config, the MMEngine Runner."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

import torch
from mmengine.config import Config, DictAction
from mmengine.runner import CheckpointLoader, Runner

__all__ = ["add_common_options", "build_runner", "load_local_checkpoint"]


def load_local_checkpoint(filename: str, map_location: Optional[str] = None) -> dict:
    """MMEngine's loader for local files (`load_from`, `--resume`, dense/test.py's checkpoint), unpickling fully.

    MMEngine 0.10 writes numpy arrays and its message hub into checkpoints, which torch >= 2.6 rejects under
    its weights_only default; these are files the user names. (ImageNet weights for the backbone are read
    with weights_only=True by models.defmamba.backbone.)
    """
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"checkpoint {filename} does not exist")
    return torch.load(filename, map_location=map_location, weights_only=False)


CheckpointLoader.register_scheme(prefixes="", loader=load_local_checkpoint, force=True)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file, e.g. configs/detection/mask-rcnn_defmamba-small_fpn_1x_coco.py")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config keys, e.g. model.backbone.pretrained=ckpt.pth "
                             "train_dataloader.dataset.data_root=/data/coco/")
    parser.add_argument("--launcher", choices=["auto", "none", "pytorch", "slurm", "mpi"], default="auto",
                        help="distributed launcher (default auto: 'pytorch' under torchrun, else 'none')")


def build_runner(args: argparse.Namespace, parser: argparse.ArgumentParser, load_from: Optional[str] = None,
                 extra: Optional[List[str]] = None) -> Runner:
    """The config at args.config with the command-line overrides applied, as an MMEngine Runner."""
    if not os.path.isfile(args.config):
        parser.error(f"config {args.config} does not exist")  # exits with status 2
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    launcher = args.launcher
    if launcher == "auto":
        launcher = "pytorch" if "LOCAL_RANK" in os.environ else "none"
    cfg.launcher = launcher
    if launcher == "pytorch" and not torch.cuda.is_available():
        # CPU processes under torchrun: MMEngine's launcher insists on a GPU per process, so start gloo here
        # (the Runner then keeps this process group) and wrap the model in DDP without device ids.
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    if load_from is not None:
        cfg.load_from = load_from
    return Runner.from_cfg(cfg)
