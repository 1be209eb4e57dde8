"""The independent float64 reference of the selective scan, shared by the scan tests of every backend."""
import importlib.util

import torch

from models.ops.backends import triton_interpreting

# where the Triton kernels can run in this test process: compiled on a GPU, else in the interpreter
# (tests/conftest.py switches it on when there is no GPU), else nowhere
if importlib.util.find_spec("triton") is None:
    TRITON_DEVICE = None
elif triton_interpreting():
    TRITON_DEVICE = "cpu"
else:
    TRITON_DEVICE = "cuda" if torch.cuda.is_available() else None


def naive_scan(u, delta, A, B, C, D, bias, softplus):
    """One explicit step per token, float64, differentiated by autograd."""
    batch, dim, length = u.shape
    per_group = dim // B.shape[1]
    Bx = B.repeat_interleave(per_group, dim=1)
    Cx = C.repeat_interleave(per_group, dim=1)
    dt = delta if bias is None else delta + bias[:, None]
    if softplus:
        dt = torch.log1p(torch.exp(dt))
    h = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bx[:, :, :, t]
        y = (h * Cx[:, :, :, t]).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        ys.append(y)
    return torch.stack(ys, -1)


def two_way_scan(u, delta, A, B, C, D, bias, reversed_groups):
    """One explicit step per token (softplus on), each group in its own direction, float64."""
    batch, dim, length = u.shape
    per_group = dim // B.shape[1]
    backward = torch.tensor([d // per_group in reversed_groups for d in range(dim)])
    Bx, Cx = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)
    dt = torch.log1p(torch.exp(delta + bias[:, None]))
    h = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype)
    ys = [None] * length
    for n in range(length):  # step n: token n of the forward groups, token L-1-n of the backward ones
        t = torch.where(backward, length - 1 - n, n)
        pick = lambda x: x.gather(  # noqa: E731  x[:, d, ..., t[d]]
            -1, t.view(1, dim, *[1] * (x.dim() - 3), 1).expand(*x.shape[:-1], 1))[..., 0]
        h = torch.exp(pick(dt)[..., None] * A) * h + (pick(dt) * pick(u))[..., None] * pick(Bx)
        ys[n] = (h * pick(Cx)).sum(-1) + D * pick(u)
    y = torch.stack(ys, -1)
    steps = torch.arange(length)
    order = torch.where(backward[:, None], length - 1 - steps, steps)  # step of each token
    return y.gather(-1, order.expand_as(y))


def make_inputs(batch, groups, per_group, nstate, length, with_d, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = groups * per_group
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    u = r(batch, dim, length)
    delta = 0.5 * r(batch, dim, length)
    A = -torch.exp(0.5 * r(dim, nstate))
    B, C = r(batch, groups, nstate, length), r(batch, groups, nstate, length)
    D = r(dim) if with_d else None
    bias = 0.3 * r(dim) if with_bias else None
    return [u, delta, A, B, C, D, bias]
