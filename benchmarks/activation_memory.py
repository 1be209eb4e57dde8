"""Activation memory: the bytes autograd keeps from a training forward for the backward pass, per module type.

Every tensor saved for backward is caught by a saved-tensors hook and its storage counted once (by address,
whole storage, so a saved view counts the buffer it keeps alive), attributed to the innermost module running
when it was first saved; parameters are not activations and are left out. Measured at batch b and 2b: the
difference is the bytes per image, the rest is a fixed part that does not grow with the batch (autocast's
low-precision copies of the weights, saved too). This is what the training peak holds besides the weights,
their gradients and the optimizer state, before the backward's own temporaries; it needs no GPU (the CPU runs
the same graph, Triton kernels in the interpreter; CPU autocast casts fewer operations than CUDA's).

    python benchmarks/activation_memory.py                                        # DefMamba-T, 224 px, fp16 AMP
    python benchmarks/activation_memory.py --model damamba_tiny --backend torch --top 8
    TRITON_INTERPRET=1 python benchmarks/activation_memory.py --backend triton    # the GPU's kernels, on a CPU
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import nn

import benchmark_common as common
from models.ops.backends import BackendUnavailable, use_backend  # noqa: E402

SWITCHES = ("scan", "deform", "merge")
BACKENDS = ["auto", "triton", "torch"]
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
MIB = 2 ** 20


def saved_bytes(model: nn.Module, x: torch.Tensor, amp_dtype: Optional[torch.dtype] = None) -> Dict[str, int]:
    """Bytes of the distinct storages autograd saves in `model(x)` (training mode), by the class name of the
    innermost module running when each was first saved; parameters excluded."""
    stack: List[str] = [type(model).__name__]

    def enter(module: nn.Module, _inputs) -> None:
        stack.append(type(module).__name__)

    def leave(_module: nn.Module, _inputs, _output) -> None:  # returns None: the output stays as it is
        stack.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # parameters are never counted
    by_module: Dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            by_module[stack[-1]] += storage.nbytes()
        return t

    autocast = torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            out = model.train()(x)
        del out
    finally:
        for handle in handles:
            handle.remove()
    return dict(by_module)


def split_by_batch(at_b: Dict[str, int], at_2b: Dict[str, int], batch: int) -> tuple:
    """(bytes per image, fixed bytes) per module from the measurements at batch b and 2b."""
    names = set(at_b) | set(at_2b)
    per_image = {n: (at_2b.get(n, 0) - at_b.get(n, 0)) / batch for n in names}
    return per_image, {n: at_b.get(n, 0) - batch * per_image[n] for n in names}


def training_state_bytes(model: nn.Module) -> int:
    """Weights, gradients and AdamW's two moments: 4 fp32 copies of the trainable parameters."""
    return 4 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="defmamba_tiny", help="a timm name of this repository's models")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2,
                        help="measured at this batch and twice it (the table is per image)")
    parser.add_argument("--amp-dtype", choices=list(AMP_DTYPES), default="fp16")
    parser.add_argument("--backend", default="auto",
                        help="backend of every operation switch (scan, deform, merge): " + ", ".join(BACKENDS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--top", type=int, default=12, help="module types listed (the rest summed)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.backend not in BACKENDS:
        parser.error(f"--backend: expected one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.img_size < 32 or args.batch_size < 1 or args.top < 1:
        parser.error("need --img-size >= 32, --batch-size >= 1, --top >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import models  # noqa: F401  registers the timm names
    import timm
    device = common.benchmark_device(args.device)
    try:
        model = timm.create_model(args.model).to(device)
    except RuntimeError as err:
        common.fail(f"--model: {common.one_line(err)}")
    measured = []
    try:
        with use_backend(SWITCHES[0], args.backend), use_backend(SWITCHES[1], args.backend), \
                use_backend(SWITCHES[2], args.backend):
            for batch in (args.batch_size, 2 * args.batch_size):
                x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
                measured.append(saved_bytes(model, x, AMP_DTYPES[args.amp_dtype]))
    except BackendUnavailable as err:
        common.fail(str(err))
    per_image, fixed = split_by_batch(*measured, args.batch_size)
    total, total_fixed = sum(per_image.values()), sum(fixed.values())
    rows = sorted(per_image.items(), key=lambda kv: -kv[1])
    shown, rest = rows[:args.top], sum(v for _, v in rows[args.top:])
    print(f"{args.model}, {args.img_size} px, {args.amp_dtype} AMP, backends {args.backend}, {device}: "
          f"activations saved for backward, MiB per image")
    print("| module | MiB / image | share |\n|---|---|---|")
    for name, nbytes in shown + ([("(others)", rest)] if rest else []):
        print(f"| {name} | {nbytes / MIB:.2f} | {100 * nbytes / max(total, 1):.1f} % |")
    state = training_state_bytes(model)
    print(f"| total | {total / MIB:.2f} | 100 % |\n\nfixed (not per image, e.g. autocast's weight copies): "
          f"{total_fixed / MIB:.2f} MiB; at batch 128: activations {(128 * total + total_fixed) / 2**30:.2f} GiB "
          f"+ weights, gradients and AdamW moments {state / 2**30:.2f} GiB")
    common.write_json(args.json, {
        "benchmark": "activation_memory", "environment": common.environment(device),
        "settings": {k: getattr(args, k) for k in ("model", "img_size", "batch_size", "amp_dtype", "backend")},
        "saved_bytes_per_image": per_image, "saved_bytes_fixed": fixed, "training_state_bytes": state,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
