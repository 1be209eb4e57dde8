"""The Triton selective scan against the independent float64 recurrence: in Triton's CPU interpreter
without a GPU (tests/conftest.py sets TRITON_INTERPRET=1), compiled on a GPU.

Every case draws fresh inputs, goes through the front end with the scan backend forced to `triton`
(so through the custom op and its autograd) and compares the output and all seven gradients.
The interpreter runs a kernel step by step in Python: shapes are tiny, long sequences use batch 1.
"""
import itertools

import pytest
import torch

from models.ops.backends import use_backend
from models.ops.scan import selective_scan_fn
from scan_reference import TRITON_DEVICE, make_inputs, naive_scan

if TRITON_DEVICE is None:
    pytest.skip("Triton kernels cannot run here (no triton; or no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    with use_backend("scan", "triton"):
        yield


def _compare(inputs, softplus, rel, dtypes=None):
    """Run the front end and the float64 reference on the same (possibly rounded) inputs."""
    dtypes = dtypes or {}
    cast = [t if t is None else t.to(dtypes.get(name, torch.float32)) for name, t in zip(NAMES, inputs)]
    leaves = [t if t is None else t.to(TRITON_DEVICE).requires_grad_(True) for t in cast]
    ref_leaves = [t if t is None else t.double().requires_grad_(True) for t in cast]
    y = selective_scan_fn(*leaves, delta_softplus=softplus)
    y_ref = naive_scan(*ref_leaves, softplus)
    assert y.dtype == torch.float32
    _assert_close(y, y_ref, rel, "y")
    dy = torch.randn_like(y_ref)
    present = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(y, [leaves[i] for i in present], dy.float())
    grads_ref = torch.autograd.grad(y_ref, [ref_leaves[i] for i in present], dy)
    for i, g, g_ref in zip(present, grads, grads_ref):
        assert g.dtype == leaves[i].dtype and g.is_contiguous(), NAMES[i]
        _assert_close(g, g_ref, rel, "d" + NAMES[i])


def _assert_close(x, ref, rel, name):
    """Elementwise within `rel` of the value, or of the tensor's largest magnitude for near-zero entries."""
    scale = ref.abs().max().item() or 1.0
    torch.testing.assert_close(x.cpu().double(), ref, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


FLAGS = list(itertools.product([True, False], repeat=3))  # with D, with delta_bias, softplus
CASES = [(length, nstate, groups, *FLAGS[i % len(FLAGS)])
         for i, (length, nstate, groups) in enumerate(itertools.product([1, 7, 64, 130, 300], [1, 16], [1, 3]))]


@pytest.mark.parametrize("length,nstate,groups,with_d,with_bias,softplus", CASES)
def test_fp32_matches_float64_recurrence(length, nstate, groups, with_d, with_bias, softplus):
    batch = 2 if length <= 64 else 1
    seed = hash((length, nstate, groups, with_d, with_bias, softplus)) % 2**31
    # 3 channels per group: a padded lane in every channel block
    inputs = make_inputs(batch, groups, 3, nstate, length, with_d, with_bias, seed)
    if not softplus:
        inputs[1] = inputs[1].abs()  # positive step sizes keep the recurrence stable
    _compare(inputs, softplus, 1e-4)


@pytest.mark.parametrize("dtype,length", [(torch.bfloat16, 64), (torch.float16, 64), (torch.bfloat16, 130)])
def test_half_precision_inputs(dtype, length):
    inputs = make_inputs(1, 3, 3, 16, length, True, True, length)
    _compare(inputs, True, 1e-2, {name: dtype for name in ("u", "delta", "B", "C")})


def test_several_channel_blocks_and_strided_inputs():
    # 20 channels per group > one 16-channel block: dB / dC are summed over blocks; B and C are
    # views into one tensor, as in DSSM (torch.split of the x projection)
    u, delta, A, B, C, D, bias = make_inputs(1, 2, 20, 16, 70, True, True, 11)
    BC = torch.cat([B, C], 2)
    B, C = torch.split(BC, [16, 16], dim=2)
    assert not B.is_contiguous()
    _compare([u, delta, A, B, C, D, bias], True, 1e-4)


def test_float64_inputs_are_exact_to_rounding():
    inputs = make_inputs(2, 3, 3, 16, 37, True, True, 5)
    leaves = [t.to(TRITON_DEVICE).requires_grad_(True) for t in inputs]
    ref_leaves = [t.clone().requires_grad_(True) for t in inputs]
    y, y_ref = selective_scan_fn(*leaves), naive_scan(*ref_leaves, True)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, leaves, dy.to(TRITON_DEVICE))
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref, ref_leaves, dy)):
        torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-9, atol=1e-9)


def test_large_steps_stay_finite():
    # dt * |A| of ~1000 per step: decays underflow to 0, nothing overflows
    u, delta, A, B, C, D, bias = make_inputs(1, 1, 2, 16, 70, True, True, 3)
    args = [t.float().to(TRITON_DEVICE) for t in (u, delta * 0 + 20.0, A * 50, B, C, D, bias)]
    y = selective_scan_fn(*args)
    y_ref = naive_scan(u, delta * 0 + 20.0, A * 50, B, C, D, bias, True)
    assert torch.isfinite(y).all()
    _assert_close(y, y_ref, 1e-4, "y")


def test_backward_is_deterministic():
    inputs = [t.float().to(TRITON_DEVICE) for t in make_inputs(2, 3, 3, 16, 20, True, True, 9)]
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        y = selective_scan_fn(*leaves)
        runs.append(torch.autograd.grad(y.sin().sum(), leaves))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
