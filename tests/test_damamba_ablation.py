"""DAMamba-F and the DAMamba module ablation (slides' Table 5): the variant, what each switch removes, the row
configs' counts, one training step per row, and the released T keeping its keys."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from config import get_config, get_default_config, load_yaml_config
from models.damamba import DABlock
from models.damamba.dassm import DASSM
from utils.flops import count_flops

REPO = Path(__file__).resolve().parents[1]
SPEC_KEYS = REPO / "tests" / "data" / "damamba_tiny_keys.json"
FEMTO = dict(dims=[48, 96, 192, 256], depths=[2, 2, 10, 2], mlp_ratios=[4, 4, 3, 3])
# row config: (ADAPTIVE_SCAN, CONV_POS_EMBED, CONV_FFN), trainable parameters, and parameters as the release
# counts them (its frozen conv_constant kernels, buffers here, included), as documented in docs/ablations.md
ROWS = {"damamba_table5_row1_baseline": ((False, False, False), 5_308_640, 5_308_640),
        "damamba_table5_row2_das": ((True, False, False), 5_406_964, 5_406_964),
        "damamba_table5_row3_cpe": ((True, True, False), 5_434_164, 5_434_308),
        "damamba_table5_row4_convffn": ((True, True, True), 5_518_644, 5_518_932)}


def row_config(name: str, *opts: str):
    return get_config(type("Args", (), {"cfg": str(REPO / "configs" / "ablation" / f"{name}.yaml"),
                                        "opts": list(opts)})())


def femto_blocks(model):
    return [(stage.blocks[0].norm2.num_features, len(stage.blocks)) for stage in model.stages]


# ----------------------------------------------------------------------------- DAMamba-F

def test_damamba_femto_has_the_slides_widths_and_depths():
    with torch.device("meta"):
        model = timm.create_model("damamba_femto")
        config = get_default_config()
        load_yaml_config(config, REPO / "configs" / "damamba_femto.yaml")
        from_yaml = models.build_model(config)
    assert femto_blocks(model) == list(zip(FEMTO["dims"], FEMTO["depths"]))
    assert model.feature_info[-1]["num_chs"] == 256 and model.head.fc.in_features == 256
    for stage, dim, ratio in zip(model.stages, FEMTO["dims"], FEMTO["mlp_ratios"]):
        block = stage.blocks[0]
        assert block.mlp.fc1.out_channels == ratio * dim and not hasattr(block, "layer_scale_1")
        assert block.token_mixer.da_scan.offset.out_features == 2 * dim // 16  # head_dim 16
    assert model.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert config.MODEL.DROP_PATH_RATE == 0.1 and config.TRAIN.MESA == 1.0 and config.DATA.INTERPOLATION == "bicubic"
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in from_yaml.state_dict().items()} == shapes


# ----------------------------------------------------------------------------- what each switch does

def raster_dassm_reference(m: DASSM, x: torch.Tensor) -> torch.Tensor:
    """The raster-scan DASSM: token (i, j) read in place, float64 recurrence over i, then j (row-major loops)."""
    batch, dim, height, width = x.shape
    u = F.silu(F.conv2d(F.conv2d(x, m.in_proj.weight), m.conv2d.weight, m.conv2d.bias, padding=1, groups=dim))
    rank, a = m.dt_rank, -torch.exp(m.A_logs[:, 0])
    h = torch.zeros(batch, dim, dtype=x.dtype)
    y = torch.zeros_like(u)
    for i in range(height):
        for j in range(width):
            ut = u[:, :, i, j]
            proj = ut @ m.x_proj_weight.T                                         # (B, R + 2)
            delta = F.softplus(proj[:, :rank] @ m.dt_projs_weight.T + m.dt_projs_bias)
            h = torch.exp(delta * a) * h + delta * proj[:, rank, None] * ut
            y[:, :, i, j] = h * proj[:, rank + 1, None] + m.Ds * ut
    y = F.layer_norm(y.permute(0, 2, 3, 1), (dim,), m.out_norm.norm.weight, m.out_norm.norm.bias, eps=1e-6)
    return F.conv2d(y.permute(0, 3, 1, 2), m.out_proj.weight)


def test_raster_scan_reads_the_unoffset_tokens():
    torch.manual_seed(0)
    raster = DASSM(32, adaptive_scan=False).double()
    full = DASSM(32).double()
    with torch.no_grad():
        raster.A_logs.normal_(0, 0.5)
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64, requires_grad=True)
    out = raster(x)
    torch.testing.assert_close(out, raster_dassm_reference(raster, x), rtol=1e-10, atol=1e-11)
    # the same weights in the adaptive mixer with its offsets forced to 0 give the same map
    result = full.load_state_dict(raster.state_dict(), strict=False)
    assert not result.unexpected_keys and {k.split(".")[0] for k in result.missing_keys} == {"da_scan"}
    with torch.no_grad():
        full.da_scan.offset.weight.zero_()
        full.da_scan.offset.bias.zero_()
    torch.testing.assert_close(out, full(x), rtol=1e-10, atol=1e-11)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(full(x), x, grad)[0])


def test_plain_mlp_and_no_position_encoding_block_wiring():
    torch.manual_seed(0)
    block = DABlock(16, mlp_ratio=2.0, conv_pos_embed=False, conv_ffn=False).eval()
    mlp = block.mlp
    assert not any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in mlp.modules())  # no depthwise conv
    assert not any(k.startswith(("pos_embed.", "mlp.conv.")) for k in block.state_dict())
    with torch.no_grad():
        block.norm2.running_mean.normal_()
        x = torch.randn(2, 16, 4, 4)
        x1 = x + block.token_mixer(block.norm1(x))                               # no x + dwconv(x) first
        h = block.norm2(x1)
        hidden = F.gelu(torch.einsum("oc,bchw->bohw", mlp.fc1.weight[:, :, 0, 0], h) + mlp.fc1.bias.view(1, -1, 1, 1))
        want = x1 + torch.einsum("co,bohw->bchw", mlp.fc2.weight[:, :, 0, 0], hidden) + mlp.fc2.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(block(x), want)


def test_each_switch_adds_exactly_its_modules_parameters_and_flops():
    """Counts from the layers' formulas (an independent tally), on a small DAMamba at 32 px."""
    dims, depths, ratios, size = (16, 32), (2, 1), (2, 3), 32
    rows = [dict(zip(("adaptive_scan", "conv_pos_embed", "conv_ffn"), switches)) for switches, _, _ in ROWS.values()]
    nets = [models.DAMamba(num_classes=10, dims=dims, depths=depths, mlp_ratios=ratios, **r) for r in rows]
    params = [sum(p.numel() for p in n.parameters()) for n in nets]
    flops = [count_flops(n, size) for n in nets]
    blocks = [(d, int(r * d), k, (size // 4 // 2 ** i) ** 2) for i, (d, k, r) in enumerate(zip(dims, depths, ratios))]
    # offset network: dwconv 3x3 + LN + Linear(C -> 2C/16); then sampling 4 per output element
    assert params[1] - params[0] == sum(k * (10 * c + 2 * c + (2 * c // 16) * (c + 1)) for c, _, k, _ in blocks)
    assert (flops[1] - flops[0]) * 1e9 == pytest.approx(
        sum(k * l * (9 * c + 5 * c + 2 * c // 16 * c + 4 * c) for c, _, k, l in blocks), rel=1e-9)
    # conv position encoding: depthwise 3x3 with bias on C channels; ConvFFN: the same on the hidden channels
    assert params[2] - params[1] == sum(k * 10 * c for c, _, k, _ in blocks)
    assert (flops[2] - flops[1]) * 1e9 == pytest.approx(sum(k * l * 9 * c for c, _, k, l in blocks), rel=1e-9)
    assert params[3] - params[2] == sum(k * 10 * hid for _, hid, k, _ in blocks)
    assert (flops[3] - flops[2]) * 1e9 == pytest.approx(sum(k * l * 9 * hid for _, hid, k, l in blocks), rel=1e-9)


# ----------------------------------------------------------------------------- row configs

@pytest.fixture(scope="module")
def femto_keys():
    with torch.device("meta"):
        return set(timm.create_model("damamba_femto").state_dict())


@pytest.mark.parametrize("name", list(ROWS))
def test_row_config_switches_and_documented_parameter_count(name, femto_keys):
    switches, count, release_count = ROWS[name]
    config = row_config(name)
    d = config.MODEL.DAMAMBA
    assert (d.ADAPTIVE_SCAN, d.CONV_POS_EMBED, d.CONV_FFN) == switches
    assert (list(d.DIMS), list(d.DEPTHS), list(d.MLP_RATIOS)) == (FEMTO["dims"], FEMTO["depths"], FEMTO["mlp_ratios"])
    with torch.device("meta"):
        model = models.build_model(config)
    assert sum(p.numel() for p in model.parameters()) == count
    constants = sum(b.numel() for n, b in model.named_buffers() if n.endswith("conv_constant"))
    assert count + constants == release_count
    # a switch only removes modules: the names that remain are the full DAMamba-F's
    assert set(model.state_dict()) <= femto_keys
    block = model.stages[2].blocks[0]
    assert (block.token_mixer.da_scan is not None, hasattr(block.pos_embed, "conv"), hasattr(block.mlp.conv, "conv")) \
        == switches


@pytest.mark.parametrize("name", list(ROWS))
def test_row_trains_forward_and_backward_on_a_tiny_input(name):
    config = row_config(name, "MODEL.NUM_CLASSES", "3", "MODEL.DAMAMBA.DIMS", "[16, 32, 48, 64]",
                        "MODEL.DAMAMBA.DEPTHS", "[1, 1, 1, 1]")
    torch.manual_seed(0)
    model = models.build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # 64 px: the last stage is 2 x 2 (on one token A_logs has no effect: the state starts at 0)
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- defaults stay the release

def test_default_switches_keep_the_release_key_table():
    release = json.loads(SPEC_KEYS.read_text())
    config = get_default_config()
    config.MODEL.TYPE = "damamba"
    assert (config.MODEL.DAMAMBA.ADAPTIVE_SCAN, config.MODEL.DAMAMBA.CONV_POS_EMBED, config.MODEL.DAMAMBA.CONV_FFN) \
        == (True, True, True)
    with torch.device("meta"):
        for model in (models.build_model(config),
                      timm.create_model("damamba_tiny", adaptive_scan=True, conv_pos_embed=True, conv_ffn=True)):
            own = {k: list(v.shape) for k, v in model.state_dict().items()}
            assert list(own) == list(release) and own == release
