"""Dense prediction: the DefMamba, VMamba and Mamba-Adaptor backbones (keys, ImageNet loading, features) and, with
the dense extras installed, Mask R-CNN and UperNet built from the real configs, the torchvision route for mmcv's
ops, the entry points."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

import models
from models import (CheckpointError, DefMamba, DefMambaBackbone, MambaAdaptor, MambaAdaptorBackbone, VMamba,
                    VMambaBackbone)
from test_model import official_tiny_keys

REPO = Path(__file__).resolve().parents[1]
HAS_MM = all(importlib.util.find_spec(m) is not None for m in ("mmengine", "mmcv", "mmdet", "mmseg"))
needs_mm = pytest.mark.skipif(not HAS_MM, reason="dense extras not installed (pip install -r requirements-dense.txt)")

TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), offset_kernels=(3, 3, 3, 3))
VARIANTS = {"tiny": (48, (2, 2, 5, 2)), "small": (96, (2, 2, 6, 2)), "base": (96, (2, 3, 16, 2))}
# the VMamba-based families at test size (Mamba-Adaptor with both adaptors in every stage, its default)
VM_TINY = dict(embed_dim=8, depths=(1, 1, 1, 1))
# config name prefix: (classifier, backbone, {variant: (embed_dim, depths, ssm_ratio, drop path, checkpoint)})
VMAMBA_FAMILIES = {
    "vmamba": (VMamba, VMambaBackbone, {
        "tiny": (96, (2, 2, 8, 2), 1.0, 0.2, "pretrained/vmamba_tiny.pth"),
        "small": (96, (2, 2, 15, 2), 2.0, 0.3, "pretrained/vmamba_small.pth"),
        "base": (128, (2, 2, 15, 2), 2.0, 0.6, "pretrained/vmamba_base.pth")}),
    "mamba-adaptor": (MambaAdaptor, MambaAdaptorBackbone, {
        "b1": (48, (2, 2, 8, 2), 1.0, 0.1, "pretrained/mamba_adaptor_b1.pth"),
        "b2": (96, (2, 2, 9, 2), 1.0, 0.2, "pretrained/mamba_adaptor_b2.pth")}),
}


# ---------------------------------------------------------------- backbone (no mm* needed)

def test_backbone_keys_are_release_names():
    """DefMamba-T backbone: classification keys minus classifier.*, plus outnorm{i} of shape [C_i] (the release's dense backbone)."""
    expected = {k: v for k, v in official_tiny_keys().items() if not k.startswith("classifier.")}
    for i, c in enumerate((48, 96, 192, 384)):
        expected.update({f"outnorm{i}.weight": [c], f"outnorm{i}.bias": [c]})
    backbone = DefMambaBackbone(embed_dim=48, depths=(2, 2, 5, 2))
    got = {k: list(v.shape) for k, v in backbone.state_dict().items()}
    assert got == expected
    assert len(got) == 321 - 4 + 8
    assert backbone.out_channels == [48, 96, 192, 384]


def _reference_features(classifier: DefMamba, norms: Dict[int, torch.nn.LayerNorm], x: torch.Tensor) -> List:
    """Stage outputs before downsampling, written out from the classifier's modules, normalised, NCHW."""
    x = classifier.patch_embed(x)
    out = []
    for i, stage in enumerate(classifier.layers):
        for block in stage.blocks:
            x = block(x)
        if i in norms:
            out.append(F.layer_norm(x, x.shape[-1:], norms[i].weight, norms[i].bias, 1e-5).permute(0, 3, 1, 2))
        x = stage.downsample(x)
    return out


def test_imagenet_checkpoint_loads_strictly_except_head_and_new_norms(tmp_path):
    torch.manual_seed(0)
    classifier = DefMamba(num_classes=10, drop_path_rate=0.0, **TINY).eval()
    path = tmp_path / "imagenet.pth"
    torch.save({"model": classifier.state_dict(), "model_ema": classifier.state_dict()}, path)

    backbone = DefMambaBackbone(out_indices=(1, 2, 3), pretrained=str(path), drop_path_rate=0.0, **TINY).eval()
    with torch.no_grad():
        backbone.outnorm2.weight.uniform_(0.5, 1.5)  # a non-trivial norm: must survive loading
        kept = backbone.outnorm2.weight.clone()
    report = backbone.init_weights()
    assert torch.equal(backbone.outnorm2.weight, kept)
    assert "classifier.head.weight" in str(report) and "outnorm1.weight" in str(report)
    _check_loaded_backbone(classifier, backbone, report, _reference_features)


def _check_loaded_backbone(classifier, backbone, report, reference) -> None:
    """The backbone (out_indices 1-3, tiny widths 8 * 2**i) holds every classifier weight but the head, its new
    norms were left alone, and its features equal `reference`(classifier, norms, x) on a 64 x 96 input."""
    head = [k for k in classifier.state_dict() if k.startswith("classifier.")]
    assert report.skipped_head == head == ["classifier.norm.weight", "classifier.norm.bias",
                                           "classifier.head.weight", "classifier.head.bias"]
    assert report.initialised_norms == [f"outnorm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    assert report.loaded == len(classifier.state_dict()) - len(head)
    for key, value in classifier.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(backbone.state_dict()[key], value), key

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
        ref = reference(classifier, {i: getattr(backbone, f"outnorm{i}") for i in (1, 2, 3)}, x)
    # strides 8, 16, 32 of a 64 x 96 input
    assert [tuple(f.shape) for f in feats] == [(2, 16, 8, 12), (2, 32, 4, 6), (2, 64, 2, 3)]
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_imagenet_loading_rejects_other_mismatches_without_loading(tmp_path):
    classifier = DefMamba(num_classes=10, **TINY)
    backbone = DefMambaBackbone(**TINY)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    state = classifier.state_dict()

    missing = {k: v for k, v in state.items() if k != "layers.1.blocks.0.op.A_logs"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.blocks\.0\.op\.A_logs"):
        backbone.load_imagenet(str(tmp_path / "missing.pth"))

    torch.save({"model": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        backbone.load_imagenet(str(tmp_path / "extra.pth"))

    wider = DefMamba(num_classes=10, **{**TINY, "embed_dim": 16}).state_dict()
    torch.save({"model": wider}, tmp_path / "wider.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch: patch_embed\.0\.weight"):
        backbone.load_imagenet(str(tmp_path / "wider.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        backbone.load_imagenet(str(tmp_path / "nothing.pth"))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load"


def test_backbone_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="out_indices"):
        DefMambaBackbone(out_indices=(2, 1), **TINY)
    with pytest.raises(ValueError, match="out_indices"):
        DefMambaBackbone(out_indices=(0, 4), **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        DefMambaBackbone(num_classes=10, **TINY)


def test_models_package_imports_without_mm_packages():
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mmengine', 'mmcv', 'mmdet', 'mmseg'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import models\n"
        "b = models.DefMambaBackbone(embed_dim=8, depths=(1, 1, 1, 1), offset_kernels=(3, 3, 3, 3))\n"
        "models.VMambaBackbone(embed_dim=8, depths=(1, 1, 1, 1))\n"
        "models.MambaAdaptorBackbone(embed_dim=8, depths=(1, 1, 1, 1))\n"
        "assert not {m.split('.')[0] for m in sys.modules} & {'mmengine', 'mmcv', 'mmdet', 'mmseg'}\n"
        "print(b.out_channels)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[8, 16, 32, 64]"


# ---------------------------------------------------------------- VMamba and Mamba-Adaptor backbones (no mm* needed)

def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value (Adaptor-T's predictor starts at zero), scaled to stay stable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _reference_vmamba_features(classifier: VMamba, norms: Dict[int, torch.nn.Module], x: torch.Tensor) -> List:
    """Stage outputs before downsampling, from the classifier's own modules, each layer-normed over channels."""
    x = classifier.patch_embed(x)
    out = []
    for i, stage in enumerate(classifier.layers):
        for block in stage.blocks:
            x = block(x)
        if i in norms:
            channels_last = x.permute(0, 2, 3, 1)
            normed = F.layer_norm(channels_last, channels_last.shape[-1:], norms[i].weight, norms[i].bias, 1e-5)
            out.append(normed.permute(0, 3, 1, 2))
        x = stage.downsample(x)
    return out


@pytest.mark.parametrize("family", list(VMAMBA_FAMILIES))
def test_vmamba_family_backbone_keys_are_the_classifier_keys_plus_outnorms(family):
    classifier_cls, backbone_cls, _ = VMAMBA_FAMILIES[family]
    classifier_keys = {k: list(v.shape) for k, v in classifier_cls(num_classes=10, **VM_TINY).state_dict().items()}
    expected = {k: v for k, v in classifier_keys.items() if not k.startswith("classifier.")}
    for i, c in enumerate((8, 16, 32, 64)):
        expected.update({f"outnorm{i}.weight": [c], f"outnorm{i}.bias": [c]})
    backbone = backbone_cls(**VM_TINY)
    assert {k: list(v.shape) for k, v in backbone.state_dict().items()} == expected
    assert backbone.out_channels == [8, 16, 32, 64]
    assert [info["reduction"] for info in backbone.feature_info] == [4, 8, 16, 32]
    if family == "mamba-adaptor":  # the adaptors are part of the backbone
        assert any(".op.adaptor_t." in k for k in expected) and any(".op.adaptor_s." in k for k in expected)


@pytest.mark.parametrize("family", list(VMAMBA_FAMILIES))
def test_vmamba_family_backbone_loads_imagenet_and_matches_the_classifier_stages(family, tmp_path):
    classifier_cls, backbone_cls, _ = VMAMBA_FAMILIES[family]
    torch.manual_seed(0)
    classifier = _randomised(classifier_cls(num_classes=10, drop_path_rate=0.0, **VM_TINY)).eval()
    path = tmp_path / "imagenet.pth"
    torch.save({"model": classifier.state_dict()}, path)

    backbone = backbone_cls(out_indices=(1, 2, 3), pretrained=str(path), drop_path_rate=0.0, **VM_TINY).eval()
    with torch.no_grad():
        backbone.outnorm2.weight.uniform_(0.5, 1.5)  # a non-trivial norm: must survive loading
        kept = backbone.outnorm2.weight.clone()
    report = backbone.init_weights()
    assert torch.equal(backbone.outnorm2.weight, kept)
    _check_loaded_backbone(classifier, backbone, report, _reference_vmamba_features)


def test_wrong_family_checkpoints_are_one_line_errors_without_loading(tmp_path):
    """A VMamba checkpoint lacks the adaptors of Mamba-Adaptor; a DefMamba one is another model altogether."""
    adaptor = MambaAdaptorBackbone(**VM_TINY)
    vmamba = VMambaBackbone(**VM_TINY)
    torch.save({"model": VMamba(num_classes=10, **VM_TINY).state_dict()}, tmp_path / "vmamba.pth")
    torch.save({"model": DefMamba(num_classes=10, **TINY).state_dict()}, tmp_path / "defmamba.pth")
    torch.save({"model": VMamba(num_classes=10, embed_dim=16, depths=(1, 1, 1, 1)).state_dict()},
               tmp_path / "wider.pth")
    cases = [(adaptor, "vmamba.pth", r"missing keys: layers\.0\.blocks\.0\.op\.adaptor_t\."),
             (vmamba, "defmamba.pth", r"does not match the model: .*unexpected keys: .*\.op\.DS\."),
             (vmamba, "wider.pth", r"shape mismatch: patch_embed\.0\.weight")]
    for backbone, name, pattern in cases:
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        with pytest.raises(CheckpointError, match=pattern) as err:
            backbone.load_imagenet(str(tmp_path / name))
        message = str(err.value)
        assert "\n" not in message and str(tmp_path / name) in message and len(message) < 1000, message
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, before[key]), f"{key} changed by a failed load of {name}"


# ---------------------------------------------------------------- mm* (dense extras)

@pytest.fixture(scope="module")
def dense():
    import dense as package
    return package


def _config(path: str):
    from mmengine.config import Config
    return Config.fromfile(str(REPO / path))


DET_CONFIGS = [f"configs/detection/mask-rcnn_defmamba-{v}_fpn_{s}_coco.py" for v in VARIANTS for s in ("1x", "ms-3x")]
SEG_CONFIGS = [f"configs/segmentation/upernet_defmamba-{v}_8xb2-160k_ade20k-512x512.py" for v in VARIANTS]


@needs_mm
@pytest.mark.parametrize("path", DET_CONFIGS + SEG_CONFIGS)
def test_configs_carry_the_release_recipe(dense, path):
    cfg = _config(path)
    variant = next(v for v in VARIANTS if f"-{v}_" in path)
    dim, depths = VARIANTS[variant]
    channels = [dim * 2 ** i for i in range(4)]
    backbone = cfg.model.backbone
    assert backbone.type == "DefMambaBackbone" and backbone.embed_dim == dim and tuple(backbone.depths) == depths
    assert set(backbone) == {"type", "embed_dim", "depths", "drop_path_rate", "out_indices", "pretrained"}
    assert backbone.pretrained == f"pretrained/defmamba_{variant}.pth"
    assert "dense" in cfg.custom_imports.imports
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == "AdamW" and optim.paramwise_cfg.norm_decay_mult == 0.0
    assert optim.paramwise_cfg.custom_keys["norm"] == dict(decay_mult=0.0)
    assert cfg.train_dataloader.batch_size == 2
    if path.startswith("configs/detection"):
        assert cfg.default_scope == "mmdet" and cfg.model.type == "MaskRCNN"
        assert (optim.optimizer.lr, optim.optimizer.weight_decay, backbone.drop_path_rate) == (1e-4, 0.05, 0.2)
        assert cfg.model.neck.in_channels == channels
        epochs, milestones = (12, [8, 11]) if "_1x_" in path else (36, [27, 33])
        assert cfg.train_cfg.max_epochs == epochs and cfg.param_scheduler[1].milestones == milestones
    else:
        assert cfg.default_scope == "mmseg" and cfg.model.decode_head.type == "UPerHead"
        assert (optim.optimizer.lr, optim.optimizer.weight_decay, backbone.drop_path_rate) == (6e-5, 0.01, 0.3)
        assert cfg.model.decode_head.in_channels == channels and cfg.model.auxiliary_head.in_channels == channels[2]
        assert cfg.model.decode_head.num_classes == 150 and cfg.train_cfg.max_iters == 160000
        warmup, poly = cfg.param_scheduler
        assert (warmup.type, warmup.end, poly.type, poly.power, poly.end) == ("LinearLR", 1500, "PolyLR", 1.0, 160000)


# (config, family, variant) of the VMamba and Mamba-Adaptor configs
FAMILY_CONFIGS = [
    (f"configs/detection/mask-rcnn_{family}-{v}_fpn_{s}_coco.py", family, v)
    for family, (_, _, variants) in VMAMBA_FAMILIES.items() for v in variants for s in ("1x", "ms-3x")
] + [
    (f"configs/segmentation/upernet_{family}-{v}_8xb2-160k_ade20k-512x512.py", family, v)
    for family, (_, _, variants) in VMAMBA_FAMILIES.items() for v in variants
]


def _defmamba_counterpart(path: str) -> str:
    """The DefMamba-S config of the same model and schedule (the recipe every family shares)."""
    if path.startswith("configs/detection"):
        return f"configs/detection/mask-rcnn_defmamba-small_fpn_{'1x' if '_1x_' in path else 'ms-3x'}_coco.py"
    return SEG_CONFIGS[1]


@needs_mm
@pytest.mark.parametrize("path, family, variant", FAMILY_CONFIGS)
def test_family_configs_are_the_defmamba_recipe_with_their_backbone(dense, path, family, variant):
    cfg, ref = _config(path), _config(_defmamba_counterpart(path))
    dim, depths, ratio, drop_path, checkpoint = VMAMBA_FAMILIES[family][2][variant]
    channels = [dim * 2 ** i for i in range(4)]
    backbone = cfg.model.backbone
    assert backbone.to_dict() == dict(type=VMAMBA_FAMILIES[family][1].__name__, embed_dim=dim, depths=depths,
                                      ssm_ratio=ratio, drop_path_rate=drop_path, out_indices=(0, 1, 2, 3),
                                      pretrained=checkpoint)
    assert "dense" in cfg.custom_imports.imports and cfg.default_scope == ref.default_scope
    for key in ("optim_wrapper", "param_scheduler", "train_cfg", "train_dataloader", "val_evaluator"):
        assert cfg[key] == ref[key], key
    optim = cfg.optim_wrapper.optimizer
    if path.startswith("configs/detection"):
        assert (optim.type, optim.lr, optim.weight_decay) == ("AdamW", 1e-4, 0.05)
        assert cfg.model.neck.in_channels == channels
        shared = ("rpn_head", "roi_head", "train_cfg", "test_cfg", "data_preprocessor")
    else:
        assert (optim.type, optim.lr, optim.weight_decay) == ("AdamW", 6e-5, 0.01)
        assert cfg.model.decode_head.in_channels == channels and cfg.model.auxiliary_head.in_channels == channels[2]
        cfg.model.decode_head.in_channels = ref.model.decode_head.in_channels
        cfg.model.auxiliary_head.in_channels = ref.model.auxiliary_head.in_channels
        shared = ("decode_head", "auxiliary_head", "train_cfg", "test_cfg", "data_preprocessor")
    for key in shared:
        assert cfg.model[key] == ref.model[key], key


@needs_mm
@pytest.mark.parametrize("path, family, variant", FAMILY_CONFIGS)
def test_family_configs_build_with_the_registered_backbone(dense, path, family, variant):
    """Each config builds its detector / segmentor (tiny backbone); the backbone feeds the neck / head its maps."""
    from mmengine.registry import init_default_scope
    cfg = _config(path)
    cfg.model.backbone.update(pretrained=None, **VM_TINY)
    channels = [8, 16, 32, 64]
    if path.startswith("configs/detection"):
        cfg.model.neck.in_channels = channels
    else:
        cfg.model.decode_head.in_channels, cfg.model.auxiliary_head.in_channels = channels, 32
    scope = cfg.default_scope
    init_default_scope(scope)
    model = importlib.import_module(f"{scope}.registry").MODELS.build(cfg.model).eval()
    expected = {"vmamba": dense.VMambaBackbone, "mamba-adaptor": dense.MambaAdaptorBackbone}[family]
    assert type(model.backbone) is expected
    assert model.backbone.out_channels == channels
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // r, 96 // r) for c, r in zip(channels, (4, 8, 16, 32))]
    with torch.no_grad():  # the neck / decode head takes them
        if path.startswith("configs/detection"):
            assert len(model.neck(feats)) == 5
        else:
            assert model.decode_head(feats).shape == (1, 150, 16, 24)


# parameters of the backbone whose gradients and update the training iteration checks, per family
PROBES = {"DefMambaBackbone": ".DS.conv_offset.", "VMambaBackbone": ".op.x_proj_weight",
          "MambaAdaptorBackbone": ".op.adaptor_t."}


def _probe_grads(model, probe: str) -> List[torch.Tensor]:
    grads = [p.grad for n, p in model.backbone.named_parameters() if probe in n or n == "patch_embed.0.weight"]
    assert len(grads) > 1, f"no backbone parameters named *{probe}*"  # the stem's and at least one probe
    return grads


def _train_iteration(model, cfg, data) -> Dict[str, torch.Tensor]:
    """One iteration as MMEngine's train_step does it, with a look at the gradients before the step: the
    family's characteristic parameters (PROBES) and the stem's first convolution (the farthest from the loss)
    get finite non-zero gradients, and they and the output norms change in the step."""
    from mmengine.optim import build_optim_wrapper
    probe = PROBES[type(model.backbone).__name__]
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(optim_wrapper.optimizer).__name__ == "AdamW"
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = model.data_preprocessor(data, True)
    losses = model(**batch, mode="loss")
    loss, log = model.parse_losses(losses)
    assert torch.isfinite(loss)
    optim_wrapper.backward(loss)
    grads = _probe_grads(model, probe)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads), f"*{probe}* or the stem got no gradient"
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(probe in n for n in changed) and any(n.startswith("backbone.outnorm") for n in changed)
    assert "backbone.patch_embed.0.weight" in changed
    return log


def _images(generator: torch.Generator, size=(64, 64)) -> List[torch.Tensor]:
    return [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator) for _ in range(2)]


@needs_mm
@pytest.mark.parametrize("path, backbone", [
    ("configs/detection/mask-rcnn_defmamba-small_fpn_1x_coco.py", TINY),
    ("configs/detection/mask-rcnn_vmamba-tiny_fpn_1x_coco.py", VM_TINY),
])
def test_mask_rcnn_from_config_trains_and_predicts(dense, path, backbone):
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks

    cfg = _config(path)
    cfg.model.backbone.update(pretrained=None, **backbone)
    cfg.model.neck.in_channels = [8, 16, 32, 64]
    # fewer RoIs than COCO training uses, to keep the CPU time of the heads small
    cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    cfg.model.train_cfg.rcnn.sampler.num = 32
    cfg.model.test_cfg.rcnn.update(score_thr=0.0, max_per_img=5)  # untrained scores are tiny: keep 5 anyway
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert type(model.backbone) is getattr(dense, cfg.model.backbone.type)

    g = torch.Generator().manual_seed(0)
    h, w = 64, 64

    def sample(boxes: List[List[float]], labels: List[int]) -> DetDataSample:
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes):
            m[int(y1):int(y2), int(x1):int(x2)] = 1
        s.gt_instances = InstanceData(bboxes=torch.tensor(boxes), labels=torch.tensor(labels),
                                      masks=BitmapMasks(masks.numpy(), h, w))
        return s

    data = dict(inputs=_images(g), data_samples=[sample([[4, 6, 30, 40], [20, 10, 60, 50]], [3, 17]),
                                                 sample([[10, 10, 50, 34]], [0])])
    log = _train_iteration(model, cfg, data)
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(log)

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for result in results:
        pred = result.pred_instances
        n = len(pred)
        assert 0 < n <= 5
        assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,) and pred.labels.shape == (n,)
        assert pred.masks.shape == (n, h, w) and pred.masks.dtype == torch.bool
        assert int(pred.labels.min()) >= 0 and int(pred.labels.max()) < 80


@needs_mm
@pytest.mark.parametrize("path, backbone", [
    ("configs/segmentation/upernet_defmamba-small_8xb2-160k_ade20k-512x512.py", TINY),
    ("configs/segmentation/upernet_mamba-adaptor-b1_8xb2-160k_ade20k-512x512.py", VM_TINY),
])
def test_upernet_from_config_trains_and_predicts(dense, path, backbone):
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    cfg = _config(path)
    cfg.model.backbone.update(pretrained=None, **backbone)
    cfg.model.decode_head.update(in_channels=[8, 16, 32, 64], channels=32)
    cfg.model.auxiliary_head.update(in_channels=32, channels=16)
    cfg.model.data_preprocessor.size = (64, 64)  # pad target of the tiny images (512x512 in the config)
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert type(model.backbone) is getattr(dense, cfg.model.backbone.type)

    g = torch.Generator().manual_seed(0)
    h, w = 64, 48

    def sample() -> SegDataSample:
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(64, 64)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w), generator=g))
        return s

    data = dict(inputs=_images(g, (h, w)), data_samples=[sample(), sample()])
    log = _train_iteration(model, cfg, data)
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(log)

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for result in results:
        assert result.seg_logits.data.shape == (150, h, w)
        assert result.pred_sem_seg.data.shape == (1, h, w)
        assert torch.equal(result.pred_sem_seg.data[0], result.seg_logits.data.argmax(0))


# ---------------------------------------------------------------- the torchvision route for mmcv's ops

def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> List[int]:
    """Textbook greedy NMS in float64 (box side = x2 - x1)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    b = boxes.double()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep: List[int] = []
    for i in order:
        ok = True
        for j in keep:
            iw = max(0.0, float(min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])))
            ih = max(0.0, float(min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])))
            inter = iw * ih
            if inter / float(area[i] + area[j] - inter) > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def _roi_align_reference(feat: torch.Tensor, rois: torch.Tensor, size: int, scale: float, ratio: int) -> torch.Tensor:
    """Aligned RoIAlign ('avg'): mean of ratio x ratio bilinear samples per bin, via F.grid_sample."""
    _, _, height, width = feat.shape
    out = []
    for roi in rois:
        x1, y1, x2, y2 = (roi[1:] * scale - 0.5).tolist()
        steps = (torch.arange(size * ratio, dtype=feat.dtype) + 0.5) / (size * ratio)
        xs, ys = x1 + steps * (x2 - x1), y1 + steps * (y2 - y1)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        # pixel centre i at coordinate i: normalise for align_corners=True
        grid = torch.stack((2 * gx / (width - 1) - 1, 2 * gy / (height - 1) - 1), -1)[None]
        sampled = F.grid_sample(feat[int(roi[0])][None], grid, mode="bilinear", align_corners=True)
        out.append(F.avg_pool2d(sampled, ratio)[0])
    return torch.stack(out)


@needs_mm
def test_torchvision_route_matches_independent_references(dense):
    import mmcv.ops
    if not dense.ops.using_torchvision_ops():
        pytest.skip("mmcv's compiled ops are installed: the torchvision route is not in use")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 80
    boxes = torch.cat((xy, xy + 10 + torch.rand(60, 2, generator=g) * 30), 1)
    scores = torch.rand(60, generator=g)
    dets, keep = mmcv.ops.nms(boxes, scores, 0.4)
    assert keep.tolist() == _greedy_nms(boxes, scores, 0.4)
    torch.testing.assert_close(dets[:, 4], scores[keep])

    feat = torch.randn(2, 3, 20, 24, dtype=torch.float64, generator=g)
    rois = torch.tensor([[0, 8, 6, 60, 40], [1, 20, 12, 84, 70], [0, 30, 30, 44, 52]], dtype=torch.float64)
    out = mmcv.ops.roi_align(feat, rois, (5, 5), 0.25, 2, "avg", True)
    torch.testing.assert_close(out, _roi_align_reference(feat, rois, 5, 0.25, 2))
    feat.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: mmcv.ops.roi_align(f, rois, (5, 5), 0.25, 2, "avg", True), (feat,))


IMPORT_ORDER = """
import sys
sys.path.insert(0, {repo!r})
try:
    from mmdet.apis import init_detector  # the usual notebook start, before `import dense`
    failed = None
except ModuleNotFoundError as err:
    failed = str(err)
import dense
from mmdet.apis import init_detector  # noqa: F401,F811  (the same import again, now with the stand-in)
import torch
from mmcv.ops import nms
from mmdet.registry import MODELS
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)[1].tolist()
backbone = MODELS.build(dict(type="DefMambaBackbone", embed_dim=8, depths=(1, 1, 1, 1),
                             offset_kernels=(3, 3, 3, 3)))
print(failed, dense.ops.using_torchvision_ops(), keep, type(backbone).__name__)
"""


@needs_mm
def test_import_dense_after_a_failed_mmdet_import_recovers():
    """`import dense` is not needed first: after mmcv-lite's raw ModuleNotFoundError, importing dense installs
    the stand-in and the failed imports then work (Python drops the modules whose import failed)."""
    from dense.ops import has_compiled_ops
    if has_compiled_ops():
        pytest.skip("mmcv's compiled ops are installed: no import can fail on mmcv._ext")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT_ORDER.format(repo=str(REPO))], cwd="/",
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "No module named 'mmcv._ext' True [0, 2] DefMambaBackbone")


@needs_mm
def test_ops_outside_the_torchvision_route_raise_naming_the_op(dense):
    import mmcv.ops
    if not dense.ops.using_torchvision_ops():
        pytest.skip("mmcv's compiled ops are installed: the torchvision route is not in use")
    conv = mmcv.ops.DeformConv2d(4, 4, 3, padding=1)
    with pytest.raises(dense.ops.MissingOpError, match="'deform_conv_forward'.*covers only nms, roi_align_forward"):
        conv(torch.rand(1, 4, 8, 8), torch.zeros(1, 18, 8, 8))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(dense.ops.MissingOpError, match="'nms' with offset=1"):
        mmcv.ops.nms(boxes, torch.ones(1), 0.5, offset=1)
    with pytest.raises(dense.ops.MissingOpError, match="'roi_align_forward' with pool_mode='max'"):
        mmcv.ops.roi_align(torch.rand(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 6, 6]]), (2, 2), 1.0, 2, "max", True)


@needs_mm
def test_entry_points_parse_and_reject_missing_files(dense, tmp_path, capsys):
    from dense import test as test_entry
    from dense import train as train_entry
    for entry in (train_entry, test_entry):
        with pytest.raises(SystemExit) as exit_info:
            entry.main(["--help"])
        assert exit_info.value.code == 0 and "--cfg-options" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        train_entry.main([str(tmp_path / "none.py")])
    assert exit_info.value.code == 2 and "config" in capsys.readouterr().err
    config = str(REPO / SEG_CONFIGS[0])
    with pytest.raises(SystemExit) as exit_info:
        test_entry.main([config, str(tmp_path / "none.pth")])
    assert exit_info.value.code == 2 and "checkpoint" in capsys.readouterr().err


@needs_mm
def test_dense_flops_count_every_scan_through_the_handles(dense):
    """The two scan conventions differ by exactly sum over scan calls of 6*D*L*N - 1.5*D*L (D = 3 * d_inner)."""
    from dense.flops import dense_params_and_flops
    overrides = {"model.backbone": dict(**TINY), "model.decode_head.in_channels": [8, 16, 32, 64],
                 "model.decode_head.channels": 16, "model.auxiliary_head.in_channels": 32,
                 "model.auxiliary_head.channels": 8}
    config = str(REPO / SEG_CONFIGS[0])
    params, release, shape = dense_params_and_flops(config, (64, 96), "release", overrides)
    _, vmamba, _ = dense_params_and_flops(config, (64, 96), "vmamba", overrides)
    assert shape == (64, 96) and release > 0
    tokens = [(64 // 4 >> i) * (96 // 4 >> i) for i in range(4)]  # one block per stage
    expected = sum(6 * (3 * 8 * 2 ** i) * n * 16 - 1.5 * (3 * 8 * 2 ** i) * n for i, n in enumerate(tokens))
    assert math.isclose((vmamba - release) * 1e9, expected, rel_tol=1e-9)
    backbone = DefMambaBackbone(**TINY)
    assert params > sum(p.numel() for p in backbone.parameters())


@needs_mm
@pytest.mark.parametrize("path, family", [
    ("configs/detection/mask-rcnn_vmamba-tiny_fpn_1x_coco.py", "vmamba"),
    ("configs/segmentation/upernet_mamba-adaptor-b1_8xb2-160k_ade20k-512x512.py", "mamba-adaptor"),
])
def test_dense_flops_of_the_vmamba_families_default_to_vmambas_convention(dense, path, family):
    """One scan call per block over the four directions (D = 4 * d_inner; Adaptor-T's hidden-state scan replaces
    the plain one): the conventions differ by 6*D*L*N - 1.5*D*L per call (N = 1), and the default is `vmamba`."""
    from dense.flops import dense_params_and_flops, family_convention
    if path.startswith("configs/detection"):
        overrides = {"model.backbone": dict(VM_TINY), "model.neck.in_channels": [8, 16, 32, 64]}
    else:
        overrides = {"model.backbone": dict(VM_TINY), "model.decode_head.in_channels": [8, 16, 32, 64],
                     "model.decode_head.channels": 16, "model.auxiliary_head.in_channels": 32,
                     "model.auxiliary_head.channels": 8}
    assert family_convention(str(REPO / path)) == "vmamba"
    assert family_convention(str(REPO / SEG_CONFIGS[0])) == "release"
    params, vmamba, shape = dense_params_and_flops(str(REPO / path), (64, 96), None, overrides)  # the default
    _, release, _ = dense_params_and_flops(str(REPO / path), (64, 96), "release", overrides)
    assert shape == (64, 96) and release > 0
    tokens = [(64 // 4 >> i) * (96 // 4 >> i) for i in range(4)]  # one block per stage, ssm_ratio 1
    expected = sum(6 * (4 * 8 * 2 ** i) * n - 1.5 * (4 * 8 * 2 ** i) * n for i, n in enumerate(tokens))
    assert math.isclose((vmamba - release) * 1e9, expected, rel_tol=1e-9)
    backbone = VMAMBA_FAMILIES[family][1](**VM_TINY)
    assert params > sum(p.numel() for p in backbone.parameters())


@needs_mm
def test_mmengine_checkpoints_load_through_the_entry_points_loader(dense, tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import CheckpointLoader
    import dense.runner  # noqa: F401  (registers the local-file loader)
    path = tmp_path / "epoch_1.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "message_hub": {"loss": HistoryBuffer([1.0, 2.0], [1, 1])},
                "meta": {"array": np.arange(3)}}, path)
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and loaded["meta"]["array"].tolist() == [0, 1, 2]


@needs_mm
@pytest.mark.parametrize("family", list(VMAMBA_FAMILIES))
@pytest.mark.parametrize("scope", ["mmdet", "mmseg"])
def test_vmamba_backbone_from_both_registries_loads_imagenet_weights(dense, scope, family, tmp_path):
    classifier_cls, backbone_cls, _ = VMAMBA_FAMILIES[family]
    kwargs = dict(embed_dim=8, depths=(1, 1, 1, 1), drop_path_rate=0.0)
    classifier = classifier_cls(num_classes=3, **kwargs)
    path = tmp_path / "imagenet.pth"
    torch.save({"model": classifier.state_dict()}, path)
    registry = importlib.import_module(f"{scope}.registry").MODELS
    backbone = registry.build(dict(type=backbone_cls.__name__, pretrained=str(path), **kwargs)).eval()
    assert type(backbone) is getattr(dense, backbone_cls.__name__) and isinstance(backbone, backbone_cls)
    report = backbone.init_weights()
    head = [k for k in classifier.state_dict() if k.startswith("classifier.")]
    assert report.skipped_head == head and report.loaded == len(classifier.state_dict()) - len(head)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2)]
