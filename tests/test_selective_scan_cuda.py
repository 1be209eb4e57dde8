"""GPU tests of the `defmamba_scan_cuda` extension against an independent float64 reference.

The reference below is a naive per-step loop differentiated by torch autograd in float64; it
shares no code with the extension or with models/ops/scan/__init__.py. Skipped (module level)
when CUDA or the compiled extension is unavailable.
"""
import itertools
import os
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available; the selective-scan extension tests need a GPU",
                allow_module_level=True)
try:
    import defmamba_scan_cuda as ext  # noqa: E402
except ImportError as err:  # pragma: no cover - depends on the build
    pytest.skip(f"defmamba_scan_cuda is not built ({err}); build it with "
                "`pip install --no-build-isolation kernels/selective_scan`", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEV = torch.device("cuda")
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")


def reference(u, delta, A, B, C, D, bias, softplus):
    """y[b,d,t] by the literal recurrence, float64, differentiable by autograd."""
    bsz, dim, length = u.shape
    groups = B.shape[1]
    Bx = B.repeat_interleave(dim // groups, dim=1)  # (b, dim, N, L)
    Cx = C.repeat_interleave(dim // groups, dim=1)
    pre = delta if bias is None else delta + bias[:, None]
    dt = F.softplus(pre) if softplus else pre
    h = torch.zeros(bsz, dim, A.shape[1], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * Bx[:, :, :, t]
        ys.append((h * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D[:, None] * u
    return y


def poison():
    """Leave NaN-filled blocks in the caching allocator so unwritten outputs show up as NaN."""
    bufs = [torch.full((n,), float("nan"), device=DEV) for n in (1 << 26, 1 << 24, 1 << 22)]
    bufs += [torch.full((n,), float("nan"), device=DEV) for n in (1 << 18,) * 16 + (1 << 12,) * 64]
    del bufs


def make_inputs(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    u = rnd(bsz, dim, length)
    if softplus:
        delta = rnd(bsz, dim, length) - 1.5
        delta.view(-1)[:: 97] = 25.0  # exercise the softplus threshold
    else:
        delta = torch.rand(bsz, dim, length, generator=g, dtype=torch.float64) * 0.2 + 0.01
    A = -torch.exp(rnd(dim, nstate) * 0.5) * torch.arange(1, nstate + 1, dtype=torch.float64) ** 0.5
    B = rnd(bsz, groups, nstate, length)
    C = rnd(bsz, groups, nstate, length)
    D = rnd(dim) if has_D else None
    bias = (torch.rand(dim, generator=g, dtype=torch.float64) * 0.1 if has_bias else None)
    dout = rnd(bsz, dim, length)
    # low-precision inputs: the reference sees exactly the rounded values
    u, delta, B, C = (x.to(dtype).to(DEV) for x in (u, delta, B, C))
    A = A.float().to(DEV)
    D = None if D is None else D.float().to(DEV)
    bias = None if bias is None else bias.float().to(DEV)
    return u, delta, A, B, C, D, bias, dout.float().to(DEV)


def reference_grads(u, delta, A, B, C, D, bias, dout, softplus):
    leaves = [x.detach().double().requires_grad_(True) if x is not None else None
              for x in (u, delta, A, B, C, D, bias)]
    y = reference(*leaves, softplus)
    params = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(y, params, dout.double())
    it = iter(grads)
    full = [next(it) if x is not None else None for x in leaves]
    return y.detach(), full


def check(name, got, ref, tol):
    assert got is not None, f"{name}: missing"
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got = got.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got - ref).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol:g} * max|ref| {scale:.3e}"


def run_case(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus, seed=0):
    u, delta, A, B, C, D, bias, dout = make_inputs(bsz, dim, length, nstate, groups, dtype, has_D, has_bias,
                                                   softplus, seed)
    y_ref, g_ref = reference_grads(u, delta, A, B, C, D, bias, dout, softplus)
    tol = TOL[dtype]

    poison()
    out, states = ext.fwd(u, delta, A, B, C, D, bias, softplus, True)
    assert out.dtype == torch.float32
    check("out", out, y_ref, TOL[torch.float32] if dtype == torch.float32 else 2e-3)

    poison()
    grads = ext.bwd(u, delta, A, B, C, D, bias, dout, states, softplus)
    assert len(grads) == 7
    expected_dtypes = (dtype, dtype, torch.float32, dtype, dtype, torch.float32, torch.float32)
    for name, got, ref, edt in zip(GRAD_NAMES, grads, g_ref, expected_dtypes):
        if ref is None:
            assert got is None or got.numel() == 0, f"{name}: expected no gradient"
            continue
        assert got.dtype == edt, f"{name}: dtype {got.dtype} != {edt}"
        # fp32 gradients (dA, dD, ddelta_bias) are sums of many terms; keep the dtype tolerance
        check(name, got, ref, tol)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLAGS = list(itertools.product((False, True), repeat=3))  # (has_D, has_bias, softplus)

# short sequences: full dtype x L x N x G grid, the D / bias / softplus flags cycled through
SMALL = []
for i, (dtype, length, nstate, groups) in enumerate(itertools.product(DTYPES, (1, 7, 64, 196), (1, 16), (1, 3))):
    has_D, has_bias, softplus = FLAGS[i % len(FLAGS)]
    SMALL.append((2, 6 * groups, length, nstate, groups, dtype, has_D, has_bias, softplus))


@pytest.mark.parametrize("bsz,dim,length,nstate,groups,dtype,has_D,has_bias,softplus", SMALL)
def test_small(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus):
    run_case(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus)


LONG = [
    (1, 6, 784, 16, 3, torch.float32, True, True, True),
    (1, 6, 784, 1, 1, torch.bfloat16, False, False, False),
    (1, 6, 3136, 16, 3, torch.float32, True, True, True),
    (1, 6, 3136, 16, 3, torch.bfloat16, True, False, True),
    (1, 3, 4097, 16, 3, torch.float32, False, True, True),
    (1, 3, 4097, 16, 1, torch.float16, True, True, False),
]


@pytest.mark.parametrize("bsz,dim,length,nstate,groups,dtype,has_D,has_bias,softplus", LONG)
def test_long(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus):
    run_case(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus)


# layouts: several channel tiles per group (fp32 partial sums of dB/dC), group sizes that leave
# idle lanes, odd channel counts, the N > 16 instantiation, larger batches
SHAPES = [
    (3, 3 * 130, 100, 16, 3, torch.float32, True, True, True),
    (2, 3 * 130, 70, 16, 3, torch.bfloat16, True, True, True),
    (2, 5, 65, 16, 1, torch.float32, True, False, True),
    (2, 7, 129, 16, 7, torch.float32, False, True, True),
    (2, 3 * 48, 49, 16, 3, torch.float32, True, True, True),
    (2, 40, 130, 33, 2, torch.float32, True, True, True),
    (2, 36, 64, 64, 3, torch.bfloat16, True, True, True),
    (4, 2 * 200, 33, 5, 2, torch.float16, True, True, True),
]


@pytest.mark.parametrize("bsz,dim,length,nstate,groups,dtype,has_D,has_bias,softplus", SHAPES)
def test_layouts(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus):
    run_case(bsz, dim, length, nstate, groups, dtype, has_D, has_bias, softplus)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_in_input_dtype_and_dout_dtype(dtype):
    u, delta, A, B, C, D, bias, dout = make_inputs(2, 6, 150, 16, 3, dtype, True, True, True, seed=3)
    out32, states = ext.fwd(u, delta, A, B, C, D, bias, True, True)
    poison()
    out, states2 = ext.fwd(u, delta, A, B, C, D, bias, True, False)
    assert out.dtype == dtype
    check("out(input dtype)", out, out32.double(), TOL[dtype] if dtype != torch.float32 else 1e-6)
    g32 = ext.bwd(u, delta, A, B, C, D, bias, dout, states, True)
    g_low = ext.bwd(u, delta, A, B, C, D, bias, dout.to(dtype), states2, True)
    y_ref, g_ref = reference_grads(u, delta, A, B, C, D, bias, dout.to(dtype).float(), True)
    for name, got, ref in zip(GRAD_NAMES, g_low, g_ref):
        check(name + "(dout in input dtype)", got, ref, TOL[dtype])
    assert all(a.shape == b.shape for a, b in zip(g32, g_low))


def test_deterministic():
    u, delta, A, B, C, D, bias, dout = make_inputs(2, 3 * 130, 300, 16, 3, torch.float32, True, True, True, seed=5)
    out1, st1 = ext.fwd(u, delta, A, B, C, D, bias, True, True)
    out2, st2 = ext.fwd(u, delta, A, B, C, D, bias, True, True)
    assert torch.equal(out1, out2) and torch.equal(st1, st2)
    g1 = ext.bwd(u, delta, A, B, C, D, bias, dout, st1, True)
    g2 = ext.bwd(u, delta, A, B, C, D, bias, dout, st1, True)
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


def test_autograd_wrapper():
    """models.ops.scan.selective_scan_fn routes CUDA tensors through the extension."""
    from models.ops import scan as ss

    if not ss.cuda_extension_available():
        pytest.skip("models.ops.scan did not import the extension")
    u, delta, A, B, C, D, bias, dout = make_inputs(2, 12, 200, 16, 3, torch.bfloat16, True, True, True, seed=7)
    leaves = [x.clone().requires_grad_(True) for x in (u, delta, A, B, C, D, bias)]
    y = ss.selective_scan_fn(*leaves, delta_softplus=True)
    y.backward(dout)
    y_ref, g_ref = reference_grads(u, delta, A, B, C, D, bias, dout, True)
    check("out", y, y_ref, 2e-3)
    for name, leaf, ref in zip(GRAD_NAMES, leaves, g_ref):
        check(name, leaf.grad, ref, TOL[torch.bfloat16])


def test_noncontiguous_inputs():
    u, delta, A, B, C, D, bias, dout = make_inputs(2, 6, 80, 16, 3, torch.float32, True, True, True, seed=11)
    # same values, channel-major storage with a padded last dimension (stride(-1) == 1)
    pad = lambda x: torch.cat([x, torch.zeros_like(x[..., :3])], -1)[..., : x.shape[-1]]  # noqa: E731
    out, states = ext.fwd(pad(u), pad(delta), A, pad(B), pad(C), D, bias, True, True)
    ref_out, _ = ext.fwd(u, delta, A, B, C, D, bias, True, True)
    assert torch.equal(out, ref_out)


def test_rejects_bad_shapes():
    u, delta, A, B, C, D, bias, dout = make_inputs(1, 6, 10, 16, 3, torch.float32, True, True, True, seed=1)
    with pytest.raises(RuntimeError):
        ext.fwd(u, delta, A, B[..., :5].contiguous(), C, D, bias, True, True)
    with pytest.raises(RuntimeError):
        ext.fwd(u, delta.double(), A, B, C, D, bias, True, True)
