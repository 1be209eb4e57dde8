"""The Triton kernels (selective scan, deformable sequence, adaptive sampling, branch merge) compile ahead of time
for sm_80 and sm_90 at the launch configurations the models use, without spills, within the SM's shared memory,
and at >= 25 % register-limited occupancy (>= 16 of 64 warps per SM; the allocation rule is in
benchmarks/kernel_analysis.py).
No GPU is needed: Triton compiles for a GPUTarget on the CPU and the cuobjdump of its wheel reads the cubin's
resource usage.

The launches are built by the real host code from the stage shapes of DefMamba-T/S and DAMamba-T (batch 128,
224 px). Compiling every distinct launch (96 kernels x 2 targets) takes minutes, so CI compiles one launch per
variant, 25 in all, the input dtypes fp16 / bf16 / fp32 taken in turn: for the scan one per (kernel and direction,
one state or many, row alignment), and one per sampling or merge kernel (the deformable backward's launches for x
and for the offset-bias table counted apart); the variants differ in layout and code, the dtypes only in the load
conversions.
`benchmarks/kernel_report.py` compiles all of them. The compile runs in a subprocess because the test process
has imported Triton in interpreter mode.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_analysis.py"), "--subset"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiles_for_both_targets(rows):
    labels = {row["label"] for row in rows}
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
    assert len(rows) == 2 * len(labels) == 62
    assert {label.split()[0] for label in labels} == {
        "scan_fwd_kernel", "scan_bwd_kernel", "scan_fwd_kernel(reversed)", "scan_bwd_kernel(reversed)",
        "deformable_sequence_fwd_kernel", "deformable_sample_bwd_kernel(x)", "deformable_sample_bwd_kernel(table)",
        "adaptive_sample_fwd_kernel", "adaptive_sample_bwd_kernel", "merge_fwd_kernel", "merge_bwd_kernel"}
    assert {label.split()[-1] for label in labels} == {"fp16", "bf16", "fp32"}
    assert {label.split()[1] for label in labels} == {"defmamba_tiny", "damamba_tiny"}  # S shares T's variants
    scans = [row for row in rows if row["label"].startswith("scan_")]
    assert len(scans) == 48  # DefMamba: a launch per piece and direction, its raster piece token-major
    assert {row["REVERSE"] for row in scans} == {False, True}
    assert {row["U_TOKENS"] for row in scans} == {False, True}
    assert {(row["BLOCK_N"], row["ALIGN"]) for row in scans} == {(16, 8), (16, 4), (16, 1), (1, 8), (1, 4), (1, 1)}


def test_no_spills_shared_memory_and_occupancy(rows):
    for row in rows:
        where = f"{row['label']} {row['target']}: {row}"
        assert row["registers"] > 0, where
        assert row["local_bytes"] == 0, "local-memory spills in " + where
        assert row["shared_bytes"] <= row["shared_limit"], "shared memory over the SM limit in " + where
        assert row["warps_per_sm"] >= 16, "register-limited occupancy under 25 % in " + where


def test_occupancy_rule():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from kernel_analysis import warps_by_registers
    assert warps_by_registers(128, 16) == 16       # 128 x 32 = 4096 per warp: 16 warps fill 65,536
    assert warps_by_registers(129, 16) == 0        # rounded up to 4352 per warp: a 16-warp block no longer fits
    assert warps_by_registers(129, 4) == 12        # 15 warps fit, whole 4-warp blocks: 12
    assert warps_by_registers(32, 4) == 64         # capped at 64 resident warps
