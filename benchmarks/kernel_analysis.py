"""GPU-side properties of the Triton kernels, derived on a CPU: launch configurations at the models' shapes,
ahead-of-time compilation for sm_80 / sm_90 (registers, spills, shared memory, occupancy) and a coalescing
simulation in Triton's interpreter (32-byte sectors touched per memory instruction).

Used by tests/test_kernel_resources.py, tests/test_kernel_traffic.py and benchmarks/kernel_report.py.
Nothing here needs a GPU; nothing here measures time.

- the launches themselves (scan, sampling, merge, at every stage) are built in benchmarks/kernel_launches.py;
  `distinct_launches` keeps one per compiled kernel (or one per variant: the CI subset). `specialize` turns a
  launch into the signature, constexprs and attributes that Triton's JIT
  would compile for it (triton.runtime.jit's own specialisation rule), and `compile_launch` compiles that for
  a GPUTarget and reads the cubin's resource usage with the cuobjdump shipped in Triton's wheel.
- `warps_by_registers`: NVIDIA's occupancy-calculator rule for compute capability 8.x / 9.x: registers are
  allocated per warp in units of 256 (regs/thread x 32 rounded up to a multiple of 256), 65,536 per SM, whole
  blocks only, at most 64 resident warps; register-limited occupancy = that warp count / 64.
- `TrafficCounter` (interpreter only): while active, every tl.load / tl.store records its masked-in elements,
  their bytes and the distinct 32-byte sectors of its addresses (no reuse between instructions is assumed).
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import subprocess
import tempfile
from typing import Dict, List, NamedTuple, Tuple

import torch

from kernel_launches import MODELS, StageShape, merge_launches, model_launches, sampling_launches, scan_inputs

SM_LIMITS = {80: dict(shared=163 * 1024), 90: dict(shared=227 * 1024)}  # usable shared memory per block
REGS_PER_SM, MAX_WARPS_PER_SM, REG_UNIT = 65536, 64, 256


def specialize(launch) -> Tuple[object, Dict[str, str], Dict[Tuple[int], object], Dict, Dict[str, int]]:
    """(jit function, signature, constexprs, attrs, options) as triton's JIT would compile `launch`."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    fn = launch.kernel
    bound = dict(zip(fn.arg_names, launch.args))
    bound.update({k: v for k, v in launch.meta.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    options = {k: v for k, v in launch.meta.items() if k not in fn.arg_names}
    return fn, signature, constexprs, attrs, options


def compile_key(launch) -> str:
    """What decides the compiled code: two launches with one key share one binary."""
    fn, signature, constexprs, attrs, options = specialize(launch)
    return repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.items())))


class Resources(NamedTuple):
    registers: int
    local_bytes: int     # per thread: register spills (and any local arrays)
    shared_bytes: int
    num_warps: int


def compile_launch(launch, capability: int) -> Resources:
    """Compile `launch` ahead of time for sm_`capability` (needs TRITON_INTERPRET unset when triton was imported)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, signature, constexprs, attrs, options = specialize(launch)
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line for item in line.split()
                  if ":" in item)
    return Resources(int(fields["REG"]), int(fields["LOCAL"]) + int(fields["STACK"]), int(kernel.metadata.shared),
                     options.get("num_warps", 4))


def warps_by_registers(registers: int, num_warps: int) -> int:
    """Resident warps per SM allowed by the register file (see the module docstring for the rule)."""
    per_warp = math.ceil(registers * 32 / REG_UNIT) * REG_UNIT
    blocks = (REGS_PER_SM // per_warp) // num_warps
    return min(blocks * num_warps, MAX_WARPS_PER_SM // num_warps * num_warps)


class TrafficCounter:
    """Per kernel name: memory instructions, bytes and distinct 32-byte sectors of interpreted tl.load/store,
    and programs launched. Use as a context manager around interpreted launches."""

    def __init__(self) -> None:
        self.stats: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def _record(self, kernel: str, ptrs, mask) -> None:
        import numpy as np
        addr = np.asarray(ptrs.data).reshape(-1)
        keep = np.broadcast_to(np.asarray(mask.data).astype(bool), np.asarray(ptrs.data).shape).reshape(-1)
        if keep.any():
            item = ptrs.get_element_ty().primitive_bitwidth // 8
            s = self.stats[kernel]
            s["instructions"] += 1
            s["bytes"] += int(keep.sum()) * item
            s["sectors"] += int(np.unique(addr[keep].astype(np.int64) // 32).size)

    def __enter__(self) -> "TrafficCounter":
        from triton.runtime import interpreter
        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        self._saved = (builder.create_masked_load, builder.create_masked_store, executor.__call__)
        load, store, call = self._saved
        counter, current = self, []

        def counted_load(b, ptrs, mask, other, *a, **k):
            counter._record(current[-1], ptrs, mask)
            return load(b, ptrs, mask, other, *a, **k)

        def counted_store(b, ptrs, value, mask, *a, **k):
            counter._record(current[-1], ptrs, mask)
            return store(b, ptrs, value, mask, *a, **k)

        def counted_call(ex, *args, **kwargs):
            grid = ex.grid(args) if callable(ex.grid) else ex.grid
            counter.stats[ex.fn.__name__]["programs"] += math.prod(int(x) for x in grid)
            current.append(ex.fn.__name__)
            try:
                return call(ex, *args, **kwargs)
            finally:
                current.pop()

        builder.create_masked_load, builder.create_masked_store, executor.__call__ = (counted_load, counted_store,
                                                                                      counted_call)
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime import interpreter
        (interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store,
         interpreter.GridExecutor.__call__) = self._saved


class Traffic(NamedTuple):
    ratio: float                 # bytes of the sectors touched / essential bytes
    instructions_per_step: float  # memory instructions per program per time step
    sectors: int
    essential_bytes: int
    programs: int


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def scan_traffic(batch: int, groups: int, channels: int, nstate: int, length: int, dtype=torch.float16,
                 forward=None, backward=None, seed: int = 0, token_major_u: bool = False) -> Dict[str, Traffic]:
    """Run one scan forward and backward in the interpreter on CPU tensors laid out as the mixers pass them
    and count its memory traffic. Essential bytes: every input read once and every output written once
    (forward: u, delta, A, B, C, D, delta_bias -> y; backward: those and dy -> the seven gradients); the
    saved chunk states count as overhead. `forward` / `backward` (called with u as a one-piece list) default to
    the Triton host of this repo; token_major_u lays u out channels first in memory (the DSSM's raster piece)."""
    from models.ops.scan import triton as host
    forward, backward = forward or host.scan_forward, backward or host.scan_backward
    gen = torch.Generator().manual_seed(seed)
    shape = StageShape("traffic", 0, groups, channels, nstate, 2, length)
    args = [t.normal_(generator=gen) for t in scan_inputs(shape, batch, dtype, device="cpu")]
    args[2] = -args[2].abs()  # A < 0
    result = {}
    u = args[0].transpose(1, 2).contiguous().transpose(1, 2) if token_major_u else args[0]
    call = ([u], *args[1:])  # u in one piece
    with TrafficCounter() as counter:
        y, saved = forward(*call, True)
    (fwd_name, fwd_stats), = counter.stats.items()
    dy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    with TrafficCounter() as bwd_counter:
        grads = backward(*call, True, dy, saved)
    essential_in = _nbytes(*args)
    for name, stats, essential in ((fwd_name, fwd_stats, essential_in + _nbytes(y)),
                                   *((k, v, essential_in + _nbytes(dy, *grads)) for k, v in bwd_counter.stats.items())):
        result[name] = Traffic(32 * stats["sectors"] / essential, stats["instructions"] / stats["programs"] / length,
                               stats["sectors"], essential, stats["programs"])
    return result


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def distinct_launches(models=MODELS, one_dtype_per_variant: bool = False) -> List[Tuple[List[str], object]]:
    """([labels], launch) for every distinct compiled kernel the models launch at batch 128, 224 px (scan, sampling
    and merge kernels); the labels name every (kernel, model, stage, dtype) that compiles to it.

    one_dtype_per_variant: one launch per variant instead of one per dtype too, the dtypes taken in turn (fp16,
    bf16, fp32, ...) so that each is compiled: the CI subset. A scan variant is (kernel and direction, N == 1,
    ALIGN, token-major u); a sampling or merge kernel (and each of the deformable backward's two launches) is
    one variant."""
    chosen: Dict[str, Tuple[List[str], object]] = {}
    variants: Dict[Tuple, Dict[str, Tuple[List[str], object]]] = {}
    scans = ((shape, dtype, launch.kernel.__name__ + ("(reversed)" if launch.meta.get("REVERSE") else ""), launch)
             for shape, dtype, _, launch in model_launches(models))
    for shape, dtype, name, launch in itertools.chain(scans, sampling_launches(models), merge_launches(models)):
        label = f"{name} {shape.model} stage {shape.stage} {DTYPE_NAMES[dtype]}"
        chosen.setdefault(compile_key(launch), ([], launch))[0].append(label)
        variant = ((name, launch.meta["BLOCK_N"] == 1, launch.meta["ALIGN"], launch.meta["U_TOKENS"])
                   if "ALIGN" in launch.meta else (name,))
        variants.setdefault(variant, {}).setdefault(DTYPE_NAMES[dtype], ([label], launch))
    if not one_dtype_per_variant:
        return list(chosen.values())
    names = list(DTYPE_NAMES.values())
    return [by_dtype.get(names[i % len(names)], next(iter(by_dtype.values())))
            for i, by_dtype in enumerate(variants.values())]


_JOBS: List[Tuple[List[str], object, int]] = []  # inherited by the forked workers, which receive indices


def _compile_row(index: int) -> dict:
    labels, launch, capability = _JOBS[index]
    r = compile_launch(launch, capability)
    return dict(label=labels[0], labels=labels, target=f"sm_{capability}", registers=r.registers, local_bytes=r.local_bytes,
                shared_bytes=r.shared_bytes, num_warps=r.num_warps,
                warps_per_sm=warps_by_registers(r.registers, r.num_warps),
                shared_limit=SM_LIMITS[capability]["shared"],
                **{k: v for k, v in launch.meta.items()
                   if k in ("BLOCK_C", "BLOCK_D", "BLOCK_L", "BLOCK_N", "CHUNK", "ALIGN", "REVERSE",
                            "U_TOKENS")})


def resource_rows(launches: List[Tuple[List[str], object]], capabilities=(80, 90), workers: int = 2
                  ) -> List[dict]:
    """Compile every launch for every target (in `workers` forked processes) and report its resources."""
    import multiprocessing
    _JOBS[:] = [(labels, launch, cc) for labels, launch in launches for cc in capabilities]
    if workers <= 1:
        return [_compile_row(i) for i in range(len(_JOBS))]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_compile_row, range(len(_JOBS)), chunksize=1)


if __name__ == "__main__":
    # python benchmarks/kernel_analysis.py [--subset]  (TRITON_INTERPRET unset): one JSON row per kernel x target
    import json
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for row in resource_rows(distinct_launches(one_dtype_per_variant="--subset" in sys.argv)):
        print(json.dumps(row), flush=True)
