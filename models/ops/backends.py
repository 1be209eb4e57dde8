"""The one backend switch of every operation that has several implementations.

Three switches, each read from a Python-level override (`set_backend` / `use_backend`) or, when none is set,
from an environment variable:

    scan      DEFMAMBA_SCAN_BACKEND     the selective scan (ops/scan)
    deform    DEFMAMBA_DEFORM_BACKEND   the deformable sequence (ops/deform) and DAMamba's adaptive sampling
                                        (ops/adaptive): the bilinear sampling ops
    merge     DEFMAMBA_MERGE_BACKEND    the DSSM's branch merge after the scan (ops/merge)

with the values

    auto    the fastest implementation that runs on the tensors at hand (the default): on CUDA tensors the
            first available accelerated backend in the operation's order of preference, else torch
    cuda    the compiled CUDA extension (the scan only)
    triton  the Triton kernels; with TRITON_INTERPRET=1 set before triton is imported they also run CPU tensors
    torch   the pure-PyTorch reference, which is also the readable specification

Every operation registers its implementations here (`register_operation`) and asks `resolve` which one runs.
A forced backend that the operation lacks or that cannot run raises `BackendUnavailable` with a one-line
reason; there is no silent fallback. The first use of each choice is logged through the `defmamba.ops` logger,
a child of the trainer's logger, so a training log names the backends it ran.
"""
from __future__ import annotations

import contextlib
import enum
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Set, Tuple, Union

import torch

__all__ = ["Backend", "BackendUnavailable", "SWITCHES", "get_backend", "set_backend", "use_backend", "resolve",
           "register_operation", "triton_interpreting", "triton_check"]


class Backend(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    TRITON = "triton"
    TORCH = "torch"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here (message: one line naming what is missing)."""


# switch -> environment variable that selects its backend
SWITCHES: Dict[str, str] = {"scan": "DEFMAMBA_SCAN_BACKEND", "deform": "DEFMAMBA_DEFORM_BACKEND",
                            "merge": "DEFMAMBA_MERGE_BACKEND"}

_overrides: Dict[str, Optional[Backend]] = {switch: None for switch in SWITCHES}

# why a backend cannot run on tensors of a device type (None when it can)
Check = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class _Operation:
    name: str                           # in messages, e.g. "selective scan"
    switch: str                         # key of SWITCHES
    accelerated: Tuple[Tuple[Backend, Check], ...]  # in auto's order of preference; torch always runs
    slow_hint: str                      # logged when auto runs CUDA tensors on the torch reference


_operations: Dict[str, _Operation] = {}
_announced: Set[Tuple[str, Backend, Backend, str]] = set()
_logger = logging.getLogger("defmamba.ops")


def _check_switch(switch: str) -> None:
    if switch not in SWITCHES:
        raise ValueError(f"unknown backend switch {switch!r}; expected one of {sorted(SWITCHES)}")


def _parse(value: Union[str, Backend], source: str) -> Backend:
    try:
        return Backend(value.lower() if isinstance(value, str) else value)
    except ValueError:
        choices = " | ".join(b.value for b in Backend)
        raise ValueError(f"{source}={value!r} is not a backend; expected {choices}") from None


def get_backend(switch: str) -> Backend:
    """The backend requested on `switch` (a key of SWITCHES): the Python override, else the environment."""
    _check_switch(switch)
    override = _overrides[switch]
    if override is not None:
        return override
    env = SWITCHES[switch]
    value = os.environ.get(env, "").strip()
    return _parse(value, env) if value else Backend.AUTO


def set_backend(switch: str, backend: Optional[Union[str, Backend]]) -> None:
    """Force `switch` to `backend` for this process (None: back to the environment variable / auto)."""
    _check_switch(switch)
    _overrides[switch] = None if backend is None else _parse(backend, f"set_backend({switch!r})")


@contextlib.contextmanager
def use_backend(switch: str, backend: Optional[Union[str, Backend]]) -> Iterator[None]:
    """Context manager form of `set_backend`, restoring the previous override on exit."""
    _check_switch(switch)
    previous = _overrides[switch]
    set_backend(switch, backend)
    try:
        yield
    finally:
        _overrides[switch] = previous


def triton_interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1), so CPU tensors can use its kernels."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_check(kernels: str) -> Check:
    """The check of a Triton backend whose @triton.jit kernels are defined in module `kernels`."""
    def check(device_type: str) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install triton)"
        if device_type not in ("cuda", "cpu"):
            return f"Triton kernels need CUDA tensors, got {device_type}"
        # checked before the import: kernels defined without the interpreter stay GPU kernels for good
        if device_type == "cpu" and not triton_interpreting():
            return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
        try:
            module = importlib.import_module(kernels)
        except Exception as err:  # ImportError, or a broken Triton install
            return f"{kernels} does not import ({type(err).__name__}: {err})".splitlines()[0]
        if device_type == "cuda":
            return None
        from triton.runtime.interpreter import InterpretedFunction
        # the kind of kernel was fixed when the module was first imported
        if not any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
            return f"TRITON_INTERPRET=1 was set after the kernels of {kernels} were compiled for the GPU"
        return None
    return check


def register_operation(name: str, switch: str, accelerated: Tuple[Tuple[Backend, Check], ...],
                       slow_hint: str = "") -> None:
    """Declare operation `name`, read from `switch`, with its non-torch backends in auto's order of preference.

    Each backend comes with a check: device type -> None when it can run there, else the one-line reason.
    """
    _check_switch(switch)
    _operations[name] = _Operation(name, switch, tuple(accelerated), slow_hint)


def resolve(name: str, device_type: str) -> Backend:
    """The backend that runs operation `name` on `device_type` tensors now; BackendUnavailable if a forced one
    cannot. The first use of each choice is logged (under torch.compile: once, while tracing)."""
    return Backend(_resolve(name, device_type))


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing (it logs) and keeps the result
def _resolve(name: str, device_type: str) -> str:
    op = _operations[name]
    requested = get_backend(op.switch)
    checks = dict(op.accelerated)
    if requested is Backend.AUTO:
        chosen = Backend.TORCH
        if device_type == "cuda":  # auto never picks the interpreter: CPU tensors run the reference
            chosen = next((b for b, check in op.accelerated if check(device_type) is None), Backend.TORCH)
    elif requested is Backend.TORCH:
        chosen = requested
    elif requested not in checks:
        have = ", ".join(["auto", "torch"] + [b.value for b, _ in op.accelerated])
        raise BackendUnavailable(f"{SWITCHES[op.switch]}={requested.value}: the {name} has no {requested.value} "
                                 f"backend (it has {have})")
    else:
        reason = checks[requested](device_type)
        if reason is not None:
            raise BackendUnavailable(f"{SWITCHES[op.switch]}={requested.value}: the {name} cannot run on "
                                     f"{device_type} tensors: {reason}")
        chosen = requested
    key = (name, requested, chosen, device_type)
    if key not in _announced:
        _announced.add(key)
        slow = chosen is Backend.TORCH and device_type == "cuda" and requested is Backend.AUTO
        _logger.log(logging.WARNING if slow and op.slow_hint else logging.INFO,
                    "%s on %s tensors: backend %s (requested %s)%s", name, device_type, chosen.value,
                    requested.value, f" (slow on a GPU: {op.slow_hint})" if slow and op.slow_hint else "")
    return chosen.value
