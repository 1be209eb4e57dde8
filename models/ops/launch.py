"""A kernel launch built but not run, shared by the Triton hosts of every operation: the hosts' `plan_*` functions
return them, so the launches the models make can be compiled ahead of time without a GPU
(benchmarks/kernel_analysis.py)."""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Tuple

__all__ = ["Launch"]


class Launch(NamedTuple):
    """One kernel launch, built but not run: `launch()` runs it."""
    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    meta: Dict[str, Any]

    def launch(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
