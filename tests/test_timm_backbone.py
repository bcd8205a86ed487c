"""TimmBackbone against bare timm ``features_only`` (and transformers' TimmBackbone) on the same weights."""

import json

import pytest
import timm
import torch
from tiny_backbones import write_timm_repo

from timm_backbone import TimmBackbone, TimmBackboneConfig

# name -> (timm kwargs that keep the model small, input size); at least ten families, every wrapper kind
FAMILIES = {
    "resnet18": ({}, 64),  # FeatureListNet
    "regnetx_002": ({}, 64),
    "convnext_atto": ({}, 64),
    "mobilenetv3_small_100": ({}, 64),  # MobileNetV3Features
    "efficientnet_b0": ({}, 64),  # EfficientNetFeatures
    "dla34": ({}, 64),
    "repvit_m1": ({}, 64),
    "swin_tiny_patch4_window7_224": (
        {"img_size": 64, "window_size": 2, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
        64,
    ),  # NHWC
    "swinv2_cr_tiny_ns_224": (
        {"img_size": 64, "window_size": 2, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
        64,
    ),
    "mambaout_femto": ({"depths": (1, 1, 1, 1)}, 64),  # NHWC
    "vit_tiny_patch16_224": ({"img_size": 64, "depth": 4}, 64),  # FeatureGetterNet
    "eva02_tiny_patch14_224": ({"img_size": 56, "depth": 3}, 56),  # FeatureGetterNet, rope
    "pvt_v2_b0": ({}, 64),
}


def build(name, out_indices=None, **extra):
    kwargs, size = FAMILIES[name]
    model = TimmBackbone(TimmBackboneConfig(name, out_indices=out_indices, **kwargs, **extra)).eval()
    return model, size


def bare_timm(name, model):
    """timm's own feature extractor for the same stages, carrying our weights."""
    kwargs, _ = FAMILIES[name]
    ref = timm.create_model(name, features_only=True, out_indices=tuple(model.out_indices), **kwargs).eval()
    ref.load_state_dict(model._backbone.state_dict(), strict=True)
    return ref


def to_nchw(t, nhwc):
    return t.permute(0, 3, 1, 2) if nhwc else t


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_matches_bare_timm_features_only(name):
    model, size = build(name)
    n = len(model.stage_names)
    model.config.out_indices = [1, n - 1]  # validate through the config; rebuild to hold those stages
    model, _ = build(name, out_indices=[1, n - 1])
    ref = bare_timm(name, model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model(x).feature_maps
        theirs = ref(x)
    nhwc = str(getattr(ref, "output_fmt", "NCHW")).endswith("NHWC")
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, to_nchw(b, nhwc), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_channels_and_strides_describe_real_outputs(name):
    model, size = build(name, out_indices=None)
    n = len(model.stage_names)
    model, _ = build(name, out_indices=list(range(n)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), output_hidden_states=True)
    assert model.stage_names == [d["module"] for d in model._backbone.feature_info.info]
    assert len(out.feature_maps) == n == len(out.hidden_states) == len(model.channels)
    for fmap, hidden, channels, stride in zip(out.feature_maps, out.hidden_states, model.channels, model.strides):
        assert fmap.dim() == 4 and fmap.shape[1] == channels
        assert fmap.shape[-2:] == (size // stride, size // stride)
        assert fmap is hidden or torch.equal(fmap, hidden)


def test_default_selection_is_last_stage_and_known_before_forward():
    model, _ = build("resnet18")
    assert model.out_indices == [4] and model.out_features == ["layer4"]
    assert model.channels == [512] and model.strides == [32]
    assert model.num_features == [64, 64, 128, 256, 512]
    assert model.output_shape() == {"layer4": {"channels": 512, "stride": 32}}


def test_out_features_select_by_timm_module_name():
    model, _ = build("resnet18", out_features=["layer2", "layer3"])
    assert model.out_indices == [2, 3] and model.channels == [128, 256]
    model, _ = build("vit_tiny_patch16_224", out_features=["blocks.1", "blocks.3"])
    assert model.out_indices == [1, 3]


def test_negative_indices_are_stored_normalised():
    model, _ = build("resnet18", out_indices=(-2, -1))
    assert model.config.out_indices == [3, 4] and model.config.out_features == ["layer3", "layer4"]


def test_stages_after_the_deepest_cost_nothing():
    shallow, _ = build("resnet18", out_indices=[1])
    full, _ = build("resnet18", out_indices=[4])
    assert not any(k.startswith("layer4") or k.startswith("layer2") for k in shallow._backbone.state_dict())
    assert shallow.num_parameters() < full.num_parameters() / 10
    getter, _ = build("vit_tiny_patch16_224", out_indices=[1])
    assert len(getter._backbone.model.blocks) == 2


def test_getter_model_hidden_states_cover_held_blocks():
    model, size = build("vit_tiny_patch16_224", out_indices=[1, 3])
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), output_hidden_states=True)
        plain = model(torch.randn(1, 3, size, size))
    assert len(out.hidden_states) == 4 and len(plain.feature_maps) == 2 and plain.hidden_states is None
    torch.testing.assert_close(out.hidden_states[3], out.feature_maps[1])


def test_return_dict_false_gives_tuple():
    model, size = build("resnet18", out_indices=[2, 4])
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and len(out[0]) == 2


def test_attentions_are_refused():
    model, size = build("resnet18")
    with pytest.raises(ValueError, match="cannot return attentions"):
        model(torch.randn(1, 3, size, size), output_attentions=True)


def test_num_channels_and_input_checks():
    model = TimmBackbone(TimmBackboneConfig("resnet18", num_channels=1)).eval()
    assert model(torch.randn(1, 1, 64, 64)).feature_maps[0].shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match="pixel_values has 3 channels but the backbone expects 1"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="must be a 4-D batch"):
        model(torch.randn(1, 64, 64))
    with pytest.raises(TypeError, match="must be a floating point tensor"):
        model(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))


def test_freeze_batch_norm():
    model, _ = build("resnet18", freeze_batch_norm_2d=True)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FrozenBatchNorm2d" in kinds and "BatchNorm2d" not in kinds


def test_timm_kwargs_reach_create_model():
    model = TimmBackbone(TimmBackboneConfig("resnet18", output_stride=16, out_indices=[4], drop_path_rate=0.1))
    assert model.strides == [16] and model.config.model_args == {"drop_path_rate": 0.1}
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).feature_maps[0].shape[-1] == 4


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown timm model 'resnt18'; close matches: resnet18"):
        TimmBackbone(TimmBackboneConfig("resnt18"))


def test_missing_backbone_name():
    with pytest.raises(ValueError, match="needs a backbone"):
        TimmBackbone(TimmBackboneConfig())


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_save_and_reload_offline_identical(tmp_path, name):
    model, size = build(name, out_indices=[-2, -1])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "timm_backbone" and saved["backbone"] == name
    assert saved["out_indices"] == model.out_indices and saved["stage_names"] == model.stage_names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = TimmBackbone.from_pretrained(tmp_path)
    assert reloaded.load_report.ok and reloaded.out_indices == model.out_indices
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for a, b in zip(model(x).feature_maps, reloaded(x).feature_maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reload_with_other_selection(tmp_path):
    model, size = build("resnet18", out_indices=[1, 2, 3, 4])
    model.save_pretrained(tmp_path)
    shallow = TimmBackbone.from_pretrained(tmp_path, out_indices=[1, 2])
    assert shallow.out_features == ["layer1", "layer2"]
    # the deeper stages of the file are reported as unused, not dropped silently
    assert shallow.load_report.unexpected_keys and all(
        "layer3" in k or "layer4" in k for k in shallow.load_report.unexpected_keys
    )
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(shallow(x).feature_maps[1], model(x).feature_maps[1])


def _timm_repo(folder, name="resnet18", **kwargs):
    """A timm hub repo on disk holding the full classifier's weights."""
    net = timm.create_model(name, **kwargs).eval()
    write_timm_repo(folder, name, net.state_dict(), num_classes=net.num_classes, num_features=net.num_features)
    return net


def test_loads_timm_repo_folder(tmp_path):
    net = _timm_repo(tmp_path / "repo")
    model = TimmBackbone.from_pretrained(tmp_path / "repo", out_indices=[2, 4])
    ref = timm.create_model("resnet18", features_only=True, out_indices=(2, 4)).eval()
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x).feature_maps, ref(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loads_timm_weights_file_and_refuses_without_name(tmp_path):
    from safetensors.torch import save_file

    net = timm.create_model("resnet18").eval()
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    torch.save(net.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="needs backbone="):
        TimmBackbone.from_pretrained(tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net.forward_features(x)
        for file in ("w.safetensors", "w.pth"):
            model = TimmBackbone.from_pretrained(tmp_path / file, backbone="resnet18")
            torch.testing.assert_close(model(x).feature_maps[0], expected, rtol=0, atol=0)


def test_timm_name_resolves_from_hub_cache_offline(tmp_path):
    from hub_cache import make_hub_cache

    net = _timm_repo(tmp_path / "repo")
    make_hub_cache(tmp_path / "cache", "timm/resnet18.a1_in1k", tmp_path / "repo")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net.forward_features(x)
        for src in ("resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k"):
            model = TimmBackbone.from_pretrained(src, cache_dir=tmp_path / "cache")
            torch.testing.assert_close(model(x).feature_maps[0], expected, rtol=0, atol=0)


def test_timm_name_not_cached_offline_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match=r"resnet18.a1_in1k.*is not in the hub cache.*hub access is off"):
        TimmBackbone.from_pretrained("resnet18.a1_in1k", cache_dir=tmp_path)


def test_transformers_timm_backbone_same_outputs_and_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours, _ = build("resnet18", out_indices=[1, 2, 3, 4])
    config = transformers.TimmBackboneConfig(
        backbone="resnet18", out_indices=[1, 2, 3, 4], use_pretrained_backbone=False
    )
    theirs = transformers.TimmBackbone(config).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours(x).feature_maps, theirs(x).feature_maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # transformers reads our files (its 5.x TimmBackbone.from_pretrained takes only timm names, so the folder is
    # read through its config class and a strict state-dict load), and we read its folder
    from safetensors.torch import load_file

    ours.save_pretrained(tmp_path / "ours")
    their_config = transformers.TimmBackboneConfig.from_pretrained(tmp_path / "ours")
    assert their_config.out_indices == [1, 2, 3, 4] and their_config.backbone == "resnet18"
    their_config.use_pretrained_backbone = False
    loaded = transformers.TimmBackbone(their_config).eval()
    loaded.load_state_dict(load_file(tmp_path / "ours" / "model.safetensors"), strict=True)
    theirs.save_pretrained(tmp_path / "theirs")
    back = TimmBackbone.from_pretrained(tmp_path / "theirs")
    assert back.load_report.ok and back.out_indices == [1, 2, 3, 4]
    with torch.no_grad():
        for a, b, c in zip(ours(x).feature_maps, loaded(x).feature_maps, back(x).feature_maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_nhwc_model_under_transformers_stays_nhwc_but_ours_is_nchw():
    transformers = pytest.importorskip("transformers")
    kwargs, size = FAMILIES["swin_tiny_patch4_window7_224"]
    ours, _ = build("swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3])
    config = transformers.TimmBackboneConfig(
        backbone="swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3], use_pretrained_backbone=False
    )
    theirs = transformers.TimmBackbone(config, **kwargs).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        for a, b, channels in zip(ours(x).feature_maps, theirs(x).feature_maps, ours.channels):
            assert a.shape[1] == channels and b.shape[-1] == channels  # transformers passes NHWC through
            torch.testing.assert_close(a, b.permute(0, 3, 1, 2), rtol=0, atol=0)
