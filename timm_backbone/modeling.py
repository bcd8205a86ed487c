"""Model base: weights in and out, checkpoint key mapping, and the load report."""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .configuration import PretrainedConfig
from .hub import (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    SAVE_ID_KEY,
    Source,
    atomic_write_files,
    folder_lock,
    pop_hub_kwargs,
    resolve_source,
    safetensors_bytes,
)

logger = logging.getLogger("timm_backbone")


@dataclass
class LoadReport:
    """What loading a checkpoint matched: keys the model lacks in the file, and keys the model has no place for."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    source: str = ""
    loaded_keys: list[str] = field(default_factory=list)  # the model's keys that took the file's values

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        parts = []
        if self.missing_keys:
            parts.append(
                f"{len(self.missing_keys)} missing keys (left at their initial values): "
                f"{_abbreviate(self.missing_keys)}"
            )
        if self.unexpected_keys:
            parts.append(f"{len(self.unexpected_keys)} unexpected keys (not used): {_abbreviate(self.unexpected_keys)}")
        if self.mismatched_keys:
            shapes = ", ".join(
                f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched_keys[:5]
            )
            parts.append(f"{len(self.mismatched_keys)} keys with mismatched shapes: {shapes}")
        where = f" loading {self.source}" if self.source else ""
        return f"all keys matched{where}" if not parts else f"{'; '.join(parts)}{where}"


def _abbreviate(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def match_prefix(state_dict: dict[str, Any], expected: Iterable[str], prefixes: Iterable[str]) -> dict[str, Any]:
    """Strip or add the task-model prefix (``swin.``, ``resnet.``, ``model.``...) that best matches ``expected``.

    Keys outside the stripped prefix are kept as they are, so they still show up as unexpected.
    """
    expected = set(expected)
    best, best_hits = state_dict, sum(k in expected for k in state_dict)
    for prefix in prefixes:
        stripped = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
        added = {prefix + k: v for k, v in state_dict.items()}
        for candidate in (stripped, added):
            hits = sum(k in expected for k in candidate)
            if hits > best_hits:
                best, best_hits = candidate, hits
    return best


class PreTrainedModel(nn.Module):
    """Base for every model: ``save_pretrained`` / ``from_pretrained`` in transformers' file layout.

    Subclasses set ``config_class``, may list ``checkpoint_prefixes`` (task-model prefixes stripped or added when
    they make the checkpoint match) and override :meth:`convert_state_dict` for foreign layouts (timm,
    torchvision, MaskFormer's Swin).
    """

    config_class: ClassVar[type[PretrainedConfig]] = PretrainedConfig
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ()
    # regexes of keys whose absence (missing) or presence (unexpected) is normal and not reported
    ignore_missing: ClassVar[tuple[str, ...]] = ()
    ignore_unexpected: ClassVar[tuple[str, ...]] = ()
    main_input_name: ClassVar[str] = "pixel_values"

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.load_report: LoadReport | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # saving ---------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``save_directory``.

        Both files are serialised and written beside their targets before either replaces an existing file, so a
        failure while writing leaves the previous pair intact; saves into one folder follow one another (a lock on
        the folder). Both files record one random save id: an interrupt between the two renames leaves a pair whose
        ids differ, which :meth:`from_pretrained` refuses instead of loading one save's weights with another's
        config.
        """
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise OSError(f"{save_directory} is a file; save_pretrained needs a folder")
        self.config.architectures = [type(self).__name__]
        save_id = uuid.uuid4().hex
        weights = safetensors_bytes(self.state_dict_for_save(), {"format": "pt", SAVE_ID_KEY: save_id})
        config_dict = {**self.config.to_dict(), SAVE_ID_KEY: save_id}
        config = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode("utf-8")
        save_directory.mkdir(parents=True, exist_ok=True)
        atomic_write_files({save_directory / SAFE_WEIGHTS_NAME: weights, save_directory / CONFIG_NAME: config})

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """The state dict as written to disk (transformers' key names)."""
        return self.state_dict()

    # loading --------------------------------------------------------------------------------------------------------
    def missing_ok(self) -> tuple[str, ...]:
        """Regexes of this model's keys whose absence from a checkpoint is normal and not reported."""
        return self.ignore_missing

    @classmethod
    def convert_state_dict(cls, state_dict: dict[str, torch.Tensor], config: PretrainedConfig) -> dict:
        """Map a foreign checkpoint layout to this model's keys; the default keeps it as it is."""
        return state_dict

    def input_conv_keys(self) -> tuple[str, ...]:
        """This model's keys of the convolution weights that read the input image. A checkpoint whose weights there
        have another input channel count (3 for an RGB checkpoint, the model ``num_channels != 3``) is adapted on
        load by timm's ``adapt_input_conv`` rule."""
        return ()

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        config: PretrainedConfig | None = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Build the model and load its weights; the model is returned in eval mode.

        Args:
            src: Anything :func:`~timm_backbone.hub.resolve_source` resolves: a folder or hub id (this package's or
                transformers' files, or a timm hub repo for backbones that take one), a timm name with or without
                tag (``resnet50.a1_in1k``, ``hf-hub:org/name``: its pretrained weights, from the cache when
                offline), or a weights file together with ``config``.
            config: Use this config instead of the one the source implies.
            strict: Raise ``ValueError`` when keys are missing or unexpected, instead of reporting them.
            **kwargs: Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``),
                ``torch_dtype``/``dtype``, and config overrides (``out_indices``, ``out_features``...).

        Raises:
            OSError: the source or its weights are not found (the message says where it looked), a weights file that
                is corrupt, declares more storage than the model holds, or comes from another save than the
                ``config.json`` beside it.
            ValueError: the source describes another model, a config field is out of range or does not fit the
                weights file, or the weights do not fit the model.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        source = resolve_source(src, **hub_kwargs)
        # a concurrent save_pretrained into the folder finishes before (or starts after) both files are read
        with folder_lock(source.name, shared=True) if source.kind == "folder" else _no_lock():
            if config is None:
                config = cls.config_class.from_source(source, **kwargs)
            elif kwargs:
                config = type(config).from_dict(config.to_dict(), **kwargs)
            if source.kind == "timm" and not getattr(config, "use_pretrained_backbone", True):
                model = cls(config)  # a timm name with pretrained weights declined: random weights, nothing read
            else:
                check_config_fits_weights(config, source)
                state_dict, path = source.load_state_dict(max_bytes=cls._storage_budget(config, source))
                model = cls.from_state_dict(config, state_dict, strict=strict, source=path)
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()

    @classmethod
    def _storage_budget(cls, config: PretrainedConfig, source: Source) -> int | None:
        """The most tensor bytes a ``.bin`` checkpoint of this model may declare: 16 bytes per parameter (fp32 weights
        with two optimizer states, or fp64) plus 64 MiB, counted on a copy built on the meta device."""
        if not source.weights_file().name.endswith(".bin"):
            return None
        with torch.device("meta"):
            probe = cls(config)
        return 16 * sum(t.numel() for t in probe.state_dict().values()) + 2**26

    @classmethod
    def from_state_dict(
        cls, config: PretrainedConfig, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> PreTrainedModel:
        """Build the model for ``config`` and load ``state_dict`` (any layout :meth:`load_checkpoint` takes)."""
        model = cls(config)
        model.load_checkpoint(state_dict, strict=strict, source=source)
        return model

    def load_checkpoint(
        self, state_dict: dict[str, torch.Tensor], strict: bool = False, source: str = ""
    ) -> LoadReport:
        """Load a checkpoint in any supported layout, report what did not match, and return the report.

        Raises:
            ValueError: a tensor's shape differs from the model's (always), or keys did not match with ``strict``.
        """
        state_dict = self.convert_state_dict(dict(state_dict), self.config)
        own = self.state_dict()
        state_dict = match_prefix(state_dict, own, self.checkpoint_prefixes)
        state_dict = adapt_input_convs(state_dict, own, self.input_conv_keys())
        report = LoadReport(source=source)
        report.missing_keys = [k for k in own if k not in state_dict and not _matches(k, self.missing_ok())]
        report.unexpected_keys = [k for k in state_dict if k not in own and not _matches(k, self.ignore_unexpected)]
        report.mismatched_keys = [
            (k, tuple(v.shape), tuple(own[k].shape))
            for k, v in state_dict.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if report.mismatched_keys or (strict and not report.ok):
            raise ValueError(f"checkpoint does not fit {type(self).__name__}: {report}")
        check_weight_dtypes(state_dict, own, source)
        if own and not any(k in own for k in state_dict):
            where = f" in {source}" if source else ""
            raise ValueError(
                f"no key of the checkpoint{where} matches {type(self).__name__}: it holds another model's weights "
                f"(checkpoint keys: {_abbreviate(sorted(state_dict), 4)}; model keys: {_abbreviate(list(own), 4)})"
            )
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        report.loaded_keys = [k for k in own if k in state_dict]
        if not report.ok:
            logger.warning("%s: %s", type(self).__name__, report)
        self.load_report = report
        return report


def adapt_input_convs(
    state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor], keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Adapt the input convolutions ``keys`` of a checkpoint to the model's input channel count with timm's
    ``adapt_input_conv`` (1 channel: the RGB kernels summed; ``n``: repeated and scaled by ``3 / n``). Weights that
    differ otherwise, or that timm's rule cannot convert, are left for the shape check to report."""
    from timm.models import adapt_input_conv

    for key in keys:
        have, want = state_dict.get(key), own.get(key)
        if have is None or want is None or have.dim() != 4 or have.shape[1] == want.shape[1]:
            continue
        if have.shape[0] != want.shape[0] or have.shape[2:] != want.shape[2:]:
            continue
        try:
            state_dict[key] = adapt_input_conv(want.shape[1], have)
        except NotImplementedError:  # timm converts from 3 channels (or multiples of 3 to 1) only
            continue
    return state_dict


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, key) for p in patterns)


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


def check_weight_dtypes(state_dict: dict[str, Any], own: dict[str, torch.Tensor], source: str = "") -> None:
    """Refuse checkpoint tensors that cannot hold a floating-point parameter's values: integer, bool and complex
    tensors would be cast silently (bools to 0/1, complex numbers losing their imaginary part).

    Raises:
        ValueError: naming the keys and their dtypes.
    """
    bad = [
        f"{k} ({v.dtype})"
        for k, v in state_dict.items()
        if k in own and own[k].is_floating_point() and (not v.is_floating_point() or v.is_complex())
    ]
    if bad:
        where = f" in {source}" if source else ""
        raise ValueError(
            f"{len(bad)} checkpoint tensors{where} are not floating point but the model's are: {_abbreviate(bad, 5)}; "
            f"the file does not hold this model's weights"
        )


def check_config_fits_weights(config: PretrainedConfig, source: Source) -> None:
    """Before anything is allocated, compare the parameters a config describes with the elements its safetensors
    weights hold (read from the headers): a config far larger than its weights was edited or belongs to another model.

    Raises:
        ValueError: naming the weights file and the config's size fields.
    """
    estimate = config.num_parameters_estimate()
    if estimate is None:
        return
    summary = source.weights_summary()
    if summary is None:
        return
    path, count, elements = summary
    if estimate > 2 * elements + 4096:
        fields = ", ".join(f"{k}={getattr(config, k)!r}" for k in config.size_fields)
        raise ValueError(
            f"the config {source.config_path()} does not fit {path}: it describes a model of at least {estimate} "
            f"parameters, but the file holds {elements} values in {count} tensors (check {fields})"
        )
