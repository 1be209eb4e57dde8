"""Both backends of the deformable-sequence custom op against a reference built from PyTorch's own operations.

The reference (`torch_ops_reference`, below) samples with F.grid_sample, resizes the offset-bias table with
F.interpolate, sorts with torch.argsort and differentiates all of it with autograd in float64; only the
paper's index-offset surrogate gradient is written out. The op's `torch` backend (the project's Functions
forward, their hand-written adjoint backward) on CPU tensors and its `triton` backend (the fused kernels) on
TRITON_DEVICE (CPU tensors in Triton's interpreter without a GPU: conftest.py sets TRITON_INTERPRET=1 before
triton is imported; compiled on a GPU) are each compared with it, the reference running on CPU copies.
Non-finite points, where grid_sample's convention differs from the project's, are compared with the
project's own reference Functions.
"""
import contextlib
import warnings
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from models.ops.backends import BackendUnavailable, use_backend
from models.defmamba import DefMamba
from models.ops.deform import choose_backend, deformable_sequence, deformable_sequence_reference
from scan_reference import TRITON_DEVICE

BACKENDS = ("torch", "triton")


def device_of(backend: str):
    """Where the inputs of `backend` live: the Triton kernels' device, else the CPU."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.fixture(autouse=True)
def no_tf32():
    """On a GPU the fp32 table resize of the triton backend (Ry @ T @ Rx^T) and the tiny model's matmuls and
    convolutions would run in TF32 where it is enabled, far outside the fp32 tolerances here (no-op on CPUs)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_inputs(batch, channels, height, width, dtype=torch.float32, x_dtype=None, table=True, path=True,
                table_size=(7, 7), layout="contiguous", seed=0, device="cpu"):
    """Random features, points partly outside the image (|pos| up to 1.3), displacements, table and path,
    drawn on the CPU and placed on `device`."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, spread=None):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) if spread is None else \
            (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * spread
        return t.to(device=device, dtype=dtype)

    x = rand(batch, channels, height, width).to(x_dtype or dtype)
    if layout == "channels_last":  # the DSSM's conv output on GPUs: read in place
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":  # neither layout: copied before the launch
        x = torch.cat([x, x], 1)[:, ::2]
    pos = rand(batch, height, width, 2, spread=1.3)
    tab = rand(channels, *table_size) if table else None
    disp = rand(batch, height, width, 2, spread=1.1) if table else None
    order = rand(batch, height * width) if path else None
    return [t if t is None else t.requires_grad_() for t in (x, pos, tab, disp, order)]


class PathSurrogate(torch.autograd.Function):
    """Identity on the sorted sequence; the path receives mean_c(dseq[c, n] - dfeatures[c, n]) (paper Sec. 3.3)."""

    @staticmethod
    def forward(ctx, seq, path, perm):
        ctx.save_for_backward(perm)
        return seq.clone()

    @staticmethod
    def backward(ctx, dseq):
        (perm,) = ctx.saved_tensors
        dfeat = torch.zeros_like(dseq).scatter(2, perm[:, None].expand_as(dseq), dseq)  # back to token order
        return dseq, (dseq - dfeat).mean(1), None


def torch_ops_reference(x, pos, table=None, disp=None, path=None):
    """(seq, perm) from grid_sample / interpolate / argsort, differentiable (float64 inputs give float64)."""
    batch, _, height, width = x.shape
    sample = dict(mode="bilinear", padding_mode="zeros", align_corners=True)
    feat = F.grid_sample(x, pos.flip(-1), **sample)  # grid_sample reads (x, y)
    if table is not None:
        resized = F.interpolate(table[None], size=(height, width), mode="bilinear", align_corners=False)
        feat = feat + F.grid_sample(resized.expand(batch, -1, -1, -1), disp.flip(-1), **sample)
    feat = feat.flatten(2)
    if path is None:
        return feat, torch.arange(height * width).expand(batch, -1)
    perm = torch.argsort(path.detach(), dim=-1, stable=True)
    return PathSurrogate.apply(feat.gather(2, perm[:, None].expand_as(feat)), path, perm), perm


def fp32_tolerance(want):
    """fp32 sums against the float64 reference: rounding grows with the magnitude of what is summed (the
    gradients of the points sum 4 neighbours x all channels; up to ~1e-6 of the largest value)."""
    return dict(rtol=1e-5, atol=max(1e-5, 4e-6 * want.abs().max().item()))


def reference_and_op(inputs, backend, out_dtype=None, seed=1, reference=None):
    """(outputs, grads) of the reference (default: torch_ops_reference in float64, rounded to the op's dtypes)
    on CPU copies of the inputs and of the custom op under `backend` where the inputs are, with the same
    upstream gradient; both on the CPU."""
    leaves = [t for t in inputs if t is not None]
    if reference is None:
        wide = [t if t is None else t.detach().cpu().double().requires_grad_() for t in inputs]
        seq, perm = torch_ops_reference(*wide)
        # the op's precision: fp64 when a sampled input is fp64, else fp32
        acc = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in inputs[:4]) else torch.float32
    else:
        wide = [t if t is None else t.detach().cpu().requires_grad_() for t in inputs]
        seq, perm = reference(*wide)
        acc = seq.dtype
    grad = torch.randn(seq.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad.to(out_dtype or acc)  # the same upstream values reach both
    wide_grads = torch.autograd.grad(seq, [t for t in wide if t is not None], grad.to(seq.dtype))
    expected = (seq.detach().to(acc), perm) + tuple(g.to(t.dtype) for g, t in zip(wide_grads, leaves))
    with use_backend("deform", backend):
        seq, perm = deformable_sequence(*inputs, out_dtype=out_dtype)
        actual = (seq, perm) + torch.autograd.grad(seq, leaves, grad.to(seq.device, seq.dtype))
    return expected, tuple(t.cpu() for t in actual)


CASES = {  # batch, channels, height, width, options
    "odd-5x7-b3": (3, 5, 5, 7, {}),
    "14x14-c40": (1, 40, 14, 14, {}),  # several slot tiles and channel chunks
    "bf16-features": (3, 4, 7, 5, {"x_dtype": torch.bfloat16}),
    "no-table-no-path": (1, 3, 5, 7, {"table": False, "path": False}),
    "table-raster-order": (3, 3, 7, 5, {"path": False}),
    "no-table-sorted": (1, 3, 5, 5, {"table": False}),
    "channels-last": (3, 6, 5, 7, {"layout": "channels_last"}),
    "sliced-features": (1, 3, 7, 5, {"layout": "sliced"}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_reference_functions(case, backend):
    batch, channels, height, width, options = CASES[case]
    inputs = make_inputs(batch, channels, height, width, **options, device=device_of(backend))
    expected, actual = reference_and_op(inputs, backend)
    names = ["seq", "perm"] + [n for n, t in zip(["dx", "dpos", "dtable", "ddisp", "dpath"], inputs) if t is not None]
    bf16 = options.get("x_dtype") == torch.bfloat16
    for name, want, got in zip(names, expected, actual):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        # dx is rounded to bf16 after a sum whose order differs (atomics vs scatter_add)
        tol = dict(rtol=1.6e-2, atol=1e-2) if bf16 and name == "dx" else fp32_tolerance(want)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{case}/{backend} {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_written_in_requested_dtype(backend):
    inputs = make_inputs(3, 4, 5, 7, x_dtype=torch.bfloat16, device=device_of(backend))
    expected, actual = reference_and_op(inputs, backend, out_dtype=torch.bfloat16)
    assert actual[0].dtype == torch.bfloat16
    # one rounding of the same fp32 sum
    torch.testing.assert_close(actual[0], expected[0].to(torch.bfloat16), rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(actual[2], expected[2], rtol=1.6e-2, atol=1e-2)  # dx (bf16)
    for want, got in zip(expected[3:], actual[3:]):
        torch.testing.assert_close(got, want, **fp32_tolerance(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_reference_tightly(backend):
    inputs = make_inputs(3, 3, 5, 7, dtype=torch.float64, table_size=(4, 3), device=device_of(backend))
    expected, actual = reference_and_op(inputs, backend)
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float64_gradcheck_through_triton_kernels():
    x, pos, table, disp, path = make_inputs(1, 2, 3, 2, dtype=torch.float64, table_size=(2, 3), seed=3,
                                            device=TRITON_DEVICE)
    path = path.detach()  # the index-offset gradient is a surrogate, not a derivative
    with use_backend("deform", "triton"):
        assert gradcheck(lambda *a: deformable_sequence(*a, path)[0], (x, pos, table, disp), eps=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inside the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_points_propagate_nan_like_the_reference(backend):
    inputs = make_inputs(1, 3, 5, 7, device=device_of(backend))
    with torch.no_grad():
        inputs[1][0, 1, 2, 0] = float("nan")
        inputs[1][0, 3, 3, 1] = float("inf")
        inputs[3][0, 4, 6, 1] = float("-inf")
    expected, actual = reference_and_op(inputs, backend, reference=deformable_sequence_reference)
    assert expected[0].isnan().any() and expected[2].isnan().any()  # the case exercises NaN
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_registration_opcheck(backend):
    x, pos, table, disp, path = make_inputs(2, 3, 3, 5, table_size=(3, 3), device=device_of(backend))
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()  # as the DSSM's conv output
    pos = pos.detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).requires_grad_()
    op = torch.ops.defmamba.deformable_sequence.default
    torch.library.opcheck(op, (x, pos, table, disp, path, torch.float32, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(op, (x, pos, None, None, None, torch.bfloat16, backend),
                          test_utils=("test_schema", "test_faketensor"))
    seq, perm = op(x, pos, table, disp, path, torch.float32, backend)
    backward = torch.ops.defmamba.deformable_sequence_backward.default
    torch.library.opcheck(backward, (torch.ones_like(seq), x, pos, table, disp, path, perm, True, True, True, True,
                                     True, backend), test_utils=("test_schema", "test_faketensor"))


def test_fullgraph_compile_of_triton_backend_matches_eager():
    inputs = make_inputs(3, 4, 5, 7, device=TRITON_DEVICE)

    def loss(x, pos, table, disp, path):
        seq, perm = deformable_sequence(x, pos, table, disp, path)
        return (seq.square() * torch.arange(seq.shape[-1], device=seq.device)).sum() + perm[:, 0].sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with use_backend("deform", "triton"):
        want = loss(*inputs)
        grads_want = torch.autograd.grad(want, inputs)
        got = compiled(*inputs)
        grads_got = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b)


def test_backend_choice_and_one_line_errors(monkeypatch):
    x = torch.zeros(1, 2, 3, 3)
    assert choose_backend(x).value == "torch"  # auto: Triton only for CUDA tensors
    with use_backend("deform", "cuda"), pytest.raises(BackendUnavailable, match="has no cuda backend"):
        deformable_sequence(x, torch.zeros(1, 3, 3, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("deform", "triton"), pytest.raises(BackendUnavailable) as err:
        deformable_sequence(x, torch.zeros(1, 3, 3, 2))
    assert "TRITON_INTERPRET=1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="pos must be"):
        deformable_sequence(x, torch.zeros(1, 3, 4, 2))
    with pytest.raises(ValueError, match="table and disp"):
        deformable_sequence(x, torch.zeros(1, 3, 3, 2), torch.zeros(2, 7, 7))
    with pytest.raises(ValueError, match="out_dtype"):
        deformable_sequence(x, torch.zeros(1, 3, 3, 2), out_dtype=torch.int64)


def test_flop_count_of_the_custom_op():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    from utils.flops import _handles, ScanFlopConvention

    class Wrapper(nn.Module):
        def forward(self, x, pos, table=None, disp=None):
            return deformable_sequence(x, pos, table, disp)[0]

    x, pos, table, disp, _ = [t.detach() for t in make_inputs(2, 3, 5, 7)]
    for args, per_element in (((x, pos, table, disp), 12), ((x, pos), 4)):
        analysis = FlopCountAnalysis(Wrapper(), args).set_op_handle(**_handles(ScanFlopConvention.RELEASE))
        analysis.unsupported_ops_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert analysis.total() == per_element * 2 * 3 * 35


def tiny_defmamba() -> DefMamba:
    torch.manual_seed(0)
    return DefMamba(num_classes=3, embed_dim=8, depths=(1, 1, 1, 1), offset_kernels=(3, 3, 3, 3),
                    drop_path_rate=0.0)


def forward_backward(model: DefMamba, images: torch.Tensor, backends: Dict[str, str]):
    with contextlib.ExitStack() as stack:
        for op, backend in backends.items():
            stack.enter_context(use_backend(op, backend))
        model.zero_grad()
        logits = model(images)
        (logits * torch.linspace(-1, 1, logits.numel(), device=logits.device).view_as(logits)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# each entry forces the named operations to Triton; the reference, and every operation not forced, run on torch
# (what auto picks for CPU tensors; for CUDA tensors it would pick the CUDA scan or Triton)
ALL_TORCH = {"deform": "torch", "scan": "torch", "merge": "torch"}
TRITON_COMBINATIONS = {"deform": {"deform": "triton"}, "deform+scan": {"deform": "triton", "scan": "triton"}}


@pytest.mark.parametrize("forced", list(TRITON_COMBINATIONS))
def test_tiny_defmamba_triton_backends_match_torch(forced):
    # both runs on the Triton kernels' device, so that only the forced backends differ (fp32: see no_tf32)
    model = tiny_defmamba().to(TRITON_DEVICE)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(TRITON_DEVICE)
    want_logits, want_grads = forward_backward(model, images, ALL_TORCH)
    got_logits, got_grads = forward_backward(model, images, {**ALL_TORCH, **TRITON_COMBINATIONS[forced]})
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys()
    for part in ("DS.rpe_table", "DS.conv_offset.conv2.weight", "DS.conv_offset.conv1.weight"):
        assert want_grads[f"layers.0.blocks.0.op.{part}"].abs().sum() > 0, f"no gradient reaches {part}"
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deformable_scan_writes_the_sequence_in_the_scan_dtype(backend):
    from models.defmamba.deformable_scan import DeformableScan
    device = device_of(backend)
    torch.manual_seed(0)
    layer = DeformableScan(4, 3).to(device)
    x = torch.randn(2, 4, 5, 7).bfloat16().to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        with use_backend("deform", backend):
            seq, perm = layer(x, out_dtype=torch.bfloat16)
        with use_backend("deform", "torch"):
            want, want_perm = layer(x)
    assert seq.dtype == torch.bfloat16 and want.dtype == torch.float32
    torch.testing.assert_close(perm, want_perm)
    torch.testing.assert_close(seq, want.bfloat16(), rtol=8e-3, atol=1e-5)
