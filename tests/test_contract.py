"""The backbone contract, identical for every backbone: config flags, tuple order, channels and strides against real
outputs, selection changes after construction, which parameters train, and the save/load round trip."""

import pytest
import torch
from tiny_backbones import BACKBONES, build

from timm_backbone import AutoBackbone, BackboneOutput
from timm_backbone.auto import FAMILIES

NAMES = sorted(BACKBONES)
SIZE = 64  # divisible by every tiny backbone's deepest stride


def _pixels(batch=2):
    return torch.randn(batch, 3, SIZE, SIZE)


def test_every_registered_backbone_class_is_covered():
    covered = {type(build(name)) for name in NAMES}
    assert {family.backbone_class for family in FAMILIES.values()} <= covered


@pytest.mark.parametrize("name", NAMES)
def test_config_flags_are_the_defaults_of_forward(name):
    model = build(name)
    x = _pixels()
    with torch.no_grad():
        assert model(x).hidden_states is None
        model.config.output_hidden_states = True
        out = model(x)
        assert len(out.hidden_states) == model.num_built_stages
        assert model(x, output_hidden_states=False).hidden_states is None
        model.config.return_dict = False
        as_tuple = model(x)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 2  # (feature_maps, hidden_states)
        for got, want in zip(as_tuple[0], out.feature_maps):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert len(as_tuple[1]) == model.num_built_stages
        assert isinstance(model(x, return_dict=True), BackboneOutput)
        model.config.output_hidden_states = False
        assert len(model(x)) == 1  # the tuple leaves out what was not asked for


@pytest.mark.parametrize("name", NAMES)
def test_channels_strides_and_output_shape_describe_the_outputs(name):
    model = build(name, out_indices=list(range(len(build(name).stage_names))))
    with torch.no_grad():
        out = model(_pixels())
    assert len(out.feature_maps) == len(model.out_indices) == len(model.stage_names)
    shapes = model.output_shape()
    for fmap, name_, channels, stride in zip(out.feature_maps, model.out_features, model.channels, model.strides):
        assert tuple(fmap.shape) == (2, channels, SIZE // stride, SIZE // stride)
        assert shapes[name_] == {"channels": channels, "stride": stride}
    for state, channels in zip(out.hidden_states or (), model.num_features):
        assert state.shape[1] == channels


@pytest.mark.parametrize("name", NAMES)
def test_selection_changes_within_the_built_stages(name):
    model = build(name, out_indices=(1,))
    model.out_indices = [0, 1]
    assert model.out_features == model.stage_names[:2] and model.config.out_indices == [0, 1]
    with torch.no_grad():
        maps = model(_pixels()).feature_maps
    assert [m.shape[1] for m in maps] == model.channels == model.num_features[:2]
    model.out_features = [model.stage_names[1]]
    assert model.out_indices == [1]
    model.config.out_indices = [0]  # changed on the config directly: applied at the next forward
    with torch.no_grad():
        assert model(_pixels()).feature_maps[0].shape[1] == model.num_features[0]


@pytest.mark.parametrize("name", NAMES)
def test_selecting_deeper_than_built_is_a_clear_error_or_trains_the_new_stage(name):
    model = build(name, out_indices=(1,)).train()
    last = len(model.stage_names) - 1
    if model.num_built_stages <= last:  # built up to stage 1 only (timm prunes the rest)
        with pytest.raises(ValueError, match=r"built with stages 0\.\.1 only"):
            model.out_indices = [1, last]
        assert model.out_indices == [1]  # the previous selection stays
        model.config.out_indices = [last]
        with pytest.raises(ValueError, match=rf"stage {last} .* built with stages 0\.\.1 only"):
            model(_pixels())
        return
    assert not any(p.requires_grad for p in _stage_params(model, last)), "stages after the deepest must not train"
    model.out_indices = [1, last]
    sum(f.float().mean() for f in model(_pixels()).feature_maps).backward()
    for param in _stage_params(model, last):
        assert param.requires_grad and param.grad is not None, "the newly selected stage must train"


def _stage_params(model, index):
    modules = [*model.stage_modules(index), *model.output_modules(index)]
    return [p for module in modules for p in module.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_gets_a_gradient(name):
    """What DistributedDataParallel needs to run without find_unused_parameters."""
    model = build(name, out_indices=(1,)).train()
    sum(f.float().mean() for f in model(_pixels()).feature_maps).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


@pytest.mark.parametrize("name", NAMES)
def test_attentions_only_where_there_are_any(name):
    model = build(name)
    if not model.has_attentions:
        with pytest.raises(ValueError, match="cannot return attentions"):
            model(_pixels(), output_attentions=True)
        return
    with torch.no_grad():
        out = model(_pixels(), output_attentions=True)
    assert len(out.attentions) == len(model.stage_names) - 1 and all(a.dim() == 4 for a in out.attentions)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_give_the_same_selection_and_outputs(name, tmp_path):
    model = build(name, out_indices=(-2, -1))
    model.save_pretrained(tmp_path)
    x = _pixels()
    for load in (type(model).from_pretrained, AutoBackbone.from_pretrained):
        loaded = load(tmp_path)
        assert type(loaded) is type(model)
        assert (loaded.out_indices, loaded.out_features) == (model.out_indices, model.out_features)
        assert loaded.load_report.ok, str(loaded.load_report)
        with torch.no_grad():
            for got, want in zip(loaded(x).feature_maps, model(x).feature_maps):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("cls", "tag", "timm_key", "our_key"),
    [
        ("TimmBackbone", "resnet18.a1_in1k", "layer1.0.conv1.weight", "_backbone.layer1.0.conv1.weight"),
        ("ResNetBackbone", "resnet18.a1_in1k", "layer1.0.conv1.weight",
         "encoder.stages.0.layers.0.layer.0.convolution.weight"),
        ("SwinBackbone", "swin_tiny_patch4_window7_224.ms_in1k", "patch_embed.proj.weight", "patch_embed.proj.weight"),
    ],
)  # fmt: skip
def test_a_timm_tag_resolves_the_same_way_for_every_backbone(cls, tag, timm_key, our_key, tmp_path):
    """A timm name with tag names timm's hub repo for its weights, read from the cache offline, for every class."""
    import timm
    from hub_cache import make_hub_cache
    from tiny_backbones import write_timm_repo

    import timm_backbone

    weights = timm.create_model(tag.partition(".")[0]).state_dict()
    write_timm_repo(tmp_path / "repo", tag, weights, num_classes=1000)
    make_hub_cache(tmp_path / "cache", f"timm/{tag}", tmp_path / "repo")
    for src in (tag, f"hf-hub:timm/{tag}"):
        model = getattr(timm_backbone, cls).from_pretrained(src, cache_dir=tmp_path / "cache")
        assert type(model).__name__ == cls
        torch.testing.assert_close(model.state_dict()[our_key], weights[timm_key], rtol=0, atol=0)
    for load in (getattr(timm_backbone, cls).from_pretrained, timm_backbone.AutoBackbone.from_pretrained):
        with pytest.raises(
            OSError, match=rf"timm model '{tag}' are in hub repo 'timm/{tag}'.*not in the hub cache"
        ) as e:
            load(tag, cache_dir=tmp_path / "empty")
        assert str(e.value).count("hub access is off") == 1  # a wrapped error adds context, never restates its cause
