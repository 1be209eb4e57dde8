"""Evaluate a trained DefMamba detector or segmentor (COCO box/mask AP, ADE20K mIoU) with MMEngine.

    python dense/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options KEY=VALUE ...]
    torchrun --nproc_per_node 8 dense/test.py CONFIG CHECKPOINT ...
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

if __name__ == "__main__":  # run as a script: the repository root instead of dense/ (its names would shadow others)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import dense  # noqa: E402,F401  (registers DefMambaBackbone, provides mmcv's ops if needed)
from dense.runner import add_common_options, build_runner  # noqa: E402


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="dense/test.py", description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("checkpoint", help="checkpoint written by dense/train.py (or by mm's tools/train.py)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    runner = build_runner(args, parser, load_from=args.checkpoint)
    runner.test()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
