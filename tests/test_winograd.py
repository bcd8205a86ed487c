"""Winograd F(2x2, 3x3) convolutions: same numbers as the direct convolution, used only where they apply."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_backbone import winograd
from timm_backbone.winograd import Conv3x3, use_winograd, winograd_applies, winograd_conv3x3


def direct(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, padding=1)


def float64_error(y: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> float:
    bias = conv.bias.double() if conv.bias is not None else None
    reference = F.conv2d(x.double(), conv.weight.double(), bias, padding=1)
    return ((y.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize(
    ("n", "c_in", "c_out", "height", "width", "bias"),
    [
        (2, 256, 256, 24, 24, False),  # even map
        (1, 256, 320, 31, 29, True),  # odd map: the last tile row and column are half outside
        (3, 512, 256, 12, 15, True),
        (1, 256, 256, 1, 1, True),  # one pixel: all of the tile but its centre is padding
    ],
)
def test_matches_the_direct_convolution(n, c_in, c_out, height, width, bias):
    torch.manual_seed(0)
    conv = Conv3x3(c_in, c_out, bias=bias)
    x = torch.randn(n, c_in, height, width)
    with torch.no_grad():
        y = winograd_conv3x3(x, conv)
        expected = direct(x, conv)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # rounding of the same size as the direct convolution's, measured against float64
    assert float64_error(y, x, conv) < 4 * max(float64_error(expected, x, conv), 1e-7)


def test_bands_cover_the_map(monkeypatch):
    """Several bands of tile rows, the last one shorter, give what one band gives."""
    torch.manual_seed(0)
    conv = Conv3x3(256, 256)
    x = torch.randn(2, 256, 23, 20)
    with torch.no_grad():
        whole = winograd_conv3x3(x, conv)
        monkeypatch.setattr(winograd, "_TILES_PER_BAND", 2 * 10 * 5)  # 5 of the 12 tile rows per band
        banded = winograd_conv3x3(x, conv)
    torch.testing.assert_close(banded, whole, rtol=0, atol=0)
    torch.testing.assert_close(banded, direct(x, conv), rtol=1e-5, atol=1e-5)


def test_any_input_layout():
    torch.manual_seed(0)
    conv = Conv3x3(256, 256)
    x = torch.randn(1, 256, 20, 18)
    with torch.no_grad():
        expected = winograd_conv3x3(x, conv)
        channels_last = winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), conv)
        strided = winograd_conv3x3(torch.randn(1, 256, 20, 36)[..., ::2].copy_(x), conv)
    assert expected.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, expected, rtol=0, atol=0)
    torch.testing.assert_close(strided, expected, rtol=0, atol=0)


def test_the_module_takes_winograd_only_where_it_applies(winograd_calls):
    torch.manual_seed(0)
    wide, narrow = Conv3x3(256, 256), Conv3x3(128, 256)
    big, small = torch.randn(1, 256, 32, 32), torch.randn(1, 256, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(wide(big), direct(big, wide), rtol=1e-5, atol=1e-5)
        assert len(winograd_calls) == 1
        for conv, x in [(wide, small), (narrow, torch.randn(1, 128, 32, 32))]:
            torch.testing.assert_close(conv(x), direct(x, conv), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wide(big)
        wide.to(torch.bfloat16)(big.bfloat16())
        wide.float()
    assert len(winograd_calls) == 1
    assert not winograd_applies(big.requires_grad_(), wide)  # autograd takes the direct convolution


def test_gradients_are_the_convolutions():
    torch.manual_seed(0)
    conv = Conv3x3(256, 256)
    reference = nn.Conv2d(256, 256, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(1, 256, 16, 16, requires_grad=True)
    conv(x).square().sum().backward()
    grad_x, grad_w = x.grad.clone(), conv.weight.grad.clone()
    x.grad = None
    reference(x).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_w, reference.weight.grad, rtol=0, atol=0)


def test_a_changed_weight_is_transformed_again():
    torch.manual_seed(0)
    conv = Conv3x3(256, 256, bias=False)
    x = torch.randn(1, 256, 32, 32)
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(-2)
        torch.testing.assert_close(conv(x), -2 * before, rtol=1e-5, atol=1e-5)
        conv.weight = nn.Parameter(torch.zeros_like(conv.weight))
        torch.testing.assert_close(conv(x), torch.zeros_like(before), rtol=0, atol=0)


def test_same_keys_as_conv2d_and_copies_work():
    conv = Conv3x3(256, 256)
    assert conv.state_dict().keys() == nn.Conv2d(256, 256, 3, padding=1).state_dict().keys()
    x = torch.randn(1, 256, 32, 32)
    with torch.inference_mode():
        expected = conv(x)
        copy = pickle.loads(pickle.dumps(conv))
        torch.testing.assert_close(copy(x), expected, rtol=0, atol=0)


def test_the_benchmark_runs():
    """``benchmarks/bench_winograd.py`` at a small size: its error columns are the measured errors."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_winograd.py"
    spec = importlib.util.spec_from_file_location("bench_winograd", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    layer = bench.run_shape((1, 256, 256, 12, 12), repeats=1)
    assert set(layer["median_ms"]) == {"direct", "winograd", "winograd_channels_last"}
    assert 0 < layer["max_rel_error_vs_float64"]["winograd"] < 1e-5
    pyramid = bench.run_pyramid("test_vit", 64, 1, repeats=1)
    assert pyramid["max_abs_diff_of_levels"] == 0  # test_vit is 64 wide: no level takes Winograd
    assert pyramid["model_speedup"] > 0 and pyramid["neck_speedup"] > 0


def test_export_and_compile_see_the_convolution():
    """torch.export and torch.compile trace nn.Conv2d's forward (a portable convolution), not the Winograd loop."""
    torch.manual_seed(0)
    conv = Conv3x3(256, 256).eval()
    x = torch.randn(1, 256, 32, 32)
    program = torch.export.export(conv, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("conv2d" in t or "convolution" in t for t in targets), targets
    assert not any("linear_pointwise" in t or "mm" in t.split(".")[-2:] for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), direct(x, conv), rtol=0, atol=0)
        compiled = torch.compile(conv, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), direct(x, conv), rtol=0, atol=0)


def test_use_winograd_switches_layers_off_and_on(winograd_calls):
    torch.manual_seed(0)
    model = nn.Sequential(Conv3x3(256, 256), nn.ReLU(), Conv3x3(256, 256))
    x = torch.randn(1, 256, 32, 32)
    with torch.inference_mode():
        model(x)
        assert len(winograd_calls) == 2 and model[0] in winograd._TRANSFORMED_KERNELS
        use_winograd(model, False)
        assert model[0] not in winograd._TRANSFORMED_KERNELS  # the kept kernels are dropped
        expected = direct(torch.relu(direct(x, model[0])), model[2])
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # nn.Conv2d's numbers, bit for bit
        copy = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(copy(x), expected, rtol=0, atol=0)
        assert len(winograd_calls) == 2
        use_winograd(copy)
        copy(x)
    assert len(winograd_calls) == 4
