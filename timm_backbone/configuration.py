"""Config base: keyword fields, transformers-compatible ``config.json``, save/from_pretrained."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from .backbone import align_stage_selection
from .hub import CONFIG_NAME, Source, atomic_write, pop_hub_kwargs, read_json, resolve_source

__all__ = ["BackboneConfigMixin", "NativeBackboneConfigMixin", "PreTrainedConfig", "PretrainedConfig", "pop_hub_kwargs"]


class PretrainedConfig:
    """Base config: every keyword becomes an attribute, unknown ones included, and survives a JSON round trip.

    Subclasses set ``model_type`` (the key transformers uses for the same architecture) and take their fields as
    typed keyword arguments.
    """

    model_type: ClassVar[str] = ""
    # configs held by this one, by attribute name (transformers' ``sub_configs``); filled by configs that hold configs
    sub_configs: ClassVar[dict[str, type]] = {}
    # transformers' flag for seq2seq models; none of these models is one (a config.json may still set it)
    is_encoder_decoder: bool = False
    # config.json files of these model types may be loaded by this class as well (e.g. maskformer-swin by swin)
    compatible_model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        id2label = kwargs.pop("id2label", None)
        num_labels = kwargs.pop("num_labels", None)
        kwargs.pop("label2id", None)
        if id2label is not None:
            self.id2label = _id2label(id2label)
        else:
            if num_labels is not None:
                check_int("num_labels", num_labels, low=0, high=MAX_LABELS)
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels if num_labels is not None else 2)}
        # transformers' output flags: forward() arguments left at None read them
        self.output_hidden_states = bool(kwargs.pop("output_hidden_states", False))
        self.output_attentions = bool(kwargs.pop("output_attentions", False))
        self.return_dict = bool(kwargs.pop("return_dict", True))
        kwargs.pop("use_return_dict", None)  # derived
        self.architectures = kwargs.pop("architectures", None)
        self.name_or_path = kwargs.pop("_name_or_path", kwargs.pop("name_or_path", ""))
        kwargs.pop("model_type", None)
        kwargs.pop("transformers_version", None)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def set_source(self, source: Source) -> None:
        """Remember where this config was read: ``name_or_path``, and the hub revision (pinned to the commit found),
        cache folder and subfolder, so that weights asked for later from the same name (MaskFormer's
        ``use_pretrained_backbone``) come from the same snapshot. None of it is written to ``config.json``; a token
        is not kept."""
        self.name_or_path = source.name
        kept = ("revision", "cache_dir", "subfolder")
        self._source_kwargs = {k: v for k, v in source.hub_kwargs.items() if k in kept}

    @property
    def use_return_dict(self) -> bool:
        """Whether ``forward`` returns an output object (``return_dict``) rather than a tuple."""
        return self.return_dict and not getattr(self, "torchscript", False)

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

    def to_diff_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the base fields left at their defaults (labels, output flags...), as transformers'
        ``to_diff_dict``: a model's own fields and ``model_type`` are always kept, held configs are reduced alike."""
        base = PretrainedConfig().to_dict()
        diff = {}
        for key, value in self.to_dict().items():
            held = getattr(self, key, None)
            if isinstance(held, PretrainedConfig):
                diff[key] = held.to_diff_dict()
            elif key == "model_type" or key not in base or value != base[key]:
                diff[key] = value
        return diff

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as JSON; ``use_diff`` (transformers' default) keeps only the fields that differ from the class
        defaults, ``False`` writes every field (what ``save_pretrained`` writes)."""
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write :meth:`to_json_string` to ``json_file_path``, atomically."""
        with atomic_write(Path(json_file_path), "w") as f:
            f.write(self.to_json_string(use_diff=use_diff))

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> PretrainedConfig:
        """The config written in a JSON file (transformers' ``config.json`` included).

        Raises:
            OSError: the file cannot be read or is not JSON.
            ValueError: it holds a config of another ``model_type``.
        """
        return cls.from_dict(read_json(json_file))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string(use_diff=False)}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` into ``save_directory`` (created if needed), atomically."""
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise OSError(f"{save_directory} is a file; save_pretrained needs a folder")
        save_directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(save_directory / CONFIG_NAME, "w") as f:
            f.write(self.to_json_string(use_diff=False))

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        """Load a config from a folder, a hub id, a ``config.json`` path or (backbones that take one) a timm name;
        other keyword arguments override its fields.

        Args:
            src: Anything :func:`~timm_backbone.hub.resolve_source` resolves.
            **kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder`` for the hub, and
                field overrides such as ``out_indices``.

        Raises:
            OSError: the source is not found or has no ``config.json``.
            ValueError: the file is of another ``model_type``.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        return cls.from_source(resolve_source(src, **hub_kwargs), **kwargs)

    @classmethod
    def from_source(cls, source: Source, **overrides: Any) -> PretrainedConfig:
        """The config a resolved source describes (see :meth:`from_pretrained`)."""
        if source.kind == "file" and not source.name.endswith(".json"):
            hint = (
                f" (a timm or torchvision checkpoint: {cls.__name__}.from_timm('<name>'))"
                if hasattr(cls, "from_timm")
                else ""
            )
            raise ValueError(
                f"loading the weights file {source.name} needs config=, the {cls.__name__} of its model{hint}"
            )
        with naming_config_file(source):
            if source.kind == "timm":
                return cls.from_timm_dict(source.config_dict(), name=source.name, **overrides)
            config = cls.from_dict(source.config_dict(), **overrides)
        config.set_source(source)
        return config

    @classmethod
    def from_timm_dict(cls, timm_config: dict[str, Any], name: str = "", **overrides: Any) -> PretrainedConfig:
        """The config of a timm model, from its hub ``config.json`` (``architecture``, ``model_args``...).

        Raises:
            ValueError: this config class cannot describe timm models.
        """
        raise ValueError(f"{cls.__name__} cannot be built from the timm model {name or timm_config!r}")

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

    # validation ----------------------------------------------------------------------------------------------------
    # fields that size the model, named when a config does not fit a weights file
    size_fields: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """Check every field's type and range, and that the model it describes is of a sane size; families add their
        fields. Called at the end of each family's ``__init__``.

        Raises:
            TypeError, ValueError: naming the field, its value and what it takes.
        """
        estimate = self.num_parameters_estimate()
        if estimate is not None and estimate > MAX_PARAMETERS:
            fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.size_fields)
            raise ValueError(
                f"{type(self).__name__} describes a model of about {estimate:.3g} parameters, more than the limit "
                f"{MAX_PARAMETERS:.3g}; check the size fields ({fields})"
            )

    def num_parameters_estimate(self) -> int | None:
        """About how many parameters the model has (a lower bound that ignores norms and biases), computed from the
        fields without building anything; ``None`` when the family cannot tell."""
        return None


# limits of a sane config: larger values are typing mistakes or hostile files, and would allocate for minutes
MAX_PARAMETERS = 2**33
MAX_WIDTH = 2**16
MAX_DEPTH = 1024
MAX_STAGES = 64
MAX_LABELS = 2**20


def check_int(name: str, value: Any, low: int = 1, high: int = MAX_WIDTH) -> int:
    """``value`` as an int in ``[low, high]``.

    Raises:
        TypeError: not an int (bools and strings included).
        ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_ints(name: str, value: Any, low: int = 1, high: int = MAX_WIDTH, max_len: int = MAX_STAGES) -> list[int]:
    """``value`` as a non-empty list of ints in ``[low, high]``.

    Raises:
        TypeError: not a list or tuple of ints.
        ValueError: empty, longer than ``max_len``, or an entry out of range.
    """
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints, got {value!r} ({type(value).__name__})")
    if not 1 <= len(value) <= max_len:
        raise ValueError(f"{name} must have 1 to {max_len} entries, got {len(value)}")
    for i, entry in enumerate(value):
        check_int(f"{name}[{i}]", entry, low, high)
    return list(value)


def check_float(name: str, value: Any, low: float = 0.0, high: float = float("inf"), low_open: bool = False) -> float:
    """``value`` as a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Raises:
        TypeError: not an int or float.
        ValueError: NaN, infinite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: another value, the choices listed.
    """
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _id2label(id2label: Any) -> dict[int, Any]:
    if not isinstance(id2label, dict):
        raise TypeError(
            f"id2label must be an object mapping class ids to names ({{'0': 'cat'}}), got {type(id2label).__name__}"
        )
    if len(id2label) > MAX_LABELS:
        raise ValueError(f"id2label has {len(id2label)} entries, more than the limit {MAX_LABELS}")
    out = {}
    for key, value in id2label.items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            raise ValueError(f"id2label keys must be class ids (integers), got {key!r}") from None
    return out


@contextmanager
def naming_config_file(source: Source) -> Iterator[None]:
    """Prefix the ``ValueError``/``TypeError`` of a config built from ``source`` with the file it was read from."""
    try:
        yield
    except (ValueError, TypeError) as err:
        where = source.config_path()
        if str(err).startswith(where):
            raise
        raise (TypeError if isinstance(err, TypeError) else ValueError)(f"{where}: {err}") from err


# transformers 5 spells it PreTrainedConfig
PreTrainedConfig = PretrainedConfig


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
    """Stage selection on a config; ``stage_names`` is derived by the subclass (or set once the model knows it).

    Every backbone config also takes the fine-tuning fields (keyword arguments, saved in ``config.json`` when set):
    ``frozen_stages`` (-1: none; ``k``: stages ``0..k`` get ``requires_grad=False`` and their BatchNorm layers stay
    in eval mode, mmdetection's meaning with index 0 the stem) and ``norm_eval`` (every BatchNorm of the backbone
    stays in eval mode in ``train()``; its affine terms still train).
    """

    stage_names: list[str] | None
    frozen_stages: int = -1  # defaults for configs that were not given them
    norm_eval: bool = False

    def _init_stage_selection(self, out_features: Any, out_indices: Any) -> None:
        self._out_features, self._out_indices = out_features, out_indices
        if self.stage_names is not None:
            self.set_output_features_output_indices(out_features, out_indices)

    def set_output_features_output_indices(self, out_features: Any, out_indices: Any) -> None:
        """Validate and store a selection against ``stage_names``, normalised (non-negative, aligned).

        Raises:
            ValueError: ``stage_names`` is not known yet, or the selection is invalid (see
                :func:`~timm_backbone.backbone.align_stage_selection`).
        """
        self._out_features, self._out_indices = align_stage_selection(out_features, out_indices, self.stage_names)

    def _set_selection(self, out_features: Any, out_indices: Any) -> None:
        if self.stage_names is None:  # checked once the model knows its stages (transformers' timm_backbone rule)
            self._out_features = out_features
            self._out_indices = list(out_indices) if isinstance(out_indices, tuple) else out_indices
            return
        self.set_output_features_output_indices(out_features, out_indices)

    @property
    def out_features(self) -> list[str] | None:
        return self._out_features

    @out_features.setter
    def out_features(self, value: Any) -> None:
        self._set_selection(value, None)

    @property
    def out_indices(self) -> list[int] | None:
        return self._out_indices

    @out_indices.setter
    def out_indices(self, value: Any) -> None:
        self._set_selection(None, value)

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
            # timm.create_model's in_chans given beside the name (from_timm(name, in_chans=4)) is a model argument
            model_args = {**timm_dict.get("model_args", {}), **{k: config_dict.pop(k) for k in ("in_chans",) if k in
                          config_dict}}  # fmt: skip
            return {**cls.timm_fields(timm_dict["architecture"], **model_args), **config_dict}
        return config_dict

    @classmethod
    def from_timm_dict(cls, timm_config: dict[str, Any], name: str = "", **overrides: Any) -> PretrainedConfig:
        if "architecture" not in timm_config:
            raise ValueError(f"not a timm config (no 'architecture'): keys {sorted(timm_config)}")
        timm_config = {k: v for k, v in timm_config.items() if k != "model_type"}
        config = cls(**cls._prepare_dict({**timm_config, **overrides}))
        config.name_or_path = name
        return config

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
            return cls.from_timm_dict(dict(name_or_config), **kwargs)
        name = os.fspath(name_or_config)
        if not os.path.exists(name) and "/" not in name:  # an architecture name, checked against the native ones
            return cls.from_timm_dict({"architecture": name}, name=name, **kwargs)
        source = resolve_source(name, **hub_kwargs)
        return cls.from_timm_dict(source.config_dict(), name=source.name, **kwargs)
