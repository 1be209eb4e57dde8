"""Helpers shared by the benchmark scripts: timing, backend probing, environment description, JSON output.

The scripts import this file as `benchmark_common` (a script's own folder is first on sys.path); it puts
the repo root on sys.path, so they run from a fresh checkout without installing anything.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.ops.backends import Backend  # noqa: E402


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit with `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def benchmark_device(name: str) -> torch.device:
    """The device of a benchmark run; a CUDA device without CUDA stops with one line."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("CUDA is not available: this benchmark needs a GPU (--device cpu for a smoke run)")
    return device


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, for reports that must stay one line per failure."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times_ms(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> List[float]:
    """Wall time of each of `repeats` calls of `fn` after `warmup` calls, in ms.

    CUDA calls are timed with events around each call (no host synchronisation inside the timed region
    beyond what `fn` itself does); CPU calls with perf_counter.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> float:
    return statistics.median(step_times_ms(fn, warmup, repeats, device))


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured copy bandwidth in bytes/s, read + write counted (the bar the scan kernels are held to)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 3, 10, device)
    return 2 * nbytes / (ms * 1e-3)


def parse_backends(text: str, allowed: List[str]) -> List[Backend]:
    """'all' or a comma list of backend names (validated against `allowed`) -> Backend values."""
    names = allowed if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"unknown backend {', '.join(bad) or repr(text)}; expected all or a comma list of "
                         f"{', '.join(allowed)}")
    return [Backend(n) for n in names]


def environment(device: torch.device) -> Dict[str, Any]:
    """What every result must name: device, torch / CUDA / Triton versions, scan extension state."""
    from models.ops.scan import cuda_extension_available

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "scan_cuda_extension": cuda_extension_available(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    """Write `payload` atomically (temp file + rename) so a killed run never leaves half a file."""
    if not path:
        return
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, out)
