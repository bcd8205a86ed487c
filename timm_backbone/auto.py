"""Auto classes: pick the config and backbone class from ``config.json``'s ``model_type``, or a timm name."""

from __future__ import annotations

import os
from typing import Any

from .configuration import PretrainedConfig, pop_hub_kwargs
from .hub import CONFIG_NAME, read_json, resolve_file

# model_type -> config class, and model_type -> backbone class; extended by register()
CONFIG_MAPPING: dict[str, type[PretrainedConfig]] = {}
BACKBONE_MAPPING: dict[str, type] = {}


def register(
    model_type: str, config_class: type[PretrainedConfig], backbone_class: type | None = None, exist_ok: bool = False
) -> None:
    """Make ``model_type`` known to :class:`AutoConfig` (and to :class:`AutoBackbone` when a class is given).

    Raises:
        ValueError: ``model_type`` is registered already and ``exist_ok`` is false.
    """
    if not exist_ok and model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type] is not config_class:
        raise ValueError(f"model_type {model_type!r} is already registered to {CONFIG_MAPPING[model_type].__name__}")
    CONFIG_MAPPING[model_type] = config_class
    if backbone_class is not None:
        BACKBONE_MAPPING[model_type] = backbone_class


def _register_builtins() -> None:
    from .models.timm_backbone import TimmBackbone, TimmBackboneConfig

    register("timm_backbone", TimmBackboneConfig, TimmBackbone, exist_ok=True)
    from .models.maskformer.configuration import MaskFormerConfig

    register("maskformer", MaskFormerConfig, exist_ok=True)  # no backbone class: MaskFormer is a task model


def _is_timm_name(src: str) -> bool:
    """timm names have no '/' (hub ids are 'org/name'); ``hf-hub:org/name`` is timm's spelling of a timm hub repo."""
    return src.startswith("hf-hub:") or ("/" not in src and not os.path.exists(src))


class AutoConfig:
    """Config class by ``model_type``: ``AutoConfig.from_pretrained(src)`` or ``AutoConfig.for_model(type)``."""

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        _register_builtins()
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(CONFIG_MAPPING)}")
        return CONFIG_MAPPING[model_type](**kwargs)

    @staticmethod
    def from_dict(config_dict: dict[str, Any], **overrides: Any) -> PretrainedConfig:
        _register_builtins()
        model_type = config_dict.get("model_type")
        if model_type in CONFIG_MAPPING:
            return CONFIG_MAPPING[model_type].from_dict(config_dict, **overrides)
        if "architecture" in config_dict:  # a timm hub repo's config.json
            from .models.timm_backbone import TimmBackboneConfig

            model_args = {**config_dict.get("model_args", {}), **overrides.pop("model_args", {})}
            return TimmBackboneConfig(backbone=config_dict["architecture"], model_args=model_args, **overrides)
        raise ValueError(
            f"config.json has model_type {model_type!r}, which is not one of {sorted(CONFIG_MAPPING)}, and no timm "
            f"'architecture'"
        )

    @staticmethod
    def from_pretrained(src: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        """The config of a folder, hub id or timm name; keyword arguments override its fields.

        Raises:
            OSError: nothing was found; the message says what was tried.
        """
        src = os.fspath(src)
        hub_kwargs = pop_hub_kwargs(kwargs)
        if _is_timm_name(src):
            from .models.timm_backbone import TimmBackboneConfig

            return TimmBackboneConfig(backbone=src, **kwargs)
        if os.path.isfile(src):
            return AutoConfig.from_dict(read_json(src), **kwargs)
        try:
            path = resolve_file(src, CONFIG_NAME, **hub_kwargs)
        except OSError as err:
            raise OSError(f"{src!r} is not a timm model name, and {err}") from err
        if path is None:
            raise OSError(f"{src!r} has no {CONFIG_NAME} (tried it as a local folder / hub repo and as a timm name)")
        config = AutoConfig.from_dict(read_json(path), **kwargs)
        config.name_or_path = src
        return config


class AutoBackbone:
    """Backbone class by ``model_type``; classification and segmentation checkpoints give their backbone."""

    @staticmethod
    def config_for(src: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        """The backbone config that :meth:`from_pretrained` would build for ``src`` (no weights read)."""
        return AutoConfig.from_pretrained(src, **kwargs)

    @staticmethod
    def backbone_class(config: PretrainedConfig) -> type:
        _register_builtins()
        for model_type, cls in BACKBONE_MAPPING.items():
            if isinstance(config, CONFIG_MAPPING[model_type]):
                return cls
        raise ValueError(
            f"{type(config).__name__} (model_type {config.model_type!r}) is not a backbone config; backbones: "
            f"{sorted(BACKBONE_MAPPING)}"
        )

    @staticmethod
    def from_config(config: PretrainedConfig) -> Any:
        """A backbone with random weights for ``config``."""
        return AutoBackbone.backbone_class(config)(config)

    @staticmethod
    def from_pretrained(src: str | os.PathLike, **kwargs: Any) -> Any:
        """A backbone with weights from a folder, hub id, or timm name; overrides such as ``out_indices`` apply.

        Raises:
            OSError: nothing was found; the message says what was tried.
        """
        src = os.fspath(src)
        if _is_timm_name(src):
            from .models.timm_backbone import TimmBackbone

            return TimmBackbone.from_pretrained(src, **kwargs)
        hub_kwargs = {
            k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs
        }
        overrides = {k: v for k, v in kwargs.items() if k not in hub_kwargs and k != "strict"}
        config = AutoConfig.from_pretrained(src, **hub_kwargs, **overrides)
        return AutoBackbone.backbone_class(config).from_pretrained(src, **kwargs)
