"""Plain ViTs as multi-scale backbones: the simple feature pyramid against timm's taps, prefix tokens against timm's
``forward_intermediates(return_prefix_tokens=True)``, the stage contract with a pyramid, and MaskFormer at 1/4."""

import pytest
import timm
import torch
from torch import nn

from timm_backbone import (
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    TimmBackbone,
    TimmBackboneConfig,
)
from timm_backbone.necks import SimpleFeaturePyramid

TAPS = [1, 2, 4, 5]  # of test_vit's six blocks
HEADS = dict(
    decoder_config=dict(d_model=32, decoder_layers=1, num_queries=5, decoder_attention_heads=2, decoder_ffn_dim=32),
    fpn_feature_size=32,
    mask_feature_size=32,
    num_labels=3,
)


def _pyramid_vit(**overrides) -> TimmBackbone:
    fields = {"feature_pyramid": "simple", "out_indices": TAPS, "features_only": False, **overrides}
    return TimmBackbone(TimmBackboneConfig("test_vit", **fields)).eval()


def _timm_twin(model: TimmBackbone, **model_args) -> nn.Module:
    """A plain timm model holding the backbone's ViT weights."""
    reference = timm.create_model("test_vit", **model_args).eval()
    # the backbone holds the blocks up to its deepest tap, without the final norm and the classifier
    missing, unexpected = reference.load_state_dict(model._backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("head.", "norm.", "blocks.")) for k in missing)
    return reference


def test_levels_are_the_pyramid_over_timms_taps():
    torch.manual_seed(0)
    model = _pyramid_vit()
    reference = _timm_twin(model)
    pixel_values = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        taps = reference.forward_intermediates(pixel_values, indices=TAPS, intermediates_only=True)
        every = reference.forward_intermediates(pixel_values, indices=list(range(6)), intermediates_only=True)
        expected = model.neck(taps)
    for hidden, tap in zip(out.hidden_states, every):
        torch.testing.assert_close(hidden, tap)
    for level, want in zip(out.feature_maps, expected):
        torch.testing.assert_close(level, want)
    # channels and strides are known before running and describe the real maps
    assert model.channels == [64] * 4 and model.strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in out.feature_maps] == [(2, 64, 64 // s, 48 // s) for s in model.strides]
    assert model.output_shape()["blocks.1"] == {"channels": 64, "stride": 4}


@pytest.mark.parametrize("width", [24, 256])  # at 256 the finest level's 3x3 conv runs as Winograd F(2x2, 3x3)
def test_levels_follow_vitdet(width, winograd_calls):
    """Level k: rescale tap k (4x: deconv, LN, GELU, deconv; 2x: deconv; 1x: identity; 0.5x: max pool), then
    1x1 conv + LN and 3x3 conv + LN, as detectron2's SimpleFeaturePyramid."""
    torch.manual_seed(0)
    neck = SimpleFeaturePyramid([64] * 4, [16] * 4, out_channels=width).eval()
    scale = 2 if width == 256 else 1  # at 256 wide, a finest level of 32 x 48 is big enough for Winograd
    tap = torch.randn(1, 64, 4 * scale, 6 * scale)

    def channel_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # B, H, W, C
        return nn.functional.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)

    def project(level: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        conv1, norm1, conv3, norm3 = level[1:]
        x = channel_norm(nn.functional.conv2d(x, conv1.weight), norm1)
        return channel_norm(nn.functional.conv2d(x, conv3.weight, padding=1), norm3)

    up4, up2 = neck.levels[0][0], neck.levels[1][0]
    x4 = nn.functional.conv_transpose2d(tap, up4[0].weight, up4[0].bias, stride=2)
    x4 = nn.functional.gelu(channel_norm(x4, up4[1]))
    x4 = nn.functional.conv_transpose2d(x4, up4[3].weight, up4[3].bias, stride=2)
    x2 = nn.functional.conv_transpose2d(tap, up2.weight, up2.bias, stride=2)
    rescaled = [x4, x2, tap, nn.functional.max_pool2d(tap, 2)]
    with torch.no_grad():
        out = neck([tap] * 4)
        for level, x, got in zip(neck.levels, rescaled, out):
            torch.testing.assert_close(got, project(level, x))
    expected_sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [tuple(f.shape[-2:]) for f in out] == [(h * scale, w * scale) for h, w in expected_sizes]
    assert up4[0].out_channels == 32 and up4[3].out_channels == 16 and up2.out_channels == 32
    assert winograd_calls == ([(1, 256, 32, 48)] if width == 256 else [])
    assert all(level.is_contiguous() for level in out)  # NCHW-contiguous whichever convolution ran


@pytest.mark.parametrize("features_only", [True, False])
def test_prefix_tokens_match_timm(features_only):
    torch.manual_seed(0)
    model = TimmBackbone(
        TimmBackboneConfig(
            "test_vit", out_indices=[2, 5], output_prefix_tokens=True, features_only=features_only, reg_tokens=2
        )
    ).eval()
    timm_model = model._backbone.model if features_only else model._backbone
    reference = timm.create_model("test_vit", reg_tokens=2).eval()
    reference.load_state_dict(timm_model.state_dict(), strict=False)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        pairs = reference.forward_intermediates(
            pixel_values, indices=[2, 5], return_prefix_tokens=True, intermediates_only=True
        )
    assert len(out.prefix_tokens) == 2 and out.prefix_tokens[0].shape == (2, 3, 64)  # class + 2 registers
    for (spatial, prefix), fmap, tokens in zip(pairs, out.feature_maps, out.prefix_tokens):
        torch.testing.assert_close(fmap, spatial)
        torch.testing.assert_close(tokens, prefix)
    # appended last in the tuple view, after the fields that were there before
    assert out.to_tuple()[-1] is out.prefix_tokens and model(pixel_values).to_tuple()[-1] is not None
    assert model(pixel_values[:0]).prefix_tokens[0].shape == (0, 3, 64)


def test_prefix_tokens_with_the_pyramid_and_without_them():
    model = _pyramid_vit(output_prefix_tokens=True)
    out = model(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape) for t in out.prefix_tokens] == [(1, 1, 64)] * 4
    assert out.feature_maps[0].shape == (1, 64, 8, 8)
    plain = TimmBackbone(TimmBackboneConfig("test_vit")).eval()(torch.randn(1, 3, 32, 32))
    assert plain.prefix_tokens is None and len(plain.to_tuple()) == 1


def test_prefix_tokens_need_a_token_model():
    with pytest.raises(ValueError, match=r"output_prefix_tokens=True needs a token model.*'test_resnet'"):
        TimmBackbone(TimmBackboneConfig("test_resnet", output_prefix_tokens=True))


def test_default_taps_and_width():
    with torch.device("meta"):
        vit = TimmBackbone(TimmBackboneConfig("vit_small_patch16_224", feature_pyramid="simple"))
        narrow = TimmBackbone(
            TimmBackboneConfig("vit_small_patch16_224", feature_pyramid="simple", feature_pyramid_channels=256)
        )
    assert vit.out_indices == [2, 5, 8, 11] and vit.channels == [384] * 4 and vit.strides == [4, 8, 16, 32]
    assert narrow.channels == [256] * 4 and narrow.num_features == [384] * 12
    assert _pyramid_vit(out_indices=None).out_indices == [0, 2, 3, 5]


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(feature_pyramid="fpn"), r"feature_pyramid must be one of \['simple'\]"),
        (dict(feature_pyramid="simple", feature_pyramid_channels=0), "feature_pyramid_channels must be a positive"),
        (dict(feature_pyramid="simple", out_indices=[3, 5]), r"takes four taps.*out_indices=\[0, 2, 3, 5\]"),
    ],
)
def test_bad_pyramid_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        TimmBackbone(TimmBackboneConfig("test_vit", **fields))


def test_pyramid_needs_a_single_stride_model():
    with pytest.raises(ValueError, match=r"single-stride token model.*'test_resnet'.*strides \[2, 4, 8, 16, 32\]"):
        TimmBackbone(TimmBackboneConfig("test_resnet", feature_pyramid="simple", out_indices=[1, 2, 3, 4]))


def test_selection_change_keeps_four_taps_and_minimum_size():
    model = _pyramid_vit()
    model.out_indices = [0, 1, 2, 3]
    assert model(torch.randn(1, 3, 32, 32)).feature_maps[3].shape == (1, 64, 1, 1)
    with pytest.raises(ValueError, match=r"takes 4 taps of widths \[64, 64, 64, 64\], got \['blocks.1', 'blocks.2'\]"):
        model.out_indices = [1, 2]
    assert model.out_indices == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="minimum 32x32: the feature pyramid's coarsest level has stride 32"):
        model(torch.randn(1, 3, 16, 32))


def test_save_and_reload_with_the_pyramid(tmp_path):
    torch.manual_seed(0)
    model = _pyramid_vit(feature_pyramid_channels=16, output_prefix_tokens=True)
    model.save_pretrained(tmp_path)
    reloaded = TimmBackbone.from_pretrained(tmp_path)
    assert reloaded.load_report.ok and reloaded.config.feature_pyramid == "simple"
    assert reloaded.channels == [16] * 4 and reloaded.out_indices == TAPS
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(pixel_values).to_tuple(), reloaded(pixel_values).to_tuple()):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_pyramid_trains():
    model = _pyramid_vit().train()
    sum(f.square().mean() for f in model(torch.randn(2, 3, 32, 32)).feature_maps).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.neck.parameters())
    assert model._backbone.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("out_indices", [None, TAPS])
def test_maskformer_with_a_pyramid_vit_predicts_at_a_quarter(out_indices):
    torch.manual_seed(0)
    backbone = TimmBackboneConfig("test_vit", feature_pyramid="simple", out_indices=out_indices)
    model = MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=backbone, **HEADS))
    encoder = model.model.pixel_level_module.encoder
    assert encoder.strides == [4, 8, 16, 32] and len(encoder.out_indices) == 4
    labels = dict(mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.tensor([1])])
    out = model(torch.randn(1, 3, 64, 64), **labels)
    out.loss.backward()
    assert out.masks_queries_logits.shape == (1, 5, 16, 16)
    assert encoder.neck.levels[0][0][0].weight.grad is not None


def test_maskformer_with_a_pyramid_vit_round_trips(tmp_path):
    torch.manual_seed(0)
    backbone = TimmBackboneConfig("test_vit", feature_pyramid="simple", feature_pyramid_channels=16)
    model = MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=backbone, **HEADS)).eval()
    model.save_pretrained(tmp_path)
    reloaded = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path)
    assert reloaded.load_report.ok and reloaded.model.pixel_level_module.encoder.channels == [16] * 4
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values).masks_queries_logits, model(pixel_values).masks_queries_logits, rtol=0, atol=0
        )


@pytest.mark.parametrize(
    "name, strides",
    [
        ("deit_small_patch16_224", [4, 8, 16, 32]),
        ("eva02_small_patch14_224", [3.5, 7, 14, 28]),
        ("vit_small_patch14_reg4_dinov2", [3.5, 7, 14, 28]),
        ("samvit_base_patch16", [4, 8, 16, 32]),
    ],
)
def test_single_stride_families_get_the_pyramid(name, strides):
    with torch.device("meta"):
        model = TimmBackbone(TimmBackboneConfig(name, feature_pyramid="simple"))
    assert model.out_indices == [2, 5, 8, 11] and model.strides == strides and len(set(model.channels)) == 1


def test_patch14_levels_are_a_quarter_to_twice_the_taps():
    model = _pyramid_vit(model_args={"patch_size": 14})
    out = model(torch.randn(1, 3, 56, 56))
    assert model.strides == [3.5, 7, 14, 28]
    assert [tuple(f.shape[-2:]) for f in out.feature_maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_sams_image_encoder_with_the_pyramid():
    torch.manual_seed(0)
    sam_args = dict(img_size=64, depth=4, embed_dim=32, num_heads=2, global_attn_indexes=(1, 3), window_size=2)
    model = TimmBackbone(
        TimmBackboneConfig("samvit_base_patch16", feature_pyramid="simple", model_args=sam_args)
    ).eval()
    reference = timm.create_model("samvit_base_patch16", **sam_args).eval()
    reference.load_state_dict(model._backbone.model.state_dict(), strict=False)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = reference.forward_intermediates(pixel_values, indices=[0, 1, 2, 3], intermediates_only=True)
        for level, want in zip(model(pixel_values).feature_maps, model.neck(taps)):
            torch.testing.assert_close(level, want)
    assert model.out_indices == [0, 1, 2, 3] and model.strides == [4, 8, 16, 32]


def test_empty_batch_and_nan_isolation():
    model = _pyramid_vit(output_prefix_tokens=True)
    empty = model(torch.randn(0, 3, 32, 32))
    assert [tuple(f.shape) for f in empty.feature_maps] == [(0, 64, 8, 8), (0, 64, 4, 4), (0, 64, 2, 2), (0, 64, 1, 1)]
    assert empty.prefix_tokens[0].shape == (0, 1, 64)
    pixel_values = torch.randn(2, 3, 32, 32)
    pixel_values[0, :, 0, 0] = float("nan")
    with torch.no_grad():
        out = model(pixel_values)
    assert all(f[0].isnan().any() and f[1].isfinite().all() for f in out.feature_maps)


@pytest.mark.slow
def test_pyramid_exports_and_compiles():
    model = _pyramid_vit()
    program = torch.export.export(
        model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},)
    )
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    pixel_values = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).feature_maps
        for got in (program.module()(pixel_values).feature_maps, compiled(pixel_values).feature_maps):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b)


def test_vit_weights_are_saved_once_and_older_duplicated_files_load(tmp_path):
    model = TimmBackbone(TimmBackboneConfig("test_vit", out_indices=[1, 3])).eval()
    state_dict = model.state_dict()
    assert not any(k.startswith("_getter.") for k in state_dict)
    # files written before held the ViT twice, also under `_getter.`
    duplicated = {**state_dict, **{"_getter." + k[len("_backbone.model.") :]: v for k, v in state_dict.items()}}
    reloaded = TimmBackbone.from_state_dict(model.config, duplicated, strict=True)
    assert reloaded.load_report.ok
