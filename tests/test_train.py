"""End-to-end runs of main.py on a tiny DefMamba and real digit images: train, eval, resume, bad input."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from yacs.config import CfgNode

import models

from conftest import REPO, run_main, snapshot

RUN = Path("tiny_test") / "default"
EPOCH_LINE = re.compile(r"Epoch (\d+)/(\d+) done .* val acc@1 ([\d.]+)")


def epochs_done(stdout: str) -> List[int]:
    return [int(m.group(1)) for m in EPOCH_LINE.finditer(stdout)]


def val_accuracies(text: str, label: str) -> List[str]:
    return re.findall(rf"Val \({label}\): acc@1 ([\d.]+) acc@5 ([\d.]+)", text)


def base_args(cfg: Path, digits: Path, output: Path) -> List[str]:
    return ["--cfg", str(cfg), "--data-path", str(digits), "--output", str(output)]


@pytest.fixture(scope="session")
def trained(tiny_cfg: Path, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    """One 2-epoch training run (default recipe: RandAugment, Mixup/CutMix, EMA); (output root, stdout)."""
    output = tmp_path_factory.mktemp("trained")
    result = run_main(base_args(tiny_cfg, digits, output))
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def test_training_writes_checkpoints_logs_config_and_events(trained: Tuple[Path, str]):
    output, stdout = trained
    run = output / RUN
    assert epochs_done(stdout) == [0, 1]
    for name in ("ckpt_epoch_0.pth", "ckpt_epoch_1.pth", "best.pth", "best_ema.pth", "log_rank0.txt",
                 "config.yaml"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(run / "ckpt_epoch_1.pth", weights_only=True)
    assert {"model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "max_accuracy",
            "max_accuracy_ema", "config"} <= set(state)
    assert state["epoch"] == 1
    accs = [float(a) for a, _ in val_accuracies(stdout, "model")]
    assert state["max_accuracy"] == pytest.approx(max(accs), abs=1e-3)
    # the written config is complete: it loads back as a config file
    assert CfgNode.load_cfg(state["config"]).MODEL.NAME == "tiny_test"
    assert "Epoch 1/2 done" in (run / "log_rank0.txt").read_text()
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_tensorboard_scalars(trained: Tuple[Path, str]):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained[0] / RUN / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "val/acc1", "val/acc5", "val_ema/acc1"} <= tags
    # per-epoch scalars sit at the epoch's last iteration (3 per epoch), on the train/* step axis
    assert [e.step for e in events.Scalars("val/acc1")] == [2, 5]


def test_eval_reproduces_the_training_validation(trained: Tuple[Path, str], tiny_cfg: Path, digits: Path,
                                                 tmp_path: Path, run_here):
    output, train_stdout = trained
    ckpt = output / RUN / "ckpt_epoch_1.pth"
    result = run_here(base_args(tiny_cfg, digits, tmp_path) + ["--resume", str(ckpt), "--eval"])
    assert result.returncode == 0, result.stderr[-3000:]
    # same weights, same val set, fp32: the numbers of the last training epoch, for the model and the EMA
    assert val_accuracies(result.stdout, "model") == val_accuracies(train_stdout, "model")[-1:]
    assert val_accuracies(result.stdout, "EMA") == val_accuracies(train_stdout, "EMA")[-1:]
    assert "Train:" not in result.stdout


def _release_checkpoint(src: Path, dst: Path, full: bool) -> None:
    """A file in the release's layout: pickled yacs config node, misspelt EMA best (or weights only)."""
    state = torch.load(src, weights_only=True)
    if full:
        node = CfgNode({"MODEL": CfgNode({"NAME": "defm_tiny_e300"})})
        release = {k: state[k] for k in ("model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch")}
        release.update(max_accuracy=55.5, max_accuray_ema=44.25, config=node)
    else:
        release = {"model": state["model"], "model_ema": state["model_ema"]}
    torch.save(release, dst)


def test_release_format_checkpoints(trained: Tuple[Path, str], tiny_cfg: Path, digits: Path, tmp_path: Path,
                                    run_here):
    output, train_stdout = trained
    weights = tmp_path / "release_weights.pth"
    _release_checkpoint(output / RUN / "ckpt_epoch_1.pth", weights, full=False)
    result = run_here(base_args(tiny_cfg, digits, tmp_path / "eval") + ["--resume", str(weights), "--eval"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert val_accuracies(result.stdout, "EMA") == val_accuracies(train_stdout, "EMA")[-1:]

    full = tmp_path / "release_full.pth"
    _release_checkpoint(output / RUN / "ckpt_epoch_1.pth", full, full=True)
    result = run_here(base_args(tiny_cfg, digits, tmp_path / "resume") + ["--resume", str(full),
                                                                         "--opts", "TRAIN.EPOCHS", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing at epoch 2 (best acc@1 55.50, EMA 44.25)" in result.stdout
    assert "differs from this config's" in result.stdout  # 2-epoch schedule kept, TRAIN.EPOCHS now 3
    assert epochs_done(result.stdout) == [2]


def test_interrupted_run_continues_without_losing_or_repeating_epochs(tiny_cfg: Path, digits: Path,
                                                                       tmp_path: Path, run_here):
    args = base_args(tiny_cfg, digits, tmp_path) + ["--opts", "TRAIN.EPOCHS", "4"]
    run = tmp_path / RUN
    proc = subprocess.Popen([sys.executable, "main.py"] + args, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "ckpt_epoch_0.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    first_out, first_err = proc.communicate(timeout=120)
    assert proc.returncode == 130, first_err[-3000:]
    assert first_err.strip().splitlines()[-1].startswith("error: interrupted; relaunch the same command")
    saved = max(int(p.stem.split("_")[-1]) for p in run.glob("ckpt_epoch_*.pth"))
    assert saved < 3  # stopped before the end
    assert set(epochs_done(first_out)) <= set(range(saved + 1))

    second = run_here(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"continuing at epoch {saved + 1}" in second.stdout
    assert epochs_done(second.stdout) == list(range(saved + 1, 4))
    final = torch.load(run / "ckpt_epoch_3.pth", weights_only=True)
    # 4 epochs x 3 updates: the optimizer state carried over the restart instead of starting again
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {12}
    assert sorted(p.name for p in run.glob("ckpt_epoch_*.pth")) == [f"ckpt_epoch_{i}.pth" for i in (1, 2, 3)]


def test_auto_resume_skips_an_unreadable_newest_checkpoint(trained: Tuple[Path, str], tiny_cfg: Path,
                                                           digits: Path, tmp_path: Path, run_here):
    shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
    newest = tmp_path / RUN / "ckpt_epoch_1.pth"
    newest.write_bytes(newest.read_bytes()[:1000])  # a file cut short by a full disk
    result = run_here(base_args(tiny_cfg, digits, tmp_path) + ["--opts", "TRAIN.EPOCHS", "3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto-resume: skipping cannot read checkpoint" in result.stdout
    assert epochs_done(result.stdout) == [1, 2]


def test_distributed_launchers_agree(tiny_cfg: Path, digits: Path, tmp_path: Path):
    import socket

    def free_port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    torchrun = str(Path(sys.executable).parent / "torchrun")
    launchers = {
        "torchrun": [torchrun, "--nproc_per_node", "2", "--master_port", free_port()],
        "launch": [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", free_port()],
    }
    weights, logs = {}, {}
    for name, launcher in launchers.items():
        result = run_main(base_args(tiny_cfg, digits, tmp_path / name) + ["--opts", "TRAIN.EPOCHS", "1",
                                                                          "TRAIN.WARMUP_EPOCHS", "0"],
                          launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        run = tmp_path / name / RUN
        rank0, rank1 = (run / "log_rank0.txt").read_text(), (run / "log_rank1.txt").read_text()
        assert "rank 1 of 2" in rank1 and "total batch 16" in rank0
        # metrics are reduced over the ranks: both report the same numbers
        assert val_accuracies(rank0, "model") == val_accuracies(rank1, "model") != []
        logs[name] = val_accuracies(rank0, "model") + val_accuracies(rank0, "EMA")
        weights[name] = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)["model"]
    assert logs["torchrun"] == logs["launch"]
    assert all(torch.equal(weights["torchrun"][k], weights["launch"][k]) for k in weights["torchrun"])


def test_activation_checkpointing_accumulation_and_bf16(tiny_cfg: Path, digits: Path, tmp_path: Path,
                                                        run_here):
    args = base_args(tiny_cfg, digits, tmp_path) + [
        "--use-checkpoint", "--accumulation-steps", "2", "--amp-dtype", "bf16", "--batch-size", "4",
        "--opts", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"]
    result = run_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AMP: bf16" in result.stdout and "(3 updates per epoch)" in result.stdout
    state = torch.load(tmp_path / RUN / "ckpt_epoch_0.pth", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}


def test_throughput(tiny_cfg: Path, tmp_path: Path, run_here):
    result = run_here(["--cfg", str(tiny_cfg), "--output", str(tmp_path), "--throughput"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"throughput \(fp32, batch 8, 32 px\): [\d.]+ images/s", result.stdout)


def test_nan_loss_stops_naming_the_iteration(trained: Tuple[Path, str], tiny_cfg: Path, digits: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_here):
    import main as trainer

    real_build = models.build_model

    def build_with_nan_in_second_training_forward(config):
        model = real_build(config)
        training_calls = []

        def poison(module, inputs, output):
            if module.training:
                training_calls.append(None)
                if len(training_calls) == 2:
                    return output * float("nan")
            return output

        model.register_forward_hook(poison)
        return model

    shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path / RUN)
    monkeypatch.setattr(trainer.models, "build_model", build_with_nan_in_second_training_forward)
    # auto-resumes after epoch 1, so the second training forward is epoch 2, iteration 2 of 3
    result = run_here(base_args(tiny_cfg, digits, tmp_path) + ["--opts", "TRAIN.EPOCHS", "4"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: loss is nan at epoch 2 iteration 2/3; stopped before the update, the last "
                     "checkpoint is left intact"]
    assert {k: v for k, v in snapshot(tmp_path / RUN).items() if k.endswith(".pth")} == \
        {k: v for k, v in before.items() if k.endswith(".pth")}


BAD_INPUTS = {
    "missing data path": (["--data-path", "/no/such/imagenet"], 2,
                          "error: data path /no/such/imagenet does not exist (expected /no/such/imagenet/train"),
    "corrupt checkpoint": (["--resume", "{tmp}/corrupt.pth"], 2, "error: cannot read checkpoint {tmp}/corrupt.pth"),
    "unknown config key": (["--opts", "TRAIN.EPOHCS", "3"], 2, "error: --opts: unknown config key TRAIN.EPOHCS"),
    "unknown flag": (["--epochs", "3"], 2, "error: unrecognized arguments: --epochs 3"),
    "eval without checkpoint": (["--eval"], 2,
                                "error: --eval needs a checkpoint"),
    "corrupt image": (["--data-path", "{tmp}/broken"], 1, "error: unreadable image {tmp}/broken/train/digit2/0.png"),
}


# Two cases go through a real interpreter (exit status, stderr, no traceback); the rest call main() in-process.
IN_SUBPROCESS = {"unknown flag", "missing data path"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_the_run_intact(case: str, trained: Tuple[Path, str], tiny_cfg: Path,
                                                         digits: Path, tmp_path: Path, run_here):
    extra, code, message = BAD_INPUTS[case]
    output = tmp_path / "out"
    shutil.copytree(trained[0], output)
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage" * 100)
    shutil.copytree(digits, tmp_path / "broken")
    (tmp_path / "broken" / "train" / "digit2" / "0.png").write_bytes(b"truncated")
    # the broken image must be hit in the first epoch: start a fresh run for that case
    tag = ["--tag", "fresh"] if case == "corrupt image" else []
    before = snapshot(output / RUN)
    args = base_args(tiny_cfg, digits, output) + tag + [a.format(tmp=tmp_path) for a in extra]
    result = run_main(args) if case in IN_SUBPROCESS else run_here(args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert snapshot(output / RUN) == before


@pytest.mark.parametrize("cfg", sorted(p.name for p in Path("configs").glob("demo*.yaml")))
def test_every_demo_config_trains(cfg: str, digits: Path, tmp_path: Path, run_here):
    """Each family's demo config (README commands) runs a training epoch and a validation: here on the small
    digits folder instead of all of MNIST-5k, one epoch, 3 classes."""
    args = ["--cfg", f"configs/{cfg}", "--data-path", str(digits), "--output", str(tmp_path), "--opts",
            "DATA.DATASET", "imagenet", "MODEL.NUM_CLASSES", "3", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0",
            "DATA.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0"]
    result = run_here(args)
    assert result.returncode == 0, result.stderr
    assert "training done" in result.stdout + result.stderr
    assert list(tmp_path.rglob("ckpt_epoch_0.pth"))
