"""DAMamba's adaptive sampling on the Triton backend, on TRITON_DEVICE (CPU tensors in Triton's interpreter
without a GPU: conftest.py sets TRITON_INTERPRET=1 before triton is imported; compiled on a GPU), against an
independent reference on the CPU: F.grid_sample with align_corners=False, one call per channel group,
differentiated by autograd in float64 (the release's formulation, tests/sampling_reference.py; the torch
backend is checked against the same in tests/test_damamba.py).
"""
import pytest
import torch
from torch.autograd import gradcheck

from models.damamba import DAMamba
from models.ops.adaptive import adaptive_sample
from models.ops.backends import BackendUnavailable, use_backend
from sampling_reference import grid_sample_reference
from scan_reference import TRITON_DEVICE


def make_inputs(batch, channels, height, width, groups, dtype=torch.float64, spread=2.5, seed=0,
                channels_last=False, device=TRITON_DEVICE):
    """Features and pixel offsets of spread `spread` (many points partly or wholly outside the map), drawn on
    the CPU and placed on `device`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    offsets = (torch.randn(batch, height, width, 2 * groups, generator=gen, dtype=torch.float64) * spread).to(dtype)
    # the offset gradient jumps at integer pixel coordinates, which fp16 / bf16 offsets hit exactly; the
    # reference's normalise-unnormalise round trip may land on either side: keep the points off them
    frac = offsets.double().frac().abs()
    offsets = torch.where((frac < 0.02) | (frac > 0.98), offsets.double() + 0.25, offsets.double()).to(device, dtype)
    return x.requires_grad_(), offsets.requires_grad_()


def wholly_outside(offsets: torch.Tensor) -> torch.Tensor:
    """Points whose four neighbours all lie outside the map (pixel coordinates outside (-1, H) x (-1, W))."""
    _, height, width, _ = offsets.shape
    y = torch.arange(height, device=offsets.device).view(-1, 1, 1) + offsets[..., 1::2]
    x = torch.arange(width, device=offsets.device).view(1, -1, 1) + offsets[..., 0::2]
    return (y <= -1) | (y >= height) | (x <= -1) | (x >= width)


def reference_and_triton(x, offsets, seed=1):
    """(out, dx, doffsets) of the float64 grid_sample reference on CPU copies and of the Triton backend where
    x and offsets are, same upstream grad; both on the CPU."""
    wide = [t.detach().cpu().double().requires_grad_() for t in (x, offsets)]
    ref = grid_sample_reference(*wide)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = (ref.detach(),) + torch.autograd.grad(ref, wide, grad)
    with use_backend("deform", "triton"):
        out = adaptive_sample(x, offsets)
        actual = (out,) + torch.autograd.grad(out, (x, offsets), grad.to(out.device, out.dtype))
    return expected, tuple(t.cpu() for t in actual)


SHAPES = {  # batch, channels, height, width, groups
    "5x7-g2": (2, 32, 5, 7, 2),
    "one-row": (2, 16, 1, 4, 2),
    "one-column": (1, 16, 3, 1, 1),
    "one-pixel": (2, 8, 1, 1, 2),
    "9x9-several-tiles-and-chunks": (1, 40, 9, 9, 2),  # 81 pixels > 64 per program, 20 channels per group
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_float64_values_and_gradients_match_grid_sample(shape, channels_last):
    x, offsets = make_inputs(*SHAPES[shape], channels_last=channels_last)
    assert wholly_outside(offsets).any()
    expected, actual = reference_and_triton(x, offsets)
    for name, want, got in zip(("out", "dx", "doffsets"), expected, actual):
        assert got.dtype == torch.float64 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{shape} {name}: {m}")


def test_float64_gradcheck():
    x, offsets = make_inputs(1, 4, 3, 2, 2, spread=1.3, seed=3)
    with use_backend("deform", "triton"):
        assert gradcheck(adaptive_sample, (x, offsets), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    x, offsets = make_inputs(2, 32, 5, 7, 2, dtype=dtype)
    expected, actual = reference_and_triton(x, offsets)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == actual[2].dtype == dtype
    # fp32 sums of the exact low-precision inputs: the output is fp32-accurate; the gradients are rounded once
    # to the input dtype (offset gradients sum 4 neighbours x 16 channels)
    for name, want, got in zip(("out", "dx", "doffsets"), expected, actual):
        if dtype == torch.float32 or name == "out":
            tol = dict(rtol=1e-5, atol=max(1e-5, 4e-6 * want.abs().max().item()))
        else:
            eps = torch.finfo(dtype).eps
            tol = dict(rtol=2 * eps, atol=2 * eps * want.abs().max().item())
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{dtype} {name}: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inside the interpreter
def test_non_finite_offsets_propagate_nan_like_the_torch_backend():
    x, offsets = make_inputs(1, 4, 3, 5, 2)
    with torch.no_grad():
        offsets[0, 1, 2, 0] = float("nan")
        offsets[0, 2, 3, 3] = float("inf")
    results = []
    for backend, device in (("torch", "cpu"), ("triton", TRITON_DEVICE)):
        inputs = [t.detach().to(device).requires_grad_() for t in (x, offsets)]
        with use_backend("deform", backend):
            out = adaptive_sample(*inputs)
            results.append(tuple(t.cpu() for t in (out,) + torch.autograd.grad(out.nan_to_num(0.0).sum(), inputs)))
    assert results[0][0].isnan().any()  # the case exercises NaN
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_custom_op_registration_opcheck():
    x, offsets = make_inputs(2, 8, 3, 5, 2, dtype=torch.float32, channels_last=True)
    torch.library.opcheck(torch.ops.defmamba.adaptive_sample.default, (x, offsets),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    backward = torch.ops.defmamba.adaptive_sample_backward.default
    dout = torch.ones(2, 8, 3, 5, device=x.device)
    torch.library.opcheck(backward, (dout, x, offsets, True, True), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(backward, (dout, x, offsets, False, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_fullgraph_compile_of_triton_backend_matches_eager():
    x, offsets = make_inputs(2, 8, 3, 5, 2, dtype=torch.float32)

    def loss(x, offsets):
        return (adaptive_sample(x, offsets).square() * torch.arange(5, device=x.device)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with use_backend("deform", "triton"):
        want = loss(x, offsets)
        grads_want = torch.autograd.grad(want, (x, offsets))
        got = compiled(x, offsets)
        grads_got = torch.autograd.grad(got, (x, offsets))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b)


def test_forced_backends_and_one_line_errors(monkeypatch):
    x, offsets = torch.zeros(1, 4, 3, 3), torch.zeros(1, 3, 3, 2)
    with use_backend("deform", "cuda"), pytest.raises(BackendUnavailable, match="has no cuda backend"):
        adaptive_sample(x, offsets)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("deform", "triton"), pytest.raises(BackendUnavailable) as err:
        adaptive_sample(x, offsets)
    assert "TRITON_INTERPRET=1" in str(err.value) and "\n" not in str(err.value)


def tiny_damamba() -> DAMamba:
    torch.manual_seed(0)
    return DAMamba(num_classes=3, dims=(16, 32), depths=(1, 1), mlp_ratios=(2, 2), drop_path_rate=0.0).double()


def forward_backward(model: DAMamba, images: torch.Tensor, backend: str):
    # the scan on torch, as auto picks for CPU tensors (on a GPU it would pick the CUDA scan, fp32 only)
    with use_backend("deform", backend), use_backend("scan", "torch"):
        model.zero_grad()
        logits = model(images)
        weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype, device=logits.device)
        (logits * weights.view_as(logits)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_damamba_on_triton_matches_torch_in_float64():
    model = tiny_damamba()
    with torch.no_grad():  # offsets of several pixels, as a trained offset network makes
        for block in (stage.blocks[0] for stage in model.stages):
            block.token_mixer.da_scan.offset.bias.normal_(0.0, 2.0)
    model = model.to(TRITON_DEVICE)  # both runs there, so that only the sampling backend differs
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    images = images.to(TRITON_DEVICE)
    want_logits, want_grads = forward_backward(model, images, "torch")
    got_logits, got_grads = forward_backward(model, images, "triton")
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-12)
    assert want_grads.keys() == got_grads.keys()
    assert want_grads["stages.0.blocks.0.token_mixer.da_scan.offset.weight"].abs().sum() > 0
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
