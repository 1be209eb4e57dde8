"""Memory traffic of the Triton scan kernels, simulated in Triton's interpreter (benchmarks/kernel_analysis.py):
the distinct 32-byte sectors every tl.load / tl.store touches (no reuse between instructions), against the
essential bytes (inputs read once, outputs written once), and the memory instructions per program per step.

Targets of issue #17 (fp16, L = 1024): forward <= 2x essential bytes and <= 0.5 instructions per program and
step, backward <= 2x and <= 1.0, for N = 16 (DefMamba) and N = 1 (DAMamba). One (batch, group) of 16
channels: one channel block, the models' block size.
"""
import sys
from pathlib import Path

import pytest

from scan_reference import TRITON_DEVICE

if TRITON_DEVICE != "cpu":
    pytest.skip("the traffic simulation needs Triton's interpreter", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernel_analysis import scan_traffic  # noqa: E402

LIMITS = {"scan_fwd_kernel": (2.0, 0.5), "scan_bwd_kernel": (2.0, 1.0)}


@pytest.mark.parametrize("nstate,token_major_u", [(16, False), (1, False), (16, True)])
def test_scan_traffic_targets(nstate, token_major_u):
    """Also with u token-major (the DSSM's channels-last raster piece, read as it lies along the channels)."""
    traffic = scan_traffic(batch=1, groups=1, channels=16, nstate=nstate, length=1024, token_major_u=token_major_u)
    assert set(traffic) == set(LIMITS), traffic
    for name, (max_ratio, max_instructions) in LIMITS.items():
        t = traffic[name]
        assert 1.0 <= t.ratio <= max_ratio, f"{name} N={nstate}: {t}"
        assert t.instructions_per_step <= max_instructions, f"{name} N={nstate}: {t}"


def test_strided_loads_are_counted_as_such():
    """The counter is not blind: a (16 channels x 1 step) load at stride L touches 16 sectors for 32 bytes."""
    import torch
    import triton
    import triton.language as tl
    from kernel_analysis import TrafficCounter

    @triton.jit
    def column(x_ptr, out_ptr, L):
        rows = tl.arange(0, 16)
        tl.store(out_ptr + rows, tl.load(x_ptr + rows * L))

    x, out = torch.zeros(16, 1024, dtype=torch.float16), torch.empty(16, dtype=torch.float16)
    with TrafficCounter() as counter:
        column[(1,)](x, out, 1024)
    stats = counter.stats["column"]
    assert (stats["instructions"], stats["bytes"], stats["sectors"], stats["programs"]) == (2, 64, 17, 1)
