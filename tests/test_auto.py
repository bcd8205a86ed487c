"""Auto classes end to end, offline: the seed's Swin walkthrough from a hub id, a folder and the hub cache; timm
repos and names; overrides; revisions; errors that say what was tried; user registries; the CLI's processor."""

import json

import numpy as np
import pytest
import torch
from hub_cache import make_hub_cache, use_hub_cache
from PIL import Image
from test_image_processing import SWIN_REPO as SWIN_PROCESSOR  # the swin repo's legacy preprocessor_config.json

import timm_backbone.auto as auto
from timm_backbone import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    SwinBackbone,
    TimmBackbone,
    TimmBackboneConfig,
    TimmImageProcessor,
    ViTImageProcessor,
)
from timm_backbone.backbone import BackboneMixin, BackboneOutput
from timm_backbone.configuration import BackboneConfigMixin, PretrainedConfig
from timm_backbone.modeling import PreTrainedModel

transformers = pytest.importorskip("transformers")

SWIN_ID = "microsoft/swin-tiny-patch4-window7-224"
TIMM_NAME = "resnet10t.c3_in1k"


def _photo(height: int = 240, width: int = 320) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    ramps = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], -1)
    return Image.fromarray((0.7 * ramps + 0.3 * rng.integers(0, 256, (height, width, 3))).astype(np.uint8))


@pytest.fixture(scope="module")
def swin_repo(tmp_path_factory):
    """A random-init transformers SwinForImageClassification with swin-tiny's widths (one block per stage, for
    speed) saved as the hub repo would hold it, and a hub cache holding it at main and at tag v1.0."""
    root = tmp_path_factory.mktemp("swin")
    config = transformers.SwinConfig(embed_dim=96, depths=[1, 1, 1, 1], num_heads=[3, 6, 12, 24], num_labels=5)
    torch.manual_seed(0)
    transformers.SwinForImageClassification(config).save_pretrained(root / "src")
    (root / "src" / "preprocessor_config.json").write_text(json.dumps(SWIN_PROCESSOR))
    commit = make_hub_cache(root / "hub", SWIN_ID, root / "src", tags=["v1.0"])
    return {"folder": root / "src", "cache": root / "hub", "commit": commit}


@pytest.fixture(scope="module")
def timm_repo(tmp_path_factory):
    """A timm-format hub repo (config.json with architecture + pretrained_cfg, timm weights) of resnet10t."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=7)
    cfg = timm.models.get_pretrained_cfg(TIMM_NAME).to_dict()
    config = {"architecture": "resnet10t", "num_classes": 7, "num_features": 512, "pretrained_cfg": cfg}
    (root / "src").mkdir()
    (root / "src" / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), root / "src" / "model.safetensors")
    return {"folder": root / "src", "cache": root / "hub", "state_dict": model.state_dict()}


def test_seed_walkthrough_word_for_word_offline(swin_repo, monkeypatch):
    use_hub_cache(monkeypatch, swin_repo["cache"])
    image = _photo()

    processor = AutoImageProcessor.from_pretrained("microsoft/swin-tiny-patch4-window7-224")
    model = AutoBackbone.from_pretrained("microsoft/swin-tiny-patch4-window7-224", out_indices=(0, 1, 2))
    inputs = processor(image, return_tensors="pt")
    outputs = model(**inputs)
    feature_maps = outputs.feature_maps

    assert type(processor) is ViTImageProcessor and type(model) is SwinBackbone
    assert [list(f.shape) for f in feature_maps] == [[1, 96, 56, 56], [1, 96, 56, 56], [1, 192, 28, 28]]
    reference = SwinBackbone.from_pretrained(swin_repo["folder"], out_indices=(0, 1, 2))
    expected = reference(**inputs).feature_maps  # with autograd on too, as above: the same kernels run
    for got, want in zip(feature_maps, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # the classifier head is left out, the backbone weights are all used
    assert not [k for k in model.load_report.unexpected_keys if not k.startswith("classifier.")]
    # transformers' processor on the same repo files gives the same pixels
    theirs = transformers.AutoImageProcessor.from_pretrained(swin_repo["folder"])(image, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["folder", "cache_dir", "commit", "tag", "local_files_only"])
def test_walkthrough_from_every_kind_of_source(swin_repo, where, monkeypatch):
    src, kwargs = SWIN_ID, {"cache_dir": swin_repo["cache"]}
    if where == "folder":
        src, kwargs = str(swin_repo["folder"]), {}
    elif where == "commit":
        kwargs["revision"] = swin_repo["commit"]
    elif where == "tag":
        kwargs["revision"] = "v1.0"
    elif where == "local_files_only":
        from huggingface_hub import constants

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        kwargs["local_files_only"] = True
    processor = AutoImageProcessor.from_pretrained(src, **kwargs)
    model = AutoBackbone.from_pretrained(src, out_features=["stage1", "stage3"], **kwargs)
    assert (model.out_indices, model.channels, model.strides) == ([1, 3], [96, 384], [4, 16])
    with torch.no_grad():
        maps = model(**processor(_photo(), return_tensors="pt")).feature_maps
    assert [list(f.shape) for f in maps] == [[1, 96, 56, 56], [1, 384, 14, 14]]
    config = AutoConfig.from_pretrained(src, **kwargs)
    assert type(config).__name__ == "SwinConfig" and config.architectures == ["SwinForImageClassification"]


def test_overrides_from_config_and_config_for(swin_repo):
    config = AutoConfig.from_pretrained(swin_repo["folder"], out_indices=[-1], drop_path_rate=0.25)
    assert (config.out_indices, config.out_features, config.drop_path_rate) == ([4], ["stage4"], 0.25)
    assert AutoBackbone.config_for(swin_repo["folder"], out_indices=[0, 2]).out_features == ["stem", "stage2"]
    model = AutoBackbone.from_config(config, out_indices=[1, 2])
    assert type(model) is SwinBackbone and model.out_indices == [1, 2] and config.out_indices == [4]
    loaded = AutoBackbone.from_pretrained(swin_repo["folder"], config=config)
    assert loaded.out_indices == [4] and not loaded.training


def test_timm_hub_repo_gives_timm_backbone_and_processor(timm_repo, monkeypatch):
    import timm

    make_hub_cache(timm_repo["cache"], "acme/resnet10t-timm", timm_repo["folder"])
    use_hub_cache(monkeypatch, timm_repo["cache"])
    model = AutoBackbone.from_pretrained("acme/resnet10t-timm", out_indices=(1, 3))
    processor = AutoImageProcessor.from_pretrained("acme/resnet10t-timm")
    assert type(model) is TimmBackbone and type(processor) is TimmImageProcessor
    assert (processor.size, processor.crop_pct) == ({"height": 176, "width": 176}, 0.875)
    reference = timm.create_model("resnet10t", num_classes=7, features_only=True, out_indices=(1, 3))
    reference.load_state_dict(timm_repo["state_dict"], strict=False)
    pixel_values = processor(_photo(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        got, want = model(pixel_values).feature_maps, reference.eval()(pixel_values)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    config = AutoConfig.from_pretrained("acme/resnet10t-timm")
    assert type(config) is TimmBackboneConfig and config.backbone == "resnet10t"


def test_timm_name_resolves_offline_from_the_cache(timm_repo, monkeypatch):
    make_hub_cache(timm_repo["cache"], f"timm/{TIMM_NAME}", timm_repo["folder"])
    use_hub_cache(monkeypatch, timm_repo["cache"])
    model = AutoBackbone.from_pretrained(TIMM_NAME, out_indices=[-1])
    assert type(model) is TimmBackbone and model.out_features == ["layer4"]
    ours = {k.removeprefix("_backbone."): v for k, v in model.state_dict().items()}
    torch.testing.assert_close(ours["layer4.0.conv2.weight"], timm_repo["state_dict"]["layer4.0.conv2.weight"])
    assert type(AutoConfig.from_pretrained("resnet10t")) is TimmBackboneConfig
    assert AutoImageProcessor.from_pretrained(TIMM_NAME).size == {"height": 176, "width": 176}


def test_transformers_timm_backbone_folder_dispatches_by_model_type(tmp_path):
    config = transformers.TimmBackboneConfig(backbone="resnet10t", use_pretrained_backbone=False, out_indices=(1, 2))
    torch.manual_seed(2)
    theirs = transformers.TimmBackbone(config).eval()
    theirs.save_pretrained(tmp_path)
    ours = AutoBackbone.from_pretrained(tmp_path)
    assert type(ours) is TimmBackbone and ours.out_indices == [1, 2]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(ours(x).feature_maps, theirs(x).feature_maps):
            torch.testing.assert_close(got, want)


def test_resnet_classification_checkpoint_gives_native_resnet(tmp_path):
    import timm_backbone

    if not hasattr(timm_backbone, "ResNetBackbone"):
        pytest.skip("timm_backbone.ResNetBackbone cannot be imported (yet)")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    torch.manual_seed(5)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path)
    model = AutoBackbone.from_pretrained(tmp_path, out_indices=(1, 4))
    assert type(model) is timm_backbone.ResNetBackbone and model.channels == [8, 32]
    assert not model.load_report.missing_keys
    theirs = transformers.ResNetBackbone.from_pretrained(tmp_path, out_indices=(1, 4)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(model(x).feature_maps, theirs(x).feature_maps):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- hub revisions
def _config_repo(path, out_indices):
    path.mkdir(parents=True)
    config = {"model_type": "timm_backbone", "backbone": "resnet10t", "out_indices": out_indices}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_revisions_resolve_in_the_cache(tmp_path):
    cache = tmp_path / "hub"
    main = make_hub_cache(cache, "acme/two", _config_repo(tmp_path / "a", [1]), missing=["preprocessor_config.json"])
    tagged = make_hub_cache(cache, "acme/two", _config_repo(tmp_path / "b", [2]), revision="v2", tags=["stable"])
    assert main != tagged
    for revision, expected in [(None, [1]), (main, [1]), ("v2", [2]), ("stable", [2]), (tagged, [2])]:
        assert AutoConfig.from_pretrained("acme/two", cache_dir=cache, revision=revision).out_indices == expected
    with pytest.raises(OSError, match="'acme/two' is not a local folder and is not in the hub cache"):
        AutoConfig.from_pretrained("acme/two", cache_dir=cache, revision="v3")
    with pytest.raises(
        OSError,
        match=r"hub repo 'acme/two' at revision '[0-9a-f]{40}' has none of the weight files .*\(hub access is off",
    ):
        AutoBackbone.from_pretrained("acme/two", cache_dir=cache)  # only config.json was ever downloaded
    # a branch or tag is pinned to its commit once found, so that every later file comes from that commit
    assert auto.resolve_source("acme/two", cache_dir=cache).hub_kwargs["revision"] == main
    assert auto.resolve_source("acme/two", cache_dir=cache, revision="stable").hub_kwargs["revision"] == tagged
    # a file known to be missing (.no_exist) is "not in the repo", not "not cached": the timm_backbone config's
    # model then gives the processor
    processor = AutoImageProcessor.from_pretrained("acme/two", cache_dir=cache)
    assert type(processor) is TimmImageProcessor and processor.size == {"height": 176, "width": 176}


# -------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "src, match",
    [
        (
            "no-such-model",
            r"cannot find 'no-such-model'; tried it as\n  - a local folder: .*no-such-model does not exist\n"
            r"  - a timm model name: unknown timm model 'no-such-model'.*\n  - a hub repo: not looked up, hub ids have "
            r"the form 'org/name'",
        ),
        ("resnt50", r"a timm model name: unknown timm model 'resnt50'; close matches: resnet50"),
        ("acme/missing", r"tried it as\n  - a local folder: .*\n  - a hub repo: 'acme/missing' is not a local folder"),
        ("./not/a/dir", r"a hub repo: it is not an id of the form 'org/name'"),
    ],
)
@pytest.mark.parametrize("auto_class", [AutoConfig, AutoBackbone, AutoImageProcessor])
def test_nothing_found_says_what_was_tried(tmp_path, src, match, auto_class):
    with pytest.raises(OSError, match=match):
        auto_class.from_pretrained(src, cache_dir=tmp_path)


def test_file_errors(tmp_path):
    with pytest.raises(OSError, match=r"local folder '.*' has no config.json"):
        AutoBackbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type 'bert', which is not one of \[.*'swin'.*'timm_backbone'"):
        AutoConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "maskformer"}))
    with pytest.raises(OSError, match=r"local folder '.*' has none of the weight files \['model.safetensors'"):
        AutoBackbone.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"MaskFormerConfig \(model_type 'maskformer'\) is not a backbone config"):
        AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path))


# ---------------------------------------------------------------------------------------------------- registries
class ToyConfig(BackboneConfigMixin, PretrainedConfig):
    model_type = "toy_backbone"

    def __init__(self, width: int = 4, out_indices=None, out_features=None, stage_names=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.width, self.num_channels = width, 3
        self._init_stage_selection(out_features, out_indices)

    @property
    def stage_names(self) -> list[str]:
        return ["stem", "stage1"]


class ToyBackbone(BackboneMixin, PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.stage_names, self.num_features, self.stage_strides = config.stage_names, [3, config.width], [1, 2]
        self.conv = torch.nn.Conv2d(3, config.width, 3, stride=2, padding=1)

    def forward(self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None):
        stages = [pixel_values, self.conv(pixel_values)]
        return BackboneOutput(feature_maps=tuple(stages[i] for i in self.out_indices))


class ToyProcessor(ViTImageProcessor):
    processor_type = "ToyImageProcessor"


@pytest.fixture
def private_registries(monkeypatch):
    auto._ensure_builtins()
    for name in ("CONFIG_MAPPING", "BACKBONE_MAPPING", "IMAGE_PROCESSOR_MAPPING", "PROCESSOR_FOR_MODEL_TYPE"):
        monkeypatch.setattr(auto, name, dict(getattr(auto, name)))


def test_users_register_their_own_classes(tmp_path, private_registries):
    AutoConfig.register("toy_backbone", ToyConfig)
    AutoBackbone.register(ToyConfig, ToyBackbone)
    AutoImageProcessor.register("ToyImageProcessor", ToyProcessor, model_types=("toy_backbone",))
    ToyBackbone(ToyConfig(width=6)).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 16}))
    model = AutoBackbone.from_pretrained(tmp_path, out_indices=[0, 1])
    assert type(model) is ToyBackbone and model.channels == [3, 6] and model.load_report.ok
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is ToyProcessor and processor.size == {"height": 16, "width": 16}
    assert [list(f.shape) for f in model(**processor(_photo(), return_tensors="pt")).feature_maps] == [
        [1, 3, 16, 16],
        [1, 6, 8, 8],
    ]
    with pytest.raises(ValueError, match="model_type 'toy_backbone' is already registered to ToyConfig"):
        auto.register("toy_backbone", TimmBackboneConfig)
    with pytest.raises(ValueError, match="image processor 'ToyImageProcessor' is already registered"):
        AutoImageProcessor.register("ToyImageProcessor", ViTImageProcessor)
    # a builtin type can be replaced on purpose, and the replacement stays
    auto.register("swin", ToyConfig, ToyBackbone, exist_ok=True)
    assert type(AutoConfig.for_model("swin", width=2)) is ToyConfig


def test_lazy_processor_entries_fail_clearly(tmp_path, private_registries):
    AutoImageProcessor.register("GoneImageProcessor", "timm_backbone.no_such_module:GoneImageProcessor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "GoneImageProcessor"}))
    with pytest.raises(ValueError, match="GoneImageProcessor is not available in this installation"):
        AutoImageProcessor.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_features_uses_the_models_processor(tmp_path, capsys):
    from timm_backbone.cli import main

    TimmBackbone(TimmBackboneConfig("resnet10t", out_indices=[1, 4])).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**SWIN_PROCESSOR, "size": 96}))
    assert main(["features", str(tmp_path), "--out-indices", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "preprocessed by ViTImageProcessor" in out
    assert "[1] layer1: [1, 64, 24, 24]" in out and "[4] layer4: [1, 512, 3, 3]" in out
    assert main(["features", str(tmp_path), "--out-indices", "1", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "preprocessed by" not in out and "[1] layer1: [1, 64, 16, 16]" in out


# --------------------------------------------------------------------------------------------- task checkpoints
def test_maskformer_checkpoint_gives_its_backbone(tmp_path):
    from timm_backbone import MaskFormerConfig, MaskFormerForInstanceSegmentation

    config = MaskFormerConfig(backbone_config=TimmBackboneConfig("resnet10t"), num_labels=3)
    torch.manual_seed(3)
    task = MaskFormerForInstanceSegmentation(config).eval()
    task.save_pretrained(tmp_path)
    backbone = AutoBackbone.from_pretrained(tmp_path)
    assert type(backbone) is TimmBackbone and backbone.load_report.ok
    encoder = task.model.pixel_level_module.encoder
    assert backbone.out_indices == encoder.out_indices
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(backbone(x).feature_maps, encoder(x).feature_maps):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert AutoBackbone.from_pretrained(tmp_path, out_indices=[-1]).out_features == ["layer4"]


def test_transformers_maskformer_swin_checkpoint_gives_swin_backbone(tmp_path):
    swin = transformers.MaskFormerSwinConfig(
        embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = transformers.MaskFormerConfig(
        backbone_config=swin, num_labels=3, fpn_feature_size=32, mask_feature_size=32
    )
    config.decoder_config.d_model = 32
    torch.manual_seed(4)
    theirs = transformers.MaskFormerForInstanceSegmentation(config).eval()
    theirs.save_pretrained(tmp_path)
    backbone = AutoBackbone.from_pretrained(tmp_path)
    assert type(backbone) is SwinBackbone and backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = theirs.model.pixel_level_module.encoder(x).feature_maps
        got = backbone(x).feature_maps
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
