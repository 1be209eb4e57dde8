"""Config: defaults, YAML + BASE merging, flag and --opts precedence, and one-line errors for typos."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import ConfigError, get_config, get_default_config
from conftest import REPO
from main import parse_args


def cfg_for(argv):
    return get_config(parse_args(argv))


def test_model_defaults_are_defmamba_tiny():
    c = get_default_config()
    m = c.MODEL.DEFMAMBA
    assert (c.MODEL.NUM_CLASSES, c.MODEL.DROP_PATH_RATE, c.TRAIN.USE_CHECKPOINT) == (1000, 0.1, False)
    assert (m.IN_CHANS, m.EMBED_DIM, m.DEPTHS, m.D_STATE, m.DT_RANK) == (3, 48, [2, 2, 5, 2], 16, 0)
    assert (m.SSM_RATIO, m.MLP_RATIO, m.OFFSET_KERNELS) == (1.0, 4.0, [9, 7, 5, 3])


def test_recipe_defaults_match_release():
    c = get_default_config()
    t = c.TRAIN
    assert (t.EPOCHS, t.WARMUP_EPOCHS, t.BASE_LR, t.WARMUP_LR, t.MIN_LR) == (300, 20, 5e-4, 5e-7, 5e-6)
    assert (t.WEIGHT_DECAY, t.CLIP_GRAD, t.EMA.DECAY, t.OPTIMIZER.EPS) == (0.05, 5.0, 0.9999, 1e-8)
    assert tuple(t.OPTIMIZER.BETAS) == (0.9, 0.999)
    a = c.AUG
    assert (a.MIXUP, a.CUTMIX, a.REPROB, a.COLOR_JITTER, a.AUTO_AUGMENT) == (0.8, 1.0, 0.25, 0.4,
                                                                              "rand-m9-mstd0.5-inc1")
    assert (c.MODEL.LABEL_SMOOTHING, c.DATA.INTERPOLATION, c.TAG) == (0.1, "bilinear", "default")


def _leaf_keys(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_config_key_is_read_by_the_code():
    sources = [p for d in ("data", "utils", "models") for p in (REPO / d).rglob("*.py")] + [REPO / "main.py"]
    text = "\n".join(p.read_text() for p in sources)
    # config.py itself reads keys in validation and in the flag table, not in the `_C.` definitions
    text += "\n".join(line for line in (REPO / "config.py").read_text().splitlines()
                      if not line.lstrip().startswith("_C."))
    unread = [key for key in _leaf_keys(get_default_config())
              if not re.search(rf"(\.|\"){re.escape(key.split('.')[-1])}\b", text)]
    assert unread == []


def test_yaml_base_flags_then_opts(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("DATA:\n  IMG_SIZE: 64\n  BATCH_SIZE: 32\nTRAIN:\n  EPOCHS: 30\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nDATA:\n  BATCH_SIZE: 16\nTAG: from_yaml\n")
    c = cfg_for(["--cfg", str(tmp_path / "child.yaml"), "--tag", "from_flag", "--batch-size", "4",
                 "--opts", "DATA.BATCH_SIZE", "6", "TRAIN.BASE_LR", "1e-3"])
    assert c.DATA.IMG_SIZE == 64 and c.TRAIN.EPOCHS == 30  # from BASE
    assert c.TAG == "from_flag"  # flag over YAML
    assert c.DATA.BATCH_SIZE == 6  # --opts over flag
    assert c.TRAIN.BASE_LR == 1e-3
    assert c.is_frozen()


def test_flags_map_to_keys():
    c = cfg_for(["--data-path", "/d", "--output", "/o", "--resume", "r.pth", "--pretrained", "p.pth",
                 "--accumulation-steps", "3", "--use-checkpoint", "--disable_amp", "--amp-dtype", "bf16",
                 "--model_ema", "False", "--model_ema_decay", "0.99", "--seed", "7", "--eval", "--throughput"])
    assert (c.DATA.DATA_PATH, c.OUTPUT, c.MODEL.RESUME, c.MODEL.PRETRAINED) == ("/d", "/o", "r.pth", "p.pth")
    assert (c.TRAIN.ACCUMULATION_STEPS, c.TRAIN.USE_CHECKPOINT, c.AMP_ENABLE, c.AMP_DTYPE) == (3, True, False, "bf16")
    assert (c.TRAIN.EMA.ENABLE, c.TRAIN.EMA.DECAY, c.SEED, c.EVAL_MODE, c.THROUGHPUT_MODE) == (False, 0.99, 7,
                                                                                              True, True)
    assert cfg_for(["--model_ema"]).TRAIN.EMA.ENABLE is True


@pytest.mark.parametrize("flag", ["--local_rank", "--local-rank"])
def test_launcher_local_rank_flag(flag: str):
    assert parse_args([f"{flag}=3"]).local_rank == 3


@pytest.mark.parametrize("name", ["tiny", "small", "base", "demo"])
def test_shipped_configs_load(name: str):
    c = cfg_for(["--cfg", str(REPO / "configs" / f"{name}.yaml")])
    assert c.MODEL.NAME


def test_unknown_yaml_key(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("TRAIN:\n  EPOHCS: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key TRAIN\.EPOHCS"):
        cfg_for(["--cfg", str(tmp_path / "bad.yaml")])


def test_unknown_key_in_base(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("MODEL:\n  DEFMAMBA:\n    EMBED: 3\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown config key MODEL\.DEFMAMBA\.EMBED"):
        cfg_for(["--cfg", str(tmp_path / "child.yaml")])


def test_unknown_opts_key_and_bad_pairs():
    with pytest.raises(ConfigError, match=r"unknown config key TRAIN\.LR"):
        cfg_for(["--opts", "TRAIN.LR", "0.1"])
    with pytest.raises(ConfigError, match="odd length"):
        cfg_for(["--opts", "TRAIN.EPOCHS"])


def test_type_mismatch_is_a_config_error(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("TRAIN:\n  EPOCHS: many\n")
    with pytest.raises(ConfigError, match="EPOCHS"):
        cfg_for(["--cfg", str(tmp_path / "bad.yaml")])


def test_missing_config_file_and_base_cycle(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        cfg_for(["--cfg", str(tmp_path / "nope.yaml")])
    (tmp_path / "a.yaml").write_text("BASE: ['b.yaml']\n")
    (tmp_path / "b.yaml").write_text("BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match="includes itself"):
        cfg_for(["--cfg", str(tmp_path / "a.yaml")])


@pytest.mark.parametrize("opts, message", [
    (["DATA.DATASET", "cifar"], "DATA.DATASET must be one of"),
    (["TRAIN.WARMUP_EPOCHS", "300"], "WARMUP_EPOCHS"),
    (["DATA.BATCH_SIZE", "7"], "even DATA.BATCH_SIZE"),
])
def test_invalid_values(opts, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg_for(["--opts", *opts])


def test_unknown_flag_is_one_line_exit_2(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--batch_size", "8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --batch_size" in err[0]
