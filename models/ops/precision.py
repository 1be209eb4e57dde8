"""Accumulation precision of the hand-written operations: fp32, or fp64 when the caller works in fp64.

fp64 is kept (rather than rounded to fp32) so the operations can be checked against float64 references.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "common_accumulation_dtype", "to_accumulation"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def common_accumulation_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """fp64 when any given tensor is fp64 (as type promotion makes a mixed computation), else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def to_accumulation(t: Tensor) -> Tensor:
    return t.to(accumulation_dtype(t.dtype))
