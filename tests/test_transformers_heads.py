"""This package's backbones inside transformers' heads (Mask2Former, UperNet, MaskFormer, DPT) through
``timm_backbone.integrations.transformers``: a training step, an eval forward, and a save_pretrained /
from_pretrained round trip that rebuilds our backbone with identical outputs."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_backbones import RESNET_FIELDS, SWIN_FIELDS

from timm_backbone import ResNetBackbone, ResNetConfig, SwinBackbone, SwinConfig, TimmBackbone, TimmBackboneConfig
from timm_backbone.integrations.transformers import (
    MODEL_TYPE,
    BackboneAdapter,
    BackboneAdapterConfig,
    as_transformers_config,
)

SIZE = 64
STAGES = ["stage1", "stage2", "stage3", "stage4"]
TIMM_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4, img_size=SIZE)

# name -> (our backbone config, the class of the backbone it builds)
BACKBONES = {
    "timm-cnn": (lambda: TimmBackboneConfig("test_resnet", out_indices=(1, 2, 3, 4)), TimmBackbone),
    "timm-swin": (
        lambda: TimmBackboneConfig("swin_tiny_patch4_window7_224", out_indices=(0, 1, 2, 3), model_args=TIMM_SWIN),
        TimmBackbone,
    ),
    "timm-vit-pyramid": (
        lambda: TimmBackboneConfig("test_vit", feature_pyramid="simple", feature_pyramid_channels=32),
        TimmBackbone,
    ),
    "swin": (lambda: SwinConfig(**SWIN_FIELDS, out_features=STAGES), SwinBackbone),
    "resnet": (lambda: ResNetConfig(**RESNET_FIELDS, out_features=STAGES), ResNetBackbone),
}

QUERY_HEAD = dict(num_labels=3)
MASK2FORMER = dict(
    feature_size=32,
    mask_feature_size=32,
    hidden_dim=32,
    encoder_feedforward_dim=32,
    dim_feedforward=32,
    encoder_layers=1,
    decoder_layers=2,
    num_attention_heads=2,
    num_queries=5,
    train_num_points=64,
)
DETR = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_queries=5,
)


def _mask_labels(batch: int) -> dict:
    masks = torch.zeros(1, SIZE, SIZE)
    masks[:, : SIZE // 2] = 1
    return dict(mask_labels=[masks] * batch, class_labels=[torch.tensor([1])] * batch)


# head name -> (model class, config builder, labels builder, output read in eval)
HEADS = {
    "mask2former": (
        transformers.Mask2FormerForUniversalSegmentation,
        lambda bc: transformers.Mask2FormerConfig(backbone_config=bc, **MASK2FORMER, **QUERY_HEAD),
        _mask_labels,
        "masks_queries_logits",
    ),
    "upernet": (
        transformers.UperNetForSemanticSegmentation,
        lambda bc: transformers.UperNetConfig(backbone_config=bc, hidden_size=16, auxiliary_channels=8, **QUERY_HEAD),
        lambda batch: dict(labels=torch.randint(0, 3, (batch, SIZE, SIZE))),
        "logits",
    ),
    "maskformer": (
        transformers.MaskFormerForInstanceSegmentation,
        lambda bc: transformers.MaskFormerConfig(
            backbone_config=bc, decoder_config=DETR, fpn_feature_size=32, mask_feature_size=32, **QUERY_HEAD
        ),
        _mask_labels,
        "masks_queries_logits",
    ),
}
# every head, and each kind of backbone, by default; the rest of the matrix in the slow run
FAST = {
    ("mask2former", "timm-vit-pyramid"),
    ("mask2former", "timm-swin"),
    ("upernet", "timm-cnn"),
    ("maskformer", "swin"),
    ("upernet", "resnet"),
}
MATRIX = [
    pytest.param(head, backbone, marks=() if (head, backbone) in FAST else pytest.mark.slow)
    for head in HEADS
    for backbone in BACKBONES
]


def _backbone_of(model: torch.nn.Module) -> BackboneAdapter:
    adapters = [m for m in model.modules() if isinstance(m, BackboneAdapter)]
    assert len(adapters) == 1
    return adapters[0]


def _train_eval_round_trip(model_class, config, labels, read, backbone_class, tmp_path, size=SIZE):
    torch.manual_seed(0)
    model = model_class(config).train()
    adapter = _backbone_of(model)
    assert isinstance(adapter.model, backbone_class)
    pixel_values = torch.randn(2, 3, size, size)
    out = model(pixel_values, **labels(2))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in adapter.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        before = getattr(model(pixel_values), read)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["backbone_config"]
    assert saved["model_type"] == MODEL_TYPE and saved["backbone_model_type"] == adapter.model.config.model_type
    reloaded = model_class.from_pretrained(tmp_path).eval()
    assert isinstance(_backbone_of(reloaded).model, backbone_class)
    with torch.no_grad():
        torch.testing.assert_close(getattr(reloaded(pixel_values), read), before)
    return before


@pytest.mark.parametrize("head, backbone", MATRIX)
def test_head_trains_evaluates_and_round_trips(head, backbone, tmp_path):
    model_class, make_config, labels, read = HEADS[head]
    our_config, backbone_class = BACKBONES[backbone]
    output = _train_eval_round_trip(
        model_class, make_config(as_transformers_config(our_config())), labels, read, backbone_class, tmp_path
    )
    if read == "masks_queries_logits":
        assert output.shape == (2, 5, SIZE // 4, SIZE // 4)  # masks at 1/4, from the stride-4 level
    else:
        assert output.shape == (2, 3, SIZE, SIZE)


def test_timm_swin_maps_reach_the_head_as_nchw():
    """timm's Swin computes NHWC maps; the head receives NCHW with the channels it was sized for."""
    config = as_transformers_config(BACKBONES["timm-swin"][0]())
    adapter = transformers.AutoBackbone.from_config(config).eval()
    assert adapter.model._nhwc
    with torch.no_grad():
        maps = adapter(torch.randn(1, 3, SIZE, SIZE)).feature_maps
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, SIZE // s, SIZE // s) for c, s in zip(adapter.channels, adapter.strides)
    ]
    assert adapter.channels == [16, 32, 64, 128]


@pytest.mark.parametrize("backbone", ["timm-cnn", pytest.param("resnet", marks=pytest.mark.slow)])
def test_dpt_hybrid_segmentation_over_a_cnn(backbone, tmp_path):
    """DPT-hybrid: the CNN's first two maps feed the neck directly, the third DPT's own ViT."""
    backbone_class = BACKBONES[backbone][1]
    if backbone == "timm-cnn":
        config = TimmBackboneConfig("test_resnet", out_indices=(1, 2, 3))
    else:
        config = ResNetConfig(**RESNET_FIELDS, out_features=STAGES[:3])
    with torch.device("meta"):
        probe = backbone_class(config)
    c1, c2, c3 = probe.channels
    dpt = transformers.DPTConfig(
        backbone_config=as_transformers_config(config),
        is_hybrid=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=SIZE,
        backbone_featmap_shape=[1, c3, SIZE // 16, SIZE // 16],
        neck_hidden_sizes=[c1, c2, 32, 32],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 0, 1],
        num_labels=3,
    )
    labels = lambda batch: dict(labels=torch.randint(0, 3, (batch, SIZE, SIZE)))  # noqa: E731
    logits = _train_eval_round_trip(
        transformers.DPTForSemanticSegmentation, dpt, labels, "logits", backbone_class, tmp_path
    )
    assert logits.shape == (2, 3, SIZE, SIZE)


def test_dpt_depth_over_a_vits_tokens(tmp_path):
    """DPT reads ViT maps as token sequences with the class token first (token_feature_maps=True); its own neck
    resamples them to four scales, so no pyramid is used."""
    torch.manual_seed(0)
    ours = TimmBackboneConfig("test_vit", out_indices=(1, 2, 4, 5), output_prefix_tokens=True)
    backbone_config = as_transformers_config(ours, token_feature_maps=True)
    assert backbone_config.patch_size == 16 and backbone_config.hidden_size == 64
    config = transformers.DPTConfig(
        backbone_config=backbone_config,
        hidden_size=64,
        neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32,
        head_hidden_size=16,
    )
    model = transformers.DPTForDepthEstimation(config).train()
    pixel_values = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = model.backbone(pixel_values).feature_maps
        ours_out = model.backbone.model(pixel_values)
    assert tokens[0].shape == (2, 1 + (SIZE // 16) ** 2, 64)
    torch.testing.assert_close(tokens[0][:, 0], ours_out.prefix_tokens[0][:, 0])
    torch.testing.assert_close(tokens[0][:, 1:], ours_out.feature_maps[0].flatten(2).transpose(1, 2))
    # transformers' DPT has no depth loss: a training step on the prediction
    model(pixel_values).predicted_depth.mean().backward()
    assert model.backbone.model._backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = model(pixel_values).predicted_depth
    assert before.shape == (2, SIZE, SIZE)
    model.save_pretrained(tmp_path)
    reloaded = transformers.DPTForDepthEstimation.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.backbone.model, TimmBackbone) and reloaded.config.backbone_config.token_feature_maps
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).predicted_depth, before)


def test_token_maps_need_prefix_tokens():
    with pytest.raises(ValueError, match=r"token_feature_maps=True.*needs output_prefix_tokens=True"):
        as_transformers_config(TimmBackboneConfig("test_resnet"), token_feature_maps=True)


def test_only_our_backbone_configs_are_wrapped():
    with pytest.raises(TypeError, match=r"takes a backbone config of timm_backbone.*got SwinConfig"):
        as_transformers_config(transformers.SwinConfig())


def test_adapter_config_reloads_our_config_and_selection(tmp_path):
    config = as_transformers_config(SwinConfig(**SWIN_FIELDS, out_indices=(2, 4)))
    config.save_pretrained(tmp_path)
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, BackboneAdapterConfig)
    assert reloaded.to_backbone_config() == config.to_backbone_config()
    assert reloaded.out_features == ["stage2", "stage4"] and reloaded.out_indices == [2, 4]
    adapter = transformers.AutoBackbone.from_config(reloaded)
    assert adapter.out_features == ["stage2", "stage4"] and adapter.channels == adapter.model.channels
    assert adapter.forward_with_filtered_kwargs(torch.randn(1, 3, 32, 32), unknown=1).feature_maps[1].shape[1] == 128


def _depth_anything() -> torch.Tensor:
    backbone = as_transformers_config(
        TimmBackboneConfig("test_vit", out_indices=(1, 2, 4, 5), output_prefix_tokens=True), token_feature_maps=True
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=64,
        neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=16,
    )
    return transformers.DepthAnythingForDepthEstimation(config).eval()(torch.randn(1, 3, SIZE, SIZE)).predicted_depth


def _oneformer() -> torch.Tensor:
    config = transformers.OneFormerConfig(
        backbone_config=as_transformers_config(BACKBONES["timm-cnn"][0]()),
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        conv_dim=32,
        mask_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=6,
        text_encoder_width=32,
        text_encoder_num_layers=1,
        num_labels=3,
    )
    model = transformers.OneFormerForUniversalSegmentation(config).eval()
    return model(torch.randn(1, 3, SIZE, SIZE), task_inputs=torch.randint(0, 10, (1, 77))).masks_queries_logits


def _detr() -> torch.Tensor:
    config = transformers.DetrConfig(
        use_timm_backbone=False,
        backbone_config=as_transformers_config(TimmBackboneConfig("test_resnet", out_indices=(4,))),
        **DETR,
    )
    return transformers.DetrForObjectDetection(config).eval()(torch.randn(1, 3, SIZE, SIZE)).pred_boxes


@pytest.mark.slow
@pytest.mark.parametrize(
    "build, shape",
    [(_depth_anything, (1, SIZE, SIZE)), (_oneformer, (1, 6, SIZE // 4, SIZE // 4)), (_detr, (1, 5, 4))],
)
def test_other_heads_run_an_eval_forward(build, shape):
    """Further heads that build their backbone with load_backbone: Depth Anything (ViT tokens), OneFormer, DETR."""
    torch.manual_seed(0)
    with torch.no_grad():
        output = build()
    assert output.shape == shape and torch.isfinite(output).all()


def test_the_package_never_imports_transformers():
    code = "import sys, timm_backbone, timm_backbone.necks; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
