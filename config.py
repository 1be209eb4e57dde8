"""Training configuration: yacs defaults, merged from YAML (with `BASE` inheritance), CLI flags, `--opts`.

Every key below is read somewhere in the code; there are no placeholder keys. Merge order (later wins):
defaults -> YAML files of `BASE` (recursively, in list order) -> the YAML itself -> CLI flags -> `--opts`.
Unknown keys are errors (`ConfigError`), so a typo never passes silently.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import yaml
from yacs.config import CfgNode as CN

from data.build import LOADERS
from models import MODEL_TYPES, THIRD_BRANCHES  # the models define the values these keys take
from models.mamba_adaptor import FUSIONS as ADAPTOR_S_FUSIONS, SOURCES as ADAPTOR_T_SOURCES

__all__ = ["ConfigError", "DATASETS", "MODEL_TYPES", "AMP_DTYPES", "THIRD_BRANCHES", "get_default_config",
           "get_config", "load_yaml_config"]

# Values accepted by the string-valued keys (validated in `_validate`).
DATASETS = ("imagenet", "mnist5k")
AMP_DTYPES = ("fp16", "bf16")


class ConfigError(ValueError):
    """An unusable configuration: the message is one line naming the file or key at fault."""


_C = CN()

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size per process (the total batch is BATCH_SIZE x world size x TRAIN.ACCUMULATION_STEPS).
_C.DATA.BATCH_SIZE = 128
# ImageFolder root with train/ and val/; for 'mnist5k' an empty path means the cache folder.
_C.DATA.DATA_PATH = ""
# 'imagenet': any ImageFolder tree; 'mnist5k': the embedded MNIST subset (materialised on first use).
_C.DATA.DATASET = "imagenet"
_C.DATA.IMG_SIZE = 224
# Resampling used by the random-resized crop and the val resize.
_C.DATA.INTERPOLATION = "bilinear"
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# False: an unreadable image stops the run naming its path. True: it is logged and replaced by the next image.
_C.DATA.SKIP_CORRUPT = False
# 'torch': DataLoader workers decode with PIL and augment with timm's transforms. 'dali': NVIDIA DALI decodes
# and augments on the GPU (its CPU backend without one), same recipe (docs/training.md); needs
# `pip install -r requirements-dali.txt`.
_C.DATA.LOADER = "torch"

# -----------------------------------------------------------------------------
# Model (keys read by models.build_model)
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Names the output sub-folder: OUTPUT/MODEL.NAME/TAG.
_C.MODEL.NAME = "defmamba_tiny"
# Model family: 'defmamba' (keys MODEL.DEFMAMBA), 'damamba' (keys MODEL.DAMAMBA), 'vmamba' (keys MODEL.VMAMBA)
# or 'mamba_adaptor' (keys MODEL.MAMBA_ADAPTOR).
_C.MODEL.TYPE = "defmamba"
# Weights to start from (model and, if present, EMA); training starts at epoch 0.
_C.MODEL.PRETRAINED = ""
# Full checkpoint to continue from (or to evaluate with --eval).
_C.MODEL.RESUME = ""
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1

# DAMamba (MODEL.TYPE damamba); defaults are DAMamba-T as released.
_C.MODEL.DAMAMBA = CN()
_C.MODEL.DAMAMBA.IN_CHANS = 3
_C.MODEL.DAMAMBA.DIMS = [80, 160, 320, 512]
_C.MODEL.DAMAMBA.DEPTHS = [3, 4, 12, 5]
_C.MODEL.DAMAMBA.MLP_RATIOS = [4.0, 4.0, 3.0, 3.0]
# 0-based stages whose blocks scale both residual branches per channel ([2, 3] for S and B), and the scales' start.
_C.MODEL.DAMAMBA.LAYER_SCALE_STAGES = []
_C.MODEL.DAMAMBA.LAYER_SCALE_INIT = 1e-6
# Channels per offset group: each stage has DIMS[i] / HEAD_DIM groups of (dx, dy) offsets.
_C.MODEL.DAMAMBA.HEAD_DIM = 16
# Module-ablation switches (the DAMamba slides' Table 5, configs/ablation/damamba_*); True is the released model.
# Offsets + adaptive sampling (else raster scan), the block's conv position encoding (ResDWC `pos_embed`),
# the ResDWC inside the FFN (else a plain MLP). Parameters a switch leaves unused are not created.
_C.MODEL.DAMAMBA.ADAPTIVE_SCAN = True
_C.MODEL.DAMAMBA.CONV_POS_EMBED = True
_C.MODEL.DAMAMBA.CONV_FFN = True

_C.MODEL.DEFMAMBA = CN()
_C.MODEL.DEFMAMBA.IN_CHANS = 3
_C.MODEL.DEFMAMBA.EMBED_DIM = 48
_C.MODEL.DEFMAMBA.DEPTHS = [2, 2, 5, 2]
_C.MODEL.DEFMAMBA.D_STATE = 16
# 0 means auto: ceil(channels / 16).
_C.MODEL.DEFMAMBA.DT_RANK = 0
_C.MODEL.DEFMAMBA.SSM_RATIO = 1.0
_C.MODEL.DEFMAMBA.MLP_RATIO = 4.0
_C.MODEL.DEFMAMBA.OFFSET_KERNELS = [9, 7, 5, 3]
# Ablation switches (paper Tables 4 and 5, configs/ablation/); the defaults are the released model.
# Scan branches: the forward/backward raster pair, and a third branch: 'db' deformable, 'none',
# 'cb' continuous (snake) order, 'lb' local order in LOCAL_WINDOW x LOCAL_WINDOW tiles.
_C.MODEL.DEFMAMBA.FB_BB = True
_C.MODEL.DEFMAMBA.THIRD_BRANCH = "db"
_C.MODEL.DEFMAMBA.LOCAL_WINDOW = 7
# Parts of the deformable branch: point offset (DP), index offset (DT), offset bias (OB), channel
# attention in the offset network (CA). Parameters a switch leaves unused are not created.
_C.MODEL.DEFMAMBA.POINT_OFFSET = True
_C.MODEL.DEFMAMBA.INDEX_OFFSET = True
_C.MODEL.DEFMAMBA.OFFSET_BIAS = True
_C.MODEL.DEFMAMBA.CHANNEL_ATTENTION = True

# VMamba v2 (MODEL.TYPE vmamba, forward type v05_noz: channels-first LayerNorm, four-direction cross scan);
# defaults are VMamba-T as released. Stage i has EMBED_DIM * 2**i channels.
_C.MODEL.VMAMBA = CN()
_C.MODEL.VMAMBA.IN_CHANS = 3
_C.MODEL.VMAMBA.EMBED_DIM = 96
_C.MODEL.VMAMBA.DEPTHS = [2, 2, 8, 2]
_C.MODEL.VMAMBA.D_STATE = 1
# 0 means auto: ceil(channels / 16).
_C.MODEL.VMAMBA.DT_RANK = 0
_C.MODEL.VMAMBA.SSM_RATIO = 1.0
_C.MODEL.VMAMBA.MLP_RATIO = 4.0

# Mamba-Adaptor (MODEL.TYPE mamba_adaptor, a reconstruction on VMamba v2, docs/mamba_adaptor.md); defaults are
# Mamba-Adaptor-b1. Backbone keys as MODEL.VMAMBA; the adaptor keys are the paper's ablation switches.
_C.MODEL.MAMBA_ADAPTOR = CN()
_C.MODEL.MAMBA_ADAPTOR.IN_CHANS = 3
_C.MODEL.MAMBA_ADAPTOR.EMBED_DIM = 48
_C.MODEL.MAMBA_ADAPTOR.DEPTHS = [2, 2, 8, 2]
_C.MODEL.MAMBA_ADAPTOR.D_STATE = 1
_C.MODEL.MAMBA_ADAPTOR.DT_RANK = 0
_C.MODEL.MAMBA_ADAPTOR.SSM_RATIO = 1.0
_C.MODEL.MAMBA_ADAPTOR.MLP_RATIO = 4.0
# Adaptor-T in the 0-based T_STAGES: K = T_POINTS locations and weights per token for each of T_GROUPS channel
# groups; T_COORDS 1 (scan-sequence positions) or 2 (pixel coordinates); fractional locations interpolated
# (else nearest); predicted from T_SOURCE 'token' or 'state' (T_DYNAMIC) or learned per position; one
# predictor per scan direction (T_PER_DIRECTION); h + sum (T_RESIDUAL) or the sum only.
_C.MODEL.MAMBA_ADAPTOR.ADAPTOR_T = True
_C.MODEL.MAMBA_ADAPTOR.T_STAGES = [0, 1, 2, 3]
_C.MODEL.MAMBA_ADAPTOR.T_POINTS = 4
_C.MODEL.MAMBA_ADAPTOR.T_GROUPS = 4
_C.MODEL.MAMBA_ADAPTOR.T_COORDS = 2
_C.MODEL.MAMBA_ADAPTOR.T_INTERPOLATE = True
_C.MODEL.MAMBA_ADAPTOR.T_DYNAMIC = True
_C.MODEL.MAMBA_ADAPTOR.T_SOURCE = "token"
_C.MODEL.MAMBA_ADAPTOR.T_PER_DIRECTION = False
_C.MODEL.MAMBA_ADAPTOR.T_RESIDUAL = True
# Adaptor-S in S_STAGES: depthwise branches (kernel, dilation), fused by 'sum' or channel 'split', + input.
_C.MODEL.MAMBA_ADAPTOR.ADAPTOR_S = True
_C.MODEL.MAMBA_ADAPTOR.S_STAGES = [0, 1, 2, 3]
_C.MODEL.MAMBA_ADAPTOR.S_KERNEL_SIZES = [3, 3, 3]
_C.MODEL.MAMBA_ADAPTOR.S_DILATIONS = [1, 2, 3]
_C.MODEL.MAMBA_ADAPTOR.S_FUSION = "sum"
_C.MODEL.MAMBA_ADAPTOR.S_RESIDUAL = True

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# The three learning rates are for a total batch of 512 and scaled linearly to the actual total batch.
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
# Max global grad norm; 0 disables clipping (the norm is still logged).
_C.TRAIN.CLIP_GRAD = 5.0
# Continue from the newest ckpt_epoch_*.pth in the output folder when one exists.
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
# Activation checkpointing inside the model (trades compute for memory).
_C.TRAIN.USE_CHECKPOINT = False
# How many ckpt_epoch_*.pth to keep (best.pth / best_ema.pth are kept in addition).
_C.TRAIN.KEEP_CHECKPOINTS = 3
# The release decays every >=2-D tensor; True also exempts A_logs, Ds, dt_projs_bias and rpe_table.
_C.TRAIN.SSM_NO_WEIGHT_DECAY = False

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)

_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = True
_C.TRAIN.EMA.DECAY = 0.9999

# MESA self-distillation from the EMA (the DAMamba release's recipe): from epoch int(MESA_START x EPOCHS) on,
# loss += MESA x soft-target cross-entropy(logits, softmax(EMA logits)). 0 turns it off; needs TRAIN.EMA.
_C.TRAIN.MESA = 0.0
_C.TRAIN.MESA_START = 0.25

# -----------------------------------------------------------------------------
# Augmentation (timm)
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Ignored by timm while RandAugment is on (as in the release).
_C.AUG.COLOR_JITTER = 0.4
# timm RandAugment spec; empty string disables it.
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
# Random-resized-crop area range and horizontal-flip probability.
_C.AUG.SCALE = (0.08, 1.0)
_C.AUG.HFLIP = 0.5
# Random erasing probability / mode / count.
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
# Mixup / CutMix alphas; both 0 turns Mixup off (plain label-smoothing cross-entropy is used then).
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"

# -----------------------------------------------------------------------------
# Evaluation
# -----------------------------------------------------------------------------
_C.TEST = CN()
# True: resize to int(256 / 224 * IMG_SIZE) then center-crop IMG_SIZE; False: resize straight to IMG_SIZE.
_C.TEST.CROP = True

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Mixed precision on GPU (fp16 uses a GradScaler); on CPU only bf16 is used, fp16 falls back to fp32.
_C.AMP_ENABLE = True
_C.AMP_DTYPE = "fp16"
# Runs write to OUTPUT/MODEL.NAME/TAG; a fixed TAG lets a relaunch find its checkpoints (auto-resume).
_C.OUTPUT = "output"
_C.TAG = "default"
_C.PRINT_FREQ = 10
# Each process seeds with SEED + rank.
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
# Count GFLOPs at start (fvcore traces the model: tens of seconds on a CPU for full-size models).
_C.PRINT_FLOPS = False


def get_default_config() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _merge(config: CN, update: dict, source: str) -> None:
    try:
        config.merge_from_other_cfg(CN(update))
    except KeyError as err:
        # yacs: "Non-existent config key: X"
        raise ConfigError(f"{source}: unknown config key {str(err.args[0]).split(': ')[-1]}") from None
    except ValueError as err:
        # yacs: type mismatch
        raise ConfigError(f"{source}: {' '.join(str(err).split())}") from None


def load_yaml_config(config: CN, path: Path, _chain: tuple = ()) -> None:
    """Merge `path` into `config`, its `BASE` files first; a cycle in `BASE` is an error."""
    path = path.resolve()
    if path in _chain:
        raise ConfigError(f"config file {path} includes itself through BASE")
    data = _read_yaml(path)
    bases = data.pop("BASE", [""]) or [""]
    for base in bases if isinstance(bases, list) else [bases]:
        if base:
            load_yaml_config(config, path.parent / base, _chain + (path,))
    _merge(config, data, str(path))


def _merge_opts(config: CN, opts: List[str]) -> None:
    try:
        config.merge_from_list(opts)
    except AssertionError as err:
        # yacs asserts "Non-existent key: X" and "Override list has odd length"
        message = str(err)
        if message.startswith("Non-existent key"):
            message = f"unknown config key {message.split(': ', 1)[1]}"
        raise ConfigError(f"--opts: {message}") from None
    except ValueError as err:
        raise ConfigError(f"--opts: {' '.join(str(err).split())}") from None


def _validate(config: CN) -> None:
    if config.DATA.DATASET not in DATASETS:
        raise ConfigError(f"DATA.DATASET must be one of {', '.join(DATASETS)}, got {config.DATA.DATASET!r}")
    if config.DATA.LOADER not in LOADERS:
        raise ConfigError(f"DATA.LOADER must be one of {', '.join(LOADERS)}, got {config.DATA.LOADER!r}")
    if config.DATA.LOADER == "dali" and config.DATA.SKIP_CORRUPT:
        raise ConfigError("DATA.SKIP_CORRUPT needs DATA.LOADER torch: DALI stops at an unreadable file")
    if config.MODEL.TYPE not in MODEL_TYPES:
        raise ConfigError(f"MODEL.TYPE must be one of {', '.join(MODEL_TYPES)}, got {config.MODEL.TYPE!r}")
    if config.MODEL.TYPE == "damamba":
        d = config.MODEL.DAMAMBA
        if not len(d.DIMS) == len(d.DEPTHS) == len(d.MLP_RATIOS):
            raise ConfigError(f"MODEL.DAMAMBA.DIMS, DEPTHS and MLP_RATIOS need one entry per stage, got "
                              f"{list(d.DIMS)}, {list(d.DEPTHS)}, {list(d.MLP_RATIOS)}")
        if d.HEAD_DIM < 1 or any(dim % d.HEAD_DIM for dim in d.DIMS):
            raise ConfigError(f"MODEL.DAMAMBA.DIMS {list(d.DIMS)} must be multiples of HEAD_DIM ({d.HEAD_DIM})")
    if config.MODEL.TYPE == "mamba_adaptor":
        a = config.MODEL.MAMBA_ADAPTOR
        if a.T_SOURCE not in ADAPTOR_T_SOURCES or a.S_FUSION not in ADAPTOR_S_FUSIONS:
            raise ConfigError(f"MODEL.MAMBA_ADAPTOR.T_SOURCE must be one of {', '.join(ADAPTOR_T_SOURCES)} and "
                              f"S_FUSION one of {', '.join(ADAPTOR_S_FUSIONS)}, got {a.T_SOURCE!r} and {a.S_FUSION!r}")
        if len(a.S_KERNEL_SIZES) != len(a.S_DILATIONS):
            raise ConfigError(f"MODEL.MAMBA_ADAPTOR.S_KERNEL_SIZES and S_DILATIONS need one entry per branch, got "
                              f"{list(a.S_KERNEL_SIZES)} and {list(a.S_DILATIONS)}")
        if any(not 0 <= s < len(a.DEPTHS) for s in [*a.T_STAGES, *a.S_STAGES]):
            raise ConfigError(f"MODEL.MAMBA_ADAPTOR.T_STAGES {list(a.T_STAGES)} / S_STAGES {list(a.S_STAGES)} name "
                              f"stages outside 0..{len(a.DEPTHS) - 1}")
    if config.TRAIN.MESA < 0 or not 0 <= config.TRAIN.MESA_START <= 1:
        raise ConfigError(f"TRAIN.MESA must be >= 0 and TRAIN.MESA_START in [0, 1], got {config.TRAIN.MESA} and "
                          f"{config.TRAIN.MESA_START}")
    if config.TRAIN.MESA > 0 and not config.TRAIN.EMA.ENABLE:
        raise ConfigError("TRAIN.MESA distils from the EMA model: enable TRAIN.EMA (--model_ema True) or set "
                          "TRAIN.MESA 0")
    if config.AMP_DTYPE not in AMP_DTYPES:
        raise ConfigError(f"AMP_DTYPE must be one of {', '.join(AMP_DTYPES)}, got {config.AMP_DTYPE!r}")
    if config.DATA.BATCH_SIZE < 1 or config.TRAIN.ACCUMULATION_STEPS < 1:
        raise ConfigError("DATA.BATCH_SIZE and TRAIN.ACCUMULATION_STEPS must be >= 1")
    if not 0 <= config.TRAIN.WARMUP_EPOCHS < config.TRAIN.EPOCHS:
        raise ConfigError(f"TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS}) must be >= 0 and below "
                          f"TRAIN.EPOCHS ({config.TRAIN.EPOCHS})")
    if config.TRAIN.KEEP_CHECKPOINTS < 1:
        raise ConfigError("TRAIN.KEEP_CHECKPOINTS must be >= 1 (auto-resume needs the last checkpoint)")
    m = config.MODEL.DEFMAMBA
    if m.THIRD_BRANCH not in THIRD_BRANCHES:
        raise ConfigError(f"MODEL.DEFMAMBA.THIRD_BRANCH must be one of {', '.join(THIRD_BRANCHES)}, "
                          f"got {m.THIRD_BRANCH!r}")
    if not m.FB_BB and m.THIRD_BRANCH == "none":
        raise ConfigError("MODEL.DEFMAMBA.FB_BB False needs a THIRD_BRANCH other than 'none' (no scan branch left)")
    if m.LOCAL_WINDOW < 1:
        raise ConfigError(f"MODEL.DEFMAMBA.LOCAL_WINDOW must be >= 1, got {m.LOCAL_WINDOW}")
    mixup_on = config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0
    if mixup_on and config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"Mixup/CutMix needs an even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}")


def _apply_flags(config: CN, args: argparse.Namespace) -> None:
    """The CLI flags of the release, mapped onto their config keys (None = flag not given)."""
    flag_keys = {
        "batch_size": "DATA.BATCH_SIZE", "data_path": "DATA.DATA_PATH", "output": "OUTPUT", "tag": "TAG",
        "resume": "MODEL.RESUME", "pretrained": "MODEL.PRETRAINED",
        "accumulation_steps": "TRAIN.ACCUMULATION_STEPS", "amp_dtype": "AMP_DTYPE",
        "model_ema": "TRAIN.EMA.ENABLE", "model_ema_decay": "TRAIN.EMA.DECAY", "seed": "SEED",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
    if getattr(args, "use_checkpoint", False):
        config.TRAIN.USE_CHECKPOINT = True
    if getattr(args, "disable_amp", False):
        config.AMP_ENABLE = False
    if getattr(args, "eval", False):
        config.EVAL_MODE = True
    if getattr(args, "throughput", False):
        config.THROUGHPUT_MODE = True
    if getattr(args, "flops", False):
        config.PRINT_FLOPS = True


def get_config(args: Optional[argparse.Namespace] = None) -> CN:
    """The frozen config for `args` (attributes as produced by main.parse_args; all optional)."""
    config = get_default_config()
    cfg_file = getattr(args, "cfg", None)
    if cfg_file:
        load_yaml_config(config, Path(cfg_file))
    if args is not None:
        _apply_flags(config, args)
        _merge_opts(config, list(getattr(args, "opts", None) or []))
    _validate(config)
    config.freeze()
    return config

