"""Selective-scan benchmark at the DefMamba DSSM shapes, per scan backend (cuda, triton, torch).

For every stage of the chosen model(s) at 224 px (L = 3136/784/196/49 tokens, D = 3 * d_inner channels in
G = 3 scan groups, N = 16 states) and the chosen batch, each backend is forced through
models.ops.backends.use_backend("scan", ...) and models.ops.scan.selective_scan_fn is timed (warm-up,
then the median of the repeats):

    fwd      the forward with inputs that require grad (what training runs)
    bwd      the backward alone (torch.autograd.grad on a retained graph)
    fwd+bwd  both

Bandwidth is reported as a fraction of the measured copy bandwidth (read + write of a 1 GiB copy):

    fwd bytes = u, delta, B, C read once (input dtype) + out written once (fp32)
    bwd bytes = u, delta, B, C (input dtype) + dout (fp32) read once + du, ddelta, dB, dC written once
    (A, D, delta_bias and any saved chunk states are not counted)

Issue #8's bar: forward >= 70 % and backward >= 50 % of copy bandwidth at the stage-1 shape. A backend
that cannot run here (BackendUnavailable, or the extension not built) is reported and skipped; one that
fails is reported in its rows and makes the exit status non-zero. The PyTorch reference computes in fp32
whatever the input dtype, so it is timed for the first listed dtype only, with fewer repeats: it is the
speed-up baseline, not a candidate.

    python benchmarks/selective_scan.py                              # all backends, T/S/B, fp16 + fp32
    python benchmarks/selective_scan.py --backend cuda --model T --stages 1 --dtype fp16
    python benchmarks/selective_scan.py --json scan.json --quick     # what benchmarks/gpu_suite.sh runs
    python benchmarks/selective_scan.py --device cpu --backend torch --batch 1 --stages 4 --repeats 1  # smoke
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

import benchmark_common as common
from models.ops.backends import Backend, BackendUnavailable, use_backend  # noqa: E402

# d_inner per stage (ssm_ratio 1, so d_inner = stage width); S and B share their widths
WIDTHS = {"T": (48, 96, 192, 384), "S": (96, 192, 384, 768), "B": (96, 192, 384, 768)}
LENGTHS = (3136, 784, 196, 49)  # 56^2, 28^2, 14^2, 7^2 tokens at 224 px
GROUPS, NSTATE = 3, 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SCAN_BACKENDS = ["cuda", "triton", "torch"]
TARGET = {"stage": 1, "fwd_pct_copy_bw": 70.0, "bwd_pct_copy_bw": 50.0}


def make_inputs(batch: int, dim: int, length: int, dtype: torch.dtype, device: torch.device) -> Tuple:
    """Scan inputs in the ranges a trained DSSM sees: softplus(delta + bias) of order 0.1, A = -(1..N)."""
    u = torch.randn(batch, dim, length, device=device, dtype=dtype)
    delta = (torch.randn(batch, dim, length, device=device) * 0.5 - 2.0).to(dtype)
    A = -torch.arange(1, NSTATE + 1, device=device, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(batch, GROUPS, NSTATE, length, device=device, dtype=dtype)
    C = torch.randn(batch, GROUPS, NSTATE, length, device=device, dtype=dtype)
    D = torch.ones(dim, device=device)
    bias = torch.rand(dim, device=device) * 0.1
    return u, delta, A, B, C, D, bias


def traffic_bytes(u: torch.Tensor, B: torch.Tensor) -> Tuple[int, int]:
    esize = u.element_size()
    n_ud, n_bc = u.numel(), B.numel()
    inputs = (2 * n_ud + 2 * n_bc) * esize
    return inputs + n_ud * 4, inputs + n_ud * 4 + inputs


def unavailable_reason(backend: Backend, device: torch.device) -> Optional[str]:
    """Why `backend` cannot be measured here, or None. Runs one tiny scan under the forced backend."""
    from models.ops.scan import cuda_extension_available, selective_scan_fn

    if backend == Backend.CUDA and not cuda_extension_available():
        return "defmamba_scan_cuda is not built (pip install --no-build-isolation kernels/selective_scan)"
    u, delta, A, B, C, D, bias = make_inputs(1, GROUPS, 8, torch.float32, device)
    try:
        with use_backend("scan", backend):
            selective_scan_fn(u, delta, A, B, C, D, bias, delta_softplus=True)
    except BackendUnavailable as err:
        return str(err)
    return None


def measure(backend: Backend, batch: int, dim: int, length: int, dtype: torch.dtype, device: torch.device,
            warmup: int, repeats: int, copy_bw: float) -> Dict[str, Any]:
    from models.ops.scan import selective_scan_fn

    u, delta, A, B, C, D, bias = make_inputs(batch, dim, length, dtype, device)
    dout = torch.randn(batch, dim, length, device=device)
    fwd_bytes, bwd_bytes = traffic_bytes(u, B)
    leaves = [t.requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]
    with use_backend("scan", backend):
        def fwd() -> torch.Tensor:
            return selective_scan_fn(*leaves, delta_softplus=True)

        t_fwd = common.median_ms(fwd, warmup, repeats, device)
        y = fwd()
        t_bwd = common.median_ms(lambda: torch.autograd.grad(y, leaves, dout, retain_graph=True),
                                 warmup, repeats, device)
        del y
        t_fb = common.median_ms(lambda: torch.autograd.grad(fwd(), leaves, dout), warmup, repeats, device)
    return {
        "fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwd_bwd_ms": t_fb,
        "fwd_pct_copy_bw": 100 * fwd_bytes / (t_fwd * 1e-3) / copy_bw,
        "bwd_pct_copy_bw": 100 * bwd_bytes / (t_bwd * 1e-3) / copy_bw,
        "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes,
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="all",
                        help="all, or a comma list of " + ", ".join(SCAN_BACKENDS) + " (default all)")
    parser.add_argument("--model", default="all", help="all, or a comma list of T, S, B (default all)")
    parser.add_argument("--dtype", default="fp16,fp32",
                        help="all, or a comma list of fp16, bf16, fp32 (default fp16,fp32: AMP training and fp32)")
    parser.add_argument("--stages", default="1,2,3,4", help="comma list of stages 1-4 (default all)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (2 warm-up, 5 timed)")
    parser.add_argument("--warmup", type=int, help="warm-up calls per measurement (default 5, --quick 2)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default 20, --quick 5)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu only for a smoke run: its timings say nothing about the GPU")
    parser.add_argument("--json", metavar="PATH", help="also write all figures to this JSON file")
    args = parser.parse_args(argv)

    def listed(text: str, allowed, what: str) -> List[str]:
        names = list(allowed) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            parser.error(f"--{what}: unknown {', '.join(bad) or repr(text)}; expected all or a comma list of "
                         f"{', '.join(allowed)}")
        return names

    try:
        args.backends = common.parse_backends(args.backend, SCAN_BACKENDS)
    except ValueError as err:
        parser.error(f"--backend: {err}")
    args.models = listed(args.model, WIDTHS, "model")
    args.dtypes = listed(args.dtype, DTYPES, "dtype")
    args.stage_list = [int(s) for s in listed(args.stages, ("1", "2", "3", "4"), "stages")]
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    quick_warmup, quick_repeats = (2, 5) if args.quick else (5, 20)
    args.warmup = quick_warmup if args.warmup is None else args.warmup
    args.repeats = quick_repeats if args.repeats is None else args.repeats
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = common.benchmark_device(args.device)
    warmup, repeats = args.warmup, args.repeats
    copy_bw = common.copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 24)
    env = common.environment(device)
    print(f"device {env['device']}, torch {env['torch']}, copy bandwidth {copy_bw / 1e9:.0f} GB/s "
          f"(read + write), batch {args.batch}", flush=True)

    backends: List[Backend] = args.backends
    results: List[Dict[str, Any]] = []
    status: Dict[str, str] = {}

    def save() -> None:  # after every backend, so a run cut short still leaves its figures
        common.write_json(args.json, {
            "benchmark": "selective_scan", "environment": env, "copy_bandwidth_GBps": copy_bw / 1e9,
            "warmup": warmup, "repeats": repeats, "backend_status": status,
            "target": TARGET, "results": results,
        })

    header = (f"{'backend':7} {'model':5} {'dtype':5} {'stage':>5} {'D':>5} {'L':>5} | {'fwd ms':>8} {'fwd %bw':>7} | "
              f"{'bwd ms':>8} {'bwd %bw':>7} | {'f+b ms':>8}")
    print(header)
    print("-" * len(header), flush=True)
    for backend in backends:
        try:
            reason = unavailable_reason(backend, device)
        except Exception as err:  # noqa: BLE001  a broken backend must not hide the others' figures
            reason = f"error: {common.one_line(err)}"
        if reason is not None:
            status[backend.value] = f"unavailable: {reason}"
            print(f"{backend.value:7} unavailable: {reason}", flush=True)
            continue
        status[backend.value] = "measured"
        # the PyTorch reference is slow and computes in fp32 anyway: one dtype, fewer repeats
        reference = backend == Backend.TORCH
        b_warmup, b_repeats = (min(warmup, 1), min(repeats, 3)) if reference else (warmup, repeats)
        b_dtypes = args.dtypes[:1] if reference else args.dtypes
        seen: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
        for model in args.models:
            for dname in b_dtypes:
                for stage in args.stage_list:
                    dim, length = GROUPS * WIDTHS[model][stage - 1], LENGTHS[stage - 1]
                    row = {"backend": backend.value, "model": model, "dtype": dname, "stage": stage,
                           "batch": args.batch, "D": dim, "L": length, "N": NSTATE, "G": GROUPS}
                    key = (dname, dim, length)
                    if key in seen:  # S and B share their shapes
                        figures = seen[key]
                    else:
                        try:
                            figures = measure(backend, args.batch, dim, length, DTYPES[dname], device,
                                              b_warmup, b_repeats, copy_bw)
                        except torch.cuda.OutOfMemoryError:
                            figures = {"error": "out of memory"}
                        except Exception as err:  # noqa: BLE001  reported, and the exit status says so
                            figures = {"error": f"error: {common.one_line(err)}"}
                        seen[key] = figures
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    row.update(figures)
                    results.append(row)
                    if "error" in figures:
                        print(f"{backend.value:7} {model:5} {dname:5} {stage:5d} {dim:5d} {length:5d} | "
                              f"{figures['error']}", flush=True)
                    else:
                        print(f"{backend.value:7} {model:5} {dname:5} {stage:5d} {dim:5d} {length:5d} | "
                              f"{row['fwd_ms']:8.3f} {row['fwd_pct_copy_bw']:6.1f}% | {row['bwd_ms']:8.3f} "
                              f"{row['bwd_pct_copy_bw']:6.1f}% | {row['fwd_bwd_ms']:8.3f}", flush=True)
        save()
    save()
    if not any("fwd_ms" in r for r in results):
        common.fail("no scan backend could be measured: " + "; ".join(f"{k}: {v}" for k, v in status.items()), 1)
    broken = sorted({r["backend"] for r in results if r.get("error", "").startswith("error")}
                    | {k for k, v in status.items() if v.startswith("unavailable: error")})
    if broken:
        common.fail(f"the scan failed with backend(s) {', '.join(broken)} (see the rows above)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
