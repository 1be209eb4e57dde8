"""Train a DefMamba detector or segmentor from a config with MMEngine.

    python dense/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--cfg-options KEY=VALUE ...]
    torchrun --nproc_per_node 8 dense/train.py CONFIG ...
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
    parser = argparse.ArgumentParser(prog="dense/train.py", description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (AmpOptimWrapper)")
    parser.add_argument("--resume", nargs="?", const="auto",
                        help="resume from CKPT, or from the latest checkpoint of the work dir without CKPT")
    args = parser.parse_args(argv)
    if args.amp:
        args.cfg_options.update({"optim_wrapper.type": "AmpOptimWrapper", "optim_wrapper.loss_scale": "dynamic"})
    if args.resume is not None:
        args.cfg_options["resume"] = True
    runner = build_runner(args, parser, load_from=None if args.resume in (None, "auto") else args.resume)
    runner.train()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
