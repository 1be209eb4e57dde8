"""Deformable operations: float64 gradcheck of every autograd Function, and independent forward references."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from models.defmamba.deformable_scan import DeformableScan, path_reference, reference_points
from models.ops.deform.index_offset import sort_tokens
from models.ops.deform.offset_bias import OffsetBias, resize_matrix
from models.ops.deform.point_offset import PointOffsetSample
from models.defmamba.scan_orders import inverse_order


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_positions(batch, height, width, seed, spread=1.1):
    """Normalised (y, x) points, some slightly outside the image to exercise the zero padding."""
    return (torch.rand(batch, height, width, 2, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 2 - 1) * spread


def test_point_offset_forward_matches_grid_sample():
    x, pos = rand(2, 5, 6, 7), random_positions(2, 4, 3, 1)
    ref = F.grid_sample(x, pos.flip(-1), mode="bilinear", padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(PointOffsetSample.apply(x, pos), ref)


def test_point_offset_gradcheck_features_and_offsets():
    x = rand(2, 3, 5, 4).requires_grad_(True)
    pos = random_positions(2, 3, 4, 2).requires_grad_(True)
    assert gradcheck(PointOffsetSample.apply, (x, pos), eps=1e-6, atol=1e-6)


def test_resize_matrix_matches_interpolate():
    table = rand(3, 7, 7)
    for size in [(56, 56), (7, 7), (4, 9), (1, 2)]:
        ry = resize_matrix(size[0], 7, torch.float64, table.device)
        rx = resize_matrix(size[1], 7, torch.float64, table.device)
        ref = F.interpolate(table[None], size=size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(ry @ table @ rx.t(), ref)


def test_offset_bias_forward_matches_interpolate_then_grid_sample():
    table, disp = rand(4, 7, 7), random_positions(2, 6, 5, 3, spread=0.6)
    resized = F.interpolate(table[None], size=(6, 5), mode="bilinear", align_corners=False).expand(2, -1, -1, -1)
    ref = F.grid_sample(resized, disp.flip(-1), mode="bilinear", padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(OffsetBias.apply(table, disp), ref)


def test_offset_bias_gradcheck_table_and_displacement():
    table = rand(2, 7, 7).requires_grad_(True)
    disp = random_positions(2, 4, 3, 4, spread=0.8).requires_grad_(True)
    assert gradcheck(OffsetBias.apply, (table, disp), eps=1e-6, atol=1e-6)


def test_index_offset_sort_forward_and_feature_gradcheck():
    x, p = rand(2, 3, 10).requires_grad_(True), rand(2, 10, seed=1)
    seq, perm = sort_tokens(x, p)
    order = torch.argsort(p, dim=-1)
    for b in range(2):
        torch.testing.assert_close(seq[b], x[b][:, order[b]])
    assert gradcheck(lambda t: sort_tokens(t, p)[0], (x,), eps=1e-6, atol=1e-6)


def test_index_offset_surrogate_gradient_is_channel_averaged():
    x, p = rand(2, 4, 9).requires_grad_(True), rand(2, 9, seed=2).requires_grad_(True)
    seq, perm = sort_tokens(x, p)
    g = rand(2, 4, 9, seed=3)
    dx, dp = torch.autograd.grad(seq, (x, p), g)
    expected = torch.zeros(2, 9, dtype=torch.float64)
    for b in range(2):
        slot_of = {int(perm[b, n]): n for n in range(9)}  # spatial token -> sequence slot
        for n in range(9):
            at_slot = g[b, :, n].mean()
            at_token = g[b, :, slot_of[n]].mean()
            expected[b, n] = at_slot - at_token
    torch.testing.assert_close(dp, expected)
    torch.testing.assert_close(dx, torch.stack([g[b][:, torch.argsort(perm[b])] for b in range(2)]))


def test_inverse_order_is_the_inverse_permutation():
    # the DSSM's way back to raster order: a gather through the inverse permutation
    x, p = rand(2, 3, 12), rand(2, 12, seed=5)
    seq, perm = sort_tokens(x, p)
    inverse = inverse_order(perm)
    for b in range(2):  # built another way: slot of token n is where n stands in perm
        assert inverse[b].tolist() == [perm[b].tolist().index(n) for n in range(12)]
    torch.testing.assert_close(seq.gather(2, inverse[:, None].expand_as(seq)), x)
    orders = torch.stack([torch.randperm(7, generator=torch.Generator().manual_seed(s)) for s in range(4)])
    assert torch.equal(inverse_order(orders), torch.argsort(orders, dim=-1))


def test_reference_grids_stay_float32_under_autocast():
    ref = path_reference(56 * 56, torch.device("cpu"))
    assert ref.dtype == torch.float32 and ref.unique().numel() == 56 * 56
    layer = DeformableScan(8, 3)
    x = torch.randn(1, 8, 56, 56)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq, perm = layer(x.bfloat16())
    assert seq.dtype == torch.float32 and perm.unique().numel() == 56 * 56
    assert reference_points(4, 4, torch.device("cpu")).dtype == torch.float32


def test_deformable_scan_gradients_reach_point_and_index_offsets():
    torch.manual_seed(0)
    layer = DeformableScan(16, 5)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    seq, perm = layer(x)
    (seq * torch.randn_like(seq)).sum().backward()
    w = layer.conv_offset.conv2.weight.grad[:, :, 0, 0]
    assert w[:2].abs().sum() > 0, "no gradient through the point offsets"
    assert w[2].abs().sum() > 0, "no gradient through the index offset"
    assert layer.rpe_table.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (2, 2)])
def test_degenerate_resolutions_stay_finite(size):
    layer = DeformableScan(4, 3)
    seq, perm = layer(torch.randn(2, 4, *size))
    assert torch.isfinite(seq).all() and seq.shape == (2, 4, size[0] * size[1])


def test_non_finite_offsets_propagate_nan_instead_of_raising():
    x = rand(1, 2, 4, 4)
    pos = random_positions(1, 4, 4, 7)
    pos[0, 1, 2, 0] = float("nan")
    pos[0, 3, 3, 1] = float("inf")
    out = PointOffsetSample.apply(x, pos)
    assert out[0, :, 1, 2].isnan().all() and out[0, :, 3, 3].isnan().all()
    assert torch.isfinite(out[0, :, 0]).all()
