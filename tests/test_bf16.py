"""bf16 inference: ``model.to(torch.bfloat16)`` and fp32 models under ``torch.autocast("cpu", dtype=torch.bfloat16)``
for every native backbone and MaskFormer: outputs in bf16, within bf16 rounding of the fp32 outputs, through the
oneDNN kernels where the CPU has bf16 support, following weight changes."""

import copy

import pytest
import torch
from tiny_backbones import RESNET_FIELDS, build, perturb_norms
from torch import nn
from torch.profiler import ProfilerActivity, profile

from timm_backbone import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig, SwinConfig
from timm_backbone.layers import linear

BF16 = torch.bfloat16
HAS_BF16_KERNELS = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_bf16_kernels = pytest.mark.skipif(not HAS_BF16_KERNELS, reason="oneDNN has no bf16 kernels on this CPU")
# bf16 keeps 8 significant bits (relative rounding 2**-9 = 2e-3); through the layers errors grow to about 1.5e-2 of
# the largest output for Swin-T and ResNet-50 at 224 px (docs/bf16.md), and to about 4e-2 for these tiny models
# (8 to 64 channels, norms perturbed away from the identity); a wrong weight or dtype shows as errors of order 1
MAX_ERROR = 6e-2  # max |bf16 - fp32| / max |fp32|
L2_ERROR = 4e-2  # ||bf16 - fp32|| / ||fp32||


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == BF16 and expected.dtype == torch.float32
    error = actual.float() - expected
    scale = expected.abs().max()
    assert error.abs().max() <= MAX_ERROR * scale, f"max error {error.abs().max() / scale:.2e} of the largest value"
    assert error.norm() <= L2_ERROR * expected.norm(), f"relative L2 error {error.norm() / expected.norm():.2e}"


def run(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> list[torch.Tensor]:
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = model(x)
    return (
        list(out.feature_maps) if hasattr(out, "feature_maps") else [out.class_queries_logits, out.masks_queries_logits]
    )


def backbone(name: str, optimized: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = perturb_norms(build(name, out_indices=[1, 2, 3, 4]))
    return model.optimize_for_inference() if optimized else model


def maskformer(kind: str) -> MaskFormerForInstanceSegmentation:
    torch.manual_seed(0)
    if kind == "swin":
        config = SwinConfig(embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4, out_indices=[1, 2])
    else:
        config = ResNetConfig(**RESNET_FIELDS, out_indices=[1, 2, 3, 4])
    decoder = dict(d_model=32, decoder_layers=2, num_queries=10, decoder_attention_heads=2, decoder_ffn_dim=64)
    model = MaskFormerForInstanceSegmentation(
        MaskFormerConfig(backbone_config=config, decoder_config=decoder, fpn_feature_size=32, mask_feature_size=32)
    )
    return perturb_norms(model).eval()


CASES = {
    "swin": lambda: backbone("swin"),
    "swin-optimized": lambda: backbone("swin", optimized=True),
    "resnet": lambda: backbone("resnet"),
    "resnet-optimized": lambda: backbone("resnet", optimized=True),
    "maskformer-swin": lambda: maskformer("swin"),
    "maskformer-resnet": lambda: maskformer("resnet"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("autocast", [False, True], ids=["to-bf16", "autocast"])
def test_bf16_outputs_match_fp32(name, autocast):
    model = CASES[name]()
    x = torch.randn(2, 3, 64, 64)
    expected = run(model, x)
    if autocast:
        actual = run(model, x, autocast=True)
    else:
        half = copy.deepcopy(model).to(BF16)
        if hasattr(half, "optimize_for_inference") and getattr(model, "_optimized", False):
            half.optimize_for_inference()
        actual = run(half, x.to(BF16))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_bf16_close(a, e)


@pytest.mark.parametrize("name", ["swin", "swin-optimized", "resnet-optimized"])
def test_fast_path_agrees_with_reference_path_in_bf16(name):
    model = CASES[name]().to(BF16)
    x = torch.randn(2, 3, 64, 64, dtype=BF16)
    fast = run(model, x)
    if name.startswith("swin"):
        model.set_fast_path(False)
    else:
        model.optimize_for_inference(False)
    for a, e in zip(fast, run(model, x)):
        assert_bf16_close(a, e.float())


def _kernels(model: nn.Module, x: torch.Tensor, autocast: bool) -> dict[str, set[str]]:
    """Names of the oneDNN ops a forward ran -> the dtypes of their first inputs (after a first, untraced forward
    that packs weights and checks which kernels exist)."""
    run(model, x, autocast)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(model, x, autocast)
    found: dict[str, set[str]] = {}
    for event in prof.events():
        if event.name.startswith("mkldnn::"):
            found.setdefault(event.name, set()).add(event.input_dtypes[0] if event.input_dtypes else "")
    return found


@needs_bf16_kernels
@pytest.mark.parametrize("autocast", [False, True], ids=["to-bf16", "autocast"])
def test_onednn_kernels_run_in_bf16(autocast):
    swin, resnet = backbone("swin"), backbone("resnet", optimized=True)
    x = torch.randn(1, 3, 64, 64)
    if not autocast:
        swin, resnet, x = swin.to(BF16), resnet.to(BF16).optimize_for_inference(), x.to(BF16)
    assert _kernels(swin, x, autocast)["mkldnn::_linear_pointwise"] == {"c10::BFloat16"}
    # the fused convolutions (plain and with the residual sum), not fp32 behind autocast's back
    assert _kernels(resnet, x, autocast)["mkldnn::_convolution_pointwise"] == {"c10::BFloat16"}


@needs_bf16_kernels
def test_fused_convolutions_found_when_first_asked_under_autocast(monkeypatch):
    """The check for oneDNN's fused convolutions runs in fp32 even when the first optimized forward of the process is
    under bf16 autocast (it used to compare against a bf16 conv there, fail, and turn the fused kernels off)."""
    from timm_backbone.models import resnet as resnet_module

    monkeypatch.setattr(resnet_module, "_ONEDNN_CONV_FUSION", None)  # as in a fresh process
    kernels = _kernels(backbone("resnet", optimized=True), torch.randn(1, 3, 64, 64), autocast=True)
    assert kernels.get("mkldnn::_convolution_pointwise") == {"c10::BFloat16"}, sorted(kernels)
    assert resnet_module.onednn_fusion_available()


@pytest.mark.parametrize("act", ["none", "gelu"])
def test_linear_under_autocast_follows_weight_changes(act):
    layer = nn.Linear(16, 24)
    x = torch.randn(5, 16)

    def expected() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            y = layer(x)
            return nn.functional.gelu(y) if act == "gelu" else y

    for _ in range(2):
        with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
            y = linear(x, layer, act)
        assert y.dtype == BF16
        torch.testing.assert_close(y.float(), expected().float(), atol=2e-2, rtol=2e-2)
        with torch.no_grad():  # the cached bf16 weights must be cast again
            layer.weight.mul_(-2.0)
            layer.bias.add_(1.0)
