"""MESA self-distillation from the EMA: the loss term, when it starts, its AMP dtype, and a resumed
DAMamba run through main.py that distils from the EMA restored from the checkpoint."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import utils.train_epoch as train_epoch
from config import ConfigError, get_config
from utils.amp import AmpPolicy, GradStepper

from conftest import REPO

FP32 = AmpPolicy(False, torch.bfloat16, "cpu")


def independent_mesa(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-sum_k softmax(teacher)_k log softmax(student)_k, averaged over the batch."""
    return -(F.softmax(teacher_logits, -1) * F.log_softmax(student_logits, -1)).sum(-1).mean()


def toy_parts(mesa: float, mesa_start_epoch: int, amp: AmpPolicy = FP32):
    """A linear classifier, its EMA moved away from it, one batch per epoch and LR 0 (weights stay put)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(torch.randn_like(p))
    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 4, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    parts = train_epoch.TrainParts(
        model=model, module=model, loader=DataLoader(TensorDataset(images, labels), batch_size=6),
        optimizer=optimizer, scheduler=CosineLRScheduler(optimizer, t_initial=10), stepper=GradStepper(amp, 0.0),
        amp=amp, criterion=nn.CrossEntropyLoss(), mixup=None, ema=ema, device=torch.device("cpu"),
        accumulation_steps=1, epochs=4, print_freq=1, logger=logging.getLogger("test_mesa"), writer=None,
        mesa=mesa, mesa_start_epoch=mesa_start_epoch)
    return parts, images, labels


def test_mesa_loss_is_soft_target_ce_against_the_teacher_without_its_graph():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    student_logits = torch.randn(5, 3, requires_grad=True)
    got = train_epoch.mesa_loss(student_logits, teacher, x, FP32)
    want = independent_mesa(student_logits, teacher(x).detach())
    torch.testing.assert_close(got, want)
    got.backward()
    assert teacher.weight.grad is None  # the teacher is only read
    expected = torch.autograd.grad(independent_mesa(student_logits, teacher(x).detach()), student_logits)[0]
    torch.testing.assert_close(student_logits.grad, expected)


def test_teacher_runs_under_the_runs_autocast_dtype_without_grad():
    seen = []
    teacher = nn.Linear(4, 3)
    teacher.register_forward_hook(lambda m, i, out: seen.append((out.dtype, torch.is_grad_enabled())))
    train_epoch.mesa_loss(torch.randn(2, 3), teacher, torch.randn(2, 4), AmpPolicy(True, torch.bfloat16, "cpu"))
    assert seen == [(torch.bfloat16, False)]


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_epoch_loss_adds_the_weighted_term_from_the_start_epoch(epoch):
    parts, images, labels = toy_parts(mesa=1.5, mesa_start_epoch=1)
    with torch.no_grad():
        student = parts.model(images)
        expected = F.cross_entropy(student, labels)
        if epoch >= 1:
            expected = expected + 1.5 * independent_mesa(student, parts.ema.module(images))
    stats = train_epoch.train_one_epoch(parts, epoch)
    assert stats.loss == pytest.approx(expected.item(), rel=1e-6)


def test_mesa_off_by_default_and_needs_the_ema():
    assert get_config().TRAIN.MESA == 0.0  # DefMamba's recipe has no MESA
    with pytest.raises(ConfigError, match="TRAIN.MESA distils from the EMA"):
        get_config(_args(cfg=str(REPO / "configs" / "damamba_tiny.yaml"), model_ema=False))
    with pytest.raises(ConfigError, match="TRAIN.MESA must be >= 0"):
        get_config(_args(opts=["TRAIN.MESA_START", "1.5"]))
    with pytest.raises(ConfigError, match="must be multiples of HEAD_DIM"):
        get_config(_args(cfg=str(REPO / "configs" / "damamba_tiny.yaml"),
                         opts=["MODEL.DAMAMBA.DIMS", "[80, 150, 320, 512]"]))


def _args(**kwargs):
    import main as trainer
    argv: List[str] = []
    for key, value in kwargs.items():
        if key == "opts":
            argv += ["--opts", *value]
        else:
            argv += [f"--{key}", str(value)]
    return trainer.parse_args(argv)


TINY_DAMAMBA = """\
MODEL:
  TYPE: damamba
  NAME: tiny_damamba
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.0
  DAMAMBA:
    DIMS: [16, 32, 32, 32]
    DEPTHS: [1, 1, 1, 1]
    MLP_RATIOS: [2.0, 2.0, 2.0, 2.0]
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 8
  NUM_WORKERS: 0
  PIN_MEMORY: False
TRAIN:
  WARMUP_EPOCHS: 0
  MESA: 1.0
  EMA:
    DECAY: 0.5
AUG:
  AUTO_AUGMENT: ""
  MIXUP: 0.0
  CUTMIX: 0.0
  REPROB: 0.0
PRINT_FREQ: 1
"""


def test_resumed_damamba_run_distils_from_the_restored_ema_then_evaluates_and_times(
        digits: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture):
    import main as trainer

    cfg = tmp_path / "tiny_damamba.yaml"
    cfg.write_text(TINY_DAMAMBA)
    base = ["--cfg", str(cfg), "--data-path", str(digits), "--output", str(tmp_path / "out")]
    teachers = []
    real_mesa_loss = train_epoch.mesa_loss

    def spy(logits, teacher, images, amp):
        teachers.append({k: v.clone() for k, v in teacher.state_dict().items()})
        return real_mesa_loss(logits, teacher, images, amp)

    monkeypatch.setattr(train_epoch, "mesa_loss", spy)
    # first launch: 1 epoch, MESA would start at epoch int(1.0 x 1) = 1, so not yet
    assert trainer.main(base + ["--opts", "TRAIN.EPOCHS", "1", "TRAIN.MESA_START", "1.0"]) == 0
    first = capsys.readouterr().out
    assert teachers == [] and " mesa " not in first
    saved = torch.load(tmp_path / "out" / "tiny_damamba" / "default" / "ckpt_epoch_0.pth", weights_only=True)

    # relaunch for 2 epochs: auto-resume at epoch 1 = int(0.5 x 2), where MESA is on
    assert trainer.main(base + ["--opts", "TRAIN.EPOCHS", "2", "TRAIN.MESA_START", "0.5"]) == 0
    second = capsys.readouterr().out
    assert "continuing at epoch 1" in second and "MESA: loss += 1 x" in second
    assert re.search(r"Train: \[1/2\]\[0/3\] .* mesa [\d.]+", second)
    assert len(teachers) == 3  # every iteration of epoch 1
    # the first teacher is the checkpoint's EMA, not its model weights
    assert all(torch.equal(teachers[0][k], v) for k, v in saved["model_ema"].items())
    assert not all(torch.equal(teachers[0][k], v) for k, v in saved["model"].items())

    # evaluation and throughput of the same DAMamba through the same entry point
    last = tmp_path / "out" / "tiny_damamba" / "default" / "ckpt_epoch_1.pth"
    assert trainer.main(base + ["--resume", str(last), "--eval"]) == 0
    assert re.search(r"eval EMA of .*: acc@1 [\d.]+", capsys.readouterr().out)
    assert trainer.main(base + ["--throughput", "--batch-size", "2"]) == 0
    assert "images/s" in capsys.readouterr().out
