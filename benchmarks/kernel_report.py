"""Resources, simulated traffic and the roofline bound of the Triton scan kernels at every DefMamba-T/S (and
DAMamba-T) stage shape, as a markdown table, and the resources of the bilinear-sampling kernels (deformable
sequence, adaptive sampling) and the DSSM's branch merge as a second: everything derived on a CPU, nothing timed
on a GPU.

    python benchmarks/kernel_report.py [--models defmamba_tiny,defmamba_small,damamba_tiny] [--out FILE]
                                       [--sampling-only]   (the second table alone: under a minute)

- registers / spills / shared memory: ahead-of-time compile for sm_80 and sm_90 of every distinct launch the
  models make (fp16, bf16, fp32 inputs; benchmarks/kernel_analysis.py, in a subprocess without the interpreter);
  the table shows the fp16 (AMP) launch of each stage and sm_90, and the worst case over all launches below it.
- occupancy: resident warps per SM allowed by the registers (of 64), NVIDIA's allocation rule.
- traffic: 32-byte sectors touched / essential bytes, simulated in Triton's interpreter for one batch element
  and one group of the stage's channels at min(L, 256) steps (the tiling of the real shape), the host's
  partial-sum pass over dB/dC added as the bytes it reads and writes.
- roofline at batch 128: bytes = essential bytes x traffic ratio, over the spec memory bandwidth (H100 SXM
  3.35 TB/s, H200 SXM 4.8 TB/s); MUFU = special-function operations (exp2, log2, reciprocal) over
  16 per clock per SM (CUDA C++ Programming Guide, arithmetic-instruction throughput, cc 8.x / 9.0) x 132 SMs
  x 1.98 GHz (the boost clock of both: 67 FP32 TFLOPS = 132 x 128 x 2 x 1.98 GHz on the spec sheets). MUFU
  operations per (channel, step), counted in the PTX (ex2.approx, and the reciprocal inside div.full; tl.log is
  libdevice's FMA polynomial): forward N + 2 (a decay per state; softplus: one exp, one division), backward
  N + 4 (a decay per state; softplus and sigmoid: two exps, two divisions). The larger time is the bound.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TRITON_INTERPRET", "1")  # the traffic simulation; the compile runs in a subprocess
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import kernel_analysis as ka  # noqa: E402
import kernel_launches as kl  # noqa: E402

GPUS = {"H100": 3.35e12, "H200": 4.8e12}      # spec HBM bandwidth, bytes/s (SXM)
MUFU_PER_S = 16 * 132 * 1.98e9                # special-function ops/s, both GPUs
BATCH = 128


def resources(models, sampling_only: bool = False) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    keep = "not l[0][0].startswith('scan_')" if sampling_only else "True"
    code = ("import sys, json; sys.path.insert(0, %r); sys.path.insert(0, %r); import kernel_analysis as ka\n"
            "launches = [l for l in ka.distinct_launches(%r) if %s]\n"
            "for r in ka.resource_rows(launches): print(json.dumps(r), flush=True)"
            % (str(HERE.parent), str(HERE), tuple(models), keep))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def traffic(shape: kl.StageShape) -> dict:
    from models.ops.scan.triton import tiling
    length = min(shape.length, 256)
    t = ka.scan_traffic(1, 1, shape.channels, shape.nstate, length)
    nblock = -(-shape.channels // tiling(shape.channels, shape.nstate, shape.length).block_d)
    fwd, bwd = t["scan_fwd_kernel"], t["scan_bwd_kernel"]
    extra = 0 if nblock == 1 else 2 * shape.nstate * length * (nblock * 4 + 2)  # torch.sum: read fp32, write fp16
    return {"forward": fwd.ratio, "backward": (32 * bwd.sectors + extra) / bwd.essential_bytes}


def roofline(shape: kl.StageShape, kind: str, ratio: float, bandwidth: float):
    d, length, n = shape.branches * shape.channels, shape.length, shape.nstate
    rows = BATCH * d * length
    bc = BATCH * shape.branches * n * length * 2 * 2              # B and C (fp16)
    if kind == "forward":
        essential, mufu = rows * (2 + 2 + 4) + bc, rows * (n + 2)  # u, delta fp16 -> y fp32
    else:
        essential, mufu = rows * (2 + 2 + 4 + 2 + 2) + 2 * bc, rows * (n + 4)  # + dy fp32 -> du, ddelta, dB, dC
    t_mem, t_mufu = essential * ratio / bandwidth, mufu / MUFU_PER_S
    return max(t_mem, t_mufu) * 1e6, "memory" if t_mem >= t_mufu else "MUFU"


def sampling_table(rows: list) -> str:
    """One line per (sampling or merge kernel, model): the worst registers over its stages and dtypes, per target."""
    worst: dict = {}
    for r in rows:
        for label in r["labels"]:
            kernel, model = label.split()[:2]
            if kernel.startswith("scan_"):
                continue
            best = worst.setdefault((model, kernel), {})
            if r["target"] not in best or r["registers"] > best[r["target"]]["registers"]:
                best[r["target"]] = r
    lines = ["| model | kernel | tile (BLOCK_C x BLOCK_N, merge: BLOCK_D x BLOCK_L), warps | regs sm_80 / sm_90 "
             "(most, any stage and dtype) | spills | shared | warps/SM (occupancy) |", "|---|---|---|---|---|---|---|"]
    for (model, kernel), by_target in worst.items():
        r80, r90 = by_target["sm_80"], by_target["sm_90"]
        warps = min(r80["warps_per_sm"], r90["warps_per_sm"])
        tile = (r90["BLOCK_C"], r90["BLOCK_N"]) if "BLOCK_C" in r90 else (r90["BLOCK_D"], r90["BLOCK_L"])
        lines.append(f"| {model} | {kernel} | {tile[0]} x {tile[1]}, {r90['num_warps']} | "
                     f"{r80['registers']} / {r90['registers']} | {max(r80['local_bytes'], r90['local_bytes'])} | "
                     f"{max(r80['shared_bytes'], r90['shared_bytes'])} | {warps} ({warps / 64:.0%}) |")
    return "\n".join(lines)


def report(models) -> str:
    """The scan table, its summary line and the sampling kernels' table."""
    every = resources(models)
    rows = [r for r in every if r["label"].startswith("scan_")]
    by_label = {(label, r["target"]): r for r in rows for label in r["labels"]}
    kinds = {"forward": "scan_fwd_kernel", "backward": "scan_bwd_kernel"}
    lines = ["| model | stage (D, L, N) | kernel | tile (BLOCK_D x CHUNK), warps | regs sm_80 / sm_90 | spills | "
             "shared | warps/SM (occupancy) | traffic | H100 bound | H200 bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        for shape in kl.stage_shapes(model):
            ratios = traffic(shape)
            for kind, kernel in kinds.items():
                label = f"{kernel} {model} stage {shape.stage} fp16"
                r80, r90 = by_label[(label, "sm_80")], by_label[(label, "sm_90")]
                bounds = [roofline(shape, kind, ratios[kind], bw) for bw in GPUS.values()]
                lines.append(
                    f"| {model} | {shape.stage + 1} ({shape.branches * shape.channels}, {shape.length}, "
                    f"{shape.nstate}) | {kind} | {r90['BLOCK_D']} x {r90['CHUNK']}, {r90['num_warps']} | "
                    f"{r80['registers']} / {r90['registers']} | {max(r80['local_bytes'], r90['local_bytes'])} | "
                    f"{r90['shared_bytes']} | {min(r80['warps_per_sm'], r90['warps_per_sm'])} "
                    f"({min(r80['warps_per_sm'], r90['warps_per_sm']) / 64:.0%}) | {ratios[kind]:.2f}x | "
                    + " | ".join(f"{us:.0f} us ({what})" for us, what in bounds) + " |")
    worst = max(rows, key=lambda r: r["registers"])
    lines += ["", f"All {len(rows) // 2} distinct launches (fp16, bf16, fp32) x sm_80 / sm_90: registers "
              f"{min(r['registers'] for r in rows)}-{worst['registers']} (most: {worst['label']}, {worst['target']}), "
              f"spills {max(r['local_bytes'] for r in rows)} B, shared memory at most "
              f"{max(r['shared_bytes'] for r in rows)} B, at least {min(r['warps_per_sm'] for r in rows)} warps "
              f"per SM by registers.", "", sampling_table(every)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="defmamba_tiny,defmamba_small,damamba_tiny")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--sampling-only", action="store_true", help="only the sampling and merge kernels' table")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    table = sampling_table(resources(models, True)) if args.sampling_only else report(models)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
