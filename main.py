"""Train, evaluate or time DefMamba or DAMamba on ImageNet-layout folders or the embedded MNIST-5k digits.

Launch as a single process (`python main.py ...`, GPU or CPU), with `torchrun`, or with
`python -m torch.distributed.launch` (which passes `--local-rank`). See docs/training.md.

Exit codes: 0 done (also: the run was already complete); 1 the run failed (NaN/inf loss, unreadable image,
out of memory); 2 bad input (flag, config key, data path, checkpoint, unusable output folder), reported before
anything in the output folder is changed; 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from yacs.config import CfgNode

import data
import models
from config import ConfigError, get_config
from utils import checkpoint as ckpt
from utils.amp import AmpPolicy, AmpUnsupported, GradStepper, resolve_amp
from utils.distributed import DistContext, barrier, init_distributed, shutdown_distributed
from utils.evaluate import EvalResult, evaluate
from utils.flops import count_flops, count_params
from utils.logger import LOGGER_NAME, add_file_logging, log_to_files, setup_console_logging
from utils.lr_scheduler import build_scheduler, scaled_lrs
from utils.meters import format_seconds
from utils.optimizer import build_optimizer
from utils.throughput import format_rate, measure_throughput
from utils.train_epoch import EpochStats, NonFiniteError, TrainParts, train_one_epoch, updates_per_epoch

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage dump) and exits with EXIT_USAGE."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see python main.py --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _str2bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The release's flags (VMamba names). Unknown flags are errors, never silently ignored."""
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", metavar="FILE", help="YAML config (may name BASE configs)")
    parser.add_argument("--opts", nargs="+", metavar="KEY VALUE", help="config overrides, applied last")
    parser.add_argument("--batch-size", type=int, help="batch size per process (DATA.BATCH_SIZE)")
    parser.add_argument("--data-path", help="folder holding train/ and val/ (DATA.DATA_PATH)")
    parser.add_argument("--output", help="output root (OUTPUT); runs go to OUTPUT/MODEL.NAME/TAG")
    parser.add_argument("--tag", help="run sub-folder (TAG, default 'default' so relaunches auto-resume)")
    parser.add_argument("--resume", help="checkpoint to continue from, or to evaluate with --eval")
    parser.add_argument("--pretrained", help="weights to start from (training restarts at epoch 0)")
    parser.add_argument("--eval", action="store_true", help="only evaluate the --resume/--pretrained checkpoint")
    parser.add_argument("--throughput", action="store_true", help="only measure inference images/s")
    parser.add_argument("--flops", action="store_true", help="count GFLOPs at start (PRINT_FLOPS)")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing (saves memory)")
    parser.add_argument("--disable_amp", action="store_true", help="train and evaluate in fp32")
    parser.add_argument("--amp-dtype", choices=("bf16", "fp16"), help="autocast dtype (AMP_DTYPE)")
    parser.add_argument("--model_ema", type=_str2bool, nargs="?", const=True, metavar="BOOL",
                        help="keep an EMA of the weights (TRAIN.EMA.ENABLE)")
    parser.add_argument("--model_ema_decay", type=float, help="EMA decay (TRAIN.EMA.DECAY)")
    parser.add_argument("--seed", type=int, help="random seed (SEED; each process adds its rank)")
    parser.add_argument("--local_rank", "--local-rank", type=int, dest="local_rank",
                        help="set by torch.distributed.launch; LOCAL_RANK from the environment wins")
    return parser.parse_args(argv)


class UsageError(ValueError):
    """A bad request found by main itself (e.g. --eval without a checkpoint)."""


def _log_model(model: nn.Module, config: CfgNode, logger: logging.Logger) -> None:
    params = count_params(model)
    frozen = count_params(model, trainable_only=False) - params
    flops = " (GFLOPs: --flops, or python -m utils.flops)"
    if config.PRINT_FLOPS:
        try:
            flops = f", {count_flops(model, config.DATA.IMG_SIZE, models.input_channels(config)):.3f} GFLOPs " \
                    f"at {config.DATA.IMG_SIZE} px"
        except Exception as err:  # a FLOPs-tracing problem must not stop training
            logger.warning("GFLOPs not counted: %s", " ".join(str(err).split())[:200])
    logger.info("model %s: %.2fM trainable parameters%s%s", config.MODEL.NAME, params / 1e6,
                f" (+{frozen:,} frozen)" if frozen else "", flops)


def _find_auto_resume(output_dir: Path, logger: logging.Logger) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest readable ckpt_epoch_*.pth in `output_dir`; an unreadable newer one is skipped with a
    warning. Epoch checkpoints that all fail to load are an error: starting afresh would overwrite them."""
    candidates = ckpt.epoch_checkpoints(output_dir)
    for path in reversed(candidates):
        try:
            return path, ckpt.read_checkpoint(path)
        except models.CheckpointError as err:
            logger.warning("auto-resume: skipping %s", err)
    if candidates:
        raise UsageError(f"none of the {len(candidates)} checkpoints in {output_dir} can be read; move them away "
                         "to start afresh or pass --opts TRAIN.AUTO_RESUME False with another --tag")
    return None


def _run_eval(config: CfgNode, ctx: DistContext, amp: AmpPolicy, loaders: data.Loaders, model: nn.Module,
              weights: Path, checkpoint: Dict[str, Any], logger: logging.Logger) -> None:
    """Top-1/top-5 of the model and, when the file holds one, of its EMA."""
    models.load_pretrained(model, str(weights), checkpoint=checkpoint)
    results = {"model": evaluate(model, loaders.val, amp, ctx.device, logger, config.PRINT_FREQ, "model")}
    if "model_ema" in checkpoint:
        models.load_pretrained(model, str(weights), use_ema=True, checkpoint=checkpoint)
        results["EMA"] = evaluate(model, loaders.val, amp, ctx.device, logger, config.PRINT_FREQ, "EMA")
    for label, result in results.items():
        logger.info("eval %s of %s: acc@1 %.3f acc@5 %.3f loss %.4f (%d images)", label, weights, result.acc1,
                    result.acc5, result.loss, result.images)


def _run_throughput(config: CfgNode, ctx: DistContext, amp: AmpPolicy, model: nn.Module,
                    logger: logging.Logger) -> None:
    policies = ([amp] if amp.enabled else []) + [AmpPolicy(False, amp.dtype, amp.device_type)]
    for policy in policies:
        speed = measure_throughput(model, config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE,
                                   models.input_channels(config), policy, ctx.device)
        logger.info("throughput (%s, batch %d, %d px): %s images/s", policy.label, config.DATA.BATCH_SIZE,
                    config.DATA.IMG_SIZE, format_rate(speed))


def _save_epoch(state: Dict[str, Any], output_dir: Path, epoch: int, improved: bool, improved_ema: bool,
                keep: int) -> None:
    """ckpt_epoch_<epoch>.pth, copied to best.pth / best_ema.pth on a new best, then old epochs pruned."""
    path = output_dir / ckpt.epoch_checkpoint_name(epoch)
    ckpt.save_atomic(state, path)
    if improved:
        ckpt.copy_atomic(path, output_dir / ckpt.BEST_NAME)
    if improved_ema:
        ckpt.copy_atomic(path, output_dir / ckpt.BEST_EMA_NAME)
    ckpt.prune_epoch_checkpoints(output_dir, keep)


def _write_epoch_scalars(writer: SummaryWriter, step: int, stats: EpochStats, val: EvalResult,
                         val_ema: Optional[EvalResult]) -> None:
    scalars = {"val/acc1": val.acc1, "val/acc5": val.acc5, "val/loss": val.loss, "train/epoch_loss": stats.loss,
               "train/images_per_s": stats.images_per_s}
    if val_ema is not None:
        scalars.update({"val_ema/acc1": val_ema.acc1, "val_ema/acc5": val_ema.acc5})
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    writer.flush()


def _run_config_text(config: CfgNode, ctx: DistContext, amp: AmpPolicy) -> str:
    """The config as this run used it (AMP_ENABLE as resolved for the device), headed by a comment line."""
    used = config.clone()
    used.defrost()
    used.AMP_ENABLE = amp.enabled
    return (f"# as run: device {ctx.device.type}, {ctx.world_size} process(es), "
            f"AMP {amp.label if amp.enabled else 'off (fp32)'}\n{used.dump()}")


def _prepare_output_dir(output_dir: Path) -> None:
    """Create `output_dir` and check that a file can be written in it; UsageError (one line) otherwise."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        reason = (err.strerror or type(err).__name__).lower()
        where = f" ({err.filename})" if err.filename and Path(err.filename) != output_dir else ""
        raise UsageError(f"cannot use output folder {output_dir}: {reason}{where}; pass --output <a writable "
                         "folder>") from None


def _finished(resume: Optional[Tuple[Path, Dict[str, Any]]], config: CfgNode) -> Optional[str]:
    """The line to print when the resumed checkpoint already completed all TRAIN.EPOCHS, else None."""
    if resume is None or "epoch" not in resume[1] or int(resume[1]["epoch"]) + 1 < config.TRAIN.EPOCHS:
        return None
    return (f"run already complete: {resume[0]} finished epoch {int(resume[1]['epoch'])} of TRAIN.EPOCHS "
            f"{config.TRAIN.EPOCHS}; nothing to do (train longer with --opts TRAIN.EPOCHS N, or start another "
            "run with --tag)")


def _train(config: CfgNode, ctx: DistContext, amp: AmpPolicy, loaders: data.Loaders, model: nn.Module,
           output_dir: Path, resume: Optional[Tuple[Path, Dict[str, Any]]],
           pretrained: Optional[Tuple[Path, Dict[str, Any]]], logger: logging.Logger) -> None:
    """`pretrained` (path, checkpoint): weights already loaded into `model`, whose model_ema entry (if any)
    starts the EMA; ignored when resuming."""
    mixup = data.build_mixup(config)
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    if ema is not None and pretrained is not None and resume is None and "model_ema" in pretrained[1]:
        models.load_pretrained(ema.module, str(pretrained[0]), use_ema=True, checkpoint=pretrained[1])
        logger.info("EMA initialised from the model_ema entry of %s", pretrained[0])
    lrs = scaled_lrs(config, ctx.world_size)
    logger.info("total batch %d (%d x %d processes x %d accumulation): lr %.3g, warm-up lr %.3g, min lr %.3g",
                lrs.total_batch, config.DATA.BATCH_SIZE, ctx.world_size, config.TRAIN.ACCUMULATION_STEPS,
                lrs.base, lrs.warmup, lrs.minimum)
    optimizer = build_optimizer(config, model, lrs.base)
    stepper = GradStepper(amp, config.TRAIN.CLIP_GRAD)
    updates = updates_per_epoch(len(loaders.train), config.TRAIN.ACCUMULATION_STEPS)
    scheduler = build_scheduler(config, optimizer, lrs, updates)
    start_epoch, best, best_ema = 0, 0.0, 0.0
    if resume is not None:
        state = ckpt.restore_run(resume[0], resume[1], model, ema, optimizer, scheduler, stepper, logger)
        start_epoch, best, best_ema = state.start_epoch, state.max_accuracy, state.max_accuracy_ema
        # best.pth / best_ema.pth are replaced only by better models than the ones they hold
        file_best, file_best_ema = ckpt.best_accuracies(output_dir, logger)
        best = file_best if file_best is not None else best
        best_ema = file_best_ema if file_best_ema is not None else best_ema
        if (best, best_ema) != (state.max_accuracy, state.max_accuracy_ema):
            logger.info("best so far, as saved in %s: acc@1 %.2f, EMA %.2f", output_dir, best, best_ema)
    wrapped = model
    if ctx.distributed:
        wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                          broadcast_buffers=False)
    batches = updates * config.TRAIN.ACCUMULATION_STEPS
    # purge_step: events a killed launch wrote past the checkpoint are dropped, not shown twice
    writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_epoch * batches or None) \
        if ctx.is_main else None
    if ctx.is_main:
        ckpt.remove_stale_temporaries(output_dir)
        config_file = output_dir / "config.yaml"
        tmp = config_file.with_name(f".config.yaml.tmp-{os.getpid()}")
        tmp.write_text(_run_config_text(config, ctx, amp), encoding="utf-8")
        os.replace(tmp, config_file)
    criterion = SoftTargetCrossEntropy() if mixup is not None \
        else nn.CrossEntropyLoss(label_smoothing=config.MODEL.LABEL_SMOOTHING)
    parts = TrainParts(model=wrapped, module=model, loader=loaders.train, optimizer=optimizer, scheduler=scheduler,
                       stepper=stepper, amp=amp, criterion=criterion, mixup=mixup, ema=ema, device=ctx.device,
                       accumulation_steps=config.TRAIN.ACCUMULATION_STEPS, epochs=config.TRAIN.EPOCHS,
                       print_freq=config.PRINT_FREQ, logger=logger, writer=writer, mesa=config.TRAIN.MESA,
                       mesa_start_epoch=int(config.TRAIN.MESA_START * config.TRAIN.EPOCHS))
    if config.TRAIN.MESA > 0:
        logger.info("MESA: loss += %g x soft-target CE against the EMA's predictions from epoch %d on",
                    parts.mesa, parts.mesa_start_epoch)
    logger.info("training epochs %d..%d (%d updates per epoch) in %s", start_epoch, config.TRAIN.EPOCHS - 1,
                updates, output_dir)
    run_start = time.time()
    try:
        for epoch in range(start_epoch, config.TRAIN.EPOCHS):
            data.set_epoch(loaders.train, epoch, config.SEED, ctx.rank)
            stats = train_one_epoch(parts, epoch)
            val = evaluate(model, loaders.val, amp, ctx.device, logger, config.PRINT_FREQ, "model")
            val_ema = evaluate(ema.module, loaders.val, amp, ctx.device, logger, config.PRINT_FREQ, "EMA") \
                if ema is not None else None
            improved = val.acc1 > best
            best = max(best, val.acc1)
            improved_ema = val_ema is not None and val_ema.acc1 > best_ema
            best_ema = max(best_ema, val_ema.acc1) if val_ema is not None else best_ema
            rng = ckpt.gather_rng_states()  # every rank takes part; rank 0 saves them
            if ctx.is_main:
                state = ckpt.training_state(model, ema, optimizer, scheduler, stepper, epoch, best, best_ema,
                                            _run_config_text(config, ctx, amp), rng)
                _save_epoch(state, output_dir, epoch, improved, improved_ema, config.TRAIN.KEEP_CHECKPOINTS)
                # per-epoch scalars at the epoch's last iteration: one step axis for all tags (purge_step)
                _write_epoch_scalars(writer, (epoch + 1) * batches - 1, stats, val, val_ema)
            barrier()  # no rank starts the next epoch before the checkpoint is on disk
            ema_text = f" | EMA acc@1 {val_ema.acc1:.2f} (best {best_ema:.2f})" if val_ema is not None else ""
            logger.info("Epoch %d/%d done in %s | train loss %.4f lr %.3g grad_norm %.3f %s img/s | "
                        "val acc@1 %.2f acc@5 %.2f (best %.2f)%s", epoch, config.TRAIN.EPOCHS,
                        format_seconds(stats.seconds), stats.loss, stats.lr, stats.grad_norm,
                        format_rate(stats.images_per_s),
                        val.acc1, val.acc5, best, ema_text)
    finally:
        if writer is not None:
            writer.close()
    logger.info("training done in %s: best acc@1 %.2f%s", format_seconds(time.time() - run_start), best,
                f", EMA best acc@1 {best_ema:.2f}" if ema is not None else "")


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Everything after parsing `argv`; raises the exceptions that `main` turns into exit codes."""
    config = get_config(args)
    ctx = init_distributed(args.local_rank)
    logger = setup_console_logging(ctx.rank)
    random_seed(config.SEED, ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp, amp_note = resolve_amp(config.AMP_ENABLE, config.AMP_DTYPE, ctx.device)

    # --- inputs are checked before the output folder is created or changed ---
    output_dir = Path(config.OUTPUT) / config.MODEL.NAME / config.TAG
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
        raise UsageError("--eval needs a checkpoint: pass --resume <checkpoint> (or --pretrained <weights>)")
    resume: Optional[Tuple[Path, Dict[str, Any]]] = None
    if config.MODEL.RESUME:
        resume = Path(config.MODEL.RESUME), ckpt.read_checkpoint(Path(config.MODEL.RESUME))
    if training and config.TRAIN.AUTO_RESUME:
        found = _find_auto_resume(output_dir, logger)
        if found is not None:
            if resume is not None and found[0].resolve() != resume[0].resolve():
                logger.info("auto-resume: %s replaces --resume %s", found[0], resume[0])
            resume = found
    # every checkpoint is read once, here (a bad file stops the run before anything is written)
    pretrained: Optional[Tuple[Path, Dict[str, Any]]] = None
    if config.MODEL.PRETRAINED:
        pretrained = Path(config.MODEL.PRETRAINED), ckpt.read_checkpoint(Path(config.MODEL.PRETRAINED))
    root = None if config.THROUGHPUT_MODE else data.resolve_data_root(config, need_train=training)
    done = _finished(resume, config) if training else None
    if done:
        logger.info(done)  # console only: the output folder is left untouched
        return

    _prepare_output_dir(output_dir)
    add_file_logging(logger, output_dir, ctx.rank)
    logger.info("%s on %s, rank %d of %d (local rank %d); output %s",
                "training" if training else ("eval" if config.EVAL_MODE else "throughput"), ctx.device,
                ctx.rank, ctx.world_size, ctx.local_rank, output_dir)
    log_to_files(logger, logging.INFO, f"command: main.py {' '.join(argv)}\nconfig:\n{config.dump()}")
    logger.info("AMP: %s", amp.label)
    if amp_note:
        logger.info(amp_note)

    model = models.build_model(config)
    if ctx.is_main:
        _log_model(model, config, logger)
    model.to(ctx.device)
    if config.THROUGHPUT_MODE:
        _run_throughput(config, ctx, amp, model, logger)
        return
    loaders = data.build_loaders(config, root, ctx.rank, ctx.world_size, need_train=training, device=ctx.device)
    if config.EVAL_MODE:
        weights, checkpoint = resume if resume is not None else pretrained
        _run_eval(config, ctx, amp, loaders, model, weights, checkpoint, logger)
        return
    if pretrained is not None and resume is None:
        models.load_pretrained(model, str(pretrained[0]), checkpoint=pretrained[1])
        logger.info("model weights loaded from %s", pretrained[0])
    _train(config, ctx, amp, loaders, model, output_dir, resume, pretrained, logger)


def _report(message: str, every_rank: bool) -> None:
    """One line on stderr and in this rank's log file. Bad input is the same on every rank, so only rank 0
    prints it; a failure may hit one rank only, so each rank prints its own (prefixed in distributed runs)."""
    line = " ".join(message.split())
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if every_rank or rank == 0:
        prefix = f"[rank {rank}] " if every_rank and world_size > 1 else ""
        print(f"{prefix}error: {line}", file=sys.stderr)
    log_to_files(logging.getLogger(LOGGER_NAME), logging.ERROR, line)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation (CPU or CUDA). The kernel's OOM killer ends a process without any exception."""
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line `argv` and return the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    usage_errors = (ConfigError, UsageError, AmpUnsupported, models.CheckpointError, data.DataError,
                    data.Mnist5kUnavailable)
    try:
        run(args, argv)
    except usage_errors as err:
        _report(str(err), every_rank=False)
        return EXIT_USAGE
    except NonFiniteError as err:
        _report(str(err), every_rank=True)
        return EXIT_FAILED
    except data.CorruptImageError as err:
        _report(data.corrupt_image_summary(err), every_rank=True)
        return EXIT_FAILED
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        _report(f"out of memory ({_first_line(err)}); lower --batch-size (on the CPU, DEFMAMBA_SCAN_MEMORY_MB "
                "also bounds the scan's working memory, see docs/training.md)", every_rank=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        _report("interrupted; relaunch the same command to continue from the newest checkpoint in the output "
                "folder", every_rank=False)
        return EXIT_INTERRUPTED
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
