"""The rest of the API a transformers 5.x user writes, side by side with transformers: selection setters, outputs as
mappings, config files, backbone helpers, and MaskFormer's config and processor calls."""

import json

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from huggingface_hub.errors import StrictDataclassError
from tiny_backbones import RESNET_FIELDS, SWIN_FIELDS
from transformers.backbone_utils import load_backbone as hf_load_backbone
from transformers.modeling_outputs import BackboneOutput as HFBackboneOutput
from transformers.models.maskformer.image_processing_maskformer import binary_mask_to_rle as hf_binary_mask_to_rle

from timm_backbone import (
    AutoConfig,
    BackboneConfigMixin,
    BackboneOutput,
    BackboneType,
    DetrConfig,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerImageProcessor,
    MaskFormerModel,
    PreTrainedConfig,
    PretrainedConfig,
    ResNetBackbone,
    ResNetConfig,
    SwinBackbone,
    SwinConfig,
    TimmBackbone,
    TimmBackboneConfig,
    load_backbone,
)
from timm_backbone.models.maskformer.image_processing import binary_mask_to_rle

ALL_STAGES = [0, 1, 2, 3, 4]


def _pair(family):
    """Ours and transformers' backbone of one family, built alike with every stage held."""
    if family == "resnet":
        return ResNetBackbone(ResNetConfig(**RESNET_FIELDS)), transformers.ResNetBackbone(
            transformers.ResNetConfig(**RESNET_FIELDS)
        )
    if family == "swin":
        theirs = transformers.SwinBackbone(transformers.SwinConfig(**SWIN_FIELDS))
        return SwinBackbone(SwinConfig(**SWIN_FIELDS)), theirs
    ours = TimmBackbone(TimmBackboneConfig("test_resnet", out_indices=ALL_STAGES))
    theirs = transformers.TimmBackbone(
        transformers.TimmBackboneConfig(backbone="test_resnet", out_indices=ALL_STAGES, use_pretrained_backbone=False)
    )
    return ours, theirs


def _state(model):
    n = len(model.stage_names)
    return list(model.out_features), [i % n for i in model.out_indices], list(model.channels)


# selection ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["resnet", "swin", "timm"])
def test_selection_setters_match_transformers(family):
    ours, theirs = _pair(family)
    names = theirs.stage_names
    assert ours.stage_names == names
    steps = [
        ("out_indices", (0, 1)),
        ("out_indices", [-1]),
        ("out_features", [names[1], names[3]]),
        ("out_indices", [1, -2]),
        ("out_indices", None),
        ("out_features", [names[2]]),
        ("out_features", None),
        ("out_indices", range(2, 4)),
    ]
    for attr, value in steps:
        setattr(ours, attr, value)
        setattr(theirs, attr, list(value) if isinstance(value, range) else value)
        assert _state(ours) == _state(theirs), (attr, value)
        assert ours.config.out_features == list(ours.out_features)  # the config follows the model


@pytest.mark.parametrize("family", ["resnet", "swin", "timm"])
@pytest.mark.parametrize(
    ("attr", "bad", "match"),
    [
        ("out_indices", 3, "out_indices must be a list or tuple, got int 3"),
        ("out_features", ("x",), "out_features must be a list, got tuple"),
        ("out_features", "x", "out_features must be a list, got str"),
        ("out_indices", [0, 0], "more than once"),
        ("out_indices", [5], "out of range"),
        ("out_indices", [2, 1], "stage order"),
        ("out_features", ["nope"], "unknown stage 'nope'"),
    ],
)
def test_selection_setters_reject_what_transformers_rejects(family, attr, bad, match):
    ours, theirs = _pair(family)
    with pytest.raises((ValueError, TypeError, StrictDataclassError)):
        setattr(theirs, attr, bad)
    before = _state(ours)
    with pytest.raises(ValueError, match=match):
        setattr(ours, attr, bad)
    assert _state(ours) == before  # a rejected selection leaves the previous one


def test_config_selection_rules_match_transformers():
    for kwargs in (dict(out_features=("stage1",)), dict(out_features="stage1"), dict(out_indices=1)):
        with pytest.raises(ValueError):
            transformers.ResNetConfig(**kwargs)
        with pytest.raises(ValueError, match="must be a list"):
            ResNetConfig(**kwargs)
    assert ResNetConfig(out_indices=(1, 2)).out_features == transformers.ResNetConfig(out_indices=(1, 2)).out_features


def test_timm_config_keeps_the_selection_until_stages_are_known():
    config = TimmBackboneConfig("test_resnet")
    config.out_indices = (1, 2)  # no stage names yet: stored, checked when the model is built (as transformers)
    theirs = transformers.TimmBackboneConfig(backbone="test_resnet")
    theirs.out_indices = (1, 2)
    assert config.out_indices == theirs.out_indices == [1, 2]
    assert TimmBackbone(config).out_features == ["layer1", "layer2"]
    with pytest.raises(ValueError, match="stage_names must be set"):
        TimmBackboneConfig("test_resnet").set_output_features_output_indices(None, [1])


def test_empty_selection_is_rejected_here_only():
    ours, theirs = _pair("resnet")
    theirs.out_indices = []  # transformers: a backbone that returns nothing
    assert theirs.channels == []
    with pytest.raises(ValueError, match="must not be empty"):
        ours.out_indices = []


# outputs -----------------------------------------------------------------------------------------------------------
def test_backbone_output_is_an_ordered_mapping_like_transformers():
    a, b = torch.zeros(1), torch.ones(1)
    maps, attentions = (a,), (b,)
    ours = BackboneOutput(feature_maps=maps, attentions=attentions)
    theirs = HFBackboneOutput(feature_maps=maps, attentions=attentions)
    assert list(ours) == list(theirs) == ["feature_maps", "attentions"]
    assert list(ours.keys()) == list(theirs.keys())
    assert [v for v in ours.values()] == [v for v in theirs.values()]
    assert list(ours.items()) == list(theirs.items())
    assert ours["attentions"] is theirs["attentions"] and ours[1] is theirs[1] and ours[0][0] is a
    assert ours.to_tuple() == theirs.to_tuple() and len(ours) == len(theirs) == 2
    assert ("hidden_states" in ours) is ("hidden_states" in theirs) is False
    assert dict(ours) == dict(theirs) == dict(**ours)
    with pytest.raises(KeyError):
        ours["hidden_states"]
    for out in (ours, theirs):
        out["hidden_states"] = (a, b)  # item assignment sets the field
    assert ours.hidden_states == theirs.hidden_states == (a, b) and "hidden_states" in ours
    ours.attentions = None
    assert list(ours) == ["feature_maps", "hidden_states"]
    with pytest.raises(KeyError, match="fields are"):
        ours["logits"] = a


def test_backbone_output_stays_a_pytree_node():
    a, b = torch.zeros(1), torch.ones(2)
    leaves, spec = pytree.tree_flatten(BackboneOutput(feature_maps=(a, b)))
    assert [x for x in leaves if x is not None] == [a, b] and leaves[1] is b
    rebuilt = pytree.tree_unflatten([x if x is None else x + 1 for x in leaves], spec)
    assert isinstance(rebuilt, BackboneOutput) and rebuilt.feature_maps[1].tolist() == [2.0, 2.0]


def test_forward_returns_mapping_and_tuple_views():
    model = ResNetBackbone(ResNetConfig(**RESNET_FIELDS, out_indices=[2, 3])).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), output_hidden_states=True)
        plain = model(torch.randn(1, 3, 32, 32), return_dict=False)
    assert list(out) == ["feature_maps", "hidden_states"]
    feature_maps, hidden_states = out.to_tuple()
    assert feature_maps is out["feature_maps"] and len(hidden_states) == 5
    assert isinstance(plain, tuple) and len(plain) == 1 and len(plain[0]) == 2


# configs -----------------------------------------------------------------------------------------------------------
TIMM_KEYS = dict(
    backbone="resnet18",
    num_channels=3,
    image_size=32,
    out_indices=[1, 2],
    use_pretrained_backbone=False,
    freeze_batch_norm_2d=True,
    output_stride=16,
)


def test_timm_config_takes_transformers_keys():
    ours, theirs = TimmBackboneConfig(**TIMM_KEYS), transformers.TimmBackboneConfig(**TIMM_KEYS)
    assert ours.image_size == theirs.image_size == 32 and ours.model_args == {}
    model, reference = TimmBackbone(ours), transformers.TimmBackbone(theirs)
    assert (model.out_features, model.channels) == (reference.out_features, reference.channels)
    assert model.stage_names == reference.stage_names and model.backbone_type.value == reference.backbone_type.value


def test_timm_config_sends_only_keys_timm_takes(tmp_path):
    config = TimmBackboneConfig("resnet18", image_size=32, drop_path_rate=0.1, out_indices=[4])
    assert config.model_args == {"drop_path_rate": 0.1} and config.image_size == 32
    TimmBackbone(config).save_pretrained(tmp_path)
    reloaded = TimmBackboneConfig.from_pretrained(tmp_path)
    assert reloaded.image_size == 32 and reloaded.model_args == {"drop_path_rate": 0.1}
    assert TimmBackboneConfig("test_vit", img_size=64, image_size=64).model_args == {"img_size": 64}
    unknown_arch = TimmBackboneConfig("not_a_timm_model", drop_path_rate=0.1)
    assert unknown_arch.model_args == {} and unknown_arch.drop_path_rate == 0.1


def test_json_string_diff_matches_transformers():
    ours = json.loads(TimmBackboneConfig(**TIMM_KEYS).to_json_string())
    theirs = json.loads(transformers.TimmBackboneConfig(**TIMM_KEYS).to_json_string(use_diff=True))
    theirs.pop("transformers_version")
    assert {k: ours[k] for k in theirs} == theirs
    own = {"model_args", "stage_names", "feature_pyramid", "feature_pyramid_channels", "output_prefix_tokens"}
    assert set(ours) - set(theirs) == own  # this package's own fields
    full = json.loads(TimmBackboneConfig(**TIMM_KEYS).to_json_string(use_diff=False))
    assert full["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"} and "id2label" not in ours


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: ResNetConfig(**RESNET_FIELDS), transformers.ResNetConfig),
        (lambda: SwinConfig(**SWIN_FIELDS), transformers.SwinConfig),
        (lambda: TimmBackboneConfig(**TIMM_KEYS), transformers.TimmBackboneConfig),
        (lambda: MaskFormerConfig(backbone_config=ResNetConfig(**RESNET_FIELDS)), transformers.MaskFormerConfig),
    ],
)
@pytest.mark.parametrize("use_diff", [True, False])
def test_json_files_round_trip_and_load_in_transformers(tmp_path, ours, theirs, use_diff):
    config = ours()
    path = tmp_path / "config.json"
    config.to_json_file(path, use_diff=use_diff)
    assert type(config).from_json_file(path) == config
    assert AutoConfig.from_dict(json.loads(path.read_text())) == config
    reference = theirs.from_json_file(path)
    assert reference.model_type == config.model_type
    if hasattr(config, "out_indices"):
        assert reference.out_features == config.out_features
    (tmp_path / "theirs.json").write_text(reference.to_json_string(use_diff=use_diff))
    _assert_holds(type(config).from_json_file(tmp_path / "theirs.json").to_dict(), config.to_dict())


def _assert_holds(loaded, expected, where="config"):
    """Every field of ``expected`` is in ``loaded`` with the same value (transformers adds keys, kept as attributes)."""
    for key, value in expected.items():
        if isinstance(value, dict) and isinstance(loaded.get(key), dict) and "model_type" in value:
            _assert_holds(loaded[key], value, f"{where}.{key}")
        elif key not in ("architectures", "label2id"):
            assert loaded.get(key) == value, f"{where}.{key}: {loaded.get(key)!r} != {value!r}"


def test_config_api_names():
    assert PreTrainedConfig is PretrainedConfig and issubclass(TimmBackboneConfig, BackboneConfigMixin)
    assert [e.value for e in BackboneType] == [e.value for e in transformers.backbone_utils.BackboneType]
    for ours, theirs in [(ResNetConfig(), transformers.ResNetConfig()), (MaskFormerConfig(), None)]:
        assert ours.is_encoder_decoder is False and (theirs is None or theirs.is_encoder_decoder is False)
    assert DetrConfig().is_encoder_decoder is transformers.DetrConfig().is_encoder_decoder is True
    assert set(MaskFormerConfig.sub_configs) == set(transformers.MaskFormerConfig.sub_configs)
    assert MaskFormerConfig.sub_configs["decoder_config"] is DetrConfig


@pytest.mark.parametrize("family", ["resnet", "swin", "timm"])
def test_backbone_type_matches_transformers(family):
    ours, theirs = _pair(family)
    assert ours.backbone_type.value == theirs.backbone_type.value


def test_swin_input_embeddings_match_transformers():
    ours, theirs = _pair("swin")
    assert ours.get_input_embeddings().proj.weight.shape == theirs.get_input_embeddings().projection.weight.shape


# load_backbone -----------------------------------------------------------------------------------------------------
def test_load_backbone_of_a_backbone_config_matches_transformers():
    ours = load_backbone(ResNetConfig(**RESNET_FIELDS, out_indices=[1, 2]))
    theirs = hf_load_backbone(transformers.ResNetConfig(**RESNET_FIELDS, out_indices=[1, 2]))
    assert type(ours).__name__ == type(theirs).__name__
    assert (ours.out_features, ours.channels) == (theirs.out_features, theirs.channels)


def test_load_backbone_of_a_task_config():
    config = MaskFormerConfig(backbone_config=ResNetConfig(**RESNET_FIELDS, out_indices=[2, 3]))
    assert load_backbone(config).out_features == ["stage2", "stage3"]
    config.backbone_config, config.backbone, config.use_timm_backbone = None, "test_resnet", True
    config.backbone_kwargs = {"out_indices": [1, 2]}
    backbone = load_backbone(config)
    assert isinstance(backbone, TimmBackbone) and backbone.out_features == ["layer1", "layer2"]
    config.backbone = None
    with pytest.raises(ValueError, match="names no backbone"):
        load_backbone(config)


# MaskFormer --------------------------------------------------------------------------------------------------------
DECODER = dict(d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=32, num_queries=4)
HEADS = dict(fpn_feature_size=32, mask_feature_size=32, num_labels=3)


def test_decoder_config_reads_as_attributes_and_as_a_dict(tmp_path):
    config = MaskFormerConfig.from_backbone_and_decoder_configs(ResNetConfig(**RESNET_FIELDS), DetrConfig(**DECODER))
    decoder = config.decoder_config
    assert isinstance(decoder, DetrConfig) and decoder.decoder_layers == decoder["decoder_layers"] == 2
    assert decoder.get("num_queries") == config.num_queries == 4 and "d_model" in decoder
    assert decoder.dropout == transformers.DetrConfig().dropout  # DETR's defaults fill the rest
    config.num_queries = 6
    assert decoder.num_queries == 6
    config.save_pretrained(tmp_path)
    theirs = transformers.MaskFormerConfig.from_pretrained(tmp_path)
    assert theirs.decoder_config.decoder_layers == 2 and theirs.decoder_config.num_queries == 6
    theirs.save_pretrained(tmp_path / "theirs")
    again = MaskFormerConfig.from_pretrained(tmp_path / "theirs")
    assert again.decoder_config.d_model == 32 and again.decoder_config["num_queries"] == 6


def test_backbone_fields_set_after_the_config_resolve_when_the_model_is_built():
    config = MaskFormerConfig(backbone_config=ResNetConfig(**RESNET_FIELDS), decoder_config=DECODER, **HEADS)
    config.backbone_config = None
    config.backbone_kwargs = {"out_indices": [1, 2, 3]}
    config.backbone, config.use_timm_backbone = "resnet18", True
    model = MaskFormerForInstanceSegmentation(config)
    encoder = model.model.pixel_level_module.encoder
    assert isinstance(encoder, TimmBackbone) and encoder.out_indices == [1, 2, 3]
    assert encoder.config.backbone == "resnet18" and encoder.channels == [64, 128, 256]
    assert isinstance(config.backbone_config, TimmBackboneConfig) and config.backbone is None
    assert MaskFormerConfig.from_dict(config.to_dict()).backbone_config.backbone == "resnet18"  # saves and reloads


def _first_decoder_state(model, output_hidden_states=True):
    out = model(torch.randn(1, 3, 64, 64), output_hidden_states=output_hidden_states)
    return out.transformer_decoder_hidden_states[0], out


def test_first_decoder_hidden_state_requires_grad_in_training_as_in_transformers():
    ours = MaskFormerModel(
        MaskFormerConfig(backbone_config=ResNetConfig(**RESNET_FIELDS), decoder_config=DECODER, **HEADS)
    ).train()
    theirs = transformers.MaskFormerModel(
        transformers.MaskFormerConfig(
            backbone_config=transformers.ResNetConfig(**RESNET_FIELDS, out_indices=[1, 2, 3, 4]),
            decoder_config=transformers.DetrConfig(**DECODER),
            **HEADS,
        )
    ).train()
    for model in (ours, theirs):
        first, out = _first_decoder_state(model)
        assert first.requires_grad
        first.retain_grad()
        out.transformer_decoder_last_hidden_state.sum().backward()
        assert first.grad is not None
    with torch.no_grad():
        first, _ = _first_decoder_state(ours.eval())
    assert not first.requires_grad


# MaskFormerImageProcessor -----------------------------------------------------------------------------------------
def test_processor_from_dict_legacy_override_wins():
    processor = MaskFormerImageProcessor.from_dict({"size_divisor": 32, "do_reduce_labels": False}, size_divisibility=8)
    assert processor.size_divisor == 8
    assert MaskFormerImageProcessor.from_dict({"size_divisibility": 16}).size_divisor == 16
    assert MaskFormerImageProcessor.from_dict({"reduce_labels": True}, reduce_labels=False).do_reduce_labels is False


def test_processor_json_files_round_trip_and_load_in_transformers(tmp_path):
    processor = MaskFormerImageProcessor(size_divisor=16, ignore_index=255)
    path = tmp_path / "preprocessor_config.json"
    processor.to_json_file(path)
    assert MaskFormerImageProcessor.from_json_file(path) == processor
    assert json.loads(processor.to_json_string()) == json.loads(path.read_text())
    theirs = transformers.MaskFormerImageProcessor.from_json_file(path)
    assert (theirs.size_divisor, theirs.ignore_index) == (16, 255)
    (tmp_path / "theirs.json").write_text(theirs.to_json_string())
    again = MaskFormerImageProcessor.from_json_file(tmp_path / "theirs.json")
    assert (again.size_divisor, again.ignore_index, again.size) == (16, 255, processor.size)


def test_processor_takes_pad_and_return_pixel_mask():
    processor = MaskFormerImageProcessor(size=64, size_divisor=32)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    plain = processor(image, return_tensors="pt")
    legacy = processor(image, return_tensors="pt", pad_and_return_pixel_mask=True)
    torch.testing.assert_close(plain["pixel_values"], legacy["pixel_values"])
    assert torch.equal(plain["pixel_mask"], legacy["pixel_mask"])


def test_post_process_segmentation_agrees_with_transformers_semantic_maps():
    torch.manual_seed(0)

    class Out:
        class_queries_logits = torch.randn(2, 5, 4)
        masks_queries_logits = torch.randn(2, 5, 8, 8)

    scores = MaskFormerImageProcessor().post_process_segmentation(Out)
    assert scores.shape == (2, 3, 8, 8)
    maps = transformers.MaskFormerImageProcessor().post_process_semantic_segmentation(Out)
    assert torch.equal(scores.argmax(1), torch.stack(maps))
    resized = MaskFormerImageProcessor().post_process_segmentation(Out, target_size=(16, 12))
    masks = torch.nn.functional.interpolate(Out.masks_queries_logits, size=(16, 12), mode="bilinear")
    expected = torch.einsum("bqc,bqhw->bchw", Out.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())
    torch.testing.assert_close(resized, expected)


def test_binary_mask_to_rle_takes_numpy_like_transformers():
    mask = np.random.default_rng(1).integers(0, 2, (7, 9)).astype(np.uint8)
    assert binary_mask_to_rle(mask) == hf_binary_mask_to_rle(mask) == binary_mask_to_rle(torch.from_numpy(mask))


@pytest.mark.parametrize(
    "name",
    ["ViTImageProcessor", "DeiTImageProcessor", "CLIPImageProcessor", "BitImageProcessor", "ConvNextImageProcessor"],
)
def test_every_processor_has_json_files_that_transformers_reads(tmp_path, name):
    import timm_backbone

    processor = getattr(timm_backbone, name)(image_mean=[0.5, 0.4, 0.3])
    path = tmp_path / "preprocessor_config.json"
    processor.to_json_file(path)
    assert type(processor).from_json_file(path) == processor
    theirs = getattr(transformers, name).from_json_file(path)
    assert list(theirs.image_mean) == [0.5, 0.4, 0.3] and theirs.size == processor.size


def test_forward_with_filtered_kwargs_drops_what_forward_does_not_take():
    ours, theirs = _pair("resnet")
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = ours.eval().forward_with_filtered_kwargs(x, output_attentions=True, return_dict=True)
        want = theirs.eval().forward_with_filtered_kwargs(x, output_attentions=True, return_dict=True)
    torch.testing.assert_close(got.feature_maps, want.feature_maps)
