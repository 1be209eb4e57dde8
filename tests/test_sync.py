"""Host syncs of a training step: between log steps nothing is read from the device (the fp16 GradScaler's own
overflow check excepted) and no collective runs; a NaN between log steps still stops the run at the next one.

The counts come from wrapping every Python entry point that copies a tensor's value to the host (`item`,
`__float__`, `tolist`, ...) and every collective of torch.distributed; on the CPU nothing actually waits,
but the same calls on a GPU would each drain its queue.
"""
from __future__ import annotations

import logging
import math
import traceback
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from yacs.config import CfgNode

import models
import utils.train_epoch as train_epoch
from config import get_default_config
from utils.amp import AmpPolicy, GradStepper
from utils.optimizer import build_optimizer

HOST_READS = ("item", "__float__", "__int__", "__index__", "__bool__", "tolist", "numpy", "cpu")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "reduce",
               "reduce_scatter", "barrier")
POLICIES = {"fp32": AmpPolicy(False, torch.bfloat16, "cpu"), "bf16": AmpPolicy(True, torch.bfloat16, "cpu"),
            "fp16": AmpPolicy(True, torch.float16, "cpu")}


class Counting:
    """Calls of HOST_READS / COLLECTIVES, as "name file:line" of their caller, in call order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sites: List[str] = []
        for owner, names in ((torch.Tensor, HOST_READS), (dist, COLLECTIVES)):
            for name in names:
                monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name: str, real):
        def counted(*args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            # AdamW (neither capturable nor fused) keeps its step counts in CPU tensors and reads them with
            # .item() on every step: a host read of host memory, no device sync
            if "/torch/optim/" not in caller.filename:
                self.sites.append(f"{name} {caller.filename}:{caller.lineno}")
            return real(*args, **kwargs)
        return counted


class MarkedLoader:
    """A loader whose iteration records the counted calls of each loop iteration but the last."""

    def __init__(self, loader: DataLoader, counting: Counting) -> None:
        self.loader, self.counting, self.per_iteration = loader, counting, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        start = None
        for batch in self.loader:
            if start is not None:
                self.per_iteration.append(self.counting.sites[start:])
            start = len(self.counting.sites)
            yield batch


def tiny_model() -> Tuple[torch.nn.Module, CfgNode]:
    """A small conv net: the trainer's syncs are under test (the tiny DefMamba's forward and backward make
    none of these calls either, but take seconds per step on a loaded 2-core machine)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return model, get_default_config()


def parts_for(amp: AmpPolicy, loader, model, config, wrapped=None, accumulation: int = 1, print_freq: int = 100):
    optimizer = build_optimizer(config, model, 1e-3)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    return train_epoch.TrainParts(
        model=wrapped or model, module=model, loader=loader, optimizer=optimizer,
        scheduler=CosineLRScheduler(optimizer, t_initial=10), stepper=GradStepper(amp, 5.0), amp=amp,
        criterion=SoftTargetCrossEntropy(), mixup=mixup, ema=ModelEmaV3(model, decay=0.9),
        device=torch.device("cpu"), accumulation_steps=accumulation, epochs=1, print_freq=print_freq,
        logger=logging.getLogger("test_sync"), writer=None, mesa=1.0, mesa_start_epoch=0)


def batches(n: int, batch: int = 2) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n * batch, 3, 32, 32), torch.randint(0, 4, (n * batch,))),
                      batch_size=batch)


@pytest.mark.parametrize("precision,accumulation", [("fp32", 1), ("bf16", 2), ("fp16", 1)])
def test_steps_between_log_steps_read_nothing_from_the_device(precision, accumulation, monkeypatch):
    """5 (6) iterations, log steps 0 and the last: the others may sync only in the fp16 scaler's step."""
    model, config = tiny_model()
    counting = Counting(monkeypatch)
    loader = MarkedLoader(batches(6 if accumulation == 2 else 5), counting)
    parts = parts_for(POLICIES[precision], loader, model, config, accumulation=accumulation)
    stats = train_epoch.train_one_epoch(parts, 0)
    assert stats.loss > 0 and stats.grad_norm > 0
    middle = loader.per_iteration[1:]  # iterations 1 .. (last - 1): the last one's calls are not marked
    for idx, sites in enumerate(middle, start=1):
        is_update = (idx + 1) % accumulation == 0
        expected = 1 if precision == "fp16" and is_update else 0
        assert len(sites) == expected, (idx, sites)
        if expected:
            assert "grad_scaler.py" in sites[0]  # found_inf, read by GradScaler.step itself
    # the log steps read everything in one go: a single .tolist() of the stacked meters and watch
    assert sum("tolist" in s and "meters.py" in s for s in loader.per_iteration[0]) == 1


def test_evaluation_reads_the_device_only_at_log_steps(monkeypatch):
    """Validation sums loss and hits on the device; it reads them at its log steps and once at the end."""
    from utils.evaluate import evaluate
    model, _ = tiny_model()
    counting = Counting(monkeypatch)
    loader = MarkedLoader(batches(5), counting)
    result = evaluate(model, loader, POLICIES["fp32"], torch.device("cpu"), logging.getLogger("test"), 10)
    images, targets = batches(5).dataset.tensors
    with torch.no_grad():
        logits = model(images)
    assert result.images == 10
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    assert result.acc1 == pytest.approx(100 * (logits.argmax(1) == targets).double().mean().item())
    assert all(not sites for sites in loader.per_iteration[1:]), loader.per_iteration


class SyncErrorsBetweenLogSteps:
    """Iterates `batches` with CUDA's sync debug mode at "error" for every iteration that is not a log step."""

    def __init__(self, batches: List, print_freq: int) -> None:
        self.batches, self.print_freq = batches, print_freq

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        try:
            for idx, batch in enumerate(self.batches):
                log_step = idx % self.print_freq == 0 or idx == len(self.batches) - 1
                torch.cuda.set_sync_debug_mode("default" if log_step else "error")
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_steps_between_log_steps_never_synchronize(precision):
    """On a GPU, any synchronising call between log steps raises (torch.cuda.set_sync_debug_mode)."""
    model, config = tiny_model()
    model.cuda()
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 4, (4,), device="cuda"))
            for _ in range(6)]
    amp = AmpPolicy(precision != "fp32", torch.bfloat16, "cuda")
    parts = parts_for(amp, SyncErrorsBetweenLogSteps(data, print_freq=100), model, config)
    parts.device = torch.device("cuda")
    stats = train_epoch.train_one_epoch(parts, 0)
    assert math.isfinite(stats.loss) and stats.grad_norm > 0


@pytest.fixture()
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_steps_run_no_collective_of_their_own_between_log_steps(process_group, monkeypatch):
    model, config = tiny_model()
    counting = Counting(monkeypatch)
    loader = MarkedLoader(batches(5), counting)
    parts = parts_for(POLICIES["fp32"], loader, model, config, wrapped=DistributedDataParallel(model))
    train_epoch.train_one_epoch(parts, 0)
    assert loader.per_iteration[1:] == [[], [], []]
    # the first log step: one all_gather carries the meters and the NaN/inf record of every rank
    assert [s.split()[0] for s in loader.per_iteration[0] if s.split()[0] in COLLECTIVES] == ["all_gather"]


def _poisoned(second_forward_only: List[int]):
    """Build a model whose second training forward returns NaN logits."""
    real_build = models.build_model

    def build(config):
        model = real_build(config)

        def poison(module, inputs, output):
            if module.training:
                second_forward_only.append(0)
                if len(second_forward_only) == 2:
                    return output * float("nan")
            return output

        model.register_forward_hook(poison)
        return model
    return build


def test_nan_between_log_steps_stops_at_the_next_one_without_a_checkpoint(tiny_cfg: Path, digits: Path,
                                                                          tmp_path: Path, monkeypatch, run_here):
    import main as trainer

    # 24 digits at batch 8: 3 iterations, log steps 0 and 2 (the epoch's last, right before its checkpoint);
    # the NaN comes in iteration 1 (0-based), between them
    monkeypatch.setattr(trainer.models, "build_model", _poisoned([]))
    result = run_here(["--cfg", str(tiny_cfg), "--data-path", str(digits), "--output", str(tmp_path),
                       "--opts", "PRINT_FREQ", "2", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: loss is nan at epoch 0 iteration 2/3; stopped at iteration 3, the next log step, with no "
        "checkpoint written since, the last checkpoint is left intact"]
    assert "Train: [0/1][0/3]" in result.stdout and "Train: [0/1][2/3]" not in result.stdout
    assert "Val (model)" not in result.stdout
    assert not list(tmp_path.rglob("*.pth"))  # nothing saved from the non-finite state
