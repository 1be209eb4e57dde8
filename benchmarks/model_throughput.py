"""Training and inference throughput of DefMamba-T/S/B (images/s) and peak training memory, per backend pair.

Measured the way the official figures were (one H100, batch 128, 224 px, one process):

    training    forward + backward under fp16 autocast, GradScaler, unscale + grad-norm clip (5.0), AdamW step
                (the trainer's utils.amp.GradStepper); random input already on the GPU: no data loading, no EMA
    inference   eval forward under torch.inference_mode, with AMP and in fp32 (torch's default TF32 settings)
    timing      warm-up steps, then the median of the timed steps (CUDA events around each step)
    memory      torch.cuda.max_memory_allocated over the training steps

Each combination of --scan-backend and --deform-backend (or each pair of --configs) is forced through
models.ops.backends.use_backend; one that raises BackendUnavailable is reported and skipped. --profile N adds
a torch.profiler table of the N kernels with the most CUDA time in one training step. The official figures
and issue #8's targets are printed next to each measurement (they only compare at batch 128, 224 px, fp16
AMP on an H100).

    python benchmarks/model_throughput.py                                    # T and S, auto backends
    python benchmarks/model_throughput.py --model tiny --scan-backend all --deform-backend all --profile 25
    python benchmarks/model_throughput.py --configs auto:auto,cuda:torch --json throughput.json
    python benchmarks/model_throughput.py --device cpu --model tiny --batch-size 2 --img-size 32 \\
        --amp-dtype bf16 --warmup 0 --steps 1                                # smoke run, no meaningful timing
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional

import torch

import benchmark_common as common
from models.ops.backends import Backend, BackendUnavailable, use_backend  # noqa: E402

import models  # noqa: E402,F401  (registers the timm names)
import timm  # noqa: E402
from utils.amp import AmpPolicy  # noqa: E402
from utils.analyze.throughput import OFFICIAL as PUBLISHED  # noqa: E402
from utils.throughput import peak_memory_gib, reset_memory, train_step  # noqa: E402

VARIANTS = {"tiny": "defmamba_tiny", "small": "defmamba_small", "base": "defmamba_base"}
SCAN_BACKENDS = ["auto", "cuda", "triton", "torch"]
DEFORM_BACKENDS = ["auto", "triton", "torch"]
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Official release on one H100 at batch 128, 224 px (issue #8); fp16 AMP training, inference fp32 and AMP.
_FIELDS = {"train_img_s": "train", "infer_fp32_img_s": "infer_fp32", "infer_amp_img_s": "infer_amp",
           "train_mem_gib": "train_mem_gib"}  # this script's names for utils.analyze's
OFFICIAL = {v: {ours: PUBLISHED[f"defmamba_{v}"][theirs] for ours, theirs in _FIELDS.items()}
            for v in ("tiny", "small")}
# Issue #8's targets: 3x official training, AMP inference, <= 0.6x official peak training memory.
TARGETS = {
    "tiny": {"train_img_s": 1650, "infer_amp_img_s": 5200, "train_mem_gib": round(0.6 * 10.7, 2)},
    "small": {"train_img_s": 1050, "infer_amp_img_s": 2800, "train_mem_gib": round(0.6 * 21.6, 2)},
}
COMPARABLE = {"batch_size": 128, "img_size": 224, "amp_dtype": "fp16", "device_type": "cuda"}


def profile_step(step: Callable[[], None], device: torch.device, rows: int) -> Dict[str, Any]:
    """Top `rows` events of one step by self device time (self CPU time on a CPU run): table and kernel list."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        common.sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        key, attrs = "self_device_time_total", ("self_device_time_total", "self_cuda_time_total")
    else:
        key, attrs = "self_cpu_time_total", ("self_cpu_time_total",)

    def self_us(e) -> float:
        for a in attrs:
            if hasattr(e, a):
                return float(getattr(e, a))
        return 0.0

    try:
        table = events.table(sort_by=key, row_limit=rows)
    except (AttributeError, KeyError, ValueError):  # older torch names device time "cuda"
        table = events.table(sort_by="self_cuda_time_total", row_limit=rows)
    # on the GPU the list holds the kernels themselves: an operator's device time would count its kernels twice
    pool = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA] if device.type == "cuda" else []
    pool = pool or list(events)
    total = sum(self_us(e) for e in pool) or 1.0
    top = sorted(pool, key=self_us, reverse=True)[:rows]
    return {"sorted_by": key, "table": table,
            "top": [{"name": e.key, "calls": e.count, "self_ms": self_us(e) / 1e3, "pct": 100 * self_us(e) / total}
                    for e in top if self_us(e) > 0]}


def measure(variant: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Training img/s, peak memory, inference img/s (AMP and fp32) and the optional profile of one model."""
    model = timm.create_model(VARIANTS[variant]).to(device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
    amp = AmpPolicy(True, AMP_DTYPES[args.amp_dtype], device.type)
    step = train_step(model, x, target, amp, args.clip_grad)

    out: Dict[str, Any] = {}
    reset_memory(device)
    model.train()
    train_ms = common.step_times_ms(step, args.warmup, args.steps, device)
    out["train_step_ms"] = train_ms
    out["train_img_s"] = args.batch_size / (statistics.median(train_ms) * 1e-3)
    out["train_mem_gib"] = peak_memory_gib(device)
    if args.profile:
        out["profile"] = profile_step(step, device, args.profile)
    del step  # and its optimizer state
    reset_memory(device)

    model.eval()
    for label, policy in (("amp", amp), ("fp32", AmpPolicy(False, amp.dtype, device.type))):
        def infer_step(policy=policy) -> None:
            with torch.inference_mode(), policy.autocast():
                model(x)

        infer_ms = common.step_times_ms(infer_step, args.warmup, args.steps, device)
        out[f"infer_{label}_step_ms"] = infer_ms
        out[f"infer_{label}_img_s"] = args.batch_size / (statistics.median(infer_ms) * 1e-3)
    out["infer_mem_gib"] = peak_memory_gib(device)
    del model
    reset_memory(device)
    return out


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_line(variant: str, row: Dict[str, Any], comparable: bool) -> str:
    official, target = OFFICIAL.get(variant, {}), TARGETS.get(variant, {})
    text = (f"{variant:5} scan={row['scan_backend']:6} deform={row['deform_backend']:6} | "
            f"train {row['train_img_s']:8.1f} img/s | infer AMP {row['infer_amp_img_s']:8.1f} | "
            f"infer fp32 {row['infer_fp32_img_s']:8.1f} | peak train mem {_fmt(row['train_mem_gib'], '.2f')} GiB")
    if comparable and official:
        text += (f"\n{'':5} official: train {official['train_img_s']}, infer AMP {official['infer_amp_img_s']}, "
                 f"fp32 {official['infer_fp32_img_s']}, mem {official['train_mem_gib']} GiB | target: train >= "
                 f"{target['train_img_s']}, infer AMP >= {target['infer_amp_img_s']}, mem <= {target['train_mem_gib']}")
    return text


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny,small", help="all, or a comma list of tiny, small, base")
    parser.add_argument("--scan-backend", default="auto",
                        help="all, or a comma list of " + ", ".join(SCAN_BACKENDS) + " (default auto)")
    parser.add_argument("--deform-backend", default="auto",
                        help="all, or a comma list of " + ", ".join(DEFORM_BACKENDS) + " (default auto)")
    parser.add_argument("--configs", metavar="SCAN:DEFORM,...",
                        help="explicit backend pairs, e.g. auto:auto,cuda:torch (instead of the product of "
                             "--scan-backend and --deform-backend)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default="fp16")
    parser.add_argument("--clip-grad", type=float, default=5.0, help="max grad norm (the recipe's 5.0)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one training step and list its top N kernels (0: off)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only for a smoke run: its timings say nothing about the GPU")
    parser.add_argument("--json", metavar="PATH", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.model == "all" else [t.strip() for t in args.model.split(",") if t.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        parser.error(f"--model: unknown {', '.join(bad) or repr(args.model)}; expected all or a comma list of "
                     f"{', '.join(VARIANTS)}")
    args.models = names
    try:
        if args.configs:
            option, args.pairs = "--configs", []
            for item in args.configs.split(","):
                scan, sep, deform = item.strip().partition(":")
                if not sep:
                    raise ValueError(f"{item!r} is not SCAN:DEFORM")
                args.pairs.append((common.parse_backends(scan, SCAN_BACKENDS)[0],
                                   common.parse_backends(deform, DEFORM_BACKENDS)[0]))
        else:
            option = "--scan-backend"
            scans = common.parse_backends(args.scan_backend, SCAN_BACKENDS)
            option = "--deform-backend"
            deforms = common.parse_backends(args.deform_backend, DEFORM_BACKENDS)
            args.pairs = [(s, d) for s in scans for d in deforms]
    except ValueError as err:
        parser.error(f"{option}: {err}")
    if args.batch_size < 1 or args.img_size < 32 or args.warmup < 0 or args.steps < 1 or args.profile < 0:
        parser.error("need --batch-size >= 1, --img-size >= 32, --warmup >= 0, --steps >= 1, --profile >= 0")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = common.benchmark_device(args.device)
    torch.backends.cudnn.benchmark = True
    env = common.environment(device)
    settings = {k: getattr(args, k) for k in ("batch_size", "img_size", "amp_dtype", "clip_grad", "warmup", "steps")}
    comparable = env["device_type"] == COMPARABLE["device_type"] and all(
        settings[k] == v for k, v in COMPARABLE.items() if k != "device_type")
    print(f"device {env['device']}, torch {env['torch']}, CUDA scan extension built: {env['scan_cuda_extension']}, "
          f"batch {args.batch_size}, {args.img_size} px, {args.amp_dtype} AMP", flush=True)

    results: List[Dict[str, Any]] = []

    def save() -> None:  # after every configuration, so a run cut short still leaves its figures
        common.write_json(args.json, {
            "benchmark": "model_throughput", "environment": env, "settings": settings,
            "comparable_to_official": comparable, "official": OFFICIAL, "targets": TARGETS, "results": results,
        })

    for scan, deform in args.pairs:
        for variant in args.models:
            row: Dict[str, Any] = {"model": variant, "scan_backend": scan.value, "deform_backend": deform.value}
            if scan == Backend.CUDA and not env["scan_cuda_extension"]:
                row["status"] = "unavailable: defmamba_scan_cuda is not built"
            else:
                try:
                    with use_backend("scan", scan), use_backend("deform", deform):
                        row.update(measure(variant, args, device))
                    row["status"] = "measured"
                except BackendUnavailable as err:
                    row["status"] = f"unavailable: {err}"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "out of memory"
                except Exception as err:  # noqa: BLE001  reported, and the exit status says so
                    row["status"] = f"error: {common.one_line(err)}"
                reset_memory(device)
            results.append(row)
            save()
            if row["status"] == "measured":
                print(report_line(variant, row, comparable), flush=True)
                if "profile" in row:
                    print(row["profile"]["table"], flush=True)
            else:
                print(f"{variant:5} scan={scan.value:6} deform={deform.value:6} | {row['status']}", flush=True)
    save()
    if not any(r["status"] == "measured" for r in results):
        common.fail("no configuration could be measured: " + "; ".join(
            f"{r['model']} scan={r['scan_backend']} deform={r['deform_backend']}: {r['status']}" for r in results), 1)
    broken = [f"{r['model']} scan={r['scan_backend']} deform={r['deform_backend']}" for r in results
              if r["status"].startswith("error")]
    if broken:
        common.fail(f"{len(broken)} configuration(s) failed: {'; '.join(broken)} (see the lines above)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
