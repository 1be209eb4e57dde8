"""Mixed precision: which autocast dtype a run uses, and the optimizer step with grad scaling + clipping."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

__all__ = ["AmpPolicy", "AmpUnsupported", "resolve_amp", "GradStepper"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class AmpUnsupported(ValueError):
    """The requested AMP dtype cannot run on this device (one-line message)."""


@dataclass(frozen=True)
class AmpPolicy:
    """Autocast settings of a run; `enabled=False` means plain fp32."""

    enabled: bool
    dtype: torch.dtype
    device_type: str

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and does not."""
        return self.enabled and self.dtype == torch.float16

    @property
    def label(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype] if self.enabled else "fp32"


def resolve_amp(enable: bool, dtype_name: str, device: torch.device) -> Tuple[AmpPolicy, Optional[str]]:
    """The policy for AMP_ENABLE / AMP_DTYPE on `device`, plus a note to log when the request was changed.

    On CPU fp16 autocast is slow and unscaled, so fp16 falls back to fp32 there; bf16 is honoured.
    """
    dtype = _DTYPES[dtype_name]
    if not enable:
        return AmpPolicy(False, dtype, device.type), None
    if device.type == "cpu" and dtype == torch.float16:
        return (AmpPolicy(False, dtype, device.type),
                "AMP disabled on CPU (fp16 autocast is for GPUs); use --amp-dtype bf16 for bf16 on CPU")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise AmpUnsupported(f"{torch.cuda.get_device_name(device)} does not support bf16; "
                             "use --amp-dtype fp16 or --disable_amp")
    return AmpPolicy(True, dtype, device.type), None


class GradStepper:
    """backward, then per optimizer update: unscale + clip (`clip`), and the step + scaler update (`apply`).

    The grad norm is measured before clipping; CLIP_GRAD 0 measures without clipping.
    """

    def __init__(self, policy: AmpPolicy, clip_grad: float) -> None:
        self.scaler = torch.amp.GradScaler(policy.device_type, enabled=policy.needs_scaler)
        self.clip_grad = clip_grad

    @property
    def skips_overflow(self) -> bool:
        """True when a non-finite grad norm is an fp16 overflow that `apply` skips (and lowers the scale)."""
        return self.scaler.is_enabled()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip(self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter]) -> torch.Tensor:
        """Unscale and clip; the pre-clip total norm stays a device tensor (reading it would wait for the GPU)."""
        self.scaler.unscale_(optimizer)
        max_norm = self.clip_grad if self.clip_grad > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        # under fp16 the scaler reads its inf/NaN flag here: the one host sync of an update
        self.scaler.step(optimizer)
        self.scaler.update()

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (a host read: log steps only); 1 without a scaler."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)
