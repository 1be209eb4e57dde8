"""Build the `defmamba_scan_cuda` extension (selective-scan forward/backward CUDA kernels).

    cd kernels/selective_scan && pip install --no-build-isolation .

Environment: CUDA_HOME (default: /usr/local/cuda when it exists, else the directory of `nvcc` on
PATH), TORCH_CUDA_ARCH_LIST (default "8.0;8.6;9.0"), MAX_JOBS (parallel compile jobs).
When nvcc or a CUDA build of PyTorch is missing the build stops with a one-line error; the model
keeps working through the other scan backends of models/ops/scan/__init__.py (Triton on a GPU, the
pure-PyTorch reference scan on the CPU).
"""
import glob
import os
import shutil
import site
import sys

from setuptools import setup

NAME = "defmamba_scan_cuda"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;9.0"
FALLBACK = ("the model still works without it: on a GPU through the Triton scan, elsewhere through the "
            "pure-PyTorch reference scan (models/ops/scan/__init__.py)")


def _fail(reason: str) -> None:
    """One line on stderr, no traceback, non-zero exit."""
    sys.stderr.write(f"error: cannot build {NAME}: {reason}; {FALLBACK}.\n")
    sys.stderr.flush()
    raise SystemExit(1)


def _find_cuda_home() -> str:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if not os.path.isfile(os.path.join(value, "bin", "nvcc")):
                _fail(f"nvcc not found: {var}={value} has no bin/nvcc (install the CUDA toolkit or fix {var})")
            return value
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        _fail("nvcc not found (CUDA_HOME is unset, /usr/local/cuda/bin/nvcc does not exist and nvcc is not on PATH)")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvidia_include_dirs(torch_mod) -> list:
    """Include dirs of the NVIDIA pip wheels next to torch (site-packages/nvidia/*/include)."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(torch_mod.__file__)))]
    try:
        roots += site.getsitepackages()
    except AttributeError:  # some virtualenv flavours
        pass
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        roots.append(user)
    found = []
    for root in roots:
        for pattern in ("nvidia/*/include", "nvidia/*/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


cuda_home = _find_cuda_home()
os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import time

try:
    import torch
except ImportError:
    _fail("PyTorch is not installed in this Python environment")
if torch.version.cuda is None:
    _fail(f"this PyTorch ({torch.__version__}) is a CPU-only build, a CUDA build of PyTorch is required")

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
if not os.environ["TORCH_CUDA_ARCH_LIST"].strip():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

# The NVIDIA wheel headers only fill gaps of the local toolkit: -isystem dirs come after every -I.
extra_inc = []
for path in _nvidia_include_dirs(torch):
    extra_inc += ["-isystem", path]

csrc = os.path.join("csrc")
ext = CUDAExtension(
    name=NAME,
    sources=[os.path.join(csrc, f) for f in ("bindings.cpp", "scan_api.cpp", "scan_fwd.cu", "scan_bwd.cu")],
    include_dirs=[os.path.join(HERE, "csrc")],
    extra_compile_args={
        "cxx": ["-O3", "-std=c++20"] + extra_inc,
        "nvcc": ["-O3", "-std=c++20", "-lineinfo"] + extra_inc,
    },
)

setup(
    name="defmamba-scan-cuda",
    version="0.1.0",
    description="Selective-scan (S6) CUDA kernels for DefMamba",
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
