"""The scan backend switch (auto | cuda | triton | torch), the custom op, and a DefMamba on the Triton scan."""
import logging
import sys

import pytest
import torch

import models.ops.backends as backends
from models.ops.backends import Backend, BackendUnavailable, use_backend
from models.defmamba import DefMamba
from models.ops.scan import resolve_scan_backend, selective_scan_fn
from models.ops.scan.cuda import cuda_extension_available
from scan_reference import TRITON_DEVICE, make_inputs, naive_scan

needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton kernels cannot run here")


@pytest.fixture(autouse=True)
def no_scan_backend_env(monkeypatch):
    monkeypatch.delenv("DEFMAMBA_SCAN_BACKEND", raising=False)


def _inputs(device="cpu", length=9):
    return [t.float().to(device) for t in make_inputs(2, 3, 2, 4, length, True, True, 0)]


def _one_line_error(backend, device_type, match):
    with use_backend("scan", backend), pytest.raises(BackendUnavailable, match=match) as info:
        resolve_scan_backend(device_type)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"DEFMAMBA_SCAN_BACKEND={backend}: the selective scan cannot run")
    return message


def test_auto_on_cpu_uses_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is for tests, never chosen by auto
    assert resolve_scan_backend("cpu") is Backend.TORCH


@pytest.mark.parametrize("value", ["torch", "TORCH"])
def test_environment_variable_is_honoured(monkeypatch, value):
    monkeypatch.setenv("DEFMAMBA_SCAN_BACKEND", value)
    assert resolve_scan_backend("cpu") is Backend.TORCH


def test_bad_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DEFMAMBA_SCAN_BACKEND", "fast")
    with pytest.raises(ValueError, match="DEFMAMBA_SCAN_BACKEND='fast' is not a backend"):
        selective_scan_fn(*_inputs())


def test_forced_cuda_names_what_is_missing():
    if cuda_extension_available():
        _one_line_error("cuda", "cpu", "needs CUDA tensors, got cpu")
    else:
        _one_line_error("cuda", "cuda", "defmamba_scan_cuda extension is not installed")
        with use_backend("scan", "cuda"), pytest.raises(BackendUnavailable):
            selective_scan_fn(*_inputs())  # no silent fallback to another backend


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _one_line_error("triton", "cpu", "set TRITON_INTERPRET=1 before triton is imported")


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="needs Triton's interpreter")
def test_forced_triton_with_kernels_compiled_before_the_interpreter(monkeypatch):
    # kernels decorated while TRITON_INTERPRET was unset are GPU kernels, whatever the variable says now
    import kernels.triton
    import kernels.triton.selective_scan  # noqa: F401  the interpreted kernels, so teardown restores them
    name = "kernels.triton.selective_scan"
    # both restored on teardown: `import a.b.c as x` reads the package attribute, not sys.modules
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(kernels.triton, "selective_scan", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET")
    try:
        import kernels.triton.selective_scan  # noqa: F401
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        _one_line_error("triton", "cpu", "set after the kernels of kernels.triton.selective_scan were compiled")
    finally:
        sys.modules.pop(name, None)  # never leave the GPU-kind kernels behind


@needs_triton
def test_forced_triton_runs_the_triton_kernels(monkeypatch):
    import models.ops.scan.triton as host
    calls = []
    for name in ("scan_forward", "scan_backward"):
        real = getattr(host, name)
        monkeypatch.setattr(host, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setenv("DEFMAMBA_SCAN_BACKEND", "triton")
    leaves = [t.requires_grad_(True) for t in _inputs(TRITON_DEVICE)]
    y = selective_scan_fn(*leaves)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert calls == ["scan_forward", "scan_backward"]
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    y_ref = naive_scan(*ref_leaves, True)
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.sum(), ref_leaves)):
        torch.testing.assert_close(g.cpu().double(), g_ref, rtol=1e-4, atol=1e-4)


def test_the_choice_is_logged_once(monkeypatch):
    monkeypatch.setattr(backends, "_announced", set())
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("defmamba.ops")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(3):
            selective_scan_fn(*_inputs())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    assert [r.getMessage() for r in records] == ["selective scan on cpu tensors: backend torch (requested auto)"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_custom_op_registration(backend):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom op."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    u, delta, A, B, C, D, bias = [t.requires_grad_(True) for t in _inputs(device, length=5)]
    op = torch.ops.defmamba.selective_scan.default
    torch.library.opcheck(op, ([u], delta, A, B, C, D, bias, True, [], backend))
    torch.library.opcheck(op, ([u], delta, A, B, C, None, None, False, [], backend))
    torch.library.opcheck(op, ([u], delta, A, B, C, D, bias, True, [1], backend))  # one group backward in time
    # u in pieces of whole groups, one of them given twice (the DSSM's raster sequence)
    shared, last = u.detach()[:, :2].clone().requires_grad_(True), u.detach()[:, 4:].clone().requires_grad_(True)
    torch.library.opcheck(op, ([shared, shared, last], delta, A, B, C, D, bias, True, [1], backend))


@needs_triton
def test_tiny_defmamba_on_the_triton_scan_equals_the_torch_scan():
    """The scan and the branch merge after it both on Triton, against both on the torch references."""
    torch.manual_seed(0)
    model = DefMamba(num_classes=5, embed_dim=8, depths=(1, 1, 1, 1), offset_kernels=(3, 3, 3, 3),
                     drop_path_rate=0.0).to(TRITON_DEVICE)
    x = torch.randn(2, 3, 32, 32, device=TRITON_DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend("scan", backend), use_backend("merge", backend):
            logits = model(x)
            logits.square().sum().backward()
        results[backend] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (logits_t, grads_t), (logits_tr, grads_tr) = results["torch"], results["triton"]
    torch.testing.assert_close(logits_tr, logits_t, rtol=1e-4, atol=1e-5)
    assert grads_t.keys() == grads_tr.keys()
    for name, grad in grads_t.items():
        scale = grad.abs().max().item() or 1.0
        torch.testing.assert_close(grads_tr[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
