"""CPU tests of the benchmark scripts and the GPU suite: argument handling, the no-CUDA exits, a smoke run.

The smoke runs only check that the scripts run end to end on the CPU at toy sizes and that the suite's
report turns their JSON into tables; their timings mean nothing and are never asserted.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scan_bench = load("selective_scan")
throughput = load("model_throughput")
report = load("gpu_suite_report")


def no_cuda_env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def test_gpu_suite_without_cuda_exits_with_one_line(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(out)], capture_output=True, text=True,
                          env=no_cuda_env(), timeout=120)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], proc.stderr
    assert not out.exists(), "nothing may be written when the suite cannot run"


def test_gpu_suite_usage_error():
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh")], capture_output=True, text=True,
                          env=no_cuda_env(), timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["gpu_suite: usage: bash benchmarks/gpu_suite.sh OUTDIR"]


@pytest.mark.parametrize("argv,message", [
    (["--backend", "cuda,nope"], "--backend: unknown backend nope"),
    (["--backend", "auto"], "--backend: unknown backend auto"),
    (["--model", "X"], "--model: unknown X"),
    (["--dtype", "fp8"], "--dtype: unknown fp8"),
    (["--stages", "0"], "--stages: unknown 0"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--repeats", "0"], "--repeats >= 1"),
])
def test_scan_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        scan_bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_scan_benchmark_arguments():
    args = scan_bench.parse_args(["--backend", "all", "--model", "T,S", "--dtype", "all", "--stages", "1,4", "--quick"])
    assert [b.value for b in args.backends] == ["cuda", "triton", "torch"]
    assert args.models == ["T", "S"] and args.dtypes == ["fp16", "bf16", "fp32"] and args.stage_list == [1, 4]
    assert (args.warmup, args.repeats) == (2, 5)


@pytest.mark.parametrize("argv,message", [
    (["--scan-backend", "cuda,gpu"], "--scan-backend: unknown backend gpu"),
    (["--deform-backend", "cuda"], "--deform-backend: unknown backend cuda"),
    (["--configs", "auto"], "--configs: 'auto' is not SCAN:DEFORM"),
    (["--configs", "auto:auto,cuda:cuda"], "--configs: unknown backend cuda"),
    (["--model", "huge"], "--model: unknown huge"),
    (["--steps", "0"], "--steps >= 1"),
])
def test_throughput_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_throughput_backend_pairs():
    args = throughput.parse_args(["--scan-backend", "cuda,triton", "--deform-backend", "all"])
    assert [(s.value, d.value) for s, d in args.pairs] == [
        ("cuda", "auto"), ("cuda", "triton"), ("cuda", "torch"),
        ("triton", "auto"), ("triton", "triton"), ("triton", "torch")]
    args = throughput.parse_args(["--configs", "auto:auto,cuda:torch"])
    assert [(s.value, d.value) for s, d in args.pairs] == [("auto", "auto"), ("cuda", "torch")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
@pytest.mark.parametrize("module", [scan_bench, throughput], ids=["selective_scan", "model_throughput"])
def test_benchmarks_without_cuda_exit_with_one_line(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main([])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


@pytest.fixture(scope="module")
def smoke_outputs(tmp_path_factory) -> Path:
    """Toy CPU runs of both benchmarks, their JSON in a suite-like output folder."""
    out = tmp_path_factory.mktemp("suite")
    assert scan_bench.main(["--device", "cpu", "--backend", "torch", "--model", "T", "--dtype", "fp32",
                            "--stages", "4", "--batch", "1", "--warmup", "0", "--repeats", "1",
                            "--json", str(out / "scan.json")]) == 0
    assert throughput.main(["--device", "cpu", "--model", "tiny", "--batch-size", "1", "--img-size", "32",
                            "--amp-dtype", "bf16", "--warmup", "0", "--steps", "1", "--profile", "3",
                            "--json", str(out / "throughput.json")]) == 0
    return out


def test_benchmark_smoke_json(smoke_outputs: Path):
    scan = json.loads((smoke_outputs / "scan.json").read_text())
    assert scan["environment"]["device_type"] == "cpu"
    (row,) = scan["results"]
    assert (row["model"], row["dtype"], row["stage"], row["D"], row["L"]) == ("T", "fp32", 4, 3 * 384, 49)
    assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    tp = json.loads((smoke_outputs / "throughput.json").read_text())
    (row,) = tp["results"]
    assert row["status"] == "measured" and not tp["comparable_to_official"]
    assert row["train_img_s"] > 0 and row["infer_amp_img_s"] > 0 and row["infer_fp32_img_s"] > 0
    assert row["profile"]["top"], "the profile lists no events"
    assert tp["official"]["tiny"]["train_img_s"] == 549 and tp["targets"]["small"]["train_img_s"] == 1050


def test_suite_report_merges_outputs(smoke_outputs: Path):
    (smoke_outputs / "suite.log").write_text("gpu_suite: start\nSTEP\tbuild\t0\t42\tok\n"
                                             "STEP\tpytest\t1\t30\tfailed\n")
    (smoke_outputs / "pytest.log").write_text("...\n1 failed, 1 passed, 1 skipped in 3.00s\n")
    (smoke_outputs / "pytest.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu"><skipped message="no triton backend"/></testcase>'
        '</testsuite></testsuites>')
    assert report.main([str(smoke_outputs)]) == 0
    md = (smoke_outputs / "results.md").read_text()
    assert "| build | 0 | 42 | ok |" in md and "| pytest | 1 | 30 | failed |" in md
    assert "Tests: 1 failed, 1 passed, 1 skipped in 3.00s" in md
    assert "FAILED `tests.test_a::test_bad`: assert 1 == 2" in md and "no triton backend" in md
    assert "| T | fp32 | 4 | 1152 | 49 |" in md
    assert "| tiny | auto | auto |" in md and "settings differ from the official measurement" in md
    results = json.loads((smoke_outputs / "results.json").read_text())
    assert results["pytest"]["passed"] == 1 and len(results["pytest"]["failed"]) == 1
    assert results["selective_scan"]["results"] and results["model_throughput"]["results"]
    assert sorted(p.name for p in smoke_outputs.iterdir()) == ["pytest.log", "results.json", "results.md",
                                                             "suite.log"]


data_bench = load("data_pipeline")


def test_data_pipeline_benchmark_runs_at_toy_size(tmp_path: Path, capsys):
    out = tmp_path / "data.json"
    threads = torch.get_num_threads()
    assert data_bench.main(["--folder", str(tmp_path / "jpegs"), "--images", "4", "--size", "64x48",
                            "--workers", "1", "--batch", "2", "--passes", "2", "--target", "100,50",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["rates"]) == {"decode", "train", "val"}
    assert all(r["img_s"] > 0 and r["img_s_per_cpu_s"] > 0 for r in result["rates"].values())
    # cores per GPU is the target over the measured train rate per core
    assert result["cores_per_gpu"]["100"] == pytest.approx(100 / result["img_s_per_core"]["train"])
    assert result["cores_per_gpu"]["100"] == pytest.approx(2 * result["cores_per_gpu"]["50"])
    jpegs = sorted((tmp_path / "jpegs").rglob("*.jpg"))
    assert len(jpegs) == 4 and len({p.parent.name for p in jpegs}) == 4
    from PIL import Image
    with Image.open(jpegs[0]) as image:
        assert (image.format, image.size) == ("JPEG", (64, 48))
    assert "loader cores per GPU" in capsys.readouterr().out
    assert torch.get_num_threads() == threads   # the rest of the process keeps its threads


def test_data_pipeline_benchmark_times_the_dali_loader(tmp_path: Path):
    out = tmp_path / "dali.json"
    assert data_bench.main(["--folder", str(tmp_path / "jpegs"), "--images", "8", "--size", "64x48",
                            "--workers", "1", "--batch", "2", "--passes", "2", "--loader", "dali",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["loader"] == "dali" and set(result["rates"]) == {"train", "val"}
    assert all(r["img_s"] > 0 and r["img_s_per_cpu_s"] > 0 for r in result["rates"].values())


@pytest.mark.parametrize("argv,message", [(["--size", "500"], "--size: expected WIDTHxHEIGHT"),
                                          (["--passes", "1"], "--passes must be >= 2"),
                                          (["--workers", "0"], "must be > 0")])
def test_data_pipeline_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        data_bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


memory_bench = load("activation_memory")


def test_activation_memory_counts_each_saved_storage_once_by_module():
    """Linear saves its input, ReLU its output, which the second Linear saves again (counted once, under
    ReLU); the weights are parameters, not activations."""
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    for batch in (4, 8):
        got = memory_bench.saved_bytes(net, torch.randn(batch, 5))
        assert got == {"Linear": batch * 5 * 4, "ReLU": batch * 7 * 4}
    per_image, fixed = memory_bench.split_by_batch({"A": 30, "B": 8, "C": 2}, {"A": 50, "B": 8, "C": 4}, 2)
    assert per_image == {"A": 10, "B": 0, "C": 1} and fixed == {"A": 10, "B": 8, "C": 0}


def test_activation_memory_benchmark_runs_at_toy_size(tmp_path: Path, capsys):
    out = tmp_path / "memory.json"
    assert memory_bench.main(["--model", "defmamba_tiny", "--img-size", "32", "--batch-size", "1", "--backend",
                              "torch", "--amp-dtype", "bf16", "--top", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["saved_bytes_per_image"]["DSSM"] > 0 and result["training_state_bytes"] > 0
    printed = capsys.readouterr().out
    assert "| DSSM |" in printed and "| (others) |" in printed and "at batch 128" in printed


@pytest.mark.parametrize("argv,message", [(["--backend", "cuda"], "--backend: expected one of"),
                                          (["--img-size", "16"], "need --img-size >= 32")])
def test_activation_memory_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        memory_bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
