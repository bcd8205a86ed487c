"""Auto classes: one resolution path for folders, hub ids and timm names; classes picked by ``model_type``.

``AutoConfig`` / ``AutoBackbone`` / ``AutoImageProcessor`` look at ``config.json``'s ``model_type`` (never at
``architectures``: a ``SwinForImageClassification`` checkpoint gives a ``SwinBackbone`` with its weights), at a timm
hub repo's ``architecture`` + ``pretrained_cfg``, or at a timm model name. The registries below are open:
:func:`register` adds a model type, :func:`register_image_processor` a processor class.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configuration import PretrainedConfig, pop_hub_kwargs
from .hub import (
    CONFIG_NAME,
    WEIGHT_FILE_NAMES,
    is_offline,
    load_weights,
    looks_like_repo_id,
    read_json,
    resolve_file,
    resolve_weights,
)
from .image_processing import PROCESSOR_NAME

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
    register_image_processor("ViTImageProcessor", ViTImageProcessor, ("vit", "swin", "maskformer-swin"), True)
    register_image_processor("ConvNextImageProcessor", ConvNextImageProcessor, ("convnext", "resnet"), True)
    register_image_processor("TimmImageProcessor", TimmImageProcessor, ("timm_backbone", "timm_wrapper"), True)
    register_image_processor("TimmWrapperImageProcessor", TimmImageProcessor, (), True)
    maskformer = "timm_backbone.models.maskformer.image_processing:MaskFormerImageProcessor"
    register_image_processor("MaskFormerImageProcessor", maskformer, ("maskformer",), True)


def _register_builtins() -> None:
    """Model types of this package: one registration per model family (lazy imports)."""
    from .models.timm_backbone import TimmBackbone, TimmBackboneConfig

    register("timm_backbone", TimmBackboneConfig, TimmBackbone, exist_ok=True)
    from .models.maskformer.configuration import MaskFormerConfig

    register("maskformer", MaskFormerConfig, exist_ok=True)  # no backbone class: MaskFormer is a task model
    from .models.swin import SwinBackbone, SwinConfig

    for swin_type in ("swin", "maskformer-swin"):  # MaskFormer's Swin config.json and weights load natively
        register(swin_type, SwinConfig, SwinBackbone, exist_ok=True)
    from .models.resnet import ResNetBackbone, ResNetConfig

    register("resnet", ResNetConfig, ResNetBackbone, exist_ok=True)


# ---------------------------------------------------------------------------------------------- resolution
@dataclass
class Source:
    """What a name passed to ``from_pretrained`` points to, found by :func:`resolve_source`.

    Attributes:
        name: The name as given.
        kind: ``"folder"``, ``"hub"`` (a hub repo, found online or in the cache), ``"timm"`` (a timm model name or
            ``hf-hub:org/name``) or ``"file"`` (a path to one file).
        hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``.
    """

    name: str
    kind: str
    hub_kwargs: dict[str, Any] = field(default_factory=dict)
    _json: dict[str, dict[str, Any] | None] = field(default_factory=dict, repr=False)

    def resolve(self, filename: str) -> Path | None:
        """The local path of ``filename`` in this folder or hub repo, ``None`` when it has none."""
        if self.kind not in ("folder", "hub"):
            return None
        return resolve_file(self.name, filename, **self.hub_kwargs)

    def read_json(self, filename: str) -> dict[str, Any] | None:
        """``filename`` parsed (and remembered), ``None`` when the source has no such file."""
        if filename not in self._json:
            path = self.resolve(filename)
            self._json[filename] = read_json(path) if path is not None else None
        return self._json[filename]

    def offline_note(self) -> str:
        """For messages about a missing file: offline, a cached repo may simply lack files never downloaded."""
        if self.kind == "hub" and is_offline(self.hub_kwargs.get("local_files_only", False)):
            return " in the local hub cache (hub access is off: files never downloaded are not there)"
        return ""

    def describe(self) -> str:
        where = {"folder": "local folder", "hub": "hub repo", "timm": "timm model", "file": "file"}[self.kind]
        revision = self.hub_kwargs.get("revision")
        return f"{where} {self.name!r}" + (f" at revision {revision!r}" if revision and self.kind == "hub" else "")


def resolve_source(src: str | os.PathLike, **hub_kwargs: Any) -> Source:
    """Decide what ``src`` is, in order: a file, a local folder, a timm name (``resnet50``, ``resnet50.a1_in1k``,
    ``hf-hub:org/name``), a hub repo id (looked up online, or only in the cache with ``HF_HUB_OFFLINE`` /
    ``local_files_only``).

    Raises:
        OSError: none of them; the message lists what was tried and why each failed.
    """
    from .models.timm_backbone import check_timm_name

    name = os.fspath(src)
    if os.path.isfile(name):
        return Source(name, "file", hub_kwargs)
    if os.path.isdir(name):
        return Source(name, "folder", hub_kwargs)
    if name.startswith("hf-hub:"):
        return Source(name, "timm", hub_kwargs)
    tried = [f"a local folder: {os.path.abspath(name)} does not exist"]
    if "/" not in name:  # timm names never contain '/'; hub ids are 'org/name'
        try:
            check_timm_name(name)
            return Source(name, "timm", hub_kwargs)
        except ValueError as err:
            tried.append(f"a timm model name: {err}")
    if "/" not in name:
        # a bare word that is not a timm name is not looked up on the hub (ids are 'org/name'): the close
        # matches above come back at once instead of after network retries
        tried.append("a hub repo: not looked up, hub ids have the form 'org/name'")
    elif looks_like_repo_id(name):
        try:
            path = resolve_file(name, CONFIG_NAME, **hub_kwargs)  # raises when neither cached nor reachable
        except OSError as err:
            tried.append(f"a hub repo: {err}")
        else:
            commit = _snapshot_commit(path)
            if commit is not None:  # later files come from the same commit, even if the branch moves meanwhile
                hub_kwargs = {**hub_kwargs, "revision": commit}
            return Source(name, "hub", hub_kwargs)
    else:
        tried.append("a hub repo: it is not an id of the form 'org/name'")
    raise OSError(f"cannot find {name!r}; tried it as\n  - " + "\n  - ".join(tried))


def _snapshot_commit(path: Path | None) -> str | None:
    """The commit of a hub cache path ``.../snapshots/<commit>/...``, if it is one."""
    parts = path.parts if path is not None else ()
    if "snapshots" in parts[:-1]:
        commit = parts[parts.index("snapshots") + 1]
        if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit):
            return commit
    return None


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

            overrides = dict(overrides)
            model_args = {**config_dict.get("model_args", {}), **overrides.pop("model_args", {})}
            return TimmBackboneConfig(backbone=config_dict["architecture"], model_args=model_args, **overrides)
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

            return TimmBackboneConfig(backbone=source.name, **kwargs)
        if source.kind == "file":
            return AutoConfig.from_dict(read_json(source.name), **kwargs)
        config_dict = source.read_json(CONFIG_NAME)
        if config_dict is None:
            raise OSError(f"{source.describe()} has no {CONFIG_NAME}{source.offline_note()}")
        config = AutoConfig.from_dict(config_dict, **kwargs)
        config.name_or_path = source.name
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
        config_dict = source.read_json(CONFIG_NAME)
        if config_dict is None:
            raise OSError(f"{source.describe()} has no {CONFIG_NAME}{source.offline_note()}")
        if _is_timm_repo_config(config_dict):
            return TimmBackbone.from_pretrained(source.name, **load_kwargs, **hub_kwargs, **kwargs)
        config = load_kwargs.pop("config", None)
        if config is None:
            model_type = config_dict.get("model_type")
            if model_type in TASK_BACKBONE_PREFIXES and kwargs:  # the overrides are the backbone's
                config = AutoConfig.from_dict(config_dict)
            else:
                config = AutoConfig.from_dict(config_dict, **kwargs)
                kwargs = {}
            config.name_or_path = source.name
        if config.model_type in TASK_BACKBONE_PREFIXES and not _is_backbone_config(config):
            return AutoBackbone._from_task_checkpoint(source, config, kwargs, load_kwargs)
        if kwargs:
            config = type(config).from_dict(config.to_dict(), **kwargs)
        cls = AutoBackbone.backbone_class(config)
        if source.kind == "hub" and resolve_weights(source.name, **hub_kwargs) is None:
            raise OSError(
                f"{source.describe()} has none of the weight files {list(WEIGHT_FILE_NAMES)}{source.offline_note()}"
            )
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
        weights = resolve_weights(source.name, **source.hub_kwargs)
        if weights is None:
            raise OSError(
                f"{source.describe()} has none of the weight files {list(WEIGHT_FILE_NAMES)}{source.offline_note()}"
            )
        prefix = TASK_BACKBONE_PREFIXES[config.model_type]
        state_dict = load_weights(weights, src=source.name, **source.hub_kwargs)
        # keys such as "model.pixel_level_module.encoder.<backbone key>", with or without the task's "model."
        encoder = {key.partition(prefix)[2]: value for key, value in state_dict.items() if prefix in key}
        if not encoder:
            raise OSError(f"{weights} holds no backbone weights (no keys containing {prefix!r})")
        model.load_checkpoint(encoder, strict=load_kwargs.get("strict", False), source=str(weights))
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
            return AutoImageProcessor._from_processor_dict(read_json(source.name), None, kwargs)
        processor_dict = source.read_json(PROCESSOR_NAME)
        if processor_dict is not None:
            return AutoImageProcessor._from_processor_dict(processor_dict, source, kwargs)
        config_dict = source.read_json(CONFIG_NAME) or {}
        if "pretrained_cfg" in config_dict or config_dict.get("model_type") == "timm_backbone":
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
