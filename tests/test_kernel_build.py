"""CPU check of kernels/selective_scan/setup.py: without nvcc it must stop with one clear line.

Runs setup.py in a subprocess with CUDA_HOME pointing nowhere and a PATH without nvcc; nothing
is compiled (the check happens before torch.utils.cpp_extension is even imported).
"""
import os
import subprocess
import sys
import tempfile

SETUP_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "selective_scan")


def _run_setup(env_updates, tmp):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(env_updates)
    cmd = [sys.executable, "setup.py", "build_ext", "--build-temp", os.path.join(tmp, "t"),
           "--build-lib", os.path.join(tmp, "l")]
    return subprocess.run(cmd, cwd=SETUP_DIR, env=env, capture_output=True, text=True, timeout=120)


def _assert_one_line_error(proc, must_contain):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, out
    assert must_contain in errors[0], out
    assert "Triton scan" in errors[0] and "pure-PyTorch reference scan" in errors[0], out


def test_setup_without_nvcc_fails_with_one_line():
    with tempfile.TemporaryDirectory() as tmp:
        empty_bin = os.path.join(tmp, "bin")
        os.makedirs(empty_bin)
        proc = _run_setup({"CUDA_HOME": os.path.join(tmp, "no-such-cuda"), "PATH": empty_bin}, tmp)
        _assert_one_line_error(proc, "nvcc not found")
        assert not os.listdir(tmp) or sorted(os.listdir(tmp)) == ["bin"], "setup.py created build output"


def test_setup_with_cuda_home_without_nvcc_fails_with_one_line():
    with tempfile.TemporaryDirectory() as tmp:
        fake = os.path.join(tmp, "cuda")
        os.makedirs(os.path.join(fake, "bin"))
        proc = _run_setup({"CUDA_HOME": fake, "PATH": os.path.join(fake, "bin")}, tmp)
        _assert_one_line_error(proc, "nvcc not found")


def test_setup_with_cpu_only_torch_fails_with_one_line():
    """A (fake) CPU-only torch: nvcc exists but torch.version.cuda is None."""
    with tempfile.TemporaryDirectory() as tmp:
        fake = os.path.join(tmp, "cuda")
        os.makedirs(os.path.join(fake, "bin"))
        nvcc = os.path.join(fake, "bin", "nvcc")
        with open(nvcc, "w") as f:
            f.write("#!/bin/sh\nexit 1\n")
        os.chmod(nvcc, 0o755)
        pkg = os.path.join(tmp, "py", "torch")
        os.makedirs(pkg)
        with open(os.path.join(pkg, "__init__.py"), "w") as f:
            f.write("__version__ = '0.0+cpu'\n\nclass version:\n    cuda = None\n")
        proc = _run_setup({"CUDA_HOME": fake, "PYTHONPATH": os.path.join(tmp, "py")}, tmp)
        _assert_one_line_error(proc, "CPU-only")
