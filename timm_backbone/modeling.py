"""Model base: weights in and out, checkpoint key mapping, and the load report."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .configuration import PretrainedConfig
from .hub import CONFIG_NAME, SAFE_WEIGHTS_NAME, atomic_write_files, pop_hub_kwargs, resolve_source, safetensors_bytes

logger = logging.getLogger("timm_backbone")


@dataclass
class LoadReport:
    """What loading a checkpoint matched: keys the model lacks in the file, and keys the model has no place for."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    source: str = ""

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
        failure midway leaves the previous pair intact.
        """
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise OSError(f"{save_directory} is a file; save_pretrained needs a folder")
        self.config.architectures = [type(self).__name__]
        weights = safetensors_bytes(self.state_dict_for_save(), {"format": "pt"})
        config = self.config.to_json_string(use_diff=False).encode("utf-8")
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
            OSError: the source or its weights are not found (the message says where it looked).
            ValueError: the source describes another model, or the weights do not fit it.
        """
        hub_kwargs = pop_hub_kwargs(kwargs)
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        source = resolve_source(src, **hub_kwargs)
        if config is None:
            config = cls.config_class.from_source(source, **kwargs)
        elif kwargs:
            config = type(config).from_dict(config.to_dict(), **kwargs)
        if source.kind == "timm" and not getattr(config, "use_pretrained_backbone", True):
            model = cls(config)  # a timm name with pretrained weights declined: random weights, nothing read
        else:
            state_dict, path = source.load_state_dict()
            model = cls.from_state_dict(config, state_dict, strict=strict, source=path)
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()

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
        self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        if not report.ok:
            logger.warning("%s: %s", type(self).__name__, report)
        self.load_report = report
        return report


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, key) for p in patterns)
