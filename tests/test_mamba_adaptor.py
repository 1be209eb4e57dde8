"""Mamba-Adaptor (reconstruction on VMamba v2): Adaptor-T against a naive per-token loop, the recovered hidden
states against a float64 recurrence, Adaptor-S against a shifted-sum convolution, the variants' params / FLOPs
against the paper, every switch, the config path, and "both adaptors off" = VMamba."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models
from config import ConfigError, get_config, get_default_config, load_yaml_config
from models.mamba_adaptor import AdaptorS, AdaptorSS2D, AdaptorT, MambaAdaptor
from models.mamba_adaptor.adaptor_t import hidden_states, uncross
from models.vmamba import SS2D, VMamba, cross_merge, cross_scan
from utils.flops import ScanFlopConvention, count_flops

REPO = Path(__file__).resolve().parents[1]
# the paper's (params, GFLOPs at 224)
PAPER = {"mamba_adaptor_b1": (7.8e6, 1.4), "mamba_adaptor_b2": (32e6, 5.4)}
TINY = dict(num_classes=3, embed_dim=8, depths=(1, 1, 1, 1), drop_path_rate=0.0)
aten = torch.ops.aten


# ----------------------------------------------------------------------------- references

def _interp(get, py, px, height, width, interpolate):
    """Bilinear (or nearest) read of get(y, x) at (py, px) with zeros outside the height x width map."""
    if not interpolate:
        yy, xx = round(py), round(px)
        return get(yy, xx) if 0 <= yy < height and 0 <= xx < width else 0.0
    y0, x0 = math.floor(py), math.floor(px)
    fy, fx = py - y0, px - x0
    total = 0.0
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < height and 0 <= xx < width:
                total = total + wy * wx * get(yy, xx)
    return total


def _pixel(k, i, height, width):
    """(y, x) of token i in scan direction k: row-major, column-major, then both reversed."""
    j = i if k < 2 else height * width - 1 - i
    return divmod(j, width) if k % 2 == 0 else (j % height, j // height)


def _token(k, y, x, height, width):
    """Index in direction k's sequence of pixel (y, x)."""
    j = y * width + x if k % 2 == 0 else x * height + y
    return j if k < 2 else height * width - 1 - j


def naive_adaptor_t(mod: AdaptorT, h, u):
    """Adaptor-T token by token: predict, softmax, read each group's K locations, sum (float64)."""
    batch, ndir, dim, length = h.shape
    height, width = u.shape[-2:]
    s_, kp, c = mod.groups, mod.points, mod.coords
    dg = dim // s_
    out = torch.zeros_like(h)
    for b in range(batch):
        for k in range(ndir):
            for i in range(length):
                y, x = _pixel(k, i, height, width)
                head = k if mod.per_direction else 0
                if mod.dynamic:
                    vec = u[b, :, y, x] if mod.source == "token" else h[b, k, :, i]
                    m = (mod.weight[head] @ vec + mod.bias[head]).detach()
                else:
                    m = mod.table[head, :, y, x].detach()
                offs = m[:s_ * kp * c].view(s_, kp, c)
                w = torch.softmax(m[s_ * kp * c:].view(s_, kp), -1)
                for s in range(s_):
                    chans = slice(s * dg, (s + 1) * dg)
                    for p in range(kp):
                        if c == 1:
                            val = _interp(lambda yy, xx: h[b, k, chans, xx], 0.0, i + float(offs[s, p, 0]), 1,
                                          length, mod.interpolate)
                        else:
                            val = _interp(lambda yy, xx: h[b, k, chans, _token(k, yy, xx, height, width)],
                                          y + float(offs[s, p, 0]), x + float(offs[s, p, 1]), height, width,
                                          mod.interpolate)
                        out[b, k, chans, i] += w[s, p] * val
    return h + out if mod.residual else out


def scan_recurrence(u, delta, A, B, bias):
    """h_t = exp(dt A) h_{t-1} + dt B_t u_t, dt = softplus(delta + bias), per (batch, channel); N = 1, float64."""
    dt = F.softplus(delta + bias[None, :, None])
    h = torch.zeros(u.shape[:2], dtype=u.dtype)
    group = u.shape[1] // B.shape[1]
    out = []
    for t in range(u.shape[2]):
        b_t = B[:, :, 0, t].repeat_interleave(group, 1)
        h = torch.exp(dt[:, :, t] * A[:, 0]) * h + dt[:, :, t] * b_t * u[:, :, t]
        out.append(h)
    return torch.stack(out, -1)


def meta_gflops(model, img: int) -> float:
    """GFLOPs of one image on the meta device by torch's dispatch-level counter, in utils.flops' convention
    (VMamba's scan count, LayerNorm 5 and means 1 per element, sampling 4 per output element)."""
    n = math.prod
    # FlopCounterMode counts 2 per multiply-add; these return twice the per-op convention of utils.flops
    custom = {
        aten.native_layer_norm: lambda x, *a, out_shape=None, **k: 2 * 5 * n(x),
        aten.mean: lambda x, *a, out_shape=None, **k: 2 * n(x),
        aten.grid_sampler_2d: lambda *a, out_shape=None, **k: 2 * 4 * n(out_shape),
        aten.upsample_bilinear2d: lambda *a, out_shape=None, **k: 2 * 4 * n(out_shape),
        torch.ops.defmamba.selective_scan: lambda u, d, A, *a, out_shape=None, **k: 2 * (9 * n(d) * A[1] + n(d)),
    }
    with FlopCounterMode(display=False, custom_mapping=custom) as counter, torch.no_grad():
        model.eval()(torch.empty(1, model.in_chans, img, img, device="meta"))
    return counter.get_total_flops() / 2e9


# ----------------------------------------------------------------------------- Adaptor-T

def test_uncross_inverts_cross_scan_and_sums_to_cross_merge():
    torch.manual_seed(0)
    u = torch.randn(2, 3, 4, 5)
    back = uncross(cross_scan(u), 4, 5)
    assert all(torch.equal(back[:, k], u) for k in range(4))
    ys = torch.randn(2, 4, 3, 20)
    torch.testing.assert_close(uncross(ys, 4, 5).sum(1), cross_merge(ys, 4, 5))


def test_hidden_states_match_float64_recurrence():
    torch.manual_seed(0)
    batch, k, d, length = 2, 4, 3, 7
    xs, delta = torch.randn(batch, k, d, length, dtype=torch.float64), torch.randn(batch, k, d, length).double()
    A = -torch.rand(k * d, 1, dtype=torch.float64) - 0.1
    Bs, bias = torch.randn(batch, k, 1, length, dtype=torch.float64), torch.randn(k * d, dtype=torch.float64)
    h = hidden_states(xs, delta, A, Bs, bias)
    ref = scan_recurrence(xs.reshape(batch, k * d, length), delta.reshape(batch, k * d, length), A, Bs, bias)
    torch.testing.assert_close(h, ref.view(batch, k, d, length), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="d_state 1"):
        hidden_states(xs, delta, A.repeat(1, 2), Bs.repeat(1, 1, 2, 1), bias)


CASES = [dict(), dict(coords=1), dict(interpolate=False), dict(coords=1, interpolate=False),
         dict(source="state"), dict(per_direction=True), dict(source="state", per_direction=True),
         dict(residual=False), dict(dynamic=False), dict(dynamic=False, per_direction=True, coords=1)]


@pytest.mark.parametrize("kwargs", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
def test_adaptor_t_matches_naive_per_token_loop(kwargs):
    """Random predictor / table (fractional offsets of a few pixels, some outside), S = 2 groups, K = 3."""
    torch.manual_seed(0)
    height, width, dim = 3, 4, 4
    mod = AdaptorT(dim, points=3, groups=2, static_size=(height, width), **kwargs).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * (0.8 if p.dim() == 3 else 1.5))
    u = torch.randn(1, dim, height, width, dtype=torch.float64)
    h = torch.randn(1, 4, dim, height * width, dtype=torch.float64)
    got = mod(h, cross_scan(u), u)
    torch.testing.assert_close(got, naive_adaptor_t(mod, h, u), rtol=1e-10, atol=1e-10)


def test_adaptor_t_static_table_resizes_and_checks_arguments():
    torch.manual_seed(0)
    mod = AdaptorT(8, points=2, groups=2, dynamic=False, static_size=(4, 4))
    h, u = torch.randn(1, 4, 8, 6), torch.randn(1, 8, 2, 3)
    assert mod(h, cross_scan(u), u).shape == h.shape  # the 4 x 4 table, bilinearly resized to 2 x 3
    for bad in (dict(groups=3), dict(coords=3), dict(points=0), dict(source="image"), dict(dynamic=False)):
        with pytest.raises(ValueError, match="Adaptor-T|static"):
            AdaptorT(8, **bad)


def test_ssm_with_every_location_outside_is_the_plain_scan():
    """Locations far outside read 0, so h' = h and y = C h + D u must be SS2D's own scan (float64)."""
    torch.manual_seed(0)
    plain = SS2D(8).double()
    with torch.no_grad():  # no symmetric start values (Ds = 1, equal biases) that would hide a layout error
        for t in (plain.Ds, plain.A_logs, plain.dt_projs_bias):
            t.add_(torch.rand_like(t))
    mod = AdaptorSS2D(8, adaptor_t=dict(points=2, groups=2)).double()
    mod.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        mod.adaptor_t.bias[:, :8].fill_(1e4)  # the 2 x 2 x 2 offsets
    u = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(mod.ssm(u), plain.ssm(u), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- Adaptor-S

def _dilated_dwconv(x, weight, bias, dilation):
    """Depthwise conv as a sum of shifted copies of the zero-padded input (odd kernel, 'same' size)."""
    k = weight.shape[-1]
    r = dilation * (k // 2)
    padded = F.pad(x, (r, r, r, r))
    height, width = x.shape[-2:]
    out = bias.view(1, -1, 1, 1).expand_as(x).clone()
    for i in range(k):
        for j in range(k):
            window = padded[:, :, i * dilation:i * dilation + height, j * dilation:j * dilation + width]
            out = out + weight[:, 0, i, j].view(1, -1, 1, 1) * window
    return out


@pytest.mark.parametrize("fusion,residual", [("sum", True), ("sum", False), ("split", True)])
def test_adaptor_s_matches_shifted_sums(fusion, residual):
    torch.manual_seed(0)
    mod = AdaptorS(7, kernel_sizes=(3, 5, 3), dilations=(1, 2, 3), fusion=fusion, residual=residual).double()
    y = torch.randn(2, 7, 6, 5, dtype=torch.float64)
    if fusion == "sum":
        parts = [_dilated_dwconv(y, c.weight, c.bias, c.dilation[0]) for c in mod.branches]
        expected = sum(parts)
    else:
        chunks = y.split([3, 2, 2], dim=1)
        expected = torch.cat([_dilated_dwconv(p, c.weight, c.bias, c.dilation[0])
                              for p, c in zip(chunks, mod.branches)], 1)
    torch.testing.assert_close(mod(y), y + expected if residual else expected, rtol=1e-10, atol=1e-12)
    for bad in (dict(kernel_sizes=(3, 4), dilations=(1, 1)), dict(dilations=(1,)), dict(fusion="mean")):
        with pytest.raises(ValueError, match="Adaptor-S"):
            AdaptorS(7, **bad)


# ----------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def variants():
    """The registered variants on the meta device (built once: shapes and counts, no weights)."""
    return {name: timm.create_model(name, device="meta") for name in PAPER}


@pytest.mark.parametrize("name", list(PAPER))
def test_variants_params_and_flops_within_5_percent_of_the_paper(name, variants):
    model = variants[name]
    params = sum(p.numel() for p in model.parameters())
    gflops = meta_gflops(model, 224)
    paper_params, paper_gflops = PAPER[name]
    assert abs(params / paper_params - 1) < 0.05, params
    assert abs(gflops / paper_gflops - 1) < 0.05, gflops


def test_meta_flop_count_agrees_with_utils_flops():
    """The fast meta count above is utils.flops' (fvcore) count, up to fvcore's einsum rounding (numpy paths)."""
    torch.manual_seed(0)
    kwargs = dict(TINY, t_dynamic=False, img_size=64)  # a static table resized to the 32 px maps: upsample counted
    fvcore = count_flops(MambaAdaptor(**kwargs), 32, convention=ScanFlopConvention.VMAMBA)
    with torch.device("meta"):
        meta = meta_gflops(MambaAdaptor(**kwargs), 32)
    assert abs(meta / fvcore - 1) < 0.01


# every switch at least once (orthogonal ones share a model); the ablations: each adaptor alone, static locations,
# fewer kernels, no residual
SWITCHES = [dict(adaptor_t=False), dict(adaptor_s=False),
            dict(t_coords=1, t_interpolate=False, s_fusion="split"),
            dict(t_dynamic=False, t_per_direction=True, s_residual=False),
            dict(t_source="state", t_residual=False, s_kernel_sizes=(3, 5, 7), s_dilations=(1, 1, 1)),
            dict(t_source="state", t_per_direction=True, t_points=2, t_groups=8, s_kernel_sizes=(3,), s_dilations=(2,)),
            dict(t_stages=(3,), s_stages=(0, 1), t_points=1, t_groups=1)]


@pytest.mark.parametrize("kwargs", SWITCHES, ids=[",".join(f"{k}={v}" for k, v in s.items()) for s in SWITCHES])
def test_every_switch_builds_and_trains(kwargs):
    torch.manual_seed(0)
    model = MambaAdaptor(**TINY, img_size=32, **kwargs)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:3]


def test_both_adaptors_off_is_vmamba():
    torch.manual_seed(0)
    vmamba = VMamba(**TINY).eval()
    plain = MambaAdaptor(**TINY, adaptor_t=False, adaptor_s=False).eval()
    plain.load_state_dict(vmamba.state_dict())  # strict: the same keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(x), vmamba(x))
    # with the adaptors, a VMamba checkpoint loads as the backbone: only adaptor keys are missing
    full = MambaAdaptor(**TINY)
    missing, unexpected = full.load_state_dict(vmamba.state_dict(), strict=False)
    assert not unexpected and missing and all(".adaptor_t." in k or ".adaptor_s." in k for k in missing)
    with pytest.raises(ValueError, match="stages outside"):
        MambaAdaptor(**TINY, t_stages=(4,))
    with pytest.raises(ValueError, match="d_state"):
        MambaAdaptor(**TINY, d_state=2)


def test_timm_variants_and_configs(variants):
    for name, model in variants.items():
        assert isinstance(model, MambaAdaptor) and model.pretrained_cfg["classifier"] == "classifier.head"
        config = get_default_config()
        load_yaml_config(config, REPO / "configs" / f"{name}.yaml")
        with torch.device("meta"):
            built = models.build_model(config)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in built.state_dict().items()} == shapes
    small = timm.create_model("mamba_adaptor_b2", num_classes=4, embed_dim=8, depths=(1, 1, 1, 1))
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_config_validation(tmp_path):
    for key, value, match in (("S_DILATIONS", "[1]", "S_DILATIONS"), ("T_SOURCE", "image", "T_SOURCE"),
                              ("S_STAGES", "[4]", "S_STAGES")):
        path = tmp_path / "bad.yaml"
        path.write_text(f"MODEL:\n  TYPE: mamba_adaptor\n  MAMBA_ADAPTOR:\n    {key}: {value}\n")
        with pytest.raises(ConfigError, match=match):
            get_config(type("Args", (), {"cfg": str(path)})())
    assert get_config(type("Args", (), {"cfg": str(REPO / "configs" / "demo_mamba_adaptor.yaml")})()).MODEL.TYPE \
        == "mamba_adaptor"


# config: which adaptor parameters exist ('' = none of that kind)
ABLATIONS = {"baseline": (False, False, ""), "t_only": (True, False, "weight"), "s_only": (False, True, ""),
             "static": (True, True, "table"), "one_kernel": (True, True, "weight")}


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_ablation_configs(row):
    has_t, has_s, t_param = ABLATIONS[row]
    shrink = ["MODEL.MAMBA_ADAPTOR.EMBED_DIM", "8", "MODEL.MAMBA_ADAPTOR.DEPTHS", "[1, 1, 1, 1]"]  # keys only
    path = REPO / "configs" / "ablation" / f"mamba_adaptor_{row}.yaml"
    config = get_config(type("Args", (), {"cfg": str(path), "opts": shrink})())
    with torch.device("meta"):
        keys = list(models.build_model(config).state_dict())
    t_keys = [k for k in keys if ".adaptor_t." in k]
    s_keys = [k for k in keys if ".adaptor_s." in k]
    assert bool(t_keys) == has_t and bool(s_keys) == has_s
    assert all(k.endswith(f"adaptor_t.{t_param}") for k in t_keys if not k.endswith("adaptor_t.bias"))
    branches = {k.split("branches.")[1].split(".")[0] for k in s_keys}
    assert branches == ({"0"} if row == "one_kernel" else {"0", "1", "2"} if has_s else set())
