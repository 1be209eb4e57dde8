"""utils.analyze: the ERF and activation-map measures against models whose answer is known by construction, the
throughput table, and the commands end to end on the demo config (PNGs open, JSON holds the printed numbers)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from config import get_default_config, load_yaml_config
from models import build_model
from utils.amp import AmpPolicy
from utils.analyze import activation, erf, throughput
from utils.analyze.__main__ import main
from utils.analyze.inputs import AnalysisError, LoadedModel, digit_images


def positive_conv_stack(layers, k, channels=3):
    convs = [nn.Conv2d(channels, channels, k, padding=k // 2, bias=False) for _ in range(layers)]
    for conv in convs:
        nn.init.uniform_(conv.weight, 0.1, 1.0)
    return nn.Sequential(*convs).double()


@pytest.mark.parametrize("layers,k", [(1, 3), (3, 3), (2, 5)])
def test_erf_of_a_conv_stack_is_its_analytic_extent(layers, k):
    stack = positive_conv_stack(layers, k)
    images = [torch.rand(3, 23, 23, dtype=torch.float64) + 0.1 for _ in range(3)]
    m = erf.contribution_map(stack, images)
    extent = layers * (k - 1) + 1
    lo, hi = 11 - extent // 2, 11 + extent // 2
    inside = torch.zeros_like(m, dtype=torch.bool)
    inside[lo:hi + 1, lo:hi + 1] = True
    assert (m[inside] > 0).all() and (m[~inside] == 0).all()


def test_erf_of_one_conv_is_its_summed_weights():
    stack = positive_conv_stack(1, 5)
    m = erf.contribution_map(stack, [torch.rand(3, 15, 15, dtype=torch.float64) + 0.1])
    # d(sum_o y_o(7, 7)) / d x_c(7 - 2 + a, 7 - 2 + b) = sum_o W[o, c, a, b] (cross-correlation)
    expected = torch.zeros(15, 15, dtype=torch.float64)
    expected[5:10, 5:10] = stack[0].weight.detach().sum(dim=(0, 1))
    torch.testing.assert_close(m, expected, rtol=1e-12, atol=0)


def test_erf_of_a_defmamba_stage_without_scans_is_its_patch_embedding():
    """With every DSSM of stage 1 replaced by identity, a stage-1 token sees only the stem's two 3x3/2 convs:
    the 7 x 7 pixels centred on 4 * (its position)."""
    config = get_default_config()
    load_yaml_config(config, Path("configs/demo.yaml"))
    torch.manual_seed(0)
    model = build_model(config).double().eval()
    for block in model.layers[0].blocks:
        block.op = nn.Identity()
    images = [torch.randn(3, 32, 32, dtype=torch.float64) for _ in range(4)]
    m = erf.contribution_map(erf.stage_features(model, 0), images)
    rows, cols = torch.nonzero(m, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 19, 13, 19)


@pytest.mark.parametrize("side,size", [(5, 21), (9, 21), (7, 8)])
def test_area_ratio_of_a_uniform_box(side, size):
    m = torch.zeros(size, size, dtype=torch.float64)
    lo = size // 2 - side // 2
    m[lo:lo + side, lo:lo + side] = 1.0
    for t in erf.THRESHOLDS:
        # smallest odd square around the centre with more than t of the box: k^2 > t * side^2
        k = next(k for k in range(1, side + 1, 2) if k * k > t * side * side)
        r = erf.area_ratio(m, t)
        assert r.side == k and r.ratio == pytest.approx(min(k, size) ** 2 / size ** 2)


def test_area_ratio_rejects_a_zero_map_and_bad_thresholds():
    with pytest.raises(AnalysisError, match="all zeros"):
        erf.area_ratio(torch.zeros(5, 5), 0.5)
    with pytest.raises(AnalysisError, match=r"\(0, 1\)"):
        erf.area_ratio(torch.ones(5, 5), 1.0)


class TokenMap(nn.Module):
    """A token mixer y_p = sum_q M[p, q] x_q on (B, H, W, C) or (B, C, H, W) tokens: a copy when M permutes."""

    def __init__(self, matrix, channels_last):
        super().__init__()
        self.matrix, self.channels_last = matrix, channels_last

    def forward(self, x):
        if not self.channels_last:
            x = x.permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        y = torch.einsum("pq,bqc->bpc", self.matrix.to(x.dtype), x.reshape(b, h * w, c)).reshape(b, h, w, c)
        return y if self.channels_last else y.permute(0, 3, 1, 2)


DEMOS = {"defmamba": "configs/demo.yaml", "damamba": "configs/demo_damamba.yaml", "vmamba": "configs/demo_vmamba.yaml",
         "mamba_adaptor": "configs/demo_mamba_adaptor.yaml"}


def tiny_model(family):
    config = get_default_config()
    load_yaml_config(config, Path(DEMOS[family]))
    torch.manual_seed(0)
    return build_model(config).double().eval()


def test_every_family_is_covered():
    from models import MODEL_TYPES

    assert set(DEMOS) == set(MODEL_TYPES)


@pytest.mark.parametrize("family", sorted(DEMOS))
def test_activation_maps_of_a_copying_mixer_point_at_the_copied_token(family):
    model = tiny_model(family)
    stage = model.stage_modules()[1]
    grid = 4   # stage 2 of a 32 px input: 4 x 4 tokens
    perm = torch.randperm(grid * grid, generator=torch.Generator().manual_seed(1))
    copy = torch.eye(grid * grid)[perm]   # y_p = x_perm[p]
    setattr(stage.blocks[-1], model.mixer_name, TokenMap(copy, model.output_fmt == "NHWC"))
    queries = [(0.1, 0.1), (0.5, 0.8), (0.99, 0.3)]
    maps, tokens = activation.activation_maps(model, torch.randn(3, 32, 32, dtype=torch.float64), 1, -1, queries)
    assert tokens == [(0, 0), (2, 3), (3, 1)]
    for m, (i, j) in zip(maps, tokens):
        expected = torch.zeros(grid * grid, dtype=torch.float64)
        expected[perm[i * grid + j]] = 1.0
        torch.testing.assert_close(m.flatten(), expected)


def test_activation_maps_of_a_linear_mixer_are_its_rows():
    model = tiny_model("defmamba")
    matrix = torch.randn(16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model.layers[1].blocks[0].op = TokenMap(matrix, True)
    maps, tokens = activation.activation_maps(model, torch.randn(3, 32, 32, dtype=torch.float64), 1, 0, [(0.6, 0.3)])
    q = tokens[0][0] * 4 + tokens[0][1]
    row = matrix[q].abs()
    others = row.clone()
    others[q] = 0
    torch.testing.assert_close(maps[0].flatten(), (row / others.max()).clamp(max=1))


def test_activation_maps_reject_missing_stages_blocks_and_queries():
    model = tiny_model("defmamba")
    image = torch.randn(3, 32, 32, dtype=torch.float64)
    with pytest.raises(AnalysisError, match="stages 1 to 4"):
        activation.activation_maps(model, image, 4, -1, [(0.5, 0.5)])
    with pytest.raises(AnalysisError, match="block 5 does not exist"):
        activation.activation_maps(model, image, 0, 5, [(0.5, 0.5)])
    with pytest.raises(AnalysisError, match="outside the image"):
        activation.activation_maps(model, image, 0, 0, [(1.5, 0.5)])


class TinyClassifier(nn.Module):
    in_chans, num_classes = 3, 5

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, stride=4), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_throughput_rows_and_table():
    # labelled as a model with official figures, to check they are looked up and printed beside ours
    loaded = LoadedModel("ours", TinyClassifier().eval(), None, 32, name="defmamba_tiny")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    rows = throughput.measure_rows([loaded], [2], AmpPolicy(False, torch.bfloat16, "cpu"), torch.device("cpu"),
                                   warmup=0, timed=1, progress=lambda line: None)
    assert len(rows) == 1 and all(rows[0][k] > 0 for k in ("train_img_s", "infer_amp_img_s", "infer_fp32_img_s"))
    assert rows[0]["train_mem_gib"] is None   # a CPU has no allocator statistics
    # training ran on a copy: the measured model keeps its weights
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    table = throughput.markdown_table(rows, "a test CPU")
    line = next(line for line in table.splitlines() if line.startswith("| ours"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:4] == ["ours", "2", "32", "fp32"]
    assert cells[4] == f"{rows[0]['train_img_s']:.1f}" and cells[7] == "-"
    assert cells[8:] == ["549 [1]", "1771 [1]", "10.7"]
    assert "[1] official release, 1x H100" in table


def test_throughput_command_writes_the_table(tmp_path, capsys):
    table, record = tmp_path / "t.md", tmp_path / "t.json"
    assert main(["throughput", "--model", "ours=configs/demo.yaml", "--batch-sizes", "1,2", "--no-train",
                 "--warmup", "0", "--steps", "1", "--amp-dtype", "bf16", "--out", str(table),
                 "--json", str(record)]) == 0
    rows = json.loads(record.read_text())["rows"]
    assert [(r["model"], r["batch"], r["amp"]) for r in rows] == [("ours", 1, "bf16"), ("ours", 2, "bf16")]
    assert "train_img_s" not in rows[0] and table.read_text() in capsys.readouterr().out


@pytest.fixture
def demo_checkpoint(tmp_path):
    config = get_default_config()
    load_yaml_config(config, Path("configs/demo.yaml"))
    torch.manual_seed(0)
    path = tmp_path / "demo.pth"
    torch.save({"model": build_model(config).state_dict()}, path)
    return path


def test_erf_command_end_to_end(demo_checkpoint, tmp_path, capsys):
    out = tmp_path / "erf.png"
    assert main(["erf", "--model", f"configs/demo.yaml@{demo_checkpoint}", "--model", "raster=configs/demo_raster.yaml",
                 "--stage", "2", "--images", "2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    record = json.loads(out.with_suffix(".json").read_text())
    assert [m["model"] for m in record["models"]] == ["defmamba_demo", "raster"]
    printed = capsys.readouterr().out
    for model in record["models"]:
        assert model["stage"] == 2 and model["images"] == 2 and len(model["scaled_erf"]) == 32
        assert max(map(max, model["scaled_erf"])) == pytest.approx(1.0)
        for r in model["area_ratios"]:
            assert f"area ratio at {r['threshold']:.0%}: {r['ratio']:.4f} (square side {r['side']} px)" in printed
        # the ratios are those of the map in the JSON
        scaled = torch.tensor(model["scaled_erf"], dtype=torch.float64)
        assert [erf.area_ratio(scaled, r["threshold"]).side for r in model["area_ratios"]] == \
            [r["side"] for r in model["area_ratios"]]


def test_activation_command_end_to_end(demo_checkpoint, tmp_path, capsys):
    out, record_path = tmp_path / "act.png", tmp_path / "numbers.json"
    assert main(["activation", "--model", f"ours=configs/demo.yaml@{demo_checkpoint}", "--model",
                 "configs/demo_damamba.yaml", "--query", "0.5,0.5", "--query", "0.2,0.9", "--img-size", "64",
                 "--out", str(out), "--json", str(record_path)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG"
    record = json.loads(record_path.read_text())
    assert record["queries"] == [[0.5, 0.5], [0.2, 0.9]]
    for model in record["models"]:
        assert model["stage"] == 2 and model["img_size"] == 64
        assert model["tokens"] == [[4, 4], [1, 7]]   # stage 2 of 64 px: 8 x 8 tokens
        assert len(model["maps"]) == 2 and all(max(map(max, m)) == pytest.approx(1.0) for m in model["maps"])
    assert "ours: stage 2 block 1 of 1" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["erf", "--model", "configs/demo.yaml", "--stage", "7", "--images", "1"], "--stage 7 does not exist"),
    (["erf", "--model", "no_such_model", "--images", "1"], "neither a config YAML nor a registered timm model"),
    (["erf", "--model", "configs/demo.yaml@/nonexistent.pth", "--images", "1"], "nonexistent.pth"),
    (["erf", "--model", "configs/demo.yaml", "--images", "0"], "--images must be at least 1"),
    (["activation", "--model", "configs/demo.yaml", "--block", "9"], "block 9 does not exist"),
])
def test_commands_fail_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_missing_output_folder_is_refused_before_any_work(tmp_path, capsys):
    assert main(["erf", "--model", "configs/demo.yaml", "--out", str(tmp_path / "no" / "erf.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_digit_images_take_the_validation_digits_of_each_class_in_turn():
    from utils.visualize import mnist_image

    images = digit_images(13)
    # image n is validation digit n // 10 of class n % 10: CSV row 500 * class + 400 + n // 10
    for n in (0, 2, 9, 12):
        assert np.array_equal(np.asarray(images[n]), np.asarray(mnist_image(500 * (n % 10) + 400 + n // 10)))
