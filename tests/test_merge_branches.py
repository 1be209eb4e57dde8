"""Both backends of the DSSM's branch merge (custom op defmamba::merge_branches) against a loop reference.

The reference writes the merge out one branch and one batch element at a time (python-indexed scatter of
each branch output back to its tokens, running mean, then the gate) in float64 and is differentiated by
autograd. The op's `torch` backend (gather / sum / scale, hand-written adjoint) and its `triton` backend (one
kernel per direction, run by Triton's CPU interpreter: conftest.py sets TRITON_INTERPRET=1 before triton is
imported) are each compared with it; gradcheck checks the adjoints at a tiny size.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from models.ops.backends import use_backend
from models.ops.merge import choose_backend, merge_branches
from scan_reference import TRITON_DEVICE

BACKENDS = ("torch", pytest.param("triton", marks=pytest.mark.skipif(TRITON_DEVICE is None,
                                                                     reason="Triton kernels cannot run here")))


def make_inputs(batch, branches, dim, length, dtype=torch.float64, gate_dtype=None, seed=0):
    """Branch outputs, one random permutation per (batch, branch) as inverse, and a strided gate view."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.randn(batch, branches, dim, length, generator=gen, dtype=torch.float64).to(dtype)
    inverse = torch.stack([torch.stack([torch.randperm(length, generator=gen) for _ in range(branches)])
                           for _ in range(batch)])
    # the DSSM's gate is the second half of in_proj's output: a view with stride 2 * dim between tokens
    both = torch.randn(batch, length, 2 * dim, generator=gen, dtype=torch.float64).to(gate_dtype or dtype)
    return ys, inverse, both[..., dim:]


def loop_reference(ys, inverse, gate):
    """Branch k's output at step n is token n' with inverse[b, k, n'] = n: put it back, average, gate."""
    batch, branches, dim, length = ys.shape
    rows = []
    for b in range(batch):
        total = torch.zeros(length, dim, dtype=ys.dtype)
        for k in range(branches):
            order = [0] * length
            for token, step in enumerate(inverse[b, k].tolist()):
                order[step] = token
            total = total + torch.zeros(length, dim, dtype=ys.dtype).index_add(0, torch.tensor(order), ys[b, k].T)
        rows.append(total / branches)
    mean = torch.stack(rows)
    return mean if gate is None else mean * F.silu(gate)


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [True, False])
def test_values_and_gradients_equal_the_loop_reference(backend, gated):
    ys, inverse, gate = make_inputs(2, 3, 5, 37)  # L not a multiple of the tile: masked tails
    ys.requires_grad_(True)
    gate = gate.detach().requires_grad_(True) if gated else None
    leaves = [ys] + ([gate] if gated else [])
    dev = _device(backend)
    with use_backend("merge", backend):
        assert choose_backend(ys.to(dev)).value == backend
        out = merge_branches(ys.to(dev), inverse.to(dev), gate.to(dev) if gated else None)
    ref = loop_reference(ys, inverse, gate)
    assert out.shape == (2, 37, 5) and out.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, dout.to(dev))
    for g, r in zip(grads, torch.autograd.grad(ref, leaves, dout)):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    ys, inverse, gate = make_inputs(1, 2, 3, 5, seed=1)
    dev = _device(backend)
    ys, gate = ys.to(dev).requires_grad_(True), gate.to(dev).detach().requires_grad_(True)
    with use_backend("merge", backend):
        assert gradcheck(lambda y, z: merge_branches(y, inverse.to(dev), z), (ys, gate))
        assert gradcheck(lambda y: merge_branches(y, inverse.to(dev)), (ys,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gate_rounds_like_the_release(backend, gate_dtype):
    """fp32 branch outputs, a half gate (in_proj under autocast): silu rounded to the gate's dtype, the
    product in fp32, as the release's `(y * F.silu(z)).to(x.dtype)`. Triton's interpreter truncates fp32 ->
    bf16 casts (compiled kernels round to nearest even), so there bf16 is only held to one bf16 step."""
    ys, inverse, gate = make_inputs(2, 3, 6, 19, dtype=torch.float32, gate_dtype=gate_dtype, seed=2)
    ys.requires_grad_(True)
    gate = gate.detach().requires_grad_(True)
    dev = _device(backend)
    with use_backend("merge", backend):
        out = merge_branches(ys.to(dev), inverse.to(dev), gate.to(dev), out_dtype=torch.float32)
    batch, branches, dim, length = ys.shape
    ref = ys.gather(3, inverse[:, :, None].expand(batch, branches, dim, length)).sum(1) / branches
    ref = (ref.transpose(1, 2) * F.silu(gate)).float()
    truncating = backend == "triton" and dev == "cpu" and gate_dtype == torch.bfloat16
    tol = dict(rtol=2 ** -7, atol=1e-6) if truncating else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.cpu(), ref, **tol)
    dout = torch.randn_like(ref)
    dys, dgate = torch.autograd.grad(out, (ys, gate), dout.to(dev))
    rys, rgate = torch.autograd.grad(ref, (ys, gate), dout)
    assert dys.dtype == torch.float32 and dgate.dtype == gate_dtype
    torch.testing.assert_close(dys.cpu(), rys, **tol)
    # dgate is rounded twice (silu's incoming gradient, then the result): two bf16 steps when truncated
    exact = dict(rtol=2 ** -6, atol=1e-6) if truncating else dict(rtol=0, atol=0)
    torch.testing.assert_close(dgate.cpu().float(), rgate.float(), **exact)


def test_expanded_inverse_of_the_fixed_orders():
    """The fixed orders' inverse is one (K, L) row expanded over the batch (stride 0): read in place."""
    ys, inverse, gate = make_inputs(3, 2, 4, 9, seed=3)
    shared = inverse[:1].expand(3, 2, 9)
    for backend in [b if isinstance(b, str) else b.values[0] for b in BACKENDS]:
        if backend == "triton" and TRITON_DEVICE is None:
            continue
        dev = _device(backend)
        with use_backend("merge", backend):
            out = merge_branches(ys.to(dev), shared.to(dev), gate.to(dev))
        torch.testing.assert_close(out.cpu(), loop_reference(ys, shared, gate), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_registration(backend):
    """Schema, fake implementation, autograd registration and AOT dispatch of the custom op."""
    ys, inverse, gate = make_inputs(2, 3, 4, 6, dtype=torch.float32, seed=4)
    dev = _device(backend)
    ys, gate = ys.to(dev).requires_grad_(True), gate.to(dev).detach().requires_grad_(True)
    op = torch.ops.defmamba.merge_branches.default
    torch.library.opcheck(op, (ys, inverse.to(dev), gate, torch.float32, True, backend))
    torch.library.opcheck(op, (ys, inverse.to(dev), None, torch.float32, False, backend))


def test_bad_shapes_are_clear_errors():
    ys, inverse, gate = make_inputs(2, 3, 4, 6)
    with pytest.raises(ValueError, match="inverse must be int64"):
        merge_branches(ys, inverse.int(), gate)
    with pytest.raises(ValueError, match="inverse must be int64"):
        merge_branches(ys, inverse[:, :2], gate)
    with pytest.raises(ValueError, match="gate must be"):
        merge_branches(ys, inverse, gate[:, :, :3])
    with pytest.raises(ValueError, match="ys must be"):
        merge_branches(ys[0], inverse, gate)
