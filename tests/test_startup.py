"""Start-up does its work once: every checkpoint file is read once, FLOPs are counted only when asked."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Counter, List

import pytest
import torch

import models
from config import get_default_config, load_yaml_config


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """torch.load calls per resolved file path (every checkpoint read goes through torch.load)."""
    counts: Counter[str] = collections.Counter()
    real = torch.load

    def counting(f, *args, **kwargs):
        counts[str(Path(f).resolve())] += 1
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return counts


@pytest.fixture()
def weights(tiny_cfg: Path, tmp_path: Path) -> Path:
    """A release-layout file (model and model_ema entries) for the tiny config."""
    config = get_default_config()
    load_yaml_config(config, tiny_cfg)
    torch.manual_seed(0)
    state = models.build_model(config).state_dict()
    path = tmp_path / "weights.pth"
    torch.save({"model": state, "model_ema": state}, path)
    return path


def base_args(cfg: Path, digits: Path, output: Path) -> List[str]:
    return ["--cfg", str(cfg), "--data-path", str(digits), "--output", str(output)]


def test_pretrained_training_reads_the_file_once_and_counts_no_flops(tiny_cfg, digits, weights, tmp_path, reads,
                                                                      monkeypatch, run_here):
    import main as trainer

    def no_flops(*args, **kwargs):
        raise AssertionError("FLOPs counted without --flops")

    monkeypatch.setattr(trainer, "count_flops", no_flops)
    result = run_here(base_args(tiny_cfg, digits, tmp_path / "out") + [
        "--pretrained", str(weights), "--opts", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"])
    assert result.returncode == 0, result.stderr
    assert "EMA initialised from the model_ema entry" in result.stdout  # both entries used, from one read
    assert reads[str(weights.resolve())] == 1
    assert "(GFLOPs: --flops, or python -m utils.flops)" in result.stdout


def test_resumed_run_reads_its_checkpoint_once(tiny_cfg, digits, tmp_path, reads, run_here):
    output = tmp_path / "out"
    one_epoch = ["--opts", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"]
    assert run_here(base_args(tiny_cfg, digits, output) + one_epoch).returncode == 0
    reads.clear()
    result = run_here(base_args(tiny_cfg, digits, output))  # auto-resume, one more epoch
    assert result.returncode == 0, result.stderr
    epoch_files = sorted(output.rglob("ckpt_epoch_*.pth"))
    assert epoch_files and reads[str(epoch_files[0].resolve())] == 1
    assert reads and max(reads.values()) == 1, reads  # best.pth and best_ema.pth once each too


def test_eval_reads_the_file_once_and_counts_flops_when_asked(tiny_cfg, digits, weights, tmp_path, reads,
                                                             run_here):
    result = run_here(base_args(tiny_cfg, digits, tmp_path / "out") + ["--eval", "--resume", str(weights),
                                                                      "--flops"])
    assert result.returncode == 0, result.stderr
    assert "Val (EMA)" in result.stdout  # the model_ema entry is evaluated from the same read
    assert reads[str(weights.resolve())] == 1
    assert "GFLOPs at 32 px" in result.stdout
