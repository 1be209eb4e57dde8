"""VMamba v2 T/S/B: the four-direction scan and the whole model against float64 re-implementations written from
the spec (per-token loops), the release's key table and counts, strict loading, timm names, configs, FLOPs."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from config import get_default_config, load_yaml_config
from models import CheckpointError, load_pretrained
from models.vmamba import SS2D, VMamba, cross_merge, cross_scan
from models.vmamba.vmamba import MODEL_ARGS

REPO = Path(__file__).resolve().parents[1]
# every state_dict key of the released VMamba-T with its shape, in the release's order (spec/vmamba_tiny_keys.json)
SPEC = json.loads((Path(__file__).resolve().parent / "data" / "vmamba_tiny_keys.json").read_text())
# the release's parameter counts, state_dict keys and ImageNet drop-path rates
RELEASE = {"vmamba_tiny": (30_249_064, 276, 0.2), "vmamba_small": (50_147_752, 402, 0.3),
           "vmamba_base": (88_557_800, 402, 0.6)}


def on_meta(name: str, **kwargs) -> VMamba:
    return timm.create_model(name, device="meta", **kwargs)


def build_from_yaml(name: str):
    config = get_default_config()
    load_yaml_config(config, REPO / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        return models.build_model(config), config


# ----------------------------------------------------------------------------- references written from the spec

def layer_norm_channels(x, weight, bias, eps=1e-5):
    """LayerNorm over dim 1 of (B, C, H, W), written out."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def pointwise(x, weight, bias=None):
    """A 1x1 projection with a 2-D (out, in) weight."""
    y = torch.einsum("oc,bchw->bohw", weight, x)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def visiting_orders(height, width):
    """The (h, w) token visited at each step of directions k0..k3: rows, columns, both reversed."""
    rows = [(h, w) for h in range(height) for w in range(width)]
    cols = [(h, w) for w in range(width) for h in range(height)]
    return [rows, cols, rows[::-1], cols[::-1]]


def four_direction_scan(u, x_proj, dt_w, dt_b, A_logs, Ds):
    """Per direction k: a step-by-step S6 recurrence from h = 0 over its visiting order, each output added back
    at the token it was read from (the merge is a plain sum). u (B, D, H, W), raw parameters as the release's."""
    batch, dim, height, width = u.shape
    n = A_logs.shape[1]
    rank = dt_w.shape[2]
    A = -torch.exp(A_logs).view(4, dim, n)
    skip = Ds.view(4, dim)
    merged = {}
    for k, order in enumerate(visiting_orders(height, width)):
        h = u.new_zeros(batch, dim, n)
        for i, j in order:
            x_t = u[:, :, i, j]
            proj = x_t @ x_proj[k].T
            dt = F.softplus(proj[:, :rank] @ dt_w[k].T + dt_b[k])
            b_t, c_t = proj[:, rank:rank + n], proj[:, rank + n:]
            h = torch.exp(dt[..., None] * A[k]) * h + dt[..., None] * b_t[:, None] * x_t[..., None]
            y = (h * c_t[:, None]).sum(-1) + skip[k] * x_t
            merged[i, j] = merged[i, j] + y if (i, j) in merged else y
    return torch.stack([torch.stack([merged[i, j] for j in range(width)], -1) for i in range(height)], -2)


def ss2d_reference(x, p, prefix):
    d_inner = p[prefix + "in_proj.weight"].shape[0]
    u = F.silu(F.conv2d(pointwise(x, p[prefix + "in_proj.weight"]), p[prefix + "conv2d.weight"], padding=1,
                        groups=d_inner))
    y = four_direction_scan(u, *(p[prefix + k] for k in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias",
                                                         "A_logs", "Ds")))
    y = layer_norm_channels(y, p[prefix + "out_norm.weight"], p[prefix + "out_norm.bias"])
    return pointwise(y, p[prefix + "out_proj.weight"])


def vmamba_reference(p, x, depths):
    """The v05_noz / ln2d classifier from the release's parameter names, channels-first."""
    def ln(t, name):
        return layer_norm_channels(t, p[name + ".weight"], p[name + ".bias"])

    def conv(t, name):
        return F.conv2d(t, p[name + ".weight"], p[name + ".bias"], stride=2, padding=1)

    x = ln(conv(F.gelu(ln(conv(x, "patch_embed.0"), "patch_embed.2")), "patch_embed.5"), "patch_embed.7")
    for i, depth in enumerate(depths):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            x = x + ss2d_reference(ln(x, b + "norm"), p, b + "op.")
            hidden = F.gelu(pointwise(ln(x, b + "norm2"), p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"]))
            x = x + pointwise(hidden, p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
        if i < len(depths) - 1:
            x = ln(conv(x, f"layers.{i}.downsample.1"), f"layers.{i}.downsample.3")
    x = ln(x, "classifier.norm").mean((2, 3))
    return x @ p["classifier.head.weight"].T + p["classifier.head.bias"]


def randomise(module, seed=0):
    """Every parameter away from its init (norms not identities, step sizes of order 1, A of varied scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if name.endswith(("A_logs", "dt_projs_bias")):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def assert_values_and_gradients(out, ref, inputs):
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-11)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- scan directions and the mixer

def test_cross_merge_is_the_adjoint_of_cross_scan():
    torch.manual_seed(0)
    u, v = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 4, 3, 20, dtype=torch.float64)
    assert cross_scan(u).shape == (2, 4, 3, 20)
    torch.testing.assert_close((cross_scan(u) * v).sum(), (u * cross_merge(v, 4, 5)).sum())
    torch.testing.assert_close(cross_merge(cross_scan(u), 4, 5), 4 * u)


@pytest.mark.parametrize("d_state, size", [(1, (3, 5)), (2, (4, 1))])
def test_ssm_matches_a_per_direction_float64_loop(d_state, size):
    torch.manual_seed(0)
    m = SS2D(16, d_state=d_state, ssm_ratio=1.5).double()
    randomise(m)
    u = torch.randn(2, m.d_inner, *size, dtype=torch.float64, requires_grad=True)
    params = [m.x_proj_weight, m.dt_projs_weight, m.dt_projs_bias, m.A_logs, m.Ds]
    assert_values_and_gradients(m.ssm(u), four_direction_scan(u, *params), [u] + params)


# ----------------------------------------------------------------------------- the whole model

def test_tiny_vmamba_matches_the_spec_in_float64_logits_and_gradients():
    depths = (1, 1, 2, 1)
    torch.manual_seed(0)
    model = VMamba(num_classes=5, embed_dim=8, depths=depths, ssm_ratio=2.0, drop_path_rate=0.0).double().eval()
    randomise(model)
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64, requires_grad=True)  # stages 4x6, 2x3, 1x2, 1x1
    params = dict(model.named_parameters())
    assert_values_and_gradients(model(x), vmamba_reference(params, x, depths), [x, *params.values()])


# ----------------------------------------------------------------------------- release layout, counts, loading

def test_tiny_keys_and_shapes_equal_the_release():
    own = {k: list(v.shape) for k, v in on_meta("vmamba_tiny").state_dict().items()}
    assert list(own) == list(SPEC["keys"])  # same names in the same order
    assert own == SPEC["keys"]


@pytest.mark.parametrize("name", list(RELEASE))
def test_timm_variant_has_the_release_counts_and_structure(name):
    params, nkeys, _ = RELEASE[name]
    model = on_meta(name)
    assert isinstance(model, VMamba) and model.pretrained_cfg["classifier"] == "classifier.head"
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == nkeys and not list(model.buffers())
    assert model.num_features == 8 * MODEL_ARGS[name]["embed_dim"]
    assert [len(stage.blocks) for stage in model.layers] == list(MODEL_ARGS[name]["depths"])
    assert model.layers[3].blocks[0].op.dt_rank == math.ceil(model.num_features / 16)
    with pytest.raises(CheckpointError, match="no downloadable weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", list(RELEASE))
def test_yaml_configs_carry_the_release_model_and_recipe(name):
    model, config = build_from_yaml(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASE[name][0]
    assert config.MODEL.TYPE == "vmamba" and config.MODEL.NAME == name
    assert config.MODEL.DROP_PATH_RATE == RELEASE[name][2] == MODEL_ARGS[name]["drop_path_rate"]
    assert config.DATA.INTERPOLATION == "bicubic" and config.TRAIN.EMA.ENABLE
    assert (config.TRAIN.BASE_LR, config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS) == (5e-4, 300, 20)
    op = model.layers[0].blocks[0].op
    assert (op.d_state, op.d_inner) == (1, int(MODEL_ARGS[name]["ssm_ratio"] * MODEL_ARGS[name]["embed_dim"]))
    assert models.input_channels(config) == 3


def small_vmamba(**kwargs) -> VMamba:
    return timm.create_model("vmamba_tiny", embed_dim=8, depths=(1, 1, 2, 1), **kwargs)


def test_checkpoint_round_trip_is_strict_and_exact(tmp_path):
    torch.manual_seed(0)
    source = small_vmamba()
    randomise(source)
    state = source.state_dict()
    bare, wrapped = tmp_path / "bare.pth", tmp_path / "wrapped.pth"
    torch.save(state, bare)
    torch.save({"model": state, "model_ema": {k: v + 1 for k, v in state.items()}, "epoch": 299}, wrapped)
    model = small_vmamba()
    load_pretrained(model, str(bare))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    load_pretrained(model, str(wrapped), use_ema=True)
    assert torch.equal(model.classifier.head.bias, state["classifier.head.bias"] + 1)
    loaded = small_vmamba(pretrained=True, pretrained_cfg_overlay=dict(file=str(wrapped)))
    assert torch.equal(loaded.layers[2].blocks[1].op.A_logs, state["layers.2.blocks.1.op.A_logs"])


def test_a_wrong_key_is_a_one_line_error(tmp_path):
    state = small_vmamba().state_dict()
    state["layers.0.blocks.0.op.x_proj.weight"] = state.pop("layers.0.blocks.0.op.x_proj_weight")
    path = tmp_path / "renamed.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(small_vmamba(), str(path))
    message = str(err.value)
    assert "\n" not in message
    assert "missing keys: layers.0.blocks.0.op.x_proj_weight" in message
    assert "unexpected keys: layers.0.blocks.0.op.x_proj.weight" in message


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="at least one stage"):
        VMamba(depths=())
    with pytest.raises(ValueError, match="no inner channels"):
        SS2D(8, ssm_ratio=0.1)


# ----------------------------------------------------------------------------- FLOPs

def test_flops_count_the_vmamba_scan_convention():
    from utils.flops import ScanFlopConvention, count_flops
    model = VMamba(num_classes=10, embed_dim=8, depths=(2, 1), ssm_ratio=2.0)
    counted = count_flops(model, 64, convention=ScanFlopConvention.VMAMBA)
    without = count_flops(model, 64, custom_ops=False)
    # per block: 9*L*D*N + D*L with D = 4 directions x d_inner, N = 1
    analytic = sum(depth * 10 * 4 * 2 * dim * (16 // 2 ** i) ** 2 for i, (depth, dim) in enumerate([(2, 8), (1, 16)]))
    assert counted - without == pytest.approx(analytic / 1e9, rel=1e-9)


def test_flops_cli_uses_the_vmamba_convention_for_vmamba_configs(capsys):
    from utils.flops import main
    assert main(["--cfg", "configs/demo_vmamba.yaml", "--img-size", "32"]) == 0
    assert "(scan convention: vmamba)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- dense backbone

def test_backbone_loads_a_classifier_and_returns_normalised_stage_outputs(tmp_path):
    """VMambaBackbone: the classification keys minus classifier.*, plus outnorm{i}; stage outputs before the
    downsampling through a channel LayerNorm (eps 1e-5), NCHW, checked against the classifier's own modules."""
    from models.vmamba.backbone import VMambaBackbone

    kwargs = dict(embed_dim=8, depths=(1, 1, 2, 1), drop_path_rate=0.0)
    torch.manual_seed(0)
    classifier = VMamba(num_classes=10, **kwargs).eval()
    path = tmp_path / "imagenet.pth"
    torch.save({"model": classifier.state_dict()}, path)
    backbone = VMambaBackbone(out_indices=(0, 2, 3), pretrained=str(path), **kwargs).eval()
    with torch.no_grad():
        backbone.outnorm2.weight.uniform_(0.5, 1.5)   # a non-trivial norm: must survive loading
    expected = {k for k in classifier.state_dict() if not k.startswith("classifier.")}
    expected |= {f"outnorm{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    assert set(backbone.state_dict()) == expected and backbone.out_channels == [8, 32, 64]

    report = backbone.init_weights()
    assert report.skipped_head == [k for k in classifier.state_dict() if k.startswith("classifier.")]
    assert report.initialised_norms == [f"outnorm{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
        h, ref = classifier.patch_embed(x), []
        for i, stage in enumerate(classifier.layers):
            h = stage.blocks(h)
            if i in (0, 2, 3):
                norm = getattr(backbone, f"outnorm{i}")
                ref.append(layer_norm_channels(h, norm.weight, norm.bias))
            h = stage.downsample(h)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 24), (2, 32, 4, 6), (2, 64, 2, 3)]
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_indices"):
        VMambaBackbone(out_indices=(2, 1), **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        VMambaBackbone(num_classes=3, **kwargs)
