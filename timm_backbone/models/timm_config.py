"""The config of :class:`~timm_backbone.models.timm_backbone.TimmBackbone`, and the turning of it into
``timm.create_model`` arguments: which keys reach timm, which stay config fields, which are refused in files."""

from __future__ import annotations

import re
from typing import Any

import torch

from ..configuration import MAX_DEPTH, MAX_WIDTH, BackboneConfigMixin, PretrainedConfig, check_int
from ..hub import Source, check_timm_name, resolve_source
from ..necks import FEATURE_PYRAMIDS

# keys of config.json that describe the config itself, never arguments for timm.create_model
_CONFIG_KEYS = {
    "architectures",
    "id2label",
    "label2id",
    "num_labels",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "use_return_dict",
    "problem_type",
    "is_encoder_decoder",
    "tie_word_embeddings",
    "chunk_size_feed_forward",
    "use_timm_backbone",
    "stage_names",
    "_name_or_path",
    "name_or_path",
    "model_args",
    "pretrained_cfg",
    "use_bfloat16",
    "torchscript",
    "frozen_stages",
    "norm_eval",
}


# timm.create_model arguments that make timm download or read weights (at any depth of model_args): honoured when a
# caller passes them in code, refused when they come from a file, which must never reach the network or other files
FETCHING_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                 "pretrained_strict", "file", "url", "hf_hub_id", "hf_hub_filename", "state_dict",
                 "source")  # fmt: skip
# model_args naming a number of blocks per stage
_DEPTH_ARGS = ("depth", "depths", "layers", "num_blocks", "block_repeats")


def check_file_model_args(model_args: Any, where: str = "model_args") -> None:
    """Refuse ``timm.create_model`` arguments read from a file that would make timm fetch or read weights.

    Raises:
        TypeError: ``model_args`` is not an object.
        ValueError: naming the key and the arguments that are refused.
    """
    if not isinstance(model_args, dict):
        raise TypeError(f"{where} must be an object of timm.create_model arguments, got {type(model_args).__name__}")
    for key, value in model_args.items():
        if key in FETCHING_ARGS:
            raise ValueError(
                f"{where} sets {key!r}, which makes timm download or read weights; a config file may not set "
                f"{list(FETCHING_ARGS)} (pass them in code, or load weights with from_pretrained)"
            )
        if isinstance(value, dict):
            check_file_model_args(value, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, dict):
                    check_file_model_args(item, f"{where}[{key!r}]")


def _check_model_arg_sizes(value: Any, where: str) -> None:
    """Numbers in ``model_args`` within sane limits: blocks per stage up to MAX_DEPTH, other ints up to MAX_WIDTH."""
    if isinstance(value, dict):
        for key, item in value.items():
            limit = MAX_DEPTH if key in _DEPTH_ARGS else MAX_WIDTH
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > limit:
                raise ValueError(f"{where}[{key!r}] is {item}, beyond the limit {limit}")
            if isinstance(item, (list, tuple)) and all(isinstance(v, int) for v in item):
                for i, v in enumerate(item):
                    if abs(v) > limit:
                        raise ValueError(f"{where}[{key!r}][{i}] is {v}, beyond the limit {limit}")
            elif isinstance(item, (dict, list, tuple)):
                _check_model_arg_sizes(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_model_arg_sizes(item, where)


class TimmBackboneConfig(BackboneConfigMixin, PretrainedConfig):
    """Config of :class:`TimmBackbone`; ``config.json``-compatible with transformers' ``timm_backbone``.

    Args:
        backbone: A timm model name, with or without a pretrained tag (``resnet50``, ``resnet50.a1_in1k``), or
            ``hf-hub:org/name``.
        num_channels: Input channels (timm's ``in_chans``).
        features_only: Build timm's feature extractor (the default); ``False`` builds the whole model and reads
            its stages through ``forward_intermediates``.
        use_pretrained_backbone: Kept for compatibility; the constructor never downloads. Pretrained weights come
            from :meth:`TimmBackbone.from_pretrained`.
        out_indices: Stages to output (timm feature indices); negative values count from the end.
        out_features: Stages to output by timm module name (``layer1``); either this or ``out_indices``.
        freeze_batch_norm_2d: Replace BatchNorm layers with frozen ones (detection fine-tuning).
        output_stride: Dilate the last stages for this total stride (8, 16), where the model supports it.
        model_args: Further keyword arguments for ``timm.create_model`` (``img_size``, ``drop_path_rate``...).
        feature_pyramid: ``"simple"`` adds ViTDet's simple feature pyramid (:class:`~timm_backbone.necks.
            SimpleFeaturePyramid`) over four taps of a single-stride token model (ViT, DeiT, EVA, DINOv2, SAM's
            encoder): the selected taps come out at 4x, 2x, 1x and 0.5x their resolution (strides 4, 8, 16, 32 for
            patch 16). Without a selection, four evenly spaced blocks are tapped (2, 5, 8, 11 of 12).
        feature_pyramid_channels: Width of the pyramid's levels; the taps' width by default.
        output_prefix_tokens: Also return the class/register tokens of each selected tap in
            ``BackboneOutput.prefix_tokens`` (token models with ``forward_intermediates``).
        **kwargs: Other fields, kept as attributes and saved (``image_size``...), as in transformers; the
            fine-tuning fields ``frozen_stages`` and ``norm_eval`` among them (see
            :class:`~timm_backbone.configuration.BackboneConfigMixin`). A keyword that the timm constructor of
            ``backbone`` takes (asked of timm with a build on the meta device) is moved to ``model_args`` instead, so
            ``TimmBackboneConfig("resnet18", drop_path_rate=0.1)`` reaches timm.
    """

    model_type = "timm_backbone"

    def __init__(
        self,
        backbone: str | None = None,
        num_channels: int = 3,
        features_only: bool = True,
        use_pretrained_backbone: bool = True,
        out_indices: list[int] | tuple[int, ...] | None = None,
        out_features: list[str] | None = None,
        freeze_batch_norm_2d: bool = False,
        output_stride: int | None = None,
        model_args: dict[str, Any] | None = None,
        stage_names: list[str] | None = None,
        feature_pyramid: str | None = None,
        feature_pyramid_channels: int | None = None,
        output_prefix_tokens: bool = False,
        **kwargs: Any,
    ) -> None:
        if backbone is not None and not isinstance(backbone, str):
            raise TypeError(f"backbone must be a timm model name (str), got {type(backbone).__name__}")
        _check_pyramid_fields(feature_pyramid, feature_pyramid_channels)
        model_args = dict(model_args or {})
        candidates = {k: v for k, v in kwargs.items() if k not in _CONFIG_KEYS and not k.startswith("_")}
        for key in _timm_create_keys(backbone, candidates):
            model_args[key] = kwargs.pop(key)
        super().__init__(**kwargs)
        self.backbone = backbone
        self.num_channels = num_channels
        self.features_only = features_only
        self.use_pretrained_backbone = use_pretrained_backbone
        self.freeze_batch_norm_2d = freeze_batch_norm_2d
        self.output_stride = output_stride
        self.model_args = model_args
        self.stage_names = list(stage_names) if stage_names is not None else None
        self.feature_pyramid = feature_pyramid
        self.feature_pyramid_channels = feature_pyramid_channels
        self.output_prefix_tokens = bool(output_prefix_tokens)
        self.validate()
        self._init_stage_selection(out_features, out_indices)

    def validate(self) -> None:
        """Types and ranges of the fields, and sane sizes in ``model_args`` (see :meth:`PretrainedConfig.validate`)."""
        check_int("num_channels", self.num_channels)
        if self.output_stride is not None:
            check_int("output_stride", self.output_stride, high=64)
        if not isinstance(self.model_args, dict):
            raise TypeError(f"model_args must be a dict of timm.create_model arguments, got {self.model_args!r}")
        _check_model_arg_sizes(self.model_args, "model_args")
        super().validate()

    @classmethod
    def from_timm_dict(cls, timm_config: dict[str, Any], name: str = "", **overrides: Any) -> TimmBackboneConfig:
        """The config of a timm model: ``{"architecture": name}`` for a timm name, or a timm hub repo's
        ``config.json`` (``architecture`` + ``model_args``)."""
        if "architecture" not in timm_config:
            raise ValueError(f"not a timm config (no 'architecture'): keys {sorted(timm_config)}")
        check_timm_name(timm_config["architecture"])
        check_file_model_args(timm_config.get("model_args", {}))
        overrides = dict(overrides)
        model_args = {**timm_config.get("model_args", {}), **overrides.pop("model_args", {})}
        backbone = overrides.pop("backbone", timm_config["architecture"])
        config = cls(backbone=backbone, model_args=model_args, **overrides)
        config.name_or_path = name
        return config

    @classmethod
    def from_source(cls, source: Source, **overrides: Any) -> TimmBackboneConfig:
        """As the base, and a weights file with ``backbone=`` naming its timm architecture."""
        if source.kind == "file" and not source.name.endswith(".json"):
            if not overrides.get("backbone"):
                raise ValueError(f"loading the weights file {source.name} needs backbone='<timm name>' (or a config)")
            return cls(**overrides)
        return super().from_source(source, **overrides)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> TimmBackboneConfig:
        if "architecture" in config_dict and "model_type" not in config_dict:  # a timm hub repo's config.json
            return cls.from_timm_dict(config_dict, **overrides)
        # unknown keys read from a file stay plain attributes; only explicit overrides reach timm
        config_dict = dict(config_dict)
        if config_dict.get("model_args") is not None:
            check_file_model_args(config_dict["model_args"])
        if overrides.get("out_indices") is not None or overrides.get("out_features") is not None:
            config_dict.pop("out_indices", None)
            config_dict.pop("out_features", None)
        extra = {k: config_dict.pop(k) for k in list(config_dict) if k not in _INIT_KEYS and k not in _CONFIG_KEYS}
        config = super().from_dict(config_dict, **overrides)
        for key, value in extra.items():
            setattr(config, key, value)
        return config


_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def _timm_create_keys(backbone: str | None, candidates: dict[str, Any]) -> list[str]:
    """The keys of ``candidates`` that ``timm.create_model(backbone, ...)`` takes, asked of timm by building the model
    on the meta device and dropping each keyword it reports as unexpected. Nothing is taken when timm cannot be asked
    (no backbone yet, or a name timm does not know): the keys stay config attributes."""
    if not candidates or not backbone or backbone.startswith("hf-hub:"):
        return []
    import timm

    if not timm.is_model(backbone.split(".")[0]):
        return []
    taken = dict(candidates)
    while taken:
        try:
            with torch.device("meta"):
                timm.create_model(backbone.split(".")[0], pretrained=False, **taken)
        except TypeError as err:
            match = _UNEXPECTED_KEYWORD.search(str(err))
            if match is None or match.group(1) not in taken:
                break  # a key timm takes with a value it rejects: building the model reports it
            del taken[match.group(1)]
            continue
        except (ValueError, AssertionError, RuntimeError, NotImplementedError):
            break  # accepted keywords with values timm rejects, or a model the meta device cannot build
        break
    return list(taken)


_INIT_KEYS = {
    "backbone",
    "num_channels",
    "features_only",
    "use_pretrained_backbone",
    "out_indices",
    "out_features",
    "freeze_batch_norm_2d",
    "output_stride",
    "model_args",
    "stage_names",
    "feature_pyramid",
    "feature_pyramid_channels",
    "output_prefix_tokens",
}


def _check_pyramid_fields(feature_pyramid: Any, channels: Any) -> None:
    if feature_pyramid is not None and feature_pyramid not in FEATURE_PYRAMIDS:
        raise ValueError(f"feature_pyramid must be one of {list(FEATURE_PYRAMIDS)} or None, got {feature_pyramid!r}")
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
        raise ValueError(f"feature_pyramid_channels must be a positive int or None, got {channels!r}")


def _create_args(config: TimmBackboneConfig) -> tuple[str, dict[str, Any]]:
    """The architecture and keyword arguments for ``timm.create_model`` described by ``config``."""
    if not config.backbone:
        raise ValueError("TimmBackboneConfig needs a backbone: a timm model name such as 'resnet50'")
    kwargs = dict(config.model_args)
    if config.backbone.startswith("hf-hub:"):
        # the architecture is named by the repo's config.json, read from the cache when offline
        repo_config = resolve_source(config.backbone).config_dict()
        arch = repo_config.get("architecture")
        if not arch:
            raise OSError(f"{config.backbone}: config.json names no 'architecture'; it is not a timm repo")
        check_file_model_args(repo_config.get("model_args", {}), f"{config.backbone} config.json model_args")
        kwargs = {**repo_config.get("model_args", {}), **kwargs}
    else:
        check_timm_name(config.backbone)
        arch = config.backbone
    kwargs["in_chans"] = config.num_channels
    if config.output_stride is not None:
        kwargs["output_stride"] = config.output_stride
    return arch, kwargs
