"""FLOPs/params report: official counts and the two scan-counting conventions."""
import math

import pytest
import timm

import models  # noqa: F401  (registers the timm names)

from utils.flops import ScanFlopConvention, count_flops, count_params

# official README GFLOPs at 224x224 (release convention)
README_GFLOPS = {"defmamba_tiny": 1.3, "defmamba_small": 5.0, "defmamba_base": 8.9}


@pytest.fixture(scope="module")
def tiny():
    return timm.create_model("defmamba_tiny")


@pytest.mark.parametrize("name", list(README_GFLOPS))
def test_gflops_match_official_readme_within_5_percent(name, tiny):
    model = tiny if name == "defmamba_tiny" else timm.create_model(name)
    gflops = count_flops(model, 224)
    assert abs(gflops - README_GFLOPS[name]) / README_GFLOPS[name] < 0.05


def test_vmamba_convention_differs_by_the_analytic_scan_difference(tiny):
    model = tiny
    release = count_flops(model, 224, convention=ScanFlopConvention.RELEASE)
    vmamba = count_flops(model, 224, convention=ScanFlopConvention.VMAMBA)
    diff = 0.0
    for i, (depth, dim) in enumerate(zip((2, 2, 5, 2), (48, 96, 192, 384))):
        length, d, n = (56 // 2 ** i) ** 2, 3 * dim, 16
        diff += depth * ((9 * length * d * n + d * length) - (3 * d * length * n + 2.5 * d * length))
    assert math.isclose(vmamba - release, diff / 1e9, rel_tol=1e-9)


def test_count_params(tiny):
    assert count_params(tiny) == 7_547_878


def test_flops_cli(capsys):
    from utils.flops import main
    assert main(["--cfg", "configs/tiny.yaml", "--img-size", "64"]) == 0
    assert "params 7,547,878" in capsys.readouterr().out
    assert main(["--cfg", "configs/does-not-exist.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error:")
