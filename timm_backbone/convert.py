"""Swin and ResNet checkpoints between timm's and transformers' layouts (``timm-backbone convert``).

The key mappings are the model files' own (``swin_timm_to_transformers``, ``resnet_timm_to_transformers`` and their
reverses); this module adds the layout detection, the configs of both sides and the file handling. Output is always
safetensors: a folder holds ``config.json`` + ``model.safetensors`` (transformers' ``SwinForImageClassification`` /
``ResNetForImageClassification`` layout when the checkpoint has a classifier, the base model's otherwise; timm's hub
layout with ``architecture``), a ``.safetensors`` path gets the weights alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .auto import FAMILIES, ModelFamily, family_of, get_family
from .hub import CONFIG_NAME, SAFE_WEIGHTS_NAME, atomic_write, read_json, resolve_source, save_safetensors_atomic

LAYOUTS = ("timm", "transformers")


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` did."""

    family: str
    source_layout: str
    target_layout: str
    architecture: str | None
    num_tensors: int
    paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        arch = f" ({self.architecture})" if self.architecture else ""
        lines = [
            f"converted {self.family}{arch}: {self.num_tensors} tensors, {self.source_layout} -> {self.target_layout}",
            *(f"  wrote {p}" for p in self.paths),
            *(f"  note: {n}" for n in self.notes),
        ]
        return "\n".join(lines)


# layouts ---------------------------------------------------------------------------------------------------------
def _convertible() -> list[ModelFamily]:
    """The registered families that know their timm and transformers layouts."""
    return [f for f in FAMILIES.values() if f.detect_layout is not None and f.timm_to_transformers is not None]


def detect_layout(state_dict: dict[str, Any]) -> tuple[str, str]:
    """The family (``swin``, ``resnet``...) and layout (``timm`` / ``transformers``) of a state dict.

    Raises:
        ValueError: the keys are not those of any registered family in either layout.
    """
    for family in _convertible():
        layout = family.detect_layout(state_dict)
        if layout is not None:
            return family.name, layout
    names = [f.name for f in _convertible()]
    raise ValueError(
        f"not a checkpoint of {names} in timm's or transformers' layout (first keys: {list(state_dict)[:4]})"
    )


def to_transformers(state_dict: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A timm state dict in transformers' layout: the task model's (``swin.`` / ``resnet.`` prefix) when it has a
    classifier, the base model's otherwise."""
    fam = get_family(family)
    out = fam.timm_to_transformers(state_dict)
    if not any(k.startswith("classifier.") for k in out):
        return out
    prefix = fam.transformers_heads[2]
    return {(k if k.startswith("classifier.") else prefix + k): v for k, v in out.items()}


def to_timm(state_dict: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A transformers state dict (any of the family's layouts) in timm's layout."""
    return get_family(family).transformers_to_timm(state_dict)


# configs ---------------------------------------------------------------------------------------------------------
def timm_architecture(config: Any) -> tuple[str, dict[str, Any]]:
    """The timm architecture and ``model_args`` that build the model a native/transformers config describes.

    Standard variants map to their timm name with no arguments; other sizes to the nearest family member with
    arguments (``depths``/``embed_dim``... for Swin, ``layers``/``channels`` for ResNet).

    Raises:
        ValueError: the config describes something timm's model cannot express, or no convertible family.
    """
    family = family_of(config)
    if family is None or family.timm_architecture is None:
        names = [f.name for f in _convertible()]
        raise ValueError(f"cannot convert model_type {config.model_type!r}; convertible families: {names}")
    return family.timm_architecture(config)


def timm_config_dict(architecture: str, model_args: dict[str, Any], num_classes: int, num_features: int) -> dict:
    """A timm hub ``config.json``: the architecture, its arguments and timm's pretrained config for it."""
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(architecture)
    cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    for key in ("url", "hf_hub_id", "file", "state_dict", "source", "hf_hub_filename", "origin_url", "paper_ids"):
        cfg.pop(key, None)
    cfg.update(tag="converted", num_classes=num_classes)
    if "img_size" in model_args:
        cfg["input_size"] = [cfg.get("input_size", (3,))[0], model_args["img_size"], model_args["img_size"]]
    if "in_chans" in model_args:
        cfg["input_size"] = [model_args["in_chans"], *list(cfg.get("input_size", (3, 224, 224)))[1:]]
    out = {"architecture": architecture, "num_classes": num_classes, "num_features": num_features}
    if model_args:
        out["model_args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()}
    out["pretrained_cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    return out


def _num_classes(timm_state_dict: dict[str, torch.Tensor], family: str) -> int:
    head = timm_state_dict.get(get_family(family).transformers_heads[0])
    return int(head.shape[0]) if head is not None else 0


# files -----------------------------------------------------------------------------------------------------------
def _read_source(src: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    source = resolve_source(src)
    state_dict, _ = source.load_state_dict()
    return state_dict, (source.config_dict() if source.kind != "file" else None)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    architecture: str | None = None,
    config: str | os.PathLike | dict[str, Any] | None = None,
    in_place: bool = False,
) -> ConversionResult:
    """Convert a Swin or ResNet checkpoint between timm's and transformers' layouts.

    Args:
        src: A folder or cached hub id (``config.json`` + weights, in either layout), or a weights file.
        dst: An output folder (``config.json`` + ``model.safetensors``), or a ``.safetensors`` file (weights only).
        to: ``"timm"`` or ``"transformers"``; by default the layout the source is not in.
        architecture: The timm architecture of a timm weights file (needed for a folder output).
        config: A transformers ``config.json`` (path or dict) for a transformers weights file (folder output).
        in_place: Allow ``dst`` to be ``src`` itself (or a file inside the ``src`` folder): the source is rewritten.

    Raises:
        ValueError: unknown layout, an unsupported architecture, a weights file without what its config needs, or
            an output that would overwrite the source without ``in_place``.
        OSError: the source cannot be read or the output written.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not in_place and os.path.exists(src):
        real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
        if real_dst == real_src or (os.path.isdir(real_src) and os.path.dirname(real_dst) == real_src):
            raise ValueError(
                f"the output {dst} would overwrite the source {src}; choose another output, or pass --in-place "
                f"(in_place=True) to rewrite the source"
            )
    if to is not None and to not in LAYOUTS:
        raise ValueError(f"to must be one of {list(LAYOUTS)}, got {to!r}")
    state_dict, src_config = _read_source(src)
    family, layout = detect_layout(state_dict)
    to = to or ("transformers" if layout == "timm" else "timm")
    if src_config is None and config is not None:
        src_config = read_json(config) if not isinstance(config, dict) else dict(config)
    if src_config is None and architecture is not None:
        src_config = {"architecture": architecture}
    notes: list[str] = []

    if to == layout:
        out_state = state_dict
        notes.append(f"the source is already in the {layout} layout; tensors are written unchanged")
    else:
        out_state = to_transformers(state_dict, family) if to == "transformers" else to_timm(state_dict, family)
    arch, model_args, native = _describe(family, layout, src_config, src)
    complete = get_family(family).complete_timm_state_dict
    if to == "timm" and complete is not None:
        out_state = complete(out_state, native, notes)

    paths = []
    if dst.endswith(".safetensors"):
        _ensure_parent(dst)
        save_safetensors_atomic(out_state, dst, {"format": "pt"})
        paths.append(dst)
    else:
        if native is None:
            needs = "--arch (the timm architecture)" if layout == "timm" else "--config (its config.json)"
            raise ValueError(
                f"writing a folder needs the model's config: {src} is a bare {layout} weights file; pass {needs}, "
                f"or give a .safetensors output path to convert the weights alone"
            )
        Path(dst).mkdir(parents=True, exist_ok=True)
        if to == "transformers":
            has_head = any(k.startswith("classifier.") for k in out_state)
            if has_head:
                native.num_labels = int(out_state[get_family(family).transformers_heads[1]].shape[0])
            native.architectures = [get_family(family).transformers_heads[3 if has_head else 4]]
            native.save_pretrained(dst)
        else:
            data = timm_config_dict(arch, model_args, _num_classes(out_state, family), _last_width(native))
            with atomic_write(Path(dst, CONFIG_NAME), "w") as f:
                json.dump(data, f, indent=2)
        save_safetensors_atomic(out_state, Path(dst, SAFE_WEIGHTS_NAME), {"format": "pt"})
        paths = [os.path.join(dst, CONFIG_NAME), os.path.join(dst, SAFE_WEIGHTS_NAME)]
    return ConversionResult(family, layout, to, arch, len(out_state), paths, notes)


def _describe(
    family: str, layout: str, src_config: dict[str, Any] | None, src: str
) -> tuple[str | None, dict[str, Any], Any]:
    """(timm architecture, timm model_args, native config) of the source; ``(None, {}, None)`` when unknown."""
    if src_config is None:
        return None, {}, None
    config_class = get_family(family).config_class
    if "architecture" in src_config and "model_type" not in src_config:
        arch = src_config["architecture"]
        model_args = dict(src_config.get("model_args") or {})
        native = config_class(**get_family(family).native_fields(arch, model_args))
        return arch, model_args, native
    if src_config.get("model_type") not in (config_class.model_type, *config_class.compatible_model_types):
        raise ValueError(
            f"{src}: config.json has model_type {src_config.get('model_type')!r} but the weights are a {family} "
            f"({layout} layout)"
        )
    keep = {k: v for k, v in src_config.items() if k not in ("out_features", "out_indices", "stage_names")}
    native = config_class.from_dict(keep)
    arch, model_args = timm_architecture(native)
    return arch, model_args, native


def _last_width(config: Any) -> int:
    """Channels of the last stage, read from the backbone built on the meta device."""
    with torch.device("meta"):
        return int(family_of(config).backbone_class(config).num_features[-1])


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OSError(f"cannot write {path}: the folder {parent} does not exist")
