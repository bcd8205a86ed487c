"""benchmarks/bench_bounds.py: the op recorder sorts a forward's calls into products, attention and the rest, counts
the products' FLOPs as torch's own counter does, and its replays run the recorded calls."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tiny_backbones import build
from torch.utils.flop_counter import FlopCounterMode

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bounds():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_bounds", BENCHMARKS / "bench_bounds.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def counted_product_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """torch's FlopCounterMode on the model's reference path: its linears and convolutions (the attention there runs
    as batched matmuls, which the recorder files under attention when they are the fused kernel)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()["Global"]
    return sum(flops for op, flops in counts.items() if str(op).split(".")[-1] in ("mm", "addmm", "convolution"))


def record(bounds, model: torch.nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        model(x)  # caches (masks, packed weights) outside the recording
        with bounds.Recorder() as recorder:
            model(x)
    return recorder


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "optimize_for_inference"])
def test_resnet_products_and_flops(bounds, optimized):
    model = build("resnet")
    x = torch.randn(2, 3, 64, 64)
    expected = counted_product_flops(model, x)
    if optimized:
        model.optimize_for_inference()
    recorder = record(bounds, model, x)
    assert recorder.flops == expected > 0
    assert recorder.calls["gemm"] and not recorder.calls["attention"]
    if optimized and torch.backends.mkldnn.is_available():  # batch norms folded, ReLU and sums fused
        names = {func.name() for func, _, _ in recorder.calls["other"]}
        assert not {"aten::batch_norm", "aten::relu_", "aten::add_.Tensor"} & names


def test_swin_fused_linears_count_as_products(bounds):
    model = build("swin")
    x = torch.randn(2, 3, 64, 64)
    model.set_fast_path(False)
    expected = counted_product_flops(model, x)
    model.set_fast_path(True)
    recorder = record(bounds, model, x)
    assert recorder.flops == expected > 0
    assert len(recorder.calls["attention"]) == 4  # one block per stage
    names = {func.name() for func, _, _ in recorder.calls["gemm"]}
    if torch.backends.mkldnn.is_available():
        assert "mkldnn::_linear_pointwise" in names
    with torch.inference_mode():
        for group in bounds.GROUPS:
            bounds.replay(recorder.calls[group])()  # the recorded calls run again as they are


def test_group_of(bounds):
    assert bounds.group_of("mkldnn::_convolution_pointwise.binary") == "gemm"
    assert bounds.group_of("aten::addmm") == "gemm"
    assert bounds.group_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bounds.group_of("aten::layer_norm") == "other"
