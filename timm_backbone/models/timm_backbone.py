"""Any timm model as a backbone, through timm's public feature API (``features_only`` / ``forward_intermediates``)."""

from __future__ import annotations

import re
from typing import Any

import torch
from timm.models._features import FeatureGetterNet
from torch import nn

from ..auto import ModelFamily, register_family
from ..backbone import BackboneMixin, BackboneType
from ..configuration import BackboneConfigMixin, PretrainedConfig
from ..hub import Source, check_timm_name, resolve_source
from ..modeling import PreTrainedModel

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
        **kwargs: Other fields, kept as attributes and saved (``image_size``...), as in transformers. A keyword that
            the timm constructor of ``backbone`` takes (asked of timm with a build on the meta device) is moved to
            ``model_args`` instead, so ``TimmBackboneConfig("resnet18", drop_path_rate=0.1)`` reaches timm.
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
        self._init_stage_selection(out_features, out_indices)

    @classmethod
    def from_timm_dict(cls, timm_config: dict[str, Any], name: str = "", **overrides: Any) -> TimmBackboneConfig:
        """The config of a timm model: ``{"architecture": name}`` for a timm name, or a timm hub repo's
        ``config.json`` (``architecture`` + ``model_args``)."""
        if "architecture" not in timm_config:
            raise ValueError(f"not a timm config (no 'architecture'): keys {sorted(timm_config)}")
        check_timm_name(timm_config["architecture"])
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
    """Every feature stage of the model (timm's ``feature_info``), read from a copy built on the meta device."""
    with torch.device("meta"):
        probe = _feature_net(arch, kwargs, features_only, out_indices=(-1,)) if features_only else None
        if probe is None:
            import timm

            probe = timm.create_model(arch, **kwargs)
    info = probe.feature_info
    info = info.info if hasattr(info, "info") else info
    return [dict(d) for d in info]


def _stage_names(info: list[dict[str, Any]]) -> list[str]:
    """Unique stage names from timm's ``feature_info`` module names: a name that several stages share (the branches
    of coat and crossvit) or an empty one (tresnet's first stage) gets ``:<feature index>`` appended."""
    modules = [d["module"] for d in info]
    return [
        f"{module or 'feature'}:{i}" if not module or modules.count(module) > 1 else module
        for i, module in enumerate(modules)
    ]


def _input_size_rule(model: nn.Module, num_channels: int) -> tuple[str, tuple[int, int]] | None:
    """What timm's input patch embedding asserts about the image size: ``("fixed", img_size)`` for a strict size,
    ``("multiple", patch_size)`` when sizes must divide into patches, ``None`` when any size runs. Only a patch
    embedding that takes the image itself counts (visformer's inner ones see a stem's output, not the image)."""
    for module in model.modules():
        img_size = getattr(module, "img_size", None)
        if img_size is None or not hasattr(module, "strict_img_size"):
            continue
        proj = getattr(module, "proj", None)
        if getattr(proj, "in_channels", num_channels) != num_channels:
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
    backbone_type = BackboneType.TIMM

    def __init__(self, config: TimmBackboneConfig, *, timm_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Build the backbone with random weights, or around ``timm_state_dict`` (a timm-format checkpoint, adapted
        by timm's own filters: classifier dropped, ``in_chans`` and position embeddings resized)."""
        super().__init__(config)
        arch, create_kwargs = _create_args(config)
        info = _stage_info(arch, create_kwargs, config.features_only)
        if config.features_only and any(not d["module"] for d in info):
            # timm's FeatureListNet taps stages by module name and cannot tap an unnamed one (tresnet's first
            # stage): read the stages through the model's forward_intermediates instead
            create_kwargs["feature_cls"] = "getter"
        stage_names = _stage_names(info)
        if config.stage_names == [d["module"] for d in info]:
            config.stage_names = stage_names  # saved with timm's raw names (transformers writes those)
        if config.stage_names is not None and config.stage_names != stage_names:
            raise ValueError(
                f"config.stage_names {config.stage_names} do not match the stages of timm model {arch!r} "
                f"({stage_names}); the config was saved for another model or timm version"
            )
        config.stage_names = stage_names
        config.set_output_features_output_indices(config.out_features, config.out_indices)
        # timm builds stages up to the deepest selected one only (its feature nets prune the rest): those are held
        held = max(config.out_indices) + 1
        # the recipe of the meta-device copy that supported_input_sizes runs (without the weights)
        self._timm_args = (arch, dict(create_kwargs), tuple(range(held)))
        if timm_state_dict is not None:
            overlay = {"state_dict": timm_state_dict, "source": "", "hf_hub_id": None, "url": None, "file": None}
            create_kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        self._backbone = _feature_net(arch, create_kwargs, config.features_only, tuple(range(held)))
        self._probe: list[nn.Module] = []  # the meta-device copy, built on first use (a list: not a submodule)
        self._runs: dict[tuple[int, int], bool] = {}
        if config.freeze_batch_norm_2d:
            from timm.layers import freeze_batch_norm_2d

            self._backbone = freeze_batch_norm_2d(self._backbone)
        self._nhwc = str(getattr(self._backbone, "output_fmt", "NCHW")).endswith("NHWC")
        # feature nets that wrap forward_intermediates can compute just the selected stages
        self._getter = self._backbone.model if isinstance(self._backbone, FeatureGetterNet) else None
        if not config.features_only:
            self._getter = self._backbone
        self._size_rule = _input_size_rule(self._backbone, config.num_channels)
        strides = [d["reduction"] for d in info]
        if create_kwargs.get("feature_cls") == "getter" and config.features_only:
            strides = self._measured_strides(strides)
        self.init_stages(stage_names, [d["num_chs"] for d in info], strides, held)

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
        except (AssertionError, RuntimeError, ValueError, IndexError) as err:
            # timm checks some sizes with asserts (often without a message); others fail deep inside the model. A
            # shape that fails on the meta device too is a size the model cannot run: say which sizes do
            if self._runs_at(tuple(pixel_values.shape[-2:])):
                raise
            reason = str(err).strip() or f"{type(err).__name__} without a message"
            largest = 2 * max(self._default_input_size(), *pixel_values.shape[-2:])
            found = self.supported_input_sizes(limit=1, largest=largest)
            runs = f"it runs {found[0]}x{found[0]}" if found else f"no square size up to {largest} runs"
            raise ValueError(
                f"timm model {self.config.backbone!r} cannot run pixel_values of shape {tuple(pixel_values.shape)} "
                f"({reason}); {runs} (model.supported_input_sizes() lists the square sizes that run); resize or pad "
                f"the input"
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

    def _measured_strides(self, reported: list[int]) -> list[int]:
        """``reported`` (timm's ``feature_info``) with each stage held checked against the output sizes of a meta-device
        run at timm's default input size; a stride that does not match is replaced by the measured one (tresnet's
        first stage is reported at stride 2 but comes after a 4x space-to-depth)."""
        size = self._default_input_size() or 224
        if not self._runs_at((size, size)):
            return reported
        with torch.no_grad():
            maps = self._probe[0](torch.empty(1, self.config.num_channels, size, size, device="meta"))
        maps = list(maps.values()) if isinstance(maps, dict) else list(maps)
        strides = list(reported)
        for i, f in enumerate(maps):
            side = f.shape[1] if self._nhwc else f.shape[-2]
            if side and side not in (size // reported[i], -(-size // reported[i])):
                strides[i] = round(size / side)
        return strides

    def _default_input_size(self) -> int:
        cfg = getattr(self._backbone, "pretrained_cfg", None) or getattr(self._getter, "pretrained_cfg", None) or {}
        return int(dict(cfg).get("input_size", (0, 0, 0))[-1])

    def supported_input_sizes(self, limit: int = 3, largest: int = 1024) -> list[int]:
        """Square input sizes (height = width) that the model runs, smallest first, found by running a copy on the meta
        device (no memory, no compute) at multiples of the deepest selected stride, from :attr:`min_input_size` up to
        ``largest``, and at timm's default input size. Some timm models hold size limits inside (levit, volo,
        coatnet...) that the stride rule does not show; this tells the truth for them.

        Args:
            limit: Return at most this many sizes.
            largest: Largest size tried.
        """
        step = max(self.min_input_size, 1)
        default = self._default_input_size()
        # timm's default size first: the one size every model runs (many limited models run only that one)
        candidates = [default] if default else []
        candidates += [size for size in range(step, largest + 1, step) if size != default]
        if self._size_rule is not None and self._size_rule[0] == "fixed":
            candidates = [self._size_rule[1][0]] if self._size_rule[1][0] == self._size_rule[1][1] else []
        found = []
        for size in candidates:
            if size >= self.min_input_size and self._runs_at((size, size)):
                found.append(size)
                if len(found) == limit:
                    break
        return sorted(found)

    def _runs_at(self, size: tuple[int, int]) -> bool:
        """Whether the meta-device copy of the model runs an input of ``size`` (height, width); remembered."""
        if size in self._runs:
            return self._runs[size]
        if not self._probe:
            arch, kwargs, indices = self._timm_args
            with torch.device("meta"):
                self._probe.append(_feature_net(arch, kwargs, self.config.features_only, indices).eval())
        x = torch.empty(1, self.config.num_channels, *size, device="meta")
        try:
            with torch.no_grad():
                if self._getter is not None and not self.config.features_only:
                    self._probe[0].forward_intermediates(x, intermediates_only=True)
                else:
                    self._probe[0](x)
        except (AssertionError, RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            self._runs[size] = False
            return False
        self._runs[size] = True
        return True

    # loading ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls, config: PretrainedConfig, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> TimmBackbone:
        """Our own files (keys under ``_backbone.``) load key for key; timm-format checkpoints go through timm's own
        filters (classifier dropped, ``in_chans`` and position embeddings adapted)."""
        if any(k.startswith("_backbone.") for k in state_dict):
            return super().from_state_dict(config, state_dict, strict=strict, source=source)
        return cls(config, timm_state_dict=state_dict).eval()


register_family(ModelFamily(name="timm", config_class=TimmBackboneConfig, backbone_class=TimmBackbone), exist_ok=True)
