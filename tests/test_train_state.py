"""In-process checks of the training pieces: weight-decay groups, LR scaling and schedule, checkpoint
round trip (optimizer, scheduler, EMA, best accuracies), retention, and activation checkpointing."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from config import get_default_config
from models import CheckpointError, build_model
from utils import checkpoint as ckpt
from utils.amp import AmpPolicy, GradStepper
from utils.lr_scheduler import build_scheduler, scaled_lrs
from utils.optimizer import build_optimizer, weight_decay_groups


def tiny_config(**train_keys):
    c = get_default_config()
    c.MODEL.NUM_CLASSES = 3
    c.MODEL.DEFMAMBA.EMBED_DIM = 8
    c.MODEL.DEFMAMBA.DEPTHS = [1, 1, 1, 1]
    c.MODEL.DEFMAMBA.OFFSET_KERNELS = [3, 3, 3, 3]
    c.DATA.BATCH_SIZE = 4
    c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS = 4, 1
    for key, value in train_keys.items():
        c.TRAIN[key] = value
    return c


def test_weight_decay_groups_follow_the_release_with_optional_ssm_exemption():
    model = build_model(tiny_config())
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = weight_decay_groups(model, 0.05, exempt_ssm=False)
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(model.get_parameter(n).ndim >= 2 and not n.endswith(".bias") for n in decayed)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    ssm = model.ssm_no_weight_decay()
    ssm_2d = {n for n in ssm if model.get_parameter(n).ndim >= 2}
    assert ssm_2d and ssm_2d <= decayed  # A_logs, dt_projs_bias, rpe_table are decayed by the release
    _, no_decay = weight_decay_groups(model, 0.05, exempt_ssm=True)
    assert ssm <= {names[id(p)] for p in no_decay["params"]}


def test_lr_scaling_and_cosine_schedule():
    c = tiny_config()
    c.DATA.BATCH_SIZE, c.TRAIN.ACCUMULATION_STEPS = 128, 2
    lrs = scaled_lrs(c, world_size=8)
    assert lrs.total_batch == 2048
    assert (lrs.base, lrs.warmup, lrs.minimum) == pytest.approx((2e-3, 2e-6, 2e-5))
    model = build_model(tiny_config())
    optimizer = build_optimizer(c, model, lrs.base)
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.9, 0.999), 1e-8)
    scheduler = build_scheduler(c, optimizer, lrs, updates_per_epoch=10)  # 1 warm-up epoch of 4
    lr_at = []
    for update in (0, 5, 10, 25, 39):
        scheduler.step_update(update)
        lr_at.append(optimizer.param_groups[0]["lr"])
    assert lr_at[0] == pytest.approx(lrs.warmup)
    assert lr_at[0] < lr_at[1] < lr_at[2] == pytest.approx(lrs.base)
    assert lr_at[2] > lr_at[3] > lr_at[4] > lrs.minimum


def _training_objects(config):
    model = build_model(config)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = build_optimizer(config, model, 1e-3)
    lrs = scaled_lrs(config, 1)
    scheduler = build_scheduler(config, optimizer, lrs, updates_per_epoch=2)
    stepper = GradStepper(AmpPolicy(False, torch.float16, "cpu"), clip_grad=5.0)
    return model, ema, optimizer, scheduler, stepper


def test_checkpoint_round_trip_restores_everything(tmp_path: Path):
    config = tiny_config()
    torch.manual_seed(0)
    model, ema, optimizer, scheduler, stepper = _training_objects(config)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for update in range(3):
        scheduler.step_update(update)
        stepper.backward(F.cross_entropy(model(images), targets))
        stepper.clip(optimizer, model.parameters())
        stepper.apply(optimizer)
        optimizer.zero_grad()
        ema.update(model)
    path = tmp_path / ckpt.epoch_checkpoint_name(1)
    ckpt.save_atomic(ckpt.training_state(model, ema, optimizer, scheduler, stepper, 1, 66.5, 33.25,
                                         config.dump()), path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    torch.manual_seed(1)
    fresh = _training_objects(config)
    state = ckpt.restore_run(path, ckpt.read_checkpoint(path), *fresh, logger=logging.getLogger("test"))
    assert (state.start_epoch, state.max_accuracy, state.max_accuracy_ema) == (2, 66.5, 33.25)
    f_model, f_ema, f_optimizer, f_scheduler, _ = fresh
    for a, b in ((model, f_model), (ema.module, f_ema.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    saved, restored = optimizer.state_dict(), f_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for key, value in saved["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(restored["state"][key][name]))
    assert f_scheduler.state_dict() == scheduler.state_dict()


def test_restore_rejects_optimizer_state_of_other_groups(tmp_path: Path):
    config = tiny_config()
    model, ema, optimizer, scheduler, stepper = _training_objects(config)
    path = tmp_path / "ckpt_epoch_0.pth"
    state = ckpt.training_state(model, ema, optimizer, scheduler, stepper, 0, 0.0, 0.0, "")
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    ckpt.save_atomic(state, path)
    with pytest.raises(CheckpointError, match="optimizer state does not fit this run"):
        ckpt.restore_run(path, ckpt.read_checkpoint(path), *_training_objects(config), logging.getLogger("t"))


def test_retention_keeps_the_newest_by_epoch_number_and_drops_partial_files(tmp_path: Path):
    for epoch in (1, 2, 10, 9, 3):
        (tmp_path / ckpt.epoch_checkpoint_name(epoch)).write_bytes(b"x")
    (tmp_path / ckpt.BEST_NAME).write_bytes(b"x")
    (tmp_path / ".ckpt_epoch_11.pth.tmp-123").write_bytes(b"partial")  # left by a run killed while saving
    ckpt.prune_epoch_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.epoch_checkpoints(tmp_path)] == ["ckpt_epoch_9.pth", "ckpt_epoch_10.pth"]
    assert (tmp_path / ckpt.BEST_NAME).exists()
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "ckpt_epoch_10.pth", "ckpt_epoch_9.pth"]


def test_unreadable_checkpoints_raise_one_line_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.read_checkpoint(tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*bad\.pth") as err:
        ckpt.read_checkpoint(tmp_path / "bad.pth")
    assert "\n" not in str(err.value)


def test_activation_checkpointing_gives_the_same_gradients():
    configs = [tiny_config(USE_CHECKPOINT=flag) for flag in (False, True)]
    for c in configs:
        c.MODEL.DROP_PATH_RATE = 0.0  # deterministic forward
    plain, checkpointed = (build_model(c) for c in configs)
    checkpointed.load_state_dict(plain.state_dict())
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    grads = []
    for model in (plain, checkpointed):
        model.train()
        F.cross_entropy(model(images), targets).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
