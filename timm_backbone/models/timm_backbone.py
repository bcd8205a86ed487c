"""Any timm model as a backbone, through timm's public feature API (``features_only`` / ``forward_intermediates``)."""

from __future__ import annotations

from typing import Any

import torch
from timm.models._features import FeatureGetterNet
from torch import nn

from ..auto import ModelFamily, register_family
from ..backbone import BackboneMixin
from ..configuration import MAX_DEPTH, MAX_WIDTH, BackboneConfigMixin, PretrainedConfig, check_int
from ..hub import Source, check_timm_name, resolve_source
from ..modeling import PreTrainedModel, check_weight_dtypes

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
        **kwargs: Keyword arguments that are not config fields are added to ``model_args``.
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
        **kwargs: Any,
    ) -> None:
        if backbone is not None and not isinstance(backbone, str):
            raise TypeError(f"backbone must be a timm model name (str), got {type(backbone).__name__}")
        model_args = dict(model_args or {})
        for key in list(kwargs):
            if key not in _CONFIG_KEYS and not key.startswith("_"):
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
}


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


def _feature_net(arch: str, kwargs: dict[str, Any], features_only: bool, out_indices: tuple[int, ...]) -> nn.Module:
    import timm

    if features_only:
        try:
            return timm.create_model(arch, features_only=True, out_indices=out_indices, **kwargs)
        except (RuntimeError, AssertionError, TypeError, AttributeError, KeyError) as err:
            raise ValueError(
                f"timm model {arch!r} cannot be built as a feature extractor (features_only) with {kwargs}: {err}"
            ) from err
    model = timm.create_model(arch, **kwargs)
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {arch!r} has no forward_intermediates; use features_only=True")
    return model


def _stage_info(arch: str, kwargs: dict[str, Any], features_only: bool) -> list[dict[str, Any]]:
    """Every feature stage of the model (timm's ``feature_info``), read from a copy built on the meta device (without
    pretrained weights: nothing is read for it)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in FETCHING_ARGS}
    with torch.device("meta"):
        probe = _feature_net(arch, kwargs, features_only, out_indices=(-1,)) if features_only else None
        if probe is None:
            import timm

            probe = timm.create_model(arch, **kwargs)
    info = probe.feature_info
    info = info.info if hasattr(info, "info") else info
    return [dict(d) for d in info]


def _input_size_rule(model: nn.Module) -> tuple[str, tuple[int, int]] | None:
    """What timm's input patch embedding asserts about the image size: ``("fixed", img_size)`` for a strict size,
    ``("multiple", patch_size)`` when sizes must divide into patches, ``None`` when any size runs."""
    for module in model.modules():
        img_size = getattr(module, "img_size", None)
        if img_size is None or not hasattr(module, "strict_img_size"):
            continue
        if module.strict_img_size:
            return "fixed", tuple(img_size)
        if not getattr(module, "dynamic_img_pad", False) and hasattr(module, "patch_size"):
            return "multiple", tuple(module.patch_size)
        return None
    return None


class TimmBackbone(BackboneMixin, PreTrainedModel):
    """A timm model behind the backbone API: ``feature_maps`` NCHW, stages named as timm's ``feature_info``.

    Only the stages up to the deepest selected one are built and run.
    """

    config_class = TimmBackboneConfig
    checkpoint_prefixes = ("_backbone.",)

    def __init__(self, config: TimmBackboneConfig, *, timm_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Build the backbone with random weights, or around ``timm_state_dict`` (a timm-format checkpoint, adapted
        by timm's own filters: classifier dropped, ``in_chans`` and position embeddings resized)."""
        super().__init__(config)
        arch, create_kwargs = _create_args(config)
        info = _stage_info(arch, create_kwargs, config.features_only)
        stage_names = [d["module"] for d in info]
        if config.stage_names is not None and config.stage_names != stage_names:
            raise ValueError(
                f"config.stage_names {config.stage_names} do not match the stages of timm model {arch!r} "
                f"({stage_names}); the config was saved for another model or timm version"
            )
        config.stage_names = stage_names
        config.set_output_features_output_indices(config.out_features, config.out_indices)
        # timm builds stages up to the deepest selected one only (its feature nets prune the rest): those are held
        held = max(config.out_indices) + 1
        if timm_state_dict is not None:
            overlay = {"state_dict": timm_state_dict, "source": "", "hf_hub_id": None, "url": None, "file": None}
            create_kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        self._backbone = _feature_net(arch, create_kwargs, config.features_only, tuple(range(held)))
        if config.freeze_batch_norm_2d:
            from timm.layers import freeze_batch_norm_2d

            self._backbone = freeze_batch_norm_2d(self._backbone)
        self._nhwc = str(getattr(self._backbone, "output_fmt", "NCHW")).endswith("NHWC")
        # feature nets that wrap forward_intermediates can compute just the selected stages
        self._getter = self._backbone.model if isinstance(self._backbone, FeatureGetterNet) else None
        if not config.features_only:
            self._getter = self._backbone
        self._size_rule = _input_size_rule(self._backbone)
        self.init_stages(stage_names, [d["num_chs"] for d in info], [d["reduction"] for d in info], held)

    def forward_stages(
        self, pixel_values: torch.Tensor, indices: tuple[int, ...], output_attentions: bool
    ) -> tuple[dict[int, torch.Tensor], None]:
        empty = pixel_values.shape[0] == 0
        if empty:  # timm's ViTs cannot reshape an empty batch: run one blank image and keep none of it
            pixel_values = pixel_values.new_zeros(1, *pixel_values.shape[1:])
        try:
            if self._getter is not None:
                features = self._getter.forward_intermediates(
                    pixel_values,
                    indices=list(indices),
                    norm=getattr(self._backbone, "norm", False),
                    output_fmt="NCHW",
                    intermediates_only=True,
                )
                by_stage = dict(zip(indices, features))
            else:
                features = self._backbone(pixel_values)
                if isinstance(features, dict):
                    features = list(features.values())
                by_stage = dict(enumerate(features))
        except AssertionError as err:  # timm checks input sizes with asserts
            raise ValueError(
                f"timm model {self.config.backbone!r} rejected pixel_values of shape {tuple(pixel_values.shape)}: {err}"
            ) from err
        if self._nhwc:
            by_stage = {i: f.permute(0, 3, 1, 2) for i, f in by_stage.items()}
        if empty:
            by_stage = {i: f[:0] for i, f in by_stage.items()}
        return by_stage, None

    def check_pixel_values(self, pixel_values: Any, min_size: int | None = None) -> None:
        """The base checks, plus the fixed or patch-multiple image size that timm's patch embedding requires."""
        super().check_pixel_values(pixel_values, min_size)
        if self._size_rule is None:
            return
        kind, (rule_h, rule_w) = self._size_rule
        height, width = pixel_values.shape[-2:]
        if kind == "fixed" and (height, width) != (rule_h, rule_w):
            raise ValueError(
                f"timm model {self.config.backbone!r} takes {rule_h}x{rule_w} images only, got {height}x{width}; "
                f"resize the input, or build it for another size with model_args={{'img_size': ...}} (or "
                f"'dynamic_img_size': True where timm supports it)"
            )
        if kind == "multiple" and (height % rule_h or width % rule_w):
            raise ValueError(
                f"timm model {self.config.backbone!r} needs height and width divisible by its patch size "
                f"{rule_h}x{rule_w}, got {height}x{width}; resize or pad the input (or pass "
                f"model_args={{'dynamic_img_pad': True}})"
            )

    # loading ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls, config: PretrainedConfig, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> TimmBackbone:
        """Our own files (keys under ``_backbone.``) load key for key; timm-format checkpoints go through timm's own
        filters (classifier dropped, ``in_chans`` and position embeddings adapted)."""
        if any(k.startswith("_backbone.") for k in state_dict):
            return super().from_state_dict(config, state_dict, strict=strict, source=source)
        # timm copies any dtype into its parameters: weights and biases must at least be floating point
        learned = {k: torch.empty(0) for k in state_dict if k.endswith((".weight", ".bias"))}
        check_weight_dtypes(state_dict, learned, source)
        return cls(config, timm_state_dict=state_dict).eval()


register_family(ModelFamily(name="timm", config_class=TimmBackboneConfig, backbone_class=TimmBackbone), exist_ok=True)
