"""ResNet checkpoint layouts: timm's and torchvision's (one layout) and transformers', the mappings between them, and
what conversion and the stage benchmark need to know about ResNet."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from ..hub import unwrap_state_dict

# checkpoint layouts ----------------------------------------------------------------------------------------------
# timm / torchvision keys: conv1, bn1, layer{1..4}.{block}.(conv|bn){k} / .downsample.{0,1}, fc
_TIMM_KEY = re.compile(r"^(conv1|bn1)\.|^layer\d+\.\d+\.")
_TIMM_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(?:(conv|bn)(\d)|downsample\.([01]))\.(\w+)$")
_HF_BLOCK = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d)|shortcut)\.(convolution|normalization)\.(\w+)$"
)
_STEM = {"conv1.": "embedder.embedder.convolution.", "bn1.": "embedder.embedder.normalization.",
         "fc.": "classifier.1."}  # fmt: skip


def resnet_timm_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm or torchvision ResNet state dict in transformers' ``ResNetModel`` / ``ResNetBackbone`` layout.

    ``fc`` becomes ``classifier.1``; prefix every other key with ``resnet.`` for ``ResNetForImageClassification``.
    Keys that are not part of a plain ResNet are kept as they are (they show up as unexpected when loaded).
    """
    out = {}
    for key, value in unwrap_state_dict(state_dict).items():
        block = _TIMM_BLOCK.match(key)
        if block:
            stage, index, kind, k, downsample, param = block.groups()
            prefix = f"encoder.stages.{int(stage) - 1}.layers.{index}."
            if kind is not None:
                name = f"layer.{int(k) - 1}.{'convolution' if kind == 'conv' else 'normalization'}"
            else:
                name = f"shortcut.{'convolution' if downsample == '0' else 'normalization'}"
            key = f"{prefix}{name}.{param}"
        else:
            for old, new in _STEM.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        out[key] = value
    return out


def resnet_transformers_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ResNet state dict (``ResNetModel``, ``ResNetBackbone``, or ``ResNetForImageClassification``
    with its ``resnet.`` prefix) in timm's and torchvision's ``ResNet`` layout; ``classifier.1`` becomes ``fc``."""
    state_dict = unwrap_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("resnet.")
        block = _HF_BLOCK.match(key)
        if block:
            stage, index, k, kind, param = block.groups()
            prefix = f"layer{int(stage) + 1}.{index}."
            if k is not None:
                name = f"{'conv' if kind == 'convolution' else 'bn'}{int(k) + 1}"
            else:
                name = f"downsample.{0 if kind == 'convolution' else 1}"
            key = f"{prefix}{name}.{param}"
        else:
            for new, old in _STEM.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        out[key] = value
    return out


def detect_layout(state_dict: dict[str, Any]) -> str | None:
    """``"timm"`` (timm's and torchvision's), ``"transformers"`` or ``None`` when the keys are not a ResNet's."""
    if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in state_dict):
        return "timm"
    if any(k.endswith("embedder.embedder.convolution.weight") for k in state_dict):
        return "transformers"
    return None


def is_timm_layout(state_dict: dict[str, Any]) -> bool:
    return any(_TIMM_KEY.match(k) for k in state_dict)


def fields_from_timm(architecture: str, **model_args: Any) -> dict[str, Any]:
    """ResNetConfig fields for a timm ResNet and its ``model_args``: the standard variants by name, other depths
    and widths as ``layers`` / ``channels``."""
    from .resnet import ResNetConfig

    layers, channels = model_args.pop("layers", None), model_args.pop("channels", None)
    fields = ResNetConfig.timm_fields(architecture, **model_args)
    expansion = 1 if fields["layer_type"] == "basic" else 4
    if layers is not None:
        fields["depths"] = list(layers)
    if channels is not None:
        fields["hidden_sizes"] = [c * expansion for c in channels]
    return fields


def timm_architecture(config: Any) -> tuple[str, dict[str, Any]]:
    """The timm architecture and ``model_args`` building the ResNet that ``config`` describes.

    Raises:
        ValueError: a stem, stride placement or activation that timm's plain ResNet does not have.
    """
    from .resnet import TIMM_RESNET_VARIANTS

    fixed = dict(downsample_in_first_stage=False, downsample_in_bottleneck=False, hidden_act="relu",
                 embedding_size=64)  # fmt: skip
    differing = {k: getattr(config, k) for k, v in fixed.items() if getattr(config, k) != v}
    if differing:
        raise ValueError(
            f"timm's plain ResNet has {fixed} (a 64-channel 7x7 stem, the stride on the 3x3 conv, ReLU); this "
            f"config has {differing} and cannot be converted"
        )
    args: dict[str, Any] = {}
    expansion = 1 if config.layer_type == "basic" else 4
    wanted = (config.layer_type, tuple(config.depths))
    name = next((n for n, v in TIMM_RESNET_VARIANTS.items() if (v[0], tuple(v[1])) == wanted), None)
    if name is None:
        name = "resnet18" if config.layer_type == "basic" else "resnet50"
        args["layers"] = tuple(config.depths)
    channels = tuple(h // expansion for h in config.hidden_sizes)
    if channels != (64, 128, 256, 512) or any(h % expansion for h in config.hidden_sizes):
        args["channels"] = channels
    if config.num_channels != 3:
        args["in_chans"] = config.num_channels
    return name, args


COMPARISON_NOTE = (
    "native stage k = timm layer{k}; the native stem includes the stem max-pool (stride 4) that timm's act1 "
    "tap (stride 2) precedes, so timm's act1 is max-pooled (3x3, stride 2, padding 1) before comparing"
)


def timm_as_native(stage_name: str, feature: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """timm's tap made comparable with the native stage: the stem tap is taken before the max pool."""
    if stage_name == "stem":
        return F.max_pool2d(feature.float(), kernel_size=3, stride=2, padding=1)
    return feature.float()
