"""Strict loading of DefMamba weights, official release format included.

Accepted files: a dict with a "model" entry (and optionally "model_ema"), as written by the release's and
this project's trainers, or a bare state_dict. Every missing or unexpected key is an error.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "read_checkpoint", "read_state_dict", "state_dict_of", "check_state_dict",
           "load_pretrained"]

# The release pickles its yacs config node into checkpoints; allowlisted (process-wide) as a plain
# OrderedDict so weights_only loading accepts those files without running any yacs code.
torch.serialization.add_safe_globals([(OrderedDict, "yacs.config.CfgNode")])

# prefixes added by DistributedDataParallel / torch.compile wrappers around the saved module
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model (message is one line)."""


def _strip_wrappers(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _why_unreadable(err: Exception) -> str:
    # torch's own message advises weights_only=False, which is wrong for a corrupt or foreign file and
    # unsafe for an untrusted one: name the problem instead.
    foreign = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if foreign:
        return (f"not a readable PyTorch checkpoint: it stores a Python object ({foreign.group(1)}) that is "
                "never unpickled here; only tensors and plain containers are read")
    return "not a readable PyTorch checkpoint (truncated, corrupt or another kind of file)"


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The dict stored in `path`, loaded with torch.load(weights_only=True); CheckpointError otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, text, ...: torch raises many types
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(err)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def read_state_dict(path: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, Tensor]:
    """The model (or EMA) state dict stored in `path` (a checkpoint dict or a bare state dict)."""
    return state_dict_of(read_checkpoint(path), path, use_ema)


def state_dict_of(obj: Dict[str, Any], path: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, Tensor]:
    """The model (or EMA) state dict in `obj`, a checkpoint dict or bare state dict already read from `path`."""
    key = "model_ema" if use_ema else "model"
    if key in obj:
        obj = obj[key]
    elif use_ema or "model" in obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} has no '{key}' entry (entries: {', '.join(map(str, obj))})")
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: entry '{key}' is not a state dict")
    return _strip_wrappers(obj)


def _summarise(keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state: Dict[str, Tensor], path: str,
                     optional_missing: Callable[[str], bool] = lambda key: False) -> List[str]:
    """The model keys absent from `state` that `optional_missing` allows; CheckpointError naming every other
    missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    absent = [k for k in own if k not in state]
    allowed = [k for k in absent if optional_missing(k)]
    missing = [k for k in absent if not optional_missing(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_summarise(shapes, 3)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: " + "; ".join(problems))
    return allowed


def load_pretrained(model: nn.Module, path: str, use_ema: bool = False,
                    checkpoint: Optional[Dict[str, Any]] = None) -> None:
    """Load `path` into `model` strictly; raises CheckpointError naming missing/unexpected/mis-shaped keys.

    `checkpoint`: the dict already read from `path` (read_checkpoint), so the file is not read again."""
    state = state_dict_of(read_checkpoint(path) if checkpoint is None else checkpoint, path, use_ema)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
