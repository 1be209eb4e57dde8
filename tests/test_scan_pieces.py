"""The scan's input u in pieces along D (one tensor per DSSM branch, the raster sequence given twice): every
backend against the float64 recurrence of their concatenation, through the front end and autograd, and the
DSSM keeps no copy of the raster sequence for its backward pass.

The Triton kernels read every piece where it is, one launch per piece and direction (Triton's CPU interpreter
without a GPU, tests/conftest.py); the torch backend concatenates them.
"""
import pytest
import torch
import torch.nn.functional as F

from models.ops.backends import use_backend
from models.ops.scan import selective_scan_fn
from scan_reference import TRITON_DEVICE, make_inputs, two_way_scan

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton kernels cannot run here")
BACKENDS = ("torch", pytest.param("triton", marks=needs_triton))

# batch, per_group, nstate, length, reversed groups, pieces as (tensor name, groups): a name given again is the
# same tensor again; tensor "v" is a view at a channel offset of a bigger tensor (rows not vector-aligned), tensor
# "t" token-major (channels contiguous, as the DSSM's channels-last conv output: read as it lies on Triton)
CASES = [
    (2, 16, 4, 70, [1], [("t", 1), ("t", 1), ("b", 1)]),        # the DSSM's raster as the model lays it out
    (2, 2, 4, 9, [1], [("a", 1), ("a", 1), ("b", 1)]),          # the DSSM on Triton: raster twice, deformable
    (1, 40, 4, 264, [0], [("a", 1), ("v", 1)]),                 # several chunks and channel blocks
    (1, 3, 1, 37, [1, 3], [("v", 2), ("b", 1), ("b", 1)]),      # N = 1, odd L; a piece scanned both ways
]


def _leaves(batch, per_group, length, layout, device, seed):
    """One float64 leaf per tensor name, and the pieces (views of the leaves) in scan order."""
    gen = torch.Generator().manual_seed(seed)
    leaves, views = {}, {}
    for name, groups in layout:
        if name not in leaves:
            extra = 3 if name == "v" else 0
            shape = (batch, length, groups * per_group) if name == "t" else (batch, groups * per_group + extra, length)
            leaves[name] = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
            views[name] = leaves[name].transpose(1, 2) if name == "t" else leaves[name][:, extra:]
    return leaves, [views[name] for name, _ in layout]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,per_group,nstate,length,reversed_groups,layout", CASES)
def test_pieces_match_the_recurrence_of_their_concatenation(backend, batch, per_group, nstate, length,
                                                            reversed_groups, layout):
    groups = sum(g for _, g in layout)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    _, delta, A, B, C, D, bias = make_inputs(batch, groups, per_group, nstate, length, True, True, seed=length)
    rest = [t.to(device).requires_grad_(True) for t in (delta, A, B, C, D, bias)]
    leaves, pieces = _leaves(batch, per_group, length, layout, device, seed=length + 1)
    with use_backend("scan", backend):
        y = selective_scan_fn(pieces, *rest, delta_softplus=True, reversed_groups=reversed_groups)

    ref_rest = [t.detach().cpu().requires_grad_(True) for t in rest]
    ref_leaves, ref_pieces = _leaves(batch, per_group, length, layout, "cpu", seed=length + 1)
    y_ref = two_way_scan(torch.cat(ref_pieces, 1), *ref_rest, reversed_groups)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [*leaves.values(), *rest], dy.to(device))
    want = torch.autograd.grad(y_ref, [*ref_leaves.values(), *ref_rest], dy)
    for g, r in zip(got, want):  # a tensor given twice gets the sum of both pieces' gradients
        torch.testing.assert_close(g.cpu(), r, rtol=1e-9, atol=1e-9)


@needs_triton
def test_triton_launches_one_kernel_per_piece_and_direction():
    from models.ops.scan.triton import launch_parts
    raster, other = torch.empty(2, 4, 8), torch.empty(2, 8, 8)
    parts = launch_parts([raster, raster, other], 4, reversed_groups=[1, 3])
    assert [(p.u is raster, p.first, p.groups, p.reverse) for p in parts] == [
        (True, 0, [0], False), (True, 4, [1], True), (False, 8, [2], False), (False, 8, [3], True)]
    (single,) = launch_parts([other], 2)
    assert single.u is other and single.first == 0 and single.groups is None and not single.reverse


def test_bad_pieces_are_one_line_errors():
    u, delta, A, B, C, D, bias = make_inputs(1, 3, 2, 4, 5, True, True, seed=0)
    bad = {
        "whole B/C groups of 2 channels; got widths \\[3, 3\\]": [u[:, :3], u[:, 3:]],
        "must add up to D=6": [u[:, :2], u[:, 2:4]],
        "with delta's batch and L": [u[:, :2], u[:, 2:4, :4], u[:, 4:]],
        "must share one dtype and device": [u[:, :2], u[:, 2:4].float(), u[:, 4:]],
        "at least one piece": [],
    }
    for match, pieces in bad.items():
        with pytest.raises(ValueError, match=match) as info:
            selective_scan_fn(pieces, delta, A, B, C, D, bias)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dssm_saves_no_copy_of_the_raster_sequence(backend):
    """The DSSM's autograd graph holds the raster sequence (the conv output after SiLU) in one storage only:
    it is read as the scan's forward and backward pieces and by the x projections, never concatenated or
    transposed."""
    from models.defmamba.dssm import DSSM
    torch.manual_seed(0)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    op = DSSM(48, 3, d_state=4).to(device)  # wide enough for the matmuls' layouts of the model's widths
    x = torch.randn(2, 8, 8, 48, device=device)
    saved = []
    with use_backend("scan", backend), use_backend("merge", backend), use_backend("deform", backend), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        op(x)
    with torch.no_grad():
        raster = F.silu(op.conv2d(op.in_proj(x).chunk(2, dim=-1)[0].permute(0, 3, 1, 2))).flatten(2)
    holders = {t.untyped_storage().data_ptr() for t in saved if _holds(t, raster)}
    assert len(holders) == 1, f"the raster sequence is saved in {len(holders)} storages"


def _holds(t, raster):
    """Whether saved tensor t holds the raster sequence (batch, D, L): as one of its slices along dim 1, or
    tokens first ((batch * L, D), the layout a matmul over all tokens would copy it to)."""
    batch = raster.shape[0]
    if t.dtype != raster.dtype or t.numel() % raster.numel():
        return False
    tokens = raster.transpose(1, 2).reshape(-1, raster.shape[1])
    if t.numel() == raster.numel() and torch.equal(t.detach().reshape(tokens.shape), tokens):
        return True
    if t.dim() < 3 or t.shape[0] != batch:
        return False
    slices = t.detach().reshape(batch, -1, *raster.shape[1:])
    return any(torch.equal(slices[:, k], raster) for k in range(slices.shape[1]))
