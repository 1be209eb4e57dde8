"""The families for MMDetection 3.x / MMSegmentation 1.x: `import dense` (the configs' `custom_imports`) registers
`DefMambaBackbone`, `VMambaBackbone` and `MambaAdaptorBackbone` in both MODELS registries, after giving mmcv-lite
the ops it lacks (see dense/ops.py).

Needs the dense extras (requirements-dense.txt); the `models` package itself never imports mm* packages.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `models` lives next to this package
    sys.path.insert(0, _REPO)

_missing = [name for name in ("mmengine", "mmcv") if importlib.util.find_spec(name) is None]
if _missing:
    raise ModuleNotFoundError(f"dense needs {', '.join(_missing)}: pip install -r requirements-dense.txt")

from . import ops  # noqa: E402

ops.install()  # before anything imports mmcv.ops

from .backbone import DefMambaBackbone, MambaAdaptorBackbone, VMambaBackbone, registered_in  # noqa: E402

__all__ = ["DefMambaBackbone", "VMambaBackbone", "MambaAdaptorBackbone", "registered_in", "ops"]
