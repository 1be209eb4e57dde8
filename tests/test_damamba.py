"""DAMamba-T/S/B: release counts and key layout, strict loading, adaptive sampling against F.grid_sample,
the DASSM mixer against a float64 recurrence, training, torch.compile."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from config import get_default_config, load_yaml_config
from models import CheckpointError, DAMamba, load_pretrained
from models.ops.adaptive import adaptive_sample
from models.damamba import DABlock
from models.damamba.layers import ResDWC
from models.damamba.dassm import DASSM
from sampling_reference import grid_sample_reference

REPO = Path(__file__).resolve().parents[1]
# every state_dict key of the released DAMamba-T with its shape, in the release's order
SPEC_KEYS = Path(__file__).resolve().parent / "data" / "damamba_tiny_keys.json"

# the release's counts: all its parameters (the frozen conv_constant kernels included), state_dict keys,
# and the MESA weight of its recipe
RELEASE = {"damamba_tiny": (25_440_302, 875, 1.0), "damamba_small": (44_992_564, 1403, 1.5),
           "damamba_base": (85_714_298, 1655, 2.0)}


def tiny_model(**kwargs) -> DAMamba:
    args = dict(num_classes=10, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
                drop_path_rate=0.0)
    args.update(kwargs)
    return DAMamba(**args)


def on_meta(name: str, **kwargs) -> DAMamba:
    """The model built on the meta device: shapes and counts without allocating or initialising weights."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def build_from_yaml(name: str) -> DAMamba:
    config = get_default_config()
    load_yaml_config(config, REPO / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        return models.build_model(config), config


# ----------------------------------------------------------------------------- layout and loading

@pytest.mark.parametrize("name", list(RELEASE))
def test_release_parameter_and_key_counts(name):
    params, nkeys, _ = RELEASE[name]
    for model in (on_meta(name), build_from_yaml(name)[0]):
        # the release's frozen identity kernels are persistent buffers here: every parameter trains
        constants = [b for n, b in model.named_buffers() if n.endswith("conv_constant")]
        assert constants and all(p.requires_grad for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in constants) == params
        assert len(model.state_dict()) == nkeys


@pytest.mark.parametrize("name", list(RELEASE))
def test_yaml_configs_carry_the_release_recipe(name):
    model, config = build_from_yaml(name)
    assert config.MODEL.TYPE == "damamba" and config.MODEL.NAME == name
    assert config.TRAIN.MESA == RELEASE[name][2] and config.TRAIN.MESA_START == 0.25
    assert config.MODEL.DROP_PATH_RATE == models.damamba.damamba.MODEL_ARGS[name]["drop_path_rate"]
    assert config.DATA.INTERPOLATION == "bicubic"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in on_meta(name).state_dict().items()}


def test_tiny_keys_and_shapes_equal_the_release():
    release = json.loads(SPEC_KEYS.read_text())
    own = {k: list(v.shape) for k, v in on_meta("damamba_tiny").state_dict().items()}
    assert list(own) == list(release)  # same names in the same order
    assert own == release


def release_state_dict(seed: int = 0) -> dict:
    """Random tensors under the release's DAMamba-T names and shapes (from the release's key list in tests/data, not from our model)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in json.loads(SPEC_KEYS.read_text()).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    return state


@pytest.mark.parametrize("layout", ["bare", "model", "model_ema"])
def test_release_checkpoint_loads_strictly(layout, tmp_path):
    state = release_state_dict()
    path = tmp_path / "damamba_tiny.pth"
    torch.save(state if layout == "bare" else {layout: state, "epoch": 299}, path)
    model = timm.create_model("damamba_tiny")
    load_pretrained(model, str(path), use_ema=layout == "model_ema")
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    # the loaded (here non-identity) conv_constant is kept as it is (ResDWC test: the forward uses it)
    constant = model.stages[0].blocks[0].pos_embed.conv_constant
    assert torch.equal(constant, state["stages.0.blocks.0.pos_embed.conv_constant"])


def test_wrong_variant_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"model": release_state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(on_meta("damamba_small"), str(path))
    message = str(err.value)
    assert "\n" not in message
    assert "missing keys: stages.0.blocks.3." in message  # S has 4 stage-0 blocks, T 3
    assert "shape mismatch: stem.0.weight (40, 3, 3, 3) vs model (48, 3, 3, 3)" in message


# ----------------------------------------------------------------------------- adaptive sampling


@pytest.mark.parametrize("size", [(5, 7), (1, 4), (3, 1), (1, 1)])
def test_adaptive_sample_matches_grid_sample_values_and_gradients(size):
    torch.manual_seed(0)
    height, width = size
    x = torch.randn(2, 32, height, width, dtype=torch.float64, requires_grad=True)
    # scale 2.5: many points land partly or wholly outside the map
    offsets = (torch.randn(2, height, width, 4, dtype=torch.float64) * 2.5).requires_grad_()
    grad = torch.randn(2, 32, height, width, dtype=torch.float64)

    out = adaptive_sample(x, offsets)
    ref = grid_sample_reference(x, offsets)
    assert (offsets.abs() > max(size)).any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    dx, doff = torch.autograd.grad(out, (x, offsets), grad)
    rdx, rdoff = torch.autograd.grad(ref, (x, offsets), grad)
    torch.testing.assert_close(dx, rdx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(doff, rdoff, rtol=1e-10, atol=1e-12)


def test_zero_offsets_keep_every_token_in_place():
    x = torch.randn(1, 16, 4, 6)
    torch.testing.assert_close(adaptive_sample(x, torch.zeros(1, 4, 6, 2)), x)


def test_adaptive_sample_rejects_bad_offsets():
    with pytest.raises(ValueError, match="offsets must be"):
        adaptive_sample(torch.zeros(1, 32, 4, 4), torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match="cannot be split"):
        adaptive_sample(torch.zeros(1, 30, 4, 4), torch.zeros(1, 4, 4, 8))


# ----------------------------------------------------------------------------- DASSM, ResDWC, block

def dassm_reference(m: DASSM, x: torch.Tensor) -> torch.Tensor:
    """DASSM written out from the paper and the release (Sec. 3 of the paper) with F.grid_sample and a step-by-step float64 recurrence."""
    batch, dim, height, width = x.shape
    u = F.silu(F.conv2d(F.conv2d(x, m.in_proj.weight), m.conv2d.weight, m.conv2d.bias, padding=1, groups=dim))
    conv, ln = m.da_scan.dw_conv[0], m.da_scan.dw_conv[1][1]
    off = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=dim).permute(0, 2, 3, 1)
    off = F.linear(F.gelu(F.layer_norm(off, (dim,), ln.weight, ln.bias, eps=1e-6)),
                   m.da_scan.offset.weight, m.da_scan.offset.bias)
    u = grid_sample_reference(u, off).flatten(2)                                  # (B, C, L), raster order
    rank = m.dt_rank
    x_dbl = torch.einsum("rc,bcl->brl", m.x_proj_weight, u)
    delta = F.softplus(torch.einsum("cr,brl->bcl", m.dt_projs_weight, x_dbl[:, :rank]) + m.dt_projs_bias[:, None])
    a = -torch.exp(m.A_logs[:, 0])
    h = torch.zeros(batch, dim, dtype=x.dtype)
    ys = []
    for t in range(height * width):
        h = torch.exp(delta[:, :, t] * a) * h + delta[:, :, t] * x_dbl[:, rank, t, None] * u[:, :, t]
        ys.append(h * x_dbl[:, rank + 1, t, None] + m.Ds * u[:, :, t])
    y = torch.stack(ys, -1).view(batch, dim, height, width).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (dim,), m.out_norm.norm.weight, m.out_norm.norm.bias, eps=1e-6).permute(0, 3, 1, 2)
    return F.conv2d(y, m.out_proj.weight)


def test_dassm_matches_a_float64_recurrence_forward_and_backward():
    torch.manual_seed(0)
    m = DASSM(32).double()
    with torch.no_grad():  # offsets of a few pixels, so the sampling really moves the tokens
        m.da_scan.offset.weight.normal_(0, 1.0)
        m.da_scan.offset.bias.normal_(0, 1.0)
        m.A_logs.normal_(0, 0.5)
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 32, 4, 5, dtype=torch.float64)
    out, ref = m(x), dassm_reference(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-11)
    params = [p for p in m.parameters()]
    got = torch.autograd.grad(out, [x] + params, grad)
    want = torch.autograd.grad(ref, [x] + params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11)


def test_resdwc_is_x_plus_depthwise_conv_and_honours_a_loaded_constant():
    torch.manual_seed(0)
    m = ResDWC(8)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(m(x), x + m.conv(x))
    m.load_state_dict({**m.state_dict(), "conv_constant": 3 * m.conv_constant.detach()})
    torch.testing.assert_close(m(x), 3 * x + m.conv(x))


def test_block_wiring_with_layer_scale():
    torch.manual_seed(0)
    block = DABlock(16, mlp_ratio=2.0, layer_scale=0.5).eval()
    with torch.no_grad():
        block.layer_scale_1.uniform_(0.1, 1.0)
        block.layer_scale_2.uniform_(0.1, 1.0)
        block.norm2.running_mean.normal_()
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        x1 = x + block.pos_embed.conv(x)
        x2 = x1 + block.layer_scale_1.view(1, -1, 1, 1) * block.token_mixer(block.norm1(x1))
        want = x2 + block.layer_scale_2.view(1, -1, 1, 1) * block.mlp(block.norm2(x2))
        torch.testing.assert_close(block(x), want)


# ----------------------------------------------------------------------------- whole model

def test_intermediates_are_the_normalised_stage_outputs_and_feed_the_head():
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (32, 8, 8), (48, 4, 4), (64, 2, 2)]
        for f in feats:  # each after its LayerNorm over channels
            torch.testing.assert_close(f.mean(1), torch.zeros_like(f.mean(1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_head(feats[-1]), model(x))
    backbone = timm.create_model("damamba_tiny", features_only=True, pretrained=False)
    assert backbone.feature_info.channels() == [80, 160, 320, 512]


def test_tiny_damamba_trains_on_the_cpu():
    torch.manual_seed(0)
    model = tiny_model(num_classes=4)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    constant = model.stages[0].blocks[0].pos_embed.conv_constant  # a buffer: the optimizer never moves it
    assert not constant.requires_grad and constant.flatten().tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]


def test_damamba_tiny_forward_backward_at_224():
    torch.manual_seed(0)
    model = timm.create_model("damamba_tiny", drop_path_rate=0.0)  # batch 1: drop path would zero whole blocks
    logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []  # every trainable parameter, the offset networks included, gets a gradient


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    # two stages at 16 px keep inductor's code generation short; every DAMamba operation is still in the graph
    model = tiny_model(dims=(16, 32), depths=(1, 1), mlp_ratios=(2, 2)).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by head_dim"):
        tiny_model(dims=(24, 32, 48, 64))
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_model(depths=(1, 1, 1))
    with pytest.raises(ValueError, match="layer_scale_stages"):
        tiny_model(layer_scale_stages=(4,))


# ----------------------------------------------------------------------------- FLOPs

def test_flops_count_scan_and_sampling_analytically():
    from utils.flops import count_flops
    model = tiny_model(dims=(16, 32), depths=(2, 1), mlp_ratios=(2, 2))
    with_ops, without = count_flops(model, 64), count_flops(model, 64, custom_ops=False)
    # per block: scan 3*C*L*N + 2.5*C*L with N = 1 (release convention), sampling 4 per output element
    analytic = sum(depth * (5.5 + 4) * dim * (16 // 2 ** i) ** 2 for i, (depth, dim) in enumerate([(2, 16), (1, 32)]))
    assert with_ops - without == pytest.approx(analytic / 1e9, rel=1e-9)

