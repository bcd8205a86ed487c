"""Auto classes: one resolution path for folders, hub ids and timm names; classes picked by ``model_type``.

``AutoConfig`` / ``AutoBackbone`` / ``AutoImageProcessor`` look at ``config.json``'s ``model_type`` (never at
``architectures``: a ``SwinForImageClassification`` checkpoint gives a ``SwinBackbone`` with its weights), at a timm
hub repo's ``architecture`` + ``pretrained_cfg``, or at a timm model name. The registries below are open:
:func:`register` adds a model type, :func:`register_image_processor` a processor class.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .configuration import PretrainedConfig, naming_config_file
from .hub import CONFIG_NAME, Source, pop_hub_kwargs, resolve_source
from .image_processing import PROCESSOR_NAME

__all__ = ["AutoBackbone", "AutoConfig", "AutoImageProcessor", "ModelFamily", "register", "register_family",
           "resolve_source"]  # fmt: skip

# model_type -> config class, and model_type -> backbone class; extended by register()
CONFIG_MAPPING: dict[str, type[PretrainedConfig]] = {}
BACKBONE_MAPPING: dict[str, type] = {}
# processor class name (as in preprocessor_config.json) -> class, or "module:attribute" imported on first use
IMAGE_PROCESSOR_MAPPING: dict[str, type | str] = {}
# model_type -> processor class name, for preprocessor configs that name no class
PROCESSOR_FOR_MODEL_TYPE: dict[str, str] = {}

# task model_type -> the key fragment before its backbone's weights in its checkpoints; AutoBackbone gives that backbone
TASK_BACKBONE_PREFIXES: dict[str, str] = {"maskformer": "pixel_level_module.encoder."}

_BUILTINS_DONE = False


@dataclass(frozen=True)
class ModelFamily:
    """What the package knows about one backbone family, registered by the family's own file (as timm registers a
    model with its ``pretrained_filter_fn``). Conversion, the stage benchmark and MaskFormer read it here instead of
    branching on family names.

    Args:
        name: Short name (``"swin"``), as ``timm-backbone convert`` and the benchmark print it.
        config_class: The config class; its ``model_type`` and ``compatible_model_types`` are registered.
        backbone_class: The backbone class.
        timm_to_transformers: timm state dict -> transformers' layout (the base model's keys).
        transformers_to_timm: The reverse, from any transformers layout of the family.
        detect_layout: ``"timm"``, ``"transformers"`` or ``None`` (not this family) for a state dict.
        timm_architecture: config -> (timm architecture, ``model_args``) building the same model in timm.
        fields_from_timm: (timm architecture, ``model_args``) -> config fields; defaults to the config's
            ``timm_fields``.
        complete_timm_state_dict: (timm state dict, config, notes) -> the state dict timm's model needs, for
            checkpoints that lack parts timm requires (a backbone without the final norm).
        transformers_heads: (classifier key in timm's layout, in transformers', task prefix, task class, base class).
        transformers_backbone: transformers' backbone class name, the reference in tests and benchmarks.
        timm_stage: native stage index -> timm's feature index (``None``: timm has no such tap).
        timm_as_native: (stage name, timm feature map, native weights) -> the map made comparable with the native
            stage; ``comparison_note`` says how.
        benchmark_timm_args: input size -> extra ``timm.create_model`` arguments for the benchmark.
        task_layouts: task model type -> function giving the backbone state dict in that task's checkpoint layout
            (MaskFormer's own Swin).
        benchmark_models: The stage benchmark's models of the family: short name -> timm architecture.
        image_processor: The processor class name for the family's ``preprocessor_config.json`` files that name
            none (transformers' default for the model type).
    """

    name: str
    config_class: type[PretrainedConfig]
    backbone_class: type
    timm_to_transformers: Callable[[dict], dict] | None = None
    transformers_to_timm: Callable[[dict], dict] | None = None
    detect_layout: Callable[[dict], str | None] | None = None
    timm_architecture: Callable[[Any], tuple[str, dict[str, Any]]] | None = None
    fields_from_timm: Callable[..., dict[str, Any]] | None = None
    complete_timm_state_dict: Callable[[dict, Any, list], dict] | None = None
    transformers_heads: tuple[str, str, str, str, str] | None = None
    transformers_backbone: str | None = None
    timm_stage: Callable[[int], int | None] | None = None
    timm_as_native: Callable[[str, Any, dict], Any] | None = None
    comparison_note: str = ""
    benchmark_timm_args: Callable[[int], dict[str, Any]] | None = None
    task_layouts: dict[str, Callable[[dict, Any], dict]] | None = None
    benchmark_models: dict[str, str] | None = None
    image_processor: str | None = None

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.config_class.model_type, *self.config_class.compatible_model_types)

    def native_fields(self, architecture: str, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Config fields for a timm architecture and its ``model_args``."""
        read = self.fields_from_timm or self.config_class.timm_fields
        return read(architecture, **(model_args or {}))


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, exist_ok: bool = False) -> None:
    """Register a backbone family: its config and backbone classes for the Auto classes (every model type its config
    reads), and its checkpoint knowledge for conversion, the benchmark and task models.

    Raises:
        ValueError: a family of that name is registered already and ``exist_ok`` is false.
    """
    if not exist_ok and family.name in FAMILIES and FAMILIES[family.name] != family:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    for model_type in family.model_types:
        CONFIG_MAPPING.setdefault(model_type, family.config_class)
        BACKBONE_MAPPING.setdefault(model_type, family.backbone_class)
        if family.image_processor is not None:
            PROCESSOR_FOR_MODEL_TYPE.setdefault(model_type, family.image_processor)


def get_family(name: str) -> ModelFamily:
    """The registered family ``name``.

    Raises:
        ValueError: unknown; the registered families are listed.
    """
    _ensure_builtins()
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: Any) -> ModelFamily | None:
    """The registered family whose config class ``config`` is an instance of, if any."""
    _ensure_builtins()
    return next((f for f in FAMILIES.values() if isinstance(config, f.config_class)), None)


def register(
    model_type: str, config_class: type[PretrainedConfig], backbone_class: type | None = None, exist_ok: bool = False
) -> None:
    """Make ``model_type`` known to :class:`AutoConfig` (and to :class:`AutoBackbone` when a class is given).

    Raises:
        ValueError: ``model_type`` is registered already to another class and ``exist_ok`` is false.
    """
    _ensure_builtins()
    if not exist_ok and model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type] is not config_class:
        raise ValueError(f"model_type {model_type!r} is already registered to {CONFIG_MAPPING[model_type].__name__}")
    CONFIG_MAPPING[model_type] = config_class
    if backbone_class is not None:
        BACKBONE_MAPPING[model_type] = backbone_class


def register_image_processor(
    name: str, processor_class: type | str, model_types: tuple[str, ...] | list[str] = (), exist_ok: bool = False
) -> None:
    """Make ``name`` (an ``image_processor_type`` of ``preprocessor_config.json``) known to :class:`AutoImageProcessor`.

    Args:
        name: The class name as written in ``preprocessor_config.json``.
        processor_class: The class, or ``"package.module:ClassName"`` to import on first use.
        model_types: ``config.json`` model types whose processor configs (when they name no class) use it.
        exist_ok: Allow replacing a registered class.

    Raises:
        ValueError: ``name`` is registered already to another class and ``exist_ok`` is false.
    """
    _ensure_builtins()
    if not exist_ok and name in IMAGE_PROCESSOR_MAPPING and IMAGE_PROCESSOR_MAPPING[name] is not processor_class:
        raise ValueError(f"image processor {name!r} is already registered; pass exist_ok=True to replace it")
    IMAGE_PROCESSOR_MAPPING[name] = processor_class
    for model_type in model_types:
        PROCESSOR_FOR_MODEL_TYPE[model_type] = name


def _ensure_builtins() -> None:
    """Register the package's own types once, on first use (so that user registrations made later win)."""
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True  # before the imports: register() below calls back here
    try:
        _register_processors()
        _register_builtins()
    except BaseException:
        _BUILTINS_DONE = False
        raise


def _register_processors() -> None:
    from .image_processing import (
        BitImageProcessor,
        CLIPImageProcessor,
        ConvNextImageProcessor,
        DeiTImageProcessor,
        TimmImageProcessor,
        ViTImageProcessor,
    )

    register_image_processor("DeiTImageProcessor", DeiTImageProcessor, ("deit",), True)
    register_image_processor("CLIPImageProcessor", CLIPImageProcessor, ("clip", "clip_vision_model"), True)
    register_image_processor("BitImageProcessor", BitImageProcessor, ("bit", "dinov2"), True)
    register_image_processor("ViTImageProcessor", ViTImageProcessor, ("vit",), True)
    register_image_processor("ConvNextImageProcessor", ConvNextImageProcessor, ("convnext",), True)
    register_image_processor("TimmImageProcessor", TimmImageProcessor, ("timm_backbone", "timm_wrapper"), True)
    register_image_processor("TimmWrapperImageProcessor", TimmImageProcessor, (), True)
    maskformer = "timm_backbone.models.maskformer.image_processing:MaskFormerImageProcessor"
    register_image_processor("MaskFormerImageProcessor", maskformer, ("maskformer",), True)


def _register_builtins() -> None:
    """The package's model families register themselves when their files are imported."""
    importlib.import_module("timm_backbone.models")


def _config_class(model_type: str | None) -> type[PretrainedConfig] | None:
    _ensure_builtins()
    if model_type in CONFIG_MAPPING:
        return CONFIG_MAPPING[model_type]
    for cls in CONFIG_MAPPING.values():  # e.g. a class that also reads "maskformer-swin" files
        if model_type in getattr(cls, "compatible_model_types", ()):
            return cls
    return None


def _is_backbone_config(config: Any) -> bool:
    _ensure_builtins()
    return any(isinstance(config, CONFIG_MAPPING[model_type]) for model_type in BACKBONE_MAPPING)


def _is_timm_repo_config(config_dict: dict[str, Any]) -> bool:
    """A timm hub repo's config.json: ``architecture`` (+ ``pretrained_cfg``), and no transformers model_type."""
    return "architecture" in config_dict and "model_type" not in config_dict


class AutoConfig:
    """Config class by ``model_type``: ``AutoConfig.from_pretrained(src)`` or ``AutoConfig.for_model(type)``."""

    @staticmethod
    def register(model_type: str, config_class: type[PretrainedConfig], exist_ok: bool = False) -> None:
        """Make ``model_type`` resolve to ``config_class`` (as transformers' ``AutoConfig.register``)."""
        register(model_type, config_class, exist_ok=exist_ok)

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        cls = _config_class(model_type)
        if cls is None:
            raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(CONFIG_MAPPING)}")
        return cls(**kwargs)

    @staticmethod
    def from_dict(config_dict: dict[str, Any], **overrides: Any) -> PretrainedConfig:
        """The config a ``config.json`` dict describes; ``overrides`` replace its fields.

        Raises:
            ValueError: an unknown ``model_type`` and no timm ``architecture`` (the known types are listed).
        """
        model_type = config_dict.get("model_type")
        cls = _config_class(model_type)
        if cls is not None:
            return cls.from_dict(config_dict, **overrides)
        if "architecture" in config_dict:  # a timm hub repo's config.json
            from .models.timm_backbone import TimmBackboneConfig

            return TimmBackboneConfig.from_timm_dict(config_dict, **overrides)
        raise ValueError(
            f"config.json has model_type {model_type!r}, which is not one of {sorted(CONFIG_MAPPING)}, and no timm "
            f"'architecture'; register your own with timm_backbone.auto.register(model_type, ConfigClass, Backbone)"
        )

    @staticmethod
    def from_pretrained(src: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        """The config of a folder, hub id, timm name or ``config.json`` path; keyword arguments override its fields.

        Args:
            src: See :func:`resolve_source`.
            **kwargs: Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``) and
                field overrides (``out_indices``...).

        Raises:
            OSError: nothing was found; the message says what was tried.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        source = resolve_source(src, **hub_kwargs)
        if source.kind == "timm":
            from .models.timm_backbone import TimmBackboneConfig

            return TimmBackboneConfig.from_source(source, **kwargs)
        with naming_config_file(source):
            config = AutoConfig.from_dict(source.config_dict(), **kwargs)
        if source.kind != "file":
            config.set_source(source)
        return config


class AutoBackbone:
    """Backbone class by ``model_type``; classification and segmentation checkpoints give their backbone."""

    @staticmethod
    def register(config_class: type[PretrainedConfig], backbone_class: type, exist_ok: bool = False) -> None:
        """Make configs of ``config_class`` build ``backbone_class`` (as transformers' ``AutoBackbone.register``)."""
        if not config_class.model_type:
            raise ValueError(f"{config_class.__name__} needs a model_type class attribute to be registered")
        register(config_class.model_type, config_class, backbone_class, exist_ok=exist_ok)

    @staticmethod
    def config_for(src: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        """The backbone config that :meth:`from_pretrained` would build for ``src`` (no weights read)."""
        return AutoConfig.from_pretrained(src, **kwargs)

    @staticmethod
    def backbone_class(config: PretrainedConfig) -> type:
        _ensure_builtins()
        for model_type, cls in BACKBONE_MAPPING.items():
            if isinstance(config, CONFIG_MAPPING[model_type]):
                return cls
        raise ValueError(
            f"{type(config).__name__} (model_type {config.model_type!r}) is not a backbone config; backbones: "
            f"{sorted(BACKBONE_MAPPING)}"
        )

    @staticmethod
    def from_config(config: PretrainedConfig, **overrides: Any) -> Any:
        """A backbone with random weights for ``config`` (``overrides`` such as ``out_indices`` applied to a copy)."""
        if overrides:
            config = type(config).from_dict(config.to_dict(), **overrides)
        return AutoBackbone.backbone_class(config)(config)

    @staticmethod
    def from_pretrained(src: str | os.PathLike, **kwargs: Any) -> Any:
        """A backbone with weights from a folder, hub id, or timm name; overrides such as ``out_indices`` apply.

        Args:
            src: See :func:`resolve_source`.
            **kwargs: ``config`` (use it instead of the source's), ``strict``, ``torch_dtype``/``dtype``, hub
                arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``) and config
                overrides (``out_indices``, ``out_features``...).

        Raises:
            OSError: nothing was found (the message says what was tried), or the source has no weights.
            ValueError: the checkpoint is not of a backbone (the known backbones are listed).
        """
        from .models.timm_backbone import TimmBackbone

        kwargs = dict(kwargs)
        hub_kwargs = pop_hub_kwargs(kwargs)
        load_kwargs = {k: kwargs.pop(k) for k in ("config", "strict", "torch_dtype", "dtype") if k in kwargs}
        source = resolve_source(src, **hub_kwargs)
        if source.kind in ("timm", "file"):
            return TimmBackbone.from_pretrained(source.name, **load_kwargs, **hub_kwargs, **kwargs)
        hub_kwargs = source.hub_kwargs
        config_dict = source.config_dict()
        if _is_timm_repo_config(config_dict):
            return TimmBackbone.from_pretrained(source.name, **load_kwargs, **hub_kwargs, **kwargs)
        config = load_kwargs.pop("config", None)
        if config is None:
            model_type = config_dict.get("model_type")
            with naming_config_file(source):
                if model_type in TASK_BACKBONE_PREFIXES and kwargs:  # the overrides are the backbone's
                    config = AutoConfig.from_dict(config_dict)
                else:
                    config = AutoConfig.from_dict(config_dict, **kwargs)
                    kwargs = {}
            config.set_source(source)
        if config.model_type in TASK_BACKBONE_PREFIXES and not _is_backbone_config(config):
            return AutoBackbone._from_task_checkpoint(source, config, kwargs, load_kwargs)
        if kwargs:
            config = type(config).from_dict(config.to_dict(), **kwargs)
        cls = AutoBackbone.backbone_class(config)
        return cls.from_pretrained(source.name, config=config, **load_kwargs, **hub_kwargs)

    @staticmethod
    def _from_task_checkpoint(
        source: Source, config: PretrainedConfig, overrides: dict[str, Any], load_kwargs: dict[str, Any]
    ) -> Any:
        """The backbone inside a task model's checkpoint (MaskFormer): ``config.backbone_config`` with the weights
        found under the task's backbone prefix, through the backbone's own key mapping."""
        backbone_config = getattr(config, "backbone_config", None)
        if not _is_backbone_config(backbone_config):
            raise ValueError(
                f"{source.describe()} ({config.model_type}) has no backbone_config to build a backbone from"
            )
        backbone_config = type(backbone_config).from_dict(backbone_config.to_dict(), **overrides)
        model = AutoBackbone.from_config(backbone_config)
        state_dict, path = source.load_state_dict()
        prefix = TASK_BACKBONE_PREFIXES[config.model_type]
        # keys such as "model.pixel_level_module.encoder.<backbone key>", with or without the task's "model."
        encoder = {key.partition(prefix)[2]: value for key, value in state_dict.items() if prefix in key}
        if not encoder:
            raise OSError(f"{path} holds no backbone weights (no keys containing {prefix!r})")
        model.load_checkpoint(encoder, strict=load_kwargs.get("strict", False), source=path)
        dtype = load_kwargs.get("torch_dtype") or load_kwargs.get("dtype")
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()


class AutoImageProcessor:
    """The processor a ``preprocessor_config.json`` names (``image_processor_type`` or the legacy
    ``feature_extractor_type``), else the one of ``config.json``'s ``model_type``; timm names and timm repos give a
    :class:`~timm_backbone.image_processing.TimmImageProcessor` from timm's pretrained config."""

    @staticmethod
    def register(
        name: str, processor_class: type | str, model_types: tuple[str, ...] = (), exist_ok: bool = False
    ) -> None:
        """See :func:`register_image_processor`."""
        register_image_processor(name, processor_class, model_types, exist_ok)

    @staticmethod
    def processor_class(name: str) -> type:
        """The registered class for an ``image_processor_type`` (``Fast``/``Pil`` suffixes and the legacy
        ``FeatureExtractor`` spelling accepted).

        Raises:
            ValueError: not registered (the registered names are listed), or its module cannot be imported.
        """
        _ensure_builtins()
        base = name.replace("FeatureExtractor", "ImageProcessor")
        for suffix in ("Fast", "Pil"):
            base = base.removesuffix(suffix)
        if base not in IMAGE_PROCESSOR_MAPPING:
            raise ValueError(
                f"unknown image processor {name!r}; known: {sorted(IMAGE_PROCESSOR_MAPPING)}. Register yours with "
                f"AutoImageProcessor.register(name, ProcessorClass)"
            )
        target = IMAGE_PROCESSOR_MAPPING[base]
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            try:
                target = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"{base} is not available in this installation ({err})") from err
            IMAGE_PROCESSOR_MAPPING[base] = target
        return target

    @staticmethod
    def from_pretrained(src: str | os.PathLike, **kwargs: Any) -> Any:
        """The processor of a folder, hub id, timm name or ``preprocessor_config.json`` path.

        Args:
            src: See :func:`resolve_source`.
            **kwargs: Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``) and
                processor fields (``size``, ``backend``...). transformers' ``use_fast`` is accepted and ignored.

        Raises:
            OSError: nothing was found, or the source has neither a ``preprocessor_config.json`` nor a timm config.
            ValueError: the processor class named in the file is unknown.
        """
        from .image_processing import TimmImageProcessor

        kwargs = dict(kwargs)
        kwargs.pop("use_fast", None)
        hub_kwargs = pop_hub_kwargs(kwargs)
        source = resolve_source(src, **hub_kwargs)
        if source.kind == "timm":
            return TimmImageProcessor.from_pretrained(source.name, **hub_kwargs, **kwargs)
        if source.kind == "file":
            return AutoImageProcessor._from_processor_dict(source.config_dict(), None, kwargs)
        processor_dict = source.read_json(PROCESSOR_NAME)
        if processor_dict is not None:
            return AutoImageProcessor._from_processor_dict(processor_dict, source, kwargs)
        config_dict = source.read_json(CONFIG_NAME) or {}
        is_timm = PROCESSOR_FOR_MODEL_TYPE.get(config_dict.get("model_type")) == "TimmImageProcessor"
        if "pretrained_cfg" in config_dict or is_timm:
            return TimmImageProcessor.from_pretrained(source.name, **source.hub_kwargs, **kwargs)
        raise OSError(
            f"{source.describe()} has no {PROCESSOR_NAME}, and its {CONFIG_NAME} is not a timm model's (no "
            f"pretrained_cfg){source.offline_note()}; build a processor directly, e.g. ViTImageProcessor(size=224)"
        )

    @staticmethod
    def _from_processor_dict(processor_dict: dict[str, Any], source: Source | None, kwargs: dict[str, Any]) -> Any:
        name = processor_dict.get("image_processor_type") or processor_dict.get("feature_extractor_type")
        if name is None and source is not None:
            model_type = (source.read_json(CONFIG_NAME) or {}).get("model_type")
            name = PROCESSOR_FOR_MODEL_TYPE.get(model_type)
            if name is None:
                raise ValueError(
                    f"{PROCESSOR_NAME} of {source.describe()} names no image_processor_type, and model_type "
                    f"{model_type!r} has no default processor; known: {sorted(PROCESSOR_FOR_MODEL_TYPE)}"
                )
        if name is None:
            raise ValueError(f"this {PROCESSOR_NAME} names no image_processor_type (or feature_extractor_type)")
        return AutoImageProcessor.processor_class(name).from_dict(processor_dict, **kwargs)


def load_backbone(config: PretrainedConfig) -> Any:
    """The backbone a config names, as transformers' ``load_backbone``: a backbone config builds its backbone (random
    weights); a task config (MaskFormer's) builds ``config.backbone_config``, or the backbone named by
    ``config.backbone`` with ``use_timm_backbone``, ``use_pretrained_backbone`` (weights loaded, from the cache when
    offline) and ``backbone_kwargs`` (field overrides such as ``out_indices``).

    Raises:
        ValueError: the config names no backbone, or both ``backbone_config`` and ``backbone`` /
            ``backbone_kwargs``.
    """
    from .models.maskformer.configuration import resolve_backbone_config

    if _is_backbone_config(config):
        return AutoBackbone.from_config(config)
    backbone_config = getattr(config, "backbone_config", None)
    name = getattr(config, "backbone", None)
    backbone_kwargs = dict(getattr(config, "backbone_kwargs", None) or {})
    if backbone_config is None and name is None:
        raise ValueError(
            f"{type(config).__name__} names no backbone: set backbone_config, or backbone (a timm name, folder or hub "
            f"id) with use_timm_backbone / use_pretrained_backbone"
        )
    if backbone_config is None and getattr(config, "use_pretrained_backbone", False):
        return AutoBackbone.from_pretrained(name, **backbone_kwargs)
    use_timm = bool(getattr(config, "use_timm_backbone", False))
    return AutoBackbone.from_config(resolve_backbone_config(backbone_config, name, use_timm, backbone_kwargs))
