"""MaskFormer: parity with transformers on the same weights (logits, hidden states, losses), checkpoints both ways,
config.json round trips, backbone stage selection, the loss on edge cases, and error messages."""

import json

import pytest
import torch
import transformers
from tiny_backbones import close

from timm_backbone import (
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerModel,
    SwinConfig,
    TimmBackboneConfig,
)
from timm_backbone.auto import CONFIG_MAPPING, AutoConfig, _ensure_builtins
from timm_backbone.models.maskformer.loss import average_num_masks

_ensure_builtins()
HAS_RESNET = "resnet" in CONFIG_MAPPING
needs_resnet = pytest.mark.skipif(not HAS_RESNET, reason="native ResNet not available")

DECODER = dict(d_model=32, decoder_layers=2, num_queries=10, decoder_attention_heads=2, decoder_ffn_dim=64, dropout=0.0)
HEADS = dict(decoder_config=DECODER, fpn_feature_size=32, mask_feature_size=32, num_labels=5)
STAGES = ["stage1", "stage2", "stage3", "stage4"]
SIZE = 64


def _hf_backbone(kind: str):
    if kind == "swin":
        return transformers.SwinConfig(
            embed_dim=16,
            depths=[1, 1, 2, 1],
            num_heads=[1, 2, 2, 4],
            window_size=4,
            image_size=SIZE,
            out_features=STAGES,
        )
    if kind == "resnet":
        return transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=STAGES
        )
    return transformers.TimmBackboneConfig(
        backbone="test_resnet", out_indices=[1, 2, 3, 4], use_pretrained_backbone=False
    )


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial values in every parameter (norms start at one/zero); buffers keep their valid values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") or ".1.weight" in name else 0.0, 0.1)


def _hf_model(kind: str, **overrides) -> transformers.MaskFormerForInstanceSegmentation:
    torch.manual_seed(0)
    config = transformers.MaskFormerConfig(backbone_config=_hf_backbone(kind), **{**HEADS, **overrides})
    model = transformers.MaskFormerForInstanceSegmentation(config).eval()
    _randomise(model)
    return model


KINDS = ["timm", "swin", pytest.param("resnet", marks=needs_resnet)]


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """A random transformers MaskFormer with the given backbone, saved to a folder: (model, folder)."""
    model = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(folder)
    return model, folder


def _labels(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(3, SIZE, SIZE, generator=g) > 0.5).float(), torch.zeros(0, SIZE, SIZE)]
    classes = [torch.tensor([0, 4, 2]), torch.zeros(0, dtype=torch.long)]
    return masks, classes


# parity --------------------------------------------------------------------------------------------------------------
def test_forward_parity_with_transformers(saved):
    hf, folder = saved
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    assert ours.load_report.ok, str(ours.load_report)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        actual = ours(x, output_hidden_states=True)
    assert actual.class_queries_logits.shape == (2, 10, 6)
    assert actual.masks_queries_logits.shape == (2, 10, SIZE // 4, SIZE // 4)
    for name in ("class_queries_logits", "masks_queries_logits", "transformer_decoder_last_hidden_state"):
        close(actual[name], expected[name])
    for name in ("encoder_hidden_states", "pixel_decoder_hidden_states", "transformer_decoder_hidden_states"):
        assert len(actual[name]) == len(expected[name])
        for a, e in zip(actual[name], expected[name]):
            close(a, e)


def test_winograd_pixel_decoder_keeps_parity(tmp_path, winograd_calls):
    """At transformers' default widths (256) the pixel decoder's 3x3 convolutions on the finest map run as Winograd
    F(2x2, 3x3) in inference; the outputs stay at transformers' numbers, with and without optimize_for_inference."""
    hf = _hf_model("timm", fpn_feature_size=256, mask_feature_size=256)
    hf.save_pretrained(tmp_path)
    ours = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path).eval()
    size = 2 * SIZE  # the finest map 32 x 32: big enough for Winograd at 256 channels, the next one (16 x 16) not
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        actual = ours(x, output_hidden_states=True)
        assert winograd_calls == [(2, 256, size // 4, size // 4)] * 2  # the FPN's last block and the mask projection
        for name in ("masks_queries_logits", "class_queries_logits", "pixel_decoder_last_hidden_state"):
            close(actual[name], expected[name], 1e-5)
        close(actual.pixel_decoder_hidden_states, expected.pixel_decoder_hidden_states, 1e-5)
        # the maps Winograd made are NCHW-shaped in channels-last memory (documented)
        assert actual.pixel_decoder_last_hidden_state.is_contiguous(memory_format=torch.channels_last)
        fast = ours.optimize_for_inference()(x)
        assert len(winograd_calls) == 3  # the FPN's last block; the mask projection is folded into the query embeddings
        close(fast.masks_queries_logits, expected.masks_queries_logits, 1e-5)
        plain = ours.optimize_for_inference(False)(x)
    assert len(winograd_calls) == 3  # off: the direct convolution everywhere
    close(plain.masks_queries_logits, expected.masks_queries_logits, 1e-5)
    assert plain.pixel_decoder_last_hidden_state.is_contiguous()


def test_loss_parity_with_transformers(saved):
    hf, folder = saved
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    x = torch.randn(2, 3, SIZE, SIZE)
    masks, classes = _labels()
    with torch.no_grad():
        expected = hf(x, mask_labels=masks, class_labels=classes)
        actual = ours(x, mask_labels=masks, class_labels=classes)
    close(actual.loss, expected.loss)
    e = hf.get_loss_dict(expected.masks_queries_logits, expected.class_queries_logits, masks, classes, None)
    a = ours.get_loss_dict(actual.masks_queries_logits, actual.class_queries_logits, masks, classes, None)
    assert set(a) == set(e) == {"loss_cross_entropy", "loss_mask", "loss_dice"}
    for key in e:
        close(a[key], e[key])


def test_auxiliary_loss_parity(tmp_path):
    hf = _hf_model("timm", use_auxiliary_loss=True, output_auxiliary_logits=True)
    hf.save_pretrained(tmp_path)
    ours = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path).train()
    hf.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    masks, classes = _labels(1)
    # transformers needs output_hidden_states=True for its auxiliary logits; ours does not
    expected = hf(x, mask_labels=masks, class_labels=classes, output_hidden_states=True)
    actual = ours(x, mask_labels=masks, class_labels=classes)
    close(actual.loss, expected.loss)
    assert len(actual.auxiliary_logits) == len(expected.auxiliary_logits) == 2
    for a, e in zip(actual.auxiliary_logits, expected.auxiliary_logits):
        close(a["masks_queries_logits"], e["masks_queries_logits"])
    actual.loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_attentions_match_transformers(saved):
    _, folder = saved
    hf = transformers.MaskFormerForInstanceSegmentation.from_pretrained(folder, attn_implementation="eager").eval()
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf(x, output_attentions=True).attentions
        actual = ours(x, output_attentions=True).attentions
    assert len(actual) == len(expected) == DECODER["decoder_layers"]
    for a, e in zip(actual, expected):
        assert a.shape == (1, DECODER["decoder_attention_heads"], DECODER["num_queries"], DECODER["num_queries"])
        close(a, e)


def test_model_without_heads_loads_task_checkpoint(saved):
    hf, folder = saved
    model = MaskFormerModel.from_pretrained(folder)
    assert model.load_report.ok, str(model.load_report)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf.model(x)
        actual = model(x)
    close(actual.pixel_decoder_last_hidden_state, expected.pixel_decoder_last_hidden_state)
    close(actual.transformer_decoder_last_hidden_state, expected.transformer_decoder_last_hidden_state)


def test_tuple_output_matches_transformers_order(saved):
    hf, folder = saved
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf(x, return_dict=False)
        actual = ours(x, return_dict=False)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        close(a, e)


# checkpoints and configs ------------------------------------------------------------------------------------------
def test_transformers_loads_what_we_save(saved, tmp_path):
    _, folder = saved
    ours = MaskFormerForInstanceSegmentation.from_pretrained(folder)
    ours.save_pretrained(tmp_path)
    hf, info = transformers.MaskFormerForInstanceSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        close(ours(x).masks_queries_logits, hf.eval()(x).masks_queries_logits)


@pytest.mark.parametrize("kind", ["swin", "timm", pytest.param("resnet", marks=needs_resnet)])
def test_native_config_saves_for_transformers(kind, tmp_path):
    if kind == "swin":
        backbone = SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, image_size=SIZE)
    elif kind == "resnet":
        backbone = AutoConfig.for_model("resnet", embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    else:
        backbone = TimmBackboneConfig("test_resnet")
    model = MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=backbone, **HEADS)).eval()
    model.save_pretrained(tmp_path)
    hf, info = transformers.MaskFormerForInstanceSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        close(model(x).masks_queries_logits, hf.eval()(x).masks_queries_logits)


def test_config_json_round_trip(saved, tmp_path):
    _, folder = saved
    theirs = json.loads((folder / "config.json").read_text())
    config = MaskFormerConfig.from_pretrained(folder)
    assert config.decoder_config["d_model"] == 32 and config.num_queries == 10 and config.num_labels == 5
    assert config.backbone_config.out_indices == [1, 2, 3, 4]
    config.save_pretrained(tmp_path)
    ours = json.loads((tmp_path / "config.json").read_text())
    for key in ("fpn_feature_size", "mask_feature_size", "no_object_weight", "mask_weight", "id2label", "model_type"):
        assert ours[key] == theirs[key]
    assert ours["decoder_config"]["num_queries"] == theirs["decoder_config"]["num_queries"]
    assert ours["num_attention_heads"] == theirs["num_attention_heads"]
    assert MaskFormerConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    reloaded = transformers.MaskFormerConfig.from_pretrained(tmp_path)
    assert reloaded.decoder_config.d_model == 32 and reloaded.backbone_config.out_indices == [1, 2, 3, 4]
    assert AutoConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_legacy_config_json_loads(tmp_path):
    """A transformers 4.x MaskFormer config.json (abridged from facebook/maskformer-swin-base-ade)."""
    legacy = {
        "architectures": ["MaskFormerForInstanceSegmentation"],
        "backbone_config": {
            "model_type": "swin", "depths": [2, 2, 18, 2], "embed_dim": 128, "num_heads": [4, 8, 16, 32],
            "window_size": 12, "image_size": 384, "drop_path_rate": 0.3, "path_norm": True,
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
        },
        "ce_weight": 1.0, "cross_entropy_weight": 1.0, "dice_weight": 1.0, "mask_weight": 20.0,
        "decoder_config": {"model_type": "detr", "backbone": "resnet50", "use_timm_backbone": True, "d_model": 256},
        "fpn_feature_size": 256, "mask_feature_size": 256, "no_object_weight": 0.1, "num_queries": 100,
        "id2label": {"0": "wall", "1": "building"}, "model_type": "maskformer", "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0", "use_auxiliary_loss": False,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MaskFormerConfig) and isinstance(config.backbone_config, SwinConfig)
    assert config.id2label == {0: "wall", 1: "building"} and config.num_queries == 100
    assert config.backbone_config.out_indices == [1, 2, 3, 4] and config.backbone_config.depths == [2, 2, 18, 2]
    assert config.ce_weight == 1.0 and config.decoder_config["backbone"] == "resnet50"  # unknown keys kept
    config.save_pretrained(tmp_path / "again")
    assert transformers.MaskFormerConfig.from_pretrained(tmp_path / "again").backbone_config.embed_dim == 128


def test_default_config_is_swin_base_384():
    config = MaskFormerConfig()
    backbone = config.backbone_config
    assert isinstance(backbone, SwinConfig)
    assert (backbone.embed_dim, backbone.depths, backbone.window_size, backbone.image_size) == (
        128,
        [2, 2, 18, 2],
        12,
        384,
    )
    assert backbone.out_features == STAGES
    assert config.decoder_config["d_model"] == 256 and config.num_queries == 100
    assert config.decoder_config["decoder_layers"] == 6


# backbones and stage selection ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone, expected",
    [
        (TimmBackboneConfig("test_resnet"), ["layer1", "layer2", "layer3", "layer4"]),
        (TimmBackboneConfig("test_resnet", out_indices=[2, 3, 4]), ["layer2", "layer3", "layer4"]),
        (SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4), ["stage1", "stage2"]),
        (
            SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, out_indices=[1, 2]),
            ["stage1", "stage2"],
        ),
    ],
)
def test_backbone_stages_and_decoder_sizing(backbone, expected):
    model = MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=backbone, **HEADS)).eval()
    encoder = model.backbone
    assert encoder.out_features == expected
    assert model.config.backbone_config.out_features == expected
    fpn = model.model.pixel_level_module.decoder.fpn
    assert fpn.stem[0].in_channels == encoder.channels[-1]
    assert [layer.proj[0].in_channels for layer in fpn.layers] == encoder.channels[-2::-1]
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE))
    assert out.masks_queries_logits.shape[-2:] == (SIZE // encoder.strides[0], SIZE // encoder.strides[0])


def test_timm_backbone_by_name_and_nhwc_swin():
    config = MaskFormerConfig(backbone="test_resnet", use_timm_backbone=True, **HEADS)
    assert isinstance(config.backbone_config, TimmBackboneConfig) and config.backbone is None
    # timm's Swin returns NHWC maps: the backbone contract hands MaskFormer NCHW
    swin = TimmBackboneConfig(
        "swin_tiny_patch4_window7_224",
        model_args=dict(img_size=SIZE, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
    )
    model = MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=swin, **HEADS)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE))
    assert out.masks_queries_logits.shape == (1, 10, SIZE // 4, SIZE // 4)


def test_single_scale_backbone_runs():
    vit = TimmBackboneConfig("test_vit", model_args=dict(img_size=SIZE))
    model = MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=vit, **HEADS)).eval()
    assert model.backbone.out_indices == [len(model.backbone.stage_names) - 1]  # all stride 16: the last one
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE))
    assert out.masks_queries_logits.shape == (1, 10, SIZE // 16, SIZE // 16)


@needs_resnet
def test_default_resnet_config_end_to_end():
    """transformers crashes here (a default ResNetConfig outputs one map); MaskFormer asks for stage1..stage4."""
    backbone = AutoConfig.for_model("resnet", depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], embedding_size=8)
    config = MaskFormerConfig(backbone_config=backbone, **HEADS)
    model = MaskFormerForInstanceSegmentation(config)
    assert model.backbone.out_features == STAGES
    masks, classes = _labels()
    out = model(torch.randn(2, 3, SIZE, SIZE), mask_labels=masks, class_labels=classes)
    assert out.masks_queries_logits.shape == (2, 10, SIZE // 4, SIZE // 4)
    out.loss.backward()
    assert torch.isfinite(out.loss)


# loss edge cases and errors ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return MaskFormerForInstanceSegmentation(
        MaskFormerConfig(backbone_config=TimmBackboneConfig("test_resnet"), **HEADS)
    )


def test_images_without_instances_train(small_model):
    x = torch.randn(2, 3, SIZE, SIZE)
    masks = [torch.zeros(0, SIZE, SIZE)] * 2
    classes = [torch.zeros(0, dtype=torch.long)] * 2
    small_model.zero_grad()
    out = small_model(x, mask_labels=masks, class_labels=classes)
    assert torch.isfinite(out.loss) and out.loss > 0  # every query must predict "no object"
    out.loss.backward()
    assert all(p.grad is not None for p in small_model.parameters())
    assert float(average_num_masks(classes, torch.device("cpu"))) == 1.0


@pytest.mark.parametrize(
    "masks, classes, error, match",
    [
        ([torch.zeros(1, SIZE, SIZE)], [torch.tensor([5])], ValueError, r"outside \[0, 5\)"),
        ([torch.zeros(1, SIZE, SIZE)], [torch.tensor([-1])], ValueError, r"outside \[0, 5\)"),
        ([torch.zeros(1, 32, 32)], [torch.tensor([1])], ValueError, r"masks of size \(32, 32\), but the images"),
        ([torch.zeros(2, SIZE, SIZE)], [torch.tensor([1])], ValueError, r"one mask per class label"),
        ([torch.zeros(1, SIZE, SIZE)] * 2, [torch.tensor([1])] * 2, ValueError, r"has 2 entries but the batch has 1"),
        ([torch.zeros(1, SIZE, SIZE)], [torch.tensor([1.0])], ValueError, r"1-D integer tensor"),
        ([torch.zeros(1, SIZE, SIZE)], None, ValueError, r"give both mask_labels and class_labels"),
    ],
)
def test_label_errors(small_model, masks, classes, error, match):
    with pytest.raises(error, match=match):
        small_model(torch.randn(1, 3, SIZE, SIZE), mask_labels=masks, class_labels=classes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(backbone="test_resnet", backbone_config=TimmBackboneConfig("test_resnet")),
            "either backbone_config or backbone",
        ),
        (dict(fpn_feature_size=48), "multiple of 32"),
        (dict(decoder_config=dict(d_model=30, decoder_attention_heads=4)), "divisible by decoder_attention_heads"),
        (dict(decoder_config=dict(model_type="deformable_detr")), "must be 'detr'"),
        (dict(backbone_config={"model_type": "nope"}), "not one of"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskFormerConfig(**kwargs)


def test_config_type_error():
    with pytest.raises(TypeError, match="backbone_config must be a backbone config"):
        MaskFormerConfig(backbone_config=42)


@pytest.mark.parametrize("kind", ["timm", pytest.param("resnet", marks=needs_resnet)])
def test_optimize_for_inference_agrees_with_plain_forward(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    plain = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path)
    fast = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path).optimize_for_inference()
    x = torch.randn(2, 3, SIZE, SIZE)
    masks, classes = _labels()
    with torch.no_grad():
        expected = plain(x, mask_labels=masks, class_labels=classes)
        actual = fast(x, mask_labels=masks, class_labels=classes)
    assert actual.pixel_decoder_last_hidden_state is None  # skipped on the fast path
    close(actual.masks_queries_logits, expected.masks_queries_logits)
    close(actual.class_queries_logits, expected.class_queries_logits)
    close(actual.loss, expected.loss)
    # with autograd on, or when hidden states are asked for, the plain path runs
    assert fast(x).pixel_decoder_last_hidden_state is not None
    with torch.no_grad():
        assert fast(x, output_hidden_states=True).pixel_decoder_last_hidden_state is not None
    assert fast.optimize_for_inference(False)._fast_path is False


@needs_resnet
def test_seed_example_word_for_word(tmp_path, monkeypatch):
    """The three backbone swaps of the README, with microsoft/resnet-50 served from a hub-shaped cache."""
    from hub_cache import make_hub_cache, use_hub_cache

    from timm_backbone import ResNetConfig

    classifier = transformers.ResNetConfig(depths=[1, 1, 1, 1], num_labels=3)  # a classification config.json
    classifier.save_pretrained(tmp_path / "src")
    make_hub_cache(tmp_path / "hub", "microsoft/resnet-50", tmp_path / "src")
    use_hub_cache(monkeypatch, tmp_path / "hub")
    small = dict(decoder_config=dict(DECODER, num_queries=5), fpn_feature_size=32, mask_feature_size=32)
    for backbone_config, stages in (
        (ResNetConfig.from_pretrained("microsoft/resnet-50"), STAGES),
        (ResNetConfig(depths=[1, 1, 1, 1]), STAGES),
        (TimmBackboneConfig("resnet50"), ["layer1", "layer2", "layer3", "layer4"]),
    ):
        config = MaskFormerConfig(backbone_config=backbone_config, **small)
        model = MaskFormerForInstanceSegmentation(config).eval()
        assert model.backbone.out_features == stages
        assert model.model.pixel_level_module.decoder.fpn.stem[0].in_channels == model.backbone.channels[-1] == 2048
        with torch.no_grad():
            out = model(torch.randn(1, 3, SIZE, SIZE))
        assert out.class_queries_logits.shape == (1, 5, config.num_labels + 1)
        assert out.masks_queries_logits.shape == (1, 5, SIZE // 4, SIZE // 4)
