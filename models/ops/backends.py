"""Backend switch for the operations that have several implementations (selective scan, deformable sequence).

Each operation reads its choice from a Python-level override (`set_backend` / `use_backend`) or, when none
is set, from an environment variable (`DEFMAMBA_SCAN_BACKEND`, `DEFMAMBA_DEFORM_BACKEND`):

    auto    the fastest implementation that can run on the tensors at hand (the default)
    cuda    the compiled CUDA extension (scan only)
    triton  the Triton kernels; with TRITON_INTERPRET=1 set before triton is imported they also run CPU tensors
    torch   the pure-PyTorch reference, which is also the readable specification

A forced backend that cannot run raises `BackendUnavailable` with a one-line reason; there is no silent
fallback. Which implementation `auto` picks is decided by each operation's front end.
"""
from __future__ import annotations

import contextlib
import enum
import os
from typing import Dict, Iterator, Optional, Union

__all__ = ["Backend", "BackendUnavailable", "OPERATIONS", "get_backend", "set_backend", "use_backend",
           "triton_interpreting"]


class Backend(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    TRITON = "triton"
    TORCH = "torch"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here (message: one line naming what is missing)."""


# operation -> environment variable that selects its backend
OPERATIONS: Dict[str, str] = {"scan": "DEFMAMBA_SCAN_BACKEND", "deform": "DEFMAMBA_DEFORM_BACKEND"}

_overrides: Dict[str, Optional[Backend]] = {op: None for op in OPERATIONS}


def _check_op(op: str) -> None:
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; expected one of {sorted(OPERATIONS)}")


def _parse(value: Union[str, Backend], source: str) -> Backend:
    try:
        return Backend(value.lower() if isinstance(value, str) else value)
    except ValueError:
        choices = " | ".join(b.value for b in Backend)
        raise ValueError(f"{source}={value!r} is not a backend; expected {choices}") from None


def get_backend(op: str) -> Backend:
    """The backend requested for `op` ("scan" or "deform"): the Python override, else the environment."""
    _check_op(op)
    override = _overrides[op]
    if override is not None:
        return override
    env = OPERATIONS[op]
    value = os.environ.get(env, "").strip()
    return _parse(value, env) if value else Backend.AUTO


def set_backend(op: str, backend: Optional[Union[str, Backend]]) -> None:
    """Force `op` to `backend` for this process (None: back to the environment variable / auto)."""
    _check_op(op)
    _overrides[op] = None if backend is None else _parse(backend, f"set_backend({op!r})")


@contextlib.contextmanager
def use_backend(op: str, backend: Optional[Union[str, Backend]]) -> Iterator[None]:
    """Context manager form of `set_backend`, restoring the previous override on exit."""
    _check_op(op)
    previous = _overrides[op]
    set_backend(op, backend)
    try:
        yield
    finally:
        _overrides[op] = previous


def triton_interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1), so CPU tensors can use its kernels."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
