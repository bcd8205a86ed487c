"""Config base: keyword fields, transformers-compatible ``config.json``, save/from_pretrained."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from .backbone import align_stage_selection
from .hub import CONFIG_NAME, atomic_write, read_json, resolve_file

HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


def pop_hub_kwargs(kwargs: dict) -> dict:
    """Split the hub arguments (revision, cache_dir, token, local_files_only, subfolder) out of ``kwargs``."""
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    if "use_auth_token" in kwargs:
        hub.setdefault("token", kwargs.pop("use_auth_token"))
    kwargs.pop("force_download", None)
    kwargs.pop("trust_remote_code", None)  # never honoured: no code is run from checkpoints
    return hub


class PretrainedConfig:
    """Base config: every keyword becomes an attribute, unknown ones included, and survives a JSON round trip.

    Subclasses set ``model_type`` (the key transformers uses for the same architecture) and take their fields as
    typed keyword arguments.
    """

    model_type: ClassVar[str] = ""
    # config.json files of these model types may be loaded by this class as well (e.g. maskformer-swin by swin)
    compatible_model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        id2label = kwargs.pop("id2label", None)
        num_labels = kwargs.pop("num_labels", None)
        kwargs.pop("label2id", None)
        if id2label is not None:
            self.id2label = {int(k): v for k, v in id2label.items()}
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels if num_labels is not None else 2)}
        self.architectures = kwargs.pop("architectures", None)
        self.name_or_path = kwargs.pop("_name_or_path", kwargs.pop("name_or_path", ""))
        kwargs.pop("model_type", None)
        kwargs.pop("transformers_version", None)
        for key, value in kwargs.items():
            setattr(self, key, value)

    # labels ------------------------------------------------------------------------------------------------------
    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}

    # serialisation -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_") and k != "name_or_path"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = self.label2id
        out["model_type"] = self.model_type
        return {k: _jsonable(v) for k, v in sorted(out.items())}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` into ``save_directory`` (created if needed), atomically."""
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise OSError(f"{save_directory} is a file; save_pretrained needs a folder")
        save_directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(save_directory / CONFIG_NAME, "w") as f:
            f.write(self.to_json_string())

    @classmethod
    def get_config_dict(cls, src: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
        """Read ``config.json`` from a folder, a hub id or a path to the JSON file itself."""
        if os.path.isfile(src):
            return read_json(src)
        path = resolve_file(src, CONFIG_NAME, **hub_kwargs)
        if path is None:
            raise OSError(f"{os.fspath(src)!r} has no {CONFIG_NAME}")
        return read_json(path)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        """Load a config from a folder or hub id; other keyword arguments override its fields.

        Args:
            src: A local folder, a ``config.json`` path, or a hub repo id.
            **kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder`` for the hub, and
                field overrides such as ``out_indices``.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        config_dict = cls.get_config_dict(src, **hub_kwargs)
        config = cls.from_dict(config_dict, **kwargs)
        config.name_or_path = os.fspath(src)
        return config

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> PretrainedConfig:
        model_type = config_dict.get("model_type")
        if (
            model_type is not None
            and cls.model_type
            and model_type not in (cls.model_type, *cls.compatible_model_types)
        ):
            raise ValueError(
                f"this config.json has model_type {model_type!r}, but {cls.__name__} reads {cls.model_type!r}; "
                f"use AutoConfig, or the config class for {model_type!r}"
            )
        if any(overrides.get(k) is not None for k in ("out_indices", "out_features")):
            # a new selection replaces the file's whole selection (it saves both forms, which would disagree)
            config_dict = {k: v for k, v in config_dict.items() if k not in ("out_indices", "out_features")}
        return cls(**cls._prepare_dict({**config_dict, **overrides}))

    @classmethod
    def _prepare_dict(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        """Hook for subclasses to rename legacy keys before ``__init__``."""
        return config_dict


def _jsonable(value: Any) -> Any:
    if isinstance(value, PretrainedConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class BackboneConfigMixin:
    """Stage selection on a config; ``stage_names`` is derived by the subclass (or set once the model knows it)."""

    stage_names: list[str] | None

    def _init_stage_selection(self, out_features: Any, out_indices: Any) -> None:
        self._out_features, self._out_indices = out_features, out_indices
        if self.stage_names is not None:
            self.set_output_features_output_indices(out_features, out_indices)

    def set_output_features_output_indices(self, out_features: Any, out_indices: Any) -> None:
        """Validate and store a selection against ``stage_names``, normalised (non-negative, aligned)."""
        self._out_features, self._out_indices = align_stage_selection(out_features, out_indices, self.stage_names)

    @property
    def out_features(self) -> list[str] | None:
        return self._out_features

    @out_features.setter
    def out_features(self, value: Any) -> None:
        self.set_output_features_output_indices(value, None)

    @property
    def out_indices(self) -> list[int] | None:
        return self._out_indices

    @out_indices.setter
    def out_indices(self, value: Any) -> None:
        self.set_output_features_output_indices(None, value)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["out_features"] = _jsonable(self._out_features)
        out["out_indices"] = _jsonable(self._out_indices)
        out["stage_names"] = _jsonable(self.stage_names)
        return dict(sorted(out.items()))


# keys of a timm hub repo's config.json; ``architecture`` and ``model_args`` become native config fields
TIMM_CONFIG_KEYS = ("architecture", "model_args", "pretrained_cfg", "num_classes", "num_features", "global_pool")


class NativeBackboneConfigMixin(BackboneConfigMixin):
    """Native backbones' configs: stages ``stem, stage1..N`` from ``depths``, and timm configs read as native ones.

    Subclasses implement ``timm_fields(architecture, **model_args)``: the config fields for a timm name.
    """

    depths: list[int]

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @staticmethod
    def timm_fields(architecture: str, **model_args: Any) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _prepare_dict(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        if "architecture" in config_dict and "model_type" not in config_dict:  # a timm hub repo's config.json
            timm_dict = {k: config_dict.pop(k) for k in TIMM_CONFIG_KEYS if k in config_dict}
            return {**cls.timm_fields(timm_dict["architecture"], **timm_dict.get("model_args", {})), **config_dict}
        return config_dict

    @classmethod
    def from_timm(cls, name_or_config: str | os.PathLike | dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        """The native config of a timm model: a name with or without tag (``resnet50.a1_in1k``), a timm hub repo
        (folder, ``org/name`` or ``hf-hub:org/name``, read from the cache when offline) or its ``config.json`` dict.

        Args:
            name_or_config: See above.
            **kwargs: Field overrides (``out_indices``...) and hub arguments (``cache_dir``, ``revision``...).

        Raises:
            ValueError: not a timm config, or an architecture the native class does not implement.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        if isinstance(name_or_config, dict):
            timm_config = dict(name_or_config)
        else:
            src = os.fspath(name_or_config).removeprefix("hf-hub:")
            if os.path.isfile(src):
                timm_config = read_json(src)
            elif os.path.isdir(src) or "/" in src:
                path = resolve_file(src, CONFIG_NAME, **hub_kwargs)
                if path is None:
                    raise OSError(f"{src!r} has no {CONFIG_NAME}")
                timm_config = read_json(path)
            else:
                timm_config = {"architecture": src}
        if "architecture" not in timm_config:
            raise ValueError(f"not a timm config (no 'architecture'): keys {sorted(timm_config)}")
        timm_config.pop("model_type", None)
        return cls(**cls._prepare_dict({**timm_config, **kwargs}))
