"""Scan groups backward in time (`reversed_groups`): every backend against a float64 recurrence that runs
those groups' steps from t = L-1 down to 0, the other groups from 0 up, through the front end and autograd.

The Triton kernels read a reversed group in place (chunks from the end, tiles scanned the other way; Triton's
CPU interpreter without a GPU, tests/conftest.py); the torch backend flips the group's steps around its scan.
"""
import pytest
import torch

from models.ops.backends import use_backend
from models.ops.scan import selective_scan_fn
from scan_reference import TRITON_DEVICE, make_inputs, two_way_scan

BACKENDS = ("torch", pytest.param("triton", marks=pytest.mark.skipif(TRITON_DEVICE is None,
                                                                     reason="Triton kernels cannot run here")))


CASES = [  # batch, groups, per_group, nstate, length, reversed groups
    (2, 3, 2, 4, 9, [1]),             # the DSSM's layout: forward, backward, forward
    (2, 3, 2, 4, 6, [0, 2]),          # even L shorter than a chunk: the tail is masked at the start
    (1, 2, 40, 4, 264, [1]),          # several chunks and channel blocks (partial dB / dC sums)
    (1, 3, 3, 1, 37, [0, 1, 2]),      # N = 1, odd L, every group backward
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,groups,per_group,nstate,length,reversed_groups", CASES)
def test_reversed_groups_match_the_two_way_recurrence(backend, batch, groups, per_group, nstate, length,
                                                      reversed_groups):
    inputs = make_inputs(batch, groups, per_group, nstate, length, True, True, seed=length)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    leaves = [t.to(device).requires_grad_(True) for t in inputs]
    ref_leaves = [t.clone().requires_grad_(True) for t in inputs]
    with use_backend("scan", backend):
        y = selective_scan_fn(*leaves, delta_softplus=True, reversed_groups=reversed_groups)
    y_ref = two_way_scan(*ref_leaves, reversed_groups)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y_ref)
    for g, r in zip(torch.autograd.grad(y, leaves, dy.to(device)), torch.autograd.grad(y_ref, ref_leaves, dy)):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-9, atol=1e-9)


def test_bad_reversed_groups_are_clear_errors():
    inputs = make_inputs(1, 2, 2, 4, 5, True, True, seed=0)
    for bad in ([2], [-1], [1, 1]):
        with pytest.raises(ValueError, match="reversed_groups must be distinct B/C group indices in"):
            selective_scan_fn(*inputs, reversed_groups=bad)


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton kernels cannot run here")
@pytest.mark.parametrize("third_branch", ["db", "none", "cb"])
def test_dssm_reads_the_backward_branch_in_place_on_triton(third_branch):
    """On the Triton scan the DSSM's backward branch is the raster sequence scanned from its end; on the torch
    scan it is a reversed copy, as in the release: the two give the same values and gradients."""
    from models.defmamba.dssm import DSSM
    from models.ops.scan import reverses_in_place
    torch.manual_seed(0)
    op = DSSM(8, 3, d_state=4, third_branch=third_branch).to(TRITON_DEVICE)
    with torch.no_grad():  # non-trivial offsets so that the deformable order differs from the raster order
        for p in op.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 7, 8, device=TRITON_DEVICE, requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        with use_backend("scan", backend), use_backend("merge", backend):
            assert reverses_in_place(TRITON_DEVICE) is (backend == "triton")
            out = op(x)
            results[backend] = out, torch.autograd.grad(out.square().sum(), [x, *op.parameters()])
    (out_t, grads_t), (out_tr, grads_tr) = results["torch"], results["triton"]
    torch.testing.assert_close(out_tr, out_t, rtol=1e-5, atol=1e-6)
    for g_tr, g_t in zip(grads_tr, grads_t):
        torch.testing.assert_close(g_tr, g_t, rtol=1e-4, atol=1e-5)
