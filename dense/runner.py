"""Shared by dense/train.py and dense/test.py: command-line options, the config, the MMEngine Runner."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

import torch
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

__all__ = ["add_common_options", "build_runner"]


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
    if launcher != "none" and not torch.cuda.is_available():
        cfg.env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"  # NCCL needs GPUs
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    if load_from is not None:
        cfg.load_from = load_from
    return Runner.from_cfg(cfg)
