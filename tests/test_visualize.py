"""python -m utils.visualize: the PNG and the summary numbers, checked against the model's offsets directly."""
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import get_default_config, load_yaml_config
from data.mnist5k import csv_path
from models import build_model
from utils.visualize import DEFAULT_MNIST_ROW, kendall_tau, main

LINE = re.compile(r"stage (\d) block (\d+) \((\d+)x(\d+)\): mean \|point offset\| ([\d.]+) px \(([\d.]+) token px\), "
                  r"order changed ([\d.]+), kendall tau (-?[\d.]+)")


def tau_by_pairs(order):
    """Kendall's tau from the definition: (concordant - discordant) / pairs, every pair visited."""
    n = len(order)
    s = sum((1 if order[j] > order[i] else -1) for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def test_kendall_tau():
    assert kendall_tau(torch.arange(10)) == 1.0
    assert kendall_tau(torch.arange(9, -1, -1)) == -1.0
    perm = torch.randperm(700, generator=torch.Generator().manual_seed(0))
    assert kendall_tau(perm) == pytest.approx(tau_by_pairs(perm.tolist()), abs=1e-12)


def demo_model():
    config = get_default_config()
    load_yaml_config(config, Path("configs/demo.yaml"))
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # larger offset-network outputs than at initialisation, so the order changes
        for stage in model.layers:
            stage.blocks[-1].op.DS.conv_offset.conv2.weight.mul_(20)
    return model.eval()


def independent_numbers(model, image_size=32):
    """Per stage: mean |offset| in image px and token px, fraction of changed steps, tau, from conv_offset."""
    with gzip.open(csv_path(), "rt") as f:
        row = f.read().splitlines()[DEFAULT_MNIST_ROW]
    digit = np.pad(np.array(row.split(",")[:784], dtype=np.float32).reshape(28, 28), 2) / 255
    x = torch.from_numpy(digit)[None].expand(3, 32, 32)   # 32 px already: the val transform only normalises
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((x - mean[:, None, None]) / std[:, None, None])[None]
    seen = {}
    hooks = [stage.blocks[-1].op.DS.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, stage in enumerate(model.layers)]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        out = []
        for i, stage in enumerate(model.layers):
            u = seen[i]
            h, w = u.shape[2:]
            raw = stage.blocks[-1].op.DS.conv_offset(u)[0].double()
            # tanh(raw) / (size - 1) in [-1, 1] units is tanh(raw) / 2 token pixels (align corners)
            dy, dx = torch.tanh(raw[0]) / 2, torch.tanh(raw[1]) / 2
            tokens = torch.sqrt(dy ** 2 + dx ** 2).mean().item()
            pixels = torch.sqrt((dy * image_size / h) ** 2 + (dx * image_size / w) ** 2).mean().item()
            n = h * w
            path = (np.arange(n, dtype=np.float32) + np.float32(0.5)) / np.float32(max(n - 1, 1)) * 2 - 1
            path = path + np.tanh(raw[2].float().numpy().ravel())
            order = np.argsort(path, kind="stable").tolist()
            changed = sum(o != k for k, o in enumerate(order)) / n
            out.append((h, w, pixels, tokens, changed, tau_by_pairs(order) if n > 1 else 1.0))
    return out


def test_visualize_writes_the_figure_and_true_summary(tmp_path, capsys):
    model = demo_model()
    ckpt, png = tmp_path / "demo.pth", tmp_path / "scan.png"
    torch.save({"model": model.state_dict()}, ckpt)
    assert main(["--cfg", "configs/demo.yaml", "--resume", str(ckpt), "--panel", "64", "--out", str(png)]) == 0
    lines = [LINE.match(line) for line in capsys.readouterr().out.splitlines()]
    printed = [m.groups() for m in lines if m]
    assert len(printed) == 4

    image = Image.open(png)
    assert image.size == (4 * 64, 2 * 64) and image.mode == "RGB"
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 10                 # drawn on, not a blank canvas

    expected = independent_numbers(model)
    assert any(e[4] > 0 for e in expected), "test model should change the scan order somewhere"
    for got, (h, w, pixels, tokens, changed, tau) in zip(printed, expected):
        assert (int(got[2]), int(got[3])) == (h, w)
        assert [float(v) for v in got[4:]] == pytest.approx([pixels, tokens, changed, tau], abs=1.5e-4)


def test_visualize_takes_an_image_file_and_rejects_models_without_deformable_branch(tmp_path, capsys):
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "out.png"
    assert main(["--cfg", "configs/demo.yaml", "--image", str(picture), "--panel", "32", "--out", str(out)]) == 0
    assert Image.open(out).size == (128, 64)
    no_db = tmp_path / "no_db.yaml"
    no_db.write_text(f"BASE: [{Path('configs/demo.yaml').resolve()}]\nMODEL:\n  DEFMAMBA:\n    THIRD_BRANCH: none\n")
    assert main(["--cfg", str(no_db), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no deformable branch" in err
    assert not (tmp_path / "x.png").exists()
