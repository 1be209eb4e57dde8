"""Accumulation precision of the hand-written operations: fp32, or fp64 when the caller works in fp64.

fp64 is kept (rather than rounded to fp32) so the operations can be checked against float64 references.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "to_accumulation"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_accumulation(t: Tensor) -> Tensor:
    return t.to(accumulation_dtype(t.dtype))
