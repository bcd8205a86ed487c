"""Fine-tuning controls on every backbone: frozen_stages / freeze_stages, norm_eval, gradient checkpointing, timm's
layer-wise learning-rate decay, input-channel adaptation on load, and ResNet's output_stride."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models import adapt_input_conv
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from tiny_backbones import BACKBONES, build
from torch import nn

from timm_backbone import (
    AutoBackbone,
    ResNetBackbone,
    ResNetConfig,
    SwinBackbone,
    SwinConfig,
    TimmBackbone,
    TimmBackboneConfig,
)

ALL = list(BACKBONES)
# frozen_stages=1: the parameters that must be frozen (name prefixes), every stage selected
FROZEN_1 = {
    "timm-list": ("_backbone.conv1.", "_backbone.bn1.", "_backbone.layer1."),
    "timm-getter": ("_backbone.model.patch_embed.", "_backbone.model.cls_token", "_backbone.model.pos_embed",
                    "_backbone.model.blocks.0.", "_backbone.model.blocks.1."),
    "timm-intermediates": ("_backbone.patch_embed.", "_backbone.cls_token", "_backbone.pos_embed",
                           "_backbone.blocks.0.", "_backbone.blocks.1."),
    "timm-nhwc": ("_backbone.stem.", "_backbone.stages_0.", "_backbone.stages_1."),
    "swin": ("patch_embed.", "layers.0.blocks.", "hidden_states_norms.stem.", "hidden_states_norms.stage1."),
    "resnet": ("embedder.", "encoder.stages.0."),
}  # fmt: skip
BATCH_NORM = ("timm-list", "resnet")  # the tiny backbones that have BatchNorm layers


def _every_stage(name: str) -> dict:
    return {"out_indices": list(range(len(build(name).stage_names)))}


def _frozen(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


# frozen_stages / freeze_stages ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_frozen_stages_freezes_the_stem_and_first_stages(name):
    model = build(name, frozen_stages=1, **_every_stage(name))
    expected = {n for n, _ in model.named_parameters() if n.startswith(FROZEN_1[name])}
    assert expected and _frozen(model) == expected
    size = BACKBONES[name][1]
    model.train()
    sum(f.float().pow(2).mean() for f in model(torch.randn(2, 3, size, size)).feature_maps).backward()
    in_stages = {id(p) for i in range(model.num_built_stages) for p in model.stage_parameters(i)}
    in_stages |= {id(p) for i in range(model.num_built_stages) for m in model.output_modules(i) for p in m.parameters()}
    assert {n for n, p in model.named_parameters() if p.grad is None and id(p) in in_stages} == expected


@pytest.mark.parametrize("name", ALL)
def test_freeze_stages_changes_and_undoes_freezing(name):
    model = build(name, **_every_stage(name))
    assert not _frozen(model)
    model.freeze_stages(1)
    assert model.config.frozen_stages == 1
    assert _frozen(model) == {n for n, _ in model.named_parameters() if n.startswith(FROZEN_1[name])}
    model.freeze_stages(0)
    stage0 = {id(p) for p in model.stage_parameters(0)} | {
        id(p) for m in model.output_modules(0) for p in m.parameters()
    }
    assert _frozen(model) == {n for n, p in model.named_parameters() if id(p) in stage0}
    model.freeze_stages(-1)
    assert not _frozen(model)


@pytest.mark.parametrize("name", ALL)
def test_frozen_stages_and_shallower_selection_combine(name):
    model = build(name, frozen_stages=0)
    model.out_indices = [1]  # stages after 1 stop training, stage 0 stays frozen, stage 1 trains
    for i in range(model.num_built_stages):
        assert {p.requires_grad for p in model.stage_parameters(i)} == {i == 1}, i


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value, error, fragment", [(99, ValueError, "frozen_stages 99 is out of range"),
                                                    (-2, ValueError, "-1 freezes nothing"),
                                                    ("1", TypeError, "frozen_stages must be an int")])  # fmt: skip
def test_bad_frozen_stages_is_a_clear_error(name, value, error, fragment):
    model = build(name)
    before = _frozen(model)  # stages after the selected one, and Swin's norms of unselected stages
    with pytest.raises(error, match=fragment):
        model.freeze_stages(value)
    assert model.config.frozen_stages == -1 and _frozen(model) == before
    with pytest.raises(error, match=fragment):
        build(name, frozen_stages=value)


@pytest.mark.parametrize("name", ALL)
def test_frozen_stages_saved_and_reloaded(name, tmp_path):
    model = build(name, frozen_stages=1)
    model.save_pretrained(tmp_path)
    loaded = AutoBackbone.from_pretrained(tmp_path)
    assert loaded.config.frozen_stages == 1 and _frozen(loaded) == _frozen(model)


# BatchNorm modes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BATCH_NORM)
def test_frozen_stages_keep_their_batch_norm_in_eval_mode(name):
    model = build(name, frozen_stages=1).train()
    frozen_modules = {id(m) for i in (0, 1) for s in model.stage_modules(i) for m in s.modules()}
    norms = _batch_norms(model)
    in_eval = {n for n, m in norms.items() if not m.training}
    assert in_eval == {n for n, m in norms.items() if id(m) in frozen_modules}
    assert in_eval and len(in_eval) < len(norms)
    model.train()  # again: still eval
    assert {n for n, m in _batch_norms(model).items() if not m.training} == in_eval
    model.eval().train()
    assert {n for n, m in _batch_norms(model).items() if not m.training} == in_eval


@pytest.mark.parametrize("name", BATCH_NORM)
def test_norm_eval_keeps_statistics_and_trains_affine_terms(name):
    model = build(name, norm_eval=True).train()
    norms = _batch_norms(model)
    assert norms and not any(m.training for m in norms.values())
    assert all(m.weight.requires_grad for m in norms.values())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    size = BACKBONES[name][1]
    model(torch.randn(2, 3, size, size) * 3 + 1)
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    plain = build(name).train()
    assert all(m.training for m in _batch_norms(plain).values())


# gradient checkpointing ---------------------------------------------------------------------------------------------
def _grads(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in model.modules()]
    model.zero_grad()
    torch.manual_seed(0)
    sum(f.pow(2).mean() for f in model(x).feature_maps).backward()
    for hook in hooks:
        hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls[0]


@pytest.mark.parametrize("name", ALL)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = build(name, **_every_stage(name)).train()
    size = BACKBONES[name][1]
    x = torch.randn(2, 3, size, size)
    plain, plain_calls = _grads(model, x)
    model.gradient_checkpointing_enable()
    checkpointed, checkpointed_calls = _grads(model, x)
    assert checkpointed_calls > plain_calls  # blocks ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    assert _grads(model, x)[1] == plain_calls


def test_gradient_checkpointing_unsupported_by_the_timm_model_is_a_clear_error():
    model = TimmBackbone(TimmBackboneConfig("convit_tiny", features_only=False, out_indices=[0]))
    with pytest.raises(ValueError, match="'convit_tiny' does not support gradient checkpointing"):
        model.gradient_checkpointing_enable()
    model.gradient_checkpointing_disable()  # off is always fine


# layer-wise learning-rate decay -------------------------------------------------------------------------------------
def _scales(groups: list[dict], model: nn.Module) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr_scale, weight_decay) from timm's param groups."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


_RESNET_TO_TIMM = [(r"^embedder\.", "conv1."), (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", None)]


def _timm_reference(name: str, model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The timm model whose grouping the backbone must reproduce, and our names -> a timm parameter of the same
    module (the group is decided by the module)."""
    if name.startswith("timm"):
        # the backbone holds no classifier (feature nets drop it; features_only=False prunes it)
        reference = timm.create_model(model.config.backbone, num_classes=0)
        if model.config.features_only and hasattr(reference, "head"):
            reference.head = nn.Identity()  # MambaOut's head keeps a norm and an MLP without classes
        return reference, model.timm_parameter_names()
    names = {}
    if name == "resnet":
        reference = timm.models.resnet.ResNet(block=timm.models.resnet.Bottleneck, layers=(1, 1, 1, 1), num_classes=0)
        for ours, _ in model.named_parameters():
            block = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.", ours)
            names[ours] = f"layer{int(block[1]) + 1}.{block[2]}.conv1.weight" if block else "conv1.weight"
        return reference, names
    c = model.config
    reference = timm.models.swin_transformer.SwinTransformer(
        img_size=c.image_size, embed_dim=c.embed_dim, depths=c.depths, num_heads=c.num_heads, num_classes=0
    )
    for ours, _ in model.named_parameters():
        block = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", ours)
        merge = re.match(r"layers\.(\d+)\.downsample\.", ours)
        if block:
            names[ours] = f"layers.{block[1]}.blocks.{block[2]}.norm1.weight"
        elif merge:
            names[ours] = f"layers.{int(merge[1]) + 1}.downsample.norm.weight"
        elif ours.startswith("patch_embed."):
            names[ours] = "patch_embed.proj.weight"
        else:  # the output norms: timm's final norm
            names[ours] = "norm.weight"
    return reference, names


@pytest.mark.parametrize("name", ALL)
def test_layer_decay_groups_are_timms(name):
    model = build(name, **_every_stage(name))
    reference, names = _timm_reference(name, model)
    kwargs = dict(weight_decay=0.05, layer_decay=0.75)
    ours = _scales(param_groups_layer_decay(model, no_weight_decay_list=model.no_weight_decay(), **kwargs), model)
    nwd = reference.no_weight_decay() if hasattr(reference, "no_weight_decay") else set()
    theirs = _scales(param_groups_layer_decay(reference, no_weight_decay_list=nwd, **kwargs), reference)
    assert len({scale for scale, _ in ours.values()}) > 3
    for param, (scale, _) in ours.items():
        assert scale == pytest.approx(theirs[names[param]][0]), param
    for param in model.no_weight_decay():
        assert ours[param][1] == 0.0
    if name.startswith("timm"):  # weight decay as timm decides it for the same parameter
        assert {p: wd for p, (_, wd) in ours.items()} == {p: theirs[names[p]][1] for p in ours}


@pytest.mark.parametrize("name", ALL)
def test_create_optimizer_v2_with_layer_decay(name):
    model = build(name)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    nwd = model.no_weight_decay()
    expected = _scales(
        param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75, no_weight_decay_list=nwd), model
    )
    assert _scales(optimizer.param_groups, model) == expected
    assert max(scale for scale, _ in expected.values()) == 1.0


@pytest.mark.parametrize("name, fine, coarse", [("resnet", 9, 5), ("swin", 9, 6)])
def test_coarse_groups_are_stages(name, fine, coarse):
    model = build(name, depths=[2, 2, 2, 2])  # stem, 8 blocks; stem, 4 stages (Swin: and its output norms)
    for is_coarse, count in ((False, fine), (True, coarse)):
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=is_coarse), reverse=True)
        assert len(set(groups.values())) == count


# input channels -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [1, 4])
def test_saved_folder_loads_with_other_num_channels(name, channels, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    loaded = AutoBackbone.from_pretrained(tmp_path, num_channels=channels)
    keys = model.input_conv_keys()
    own, theirs = model.state_dict(), loaded.state_dict()
    assert keys
    for key in keys:
        torch.testing.assert_close(theirs[key], adapt_input_conv(channels, own[key]), rtol=0, atol=0)
    assert not loaded.load_report.mismatched_keys
    for k, v in own.items():
        if k not in keys:
            torch.testing.assert_close(theirs[k], v, rtol=0, atol=0)
    size = BACKBONES[name][1]
    assert loaded(torch.randn(1, channels, size, size)).feature_maps[0].shape[1] == model.channels[0]


def test_native_resnet_from_timm_checkpoint_adapts_like_timm(tmp_path):
    from safetensors.torch import save_file

    rgb = timm.create_model("resnet18").eval()
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, tmp_path / "w.safetensors")
    overlay = {"state_dict": rgb.state_dict(), "source": "", "hf_hub_id": None, "url": None, "file": None}
    for channels in (1, 4):
        config = ResNetConfig.from_timm("resnet18", in_chans=channels, out_indices=[1, 2, 3, 4])
        assert config.num_channels == channels
        ours = ResNetBackbone.from_pretrained(tmp_path / "w.safetensors", config=config)
        theirs = timm.create_model("resnet18", in_chans=channels, pretrained=True, pretrained_cfg_overlay=overlay)
        torch.testing.assert_close(
            ours.embedder.embedder.convolution.weight.detach(), theirs.conv1.weight.detach(), rtol=0, atol=0
        )
        x = torch.randn(1, channels, 64, 64)
        with torch.no_grad():
            expected = theirs.eval().forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
            for a, b in zip(ours(x).feature_maps, expected):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 4])
def test_native_swin_from_timm_checkpoint_adapts_like_timm(channels, tmp_path):
    from safetensors.torch import save_file

    kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=128, window_size=4)
    rgb = timm.models.swin_transformer.SwinTransformer(**kwargs).eval()
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, tmp_path / "w.safetensors")
    config = SwinConfig(embed_dim=16, depths=[1] * 4, num_heads=[1] * 4, image_size=128, window_size=4,
                        num_channels=channels, window_semantics="timm")  # fmt: skip
    ours = SwinBackbone.from_pretrained(tmp_path / "w.safetensors", config=config)
    expected = adapt_input_conv(channels, rgb.patch_embed.proj.weight.detach())
    torch.testing.assert_close(ours.patch_embed.proj.weight.detach(), expected, rtol=0, atol=0)
    assert not ours.load_report.mismatched_keys


def test_resnet_from_timm_rejects_other_architecture_arguments():
    with pytest.raises(ValueError, match=r"\['output_stride_x'\]"):
        ResNetConfig.from_timm({"architecture": "resnet18", "model_args": {"output_stride_x": 8}})


# output_stride ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
@pytest.mark.parametrize("output_stride, strides", [(16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
def test_resnet_output_stride_matches_timm(layer_type, output_stride, strides):
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    from timm_backbone.models.resnet import resnet_transformers_to_timm

    expansion = 4 if layer_type == "bottleneck" else 1
    config = ResNetConfig(
        embedding_size=64, hidden_sizes=[8 * expansion * 2**i for i in range(4)], depths=[2, 2, 2, 2],
        layer_type=layer_type, output_stride=output_stride, out_indices=[1, 2, 3, 4],
    )  # fmt: skip
    ours = ResNetBackbone(config).eval()
    assert ours.strides == strides
    theirs = ResNet(
        BasicBlock if layer_type == "basic" else Bottleneck, (2, 2, 2, 2), channels=(8, 16, 32, 64),
        output_stride=output_stride, num_classes=0,
    ).eval()  # fmt: skip
    theirs.load_state_dict(resnet_transformers_to_timm(ours.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = theirs.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        for a, b, stride in zip(ours(x).feature_maps, expected, strides):
            assert a.shape[-1] == 64 // stride
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        ours.optimize_for_inference()  # the folded path keeps the dilation
        for a, b in zip(ours(x).feature_maps, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_resnet_output_stride_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        ResNetConfig(output_stride=4)
    model = build("resnet", output_stride=8, out_indices=[4])
    assert model.strides == [8]
    model.save_pretrained(tmp_path)
    assert AutoBackbone.from_pretrained(tmp_path).strides == [8]
    assert "output_stride" not in ResNetConfig().to_dict()
