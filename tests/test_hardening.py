"""Issue 12, hostile first use: unusable output folders, the CPU scan's memory bound, the best checkpoint kept
on resume, unreadable checkpoints, the config as run, finished runs, exact resume, rate formatting, and
timm's pretrained=True."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from yacs.config import CfgNode

from conftest import REPO, TINY_CONFIG, run_main, snapshot
from test_selective_scan_reference import make_inputs, naive_scan

RUN = Path("tiny_test") / "default"
# the demo's architecture (embed dim 16, depths 1-1-2-1) on the tiny digit set, with RandAugment, Mixup,
# CutMix and drop path on, so that every random generator of a training run is exercised
DEMO_SIZED = TINY_CONFIG.replace("EMBED_DIM: 8", "EMBED_DIM: 16").replace("DEPTHS: [1, 1, 1, 1]",
                                                                          "DEPTHS: [1, 1, 2, 1]")


@pytest.fixture(scope="session")
def demo_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "demo_sized.yaml"
    path.write_text(DEMO_SIZED)
    return path


def base_args(cfg: Path, digits: Path, output: Path) -> List[str]:
    return ["--cfg", str(cfg), "--data-path", str(digits), "--output", str(output)]


@pytest.fixture(scope="session")
def uninterrupted(demo_cfg: Path, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    """A 2-epoch run in its own interpreter, CPU, default AMP request (fp16, which the CPU turns off)."""
    output = tmp_path_factory.mktemp("uninterrupted")
    result = run_main(base_args(demo_cfg, digits, output))
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    return lines[0]


# --- 1: unusable output folders -------------------------------------------------------------------------------

def _read_only_touch(self: Path, *args, **kwargs) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))


@pytest.mark.parametrize("case", ["file in the way", "cannot be created", "not permitted", "read-only mount"])
def test_unusable_output_folder_is_one_line_and_exit_2(case: str, tiny_cfg: Path, digits: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, run_here):
    import main as trainer

    (tmp_path / "a_file").write_text("x")
    output = {"file in the way": tmp_path / "a_file", "cannot be created": Path("/proc/x"),
              "not permitted": Path("/sys/x"), "read-only mount": tmp_path / "ro"}[case]
    if case == "read-only mount":  # as root no permission bit stops a write: the mount's error, injected
        monkeypatch.setattr(trainer.Path, "touch", _read_only_touch)
    result = run_here(base_args(tiny_cfg, digits, output))
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"error: cannot use output folder {output / RUN}: "), line
    assert "model tiny_test" not in result.stdout  # stopped before the model was built
    assert (tmp_path / "a_file").read_text() == "x"


# --- 2: the CPU scan's peak memory ------------------------------------------------------------------------------

_PEAK_SCRIPT = """
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
from models.ops.scan.reference import selective_scan_reference
torch.set_num_threads(1)
batch, groups, per_group, nstate, length = 4, 3, 48, 16, 3136  # DefMamba-T stage 1: D = 3 x 48, 56 x 56
dim = groups * per_group
gen = torch.Generator().manual_seed(0)
leaf = lambda t: t.requires_grad_(True)
u = leaf(torch.randn(batch, dim, length, generator=gen))
delta = leaf(0.5 * torch.randn(batch, dim, length, generator=gen))
A = leaf(-torch.exp(0.5 * torch.randn(dim, nstate, generator=gen)))
B, C = (leaf(torch.randn(batch, groups, nstate, length, generator=gen)) for _ in range(2))
D, bias = leaf(torch.randn(dim, generator=gen)), leaf(0.1 * torch.randn(dim, generator=gen))
dy = torch.randn(batch, dim, length, generator=gen)
small = [t[:, :3, :64].detach().requires_grad_(True) for t in (u, delta)]
selective_scan_reference(*small, A[:3].detach(), B[:, :1, :, :64].detach(), C[:, :1, :, :64].detach()).sum().backward()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
y = selective_scan_reference(u, delta, A, B, C, D, bias)
forward = peak()
y.backward(dy)
print(json.dumps(dict(before=before, forward=forward, backward=peak(), state=batch * dim * length * nstate * 4)))
"""


def test_cpu_scan_peak_memory_stays_within_the_budget():
    budget_mb = 128
    env = {**os.environ, "DEFMAMBA_SCAN_MEMORY_MB": str(budget_mb), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.format(repo=str(REPO))], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    # one (batch, D, L, N) fp32 state tensor is 110 MiB here; an unblocked scan holds about nine at once
    assert rss["state"] > 100 * 2 ** 20
    assert rss["forward"] - rss["before"] < budget_mb * 2 ** 20
    assert rss["backward"] - rss["before"] < budget_mb * 2 ** 20


@pytest.mark.parametrize("budget_mb", [0, 1e-4, 0.05])  # all rows at once, one channel per block, batch blocks
def test_blocked_scan_matches_the_float64_recurrence(budget_mb: float, monkeypatch: pytest.MonkeyPatch):
    from models.ops.scan import reference as selective_scan_torch

    monkeypatch.setattr(selective_scan_torch, "MEMORY_BUDGET_MB", budget_mb)
    inputs = make_inputs(3, 3, 4, 16, 37, with_d=True, with_bias=True, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    ref_leaves = [t.clone().requires_grad_(True) for t in inputs]
    y = selective_scan_torch.selective_scan_reference(*leaves)
    y_ref = naive_scan(*ref_leaves, True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y_ref)
    for g, g_ref in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, ref_leaves, dy)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_out_of_memory_is_one_line(tiny_cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_here):
    import main as trainer

    def fail(*args, **kwargs):  # what torch raises when an allocation fails on the CPU
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3699376128 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(trainer, "measure_throughput", fail)
    result = run_here(["--cfg", str(tiny_cfg), "--output", str(tmp_path), "--throughput"])
    assert result.returncode == 1
    assert one_error_line(result).startswith("error: out of memory (DefaultCPUAllocator: can't allocate memory")


# --- 3: best.pth survives an auto-resume from an older checkpoint ------------------------------------------------

def test_resume_from_an_older_checkpoint_keeps_the_better_best(uninterrupted: Tuple[Path, str], demo_cfg: Path,
                                                               digits: Path, tmp_path: Path, run_here):
    shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
    run = tmp_path / RUN
    # epoch 0 was the worse model; epoch 1 the best so far (best.pth); then epoch 1's file is cut short
    older = torch.load(run / "ckpt_epoch_0.pth", weights_only=True)
    older.update(max_accuracy=0.0, max_accuracy_ema=0.0)
    torch.save(older, run / "ckpt_epoch_0.pth")
    for name, key in (("best.pth", "max_accuracy"), ("best_ema.pth", "max_accuracy_ema")):
        best = torch.load(run / name, weights_only=True)
        best[key] = 100.0  # a top-1 no later epoch can beat
        torch.save(best, run / name)
    newest = run / "ckpt_epoch_1.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    best_before = {name: (run / name).read_bytes() for name in ("best.pth", "best_ema.pth")}

    result = run_here(base_args(demo_cfg, digits, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing at epoch 1" in result.stdout
    assert "(best 100.00)" in result.stdout  # the epoch line compares with best.pth's top-1
    assert {name: (run / name).read_bytes() for name in best_before} == best_before
    assert torch.load(run / "ckpt_epoch_1.pth", weights_only=True)["max_accuracy"] == 100.0


# --- 4: a text file given as checkpoint ---------------------------------------------------------------------------

def test_text_file_as_checkpoint_says_it_is_not_a_checkpoint(tiny_cfg: Path, digits: Path, tmp_path: Path,
                                                             run_here):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes\nnot weights\n")
    result = run_here(base_args(tiny_cfg, digits, tmp_path / "out") + ["--resume", str(notes), "--eval"])
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"error: cannot read checkpoint {notes}: not a readable PyTorch checkpoint"), line
    assert "weights_only" not in line


def test_foreign_pickle_is_named_without_unsafe_advice(tmp_path: Path):
    import models

    torch.save({"model": {}, "extra": Path("x")}, tmp_path / "foreign.pth")  # a pickled non-tensor object
    with pytest.raises(models.CheckpointError) as err:
        models.read_checkpoint(tmp_path / "foreign.pth")
    message = str(err.value)
    assert "not a readable PyTorch checkpoint" in message and "Path" in message
    assert "weights_only" not in message and "\n" not in message


# --- 5: the config as run -----------------------------------------------------------------------------------------

def test_saved_config_records_device_and_precision_as_run(uninterrupted: Tuple[Path, str]):
    run = uninterrupted[0] / RUN
    for text in ((run / "config.yaml").read_text(),
                 torch.load(run / "ckpt_epoch_1.pth", weights_only=True)["config"]):
        assert text.splitlines()[0] == "# as run: device cpu, 1 process(es), AMP off (fp32)"
        assert CfgNode.load_cfg(text).AMP_ENABLE is False  # requested True (fp16), which the CPU turns off


# --- 6: relaunching a finished run ----------------------------------------------------------------------------------

def test_finished_run_says_so_and_touches_nothing(uninterrupted: Tuple[Path, str], demo_cfg: Path, digits: Path,
                                                  tmp_path: Path, run_here):
    shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    result = run_here(base_args(demo_cfg, digits, tmp_path))
    assert result.returncode == 0 and result.stderr == ""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "run already complete" in lines[0] and "finished epoch 1 of TRAIN.EPOCHS 2" in lines[0]
    assert snapshot(tmp_path) == before


# --- 7: exact resume ------------------------------------------------------------------------------------------------

def _train_losses(stdout: str, epoch: int) -> List[str]:
    return re.findall(rf"Train: \[{epoch}/2\]\[\d+/\d+\] .* loss ([\d.]+) \(", stdout)


def _scalars(run: Path, tag: str) -> List[Tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_resume_at_an_epoch_boundary_is_exact(uninterrupted: Tuple[Path, str], demo_cfg: Path, digits: Path,
                                              tmp_path: Path, run_here):
    output, stdout = uninterrupted
    shutil.copytree(output, tmp_path, dirs_exist_ok=True)
    run = tmp_path / RUN
    # the folder as a kill during epoch 1 leaves it: epoch 0's checkpoint, epoch 1's events already written
    for name in ("ckpt_epoch_1.pth", "best.pth", "best_ema.pth"):
        (run / name).unlink()
    shutil.copyfile(run / "ckpt_epoch_0.pth", run / "best.pth")
    shutil.copyfile(run / "ckpt_epoch_0.pth", run / "best_ema.pth")

    torch.manual_seed(12345)  # this interpreter's generators are anywhere: the checkpoint must set them
    result = run_here(base_args(demo_cfg, digits, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _train_losses(result.stdout, 1) == _train_losses(stdout, 1) != []
    assert "continuing at epoch 1" in result.stdout and "RNG states" in result.stdout
    resumed = torch.load(run / "ckpt_epoch_1.pth", weights_only=True)
    straight = torch.load(output / RUN / "ckpt_epoch_1.pth", weights_only=True)
    for key in ("model", "model_ema"):
        assert straight[key].keys() == resumed[key].keys()
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    for index, tensors in straight["optimizer"]["state"].items():
        assert all(torch.equal(torch.as_tensor(t), torch.as_tensor(resumed["optimizer"]["state"][index][name]))
                   for name, t in tensors.items())
    # TensorBoard: every step once, with the uninterrupted run's values (bit for bit)
    for tag in ("train/loss", "val/acc1"):
        assert _scalars(run, tag) == _scalars(output / RUN, tag)


# --- 8: rate formatting, official weights through timm --------------------------------------------------------------

def test_rates_below_one_image_per_second_are_not_shown_as_zero():
    from utils.throughput import format_rate

    assert [format_rate(r) for r in (0.3, 0.0412, 7.25, 45.24, 1234.4)] == ["0.3", "0.0412", "7.25", "45.2", "1234"]


SMALL_VARIANTS = {"defmamba_tiny": (dict(embed_dim=8, depths=(1, 1, 1, 1)), [8, 16, 32, 64]),
                  "damamba_tiny": (dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1)), [16, 32, 48, 64])}


@pytest.mark.parametrize("name", list(SMALL_VARIANTS))
def test_timm_pretrained_loads_a_local_file_or_says_how(tmp_path: Path, name: str):
    import timm

    import models

    with pytest.raises(models.CheckpointError, match=rf"{name} has no downloadable weights: .* "
                                                     r"pretrained_cfg_overlay=dict\(file="):
        timm.create_model(name, pretrained=True)
    arch, channels = SMALL_VARIANTS[name]
    small = dict(num_classes=3, **arch)
    source = timm.create_model(name, **small)
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "weights.pth")  # trainer/release layout
    overlay = dict(file=str(tmp_path / "weights.pth"))
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **small)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    backbone = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, **small)
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == channels
    with pytest.raises(models.CheckpointError, match="does not match the model"):  # strict, as everywhere
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5, **arch)
