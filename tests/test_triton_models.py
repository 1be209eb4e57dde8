"""Whole tiny models with every operation on its Triton backend at once (scan, deformable sequence or adaptive
sampling, branch merge) against every operation on its PyTorch reference: logits and every parameter gradient,
in float64 (the Triton kernels accumulate in fp64 for fp64 callers), on TRITON_DEVICE (Triton's interpreter
on CPU tensors here, compiled on a GPU)."""
from typing import Dict, Tuple

import pytest
import torch

from models.damamba import DAMamba
from models.defmamba import DefMamba
from models.ops.backends import use_backend
from scan_reference import TRITON_DEVICE

pytestmark = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton kernels cannot run here")

SWITCHES = ("scan", "deform", "merge")


def run(model: torch.nn.Module, images: torch.Tensor, backend: str) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Logits and parameter gradients of a weighted sum of the logits, every switch on `backend`."""
    with use_backend(SWITCHES[0], backend), use_backend(SWITCHES[1], backend), use_backend(SWITCHES[2], backend):
        model.zero_grad()
        logits = model(images)
        weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype, device=logits.device)
        (logits * weights.view_as(logits)).sum().backward()
    return logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model: torch.nn.Module, images: torch.Tensor) -> None:
    want_logits, want = run(model, images, "torch")
    got_logits, got = run(model, images, "triton")
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-9, atol=1e-11)
    assert got.keys() == want.keys() and len(want) == sum(1 for _ in model.parameters())
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_tiny_defmamba_all_triton_equals_all_torch():
    torch.manual_seed(0)
    model = DefMamba(num_classes=4, embed_dim=8, depths=(1, 1, 1, 1), offset_kernels=(3, 3, 3, 3),
                     drop_path_rate=0.0).double().to(TRITON_DEVICE)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_same(model, images.to(TRITON_DEVICE))


def test_tiny_damamba_all_triton_equals_all_torch():
    torch.manual_seed(0)
    model = DAMamba(num_classes=4, dims=(16, 32), depths=(1, 1), mlp_ratios=(2, 2), drop_path_rate=0.0).double()
    with torch.no_grad():  # offsets of a few pixels, as a trained offset network makes
        for stage in model.stages:
            stage.blocks[0].token_mixer.da_scan.offset.bias.normal_(0.0, 2.0)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_same(model.to(TRITON_DEVICE), images.to(TRITON_DEVICE))
