"""Checkpoint conversion between timm's and transformers' layouts: round trips to identical tensors and outputs."""

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_backbones import perturb_norms

from timm_backbone import TimmBackbone
from timm_backbone.benchmark import random_timm_state_dict
from timm_backbone.cli import main
from timm_backbone.convert import convert_checkpoint, detect_layout, timm_architecture, to_transformers
from timm_backbone.models.resnet import ResNetBackbone, ResNetConfig
from timm_backbone.models.swin import SwinBackbone, SwinConfig

SIZE = 64
# tiny timm models: (architecture, model args, transformers class, native backbone class)
TIMM_CASES = {
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=2, img_size=SIZE),
        "SwinForImageClassification",
        SwinBackbone,
    ),
    "resnet_basic": ("resnet18", dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64]), "ResNetForImageClassification",
                     ResNetBackbone),
    "resnet_bottleneck": ("resnet50", dict(layers=[1, 2, 1, 1], channels=[8, 16, 32, 64]),
                          "ResNetForImageClassification", ResNetBackbone),
}  # fmt: skip
# tiny transformers models: config class name and fields
TRANSFORMERS_CASES = {
    "swin": ("SwinConfig", dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=2,
                                image_size=SIZE, num_labels=3)),
    "swin_no_head": ("SwinConfig", dict(embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4,
                                        image_size=SIZE)),
    "resnet": ("ResNetConfig", dict(embedding_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                    layer_type="bottleneck", num_labels=4)),
}  # fmt: skip


def _timm_folder(tmp_path, case):
    arch, args, _, _ = TIMM_CASES[case]
    state_dict = random_timm_state_dict(arch, 0, num_classes=5, **args)
    folder = tmp_path / f"{case}-timm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 5, "model_args": args}))
    save_file(state_dict, folder / "model.safetensors")
    model = timm.create_model(arch, num_classes=5, **args).eval()
    model.load_state_dict(state_dict)
    return folder, state_dict, model


def _timm_from_folder(folder):
    config = json.loads((folder / "config.json").read_text())
    overlay = dict(file=str(folder / "model.safetensors"), num_classes=config["num_classes"])
    return timm.create_model(
        config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=config["num_classes"],
        **config.get("model_args", {}),
    ).eval()  # fmt: skip


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_round_trip(tmp_path, case):
    folder, state_dict, reference = _timm_folder(tmp_path, case)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    result = convert_checkpoint(folder, tmp_path / "hf")
    assert (result.source_layout, result.target_layout) == ("timm", "transformers")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == [TIMM_CASES[case][2]] and len(hf_config["id2label"]) == 5

    with torch.no_grad():
        expected = reference(pixels)
        hf = getattr(transformers, TIMM_CASES[case][2]).from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(pixels).logits, expected, atol=1e-5, rtol=1e-5)
        # our native backbone reads the converted folder; its stage outputs equal timm's
        native = TIMM_CASES[case][3].from_pretrained(tmp_path / "hf", out_indices=[-1])
        assert all(k.startswith("hidden_states_norms.") for k in native.load_report.missing_keys)
        timm_backbone = TimmBackbone.from_pretrained(folder, out_indices=[-1])
        timm_last = timm_backbone(pixels).feature_maps[0]
        native_last = native(pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(native_last, timm_last, atol=1e-5, rtol=1e-5)

    back = convert_checkpoint(tmp_path / "hf", tmp_path / "back")
    assert (back.source_layout, back.target_layout) == ("transformers", "timm")
    _assert_same_tensors(load_file(tmp_path / "back" / "model.safetensors"), state_dict)
    timm_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert timm_config["architecture"] == TIMM_CASES[case][0] and timm_config["num_classes"] == 5
    with torch.no_grad():
        assert torch.equal(_timm_from_folder(tmp_path / "back")(pixels), expected)


@pytest.mark.parametrize("case", list(TRANSFORMERS_CASES))
def test_transformers_round_trip(tmp_path, case):
    config_name, fields = TRANSFORMERS_CASES[case]
    config = getattr(transformers, config_name)(**fields)
    family = "swin" if config_name == "SwinConfig" else "resnet"
    task = (TIMM_CASES["swin"] if family == "swin" else TIMM_CASES["resnet_basic"])[2]
    model_class = getattr(
        transformers, task if "num_labels" in fields else task.replace("ForImageClassification", "Model")
    )
    model = perturb_norms(model_class(config))
    model.save_pretrained(tmp_path / "hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    pixels = torch.randn(2, 3, SIZE, SIZE)

    result = convert_checkpoint(tmp_path / "hf", tmp_path / "timm")
    assert result.family == family and result.target_layout == "timm"
    timm_model = _timm_from_folder(tmp_path / "timm")
    with torch.no_grad():
        out = model(pixels)
        if "num_labels" in fields:
            torch.testing.assert_close(timm_model(pixels), out.logits, atol=1e-5, rtol=1e-5)
        else:  # no head: compare the final normalised tokens
            tokens = timm_model.forward_features(pixels).flatten(1, 2)
            torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-5, rtol=1e-5)

    convert_checkpoint(tmp_path / "timm", tmp_path / "back")
    _assert_same_tensors(load_file(tmp_path / "back" / "model.safetensors"), original)
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key, value in fields.items():
        assert back_config.get(key, len(back_config["id2label"])) == value, key
    reloaded = model_class.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        first, second = reloaded(pixels), out
        name = "logits" if "num_labels" in fields else "last_hidden_state"
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_native_backbone_checkpoint_to_timm_gets_identity_norm(tmp_path):
    backbone = perturb_norms(SwinBackbone(SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2,
                                                image_size=SIZE, out_indices=[1, 2])))  # fmt: skip
    backbone.save_pretrained(tmp_path / "native")
    result = convert_checkpoint(tmp_path / "native", tmp_path / "timm")
    assert any("identity" in note for note in result.notes)
    timm_model = _timm_from_folder(tmp_path / "timm")
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        timm_stage = timm_model.forward_intermediates(pixels, indices=[1], intermediates_only=True)[0]
        native_stage = backbone(pixels, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(timm_stage, native_stage, atol=1e-5, rtol=1e-5)


def test_weights_files(tmp_path):
    arch, args, _, _ = TIMM_CASES["resnet_basic"]
    state_dict = random_timm_state_dict(arch, 0, **args)
    save_file(state_dict, tmp_path / "w.safetensors")
    convert_checkpoint(tmp_path / "w.safetensors", tmp_path / "out.safetensors")
    _assert_same_tensors(load_file(tmp_path / "out.safetensors"), to_transformers(state_dict, "resnet"))
    with pytest.raises(ValueError, match=r"needs the model's config.*pass --arch"):
        convert_checkpoint(tmp_path / "w.safetensors", tmp_path / "folder")
    result = convert_checkpoint(tmp_path / "w.safetensors", tmp_path / "folder", architecture="resnet18")
    assert result.architecture == "resnet18"
    hf_config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert hf_config["depths"] == [2, 2, 2, 2] and hf_config["model_type"] == "resnet"
    # the weights file holds a (1,1,1,1) model: the resnet18 config does not fit it
    with pytest.raises(ValueError, match=r"mismatched shapes|does not fit"):
        ResNetBackbone.from_pretrained(tmp_path / "folder")
    with pytest.raises(ValueError, match="to must be one of"):
        convert_checkpoint(tmp_path / "w.safetensors", tmp_path / "x.safetensors", to="onnx")


@pytest.mark.parametrize(
    "config, expected",
    [
        (SwinConfig(), ("swin_tiny_patch4_window7_224", {})),
        (SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384),
         ("swin_base_patch4_window12_384", {})),
        (ResNetConfig(), ("resnet50", {})),
        (ResNetConfig(layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3]), ("resnet34", {})),
        (ResNetConfig(depths=[1, 1, 1, 1], num_channels=1), ("resnet50", {"layers": (1, 1, 1, 1), "in_chans": 1})),
    ],
)  # fmt: skip
def test_timm_architecture(config, expected):
    assert timm_architecture(config) == expected


@pytest.mark.parametrize(
    "config, match",
    [
        (ResNetConfig(downsample_in_bottleneck=True), "downsample_in_bottleneck"),
        (ResNetConfig(embedding_size=32), "embedding_size"),
        (SwinConfig(use_absolute_embeddings=True), "absolute position embeddings"),
    ],
)
def test_timm_architecture_errors(config, match):
    with pytest.raises(ValueError, match=match):
        timm_architecture(config)


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["patch_embed.proj.weight", "layers.0.blocks.0.norm1.weight"], ("swin", "timm")),
        (["swin.embeddings.patch_embeddings.projection.weight"], ("swin", "transformers")),
        (["conv1.weight", "layer1.0.conv1.weight"], ("resnet", "timm")),
        (["resnet.embedder.embedder.convolution.weight"], ("resnet", "transformers")),
    ],
)
def test_detect_layout(keys, expected):
    assert detect_layout(dict.fromkeys(keys)) == expected


def test_detect_layout_error():
    with pytest.raises(ValueError, match=r"not a checkpoint of \['resnet', 'swin'\]"):
        detect_layout({"blocks.0.attn.qkv.weight": None})


def test_cli_convert(tmp_path, capsys):
    folder, state_dict, _ = _timm_folder(tmp_path, "resnet_basic")
    assert main(["convert", str(folder), str(tmp_path / "hf")]) == 0
    assert "timm -> transformers" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 0
    _assert_same_tensors(load_file(tmp_path / "t.safetensors"), state_dict)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "timm-backbone convert: error:" in capsys.readouterr().err


def test_cached_hub_repo_with_bin_weights(tmp_path, monkeypatch):
    from hub_cache import make_hub_cache, use_hub_cache

    arch, args, _, _ = TIMM_CASES["resnet_basic"]
    state_dict = random_timm_state_dict(arch, 1, num_classes=5, **args)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 5, "model_args": args}))
    torch.save(state_dict, repo / "pytorch_model.bin")
    use_hub_cache(monkeypatch, tmp_path / "hub")
    make_hub_cache(tmp_path / "hub", "timm/resnet-tiny", repo)
    result = convert_checkpoint("timm/resnet-tiny", tmp_path / "hf")
    assert (result.family, result.source_layout, result.architecture) == ("resnet", "timm", "resnet18")
    _assert_same_tensors(load_file(tmp_path / "hf" / "model.safetensors"), to_transformers(state_dict, "resnet"))
