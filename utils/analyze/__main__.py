"""Command line of utils.analyze: `erf`, `activation` and `throughput` (see the package docstring)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:   # `python -m utils.analyze` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from data.mnist5k import Mnist5kUnavailable  # noqa: E402

from utils.analyze import activation, erf, plots, throughput  # noqa: E402
from utils.analyze.inputs import AnalysisError, digit_images, displayable, load_images, load_model  # noqa: E402

DEFAULT_QUERIES = ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7))
DEFAULT_DIGIT = 2   # the 3rd validation digit, a "2" (MNIST-5k row 1400, as utils.visualize)


def _query(text: str) -> Tuple[float, float]:
    try:
        fy, fx = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not Y,X (fractions of the image height and width)")
    return fy, fx


def _sizes(text: str) -> List[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive batch sizes")
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utils.analyze", description=sys.modules["utils.analyze"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", action="append", required=True, metavar="[LABEL=]MODEL[@CKPT]",
                        help="a config YAML or timm name, optionally with a checkpoint; repeat for several models")
    common.add_argument("--ema", action="store_true", help="load the checkpoints' EMA weights")
    common.add_argument("--img-size", type=int, help="input size (default: the config's / the model's)")
    common.add_argument("--device", default="cpu", help="torch device (default cpu)")
    figure = argparse.ArgumentParser(add_help=False)
    figure.add_argument("--out", required=True, help="output PNG")
    figure.add_argument("--json", help="numbers of the figure (default: --out with .json)")

    p = sub.add_parser("erf", parents=[common, figure], help="effective receptive field of a stage")
    p.add_argument("--stage", type=int, help="1-based stage (default: the last)")
    p.add_argument("--images", type=int, default=16, help="number of images averaged (default 16)")
    p.add_argument("--data-path", help="image folder (e.g. an ImageNet val split; default: the embedded digits)")
    p.add_argument("--batch-size", type=int, default=8)
    p = sub.add_parser("activation", parents=[common, figure], help="activation maps at query tokens (Fig. 4)")
    p.add_argument("--stage", type=int, default=2, help="1-based stage (default 2, as Fig. 4)")
    p.add_argument("--block", type=int, default=-1, help="block index in the stage (default -1: the last)")
    p.add_argument("--query", type=_query, action="append", metavar="Y,X",
                   help="query position as fractions of height and width; repeat (default: "
                        + " ".join(f"{y},{x}" for y, x in DEFAULT_QUERIES) + ")")
    p.add_argument("--image", help=f"input image (default: embedded validation digit {DEFAULT_DIGIT}, a '2')")
    p = sub.add_parser("throughput", parents=[common], help="img/s and peak memory table (markdown)")
    p.add_argument("--batch-sizes", type=_sizes, default=[128], help="comma list (default 128)")
    p.add_argument("--amp-dtype", choices=("fp16", "bf16"), default="fp16",
                   help="autocast dtype of the AMP columns (default fp16; fp16 falls back to fp32 on a CPU)")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--warmup", type=int, help="untimed iterations (default 50 on a GPU, 1 on a CPU)")
    p.add_argument("--steps", type=int, help="timed iterations (default 30 on a GPU, 3 on a CPU)")
    p.add_argument("--out", help="write the markdown table here too")
    p.add_argument("--json", help="write the rows as JSON here")
    return parser


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _check_outputs(*paths: Optional[str]) -> None:
    for path in paths:
        if path and not Path(path).resolve().parent.is_dir():
            raise AnalysisError(f"the folder of {path} does not exist")


def _stage(model: torch.nn.Module, stage: Optional[int]) -> int:
    """1-based stage -> 0-based index (default: the last stage)."""
    count = len(model.feature_info)
    index = count - 1 if stage is None else stage - 1
    if not 0 <= index < count:
        raise AnalysisError(f"--stage {stage} does not exist: the model has stages 1 to {count}")
    return index


def run_erf(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    pil_images = load_images(args.data_path, args.images)
    results, panels = [], []
    for spec in args.model:
        loaded = load_model(spec, args.img_size, args.ema)
        model = loaded.model.to(device)
        stage = _stage(model, args.stage)
        images = [loaded.transform(im).to(device) for im in pil_images]
        print(f"{loaded.label}: ERF of stage {stage + 1} over {len(images)} images at {loaded.img_size} px", flush=True)
        raw = erf.contribution_map(erf.stage_features(model, stage), images, args.batch_size).cpu()
        scaled = erf.log_scaled(raw)
        ratios = erf.area_ratios(scaled)
        for r in ratios:
            print(f"  area ratio at {r.threshold:.0%}: {r.ratio:.4f} (square side {r.side} px)")
        panels.append((loaded.label, scaled.numpy(), [(r.threshold, r.ratio) for r in ratios]))
        results.append({"model": loaded.label, "spec": spec, "stage": stage + 1, "img_size": loaded.img_size,
                        "images": len(images), "area_ratios": [r.as_dict() for r in ratios],
                        "scaled_erf": scaled.round(decimals=6).tolist()})
    plots.save(plots.erf_figure(panels, results[0]["stage"]), args.out)
    return {"command": "erf", "data": args.data_path or "embedded MNIST-5k validation digits", "models": results}


def run_activation(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    queries = args.query or list(DEFAULT_QUERIES)
    pil = load_images(args.image, 1)[0] if args.image else digit_images(DEFAULT_DIGIT + 1)[DEFAULT_DIGIT]
    rows, results = [], []
    for spec in args.model:
        loaded = load_model(spec, args.img_size, args.ema)
        model = loaded.model.to(device)
        stage = _stage(model, args.stage)
        tensor = loaded.transform(pil).to(device)
        maps, tokens = activation.activation_maps(model, tensor, stage, args.block, queries)
        blocks = len(model.stage_modules()[stage].blocks)
        block = args.block % blocks + 1   # 1-based, as the figure names it
        print(f"{loaded.label}: stage {stage + 1} block {block} of {blocks}, token grid {tuple(maps.shape[1:])}, "
              f"queries at tokens {tokens}", flush=True)
        rows.append((loaded.label, displayable(tensor), maps.cpu().numpy(), tokens))
        results.append({"model": loaded.label, "spec": spec, "stage": stage + 1, "block": block,
                        "img_size": loaded.img_size, "tokens": [list(t) for t in tokens],
                        "maps": maps.cpu().round(decimals=6).tolist()})
    plots.save(plots.activation_figure(rows, results[0]["stage"], results[0]["block"]), args.out)
    return {"command": "activation", "image": args.image or f"embedded validation digit {DEFAULT_DIGIT}",
            "queries": [list(q) for q in queries], "models": results}


def run_throughput(args: argparse.Namespace) -> Dict[str, Any]:
    from utils.amp import resolve_amp

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("--device cuda but CUDA is not available")
    amp, note = resolve_amp(True, args.amp_dtype, device)
    if note:
        print(note)
    models = [load_model(spec, args.img_size) for spec in args.model]
    rows = throughput.measure_rows(models, args.batch_sizes, amp, device, train=not args.no_train,
                                   warmup=args.warmup, timed=args.steps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "a CPU"
    environment = f"{where}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    table = throughput.markdown_table(rows, environment)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return {"command": "throughput", "environment": environment, "rows": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    json_path = args.json if args.json or args.command == "throughput" else str(Path(args.out).with_suffix(".json"))
    try:
        _check_outputs(args.out, json_path)
        payload = {"erf": run_erf, "activation": run_activation, "throughput": run_throughput}[args.command](args)
    except (AnalysisError, Mnist5kUnavailable, OSError) as err:
        print(f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
              file=sys.stderr)
        return 2
    if json_path:
        _write_json(json_path, payload)
    for path in (args.out, json_path):
        if path:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
