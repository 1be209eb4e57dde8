"""Every model this project registers with timm behaves as timm's own model tests and tools expect.

The checks follow what timm's tests/test_models.py asks of a model (forward, backward, default cfgs and the
head API, features_only, forward_intermediates, pruning, torch.fx), sized so that CI stays fast: what differs
between the variants of a family (cfg, pool size, channels, which parameters exist) is checked for every
registered model, on the meta device at the default 224 px or at 32 px; the family's mechanics (FX, head
modes, dtypes, checkpointing, pruning) on one small member per family that has every optional part.
TorchScript is not supported (the custom ops and the data-dependent token orders are not scriptable).
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules, model_entrypoint
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import models  # noqa: F401  (registers the models)

OURS = sorted(name for name in timm.list_models() if model_entrypoint(name).__module__.startswith("models."))
# one small member per family, with every optional part (DAMamba: the layer scales of S and B)
TINY = {"defmamba_tiny": dict(embed_dim=8, depths=(1, 1, 2, 1)),
        "damamba_tiny": dict(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), layer_scale_stages=(2, 3)),
        "vmamba_tiny": dict(embed_dim=8, depths=(1, 1, 2, 1)),
        "mamba_adaptor_b1": dict(embed_dim=8, depths=(1, 1, 2, 1))}
IMG = 64    # stage 4 is 2 x 2
SMALL = 32  # stage 4 is 1 x 1
TRACER = dict(leaf_modules=list(get_notrace_modules()), autowrap_functions=list(get_notrace_functions()),
              param_shapes_constant=True)


def test_every_family_is_covered():
    assert {name.split("_")[0] for name in OURS} == {"defmamba", "damamba", "vmamba", "mamba"}
    assert {name.split("_")[0] for name in TINY} == {name.split("_")[0] for name in OURS}


def _axes(model):
    return get_spatial_dim(model.output_fmt), get_channel_dim(model.output_fmt)


@pytest.mark.parametrize("name", OURS)
def test_default_cfg_and_head_api(name):
    """On the meta device (no weights allocated): cfg, unpooled features, pre-logits, classifier resets."""
    model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    assert model.in_chans == cfg["input_size"][0] and model.num_classes == cfg["num_classes"]
    spatial, channel = _axes(model)
    feats = model.forward_features(torch.empty(1, *cfg["input_size"], device="meta"))
    assert feats.dim() == 4 and feats.shape[channel] == model.num_features
    assert tuple(feats.shape[a] for a in spatial) == tuple(cfg["pool_size"])
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model.forward_head(feats).shape == (1, model.head_hidden_size)
    model.reset_classifier(0, "")
    assert model.forward_head(feats).shape == feats.shape  # the unpooled map


    # a new classifier follows the model's device, dtype and mode
    model.to(dtype=torch.float64).reset_classifier(7, "avg")
    linear = model.get_classifier()
    assert (linear.weight.device.type, linear.weight.dtype, linear.training) == ("meta", torch.float64, False)
    assert model.forward_head(feats.double()).shape == (1, 7)

    headless = timm.create_model(name, num_classes=0, global_pool="", device="meta")
    assert headless.forward_head(feats).shape == feats.shape
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_argument=1)


@pytest.mark.parametrize("name", OURS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, 3, SMALL, SMALL))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_head_modes_and_dtype(name):
    """Unpooled outputs by reset_classifier(0, '') and by the constructor; bf16 stays bf16 end to end."""
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY[name]).eval()
    x = torch.randn(2, 3, IMG, IMG)
    spatial, _ = _axes(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0, "")
        unpooled = model(x)
        headless = timm.create_model(name, num_classes=0, global_pool="", **TINY[name]).eval()
        missing, unexpected = headless.load_state_dict(model.state_dict(), strict=False)
        assert not missing and all(k.startswith(model.pretrained_cfg["classifier"]) for k in unexpected)
        torch.testing.assert_close(headless(x), unpooled)
        assert tuple(unpooled.shape[a] for a in spatial) == tuple(feats.shape[a] for a in spatial) == (2, 2)
        model.reset_classifier(5, "avg")
        assert model.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(TINY))
def test_checkpointing_and_fx(name):
    """Checkpointed blocks and an FX-traced copy give the eager outputs; the traced copy trains."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, **TINY[name]).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)  # grad on: blocks are recomputed
    model.set_grad_checkpointing(False)

    # torch.fx through torchvision's feature extraction, with timm's (and our) leaf modules
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER)
    fx_model = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                        eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=TRACER)
    with torch.no_grad():
        assert torch.equal(next(iter(fx_model.eval()(x).values())), ref)
    fx_model.train()
    next(iter(fx_model(x).values())).mean().backward()
    assert all(p.grad is not None for p in fx_model.parameters())


@pytest.mark.parametrize("name", OURS)
def test_features_only_and_forward_intermediates(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        torch.manual_seed(0)  # the same weights
        backbone = timm.create_model(name, features_only=True).eval()
        features = backbone(x)
    assert len(inter) == len(features) == len(info.channels()) == 4
    for channels, reduction, a, b in zip(info.channels(), info.reduction(), inter, features):
        assert a.shape == b.shape == (1, channels, math.ceil(SMALL / reduction), math.ceil(SMALL / reduction))
        torch.testing.assert_close(a, b)
    assert backbone.feature_info.channels() == info.channels()


@pytest.mark.parametrize("name", sorted(TINY))
def test_prune_intermediate_layers(name):
    """Pruned to stage i, a model returns the unpruned tap i, its forward_features ends there, nothing is unused."""
    model = timm.create_model(name, **TINY[name]).eval()
    x = torch.randn(2, 3, IMG, IMG)
    spatial, channel = _axes(model)
    with torch.no_grad():
        taps = model.forward_intermediates(x, output_fmt=model.output_fmt, intermediates_only=True)
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([3], prune_head=False)
        torch.testing.assert_close(kept(x), model(x))
    for i in range(4):
        with torch.no_grad():
            early = model.forward_intermediates(x, indices=[i], stop_early=True, output_fmt=model.output_fmt,
                                                intermediates_only=True)
            torch.testing.assert_close(early[0], taps[i])
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([i], prune_norm=True) == [i]
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_features(x), taps[i])
        pruned.train()
        selected = pruned.forward_intermediates(x, indices=[i], output_fmt=model.output_fmt, intermediates_only=True)
        (selected[0].sum() + pruned(x).sum()).backward()
        unused = [n for n, p in pruned.named_parameters() if p.grad is None]
        assert not unused, f"pruned to {i}: unused {unused[:5]}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_feature_info_modules_are_the_stage_outputs(name):
    """torchvision / timm FX feature extraction at the feature_info modules gives forward_intermediates' maps."""
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY[name]).eval()
    nodes = [info["module"] for info in model.feature_info]
    extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=TRACER)
    torch.manual_seed(0)  # the same weights
    fx_backbone = timm.create_model(name, features_only=True, feature_cls="fx", **TINY[name]).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        expected = model.forward_intermediates(x, output_fmt=model.output_fmt, intermediates_only=True)
        for got in (list(extractor(x).values()), fx_backbone(x)):
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b)
