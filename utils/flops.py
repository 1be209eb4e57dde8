"""Parameters and FLOPs of a model config (every family), counted with fvcore (one multiply-add = one FLOP).

    python -m utils.flops --cfg configs/tiny.yaml [--img-size 224] [--scan-flops vmamba] [--no-custom-ops]

What is counted (fvcore's rules for linear/conv/einsum/matmul, LayerNorm 5 per element, pooling and
means 1 per input element) plus handles for the custom operations:
- selective scan, convention `release` (default for DefMamba and DAMamba, the official README's numbers):
  3*B*D*L*N + 2.5*B*D*L with D = K * d_inner (K scan branches, 3 in the released model);
  convention `vmamba`: 9*B*L*D*N + B*D*L, the default for VMamba and Mamba-Adaptor configs (D = 4 directions
  x d_inner, N = 1), as VMamba's release counts it (its 4.91 / 8.72 / 15.36 G for T / S / B).
- point offset (bilinear sampling, PointOffsetSample): 4 per output element, as fvcore counts grid_sample;
- the deformable sequence (custom op defmamba::deformable_sequence): the point offset's 4 plus, with an
  offset-bias table, 4 + 4 per output element for its resize and sampling (upsample + grid_sample);
- the sort and un-sort of the index offset, elementwise activations and gathers: 0.

DAMamba goes through the same handles: its one raster scan per block (D = C, N = d_state = 1) is counted by
the same conventions (release: 5.5*B*C*L per block), its dynamic adaptive sampling as the point offset
(4 per output element, B*C*L per block). `--no-custom-ops` counts the scan and the sampling as 0, as the
DAMamba release's published GFLOPs (torchprofile) do. Parameters are reported trainable, and in all (frozen
ones too). DAMamba's identity kernels (`conv_constant`) are buffers here, so its counts are the release's less
9 values per ResDWC (the release stores them as frozen parameters).
"""
from __future__ import annotations

import argparse
import enum
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
from torch import nn

__all__ = ["ScanFlopConvention", "count_flops", "count_params"]


class ScanFlopConvention(enum.Enum):
    """How a selective-scan call is counted."""
    RELEASE = "release"  # official DefMamba README (fvcore handle of the release)
    VMAMBA = "vmamba"    # VMamba's analysis tools


def _shape(value: Any) -> List[int]:
    return value.type().sizes()


def _scan_handle(convention: ScanFlopConvention) -> Callable[[List[Any], List[Any]], float]:
    def handle(inputs: List[Any], outputs: List[Any]) -> float:
        batch, dim, length = _shape(inputs[1])  # delta: u may come in pieces (a list)
        nstate = _shape(inputs[2])[1]
        if convention is ScanFlopConvention.RELEASE:
            return 3 * batch * dim * length * nstate + 2.5 * batch * dim * length
        return 9 * batch * length * dim * nstate + batch * dim * length
    return handle


def _per_output_element(flops: int) -> Callable[[List[Any], List[Any]], float]:
    def handle(inputs: List[Any], outputs: List[Any]) -> float:
        count = 1
        for size in _shape(outputs[0]):
            count *= size
        return flops * count
    return handle


def _per_input_element(inputs: List[Any], outputs: List[Any]) -> float:
    count = 1
    for size in _shape(inputs[0]):
        count *= size
    return count


def _deformable_sequence(inputs: List[Any], outputs: List[Any]) -> float:
    """defmamba::deformable_sequence: point offset (4) plus, with a table, offset bias (8) per output element."""
    count = 1
    for size in _shape(outputs[0]):
        count *= size
    has_table = inputs[2].type().kind() != "NoneType"
    return (4 + (8 if has_table else 0)) * count


def _handles(convention: ScanFlopConvention) -> Dict[str, Any]:
    scan = _scan_handle(convention)
    return {
        "defmamba::selective_scan": scan,  # the custom op of every scan backend (models/ops/scan/op.py)
        "prim::PythonOp.PointOffsetSample": _per_output_element(4),
        "defmamba::deformable_sequence": _deformable_sequence,
        "aten::mean": _per_input_element,
    }


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of trainable parameters, or of all parameters (frozen ones too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, img_size: int, in_chans: int = 3,
                convention: ScanFlopConvention = ScanFlopConvention.RELEASE, custom_ops: bool = True) -> float:
    """GFLOPs of one (in_chans, img_size, img_size) image through `model`, counted on a CPU copy.

    `custom_ops=False` counts the selective scan and the bilinear sampling as 0 (DAMamba's published numbers).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import warns about deprecated torch.jit APIs
        from fvcore.nn import FlopCountAnalysis

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, in_chans, img_size, img_size, device=device)
        handles = _handles(convention)
        if not custom_ops:
            # the project's own operations (scan, sampling) count 0; fvcore's aten handles stay
            handles = {name: (h if name.startswith("aten::") else None) for name, h in handles.items()}
        analysis = FlopCountAnalysis(model, (x,)).set_op_handle(**handles)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the Python control flow of the ops
            total = analysis.total()
    finally:
        model.train(was_training)
    return total / 1e9


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m utils.flops", description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="model config YAML, e.g. configs/tiny.yaml")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument("--scan-flops", choices=[c.value for c in ScanFlopConvention],
                        help="selective-scan counting convention (default: vmamba for VMamba and Mamba-Adaptor "
                             "configs, else release)")
    parser.add_argument("--no-custom-ops", action="store_true",
                        help="count the selective scan and bilinear sampling as 0 (DAMamba's published GFLOPs)")
    return parser.parse_args(argv)


def main(argv: List[str]) -> int:
    args = _parse(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from config import ConfigError, get_default_config, load_yaml_config
    from models import build_model, input_channels

    config = get_default_config()
    try:
        load_yaml_config(config, Path(args.cfg))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.img_size < 32:
        print(f"error: --img-size must be at least 32 (the model downsamples by 32), got {args.img_size}",
              file=sys.stderr)
        return 2
    if args.scan_flops is None:
        vmamba = config.MODEL.TYPE in ("vmamba", "mamba_adaptor")
        args.scan_flops = (ScanFlopConvention.VMAMBA if vmamba else ScanFlopConvention.RELEASE).value
    model = build_model(config)
    gflops = count_flops(model, args.img_size, input_channels(config), ScanFlopConvention(args.scan_flops),
                         custom_ops=not args.no_custom_ops)
    trainable, total = count_params(model), count_params(model, trainable_only=False)
    frozen = f", {total:,} with frozen ones" if total != trainable else ""
    counted = "scan and sampling not counted" if args.no_custom_ops else f"scan convention: {args.scan_flops}"
    print(f"{config.MODEL.NAME}: params {trainable:,} trainable ({trainable / 1e6:.2f} M){frozen}, "
          f"{gflops:.3f} GFLOPs at {args.img_size}x{args.img_size} ({counted})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
