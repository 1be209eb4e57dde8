"""Ablation switches (paper Tables 4, 5): scan orders, branch plumbing, deformable parts, ablation configs."""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from config import ConfigError, get_config, get_default_config, load_yaml_config
from models.defmamba.deformable_scan import DeformableScan, reference_points
from models.defmamba.dssm import DSSM
from models.defmamba.scan_orders import continuous_order, inverse_order, local_order, raster_order, reversed_order
from models.ops.scan import selective_scan_fn

ABLATION = sorted(Path("configs/ablation").glob("table*.yaml"))  # DefMamba rows; damamba_*: test_damamba_ablation.py


# ---------------------------------------------------------------- fixed orders, built another way here

def snake_by_rows(h, w):
    out = []
    for r in range(h):
        cols = range(w) if r % 2 == 0 else range(w - 1, -1, -1)
        out += [r * w + c for c in cols]
    return out


def windows_by_loops(h, w, win):
    out = []
    for ty in range(0, h, win):
        for tx in range(0, w, win):
            for y in range(ty, min(ty + win, h)):
                out += [y * w + x for x in range(tx, min(tx + win, w))]
    return out


@pytest.mark.parametrize("h,w", [(1, 1), (4, 4), (5, 7), (7, 2)])
def test_continuous_order_is_a_snake_of_neighbours(h, w):
    order = continuous_order(h, w).tolist()
    assert order == snake_by_rows(h, w)
    assert sorted(order) == list(range(h * w))
    for a, b in zip(order, order[1:]):  # every step moves to a 4-neighbour
        assert abs(a // w - b // w) + abs(a % w - b % w) == 1


@pytest.mark.parametrize("h,w,win", [(8, 8, 2), (7, 5, 3), (14, 14, 7), (3, 4, 5), (6, 6, 1)])
def test_local_order_scans_window_by_window(h, w, win):
    order = local_order(h, w, win).tolist()
    assert order == windows_by_loops(h, w, win)
    assert sorted(order) == list(range(h * w))
    # neighbour structure: consecutive steps stay in one tile except when a tile is finished
    tiles = [(t // w // win, t % w // win) for t in order]
    assert sum(a != b for a, b in zip(tiles, tiles[1:])) == -(-h // win) * -(-w // win) - 1


def test_raster_reversed_and_inverse_orders():
    assert raster_order(2, 3).tolist() == [0, 1, 2, 3, 4, 5]
    assert reversed_order(2, 3).tolist() == [5, 4, 3, 2, 1, 0]
    perm = torch.stack([torch.randperm(11) for _ in range(3)])
    inv = inverse_order(perm)
    for p, q in zip(perm.tolist(), inv.tolist()):
        assert [q[t] for t in p] == list(range(11))
    with pytest.raises(ValueError, match="window"):
        local_order(4, 4, 0)


# ---------------------------------------------------------------- DSSM against a plain composition

def reference_dssm(op: DSSM, x: torch.Tensor, fixed_orders) -> torch.Tensor:
    """The DSSM written out branch by branch: python-list orders, stack, python-loop un-permutation."""
    batch, h, w, _ = x.shape
    length, d = h * w, op.d_inner
    u, z = op.in_proj(x).chunk(2, dim=-1)
    u = F.silu(op.conv2d(u.permute(0, 3, 1, 2))).flatten(2)
    seqs, perms = [], []
    for order in fixed_orders:
        seqs.append(u[:, :, order])
        perms.append(torch.tensor(order).expand(batch, length))
    if op.DS is not None:
        seq, perm = op.DS(u.view(batch, d, h, w))
        seqs.append(seq)
        perms.append(perm)
    xs = torch.stack(seqs, 1)
    k = xs.shape[1]
    outs = []
    for i in range(k):  # one scan per branch, with that branch's parameters
        proj = torch.einsum("bdl,cd->bcl", xs[:, i], op.x_proj_weight[i])
        dt, b, c = proj.split([op.dt_rank, op.d_state, op.d_state], 1)
        dt = torch.einsum("brl,dr->bdl", dt, op.dt_projs_weight[i])
        rows = slice(i * d, (i + 1) * d)
        outs.append(selective_scan_fn(xs[:, i], dt, -torch.exp(op.A_logs[rows]), b[:, None], c[:, None], op.Ds[rows],
                                      op.dt_projs_bias[i], delta_softplus=True))
    y = torch.zeros(batch, d, length)
    for i in range(k):
        for bi in range(batch):
            raster = torch.zeros(d, length)
            raster[:, perms[i][bi]] = outs[i][bi]           # step n of the branch visited token perm[n]
            y[bi] += raster / k
    y = y.view(batch, d, h, w).permute(0, 2, 3, 1)
    return op.out_proj(y * F.silu(z))


SETTINGS = {  # name: (DSSM kwargs, fixed orders for H x W = 5 x 7, expected K)
    "fbbb+db": (dict(), ["raster", "reversed"], 3),
    "fbbb": (dict(third_branch="none"), ["raster", "reversed"], 2),
    "db": (dict(fb_bb=False), [], 1),
    "fbbb+cb": (dict(third_branch="cb"), ["raster", "reversed", "snake"], 3),
    "fbbb+lb": (dict(third_branch="lb", local_window=3), ["raster", "reversed", "local3"], 3),
    "table5 baseline": (dict(point_offset=False, index_offset=False, offset_bias=False, channel_attention=False),
                        ["raster", "reversed"], 3),
}


def python_order(name, h, w):
    return {"raster": list(range(h * w)), "reversed": list(range(h * w))[::-1], "snake": snake_by_rows(h, w),
            "local3": windows_by_loops(h, w, 3)}[name]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dssm_equals_branch_by_branch_composition(setting):
    kwargs, names, k = SETTINGS[setting]
    torch.manual_seed(0)
    op = DSSM(8, 3, d_state=4, **kwargs)
    assert op.num_branches == k
    assert op.x_proj_weight.shape[0] == op.dt_projs_weight.shape[0] == op.dt_projs_bias.shape[0] == k
    assert op.A_logs.shape == (k * 8, 4) and op.Ds.shape == (k * 8,)
    with torch.no_grad():  # non-trivial offsets so that the deformable order differs from the raster order
        for p in op.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 7, 8, requires_grad=True)
    out = op(x)
    ref = reference_dssm(op, x, [python_order(n, 5, 7) for n in names])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    params = [p for p in op.parameters()]
    grads = torch.autograd.grad(out.square().sum(), [x] + params)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_bad_branch_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="third_branch must be one of"):
        DSSM(8, 3, third_branch="xb")
    with pytest.raises(ValueError, match="at least one scan branch"):
        DSSM(8, 3, fb_bb=False, third_branch="none")
    for opts, message in ((["MODEL.DEFMAMBA.THIRD_BRANCH", "xb"], "THIRD_BRANCH must be one of"),
                          (["MODEL.DEFMAMBA.FB_BB", "False", "MODEL.DEFMAMBA.THIRD_BRANCH", "none"], "FB_BB"),
                          (["MODEL.DEFMAMBA.LOCAL_WINDOW", "0"], "LOCAL_WINDOW")):
        with pytest.raises(ConfigError, match=message):
            get_config(type("Args", (), {"opts": opts})())


# ---------------------------------------------------------------- deformable parts

def test_index_offset_off_keeps_raster_order_and_point_offset_off_reads_references():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7)
    no_dt = DeformableScan(6, 3, index_offset=False, offset_bias=False)
    assert no_dt.conv_offset.conv2.out_channels == 2
    seq, perm = no_dt(x)
    assert torch.equal(perm, torch.arange(35).expand(2, 35))
    pos, path = no_dt.sampling(x)
    assert path is None
    expected = F.grid_sample(x, pos.flip(-1), mode="bilinear", padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(seq, expected.flatten(2), rtol=1e-5, atol=1e-6)

    no_dp = DeformableScan(6, 3, point_offset=False, offset_bias=False)
    assert no_dp.conv_offset.conv2.out_channels == 1
    pos, path = no_dp.sampling(x)
    assert torch.equal(pos, reference_points(5, 7, x.device).expand(2, 5, 7, 2))
    seq, perm = no_dp(x)
    at_refs = F.grid_sample(x, pos.flip(-1), mode="bilinear", align_corners=True).flatten(2)
    assert torch.equal(perm, torch.argsort(path, dim=-1, stable=True))
    torch.testing.assert_close(seq, at_refs.gather(2, perm[:, None].expand(2, 6, 35)), rtol=1e-5, atol=1e-6)

    neither = DeformableScan(6, 3, point_offset=False, index_offset=False, offset_bias=False)
    assert neither.conv_offset is None and not list(neither.parameters())


def test_offset_bias_and_channel_attention_switches_drop_their_parameters():
    full = {k for k, _ in DeformableScan(16, 3).named_parameters()}
    no_ob = {k for k, _ in DeformableScan(16, 3, offset_bias=False).named_parameters()}
    no_ca = {k for k, _ in DeformableScan(16, 3, channel_attention=False).named_parameters()}
    assert full - no_ob == {"rpe_table"}
    assert full - no_ca == {f"conv_offset.ca.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    torch.manual_seed(0)
    net = DeformableScan(16, 3, channel_attention=False).conv_offset
    x = torch.randn(2, 16, 5, 5)
    h = F.layer_norm(net.conv1(x).permute(0, 2, 3, 1), (16,), net.ln.weight, net.ln.bias)
    expected = F.conv2d(F.gelu(h).permute(0, 3, 1, 2), net.conv2.weight)
    torch.testing.assert_close(net(x), expected)


# ---------------------------------------------------------------- configs and models

def test_default_switches_give_the_official_model():
    config = get_default_config()
    load_yaml_config(config, Path("configs/tiny.yaml"))
    state = models.build_model(config).state_dict()
    official = timm.create_model("defmamba_tiny").state_dict()
    assert len(state) == 321
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in official.items()}
    assert list(state) == list(official)


EXPECTED_ROWS = {  # name: (K, deformable parts present: conv_offset maps, rpe_table, ca)
    "table4_row1_fbbb": (2, None), "table4_row2_db": (1, (3, True, True)), "table4_row3_fbbb_cb": (3, None),
    "table4_row4_fbbb_lb": (3, None), "table4_row5_fbbb_db": (3, (3, True, True)),
    "table5_row1_baseline": (3, (0, False, False)), "table5_row2_dp": (3, (2, False, False)),
    "table5_row3_dt": (3, (1, False, False)), "table5_row4_dp_dt": (3, (3, False, False)),
    "table5_row5_ob": (3, (3, True, False)), "table5_row6_ca": (3, (3, True, True)),
}


def test_one_config_per_table_row():
    assert sorted(p.stem for p in ABLATION) == sorted(EXPECTED_ROWS)


@pytest.mark.parametrize("path", ABLATION, ids=[p.stem for p in ABLATION])
def test_ablation_config_builds_and_a_tiny_variant_trains_one_step(path):
    config = get_config(type("Args", (), {"cfg": str(path)})())
    assert config.MODEL.DEFMAMBA.EMBED_DIM == 48 and list(config.MODEL.DEFMAMBA.DEPTHS) == [2, 2, 5, 2]
    k, parts = EXPECTED_ROWS[path.stem]
    full = models.build_model(config)
    for op in (b.op for stage in full.layers for b in stage.blocks):
        assert op.num_branches == k
        if parts is None:
            assert op.DS is None
            continue
        maps, table, ca = parts
        assert (op.DS.conv_offset.conv2.out_channels if op.DS.conv_offset is not None else 0) == maps
        assert (op.DS.rpe_table is not None) == table
        assert (op.DS.conv_offset is not None and op.DS.conv_offset.ca is not None) == ca

    tiny = get_config(type("Args", (), {"cfg": str(path), "opts": [
        "MODEL.NUM_CLASSES", "3", "MODEL.DEFMAMBA.EMBED_DIM", "8", "MODEL.DEFMAMBA.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.DEFMAMBA.OFFSET_KERNELS", "[3, 3, 3, 3]", "MODEL.DEFMAMBA.LOCAL_WINDOW", "3"]})())
    torch.manual_seed(0)
    model = models.build_model(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters that take no part in the forward pass: {unused}"
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad.any())
