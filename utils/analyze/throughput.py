"""Throughput and memory table: img/s (training, inference) and peak memory per model and batch, as markdown.

Each row is measured on the current device with utils.throughput (the trainer's --throughput forward loop
and the same loop over training steps: autocast forward, cross-entropy, scaled backward, clip 5.0, AdamW),
on random input already on the device, so input loading is not counted. Peak memory is
torch.cuda.max_memory_allocated over the training steps (and over inference), reset before each; a CPU has
no allocator statistics, so it shows "-" there. The official figures of the releases are printed beside
ours; they compare only at the conditions named in their `source` (one GPU, batch 128, 224 px).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import torch

from utils.amp import AmpPolicy
from utils.throughput import measure_throughput, measure_train_throughput, peak_memory_gib, reset_memory

from .inputs import LoadedModel

__all__ = ["OFFICIAL", "measure_rows", "markdown_table"]

# Published figures, keyed by timm name: DefMamba's release measured issue #8's way; VMamba's README.
_H100 = "official release, 1x H100, batch 128, 224 px, fp16 AMP training"
_A100 = "VMamba README, 1x A100, batch 128, 224 px (inference precision not stated)"
OFFICIAL: Dict[str, Dict[str, Any]] = {
    "defmamba_tiny": {"train": 549, "infer_fp32": 1771, "infer_amp": 1737, "train_mem_gib": 10.7, "source": _H100},
    "defmamba_small": {"train": 345, "infer_fp32": 790, "infer_amp": 937, "train_mem_gib": 21.6, "source": _H100},
    "vmamba_tiny": {"train": 571, "infer": 1686, "source": _A100},
    "vmamba_small": {"train": 314, "infer": 877, "source": _A100},
    "vmamba_base": {"train": 247, "infer": 646, "source": _A100},
}


def measure_rows(models: Sequence[LoadedModel], batch_sizes: Sequence[int], amp: AmpPolicy, device: torch.device,
                 train: bool = True, warmup: Optional[int] = None, timed: Optional[int] = None,
                 progress=print) -> List[Dict[str, Any]]:
    """One dict per (model, batch size): img/s of training, inference under `amp` and in fp32, peak memory."""
    fp32 = AmpPolicy(False, amp.dtype, device.type)
    rows = []
    total = len(models) * len(batch_sizes)
    for loaded in models:
        for batch in batch_sizes:
            progress(f"[{len(rows) + 1}/{total}] {loaded.label} batch {batch} at {loaded.img_size} px on {device}")
            in_chans = loaded.model.in_chans
            row: Dict[str, Any] = {"model": loaded.label, "batch": batch, "img_size": loaded.img_size,
                                   "amp": amp.label, "device": str(device)}
            if train:
                reset_memory(device)
                trained = copy.deepcopy(loaded.model).to(device)
                row["train_img_s"] = measure_train_throughput(trained, batch, loaded.img_size, in_chans, amp, device,
                                                              warmup=warmup, timed=timed)
                row["train_mem_gib"] = peak_memory_gib(device)
                del trained
            reset_memory(device)
            model = loaded.model.to(device)
            row["infer_amp_img_s"] = measure_throughput(model, batch, loaded.img_size, in_chans, amp, device,
                                                        warmup=warmup, timed=timed)
            row["infer_fp32_img_s"] = measure_throughput(model, batch, loaded.img_size, in_chans, fp32, device,
                                                         warmup=warmup, timed=timed)
            row["infer_mem_gib"] = peak_memory_gib(device)
            loaded.model.cpu()
            row["official"] = OFFICIAL.get(loaded.name or loaded.label)
            rows.append(row)
    return rows


def _cell(value: Optional[float], digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Dict[str, Any]], environment: str) -> str:
    """The rows as a markdown table, official figures in their own columns, sources listed below it."""
    lines = [f"Measured on {environment}.", "",
             "| model | batch | px | AMP | train img/s | infer AMP img/s | infer fp32 img/s | peak train GiB "
             "| official train | official infer | official peak GiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    sources = []
    for row in rows:
        official = row["official"] or {}
        infer = official.get("infer_fp32", official.get("infer"))
        if official and official["source"] not in sources:
            sources.append(official["source"])
        mark = f" [{sources.index(official['source']) + 1}]" if official else ""
        lines.append(f"| {row['model']} | {row['batch']} | {row['img_size']} | {row['amp']} "
                     f"| {_cell(row.get('train_img_s'), 1)} | {_cell(row['infer_amp_img_s'], 1)} "
                     f"| {_cell(row['infer_fp32_img_s'], 1)} | {_cell(row.get('train_mem_gib'), 2)} "
                     f"| {_cell(official.get('train'))}{mark} | {_cell(infer)}{mark} "
                     f"| {_cell(official.get('train_mem_gib'), 1)} |")
    lines += [""] + [f"[{i + 1}] {s}; inference in fp32 unless stated." for i, s in enumerate(sources)]
    return "\n".join(lines) + "\n"
