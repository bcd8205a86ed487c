"""This package's backbones inside transformers' task models (Mask2Former, UperNet, MaskFormer, DPT).

transformers builds a head's backbone from ``config.backbone_config`` through its own ``AutoConfig`` /
``AutoBackbone`` registries. Importing this module registers an adapter pair there: :class:`BackboneAdapterConfig`
(a transformers config holding one of our backbone configs, ``model_type`` ``"timm_backbone_package"``) and
:class:`BackboneAdapter` (a transformers ``PreTrainedModel`` holding our backbone). A head's ``config.json`` then
stores our backbone config, and ``from_pretrained`` builds our backbone again::

    >>> import torch, transformers
    >>> from timm_backbone import TimmBackboneConfig
    >>> from timm_backbone.integrations.transformers import as_transformers_config
    >>> backbone = as_transformers_config(TimmBackboneConfig("resnet18", out_indices=(1, 2, 3, 4)))
    >>> model = transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(backbone_config=backbone))
    >>> model.eval()(torch.randn(1, 3, 64, 64)).logits.shape
    torch.Size([1, 2, 64, 64])

Needs ``pip install timm-backbone[transformers]``; the core package never imports this module.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from huggingface_hub.dataclasses import strict
from transformers.modeling_outputs import BackboneOutput as TransformersBackboneOutput

from ..auto import AutoBackbone, AutoConfig, family_of
from ..configuration import PretrainedConfig

__all__ = ["MODEL_TYPE", "BackboneAdapter", "BackboneAdapterConfig", "as_transformers_config", "enable"]

MODEL_TYPE = "timm_backbone_package"


@strict(accept_kwargs=True)
class BackboneAdapterConfig(transformers.PreTrainedConfig):
    """A transformers config that holds one of this package's backbone configs, for a head's ``backbone_config``.

    Args:
        backbone_model_type: ``model_type`` of the held config (``timm_backbone``, ``swin``, ``resnet``).
        backbone_fields: The held config's ``to_dict()``.
        token_feature_maps: Return each feature map as a ``(batch, 1 + H * W, channels)`` sequence with the class
            token first, the layout transformers' DPT reads from ViT backbones; needs a backbone built with
            ``output_prefix_tokens=True``.
        patch_size: The backbone's finest stride; DPT reads it to fold token sequences back into maps.
        **kwargs: transformers' config fields; with ``token_feature_maps``, ``hidden_size`` is the maps' width (DPT's
            readout projection reads it; without it DPT uses its own ``hidden_size``, as its hybrid mode needs).
    """

    model_type = MODEL_TYPE

    backbone_model_type: str = "timm_backbone"
    backbone_fields: dict | None = None
    token_feature_maps: bool = False
    patch_size: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.backbone_model_type == MODEL_TYPE:
            raise ValueError("backbone_model_type must name one of timm_backbone's configs, not the adapter itself")
        super().__post_init__(**kwargs)

    def to_backbone_config(self) -> PretrainedConfig:
        """The held backbone config, as this package's class (``TimmBackboneConfig``, ``SwinConfig``...)."""
        return AutoConfig.from_dict({**(self.backbone_fields or {}), "model_type": self.backbone_model_type})

    @property
    def out_features(self) -> list[str] | None:
        return self.to_backbone_config().out_features

    @property
    def out_indices(self) -> list[int] | None:
        return self.to_backbone_config().out_indices


def as_transformers_config(config: PretrainedConfig, token_feature_maps: bool = False) -> BackboneAdapterConfig:
    """Wrap one of this package's backbone configs for a transformers head's ``backbone_config``.

    The stages are resolved here (on the meta device, nothing allocated), so the stored config names them.

    Args:
        config: A ``TimmBackboneConfig``, ``SwinConfig`` or ``ResNetConfig``.
        token_feature_maps: See :class:`BackboneAdapterConfig` (transformers' DPT).

    Raises:
        TypeError: ``config`` is not a backbone config of this package.
        ValueError: ``token_feature_maps`` without ``output_prefix_tokens=True`` on the backbone.
    """
    if not isinstance(config, PretrainedConfig) or family_of(config) is None:
        raise TypeError(
            f"as_transformers_config takes a backbone config of timm_backbone (TimmBackboneConfig, SwinConfig, "
            f"ResNetConfig), got {type(config).__name__}"
        )
    enable()
    with torch.device("meta"):
        probe = AutoBackbone.from_config(config.__class__.from_dict(config.to_dict()))
    if token_feature_maps and not getattr(probe.config, "output_prefix_tokens", False):
        raise ValueError(
            "token_feature_maps=True puts the class token in front of each map, so the backbone needs "
            "output_prefix_tokens=True (a token model such as a timm ViT)"
        )
    return BackboneAdapterConfig(
        backbone_model_type=config.model_type,
        backbone_fields=probe.config.to_dict(),
        token_feature_maps=token_feature_maps,
        patch_size=int(min(probe.strides)),
        **({"hidden_size": probe.channels[-1]} if token_feature_maps else {}),
    )


class BackboneAdapter(transformers.PreTrainedModel):
    """One of this package's backbones as a transformers backbone (``channels``, ``out_features``,
    ``forward_with_filtered_kwargs``), built by transformers' ``AutoBackbone`` / ``load_backbone`` from a
    :class:`BackboneAdapterConfig`. The backbone itself is ``self.model``."""

    config_class = BackboneAdapterConfig
    config: BackboneAdapterConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config: BackboneAdapterConfig, **kwargs: Any) -> None:
        super().__init__(config)
        self.model = AutoBackbone.from_config(config.to_backbone_config())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """The backbone keeps its own initialisation (timm's, or the native family's); only buffers that are not
        saved are computed again, since transformers' ``from_pretrained`` builds the model on the meta device
        (timm's Swin relative position index)."""
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    # transformers' backbone API -----------------------------------------------------------------------------------
    @property
    def stage_names(self) -> list[str]:
        return self.model.stage_names

    @property
    def out_features(self) -> list[str]:
        return self.model.out_features

    @property
    def out_indices(self) -> list[int]:
        return self.model.out_indices

    @property
    def num_features(self) -> list[int]:
        return self.model.num_features

    @property
    def channels(self) -> list[int]:
        return self.model.channels

    @property
    def strides(self) -> list[int]:
        return self.model.strides

    @property
    def out_feature_channels(self) -> dict[str, int]:
        """Width of every stage; the selected ones as output (after a feature pyramid, if any)."""
        return {**dict(zip(self.stage_names, self.num_features)), **dict(zip(self.out_features, self.channels))}

    @property
    def has_attentions(self) -> bool:
        return self.model.has_attentions

    def forward_with_filtered_kwargs(self, *args: Any, **kwargs: Any) -> TransformersBackboneOutput:
        """``forward`` with the keyword arguments it does not take dropped (transformers' heads pass their own)."""
        accepted = inspect.signature(self.forward).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if not self.has_attentions:
            kwargs.pop("output_attentions", None)
        return self(*args, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> TransformersBackboneOutput | tuple:
        out = self.model(pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        feature_maps = out.feature_maps
        if self.config.token_feature_maps:
            # B, 1 + H*W, C: the class token, then the map's positions row by row
            feature_maps = tuple(
                torch.cat((prefix[:, :1], fmap.flatten(2).transpose(1, 2)), dim=1)
                for fmap, prefix in zip(feature_maps, out.prefix_tokens)
            )
        output = TransformersBackboneOutput(
            feature_maps=tuple(feature_maps), hidden_states=out.hidden_states, attentions=out.attentions
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def enable() -> None:
    """Register :class:`BackboneAdapterConfig` and :class:`BackboneAdapter` with transformers' ``AutoConfig`` and
    ``AutoBackbone`` (done on import of this module; calling it again does nothing), so that heads' configs that hold
    one, saved or in memory, build this package's backbones."""
    transformers.AutoConfig.register(MODEL_TYPE, BackboneAdapterConfig, exist_ok=True)
    transformers.AutoBackbone.register(BackboneAdapterConfig, BackboneAdapter, exist_ok=True)


enable()
