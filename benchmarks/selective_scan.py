"""Benchmark the `defmamba_scan_cuda` selective scan at DefMamba DSSM shapes.

For every stage of the chosen model(s) (batch 128 at 224x224: L = 3136/784/196/49, G = 3 scan
groups, Dtot = 3 * d_inner, N = 16) it times with CUDA events (warm-up, median of repeats):
  fwd      ext.fwd (fp32 output, as used by the autograd wrapper)
  bwd      ext.bwd alone (given the forward's states)
  fwd+bwd  the autograd path models.selective_scan.selective_scan_fn + backward
and prints the effective bandwidth as a fraction of the measured device-to-device copy bandwidth:
  fwd bytes = u, delta, B, C read once + out written once (fp32)
  bwd bytes = u, delta, B, C, dout (fp32) read once + du, ddelta, dB, dC written once
(small tensors A, D, delta_bias and the fwd checkpoints are not counted). The pure-PyTorch
reference (models.selective_scan.selective_scan_reference) is timed on a few shapes for the
speed-up column.

    python benchmarks/selective_scan.py [--quick] [--dtype bf16|fp32|both] [--model T|S|B|all]
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "T": (48, 96, 192, 384),
    "S": (96, 192, 384, 768),
    "B": (96, 192, 384, 768),
}
LENGTHS = (3136, 784, 196, 49)  # 56^2, 28^2, 14^2, 7^2 tokens per stage at 224x224
GROUPS, NSTATE = 3, 16
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cuda_time_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), 3, 10)
    return 2 * nbytes / (ms * 1e-3)


def make_inputs(batch, dim, length, dtype):
    dev = "cuda"
    u = torch.randn(batch, dim, length, device=dev, dtype=dtype)
    delta = (torch.randn(batch, dim, length, device=dev) * 0.5 - 2.0).to(dtype)
    A = -torch.arange(1, NSTATE + 1, device=dev, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(batch, GROUPS, NSTATE, length, device=dev, dtype=dtype)
    C = torch.randn(batch, GROUPS, NSTATE, length, device=dev, dtype=dtype)
    D = torch.ones(dim, device=dev)
    bias = torch.rand(dim, device=dev) * 0.1
    return u, delta, A, B, C, D, bias


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, reference on one shape only")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "both"), default="both")
    parser.add_argument("--model", choices=("T", "S", "B", "all"), default="all")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("selective_scan benchmark: no CUDA device available (needs a GPU).", file=sys.stderr)
        raise SystemExit(1)
    try:
        import defmamba_scan_cuda as ext
    except ImportError as err:
        print(f"selective_scan benchmark: defmamba_scan_cuda is not built ({err}); "
              "run `pip install --no-build-isolation kernels/selective_scan`.", file=sys.stderr)
        raise SystemExit(1)
    from models.selective_scan import selective_scan_fn, selective_scan_reference

    warmup, repeats = (2, 5) if args.quick else (5, 20)
    copy_bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {copy_bw / 1e9:.0f} GB/s "
          f"(read + write, 1 GiB copy)  batch {args.batch}")
    models = ("T", "S", "B") if args.model == "all" else (args.model,)
    dtypes = ("bf16", "fp32") if args.dtype == "both" else (args.dtype,)
    # the reference is slow and memory hungry: only the short stages
    ref_lengths = (196,) if args.quick else (196, 49)

    header = (f"{'model':5} {'dtype':5} {'Dtot':>5} {'L':>5} | {'fwd ms':>8} {'fwd %bw':>7} | {'bwd ms':>8} "
              f"{'bwd %bw':>7} | {'f+b ms':>8} | {'ref f+b ms':>10} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    seen = {}
    for model in models:
        for dname in dtypes:
            dtype = DTYPES[dname]
            esize = torch.finfo(dtype).bits // 8
            for d_inner, length in zip(MODELS[model], LENGTHS):
                dim = GROUPS * d_inner
                key = (dname, dim, length)
                if key in seen:  # S and B share their DSSM shapes
                    print(f"{model:5} {seen[key]}")
                    continue
                u, delta, A, B, C, D, bias = make_inputs(args.batch, dim, length, dtype)
                dout = torch.randn(args.batch, dim, length, device="cuda")
                n_ud = u.numel()
                n_bc = B.numel()
                fwd_bytes = (2 * n_ud + 2 * n_bc) * esize + n_ud * 4
                bwd_bytes = (2 * n_ud + 2 * n_bc) * esize + n_ud * 4 + (2 * n_ud + 2 * n_bc) * esize

                t_fwd = cuda_time_ms(lambda: ext.fwd(u, delta, A, B, C, D, bias, True, True), warmup, repeats)
                _, states = ext.fwd(u, delta, A, B, C, D, bias, True, True)
                t_bwd = cuda_time_ms(lambda: ext.bwd(u, delta, A, B, C, D, bias, dout, states, True),
                                     warmup, repeats)
                leaves = [x.detach().requires_grad_(True) for x in (u, delta, A, B, C, D, bias)]

                def fwd_bwd(fn=selective_scan_fn):
                    for x in leaves:
                        x.grad = None
                    fn(*leaves, delta_softplus=True).backward(dout)

                t_fb = cuda_time_ms(fwd_bwd, warmup, repeats)
                ref_txt = f"{'-':>10} {'-':>8}"
                if length in ref_lengths:
                    try:
                        t_ref = cuda_time_ms(lambda: fwd_bwd(selective_scan_reference), 1, 3)
                        ref_txt = f"{t_ref:10.2f} {t_ref / t_fb:7.1f}x"
                    except torch.cuda.OutOfMemoryError:
                        ref_txt = f"{'OOM':>10} {'-':>8}"
                    torch.cuda.empty_cache()
                row = (f"{dname:5} {dim:5d} {length:5d} | {t_fwd:8.3f} {fwd_bytes / (t_fwd * 1e-3) / copy_bw:7.1%} | "
                       f"{t_bwd:8.3f} {bwd_bytes / (t_bwd * 1e-3) / copy_bw:7.1%} | {t_fb:8.3f} | {ref_txt}")
                seen[key] = row
                print(f"{model:5} {row}", flush=True)
                del u, delta, B, C, dout, states, leaves
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
