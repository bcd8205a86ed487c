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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .hub import (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    atomic_write,
    load_weights,
    read_json,
    resolve_file,
    resolve_weights,
    save_safetensors_atomic,
)

FAMILIES = ("swin", "resnet")
LAYOUTS = ("timm", "transformers")
# a classifier's key in each layout, and the task-model prefix transformers puts on everything else
_HEADS = {("swin", "timm"): "head.fc.weight", ("resnet", "timm"): "fc.weight"}
_HF_HEADS = {"swin": "classifier.weight", "resnet": "classifier.1.weight"}
_TASK_PREFIX = {"swin": "swin.", "resnet": "resnet."}
_TASK_CLASS = {"swin": ("SwinForImageClassification", "SwinModel"),
               "resnet": ("ResNetForImageClassification", "ResNetModel")}  # fmt: skip


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
def _mappings(family: str) -> tuple[Callable[[dict], dict], Callable[[dict], dict]]:
    """(timm -> transformers, transformers -> timm) key mappings of a family, from its model file."""
    if family == "swin":
        from .models.swin import swin_timm_to_transformers, swin_transformers_to_timm

        return swin_timm_to_transformers, swin_transformers_to_timm
    if family == "resnet":
        from .models.resnet import resnet_timm_to_transformers, resnet_transformers_to_timm

        return resnet_timm_to_transformers, resnet_transformers_to_timm
    raise ValueError(f"unknown model family {family!r}; choose from {list(FAMILIES)}")


def detect_layout(state_dict: dict[str, Any]) -> tuple[str, str]:
    """The family (``swin`` / ``resnet``) and layout (``timm`` / ``transformers``) of a state dict.

    Raises:
        ValueError: the keys are neither a Swin nor a ResNet of either layout.
    """
    keys = list(state_dict)
    if "patch_embed.proj.weight" in state_dict and any(k.startswith("layers.0.blocks.") for k in keys):
        return "swin", "timm"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "swin", "transformers"
    if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in keys):
        return "resnet", "timm"
    if any(k.endswith("embedder.embedder.convolution.weight") for k in keys):
        return "resnet", "transformers"
    raise ValueError(
        f"not a Swin or ResNet checkpoint in timm's or transformers' layout (first keys: {keys[:4]}); expected "
        f"'patch_embed.proj.weight' (timm Swin), '...embeddings.patch_embeddings.projection.weight' (transformers "
        f"Swin), 'conv1.weight' (timm ResNet) or '...embedder.embedder.convolution.weight' (transformers ResNet)"
    )


def to_transformers(state_dict: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A timm state dict in transformers' layout: the task model's (``swin.`` / ``resnet.`` prefix) when it has a
    classifier, the base model's otherwise."""
    timm_to_hf, _ = _mappings(family)
    out = timm_to_hf(state_dict)
    if not any(k.startswith("classifier.") for k in out):
        return out
    prefix = _TASK_PREFIX[family]
    return {(k if k.startswith("classifier.") else prefix + k): v for k, v in out.items()}


def to_timm(state_dict: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A transformers state dict (any of its Swin/ResNet layouts) in timm's layout."""
    _, hf_to_timm = _mappings(family)
    return hf_to_timm(state_dict)


# configs ---------------------------------------------------------------------------------------------------------
def _config_class(family: str) -> type:
    if family == "swin":
        from .models.swin import SwinConfig

        return SwinConfig
    from .models.resnet import ResNetConfig

    return ResNetConfig


def native_fields_from_timm(family: str, architecture: str, model_args: dict[str, Any] | None = None) -> dict:
    """Native config fields for a timm architecture and its ``model_args``.

    ResNet model arguments that only resize a standard ResNet (``layers``, ``channels``) are read here, on top of
    :meth:`ResNetConfig.timm_fields`, which accepts the standard variants as they are.
    """
    model_args = dict(model_args or {})
    config_class = _config_class(family)
    if family == "swin":
        return config_class.timm_fields(architecture, **model_args)
    layers, channels = model_args.pop("layers", None), model_args.pop("channels", None)
    fields = config_class.timm_fields(architecture, **model_args)
    expansion = 1 if fields["layer_type"] == "basic" else 4
    if layers is not None:
        fields["depths"] = list(layers)
    if channels is not None:
        fields["hidden_sizes"] = [c * expansion for c in channels]
    return fields


def timm_architecture(config: Any) -> tuple[str, dict[str, Any]]:
    """The timm architecture and ``model_args`` that build the model a native/transformers config describes.

    Standard variants map to their timm name with no arguments; other sizes to the nearest family member with
    arguments (``depths``/``embed_dim``... for Swin, ``layers``/``channels`` for ResNet).

    Raises:
        ValueError: the config describes something timm's model cannot express.
    """
    args: dict[str, Any] = {}
    if config.model_type in ("swin", "maskformer-swin"):
        from .models.swin import TIMM_SWIN_VARIANTS

        if getattr(config, "use_absolute_embeddings", False):
            raise ValueError("timm's SwinTransformer has no absolute position embeddings; cannot convert this model")
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        ours = (config.embed_dim, tuple(config.depths), tuple(config.num_heads), config.window_size, size)
        name = next((n for n, v in TIMM_SWIN_VARIANTS.items() if v == ours and config.patch_size == 4), None)
        if name is None:
            name = "swin_tiny_patch4_window7_224"
            args = dict(embed_dim=config.embed_dim, depths=tuple(config.depths), num_heads=tuple(config.num_heads),
                        window_size=config.window_size, img_size=size, patch_size=config.patch_size)  # fmt: skip
        if config.mlp_ratio != 4.0:
            args["mlp_ratio"] = config.mlp_ratio
        if not config.qkv_bias:
            args["qkv_bias"] = False
    elif config.model_type == "resnet":
        from .models.resnet import TIMM_RESNET_VARIANTS

        fixed = dict(downsample_in_first_stage=False, downsample_in_bottleneck=False, hidden_act="relu",
                     embedding_size=64)  # fmt: skip
        differing = {k: getattr(config, k) for k, v in fixed.items() if getattr(config, k) != v}
        if differing:
            raise ValueError(
                f"timm's plain ResNet has {fixed} (a 64-channel 7x7 stem, the stride on the 3x3 conv, ReLU); this "
                f"config has {differing} and cannot be converted"
            )
        expansion = 1 if config.layer_type == "basic" else 4
        wanted = (config.layer_type, tuple(config.depths))
        name = next((n for n, v in TIMM_RESNET_VARIANTS.items() if (v[0], tuple(v[1])) == wanted), None)
        if name is None:
            name = "resnet18" if config.layer_type == "basic" else "resnet50"
            args["layers"] = tuple(config.depths)
        channels = tuple(h // expansion for h in config.hidden_sizes)
        if channels != (64, 128, 256, 512) or any(h % expansion for h in config.hidden_sizes):
            args["channels"] = channels
    else:
        raise ValueError(f"cannot convert model_type {config.model_type!r}; choose from ['swin', 'resnet']")
    if config.num_channels != 3:
        args["in_chans"] = config.num_channels
    return name, args


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
    head = timm_state_dict.get(_HEADS[(family, "timm")])
    return int(head.shape[0]) if head is not None else 0


# files -----------------------------------------------------------------------------------------------------------
def _read_source(src: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if os.path.isfile(src):
        return load_weights(src), None
    config_path = resolve_file(src, CONFIG_NAME)
    weights = resolve_weights(src)
    if weights is None:
        raise OSError(f"{src!r} holds no weights (model.safetensors, pytorch_model.bin or a shard index)")
    return load_weights(weights, src=src), (read_json(config_path) if config_path is not None else None)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    architecture: str | None = None,
    config: str | os.PathLike | dict[str, Any] | None = None,
) -> ConversionResult:
    """Convert a Swin or ResNet checkpoint between timm's and transformers' layouts.

    Args:
        src: A folder or cached hub id (``config.json`` + weights, in either layout), or a weights file.
        dst: An output folder (``config.json`` + ``model.safetensors``), or a ``.safetensors`` file (weights only).
        to: ``"timm"`` or ``"transformers"``; by default the layout the source is not in.
        architecture: The timm architecture of a timm weights file (needed for a folder output).
        config: A transformers ``config.json`` (path or dict) for a transformers weights file (folder output).

    Raises:
        ValueError: unknown layout, an unsupported architecture, or a weights file without what its config needs.
        OSError: the source cannot be read or the output written.
    """
    src, dst = os.fspath(src), os.fspath(dst)
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
    if to == "timm" and family == "swin" and "norm.weight" not in out_state:
        out_state = _with_identity_norm(out_state, native, notes)

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
                native.num_labels = int(out_state[_HF_HEADS[family]].shape[0])
            native.architectures = [_TASK_CLASS[family][0 if has_head else 1]]
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
    config_class = _config_class(family)
    if "architecture" in src_config and "model_type" not in src_config:
        arch = src_config["architecture"]
        model_args = dict(src_config.get("model_args") or {})
        native = config_class(**native_fields_from_timm(family, arch, model_args))
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
    return int(config.hidden_sizes[-1]) if hasattr(config, "hidden_sizes") else int(config.hidden_size)


def _with_identity_norm(state_dict: dict[str, torch.Tensor], native: Any, notes: list[str]) -> dict:
    """timm's Swin needs its final norm; a backbone checkpoint has none, so an identity norm is written."""
    width = _last_width(native) if native is not None else None
    if width is None:
        last = [v for k, v in state_dict.items() if k.endswith("mlp.fc2.bias")]
        width = int(last[-1].shape[0])
    notes.append("the source has no final norm (a backbone checkpoint): timm's norm is written as identity (1, 0)")
    return {**state_dict, "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OSError(f"cannot write {path}: the folder {parent} does not exist")
