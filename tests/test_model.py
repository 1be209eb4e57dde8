"""DefMamba-T/S/B: official parameter counts and state_dict layout, forward/backward, timm API, strict loading."""
import pytest
import timm
import torch

import models
from models import CheckpointError, DefMamba, load_pretrained

# parameter and state_dict tensor counts of the official checkpoints
OFFICIAL = {"defmamba_tiny": (7_547_878, 321), "defmamba_small": (30_201_340, 348), "defmamba_base": (48_595_576, 645)}


def tiny_model(**kwargs):
    args = dict(num_classes=10, embed_dim=16, depths=(1, 1, 1, 1), offset_kernels=(3, 3, 3, 3), drop_path_rate=0.0)
    args.update(kwargs)
    return DefMamba(**args)


def official_tiny_keys():
    """Every key and shape of DefMamba-T, as the official checkpoint stores them."""
    keys = {
        "patch_embed.0.weight": [24, 3, 3, 3], "patch_embed.0.bias": [24],
        "patch_embed.2.weight": [24], "patch_embed.2.bias": [24],
        "patch_embed.5.weight": [48, 24, 3, 3], "patch_embed.5.bias": [48],
        "patch_embed.7.weight": [48], "patch_embed.7.bias": [48],
        "classifier.norm.weight": [384], "classifier.norm.bias": [384],
        "classifier.head.weight": [1000, 384], "classifier.head.bias": [1000],
    }
    for i, (cin, cout) in enumerate([(48, 96), (96, 192), (192, 384)]):
        keys.update({f"layers.{i}.downsample.1.weight": [cout, cin, 3, 3], f"layers.{i}.downsample.1.bias": [cout],
                     f"layers.{i}.downsample.3.weight": [cout], f"layers.{i}.downsample.3.bias": [cout]})
    stages = [  # C, R, k, C//16, x_proj rows
        (48, 3, 9, 3, 35), (96, 6, 7, 6, 38), (192, 12, 5, 12, 44), (384, 24, 3, 24, 56)]
    for i, (depth, (c, r, k, h, rows)) in enumerate(zip([2, 2, 5, 2], stages)):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update({
                p + "norm.weight": [c], p + "norm.bias": [c],
                p + "op.x_proj_weight": [3, rows, c], p + "op.dt_projs_weight": [3, c, r],
                p + "op.dt_projs_bias": [3, c], p + "op.A_logs": [3 * c, 16], p + "op.Ds": [3 * c],
                p + "op.in_proj.weight": [2 * c, c], p + "op.conv2d.weight": [c, 1, 3, 3], p + "op.conv2d.bias": [c],
                p + "op.out_proj.weight": [c, c], p + "op.DS.rpe_table": [c, 7, 7],
                p + "op.DS.conv_offset.conv1.weight": [c, 1, k, k], p + "op.DS.conv_offset.conv1.bias": [c],
                p + "op.DS.conv_offset.ca.0.weight": [h, c], p + "op.DS.conv_offset.ca.0.bias": [h],
                p + "op.DS.conv_offset.ca.2.weight": [c, h], p + "op.DS.conv_offset.ca.2.bias": [c],
                p + "op.DS.conv_offset.ln.weight": [c], p + "op.DS.conv_offset.ln.bias": [c],
                p + "op.DS.conv_offset.conv2.weight": [3, c, 1, 1],
                p + "norm2.weight": [c], p + "norm2.bias": [c],
                p + "mlp.fc1.weight": [4 * c, c], p + "mlp.fc1.bias": [4 * c],
                p + "mlp.fc2.weight": [c, 4 * c], p + "mlp.fc2.bias": [c],
            })
    return keys


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_parameter_and_key_counts(name):
    model = timm.create_model(name)
    params, nkeys = OFFICIAL[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == nkeys


def test_tiny_state_dict_equals_official_layout():
    state = timm.create_model("defmamba_tiny").state_dict()
    expected = official_tiny_keys()
    assert {k: list(v.shape) for k, v in state.items()} == expected


def test_build_model_from_config_files():
    from config import get_default_config, load_yaml_config
    from pathlib import Path
    for name in ("tiny", "small", "base"):
        config = get_default_config()
        load_yaml_config(config, Path(f"configs/{name}.yaml"))
        model = models.build_model(config)
        assert sum(p.numel() for p in model.parameters()) == OFFICIAL[f"defmamba_{name}"][0]


def test_tiny_forward_backward_224_reaches_offset_network():
    torch.manual_seed(0)
    model = timm.create_model("defmamba_tiny")
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    for stage in model.layers:
        for block in stage.blocks:
            w = block.op.DS.conv_offset.conv2.weight.grad[:, :, 0, 0]
            assert torch.isfinite(w).all()
            assert w[:2].abs().sum() > 0, "point offsets receive no gradient"
            assert w[2].abs().sum() > 0, "index offset receives no gradient"


def test_timm_create_model_overrides_and_features():
    model = timm.create_model("defmamba_small", num_classes=7, drop_path_rate=0.3)
    assert model.get_classifier().out_features == 7
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    features = timm.create_model("defmamba_tiny", features_only=True, out_indices=(1, 3))
    outs = features(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 8, 8), (1, 384, 2, 2)]
    assert features.feature_info.channels() == [96, 384]


def test_forward_features_and_head_compose():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 128)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128)


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    plain = tiny_model()
    ckpt = tiny_model(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (plain, ckpt):
        m(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_ssm_no_weight_decay_names_exist():
    model = tiny_model()
    names = model.ssm_no_weight_decay()
    params = dict(model.named_parameters())
    assert len(names) == 4 * 4 and names <= set(params)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"A_logs", "Ds", "dt_projs_bias", "rpe_table"}


def test_load_official_format_roundtrip(tmp_path):
    src, dst = tiny_model(), tiny_model()
    path = tmp_path / "ckpt.pth"
    ema = {k: v + 1 for k, v in src.state_dict().items()}
    torch.save({"model": src.state_dict(), "model_ema": ema, "epoch": 3}, path)
    load_pretrained(dst, str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    load_pretrained(dst, str(path), use_ema=True)
    torch.testing.assert_close(dst.state_dict()["classifier.head.bias"], ema["classifier.head.bias"])
    # DDP-wrapped bare state dicts load too
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "bare.pth")
    load_pretrained(dst, str(tmp_path / "bare.pth"))


def test_missing_extra_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    missing = dict(state)
    del missing["layers.0.blocks.0.op.A_logs"]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.0\.blocks\.0\.op\.A_logs"):
        load_pretrained(model, str(tmp_path / "missing.pth"))
    extra = dict(state, **{"layers.0.blocks.0.op.outnorm.weight": torch.ones(3)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: layers\.0\.blocks\.0\.op\.outnorm\.weight"):
        load_pretrained(model, str(tmp_path / "extra.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_pretrained(model, str(tmp_path / "corrupt.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(model, str(tmp_path / "nope.pth"))
    torch.save({"model": state}, tmp_path / "noema.pth")
    with pytest.raises(CheckpointError, match="no 'model_ema' entry"):
        load_pretrained(model, str(tmp_path / "noema.pth"), use_ema=True)


def test_release_checkpoint_with_pickled_yacs_config_loads(tmp_path):
    from yacs.config import CfgNode
    model = tiny_model()
    config = CfgNode({"MODEL": CfgNode({"NAME": "defm_tiny_e300"})})
    torch.save({"model": model.state_dict(), "config": config, "epoch": 299}, tmp_path / "release.pth")
    load_pretrained(tiny_model(), str(tmp_path / "release.pth"))
