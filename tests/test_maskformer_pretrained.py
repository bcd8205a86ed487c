"""MaskFormer with a pretrained backbone (timm tags, hub ids, backbone_config), and the fine-tuning controls passed
through to its backbone."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from hub_cache import make_hub_cache, use_hub_cache
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from tiny_backbones import BACKBONES, RESNET_FIELDS, build
from torch import nn

from timm_backbone import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig, TimmBackboneConfig

DECODER = dict(d_model=32, decoder_layers=1, num_queries=5, decoder_attention_heads=2, decoder_ffn_dim=32, dropout=0.0)
HEADS = dict(decoder_config=DECODER, fpn_feature_size=32, mask_feature_size=32, num_labels=3)
TAG = "test_resnet.r160_in1k"


def _timm_cache(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """The hub cache holding timm's repo for ``TAG`` (random weights), as the default cache; returns its weights."""
    net = timm.create_model("test_resnet").eval()
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": net.num_classes}))
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(weights, repo / "model.safetensors")
    make_hub_cache(tmp_path / "hub", f"timm/{TAG}", repo)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    return weights


def _transformers_resnet(folder) -> dict[str, torch.Tensor]:
    """A tiny transformers ResNetForImageClassification saved to ``folder``; returns its file's weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(**RESNET_FIELDS, num_labels=7)
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def _assert_backbone_holds(model, weights: dict[str, torch.Tensor], rename) -> None:
    """Every backbone parameter and buffer equals the file's tensor, bit for bit."""
    state = model.backbone.state_dict()
    names = {rename(k): k for k in state}
    assert names.keys() <= weights.keys()
    for theirs, ours in names.items():
        assert torch.equal(state[ours], weights[theirs]), ours


def test_timm_tag_loads_pretrained_weights_offline(tmp_path, monkeypatch):
    weights = _timm_cache(tmp_path, monkeypatch)
    config = MaskFormerConfig(backbone=TAG, use_timm_backbone=True, use_pretrained_backbone=True, **HEADS)
    model = MaskFormerForInstanceSegmentation(config)
    assert model.training and model.backbone.training
    names = model.backbone.timm_parameter_names()
    buffers = {k: k[len("_backbone.") :] for k in model.backbone.state_dict() if k not in names}
    _assert_backbone_holds(model, weights, lambda k: names.get(k) or buffers[k])
    report = model.backbone_load_report
    assert report.source.endswith("model.safetensors") and not report.missing_keys and not report.unexpected_keys
    assert set(report.loaded_keys) == set(model.backbone.state_dict())


def test_hub_id_of_a_classification_model_loads_its_backbone(tmp_path, monkeypatch):
    weights = _transformers_resnet(tmp_path / "src")
    make_hub_cache(tmp_path / "hub", "org/tiny-resnet", tmp_path / "src")
    use_hub_cache(monkeypatch, tmp_path / "hub")
    torch.manual_seed(0)
    controls = {"frozen_stages": 1, "norm_eval": True}
    model = MaskFormerForInstanceSegmentation(
        MaskFormerConfig(backbone="org/tiny-resnet", use_pretrained_backbone=True, backbone_kwargs=controls, **HEADS)
    )
    assert not any(p.requires_grad for p in model.backbone.encoder.stages[0].parameters())
    assert model.backbone.encoder.stages[1].layers[0].layer[0].normalization.training is False
    _assert_backbone_holds(model, weights, lambda k: "resnet." + k)
    report = model.backbone_load_report
    assert report.ok  # the classifier is ignored: ResNetBackbone.ignore_unexpected
    assert set(report.loaded_keys) == set(model.backbone.state_dict())
    # the head stays random: the same as without pretrained weights under the same seed
    torch.manual_seed(0)
    random = MaskFormerForInstanceSegmentation(
        MaskFormerConfig(backbone="org/tiny-resnet", backbone_kwargs=controls, **HEADS)
    )
    assert random.backbone_load_report is None
    for (name, a), b in zip(model.named_parameters(), random.parameters()):
        if not name.startswith("model.pixel_level_module.encoder."):
            assert torch.equal(a, b), name


def test_pretrained_backbone_comes_from_the_revision_and_cache_its_config_came_from(tmp_path, monkeypatch):
    """backbone_kwargs' hub arguments reach the weights too: a config read at revision v2 from a cache folder given
    by cache_dir gets v2's weights from that folder (not main's, not the default cache)."""
    torch.manual_seed(0)
    main = _transformers_resnet(tmp_path / "main")
    torch.manual_seed(1)
    v2 = _transformers_resnet(tmp_path / "v2")
    assert not torch.equal(main["resnet.embedder.embedder.convolution.weight"],
                           v2["resnet.embedder.embedder.convolution.weight"])  # fmt: skip
    cache = tmp_path / "own-cache"
    make_hub_cache(cache, "org/tiny-resnet", tmp_path / "main")
    make_hub_cache(cache, "org/tiny-resnet", tmp_path / "v2", revision="v2")
    use_hub_cache(monkeypatch, tmp_path / "default-cache")  # offline, and not where the repo is
    for revision, weights in (("v2", v2), (None, main)):
        hub = {"cache_dir": str(cache), **({"revision": revision} if revision else {})}
        config = MaskFormerConfig(
            backbone="org/tiny-resnet", use_pretrained_backbone=True, backbone_kwargs=hub, **HEADS
        )
        _assert_backbone_holds(MaskFormerForInstanceSegmentation(config), weights, lambda k: "resnet." + k)
    # a backbone_config read from that revision carries it along too; config.json keeps none of it
    backbone_config = ResNetConfig.from_pretrained("org/tiny-resnet", revision="v2", cache_dir=cache)
    model = MaskFormerForInstanceSegmentation(
        MaskFormerConfig(backbone_config=backbone_config, use_pretrained_backbone=True, **HEADS)
    )
    _assert_backbone_holds(model, v2, lambda k: "resnet." + k)
    assert not {"revision", "cache_dir", "_source_kwargs"} & set(backbone_config.to_dict())


def test_backbone_config_loads_from_its_source(tmp_path):
    weights = _transformers_resnet(tmp_path / "src")
    backbone_config = ResNetConfig.from_pretrained(tmp_path / "src", frozen_stages=0)
    config = MaskFormerConfig(backbone_config=backbone_config, use_pretrained_backbone=True, **HEADS)
    model = MaskFormerForInstanceSegmentation(config)
    _assert_backbone_holds(model, weights, lambda k: "resnet." + k)
    assert not any(p.requires_grad for p in model.backbone.embedder.parameters())


def test_timm_backbone_config_loads_its_timm_name(tmp_path, monkeypatch):
    weights = _timm_cache(tmp_path, monkeypatch)
    config = MaskFormerConfig(backbone_config=TimmBackboneConfig(TAG), use_pretrained_backbone=True, **HEADS)
    model = MaskFormerForInstanceSegmentation(config)
    names = model.backbone.timm_parameter_names()
    for ours, param in model.backbone.named_parameters():
        assert torch.equal(param, weights[names[ours]]), ours


def test_saved_model_reloads_without_the_backbone_source(tmp_path, monkeypatch):
    _transformers_resnet(tmp_path / "src")
    make_hub_cache(tmp_path / "hub", "org/tiny-resnet", tmp_path / "src")
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    config = MaskFormerConfig(backbone="org/tiny-resnet", use_pretrained_backbone=True, **HEADS)
    model = MaskFormerForInstanceSegmentation(config).eval()
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["use_pretrained_backbone"] is False
    assert model.config.use_pretrained_backbone is True  # the in-memory config is the user's
    for path in sorted(cache.rglob("*"), reverse=True):  # the source is gone
        path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
    reloaded = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path / "saved")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    # a config that still asks for the pretrained backbone: from_pretrained takes it from the checkpoint
    flagged = copy.deepcopy(reloaded.config)
    flagged.use_pretrained_backbone = True
    again = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path / "saved", config=flagged)
    assert torch.equal(
        again.backbone.embedder.embedder.convolution.weight, model.backbone.embedder.embedder.convolution.weight
    )


def test_pretrained_backbone_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty")
    config = MaskFormerConfig(backbone=TAG, use_timm_backbone=True, use_pretrained_backbone=True, **HEADS)
    with pytest.raises(OSError, match=r"test_resnet.r160_in1k.*is not in the hub cache"):
        MaskFormerForInstanceSegmentation(config)


def test_pretrained_backbone_without_a_source_is_a_clear_error():
    config = MaskFormerConfig(backbone_config=ResNetConfig(**RESNET_FIELDS), use_pretrained_backbone=True, **HEADS)
    with pytest.raises(ValueError, match=r"does not say where its weights are.*ResNetConfig.from_pretrained"):
        MaskFormerForInstanceSegmentation(config)


# controls passed through --------------------------------------------------------------------------------------------
def _maskformer(name: str, **controls) -> MaskFormerForInstanceSegmentation:
    backbone_config = copy.deepcopy(build(name).config)
    for key, value in controls.items():
        setattr(backbone_config, key, value)
    return MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=backbone_config, **HEADS))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_frozen_stages_and_norm_eval_pass_through(name):
    model = _maskformer(name, frozen_stages=0, norm_eval=True).train()
    backbone = model.backbone
    assert backbone.config.frozen_stages == 0
    frozen = {id(p) for p in backbone.stage_parameters(0)}
    assert frozen and all(not p.requires_grad for p in backbone.stage_parameters(0))
    assert all(p.requires_grad for p in backbone.stage_parameters(max(backbone.out_indices)) if id(p) not in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "encoder." not in n)
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not any(m.training for m in norms)
    assert all(m.training for m in model.model.pixel_level_module.decoder.modules())


@pytest.mark.parametrize("name", ["resnet", "timm-list"])  # every backbone: test_fine_tuning
def test_maskformer_gradient_checkpointing_same_gradients(name):
    model = _maskformer(name).train()
    x = torch.randn(1, 3, 64, 64)

    def grads():
        model.zero_grad()
        torch.manual_seed(0)
        out = model(x)
        (out.class_queries_logits.pow(2).mean() + out.masks_queries_logits.pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert any(getattr(m, "grad_checkpointing", False) for m in model.backbone.modules())
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    assert not any(getattr(m, "grad_checkpointing", False) for m in model.backbone.modules())


@pytest.mark.parametrize("name", list(BACKBONES))
def test_maskformer_layer_decay_puts_the_head_last(name):
    model = _maskformer(name)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    backbone = model.backbone
    alone = param_groups_layer_decay(backbone, weight_decay=0.05, layer_decay=0.75)
    for group in alone:
        for param in group["params"]:  # one more group above the backbone's: its scales times the decay
            assert scale[id(param)] == pytest.approx(group["lr_scale"] * 0.75)
    head = [p for n, p in model.named_parameters() if "encoder." not in n and p.requires_grad]
    assert head and all(scale[id(p)] == 1.0 for p in head)
    assert {f"model.pixel_level_module.encoder.{n}" for n in backbone.no_weight_decay()} == model.no_weight_decay()


@pytest.mark.parametrize("channels", [1, 4])
def test_maskformer_checkpoint_loads_with_other_num_channels(channels, tmp_path):
    from timm.models import adapt_input_conv

    model = _maskformer("resnet")
    model.save_pretrained(tmp_path)
    config = MaskFormerConfig.from_pretrained(tmp_path)
    config.backbone_config.num_channels = channels
    loaded = MaskFormerForInstanceSegmentation.from_pretrained(tmp_path, config=config)
    key = "model.pixel_level_module.encoder.embedder.embedder.convolution.weight"
    expected = adapt_input_conv(channels, model.state_dict()[key])
    torch.testing.assert_close(loaded.state_dict()[key], expected, rtol=0, atol=0)
    assert loaded.load_report.ok
    assert loaded(torch.randn(1, channels, 64, 64)).class_queries_logits.shape == (1, 5, 4)
