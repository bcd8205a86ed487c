"""Native ResNet: parity with transformers, timm and torchvision on the same weights, checkpoint layouts, frozen
BatchNorm, the inference path and errors."""

import copy
import json
import pickle

import pytest
import timm
import torch
import torchvision
import transformers
from safetensors.torch import save_file
from tiny_backbones import close, perturb_norms, write_timm_repo

from timm_backbone import AutoBackbone, AutoConfig, ResNetBackbone, ResNetConfig
from timm_backbone.layers import FrozenBatchNorm2d
from timm_backbone.models.resnet import resnet_timm_to_transformers, resnet_transformers_to_timm

TINY = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")
TINY_BOTTLENECK = dict(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1])
ALL = [0, 1, 2, 3, 4]


def _hf(tmp_path, cls=transformers.ResNetBackbone, **fields):
    config = transformers.ResNetConfig(**fields)
    model = cls(config).eval()
    perturb_norms(model)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    ("fields", "size"),
    [
        (TINY, (32, 32)),
        (TINY, (33, 47)),
        ({**TINY, "downsample_in_first_stage": True, "hidden_act": "gelu"}, (37, 65)),
        (TINY_BOTTLENECK, (64, 41)),
        ({**TINY_BOTTLENECK, "downsample_in_bottleneck": True}, (45, 45)),
        ({**TINY_BOTTLENECK, "downsample_in_first_stage": True, "downsample_in_bottleneck": True}, (65, 33)),
    ],
)
def test_parity_with_transformers_backbone(tmp_path, fields, size):
    reference = _hf(tmp_path, out_indices=ALL, **fields)
    model = ResNetBackbone.from_pretrained(tmp_path)
    assert model.load_report.ok, model.load_report
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference(x, output_hidden_states=True)
        actual = model(x, output_hidden_states=True)
        fused = model.optimize_for_inference()(x, output_hidden_states=True)
    assert len(actual.hidden_states) == len(expected.hidden_states) == 5
    assert all(f.is_contiguous() for f in actual.feature_maps + actual.hidden_states)  # computed channels_last
    for a, f, e in zip(actual.feature_maps + actual.hidden_states, fused.feature_maps, expected.feature_maps):
        close(a, e)
        close(f, e)
    # channels and strides describe the real outputs
    assert [f.shape[1] for f in actual.feature_maps] == model.channels == reference.channels
    assert [f.shape[-2] for f in actual.feature_maps] == [-(-size[0] // s) for s in model.strides]


@pytest.mark.parametrize("layout", ["model", "classification", "legacy_bin"])
def test_loads_transformers_model_and_classification_checkpoints(tmp_path, layout):
    cls = transformers.ResNetForImageClassification if layout == "classification" else transformers.ResNetModel
    reference = _hf(tmp_path, cls=cls, **TINY_BOTTLENECK)
    if layout == "legacy_bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model = ResNetBackbone.from_pretrained(tmp_path, out_indices=ALL)
    assert model.load_report.missing_keys == [] and model.load_report.unexpected_keys == []
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        base = reference.resnet if layout == "classification" else reference
        expected = base(x, output_hidden_states=True).hidden_states
        actual = model(x).feature_maps
    for a, e in zip(actual, expected):
        close(a, e)


def test_saved_files_load_in_transformers(tmp_path):
    model = ResNetBackbone(ResNetConfig(**TINY_BOTTLENECK, out_features=["stage2", "stage4"])).eval()
    perturb_norms(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "resnet" and saved["stage_names"] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    reference = transformers.ResNetBackbone.from_pretrained(tmp_path).eval()
    assert reference.out_features == ["stage2", "stage4"]
    x = torch.randn(2, 3, 35, 50)
    with torch.no_grad():
        for a, e in zip(model(x).feature_maps, reference(x).feature_maps):
            close(a, e)
    # and back, through the Auto classes
    again = AutoBackbone.from_pretrained(tmp_path)
    assert isinstance(again, ResNetBackbone) and again.out_indices == [2, 4]
    assert AutoConfig.from_pretrained(tmp_path) == model.config


def test_config_fields_and_resnet50_shapes():
    config = ResNetConfig(out_indices=ALL, stage_names=["ignored"])
    reference = transformers.ResNetConfig()
    for field in ("num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act",
                  "downsample_in_first_stage", "downsample_in_bottleneck"):  # fmt: skip
        expected = getattr(reference, field)
        assert getattr(config, field) == (list(expected) if isinstance(expected, tuple) else expected), field
    model = ResNetBackbone(config)
    assert model.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert model.channels == [64, 256, 512, 1024, 2048]
    assert model.strides == [4, 4, 8, 16, 32]
    assert ResNetConfig.from_dict(config.to_dict()) == config


def _timm_reference(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """timm's feature extractor (act1, layer1..4) and its weights as a full checkpoint (with the classifier)."""
    model = timm.create_model(name, features_only=True).eval()
    perturb_norms(model)
    width = model.feature_info.channels()[-1]
    return model, {**model.state_dict(), "fc.weight": torch.randn(1000, width), "fc.bias": torch.randn(1000)}


@pytest.mark.parametrize("name", ["resnet18", "resnet26"])
def test_stage_outputs_equal_timm_features(name):
    reference, weights = _timm_reference(name)
    model = ResNetBackbone(ResNetConfig.from_timm(f"{name}.a1_in1k", out_indices=ALL)).eval()
    report = model.load_checkpoint(weights, strict=True)
    assert report.ok
    x = torch.randn(2, 3, 64, 57)
    with torch.no_grad():
        expected = reference(x)  # act1 (stride 2), layer1..4
        actual = model(x).feature_maps
    close(actual[0], torch.nn.functional.max_pool2d(expected[0], 3, 2, 1))
    for a, e in zip(actual[1:], expected[1:]):
        close(a, e)


def test_loads_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet18(weights=None).eval()
    perturb_norms(reference)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = ResNetBackbone.from_pretrained(tmp_path / "resnet18.pth", config=ResNetConfig.from_timm("resnet18"),
                                           out_indices=[1, 2, 3, 4])  # fmt: skip
    assert model.load_report.ok, model.load_report  # fc is a known classifier key, not reported
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            h = layer(h)
            expected.append(h)
        for a, e in zip(model(x).feature_maps, expected):
            close(a, e)


def test_key_mappings_round_trip():
    _, weights = _timm_reference("resnet18")
    converted = resnet_timm_to_transformers(weights)
    reference = transformers.ResNetModel(transformers.ResNetConfig(**ResNetConfig.timm_fields("resnet18")))
    assert set(converted) - {"classifier.1.weight", "classifier.1.bias"} == set(reference.state_dict())
    back = resnet_transformers_to_timm({("resnet." + k if not k.startswith("classifier") else k): v
                                        for k, v in converted.items()})  # fmt: skip
    assert back.keys() == weights.keys()
    assert all(back[k] is weights[k] for k in weights)
    # DDP's "module." and checkpoint wrappers are unwrapped
    wrapped = {"state_dict": {"module." + k: v for k, v in weights.items()}}
    assert resnet_timm_to_transformers(wrapped).keys() == converted.keys()


def _timm_repo(folder, arch: str = "resnet18.a1_in1k") -> torch.nn.Module:
    reference, weights = _timm_reference(arch.split(".")[0])
    write_timm_repo(folder, arch, weights, num_classes=1000, num_features=512, global_pool="avg")
    return reference


def test_timm_hub_repo_folder_and_name(tmp_path):
    from hub_cache import make_hub_cache

    reference = _timm_repo(tmp_path / "repo")
    config = ResNetConfig.from_timm(tmp_path / "repo")
    assert (config.layer_type, config.depths, config.hidden_sizes) == ("basic", [2, 2, 2, 2], [64, 128, 256, 512])
    assert ResNetConfig.from_timm(json.loads((tmp_path / "repo" / "config.json").read_text())) == config
    x = torch.randn(1, 3, 64, 64)
    make_hub_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", tmp_path / "repo")
    for src in (tmp_path / "repo", "resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k"):
        model = ResNetBackbone.from_pretrained(src, cache_dir=tmp_path / "hub")
        assert model.load_report.ok, (src, model.load_report)
        with torch.no_grad():
            close(model(x).feature_maps[-1], reference(x)[-1])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ResNetConfig.from_timm("resnet50d"), ValueError, r"not a plain ResNet.*resnet18"),
        (lambda: ResNetBackbone.from_pretrained("wide_resnet50_2"), ValueError, r"not a plain ResNet.*TimmBackbone"),
        (
            lambda: ResNetConfig.from_timm({"architecture": "resnet50", "model_args": {"output_stride": 16}}),
            ValueError,
            r"\['output_stride'\] change the architecture.*in_chans",
        ),
        (lambda: ResNetConfig(layer_type="basic_block"), ValueError, r"layer_type must be one of \('basic'"),
        (lambda: ResNetConfig(hidden_sizes=[8, 16], depths=[1]), ValueError, r"equal length"),
        (lambda: ResNetConfig.from_timm({"model_type": "resnet"}), ValueError, r"no 'architecture'"),
        (lambda: ResNetBackbone(ResNetConfig(**TINY, hidden_act="relu7")), ValueError, r"unknown activation"),
    ],
)
def test_config_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_input_and_loading_errors(tmp_path):
    model = ResNetBackbone(ResNetConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=r"has 1 channels but the backbone expects 3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="no attention"):
        model(torch.randn(1, 3, 32, 32), output_attentions=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match=r"needs config=.*from_timm"):
        ResNetBackbone.from_pretrained(tmp_path / "weights.safetensors")
    wrong = {k: v for k, v in model.state_dict().items()}
    wrong["embedder.embedder.convolution.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match="mismatched shapes"):
        model.load_checkpoint(wrong)


def test_frozen_batch_norm(tmp_path):
    reference = _hf(tmp_path, out_indices=ALL, **TINY_BOTTLENECK)
    model = ResNetBackbone.from_pretrained(tmp_path, freeze_batch_norm_2d=True)
    assert model.load_report.ok
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20  # stem, 4 shortcuts, 5 blocks of 3
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all("normalization" not in name for name, _ in model.named_parameters())
    model.train()
    x = torch.randn(2, 3, 40, 40)
    out = model(x).feature_maps
    sum(f.sum() for f in out).backward()
    assert model.embedder.embedder.convolution.weight.grad is not None
    with torch.no_grad():
        for a, e in zip(out, reference(x).feature_maps):  # statistics unchanged by the training-mode pass
            close(a, e)


def test_inference_path_is_reversible_and_follows_weight_changes():
    model = ResNetBackbone(ResNetConfig(**TINY_BOTTLENECK, out_indices=ALL)).eval()
    perturb_norms(model)
    x = torch.randn(2, 3, 48, 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x).feature_maps
        model.optimize_for_inference()
        for a, e in zip(model(x).feature_maps, plain):
            close(a, e)
        assert model._plan is not None
        other = torch.randn(1, 3, 35, 61)  # weights were packed for the first shape; other shapes still match
        for a, e in zip(model(other).feature_maps, model.optimize_for_inference(False)(other).feature_maps):
            close(a, e)
        model.optimize_for_inference()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        # new weights are re-folded on the next call
        perturb_norms(model, seed=1)
        replot = ResNetBackbone(model.config).eval()
        replot.load_state_dict(model.state_dict())
        for a, e in zip(model(x).feature_maps, replot(x).feature_maps):
            close(a, e)
        # copies and pickles carry no packed tensors and rebuild the plan
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            for a, e in zip(clone(x).feature_maps, replot(x).feature_maps):
                close(a, e)
        model.optimize_for_inference(False)
        assert model._plan is None
        for a, e in zip(model(x).feature_maps, replot(x).feature_maps):
            close(a, e, tol=0)
    # with autograd on, the plain modules run and gradients reach the parameters
    out = model(x).feature_maps[-1]
    out.sum().backward()
    assert model.encoder.stages[3].layers[0].layer[0].convolution.weight.grad is not None


def test_only_requested_stages_run():
    model = ResNetBackbone(ResNetConfig(**TINY, out_indices=[1, 2])).eval()
    calls = []
    for i, stage in enumerate(model.encoder.stages):
        stage.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
        assert len(out.feature_maps) == 2 and calls == [0, 1]
        calls.clear()
        out = model(torch.randn(1, 3, 32, 32), output_hidden_states=True, return_dict=False)
    assert calls == [0, 1, 2, 3] and len(out) == 2 and len(out[1]) == 5
    # stages after the deepest one have no trainable parameters (DDP needs no find_unused_parameters)
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder")}
    assert trainable == {"0", "1"}


@pytest.mark.parametrize("frozen", [False, True])
def test_in_place_batch_norm_matches_module_path(frozen):
    """Eval mode without autograd scales the conv outputs in place; with autograd the BatchNorm modules run."""
    model = ResNetBackbone(ResNetConfig(**TINY_BOTTLENECK, out_indices=ALL, freeze_batch_norm_2d=frozen)).eval()
    perturb_norms(model)
    if frozen:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, FrozenBatchNorm2d):
                    module.running_var.uniform_(0.5, 1.5)
                    module.bias.normal_(0, 0.1)
        model.train()  # frozen statistics: training mode computes the same
    x = torch.randn(2, 3, 37, 41)
    with torch.no_grad():
        in_place = model(x, output_hidden_states=True).hidden_states
    with_modules = model(x, output_hidden_states=True).hidden_states
    for a, e in zip(in_place, with_modules):
        close(a, e.detach())


@pytest.mark.slow
def test_resnet50_full_size_parity(tmp_path):
    """Full-size resnet-50 at 224: transformers, timm and the inference path on the same weights."""
    reference = _hf(tmp_path, out_indices=ALL)
    model = ResNetBackbone.from_pretrained(tmp_path)
    timm_model = timm.create_model("resnet50", features_only=True).eval()
    timm_model.load_state_dict(resnet_transformers_to_timm(model.state_dict()))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x).feature_maps
        plain = model(x).feature_maps
        fused = model.optimize_for_inference()(x).feature_maps
        from_timm = timm_model(x)[1:]
    assert [list(f.shape[1:]) for f in plain] == [[64, 56, 56], [256, 56, 56], [512, 28, 28], [1024, 14, 14],
                                                  [2048, 7, 7]]  # fmt: skip
    for e, *others in zip(expected, plain, fused, [expected[0], *from_timm]):
        for a in others:
            assert float((a - e).abs().max() / e.abs().max()) < 1e-4
